"""Configuration of the scViT model: one dataclass, saved whole with every checkpoint.

The named presets follow the report's reference code (DESIGN.md section 2):

* :meth:`ScViTConfig.paper` - 59,480 genes, 40 tokens, stem kernel = stride = 40 (1,487 windows),
  stages ``(40, 500, 1487, 4), (40, 100, 500, 4), (40, 20, 100, 4), (20, 5, 40, 1)``,
  bottleneck ``100 -> 512 -> 256 -> 64``, decoder ``64 -> 512 -> 256 -> 64 -> 100``, legacy
  likelihood and the legacy output head.
* :meth:`ScViTConfig.for_genes` - the same structure for a dataset's own gene count: genes are
  zero-padded to a whole number of stem windows and the first stage reads one value per window.
* :meth:`ScViTConfig.small` - a scaled-down structure for unit tests and quick CPU runs.

Every structural ablation of the report is a field (``attention``, ``conv_stem``, ``patchwise``,
``extra_convs``) or a factory argument (``width`` for a bigger model).
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Any

Stage = tuple[int, int, int, int]
"""One encoder stage ``(tokens, out_dim, in_dim, heads)``, as in the reference code."""

LIKELIHOODS = ("legacy", "corrected", "nb")
HEADS = ("legacy_thirds", "per_token")

PAPER_N_GENES = 59_480
PAPER_TOKENS = 40
PAPER_PATCH = 40


@dataclass(frozen=True)
class ScViTConfig:
    """Everything that defines an scViT network.

    Attributes
    ----------
    n_genes
        Number of genes the model reads and models (padding excluded).
    n_tokens
        Number of tokens ``C``: channels of the conv stem, or gene blocks without the stem.
    patch_size
        Kernel size and stride of the first stem convolution (genes per window).
    stem_padding
        Zero padding on both sides of the first stem convolution. ``None`` keeps torchvision's
        ``ConvNormActivation`` default ``(patch_size - 1) // 2`` that the reference code uses:
        with 59,480 genes and ``patch_size=40`` the windows are shifted by 19 genes, the first
        window starts on 19 zeros and the last 19 genes are never read by the stem (they are
        still modelled by the likelihood). ``0`` gives windows aligned with the genes.
    stages
        Encoder stages ``(tokens, out_dim, in_dim, heads)``; the decoder mirrors them. A stage
        whose token count differs from the previous one regroups the previous stage's values.
    encoder_dims
        Widths of the dense bottleneck; the last one is the latent size.
    decoder_dims
        Hidden widths of the dense decoder; it ends with ``tokens * out_dim`` of the last stage.
    dropout
        Dropout probability of every Dropout layer.
    attention_dropout
        Dropout on the attention weights.
    extra_convs
        Number of extra ``k=5`` conv + BatchNorm + SELU layers in the stem.
    attention
        Residual multi-head attention in every stage (ablation: off).
    conv_stem
        Conv patching stem; when off the padded genes are reshaped directly into
        ``n_tokens`` contiguous blocks (ablation).
    patchwise
        One weight matrix per token; when off one ``nn.Linear`` (with bias) shared by all tokens,
        as in the reference code's commented-out alternative (ablation).
    fused_attention
        ``scaled_dot_product_attention`` (fast) instead of explicit product and softmax modules
        (attribution-friendly). Both give the same numbers and have the same parameters.
    head
        ``"legacy_thirds"``: the last layer's output is flattened and cut into thirds (mean,
        dispersion, gate), so a gene's parameters come from different tokens (reference code).
        ``"per_token"``: token ``t`` produces all three parameters of the genes
        ``t * L ... (t + 1) * L - 1`` with ``L = ceil(n_genes / n_tokens)``.
    likelihood
        ``"legacy"``, ``"corrected"`` or ``"nb"``; see :mod:`scvit_core.likelihood`.
    library_scaling
        scVI-style mean: softmax over genes times the cell's library size (not for ``legacy``).
    """

    n_genes: int = PAPER_N_GENES
    n_tokens: int = PAPER_TOKENS
    patch_size: int = PAPER_PATCH
    stem_padding: int | None = None
    stages: tuple[Stage, ...] = (
        (40, 500, 1487, 4),
        (40, 100, 500, 4),
        (40, 20, 100, 4),
        (20, 5, 40, 1),
    )
    encoder_dims: tuple[int, ...] = (512, 256, 64)
    decoder_dims: tuple[int, ...] = (512, 256, 64)
    dropout: float = 0.5
    attention_dropout: float = 0.5
    extra_convs: int = 0
    attention: bool = True
    conv_stem: bool = True
    patchwise: bool = True
    fused_attention: bool = True
    head: str = "legacy_thirds"
    likelihood: str = "legacy"
    library_scaling: bool = False

    def __post_init__(self) -> None:
        # JSON round trips turn tuples into lists; normalise so configs compare equal.
        object.__setattr__(self, "stages", tuple(tuple(int(v) for v in s) for s in self.stages))
        object.__setattr__(self, "encoder_dims", tuple(int(v) for v in self.encoder_dims))
        object.__setattr__(self, "decoder_dims", tuple(int(v) for v in self.decoder_dims))
        self._validate()

    # derived sizes -------------------------------------------------------------------------

    @property
    def padding(self) -> int:
        """Stem padding actually used (see ``stem_padding``)."""
        return (self.patch_size - 1) // 2 if self.stem_padding is None else self.stem_padding

    @property
    def n_windows(self) -> int:
        """Stem windows per cell: ``ceil(n_genes / patch_size)``."""
        return math.ceil(self.n_genes / self.patch_size)

    @property
    def token_length(self) -> int:
        """Length of each token entering the first stage."""
        return _token_length(
            self.n_genes, self.n_tokens, self.patch_size, self.stem_padding, self.conv_stem
        )

    @property
    def n_genes_padded(self) -> int:
        """Input length after zero padding at the end of the gene axis.

        With the stem: a whole number of windows (``n_windows * patch_size``); without it: a
        whole number of tokens (``n_tokens * token_length``). Padded genes are dropped from the
        output, so the likelihood never sees them.
        """
        if self.conv_stem:
            return self.n_windows * self.patch_size
        return self.n_tokens * self.token_length

    @property
    def head_length(self) -> int:
        """Values per token and per parameter produced by the output layer."""
        return math.ceil(self.n_genes / self.n_tokens)

    @property
    def n_latent(self) -> int:
        return self.encoder_dims[-1]

    # presets -------------------------------------------------------------------------------

    @classmethod
    def paper(cls, **overrides: Any) -> ScViTConfig:
        """The report's configuration (59,480 genes), legacy likelihood and head."""
        return cls.for_genes(PAPER_N_GENES, **overrides)

    @classmethod
    def for_genes(cls, n_genes: int, *, width: float = 1.0, **overrides: Any) -> ScViTConfig:
        """The paper's structure for ``n_genes`` genes.

        Parameters
        ----------
        n_genes
            Genes of the dataset; padded to a whole number of 40-gene windows internally.
        width
            Multiplier on every hidden width (stage token lengths and dense layers; the latent
            size stays 64). ``width > 1`` is the report's "bigger model" ablation. Stage widths
            are rounded to a multiple of the stage's head count.
        **overrides
            Any other field of :class:`ScViTConfig`.
        """
        n_tokens = overrides.pop("n_tokens", PAPER_TOKENS)
        patch_size = overrides.pop("patch_size", PAPER_PATCH)
        first_in = _first_stage_in(n_genes, n_tokens, patch_size, overrides)
        stages = overrides.pop("stages", _paper_stages(first_in, n_tokens=n_tokens, width=width))
        dims = (_scaled(512, width), _scaled(256, width))
        overrides.setdefault("encoder_dims", (*dims, 64))
        overrides.setdefault("decoder_dims", (*dims, _scaled(64, width)))
        return cls(
            n_genes=n_genes, n_tokens=n_tokens, patch_size=patch_size, stages=stages, **overrides
        )

    @classmethod
    def small(cls, n_genes: int = 256, **overrides: Any) -> ScViTConfig:
        """A scaled-down structure (8 tokens, window 8) for tests and quick CPU runs."""
        n_tokens = overrides.pop("n_tokens", 8)
        patch_size = overrides.pop("patch_size", 8)
        base = dict(n_genes=n_genes, n_tokens=n_tokens, patch_size=patch_size)
        first_in = _first_stage_in(n_genes, n_tokens, patch_size, overrides)
        stages = overrides.pop(
            "stages",
            (
                (n_tokens, 32, first_in, 4),
                (n_tokens, 16, 32, 4),
                (n_tokens, 4, 16, 2),
                (n_tokens // 2, 4, 8, 1),
            ),
        )
        overrides.setdefault("encoder_dims", (32, 16, 8))
        overrides.setdefault("decoder_dims", (32, 16, 8))
        return cls(**base, stages=stages, **overrides)

    # serialisation -------------------------------------------------------------------------

    def to_dict(self) -> dict[str, Any]:
        """Plain, JSON-serialisable dictionary (``dataclasses.asdict``)."""
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> ScViTConfig:
        """Inverse of :meth:`to_dict`; unknown keys are an error."""
        return cls(**data)

    def replace(self, **changes: Any) -> ScViTConfig:
        """A copy with some fields changed (re-validated)."""
        return dataclasses.replace(self, **changes)

    # checks --------------------------------------------------------------------------------

    def _validate(self) -> None:
        if self.likelihood not in LIKELIHOODS:
            raise ValueError(f"likelihood must be one of {LIKELIHOODS}, got {self.likelihood!r}")
        if self.head not in HEADS:
            raise ValueError(f"head must be one of {HEADS}, got {self.head!r}")
        if self.library_scaling and self.likelihood == "legacy":
            raise ValueError("library_scaling is not part of the legacy likelihood")
        if self.n_genes < 1 or self.n_tokens < 1 or self.patch_size < 1:
            raise ValueError("n_genes, n_tokens and patch_size must be positive")
        if not self.stages:
            raise ValueError("at least one stage is needed")
        tokens, _, in_dim, _ = self.stages[0]
        if tokens != self.n_tokens or in_dim != self.token_length:
            raise ValueError(
                f"first stage must read {self.n_tokens} tokens of length {self.token_length}, "
                f"got {tokens} tokens of length {in_dim}"
            )
        prev_values = None
        for tokens, out_dim, in_dim, heads in self.stages:
            if prev_values is not None and tokens * in_dim != prev_values:
                raise ValueError(
                    f"stage ({tokens}, {out_dim}, {in_dim}, {heads}) must regroup "
                    f"{prev_values} values"
                )
            if out_dim % heads:
                raise ValueError(f"out_dim {out_dim} is not divisible by {heads} heads")
            prev_values = tokens * out_dim


def _first_stage_in(n_genes: int, n_tokens: int, patch_size: int, overrides: dict) -> int:
    """Token length entering the first stage, given the stem switches among ``overrides``."""
    return _token_length(
        n_genes,
        n_tokens,
        patch_size,
        overrides.get("stem_padding"),
        overrides.get("conv_stem", True),
    )


def _token_length(
    n_genes: int, n_tokens: int, patch_size: int, stem_padding: int | None, conv_stem: bool
) -> int:
    """Length of the first stage's tokens: stem output length, or genes per token block."""
    if not conv_stem:
        return math.ceil(n_genes / n_tokens)
    padding = (patch_size - 1) // 2 if stem_padding is None else stem_padding
    padded = math.ceil(n_genes / patch_size) * patch_size
    return (padded + 2 * padding - patch_size) // patch_size + 1


def _scaled(dim: int, width: float, multiple: int = 1) -> int:
    return max(multiple, round(dim * width / multiple) * multiple)


def _paper_stages(first_in: int, *, n_tokens: int, width: float) -> tuple[Stage, ...]:
    """The reference stages with the first ``in_dim`` set to the token length."""
    o1, o2, o3 = _scaled(500, width, 4), _scaled(100, width, 4), _scaled(20, width, 4)
    last_tokens = n_tokens // 2
    return (
        (n_tokens, o1, first_in, 4),
        (n_tokens, o2, o1, 4),
        (n_tokens, o3, o2, 4),
        (last_tokens, _scaled(5, width), n_tokens * o3 // last_tokens, 1),
    )
