"""scViT: a vision-transformer autoencoder for single-cell counts (DESIGN.md section 2).

The algorithm, as :class:`ScViT` runs it::

    pad genes -> conv stem (C tokens = conv channels, each a row of n_windows values)
      -> encoder stages: BN -> patch-wise linear -> Dropout -> BN -> x + MHA(x) -> Dropout -> SELU
      -> bottleneck: (Linear -> Dropout -> SELU -> LayerNorm) x 3 -> latent z (64)
      -> dense decoder: (Linear -> Dropout -> SELU -> BatchNorm) x 4
      -> stages in reverse: x + MHA(x) -> Dropout -> patch-wise linear -> SELU -> BN
      -> output patch-wise linear -> (mean, dispersion, gate) -> likelihood activations

Choices where the reference code and this implementation could differ, all numerically
equivalent unless noted:

* Patch-wise weights are stored ``(tokens, in, out)`` (the reference stores
  ``(tokens, out, in)`` for ``einsum('nom,bnm->bno')``) so the product is one ``bmm`` over
  tokens; load reference weights with ``weight.transpose(1, 2)``. ``kaiming_uniform_`` on a 3-d
  tensor uses ``fan_in = in * out`` in both layouts, so the initial distribution is the same.
* The stem conv has no bias (torchvision's ``bias=None`` default with a norm layer), its
  padding is torchvision's default ``(k - 1) // 2`` unless ``stem_padding`` says otherwise,
  and stem layers keep PyTorch's default init, all as in the reference. SELU is not in-place
  (the reference's is), which changes nothing numerically but keeps autograd hooks valid.
* Attention keeps ``nn.MultiheadAttention``'s parameter names and init; only the fused path
  calls ``scaled_dot_product_attention``.
"""

from __future__ import annotations

import itertools
import math
from dataclasses import dataclass
from typing import Any, Protocol, runtime_checkable

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.modules.linear import NonDynamicallyQuantizableLinear
from torchvision.ops.misc import ConvNormActivation

from scvit_core.config import ScViTConfig
from scvit_core.likelihood import OutputActivations, nll


@dataclass
class AutoencoderOutput:
    """What the forward pass of every autoencoder of the project returns (scViT, scPerceiver).

    Attributes
    ----------
    z
        Latent representation, ``(cells, n_latent)``.
    mean
        Decoded mean ``m``, ``(cells, n_genes)``.
    theta
        Inverse dispersion ``r`` (pyro's ``total_count``); ``1 / dispersion`` for ``legacy``.
    gate_logits
        Zero-inflation logits, or ``None`` for the ``nb`` likelihood.
    kl
        Per-cell ``KL(q(z | x) || N(0, I))`` of a variational model, ``(cells,)``; None for a
        deterministic one (scViT).
    """

    z: torch.Tensor
    mean: torch.Tensor
    theta: torch.Tensor
    gate_logits: torch.Tensor | None
    kl: torch.Tensor | None = None


ScViTOutput = AutoencoderOutput
"""The name of :class:`AutoencoderOutput` from before there were two models."""


@dataclass(frozen=True, eq=False)
class AttentionSite:
    """One place where a network mixes tokens with attention weights (for :mod:`interpret`).

    Attributes
    ----------
    name
        Stable layer name (scViT: ``encoder.{i}`` / ``decoder.{i}``); sites whose name starts
        with ``decoder`` run after the latent.
    softmax
        The ``nn.Softmax`` whose output is the attention weights on the explicit path
        (``fused=False``), normalised over its own ``dim`` (:attr:`dim`): hooks on it read or
        replace the weights.
    update
        The module whose output is the attention update added to the residual, or None where
        the weights' output is not summed with a residual (cross-attention between genes and
        tokens).
    skip
        The identity module on the residual branch (its output is the other term of the sum),
        or None.
    self_attention
        Queries and keys are the same tokens (square weights), so "each token attends to
        itself" (identity weights, the self weight) is defined.
    """

    name: str
    softmax: nn.Softmax
    update: nn.Module | None = None
    skip: nn.Module | None = None
    self_attention: bool = True

    @property
    def dim(self) -> int:
        """The dimension the weights are normalised over (-1 for the usual ``(.., T_q, T_k)``)."""
        return -1 if self.softmax.dim is None else self.softmax.dim

    @property
    def residual(self) -> bool:
        """Whether the site's update is summed with a skip branch (update and skip given)."""
        return self.update is not None and self.skip is not None


