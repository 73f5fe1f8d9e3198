"""scPerceiver: a transformer autoencoder for counts, built from the diagnosis of scViT.

The algorithm, as :class:`ScPerceiver` runs it::

    gene tokens t_cg = v_cg * E_g + F_g           (v = the network's input, e.g. log1p(counts))
      -> cross-attention: m learned latent queries read the G gene tokens    (B, m, d)
      -> self-attention blocks among the m latent tokens (pre-LayerNorm, MLP)
      -> bottleneck: flatten -> LayerNorm -> Linear -> q(z | x) = N(mu, sigma^2)  (B, 64)
      -> Linear -> m decoder tokens -> self-attention blocks
      -> readout: each gene's learned query attends to the m tokens; the gene's own
         weights turn what it read into its mean logit (and zero-inflation logit)
      -> mean = softmax over genes x the cell's library size; theta per gene and cell
      -> NB (default) or ZINB log-likelihood of the raw counts
    (option, off by default: while training each gene's input is hidden with probability
     input_masking, the targets stay whole)

Each choice answers one finding of the diagnosis (book chapters 06-07):

* **tokens own genes.** scViT's 40 tokens are conv channels that all span the same genes
  (near-copies, effective rank ~12-14 of 39). Here token ``g`` *is* gene ``g``: its identity
  embedding ``F_g`` plus its value ``v_cg`` times its expression embedding ``E_g``
  (scLDM's ``gene embedding x log1p(count)``, with an identity term so a zero count is still a
  token). ``tokens="conv"`` restores scViT's conv-channel tokens (ablation).
* **cost linear in genes.** No gene x gene attention: ``m`` latent queries cross-attend to the
  genes and each gene's query cross-attends to the ``m`` decoder tokens (Perceiver IO). The
  projections of a token ``v E_g + F_g`` are ``v (E W)_g + (F W)_g``, so keys and values are
  never built per cell: a cell costs ``O(heads x m x G)`` products, like a dense layer.
* **the library size scales the mean.** scViT's decoded mean ignores depth, and its corrected
  decoder is no better than a constant-mean null. Here ``mean = softmax(logits) x library``
  with a free ``theta`` per gene, as scVI (``library_scaling=False``: a softplus mean, the
  ablation).
* **the same network in training and evaluation.** scViT's BatchNorm with Dropout(0.5) makes
  the evaluation-mode loss jump. Here LayerNorm and no dropout (``norm="batch"`` with
  ``dropout=0.5`` brings them back, ablation).
* **attention that can route.** ``attention=False`` replaces every attention's data-dependent
  weights by learned constant mixing weights of the same shape (an MLP-Mixer), so the ablation
  removes routing and keeps the parameter flow.
* **a variational latent** (default) with KL warm-up in the trainer, for a like-for-like
  comparison with scVI; ``variational=False`` gives a deterministic autoencoder. The warm-up
  spans the whole training, as scVI's at its default budget: over the first half only (the
  earlier default) the KL term held allen_m1's test NLL at 39.3 against 37.3 (seed 0, input
  masking 0.2), pbmc68k's at 646.0 against 643.5.

One default answers no finding of the diagnosis; it took the model past scVI's test NLL on
zeisel2015 (1,189 training cells, seed 0, at the same budget: 6,173 without it, 6,044 with it,
against scVI's 6,066), and ``benchmarks/perceiver_variants.py`` measures it:

* **theta per gene and cell** (``dispersion="gene-cell"``): the readout decodes an offset of
  each gene's inverse dispersion per cell, so a cell type's overdispersion is its own.

**scVI's network shape** (``encoder="mlp"``, ``decoder="mlp"``, an ablation): one hidden layer
of 128 units from the input to ``q(z | x)`` and from ``z`` to every gene's outputs, with this
model's count model, likelihood and training, measures what the attention adds beyond them;
with ``norm="batch", dropout=0.1`` these are scVI's encoder and decoder exactly
(:data:`SCVI_NETWORKS`, chapter 08's third model).

**Input masking** (``input_masking=p``) is an option, off by default: while training, each
gene's input value is hidden with probability ``p`` and the whole count vector is still the
target, a denoising objective against memorising few deep training cells. A hidden gene's
token is ``F_g + M`` with ``M`` a learned mask token (as BERT's and MAE's), so a zero count
still means zero; hiding values as zeros instead gave about the same test NLL (seed 0, 0.2:
allen_m1 36.7 vs 37.3, zeisel2015 6,016.8 vs 6,019.4, pbmc68k 643.8 vs 643.5, lamanno2016
11,218 vs 11,222). With the KL warm-up
over the whole training, 0.2 lowered the test NLL of seed 0 on zeisel2015 (6,019 vs 6,037;
0.1: 6,011) and pbmc68k (643.5 vs 648.9; 0.1: 643.9) but raised it on allen_m1 (141 genes,
~26 UMI per cell, 8,000 training cells: 37.3 vs 32.3, 0.1 gave 35.2, scVI 34.3; with 1,200
training cells 42.0 vs 40.6): where a cell has few counts, hiding some hides what the latent
must encode. A default that holds on every dataset leaves it off
(``benchmarks/results/perceiver_variants_*.txt``).

Every nonlinearity, softmax and product of two cell-dependent tensors is its own module,
used once (``nn.Softmax``, :class:`~scvit_core.model.MatMul`, :class:`Mul`), so the
attribution-safe copy of :mod:`interpret.safe` can give each its exact rule.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from scvit_core.likelihood import OutputActivations, nll
from scvit_core.model import (
    Attention,
    AutoencoderOutput,
    Dropout,
    MatMul,
    MatmulConv1d,
    Mul,
)

LIKELIHOODS = ("nb", "corrected", "legacy")
TOKENS = ("genes", "conv")
NORMS = ("layer", "batch")
DISPERSIONS = ("gene", "gene-cell")
NETWORKS = ("attention", "mlp")

SCVI_NETWORKS: dict[str, Any] = {
    "encoder": "mlp",
    "decoder": "mlp",
    "norm": "batch",
    "dropout": 0.1,
}
"""The switches for scVI's encoder and decoder exactly (one hidden layer of 128 units,
BatchNorm, Dropout(0.1) in the encoder) under scPerceiver's count model, likelihood and
training: chapter 08's third model, the last row of its ablation, ``scvit train --model
perceiver --mlp scvi``."""


@dataclass(frozen=True)
class PerceiverConfig:
    """Everything that defines an scPerceiver network; one default for every dataset.

    Attributes
    ----------
    n_genes
        Genes read and modelled.
    dim
        Width ``d`` of every token.
    n_tokens
        Latent tokens ``m`` (the Perceiver's inducing points), in the encoder and decoder.
    heads
        Heads of the self-attention among latent tokens (``dim`` must be divisible by it); the
        attentions between genes and tokens have one head each.
    encoder_blocks, decoder_blocks
        Self-attention blocks among the latent tokens before the bottleneck and after it.
    mlp_ratio
        Hidden width of each block's MLP, as a multiple of ``dim``.
    n_latent
        Size of the latent ``z`` (64, as the report's models).
    variational
        ``q(z | x)`` is a diagonal Gaussian (posterior mean in evaluation); False: ``z`` is a
        deterministic function of the cell.
    tokens
        ``"genes"``: one token per gene. ``"conv"``: scViT's tokens, the channels of
        ``Conv1d(1, conv_channels, patch_size, stride=patch_size)``, each spanning every
        window of genes, projected to ``dim`` (ablation).
    conv_channels, patch_size
        The conv tokens' channels and window (scViT: 40 and 40).
    attention
        Data-dependent attention weights; False: learned constant mixing weights (ablation).
    norm
        ``"layer"``: LayerNorm; ``"batch"``: BatchNorm over tokens, as scViT (ablation).
    dropout
        Dropout after every attention and MLP (0: training and evaluation agree).
    input_masking
        While training, each gene's input value is hidden with this probability (its token
        becomes ``F_g + M``, a learned mask token; conv tokens read it as 0) and the target
        counts stay whole: a denoising objective against memorising the training cells. Off
        by default: it helps few deep cells and costs much on shallow ones (module docstring).
    likelihood
        ``"nb"``, ``"corrected"`` (zero-inflated NB with NB mean ``mean``) or ``"legacy"``
        (scViT's reference parametrisation); see :mod:`scvit_core.likelihood`.
    library_scaling
        ``mean = softmax over genes x library size``; False: ``clamp(softplus(.))``.
    dispersion
        ``"gene-cell"``: the readout also decodes a per-cell offset of each gene's ``theta``
        (before the softplus); ``"gene"``: one ``theta`` per gene, scVI's default (ablation).
    tie_genes
        The decoder's gene queries are the encoder's identity embeddings ``F_g`` and its
        readout vectors linear maps of them: one table per gene shared by both sides (off: on
        zeisel2015, seed 0, it raised the test NLL from 6,023 to 6,066).
    fused_attention
        ``scaled_dot_product_attention`` in the self-attention blocks (the same numbers as the
        explicit path that interpret uses). Off by default: among 16 tokens the explicit
        product and softmax are faster on a CPU (the fused kernel's backward pass was ~4 ms
        of a 29 ms step on pbmc68k).
    init_std
        Standard deviation of the initial gene embeddings, gene queries and latent queries
        (``nn.Embedding``'s 1): large enough that attention starts away from uniform; with
        0.02 (ViT's) every softmax over 4,000 genes starts flat and the test NLL after the
        same budget is about 1% worse.
    encoder, decoder
        ``"attention"``: the Perceiver encoder (gene tokens, latent tokens, blocks) and decoder
        (blocks, per-gene readout). ``"mlp"``: scVI's network shape instead, one hidden layer
        of ``mlp_hidden`` units (``Linear -> LayerNorm -> ReLU -> Linear``) from the input to
        ``q(z | x)`` or from ``z`` to every gene's outputs, with the same count model,
        likelihood and training (ablation: what the attention adds to the count model).
        ``norm`` picks the MLP's norm too, and ``dropout`` drops after an MLP encoder's hidden
        layer (``norm="batch", dropout=0.1``: scVI's encoder and decoder exactly); the other
        switches of the attention parts (``tokens``, ``attention``, ...) apply to the side
        that keeps them.
    mlp_hidden
        Hidden units of an ``"mlp"`` encoder or decoder (scVI's 128).
    """

    n_genes: int
    dim: int = 64
    n_tokens: int = 16
    heads: int = 4
    encoder_blocks: int = 2
    decoder_blocks: int = 2
    mlp_ratio: int = 2
    n_latent: int = 64
    variational: bool = True
    tokens: str = "genes"
    conv_channels: int = 40
    patch_size: int = 40
    attention: bool = True
    norm: str = "layer"
    dropout: float = 0.0
    input_masking: float = 0.0
    likelihood: str = "nb"
    library_scaling: bool = True
    dispersion: str = "gene-cell"
    tie_genes: bool = False
    fused_attention: bool = False
    init_std: float = 1.0
    encoder: str = "attention"
    decoder: str = "attention"
    mlp_hidden: int = 128
    architecture: str = dataclasses.field(default="perceiver", init=False)

    def __post_init__(self) -> None:
        if self.n_genes < 1:
            raise ValueError(f"n_genes must be positive, got {self.n_genes}")
        for name, value, allowed in (
            ("likelihood", self.likelihood, LIKELIHOODS),
            ("tokens", self.tokens, TOKENS),
            ("norm", self.norm, NORMS),
            ("dispersion", self.dispersion, DISPERSIONS),
            ("encoder", self.encoder, NETWORKS),
            ("decoder", self.decoder, NETWORKS),
        ):
            if value not in allowed:
                raise ValueError(f"{name} must be one of {allowed}, got {value!r}")
        if self.dim % self.heads:
            raise ValueError(f"dim {self.dim} is not divisible by {self.heads} heads")
        if min(self.dim, self.n_tokens, self.heads, self.n_latent) < 1:
            raise ValueError("dim, n_tokens, heads and n_latent must be positive")
        if not 0 <= self.dropout < 1:
            raise ValueError(f"dropout must be in [0, 1), got {self.dropout}")
        if not 0 <= self.input_masking < 1:
            raise ValueError(f"input_masking must be in [0, 1), got {self.input_masking}")
        if self.mlp_hidden < 1:
            raise ValueError(f"mlp_hidden must be positive, got {self.mlp_hidden}")
        if self.encoder == "mlp" and self.tokens != "genes":
            raise ValueError(
                f'tokens={self.tokens!r} needs the attention encoder; an encoder="mlp" reads '
                'the genes directly (set tokens="genes")'
            )
        if self.tie_genes and "mlp" in (self.encoder, self.decoder):
            raise ValueError(
                "tie_genes shares the gene tables of the attention encoder and readout; "
                'it needs encoder="attention" and decoder="attention"'
            )

    @property
    def n_windows(self) -> int:
        """Windows of the conv tokens (``tokens="conv"``)."""
        return math.ceil(self.n_genes / self.patch_size)

    @classmethod
    def for_genes(cls, n_genes: int, **overrides: Any) -> PerceiverConfig:
        """The default configuration for ``n_genes`` genes (the same for every dataset)."""
        return cls(n_genes=n_genes, **overrides)

    def to_dict(self) -> dict[str, Any]:
        """Plain, JSON-serialisable dictionary, with ``architecture = "perceiver"``."""
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> PerceiverConfig:
        """Inverse of :meth:`to_dict`; unknown keys are an error."""
        data = dict(data)
        if data.pop("architecture", "perceiver") != "perceiver":
            raise ValueError("not a PerceiverConfig")
        return cls(**data)

    def replace(self, **changes: Any) -> PerceiverConfig:
        """A copy with some fields changed (re-validated)."""
        return dataclasses.replace(self, **changes)


# building blocks ---------------------------------------------------------------------------


class Mixing(nn.Module):
    """The weights of an attention: ``softmax(scores)``, or learned constants without attention.

    With ``attention=False`` the scores are ignored and the weights are ``softmax(logits)`` of
    a parameter of the scores' shape (without the batch), the same for every cell: the tokens
    are still mixed, but nothing routes by content. They are computed once, ``(1, ...)``, and
    broadcast to the batch (a softmax per cell of the same logits made the step ~1.6x as long).
    """

    def __init__(self, shape: tuple[int, ...] | None, dim: int = -1) -> None:
        super().__init__()
        self.softmax = nn.Softmax(dim=dim)
        self.logits = None if shape is None else nn.Parameter(torch.zeros(1, *shape))

    def forward(self, scores: torch.Tensor) -> torch.Tensor:
        if self.logits is None:
            return self.softmax(scores)
        # one cell's weights, shared by the batch: ``(1, ...)`` broadcasts against the values
        return self.softmax(self.logits.to(scores.dtype)).expand_as(scores)


def _norm(config: PerceiverConfig, tokens: int) -> nn.Module:
    if config.norm == "batch":
        return nn.BatchNorm1d(tokens)  # over the token axis of (B, tokens, dim), as scViT
    return nn.LayerNorm(config.dim)


class Block(nn.Module):
    """Pre-norm transformer block over ``m`` tokens: ``x + attn(norm x)``, ``x + mlp(norm x)``."""

    def __init__(self, config: PerceiverConfig, name: str) -> None:
        super().__init__()
        d, m = config.dim, config.n_tokens
        self.name = name
        self.norm_attn = _norm(config, m)
        if config.attention:
            self.attention = Attention(d, config.heads, dropout=0.0, fused=config.fused_attention)
        else:
            self.attention = MixingAttention(d, config.heads, (config.heads, m, m))
        self.skip = nn.Identity()  # the residual branch, so attributions can split the paths
        self.drop_attn = Dropout(config.dropout)
        self.residual = nn.Identity()  # skip + attention, before the MLP
        self.norm_mlp = _norm(config, m)
        self.mlp = nn.Sequential(
            nn.Linear(d, config.mlp_ratio * d), nn.GELU(), nn.Linear(config.mlp_ratio * d, d)
        )
        self.drop_mlp = Dropout(config.dropout)

    def forward(self, x: torch.Tensor, record: dict | None = None) -> torch.Tensor:
        update = self.attention(self.norm_attn(x))  # (B, m, d)
        _save(record, f"{self.name}.attention", update)
        x = self.residual(self.skip(x) + self.drop_attn(update))
        x = x + self.drop_mlp(self.mlp(self.norm_mlp(x)))
        _save(record, self.name, x)
        return x


class MixingAttention(nn.Module):
    """Self-attention's ablation: values mixed by learned constant weights (no queries/keys)."""

    def __init__(self, dim: int, heads: int, shape: tuple[int, int, int]) -> None:
        super().__init__()
        self.heads, self.head_dim = heads, dim // heads
        self.value = nn.Linear(dim, dim)
        self.mixing = Mixing(shape)
        self.av = MatMul()
        self.out_proj = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, t, d = x.shape
        v = self.value(x).view(b, t, self.heads, self.head_dim).transpose(1, 2)  # (B, h, T, dh)
        weights = self.mixing(v.new_zeros(b, self.heads, t, t))  # (B, h, T, T)
        out = self.av(weights, v).transpose(1, 2).reshape(b, t, d)
        return self.out_proj(out)


class GeneEncoder(nn.Module):
    """``m`` latent queries cross-attend to the gene tokens ``t_cg = v_cg E_g + F_g``.

    One head. With ``W_k, W_v`` the key and value maps, ``k_cg = v_cg (E W_k)_g + (F W_k)_g``
    (and likewise for values), so for query ``i``::

        score_cig = v_cg * a_ig + b_ig        a = q (E W_k)^T / sqrt(d), b = q (F W_k)^T / sqrt(d)
        out_ci    = sum_g w_cig v_cg (E W_v)_g + sum_g w_cig (F W_v)_g,   w = softmax_g(score)

    ``a``, ``b`` and the two value tables depend on the parameters only: computed once per
    batch, ``(m, G)`` and ``(G, d)``. This is exactly attention over ``G`` tokens of width ``d``
    at the cost of two ``(m x G) @ (G x d)`` products per cell; keys and values are never built
    per cell.
    """

    def __init__(self, config: PerceiverConfig) -> None:
        super().__init__()
        g, d, m = config.n_genes, config.dim, config.n_tokens
        self.expression = nn.Parameter(torch.randn(g, d) * config.init_std)  # E
        self.identity = nn.Parameter(torch.randn(g, d) * config.init_std)  # F
        self.queries = nn.Parameter(torch.randn(m, d) * config.init_std)
        self.query_norm = nn.LayerNorm(d)
        self.q = nn.Linear(d, d)
        self.k = nn.Linear(d, d)
        self.v = nn.Linear(d, d)
        self.mixing = Mixing(None if config.attention else (m, g), dim=-1)
        self.weigh_values = Mul()  # w_cig * v_cg: both factors depend on the cell
        self.out_proj = nn.Linear(d, d)
        # M: the token of a gene hidden by input masking is F_g + M, not a zero count
        self.mask_token = nn.Parameter(torch.zeros(d)) if config.input_masking > 0 else None

    def forward(self, v: torch.Tensor, hidden: torch.Tensor | None = None) -> torch.Tensor:
        """Latent tokens ``(B, m, d)``; ``hidden`` (training only): genes read as ``F_g + M``."""
        scale = 1.0 / math.sqrt(self.q.out_features)
        q = self.q(self.query_norm(self.queries))  # (m, d)
        a = (q @ F.linear(self.expression, self.k.weight).T * scale).unsqueeze(0)  # (1, m, G)
        c = (q @ self.k(self.identity).T * scale).unsqueeze(0)
        # in the precision of the scores (bfloat16 under autocast): a float32 cell value would
        # promote every (B, m, G) tensor after it and cast it back for the products (~7% of a step)
        value = v.unsqueeze(1).to(a.dtype)  # (B, 1, G)
        if hidden is not None:  # a hidden gene's value is 0; its key and value gain W_k M, W_v M
            hidden = hidden.unsqueeze(1).to(a.dtype)  # (B, 1, G)
            value = value * (1 - hidden)
        # products with parameter-only tensors are linear in the cell: plain operations
        scores = value * a + c
        if hidden is not None:
            s = (q @ F.linear(self.mask_token, self.k.weight) * scale).view(1, -1, 1)  # (1, m, 1)
            scores = scores + hidden * s
        w = self.mixing(scores)  # (B, m, G)
        v_e = F.linear(self.expression, self.v.weight)  # (G, d)
        out = self.weigh_values(w, value) @ v_e + w @ self.v(self.identity)  # (B, m, d)
        if hidden is not None:
            mask_value = F.linear(self.mask_token, self.v.weight)  # (d,)
            out = out + (w * hidden).sum(-1, keepdim=True) * mask_value
        return self.queries + self.out_proj(out)


class ConvEncoder(nn.Module):
    """Ablation: scViT's tokens (conv channels spanning every gene window) read by the queries.

    ``Conv1d(1, C, k, stride=k) -> BatchNorm -> SELU`` gives ``C`` tokens of ``n_windows``
    values (as scViT's stem); a linear map takes each to ``dim``; the ``m`` latent queries
    cross-attend to these ``C`` tokens.
    """

    def __init__(self, config: PerceiverConfig) -> None:
        super().__init__()
        d, c = config.dim, config.conv_channels
        self.n_genes_padded = config.n_windows * config.patch_size
        self.conv = MatmulConv1d(1, c, config.patch_size, stride=config.patch_size, bias=False)
        self.conv_norm = nn.BatchNorm1d(c)
        self.act = nn.SELU()
        self.embed = nn.Linear(config.n_windows, d)
        self.queries = nn.Parameter(torch.randn(config.n_tokens, d) * 0.02)
        self.cross = CrossAttention(
            d, config.heads, (config.heads, config.n_tokens, c), attention=config.attention
        )

    def forward(self, v: torch.Tensor, hidden: torch.Tensor | None = None) -> torch.Tensor:
        if hidden is not None:  # no token owns a gene: a hidden gene reads as a zero
            v = v * ~hidden
        v = F.pad(v, (0, self.n_genes_padded - v.shape[1]))  # (B, G_pad)
        tokens = self.embed(self.act(self.conv_norm(self.conv(v.unsqueeze(1)))))  # (B, C, d)
        queries = self.queries.expand(v.shape[0], -1, -1)  # (B, m, d)
        return self.queries + self.cross(queries, tokens)


class CrossAttention(nn.Module):
    """Multi-head attention from ``queries (B, m, d)`` to ``tokens (B, n, d)``, explicit path."""

    def __init__(self, dim: int, heads: int, shape: tuple[int, int, int], *, attention: bool):
        super().__init__()
        self.heads, self.head_dim = heads, dim // heads
        self.norm_q, self.norm_kv = nn.LayerNorm(dim), nn.LayerNorm(dim)
        self.q, self.k, self.v = nn.Linear(dim, dim), nn.Linear(dim, dim), nn.Linear(dim, dim)
        self.qk = MatMul()
        self.mixing = Mixing(None if attention else shape)
        self.av = MatMul()
        self.out_proj = nn.Linear(dim, dim)

    def _heads(self, t: torch.Tensor) -> torch.Tensor:
        b, n, _ = t.shape
        return t.view(b, n, self.heads, self.head_dim).transpose(1, 2)  # (B, h, n, dh)

    def forward(self, queries: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
        q = self._heads(self.q(self.norm_q(queries))) / math.sqrt(self.head_dim)
        k, v = self._heads(self.k(self.norm_kv(tokens))), self._heads(self.v(self.norm_kv(tokens)))
        w = self.mixing(self.qk(q, k.transpose(-2, -1)))  # (B, h, m, n)
        out = self.av(w, v).transpose(1, 2).flatten(2)  # (B, m, d)
        return self.out_proj(out)


class GeneReadout(nn.Module):
    """Each gene's learned query attends to the ``m`` decoder tokens; its own weights read out.

    One head: ``w_cjg = softmax_j(q_g . k_cj / sqrt(d))`` and the gene's raw mean
    ``sum_j w_cjg (u_g . v_cj) + bias_g``, with ``u_g`` the gene's readout vector. The readout
    is applied to the ``m`` values before mixing (``(B, m, G)``), so the per-gene outputs
    ``(B, G, d)`` are never built. With zero inflation a second readout gives the gate logits.
    """

    def __init__(
        self, config: PerceiverConfig, n_outputs: int, genes: nn.Parameter | None = None
    ) -> None:
        super().__init__()
        g, d, m = config.n_genes, config.dim, config.n_tokens
        self.n_outputs = n_outputs
        # tied: the gene's query is the encoder's identity embedding F_g and its readout
        # vectors are linear maps of it (u_g = W F_g), so no gene table is the decoder's own
        self.gene_queries = (
            genes if genes is not None else nn.Parameter(torch.randn(g, d) * config.init_std)
        )
        self.norm = nn.LayerNorm(d)
        self.q = nn.Linear(d, d)
        self.k = nn.Linear(d, d)
        self.v = nn.Linear(d, d)
        self.mixing = Mixing(None if config.attention else (m, g), dim=1)  # over tokens
        if genes is None:
            self.readout = nn.Parameter(torch.randn(n_outputs, g, d) / math.sqrt(d))
        else:
            scale = 1.0 / (math.sqrt(d) * config.init_std)
            self.readout_maps = nn.Parameter(torch.randn(n_outputs, d, d) * scale / math.sqrt(d))
        self.bias = nn.Parameter(torch.zeros(n_outputs, g))
        self.weigh = nn.ModuleList(Mul() for _ in range(n_outputs))

    def readout_vectors(self, i: int) -> torch.Tensor:
        """``u_g`` of output ``i`` for every gene, ``(G, d)``."""
        if hasattr(self, "readout_maps"):
            return self.gene_queries @ self.readout_maps[i]
        return self.readout[i]

    def forward(self, tokens: torch.Tensor) -> list[torch.Tensor]:
        x = self.norm(tokens)  # (B, m, d)
        q = self.q(self.gene_queries) / math.sqrt(self.q.out_features)  # (G, d)
        # products with parameter-only tensors are linear in the cell: plain operations
        w = self.mixing(self.k(x) @ q.T)  # (B, m, G), normalised over the m tokens
        v = self.v(x)
        outputs = []
        for i in range(self.n_outputs):
            u = v @ self.readout_vectors(i).T  # (B, m, G): token j's proposal for gene g
            outputs.append(self.weigh[i](w, u).sum(1) + self.bias[i])  # (B, G)
        return outputs


class MLP(nn.Sequential):
    """scVI's network shape: ``Linear -> norm -> ReLU [-> Dropout] -> Linear`` (ablation).

    ``norm="layer"`` (the default): LayerNorm, and no dropout keeps the network the same in
    training and evaluation, as the attention model. ``norm="batch"`` with ``dropout=0.1``
    is scVI's encoder exactly (BatchNorm with scvi-tools' momentum 0.01 and eps 0.001; its
    decoder: ``dropout=0``).
    """

    def __init__(
        self, n_in: int, n_hidden: int, n_out: int, *, norm: str = "layer", dropout: float = 0.0
    ) -> None:
        if norm == "batch":
            normalise = nn.BatchNorm1d(n_hidden, momentum=0.01, eps=0.001)
        else:
            normalise = nn.LayerNorm(n_hidden)
        drop = [Dropout(dropout)] if dropout > 0 else []  # none: the state dict's names stay
        super().__init__(
            nn.Linear(n_in, n_hidden), normalise, nn.ReLU(), *drop, nn.Linear(n_hidden, n_out)
        )


class MLPReadout(nn.Module):
    """The readout of an MLP decoder: ``z -> MLP -> (B, n_outputs, G)`` plus each gene's bias.

    The bias table has :class:`GeneReadout`'s shape and role (``init_gene_parameters`` starts
    it at the null model's gene shares), so the count model is the same on both decoders.
    """

    def __init__(self, config: PerceiverConfig, n_outputs: int) -> None:
        super().__init__()
        self.n_outputs = n_outputs
        # as scVI's decoder: its norm, no dropout
        self.mlp = MLP(
            config.n_latent, config.mlp_hidden, n_outputs * config.n_genes, norm=config.norm
        )
        self.bias = nn.Parameter(torch.zeros(n_outputs, config.n_genes))

    def forward(self, z: torch.Tensor) -> list[torch.Tensor]:
        out = self.mlp(z).view(z.shape[0], self.n_outputs, -1) + self.bias  # (B, n_outputs, G)
        return list(out.unbind(1))


# the model ---------------------------------------------------------------------------------


class ScPerceiver(nn.Module):
    """The scPerceiver autoencoder; ``forward(x, library=)`` gives the latent and likelihood.

    Parameters
    ----------
    config
        Architecture, ablation switches and likelihood; see :class:`PerceiverConfig`.

    Notes
    -----
    Inputs are ``(cells, n_genes)`` in the model's gene order (``ScPerceiverModel`` passes
    ``log1p(counts)`` by default); ``library`` is each cell's total count, which scales the
    decoded mean.
    """

    def __init__(self, config: PerceiverConfig) -> None:
        super().__init__()
        self.config = config
        d, m = config.dim, config.n_tokens
        n_posterior = config.n_latent * (2 if config.variational else 1)
        if config.encoder == "mlp":  # ablation: scVI's encoder shape
            self.mlp_encoder = MLP(
                config.n_genes,
                config.mlp_hidden,
                n_posterior,
                norm=config.norm,
                dropout=config.dropout,
            )
            self.encoder = nn.ModuleList()
        else:
            self.tokenizer = (
                GeneEncoder(config) if config.tokens == "genes" else ConvEncoder(config)
            )
            self.encoder = nn.ModuleList(
                Block(config, f"encoder.{i}") for i in range(config.encoder_blocks)
            )
            self.encoder_norm = nn.LayerNorm(m * d)
            self.to_latent = nn.Linear(m * d, n_posterior)
        zero_inflated = config.likelihood != "nb"
        cell_theta = config.dispersion == "gene-cell"
        n_outputs = 1 + zero_inflated + cell_theta
        if config.decoder == "mlp":  # ablation: scVI's decoder shape
            self.decoder = nn.ModuleList()
            self.readout = MLPReadout(config, n_outputs)
        else:
            self.from_latent = nn.Linear(config.n_latent, m * d)
            self.decoder = nn.ModuleList(
                Block(config, f"decoder.{i}") for i in range(config.decoder_blocks)
            )
            tied = config.tie_genes and config.tokens == "genes"
            genes = self.tokenizer.identity if tied else None
            self.readout = GeneReadout(config, n_outputs, genes)
        self.log_theta = nn.Parameter(torch.zeros(config.n_genes))  # gene-wise, as scVI's px_r
        self.activations = OutputActivations(
            config.likelihood, library_scaling=config.library_scaling, allow_legacy_scaling=True
        )

    @torch.no_grad()
    def init_gene_parameters(
        self, gene_share: torch.Tensor, theta: torch.Tensor, library: float
    ) -> None:
        """Start the decoder at the library-scaled null model of the training cells.

        The mean logits' gene biases become ``log`` of each gene's share of the training
        counts (so ``softmax x library`` starts as the null's mean; without library scaling,
        ``softplus^-1`` of the share times the median ``library``) and ``theta`` its
        maximum-likelihood inverse dispersion. Without this the biases must travel ~10 log
        units at Adam's ~lr per step, which takes most of a short training budget.

        Parameters
        ----------
        gene_share, theta
            ``(n_genes,)`` from :func:`scvit_core.baselines.fit_null_nb` with
            ``library_scaled=True`` (``gene_param`` and ``theta``).
        library
            The training cells' median total count.
        """
        share = torch.as_tensor(gene_share, dtype=torch.float32).clamp_min(1e-8)
        theta = torch.as_tensor(theta, dtype=torch.float32).clamp(1e-3, 1e3)
        if self.config.library_scaling:
            self.readout.bias[0] = share.log()
        else:
            self.readout.bias[0] = _softplus_inverse((share * library).clamp_min(1e-4))
        # theta = softplus(raw); the legacy head reads softplus(raw) as the dispersion 1 / theta
        target = 1.0 / theta if self.config.likelihood == "legacy" else theta
        self.log_theta.copy_(_softplus_inverse(target))

    # the algorithm -------------------------------------------------------------------------

    def posterior(
        self, x: torch.Tensor, *, record: dict | None = None
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """``(mu, logvar)`` of ``q(z | x)`` (``logvar`` None for a deterministic model)."""
        if x.ndim != 2 or x.shape[1] != self.config.n_genes:
            raise ValueError(
                f"expected input of shape (cells, {self.config.n_genes}), got {tuple(x.shape)}"
            )
        hidden = None
        if self.training and self.config.input_masking > 0:
            hidden = torch.rand_like(x) < self.config.input_masking  # (B, G)
        if self.config.encoder == "mlp":
            h = self.mlp_encoder(x if hidden is None else x.masked_fill(hidden, 0.0))
        else:
            tokens = self.tokenizer(x, hidden)  # (B, m, d)
            _save(record, "tokens", tokens)
            for block in self.encoder:
                tokens = block(tokens, record)
            h = self.to_latent(self.encoder_norm(tokens.flatten(1)))  # (B, n_latent [x 2])
        if not self.config.variational:
            return h, None
        mu, logvar = h.chunk(2, dim=-1)
        return mu, logvar.clamp(-12.0, 8.0)

    def encode(self, x: torch.Tensor, *, record: dict | None = None) -> torch.Tensor:
        """Latent representation ``(B, n_latent)``: the posterior mean."""
        mu, _ = self.posterior(x, record=record)
        return mu

    def decode(
        self,
        z: torch.Tensor,
        *,
        library: torch.Tensor | None = None,
        record: dict | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
        """Likelihood parameters ``(mean, theta, gate_logits)``, each ``(B, n_genes)``."""
        b = z.shape[0]
        if self.config.decoder == "mlp":
            raw = self.readout(z)
        else:
            tokens = self.from_latent(z).view(b, self.config.n_tokens, self.config.dim)
            _save(record, "decoder.tokens", tokens)
            for block in self.decoder:
                tokens = block(tokens, record)
            raw = self.readout(tokens)  # [(B, G)]: mean logits [, gate logits] [, theta offsets]
        gate = raw[1] if self.config.likelihood != "nb" else raw[0]  # ignored by the NB
        theta = self.log_theta.expand(b, -1)
        if self.config.dispersion == "gene-cell":
            theta = theta + raw[-1]
        return self.activations(raw[0], theta, gate, library)

    def forward(
        self, x: torch.Tensor, *, library: torch.Tensor | None = None, sample: bool | None = None
    ) -> AutoencoderOutput:
        """Encode, draw ``z`` (training mode, or ``sample=True``), decode; with the KL term.

        ``sample`` defaults to the module's training mode: a sample of ``q(z | x)`` while
        training, the posterior mean in evaluation (``sample=True`` gives scvi-tools'
        one-sample reconstruction error).
        """
        mu, logvar = self.posterior(x)
        sample = self.training if sample is None else sample
        if logvar is None:
            z, kl = mu, None
        else:
            z = mu + torch.randn_like(mu) * torch.exp(0.5 * logvar) if sample else mu
            kl = 0.5 * (mu.pow(2) + logvar.exp() - 1.0 - logvar).sum(-1)  # (B,) KL to N(0, I)
        return AutoencoderOutput(z, *self.decode(z, library=library), kl=kl)

    def loss(self, output: AutoencoderOutput, counts: torch.Tensor) -> torch.Tensor:
        """Reconstruction NLL of the raw counts, summed over genes, averaged over cells."""
        return nll(output, counts, likelihood=self.config.likelihood).mean()

    def forward_intermediates(
        self, x: torch.Tensor, *, library: torch.Tensor | None = None
    ) -> dict[str, torch.Tensor]:
        """Every layer's output, keyed by stable names, in execution order.

        Keys: ``tokens`` (the latent tokens after cross-attention to the genes), per encoder
        block ``encoder.{i}.attention`` (the update before the residual) and ``encoder.{i}``;
        ``latent`` (the posterior mean); ``decoder.tokens``; ``decoder.{i}.attention`` and
        ``decoder.{i}``; ``mean``, ``theta``, ``gate_logits`` (an ``"mlp"`` side has no tokens
        and no blocks).
        """
        record: dict[str, torch.Tensor] = {}
        z = self.encode(x, record=record)
        record["latent"] = z
        mean, theta, gate = self.decode(z, library=library, record=record)
        record.update(mean=mean, theta=theta)
        if gate is not None:
            record["gate_logits"] = gate
        return record

    # the interface of interpret (scvit_core.model.Interpretable) ---------------------------

    def attention_sites(self) -> list:
        """Every attention, in execution order: :class:`~scvit_core.model.AttentionSite` s.

        ``encoder.cross`` (the latent queries reading the gene tokens, or the conv tokens),
        ``encoder.{i}`` and ``decoder.{i}`` (residual self-attention among the ``m`` tokens,
        ``skip(x) + attention(norm x)``), ``decoder.readout`` (each gene's query reading the
        ``m`` tokens; its weights are normalised over the tokens, ``dim=1`` of ``(B, m, G)``).
        With ``attention=False`` the sites are the learned constant mixing weights; an
        ``"mlp"`` encoder or decoder has none.
        """
        from scvit_core.model import AttentionSite

        def softmax(module: nn.Module) -> nn.Module:  # Attention, or anything with a Mixing
            return module.softmax if isinstance(module, Attention) else module.mixing.softmax

        sites = []
        if self.config.encoder == "attention":
            tokenizer = self.tokenizer
            cross = tokenizer.cross if isinstance(tokenizer, ConvEncoder) else tokenizer
            sites.append(AttentionSite("encoder.cross", softmax(cross), self_attention=False))
        for block in [*self.encoder, *self.decoder]:
            sites.append(
                AttentionSite(block.name, softmax(block.attention), block.attention, block.skip)
            )
        if self.config.decoder == "attention":
            readout = softmax(self.readout)
            sites.append(AttentionSite("decoder.readout", readout, self_attention=False))
        return sites

    def token_layers(self) -> list[str]:
        """``tokens``, ``encoder.{i}``, ``decoder.tokens``, ``decoder.{i}``: ``(B, m, d)`` each
        (those of the attention sides only)."""
        encoder = ["tokens", *(b.name for b in self.encoder)]
        decoder = ["decoder.tokens", *(b.name for b in self.decoder)]
        return [
            *(encoder if self.config.encoder == "attention" else []),
            *(decoder if self.config.decoder == "attention" else []),
        ]

    def layer_paths(self) -> dict[str, str]:
        """Layer names -> module paths, in execution order (for :mod:`interpret.safe`).

        ``tokens`` (the tokenizer's output); per block ``{block}.skip``, ``{block}.attention``
        (the update), ``{block}.residual`` (only if the block has a ``residual`` module on the
        sum ``skip + attention``) and ``{block}``; ``encoder_norm``; ``latent`` (deterministic
        model) or ``posterior`` (``[mu, logvar]``, the ``to_latent`` layer, of a variational
        one: ``latent`` is a slice of it, no module's output); ``decoder.tokens`` (flat,
        ``(B, m d)``). The readout returns a list and the activations a tuple: no layer.
        An ``"mlp"`` encoder has ``encoder.hidden`` (after its ReLU) then ``posterior`` or
        ``latent`` (its output); an ``"mlp"`` decoder has ``decoder.hidden``.
        """
        paths: dict[str, str] = {}

        def add_blocks(blocks: nn.ModuleList, prefix: str) -> None:
            for i, block in enumerate(blocks):
                paths[f"{block.name}.skip"] = f"{prefix}.{i}.skip"
                paths[f"{block.name}.attention"] = f"{prefix}.{i}.attention"
                if isinstance(getattr(block, "residual", None), nn.Module):
                    paths[f"{block.name}.residual"] = f"{prefix}.{i}.residual"
                paths[block.name] = f"{prefix}.{i}"

        latent = "posterior" if self.config.variational else "latent"
        if self.config.encoder == "mlp":
            paths |= {"encoder.hidden": "mlp_encoder.2", latent: "mlp_encoder"}
        else:
            paths["tokens"] = "tokenizer"
            add_blocks(self.encoder, "encoder")
            paths |= {"encoder_norm": "encoder_norm", latent: "to_latent"}
        if self.config.decoder == "mlp":
            paths["decoder.hidden"] = "readout.mlp.2"
        else:
            paths["decoder.tokens"] = "from_latent"
            add_blocks(self.decoder, "decoder")
        return paths


def _softplus_inverse(y: torch.Tensor) -> torch.Tensor:
    return y + torch.log(-torch.expm1(-y))


def _save(record: dict | None, name: str, x: torch.Tensor) -> None:
    if record is not None:
        record[name] = x
