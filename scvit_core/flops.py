"""Analytic FLOP count of scViT, per layer and per cell.

Counts multiply-adds as 2 FLOPs and only the matrix products (convolutions, patch-wise and dense
linears, attention projections and the two attention products); normalisation, activations,
dropout and the likelihood are elementwise and left out. A training step costs about three
forward passes (forward, gradient with respect to inputs, gradient with respect to weights), so

    model GFLOP/s = TRAIN_FACTOR * total_forward_flops(config) * cells/s / 1e9
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass

from scvit_core.config import ScViTConfig

TRAIN_FACTOR = 3


@dataclass(frozen=True)
class LayerFlops:
    """Forward FLOPs per cell of one layer; ``name`` follows ``ScViT.forward_intermediates``."""

    name: str
    kind: str
    flops: int


def forward_flops(config: ScViTConfig) -> list[LayerFlops]:
    """Forward FLOPs per cell of every matrix-product layer, in execution order."""
    rows: list[LayerFlops] = []
    add = rows.append
    c = config.n_tokens
    if config.conv_stem:
        w = config.token_length
        add(LayerFlops("stem.conv", "conv", 2 * c * config.patch_size * w))
        for i in range(config.extra_convs):
            add(LayerFlops(f"stem.extra_conv.{i}", "conv", 2 * c * c * 5 * w))
        add(LayerFlops("stem.pointwise", "conv", 2 * c * c * w))

    for i, (tokens, out_dim, in_dim, _) in enumerate(config.stages):
        add(LayerFlops(f"encoder.{i}.linear", "patchwise", 2 * tokens * in_dim * out_dim))
        rows += _attention(config, f"encoder.{i}.attention", tokens, out_dim)

    widths = [config.stages[-1][0] * config.stages[-1][1], *config.encoder_dims]
    for j, (a, b) in enumerate(itertools.pairwise(widths)):
        add(LayerFlops(f"bottleneck.{j}", "dense", 2 * a * b))
    dec = [config.n_latent, *config.decoder_dims, widths[0]]
    for j, (a, b) in enumerate(itertools.pairwise(dec)):
        add(LayerFlops(f"decoder.dense.{j}", "dense", 2 * a * b))

    for i in reversed(range(len(config.stages))):
        tokens, out_dim, in_dim, _ = config.stages[i]
        rows += _attention(config, f"decoder.{i}.attention", tokens, out_dim)
        if i > 0:
            add(LayerFlops(f"decoder.{i}.linear", "patchwise", 2 * tokens * out_dim * in_dim))
    tokens, out_dim = config.stages[0][:2]
    add(LayerFlops("head", "patchwise", 2 * tokens * out_dim * 3 * config.head_length))
    return rows


def total_forward_flops(config: ScViTConfig) -> int:
    """Sum of :func:`forward_flops`: forward FLOPs per cell."""
    return sum(r.flops for r in forward_flops(config))


def training_flops_per_cell(config: ScViTConfig) -> int:
    """Approximate FLOPs of one training step per cell (``TRAIN_FACTOR`` forward passes)."""
    return TRAIN_FACTOR * total_forward_flops(config)


def _attention(config: ScViTConfig, name: str, tokens: int, dim: int) -> list[LayerFlops]:
    if not config.attention:
        return []
    t, d = tokens, dim
    return [
        LayerFlops(f"{name}.in_proj", "attention", 2 * t * d * 3 * d),
        LayerFlops(f"{name}.qk", "attention", 2 * t * t * d),
        LayerFlops(f"{name}.av", "attention", 2 * t * t * d),
        LayerFlops(f"{name}.out_proj", "attention", 2 * t * d * d),
    ]