@runtime_checkable
class Interpretable(Protocol):
    """What :mod:`interpret` needs of a network (implemented by scViT and scPerceiver).

    ``forward(x, library=)`` returns an :class:`AutoencoderOutput`; ``encode(x)`` the latent
    ``(cells, n_latent)``; ``decode(z, library=)`` ``(mean, theta, gate_logits)``;
    ``forward_intermediates(x, library=)`` every layer's output by stable name, in execution
    order (with ``latent``); ``config`` has ``likelihood``, ``n_latent`` and ``attention``.
    Every :class:`Attention` inside gives the explicit path with ``fused = False``.
    """

    config: Any

    def encode(self, x: torch.Tensor) -> torch.Tensor: ...

    def decode(
        self, z: torch.Tensor, *, library: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]: ...

    def forward_intermediates(
        self, x: torch.Tensor, *, library: torch.Tensor | None = None
    ) -> dict[str, torch.Tensor]: ...

    def attention_sites(self) -> list[AttentionSite]:
        """Every attention, in execution order."""
        ...

    def token_layers(self) -> list[str]:
        """Names (keys of ``forward_intermediates``) of the token tensors ``(B, T, d)``."""
        ...

    def layer_paths(self) -> dict[str, str]:
        """Layer name -> dotted path of the module whose output it is, in execution order."""
        ...


# building blocks ---------------------------------------------------------------------------


class MatmulConv1d(nn.Conv1d):
    """``nn.Conv1d`` computed as one matmul when its windows do not overlap (stride = kernel).

    Same parameters and numbers as ``nn.Conv1d``; the patching conv (kernel = stride = 40, one
    input channel) and the 1x1 conv are several times faster this way on CPU, where the generic
    convolution's weight gradient is slow. Other settings fall back to ``nn.Conv1d``.
    """

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        (k,), (s,), (d,) = self.kernel_size, self.stride, self.dilation
        generic = self.groups != 1 or self.padding_mode != "zeros" or isinstance(self.padding, str)
        if generic or s != k or d != 1:
            return super().forward(x)
        if self.padding[0]:
            x = F.pad(x, (self.padding[0], self.padding[0]))
        b, c_in, length = x.shape
        w = (length - k) // k + 1
        windows = x[..., : w * k].reshape(b, c_in, w, k).transpose(2, 3)  # (B, C_in, k, W)
        weight = self.weight.reshape(self.out_channels, c_in * k)
        y = torch.matmul(weight, windows.reshape(b, c_in * k, w))  # (B, C_out, W)
        return y if self.bias is None else y + self.bias.unsqueeze(-1)


class Conv1dNormActivation(ConvNormActivation):
    """``Conv1d -> BatchNorm1d -> SELU`` (torchvision warns on direct use of the base class)."""

    def __init__(self, in_channels: int, out_channels: int, kernel_size: int, **kwargs) -> None:
        kwargs.setdefault("norm_layer", nn.BatchNorm1d)
        kwargs.setdefault("activation_layer", nn.SELU)
        kwargs.setdefault("inplace", False)
        kwargs.setdefault("conv_layer", MatmulConv1d)
        super().__init__(in_channels, out_channels, kernel_size, **kwargs)


class ConvStem(nn.Module):
    """Patching stem: genes ``(B, G)`` -> ``C`` tokens, each the ``n_windows`` outputs of one
    conv channel (tokens are channels, not blocks of genes)."""

    def __init__(self, config: ScViTConfig) -> None:
        super().__init__()
        c, p = config.n_tokens, config.patch_size
        layers = [Conv1dNormActivation(1, c, p, stride=p, padding=config.padding)]
        layers += [Conv1dNormActivation(c, c, 5) for _ in range(config.extra_convs)]
        layers.append(MatmulConv1d(c, c, kernel_size=1))
        self.layers = nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.layers(x.unsqueeze(1))  # (B, 1, G) -> (B, C, n_windows)


class GeneBlocks(nn.Module):
    """Stem ablation: the padded genes cut into ``C`` contiguous blocks, one per token."""

    def __init__(self, config: ScViTConfig) -> None:
        super().__init__()
        self.n_tokens = config.n_tokens

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x.reshape(x.shape[0], self.n_tokens, -1)  # (B, G) -> (B, C, G / C)


