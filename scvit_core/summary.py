"""What an scViT configuration builds: layers, shapes, parameters, FLOPs and training memory.

Everything here runs the model on PyTorch's ``meta`` device: shapes and parameter counts are
exact, no weights are allocated (the paper preset would need 500 MB) and no arithmetic is done,
so even the report's 125-million-parameter model is summarised in well under a second.

* :func:`layer_table` - one row per layer (a module holding parameters, the attention blocks as
  units, and the parameter-free stem and output steps): output shape per cell, parameter count
  and forward FLOPs from :mod:`scvit_core.flops`.
* :func:`stage_shapes` - the representation after each stage, for a diagram of the network.
* :func:`training_memory` - bytes of a training step: weights, gradients, AdamW's two moments,
  and activations estimated with forward hooks.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import pandas as pd
import torch
from torch import nn

from scvit_core.config import ScViTConfig
from scvit_core.flops import forward_flops
from scvit_core.model import ConvStem, ScViT

BYTES_PER_VALUE = 4  # float32, the dtype scViT trains in


def meta_model(config: ScViTConfig) -> ScViT:
    """``ScViT(config)`` on the meta device: real shapes, no memory, no numbers."""
    with torch.device("meta"):
        return ScViT(config)


def layer_names(model: ScViT) -> dict[nn.Module, str]:
    """Display name of every layer of ``model``, in the naming of :mod:`scvit_core.flops`.

    Decoder stages are named after the encoder stage they mirror (``decoder.3`` runs first),
    as in :meth:`ScViT.forward_intermediates`.
    """
    config = model.config
    names: dict[nn.Module, str] = {}
    if isinstance(model.stem, ConvStem):
        *convs, pointwise = model.stem.layers
        labels = ["stem.conv"] + [f"stem.extra_conv.{i}" for i in range(config.extra_convs)]
        for label, block in zip(labels, convs, strict=True):
            conv, norm = block[0], block[1]  # ConvNormActivation: conv, BatchNorm, SELU
            names[conv], names[norm] = label, f"{label}.norm"
        names[pointwise] = "stem.pointwise"
    else:
        names[model.stem] = "stem.blocks"
    for stage in model.encoder:
        for part in ("norm_in", "linear", "norm_attn", "attention"):
            if (module := getattr(stage, part)) is not None:
                names[module] = f"{stage.name}.{part}"
    for prefix, blocks in (
        ("bottleneck", model.bottleneck),
        ("decoder.dense", model.decoder_dense),
    ):
        for j, block in enumerate(blocks):
            names[block.linear], names[block.norm] = f"{prefix}.{j}.linear", f"{prefix}.{j}.norm"
    for stage in model.decoder:
        for part in ("attention", "linear", "norm"):
            if (module := getattr(stage, part)) is not None:
                names[module] = f"{stage.name}.{part}"
    names[model.head] = "head"
    names[model.activations] = "output"
    return names


def layer_table(config: ScViTConfig) -> pd.DataFrame:
    """One row per layer, in execution order.

    Columns: ``layer`` (name), ``part`` (stem, encoder, bottleneck, decoder, head, output),
    ``module`` (class name), ``output shape`` (per cell, without the batch axis; the output row
    lists its three parameter tensors), ``parameters`` and ``forward FLOPs`` (per cell, from
    :func:`scvit_core.flops.forward_flops`; attention sums its projections and products).
    The parameter column adds up to the model's parameter count, which the function checks.
    """
    model = meta_model(config).eval()
    names = layer_names(model)
    shapes: dict[str, str] = {}
    with _hooks(names, lambda name, out: shapes.setdefault(name, _shape(out))):
        model(torch.empty(1, config.n_genes, device="meta"))

    flops: dict[str, int] = {}
    for row in forward_flops(config):
        flops[_flops_layer(row.name)] = flops.get(_flops_layer(row.name), 0) + row.flops
    rows = []
    for module, name in names.items():
        rows.append(
            {
                "layer": name,
                "part": _part(name),
                "module": type(module).__name__,
                "output shape": shapes[name],
                "parameters": sum(p.numel() for p in module.parameters()),
                "forward FLOPs": flops.pop(name, 0),
            }
        )
    if flops:
        raise RuntimeError(f"FLOPs of {sorted(flops)} match no layer")  # a naming drift
    order = list(shapes)  # hooks fire in execution order
    table = pd.DataFrame(rows).set_index("layer").loc[order].reset_index()
    total = sum(p.numel() for p in model.parameters())
    if table["parameters"].sum() != total:
        raise RuntimeError("the layer table misses parameters of the model")
    return table


def stage_shapes(config: ScViTConfig) -> list[tuple[str, tuple[int, ...]]]:
    """``(name, shape per cell)`` of the input, of each stage's output and of the output.

    Stages as :meth:`ScViT.forward_intermediates` names them (``stem``, ``encoder.{i}``,
    ``bottleneck.{j}``, ``decoder.dense.{j}``, ``decoder.{i}``, ``head``), then ``output``:
    the three likelihood parameters per gene.
    """
    model = meta_model(config).eval()
    record = model.forward_intermediates(torch.empty(1, config.n_genes, device="meta"))
    inner = (".linear", ".attention")
    shapes = [("genes", (config.n_genes,))]
    for name, value in record.items():
        if name.endswith(inner) or name in ("latent", "mean", "theta", "gate_logits"):
            continue
        shapes.append((name, tuple(value.shape[1:])))
    n_outputs = 3 if "gate_logits" in record else 2
    shapes.append(("output", (n_outputs, config.n_genes)))
    return shapes


def training_memory(config: ScViTConfig, batch_size: int) -> dict[str, int]:
    """Bytes one training step needs, by component (float32, AdamW).

    ``weights``, ``gradients`` and ``adamw moments`` (two per weight) follow from the
    parameter count. ``activations`` is the sum of the output sizes of every module run in a
    training-mode forward pass (forward hooks on the meta device), plus the input batch: what
    autograd keeps for the backward pass, give or take the tensors that functional operations
    (reshapes, the residual sums, fused attention's internals) save or share. ``likelihood`` is
    what the loss saves for its gradient, ``(batch, genes)`` tensors measured with autograd's
    saved-tensor hooks. Allocator overhead, CUDA context and data loading come on top.
    """
    model = meta_model(config).train()
    n_params = sum(p.numel() for p in model.parameters())
    leaves = {m: str(i) for i, m in enumerate(model.modules()) if not list(m.children())}
    sizes: list[int] = []
    x = torch.empty(batch_size, config.n_genes, device="meta")
    with _hooks(leaves, lambda _, out: sizes.append(_nbytes(out))):
        output = model(x)
    saved: dict[int, int] = {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        saved[id(t)] = t.numel() * t.element_size()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        model.loss(output, torch.empty_like(x))
    return {
        "weights": n_params * BYTES_PER_VALUE,
        "gradients": n_params * BYTES_PER_VALUE,
        "adamw moments": 2 * n_params * BYTES_PER_VALUE,
        "activations": sum(sizes) + _nbytes(x),
        "likelihood": sum(saved.values()),
    }


# helpers ------------------------------------------------------------------------------------


@contextlib.contextmanager
def _hooks(modules: dict[nn.Module, str], callback) -> Iterator[None]:
    def hook(name: str):
        def record(_module, _inputs, out) -> None:  # returns None: the output is unchanged
            callback(name, out)

        return record

    handles = [m.register_forward_hook(hook(name)) for m, name in modules.items()]
    try:
        yield
    finally:
        for handle in handles:
            handle.remove()


def _tensors(out) -> list[torch.Tensor]:
    outs = out if isinstance(out, tuple | list) else (out,)
    return [o for o in outs if isinstance(o, torch.Tensor)]


def _shape(out) -> str:
    tensors = _tensors(out)
    shapes = {tuple(t.shape[1:]) for t in tensors}
    if len(tensors) > 1 and len(shapes) == 1:
        return f"{len(tensors)} x {shapes.pop()}"
    return ", ".join(str(tuple(t.shape[1:])) for t in tensors)


def _nbytes(out) -> int:
    return sum(t.numel() * t.element_size() for t in _tensors(out))


def _flops_layer(name: str) -> str:
    """The layer-table row of a :func:`forward_flops` entry."""
    if ".attention." in name:
        return name.split(".attention.")[0] + ".attention"
    if name.startswith(("bottleneck.", "decoder.dense.")):
        return f"{name}.linear"
    return name


def _part(name: str) -> str:
    if name.startswith("decoder.dense"):
        return "decoder (dense)"
    return name.split(".")[0]
