"""The project's autoencoders by name: one place that maps a configuration to its network.

Two architectures share the trainer, likelihoods, API, runner, CLI and interpret tools:

* ``"scvit"``: :class:`~scvit_core.config.ScViTConfig` -> :class:`~scvit_core.model.ScViT`,
  the report's model;
* ``"perceiver"``: :class:`~scvit_core.perceiver.PerceiverConfig` ->
  :class:`~scvit_core.perceiver.ScPerceiver`, the model built from the diagnosis.

A configuration's ``to_dict()`` is stored with every checkpoint; :func:`config_from_dict`
reads either kind back (a dictionary without ``"architecture"`` is an scViT configuration, as
written before there were two).
"""

from __future__ import annotations

from typing import Any

from torch import nn

from scvit_core.config import ScViTConfig
from scvit_core.perceiver import PerceiverConfig, ScPerceiver

ARCHITECTURES = ("scvit", "perceiver")

AnyConfig = ScViTConfig | PerceiverConfig


def architecture_of(config: AnyConfig) -> str:
    """``"scvit"`` or ``"perceiver"``."""
    if isinstance(config, PerceiverConfig):
        return "perceiver"
    if isinstance(config, ScViTConfig):
        return "scvit"
    raise TypeError(f"not a model configuration: {type(config).__name__}")


def config_from_dict(data: dict[str, Any]) -> AnyConfig:
    """The configuration stored by ``config.to_dict()``, of either architecture."""
    name = data.get("architecture", "scvit")
    if name == "perceiver":
        return PerceiverConfig.from_dict(data)
    if name == "scvit":
        return ScViTConfig.from_dict({k: v for k, v in data.items() if k != "architecture"})
    raise ValueError(f"unknown architecture {name!r}; known: {', '.join(ARCHITECTURES)}")


def config_for_genes(architecture: str, n_genes: int, **overrides: Any) -> AnyConfig:
    """The default configuration of ``architecture`` for ``n_genes`` genes."""
    if architecture == "perceiver":
        return PerceiverConfig.for_genes(n_genes, **overrides)
    if architecture == "scvit":
        return ScViTConfig.for_genes(n_genes, **overrides)
    raise ValueError(f"unknown architecture {architecture!r}; known: {', '.join(ARCHITECTURES)}")


def build_network(config: AnyConfig | dict[str, Any]) -> nn.Module:
    """The network of a configuration (or of its ``to_dict()``)."""
    if isinstance(config, dict):
        config = config_from_dict(config)
    if isinstance(config, PerceiverConfig):
        return ScPerceiver(config)
    from scvit_core.model import ScViT

    return ScViT(config)