class PatchwiseLinear(nn.Module):
    """One ``(in_dim, out_dim)`` matrix per token, no bias: ``y[b, n] = x[b, n] @ W[n]``.

    Computed as one ``bmm`` over tokens on a token-major view of ``x`` (no copies in the
    forward pass); the reference's ``einsum`` lowers to the same kernel, so the two run at the
    same speed, and this spelling keeps the cost and the weight layout explicit.
    """

    def __init__(self, tokens: int, in_dim: int, out_dim: int) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.empty(tokens, in_dim, out_dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = torch.bmm(x.transpose(0, 1), self.weight)  # (tokens, B, out)
        return y.transpose(0, 1)  # (B, tokens, out)

    def extra_repr(self) -> str:
        n, i, o = self.weight.shape
        return f"tokens={n}, in_dim={i}, out_dim={o}"


class MatMul(nn.Module):
    """``a @ b`` as a module, so attribution methods can hook each product of attention."""

    def forward(self, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        return torch.matmul(a, b)


class Mul(nn.Module):
    """``a * b`` (broadcasting) as a module, for products of two cell-dependent tensors."""

    def forward(self, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        return a * b


class Dropout(nn.Dropout):
    """``nn.Dropout`` with its mask drawn by ``rand_like(x) >= p``: the same distribution.

    CPU ``bernoulli_`` (what ``nn.Dropout`` draws) costs about four times ``rand_like``; in
    scViT, whose every stage drops half of a ``(cells, 40, 500)`` tensor, it was 12% of a
    training step on one thread. Identity in evaluation mode or with ``p = 0``.
    """

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.training or self.p == 0:
            return x
        if self.p == 1:
            return x * 0.0
        keep = torch.rand_like(x).ge_(self.p).mul_(1.0 / (1.0 - self.p))
        return x * keep


class Attention(nn.Module):
    """Multi-head self-attention with the parameters of ``nn.MultiheadAttention``.

    ``in_proj_weight (3d, d)``, ``in_proj_bias (3d)``, ``out_proj (d -> d)``, same names and
    init, so parameter counts and state dicts match ``nn.MultiheadAttention(d, heads,
    batch_first=True)``. ``fused=True`` uses ``scaled_dot_product_attention`` (except while
    training with attention dropout, where the explicit path's :class:`Dropout` is faster than
    the fused kernel's fallback); ``fused=False`` runs ``q k^T``, the softmax, the attention
    dropout and ``attn v`` as separate modules.
    Returns the attention update only (the caller adds the residual).
    """

    def __init__(self, dim: int, heads: int, *, dropout: float, fused: bool) -> None:
        super().__init__()
        if dim % heads:
            raise ValueError(f"dim {dim} is not divisible by {heads} heads")
        self.heads, self.head_dim, self.dropout, self.fused = heads, dim // heads, dropout, fused
        self.in_proj_weight = nn.Parameter(torch.empty(3 * dim, dim))
        self.in_proj_bias = nn.Parameter(torch.empty(3 * dim))
        self.out_proj = NonDynamicallyQuantizableLinear(dim, dim)
        self.qk = MatMul()
        self.softmax = nn.Softmax(dim=-1)
        self.attn_drop = Dropout(dropout)
        self.av = MatMul()
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """``nn.MultiheadAttention``'s init: Xavier in-projection, zero biases."""
        nn.init.xavier_uniform_(self.in_proj_weight)
        nn.init.zeros_(self.in_proj_bias)
        nn.init.zeros_(self.out_proj.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, t, d = x.shape
        qkv = F.linear(x, self.in_proj_weight, self.in_proj_bias)  # (B, T, 3d)
        qkv = qkv.view(b, t, 3, self.heads, self.head_dim).permute(2, 0, 3, 1, 4)
        q, k, v = qkv.unbind(0)  # each (B, heads, T, head_dim)
        if self.fused and not (self.training and self.dropout > 0):
            out = F.scaled_dot_product_attention(q, k, v)
        else:
            scores = self.qk(q * (1.0 / math.sqrt(self.head_dim)), k.transpose(-2, -1))
            weights = self.attn_drop(self.softmax(scores))  # (B, heads, T, T)
            out = self.av(weights, v)  # (B, heads, T, head_dim)
        out = out.transpose(1, 2).reshape(b, t, d)
        return self.out_proj(out)

    def extra_repr(self) -> str:
        return f"heads={self.heads}, head_dim={self.head_dim}, fused={self.fused}"


def token_linear(config: ScViTConfig, tokens: int, in_dim: int, out_dim: int) -> nn.Module:
    """Patch-wise linear, or one ``nn.Linear`` shared by all tokens (``patchwise=False``)."""
    if config.patchwise:
        return PatchwiseLinear(tokens, in_dim, out_dim)
    return nn.Linear(in_dim, out_dim)


def attention_or_none(config: ScViTConfig, dim: int, heads: int) -> Attention | None:
    if not config.attention:
        return None
    return Attention(dim, heads, dropout=config.attention_dropout, fused=config.fused_attention)


# stages ------------------------------------------------------------------------------------


class EncoderStage(nn.Module):
    """``BN -> token linear -> Dropout -> BN -> x + attention(x) -> Dropout -> SELU``."""

    def __init__(self, config: ScViTConfig, stage: tuple[int, int, int, int], name: str):
        super().__init__()
        tokens, out_dim, in_dim, heads = stage
        self.name, self.tokens, self.in_dim = name, tokens, in_dim
        self.norm_in = nn.BatchNorm1d(tokens)
        self.linear = token_linear(config, tokens, in_dim, out_dim)
        self.drop_linear = Dropout(config.dropout)
        self.norm_attn = nn.BatchNorm1d(tokens)
        self.attention = attention_or_none(config, out_dim, heads)
        # the residual branch as a module, so attributions can be split between the two paths
        self.skip = nn.Identity()
        self.drop_attn = Dropout(config.dropout)
        self.act = nn.SELU()

    def forward(self, x: torch.Tensor, record: dict | None = None) -> torch.Tensor:
        x = x.reshape(x.shape[0], self.tokens, self.in_dim)  # regroup: (B, tokens, in_dim)
        x = self.linear(self.norm_in(x))  # (B, tokens, out_dim)
        _save(record, f"{self.name}.linear", x)
        x = self.norm_attn(self.drop_linear(x))
        if self.attention is not None:
            update = self.attention(x)
            _save(record, f"{self.name}.attention", update)
            x = self.skip(x) + update
        x = self.act(self.drop_attn(x))
        _save(record, self.name, x)
        return x


class DecoderStage(nn.Module):
    """``x + attention(x) -> Dropout [-> token linear back to in_dim -> SELU -> BN]``.

    The first encoder stage's mirror stops after the dropout: its linear is the output layer.
    """

    def __init__(
        self, config: ScViTConfig, stage: tuple[int, int, int, int], name: str, *, last: bool
    ):
        super().__init__()
        tokens, out_dim, in_dim, heads = stage
        self.name, self.tokens, self.out_dim = name, tokens, out_dim
        self.attention = attention_or_none(config, out_dim, heads)
        self.skip = nn.Identity()  # the residual branch (see EncoderStage)
        self.drop_attn = Dropout(config.dropout)
        self.linear = None if last else token_linear(config, tokens, out_dim, in_dim)
        self.act = None if last else nn.SELU()
        self.norm = None if last else nn.BatchNorm1d(tokens)

    def forward(self, x: torch.Tensor, record: dict | None = None) -> torch.Tensor:
        x = x.reshape(x.shape[0], self.tokens, self.out_dim)  # (B, tokens, out_dim)
        if self.attention is not None:
            update = self.attention(x)
            _save(record, f"{self.name}.attention", update)
            x = self.skip(x) + update
        x = self.drop_attn(x)
        if self.linear is not None:
            x = self.norm(self.act(self.linear(x)))  # (B, tokens, in_dim)
        _save(record, self.name, x)
        return x


class DenseBlock(nn.Module):
    """``Linear -> Dropout -> SELU -> norm``: LayerNorm in the encoder, BatchNorm in the decoder."""

    def __init__(self, in_dim: int, out_dim: int, *, dropout: float, norm: str) -> None:
        super().__init__()
        self.linear = nn.Linear(in_dim, out_dim)
        self.drop = Dropout(dropout)
        self.act = nn.SELU()
        self.norm = nn.LayerNorm(out_dim) if norm == "layer" else nn.BatchNorm1d(out_dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.norm(self.act(self.drop(self.linear(x))))


# the model ---------------------------------------------------------------------------------


class ScViT(nn.Module):
    """The scViT autoencoder; ``forward(x)`` gives the latent and the likelihood parameters.

    Parameters
    ----------
    config
        Architecture, ablation switches and likelihood; see :class:`ScViTConfig`.

    Notes
    -----
    Inputs are ``(cells, n_genes)`` in the order the model was built for (what the values are,
    counts or log1p, is the caller's choice). Genes are zero-padded at the end to
    ``config.n_genes_padded``; the output keeps only the first ``n_genes`` parameters, so the
    padding never reaches the likelihood.
    """

    def __init__(self, config: ScViTConfig) -> None:
        super().__init__()
        self.config = config
        stages = config.stages
        self.stem = ConvStem(config) if config.conv_stem else GeneBlocks(config)
        self.encoder = nn.ModuleList(
            EncoderStage(config, s, f"encoder.{i}") for i, s in enumerate(stages)
        )
        widths = [stages[-1][0] * stages[-1][1], *config.encoder_dims]
        self.bottleneck = nn.ModuleList(
            DenseBlock(a, b, dropout=config.dropout, norm="layer")
            for a, b in itertools.pairwise(widths)
        )
        widths = [config.n_latent, *config.decoder_dims, widths[0]]
        self.decoder_dense = nn.ModuleList(
            DenseBlock(a, b, dropout=config.dropout, norm="batch")
            for a, b in itertools.pairwise(widths)
        )
        self.decoder = nn.ModuleList(
            DecoderStage(config, stages[i], f"decoder.{i}", last=i == 0)
            for i in reversed(range(len(stages)))
        )
        tokens, out_dim = stages[0][:2]
        self.head = token_linear(config, tokens, out_dim, 3 * config.head_length)
        self.activations = OutputActivations(
            config.likelihood, library_scaling=config.library_scaling
        )
        self._init_weights()

    def _init_weights(self) -> None:
        """Kaiming-uniform (SELU gain) on linear and patch-wise weights, zero biases.

        As in the reference: attention keeps ``nn.MultiheadAttention``'s init (its ``out_proj``
        is not a plain ``nn.Linear``) and the stem keeps PyTorch's default init.
        """
        for m in self.modules():
            if type(m) is nn.Linear or isinstance(m, PatchwiseLinear):
                nn.init.kaiming_uniform_(m.weight, nonlinearity="selu")
                if getattr(m, "bias", None) is not None:
                    nn.init.zeros_(m.bias)

    # the algorithm -------------------------------------------------------------------------

    def patchify(self, x: torch.Tensor) -> torch.Tensor:
        """Pad the genes and cut them into tokens: ``(B, n_genes) -> (B, C, token_length)``."""
        if x.ndim != 2 or x.shape[1] != self.config.n_genes:
            raise ValueError(
                f"expected input of shape (cells, {self.config.n_genes}), got {tuple(x.shape)}"
            )
        x = F.pad(x, (0, self.config.n_genes_padded - self.config.n_genes))  # (B, G_pad)
        return self.stem(x)  # (B, C, token_length)

    def encode(self, x: torch.Tensor, *, record: dict | None = None) -> torch.Tensor:
        """Latent representation ``(B, n_latent)`` of inputs ``(B, n_genes)``."""
        x = self.patchify(x)
        _save(record, "stem", x)
        for stage in self.encoder:
            x = stage(x, record)  # (B, tokens, out_dim)
        x = x.flatten(1)  # (B, tokens * out_dim)
        for i, block in enumerate(self.bottleneck):
            x = block(x)
            _save(record, f"bottleneck.{i}", x)
        return x

    def decode(
        self,
        z: torch.Tensor,
        *,
        library: torch.Tensor | None = None,
        record: dict | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
        """Likelihood parameters ``(mean, theta, gate_logits)``, each ``(B, n_genes)``.

        ``library`` (each cell's total count, ``(B,)``) is needed with ``library_scaling``.
        """
        x = z
        for i, block in enumerate(self.decoder_dense):
            x = block(x)
            _save(record, f"decoder.dense.{i}", x)
        for stage in self.decoder:
            x = stage(x, record)  # (B, tokens, dim) of the mirrored encoder stage
        x = self.head(x)  # (B, C, 3 * L)
        _save(record, "head", x)
        mean, theta, gate = self.split_head(x)  # each (B, n_genes)
        return self.activations(mean, theta, gate, library)

    def split_head(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Cut the output layer ``(B, C, 3 L)`` into three ``(B, n_genes)`` raw parameters.

        ``legacy_thirds`` flattens first and takes thirds of ``C * 3 L`` values, so token ``t``
        feeds means of some genes and dispersions of others (the reference); ``per_token``
        gives token ``t`` the three parameters of genes ``t L ... (t + 1) L - 1``.
        """
        b, c, _ = x.shape
        if self.config.head == "legacy_thirds":
            parts = x.reshape(b, 3, -1).unbind(1)  # 3 x (B, C * L)
        else:
            parts = x.reshape(b, c, 3, -1).unbind(2)  # 3 x (B, C, L)
        parts = [p.reshape(b, -1) for p in parts]
        n = self.config.n_genes
        if parts[0].shape[1] != n:  # drop padding (skipped when there is none: no copy)
            parts = [p[:, :n] for p in parts]
        return tuple(parts)

    def forward(self, x: torch.Tensor, *, library: torch.Tensor | None = None) -> AutoencoderOutput:
        """Encode and decode a batch ``(B, n_genes)``."""
        z = self.encode(x)
        return AutoencoderOutput(z, *self.decode(z, library=library))

    def loss(self, output: AutoencoderOutput, counts: torch.Tensor) -> torch.Tensor:
        """Training loss: NLL of the raw ``counts`` summed over genes, averaged over cells."""
        return nll(output, counts, likelihood=self.config.likelihood).mean()

    def forward_intermediates(
        self, x: torch.Tensor, *, library: torch.Tensor | None = None
    ) -> dict[str, torch.Tensor]:
        """Every layer's output, keyed by stable names, in execution order.

        Keys: ``stem``; per encoder stage ``i``: ``encoder.{i}.linear``,
        ``encoder.{i}.attention`` (the attention update, before the residual; absent without
        attention) and ``encoder.{i}``; ``bottleneck.{j}`` (the last is the latent, also
        ``latent``); ``decoder.dense.{j}``; per decoder stage (mirroring encoder stage ``i``,
        run from the last to the first) ``decoder.{i}.attention`` and ``decoder.{i}``;
        ``head`` (raw output layer); ``mean``, ``theta``, ``gate_logits``.
        """
        record: dict[str, torch.Tensor] = {}
        z = self.encode(x, record=record)
        record["latent"] = z
        mean, theta, gate = self.decode(z, library=library, record=record)
        record.update(mean=mean, theta=theta)
        if gate is not None:
            record["gate_logits"] = gate
        return record

    # the interface of interpret (see Interpretable) ----------------------------------------

    def attention_sites(self) -> list[AttentionSite]:
        """Every stage's attention, in execution order (``encoder.0`` ... ``decoder.0``).

        Each is residual self-attention: ``skip(x) + attention(x)``; none without attention.
        """
        stages = [*self.encoder, *self.decoder]
        return [
            AttentionSite(s.name, s.attention.softmax, s.attention, s.skip)
            for s in stages
            if s.attention is not None
        ]

    def token_layers(self) -> list[str]:
        """``stem``, ``encoder.{i}``, ``decoder.{i}``: the outputs that are ``(B, tokens, d)``."""
        return ["stem", *(s.name for s in self.encoder), *(s.name for s in self.decoder)]

    def layer_paths(self) -> dict[str, str]:
        """Layer names -> module paths, in execution order.

        The names of :meth:`forward_intermediates` that are one module's output, plus per
        stage with attention ``{stage}.skip``, ``{stage}.attention`` and ``{stage}.residual``
        (the residual sum ``skip + attention``, read at the dropout that follows it).
        """
        paths = {"stem": "stem"}
        for i, stage in enumerate(self.encoder):
            paths[f"{stage.name}.linear"] = f"encoder.{i}.linear"
            if stage.attention is not None:
                paths[f"{stage.name}.skip"] = f"encoder.{i}.skip"
                paths[f"{stage.name}.attention"] = f"encoder.{i}.attention"
                paths[f"{stage.name}.residual"] = f"encoder.{i}.drop_attn"
            paths[stage.name] = f"encoder.{i}"
        for j in range(len(self.bottleneck)):
            paths[f"bottleneck.{j}"] = f"bottleneck.{j}"
        for j in range(len(self.decoder_dense)):
            paths[f"decoder.dense.{j}"] = f"decoder_dense.{j}"
        for k, stage in enumerate(self.decoder):  # stored from the last encoder stage's mirror
            if stage.attention is not None:
                paths[f"{stage.name}.skip"] = f"decoder.{k}.skip"
                paths[f"{stage.name}.attention"] = f"decoder.{k}.attention"
                paths[f"{stage.name}.residual"] = f"decoder.{k}.drop_attn"
            paths[stage.name] = f"decoder.{k}"
        paths["head"] = "head"
        return paths


def _save(record: dict | None, name: str, x: torch.Tensor) -> None:
    if record is not None:
        record[name] = x
