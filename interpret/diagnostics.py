"""Representation and attention diagnostics of a trained network (DESIGN.md section 6, issue 5).

Questions each function answers, so that "attention and patching contribute little" can be
explained rather than observed:

* does attention attend to anything? :func:`attention_entropy` (entropy of the attention rows
  against the uniform ``log T``, max weight, weight on the token itself);
* does its update matter next to the residual? :func:`update_norms` (``||update|| / ||skip||``
  and their cosine), :func:`attention_knockout` (uniform, identity or no attention at inference:
  change in test NLL and in latent classification), :func:`knocked_out` (the modified copy);
* do ablated or re-seeded models compute the same thing? :func:`linear_cka`,
  :func:`cka_between`, :func:`cka_matrix`;
* how many directions do the tokens use? :func:`effective_rank`, :func:`matrix_effective_rank`;
* what do the conv stem's tokens span? :func:`stem_span`, :func:`stem_spectra`,
  :func:`token_similarity`;
* which output token produces which gene? :func:`decoder_gene_tokens`,
  :func:`gene_token_summary`;
* where is cell type linearly readable? :func:`layer_probes`;
* is the reconstruction better than a per-gene null model? :func:`likelihood_beyond_null`;
  how much of it could a better encoder still gain? :func:`amortisation_gap`;
* which blocks receive the gradient during training? :func:`grad_norm_share` (of the rows
  recorded with ``TrainConfig(grad_norm_every=n)``).

The functions that run a model take a network and its *inputs* ``x`` (``(cells, genes)``,
already transformed as the network reads them; :func:`diagnostic_inputs` builds them, with
counts, labels and split, from an AnnData and a trained API model such as
:class:`~scvit_core.api.ScViTModel`). Any network with the interface of
:class:`~scvit_core.model.Interpretable` works (scViT, scPerceiver): ``encode``, ``decode``,
``forward_intermediates``, ``attention_sites()`` (:class:`~scvit_core.model.AttentionSite`:
the softmax giving each attention's weights, its update and skip branch) and
``token_layers()``; the conv-stem and output-head functions (:func:`stem_span`,
:func:`stem_spectra`, :func:`token_similarity`, :func:`decoder_gene_tokens`) are scViT's
only. The caller's network is never modified: each function works on a deep copy in
evaluation mode, with the explicit attention path (``fused=False``) where it hooks the
attention weights. Forward passes run in batches under ``torch.no_grad`` on the network's
device. Layer names are those of ``forward_intermediates``; attention sites are named by
``attention_sites()`` (scViT: ``encoder.{i}`` and ``decoder.{i}`` name the attention of
encoder stage ``i`` and of its mirror in the decoder; scPerceiver adds ``encoder.cross``, the
latent queries reading the genes, and ``decoder.readout``, the genes reading the tokens).
"""

from __future__ import annotations

import copy
import functools
import math
import re
import warnings
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import anndata as ad
import numpy as np
import pandas as pd
import torch
from threadpoolctl import threadpool_limits
from torch import nn

from scvit_core import _constants as K
from scvit_core.data import check_labels, count_dataloader, prepare_counts, stratified_subsample
from scvit_core.likelihood import nll
from scvit_core.model import Attention, AttentionSite, AutoencoderOutput
from scvit_core.train import transform_input

if TYPE_CHECKING:
    from scvit_core.api import ScViTModel
    from scvit_core.model import ScViT

__all__ = [
    "KNOCKOUT_MODES",
    "DiagnosticInputs",
    "amortisation_gap",
    "attention_entropy",
    "attention_knockout",
    "attention_layers",
    "attention_sites",
    "cka_between",
    "cka_matrix",
    "decoder_gene_tokens",
    "diagnostic_inputs",
    "effective_rank",
    "gene_token_summary",
    "grad_norm_share",
    "knocked_out",
    "layer_probes",
    "likelihood_beyond_null",
    "linear_cka",
    "matrix_effective_rank",
    "stem_span",
    "stem_spectra",
    "token_similarity",
    "update_norms",
]

KNOCKOUT_MODES = ("trained", "uniform", "identity", "zero")
"""Attention at inference: as trained; uniform weights ``1/T`` (every token gets the mean of
the values); identity weights (each token gets its own value; self-attention only); no update
at all (sites whose update is added to a residual only)."""

BATCH_SIZE = 256


# --------------------------------------------------------------------------------------------
# inputs
# --------------------------------------------------------------------------------------------


@dataclass
class DiagnosticInputs:
    """What the diagnostics read, for the same cells in the same order.

    Attributes
    ----------
    inputs
        ``(cells, genes)`` float32: what the network reads (the model's input transform of the
        counts).
    counts
        ``(cells, genes)`` float32 raw counts (the likelihood's target).
    library
        ``(cells,)`` total counts per cell (used by ``library_scaling`` models).
    labels
        ``(cells,)`` strings of ``obs[label_key]``, or None if the column is absent.
    split
        ``(cells,)`` strings of ``obs["split"]``, or None if the column is absent.
    obs_names
        The cells' names.
    """

    inputs: torch.Tensor
    counts: torch.Tensor
    library: torch.Tensor
    labels: np.ndarray | None
    split: np.ndarray | None
    obs_names: np.ndarray


def diagnostic_inputs(
    model: ScViTModel | Any,
    adata: ad.AnnData | None = None,
    *,
    label_key: str = K.CELL_TYPE,
    max_cells: int | None = None,
    seed: int = 0,
) -> DiagnosticInputs:
    """Inputs, counts, library sizes, labels and split of an AnnData for a trained model.

    Uses the code paths of :class:`~scvit_core.api.ScViTModel`: the data are checked and their
    genes aligned to the model's gene list (reported in a warning) by
    :func:`~scvit_core.data.prepare_counts`, counts are read with
    :func:`~scvit_core.count_dataloader`, and the input is
    :func:`scvit_core.train.transform_input` with the model's saved input transform. Labels
    are optional; present ones must have no missing values.

    Parameters
    ----------
    model
        A trained API model (:class:`~scvit_core.api.ScViTModel`, the scPerceiver's): its
        ``adata``, ``train_config.input_transform`` and, if present, ``genes`` (default the
        AnnData's genes) and ``layer`` (default ``X``).
    adata
        The cells (default: the model's own AnnData); not modified.
    label_key
        ``obs`` column of the labels.
    max_cells
        Keep a label-stratified subsample of this many cells (seeded, in the data's order).
    seed
        Seed of that subsample.

    Returns
    -------
    DiagnosticInputs
    """
    target = model.adata if adata is None else adata
    if target is None:
        raise ValueError("the model was loaded without data; pass adata=")
    layer = getattr(model, "layer", None) if target is model.adata else None
    genes = getattr(model, "genes", None)
    genes = [str(g) for g in model.adata.var_names] if genes is None else list(genes)
    prepared = prepare_counts(target, genes, layer=layer)
    if prepared.alignment is not None:
        warnings.warn(f"data aligned to the model's genes: {prepared.alignment}", stacklevel=2)
    target = prepared.adata  # raw counts in X, in the model's gene order
    if label_key in target.obs:
        check_labels(target.obs, label_key)
    if max_cells is not None and target.n_obs > max_cells:
        strata = (
            target.obs[label_key].to_numpy()
            if label_key in target.obs
            else np.zeros(target.n_obs, dtype=int)
        )
        target = target[stratified_subsample(strata, max_cells, seed=seed)].copy()
    loader = count_dataloader(target, batch_size=1024)  # sequential: data order
    counts = torch.cat([batch["counts"] for batch in loader])  # (cells, genes)
    transform = model.train_config.input_transform
    obs = target.obs
    return DiagnosticInputs(
        inputs=transform_input(counts, transform),
        counts=counts,
        library=counts.sum(1),
        labels=obs[label_key].astype(str).to_numpy() if label_key in obs else None,
        split=obs[K.SPLIT].astype(str).to_numpy() if K.SPLIT in obs else None,
        obs_names=obs.index.to_numpy(),
    )


# --------------------------------------------------------------------------------------------
# shared machinery
# --------------------------------------------------------------------------------------------


def _eval_copy(model: nn.Module, *, explicit: bool = False) -> nn.Module:
    """A deep copy in evaluation mode; ``explicit`` switches every
    :class:`~scvit_core.model.Attention` to the unfused path (its softmax module runs)."""
    net = copy.deepcopy(model).eval()
    if explicit:
        for module in net.modules():
            if isinstance(module, Attention):
                module.fused = False
    return net


def _device(model: nn.Module) -> torch.device:
    return next(model.parameters()).device


def _as_tensor(x) -> torch.Tensor:
    return torch.as_tensor(np.asarray(x) if not torch.is_tensor(x) else x, dtype=torch.float32)


def _slices(n: int, batch_size: int) -> Iterator[slice]:
    for start in range(0, n, batch_size):
        yield slice(start, min(start + batch_size, n))


def _library(library, n: int) -> torch.Tensor:
    """Each cell's total count, or ones: without ``library`` only a ``library_scaling``
    model's ``mean`` differs from what it would be, and no diagnostic but the NLL reads it."""
    return torch.ones(n) if library is None else _as_tensor(library).reshape(-1)


def _small_linalg():
    """A context running BLAS/LAPACK on one thread, for small dense problems.

    Eigendecompositions of at most a few thousand rows and scikit-learn's classifier fits gain
    little from threads, and on a 2-core machine whose cores are busy (a training job beside
    a notebook) spin-waiting BLAS threads make them 10 to 50 times slower.
    """
    return threadpool_limits(limits=1)


def attention_sites(model: nn.Module) -> list[AttentionSite]:
    """The network's :class:`~scvit_core.model.AttentionSite` s, in execution order.

    ``model.attention_sites()``; a network without that method has no attention.
    """
    sites = getattr(model, "attention_sites", None)
    return [] if sites is None else list(sites())


def attention_layers(model: nn.Module) -> list[str]:
    """Names of the attention sites, in execution order (scViT: ``encoder.0`` ...
    ``decoder.0``; scPerceiver: ``encoder.cross``, ``encoder.{i}``, ``decoder.{i}``,
    ``decoder.readout``).

    The names used by every diagnostic here; the ``stages`` argument of :func:`knocked_out`
    takes them.
    """
    return [site.name for site in attention_sites(model)]


def _weights(w: torch.Tensor, site: AttentionSite) -> torch.Tensor:
    """Attention weights as ``(B, heads, queries, keys)``, normalised over the last axis.

    The softmax's own dimension is moved last (scPerceiver's readout normalises ``(B, m, G)``
    over ``dim=1``: its queries are the genes); one-head weights ``(B, queries, keys)`` get a
    head axis.
    """
    w = w.movedim(site.dim, -1)
    if w.ndim == 3:
        w = w.unsqueeze(1)
    if w.ndim != 4:
        raise ValueError(f"attention weights of {site.name!r} have shape {tuple(w.shape)}")
    return w


def _rows(split: np.ndarray | None, value: str, n: int) -> np.ndarray:
    if split is None:
        return np.arange(n)
    return np.flatnonzero(np.asarray(split).astype(str) == value)


class _Hooks:
    """Forward hooks removed on exit, even after an exception."""

    def __init__(self) -> None:
        self.handles: list = []

    def add(self, module: nn.Module, hook) -> None:
        self.handles.append(module.register_forward_hook(hook))

    def __enter__(self) -> _Hooks:
        return self

    def __exit__(self, *exc) -> None:
        for handle in self.handles:
            handle.remove()


def _layer_names(model: nn.Module, x: torch.Tensor, library: torch.Tensor) -> list[str]:
    """Keys of ``forward_intermediates`` in execution order, each tensor named once.

    ``latent`` is the same tensor as the last ``bottleneck.{j}``; it keeps the name ``latent``
    at the bottleneck's position.
    """
    device = _device(model)
    with torch.no_grad():
        record = model.forward_intermediates(x[:2].to(device), library=library[:2].to(device))
    names: list[str] = []
    seen: dict[int, int] = {}
    for name, tensor in record.items():
        if id(tensor) in seen:
            names[seen[id(tensor)]] = name
        else:
            seen[id(tensor)] = len(names)
            names.append(name)
    return names


def _collect(
    model: nn.Module,
    x: torch.Tensor,
    names: Sequence[str],
    *,
    library: torch.Tensor,
    batch_size: int,
) -> dict[str, torch.Tensor]:
    """The named layers' outputs for every cell, flattened per cell: ``(cells, features)``."""
    device = _device(model)
    parts: dict[str, list[torch.Tensor]] = {name: [] for name in names}
    with torch.no_grad():
        for sl in _slices(len(x), batch_size):
            record = model.forward_intermediates(x[sl].to(device), library=library[sl].to(device))
            for name in names:
                parts[name].append(record[name].flatten(1).float().cpu())
    return {name: torch.cat(chunks) for name, chunks in parts.items()}


# --------------------------------------------------------------------------------------------
# 1. attention entropy
# --------------------------------------------------------------------------------------------


def attention_entropy(
    model: nn.Module, x, *, library=None, batch_size: int = BATCH_SIZE
) -> pd.DataFrame:
    """How spread out each head's attention is, against uniform attention.

    The attention weights are read at the output of each attention site's ``softmax`` module
    (:meth:`attention_sites`; the explicit path, on a copy with ``fused=False``; evaluation
    mode, so no attention dropout), over the softmax's own dimension. Each row of weights (one
    query) has entropy ``H = -sum_j w_j log w_j`` over the ``T`` keys; uniform attention has
    ``log T`` and puts ``1/T`` on every key.

    Parameters
    ----------
    model
        A trained network (scViT, scPerceiver; not modified).
    x
        Inputs ``(cells, genes)``, transformed as the network reads them.
    library
        Total counts per cell (only ``library_scaling`` models use it; any value works here).
    batch_size
        Cells per forward pass.

    Returns
    -------
    pandas.DataFrame
        One row per attention site and head, in execution order: ``layer`` (the site's name,
        e.g. ``encoder.{i}`` / ``decoder.{i}``), ``head``, ``tokens`` ``T`` (keys each row is
        normalised over), ``queries`` (rows), ``entropy`` (mean over cells and queries),
        ``uniform_entropy`` ``log T``, ``entropy_ratio`` (``entropy / log T``: 1 is uniform, 0
        one-hot), ``max_weight`` (mean largest weight of a row; uniform ``1/T``),
        ``self_weight`` (mean weight of a token on itself; NaN where queries and keys are not
        the same tokens), ``uniform_weight`` ``1/T``.
    """
    net = _eval_copy(model, explicit=True)
    x = _as_tensor(x)
    library = _library(library, len(x))
    sums: dict[str, torch.Tensor] = {}  # name -> (3, heads): entropy, max, self
    shapes: dict[str, tuple[int, int]] = {}  # name -> (queries, keys)

    def hook(site: AttentionSite):
        def record(module, inputs, w):
            w = _weights(w, site)  # (B, heads, queries, keys)
            queries, keys = w.shape[-2:]
            square = site.self_attention and queries == keys
            own = w.diagonal(dim1=-2, dim2=-1) if square else torch.full_like(w[..., 0], math.nan)
            rows = torch.stack([-torch.xlogy(w, w).sum(-1), w.amax(-1), own])  # (3, B, h, Q)
            total = rows.double().mean(-1).sum(1).cpu()  # (3, heads): summed over cells
            sums[site.name] = sums.get(site.name, 0) + total
            shapes[site.name] = (queries, keys)

        return record

    sites = attention_sites(net)
    with _Hooks() as hooks, torch.no_grad():
        for site in sites:
            hooks.add(site.softmax, hook(site))
        device = _device(net)
        for sl in _slices(len(x), batch_size):
            net(x[sl].to(device), library=library[sl].to(device))
    rows = []
    for site in sites:
        total = sums[site.name] / len(x)
        queries, tokens = shapes[site.name]
        for head in range(total.shape[1]):
            entropy, max_weight, self_weight = (float(v) for v in total[:, head])
            rows.append(
                {
                    "layer": site.name,
                    "head": head,
                    "tokens": tokens,
                    "queries": queries,
                    "entropy": entropy,
                    "uniform_entropy": math.log(tokens),
                    "entropy_ratio": entropy / math.log(tokens) if tokens > 1 else math.nan,
                    "max_weight": max_weight,
                    "self_weight": self_weight,
                    "uniform_weight": 1.0 / tokens,
                }
            )
    return pd.DataFrame(rows)


# --------------------------------------------------------------------------------------------
# 2. attention update against the residual
# --------------------------------------------------------------------------------------------


def update_norms(
    model: nn.Module, x, *, library=None, batch_size: int = BATCH_SIZE
) -> pd.DataFrame:
    """Size and direction of each attention update relative to its residual input.

    At every attention site with a residual (``site.update`` and ``site.skip``, e.g. scViT's
    stages and scPerceiver's blocks) the output is ``skip(x) + update``; both terms are read
    with forward hooks (on ``site.skip`` and ``site.update``) and compared per cell over the
    whole ``(tokens, dim)`` matrix. Sites without a residual (cross-attention) are left out.

    Parameters
    ----------
    model, x, library, batch_size
        As in :func:`attention_entropy`.

    Returns
    -------
    pandas.DataFrame
        One row per residual attention site, in execution order: ``layer``, ``update_norm`` and
        ``skip_norm`` (mean over cells of the Frobenius norms), ``ratio`` (mean over cells of
        ``||update|| / ||skip||``), ``ratio_median``, ``cosine`` (mean over cells of the
        cosine similarity between update and skip; 0 is orthogonal, -1 cancels the skip).
    """
    net = _eval_copy(model)
    x = _as_tensor(x)
    library = _library(library, len(x))
    seen: dict[str, dict[str, torch.Tensor]] = {}
    per_cell: dict[str, list[torch.Tensor]] = {}

    def hook(name, part):
        def record(module, inputs, output):
            seen.setdefault(name, {})[part] = output.flatten(1).double()  # (B, tokens * dim)

        return record

    sites = [site for site in attention_sites(net) if site.residual]
    with _Hooks() as hooks, torch.no_grad():
        for site in sites:
            hooks.add(site.update, hook(site.name, "update"))
            hooks.add(site.skip, hook(site.name, "skip"))
        device = _device(net)
        for sl in _slices(len(x), batch_size):
            seen.clear()
            net(x[sl].to(device), library=library[sl].to(device))
            for name, parts in seen.items():
                u, s = parts["update"], parts["skip"]
                un, sn = u.norm(dim=1), s.norm(dim=1)
                cos = (u * s).sum(1) / (un * sn).clamp_min(1e-30)
                per_cell.setdefault(name, []).append(torch.stack([un, sn, un / sn, cos]).cpu())
    rows = []
    for name in (site.name for site in sites):
        un, sn, ratio, cos = torch.cat(per_cell[name], dim=1)  # each (cells,)
        rows.append(
            {
                "layer": name,
                "update_norm": float(un.mean()),
                "skip_norm": float(sn.mean()),
                "ratio": float(ratio.mean()),
                "ratio_median": float(ratio.median()),
                "cosine": float(cos.mean()),
            }
        )
    return pd.DataFrame(rows)


# --------------------------------------------------------------------------------------------
# 3. attention knock-out
# --------------------------------------------------------------------------------------------


def knocked_out(model: nn.Module, mode: str, *, stages: Iterable[str] | None = None) -> nn.Module:
    """A copy of ``model`` whose attention is replaced at inference.

    The copy is in evaluation mode with the explicit attention path (``fused=False``) and
    keeps forward hooks that implement the knock-out at each attention site
    (:func:`attention_sites`):

    * ``"uniform"``: the site's softmax returns ``1/T`` everywhere (over its own dimension),
      so every query receives the mean of the values (``out_proj`` of it in self-attention);
    * ``"identity"``: the softmax returns the identity matrix, so token ``t`` receives its own
      value (``out_proj(v_t)``, the value path alone); self-attention sites only;
    * ``"zero"``: the site's update returns zeros, so the block is ``skip(x)`` only, as in a
      scViT built with ``attention=False``; residual sites only (``site.update``);
    * ``"trained"``: no change.

    Parameters
    ----------
    model
        The network (not modified).
    mode
        One of :data:`KNOCKOUT_MODES`.
    stages
        Site names (``"encoder.0"``, ``"decoder.3"``, ...) to knock out; None: every site the
        mode applies to (``identity``: the self-attention sites; ``zero``: the residual ones).
        Naming a site the mode does not apply to is an error.

    Returns
    -------
    torch.nn.Module
        The modified copy.
    """
    if mode not in KNOCKOUT_MODES:
        raise ValueError(f"mode must be one of {KNOCKOUT_MODES}, got {mode!r}")
    net = _eval_copy(model, explicit=True)
    available = {site.name: site for site in attention_sites(net)}
    eligible = [name for name, site in available.items() if _applies(mode, site)]
    chosen = eligible if stages is None else list(stages)
    unknown = [s for s in chosen if s not in available]
    if unknown:
        raise ValueError(
            f"no attention in stage(s) {unknown}; stages with attention: {list(available)}"
        )
    refused = [s for s in chosen if s not in eligible]
    if refused:
        why = {
            "identity": "identity weights need self-attention (queries = keys)",
            "zero": "a zero update needs a residual sum (site.update)",
        }[mode]
        raise ValueError(f"knock-out {mode!r} does not apply to {refused}: {why}")
    for name in chosen:
        site = available[name]
        if mode == "uniform":
            site.softmax.register_forward_hook(functools.partial(_uniform_weights, dim=site.dim))
        elif mode == "identity":
            site.softmax.register_forward_hook(functools.partial(_identity_weights, dim=site.dim))
        elif mode == "zero":
            site.update.register_forward_hook(_zero_update)
    return net


def _applies(mode: str, site: AttentionSite) -> bool:
    """Whether knock-out ``mode`` is defined at ``site``."""
    if mode == "identity":
        return site.self_attention
    if mode == "zero":
        return site.update is not None
    return True


def _uniform_weights(module, inputs, w, *, dim: int = -1):
    return torch.full_like(w, 1.0 / w.shape[dim])


def _identity_weights(module, inputs, w, *, dim: int = -1):
    moved = w.movedim(dim, -1)  # (..., queries, keys)
    if moved.shape[-2] != moved.shape[-1]:
        raise ValueError(f"identity weights need square attention, got {tuple(moved.shape)}")
    eye = torch.eye(moved.shape[-1], dtype=w.dtype, device=w.device)
    return eye.expand_as(moved).movedim(-1, dim)


def _zero_update(module, inputs, update):
    return torch.zeros_like(update)


def _encode(net: nn.Module, x: torch.Tensor, rows: np.ndarray, batch_size: int) -> torch.Tensor:
    device = _device(net)
    out = []
    with torch.no_grad():
        for sl in _slices(len(rows), batch_size):
            out.append(net.encode(x[rows[sl]].to(device)).float().cpu())
    return torch.cat(out) if out else torch.zeros(0, net.config.n_latent)


def _decode_nll(
    net: nn.Module, z: torch.Tensor, counts: torch.Tensor, library: torch.Tensor, batch_size: int
) -> np.ndarray:
    """Per-cell NLL ``(cells,)`` of ``counts`` under the decoding of latents ``z``."""
    device = _device(net)
    out = []
    with torch.no_grad():
        for sl in _slices(len(z), batch_size):
            zb = z[sl].to(device)
            params = AutoencoderOutput(zb, *net.decode(zb, library=library[sl].to(device)))
            loss = nll(params, counts[sl].to(device), likelihood=net.config.likelihood)
            out.append(loss.double().cpu().numpy())
    return np.concatenate(out) if out else np.zeros(0)


def attention_knockout(
    model: nn.Module,
    x,
    counts,
    *,
    library=None,
    modes: Sequence[str] = KNOCKOUT_MODES,
    labels=None,
    split=None,
    per_stage: bool = False,
    label_key: str = K.CELL_TYPE,
    seed: int = 0,
    mlp_epochs: int = 10,
    batch_size: int = BATCH_SIZE,
) -> pd.DataFrame:
    """Test NLL and latent classification with attention replaced at inference.

    Each mode of :func:`knocked_out` is applied to every site it applies to at once
    (``"all"``), and with ``per_stage`` also to one such site at a time. The NLL is scored on
    the ``test`` cells of ``split`` (all cells without ``split``) under the model's own
    likelihood (:func:`scvit_core.likelihood.nll`). With ``labels`` and ``split``, the latent
    of the train and test cells goes through :func:`scvit_core.evaluate.classifier_metrics`
    (classifiers fitted on train, scored on test). A knock-out confined to the decoder (sites
    named ``decoder.*``) leaves the latent unchanged: its latent is not recomputed and its
    classification is the trained model's.

    Parameters
    ----------
    model
        The trained network (not modified).
    x
        Inputs ``(cells, genes)``, transformed as the network reads them.
    counts
        Raw counts ``(cells, genes)``: the likelihood's target.
    library
        Total counts per cell (default ``counts.sum(1)``, as in training).
    modes
        Modes from :data:`KNOCKOUT_MODES`; ``"trained"`` is always computed (the reference).
    labels, split
        ``(cells,)`` labels and ``"train"``/``"validation"``/``"test"`` values.
    per_stage
        Also knock out each site alone (sites a mode does not apply to have no row).
    label_key, seed, mlp_epochs
        Passed to :func:`~scvit_core.evaluate.classifier_metrics`.
    batch_size
        Cells per forward pass.

    Returns
    -------
    pandas.DataFrame
        One row per knock-out: ``mode``, ``stages`` (``"none"`` for the trained model,
        ``"all"``, or one site name), ``nll`` (mean per-cell NLL on the scored cells, summed
        over genes: scVI's units), ``nll_change`` (minus the trained model's; positive means
        the knock-out hurts), ``n_cells`` (cells scored), then, with labels, the columns
        ``{mlp,knn,logreg}_{accuracy,macro_f1}``.
    """
    from scvit_core.evaluate import classifier_metrics

    unknown = [m for m in modes if m not in KNOCKOUT_MODES]
    if unknown:
        raise ValueError(f"unknown mode(s) {unknown}; choose from {KNOCKOUT_MODES}")
    x, counts = _as_tensor(x), _as_tensor(counts)
    library = counts.sum(1) if library is None else _library(library, len(x))
    test = _rows(split, "test", len(x))
    if not len(test):
        raise ValueError("attention_knockout needs test cells in split (or no split)")
    classify = labels is not None and split is not None
    if classify:
        labels = np.asarray(labels).astype(str)
        train = _rows(split, "train", len(x))
        encode_rows = np.concatenate([train, test])  # z[: len(train)] train, then test
    else:
        encode_rows = test
    n_test = len(test)
    sites = attention_sites(model)
    # sites named decoder.* run after the latent: knocking them out leaves it unchanged
    decoder_stages = {site.name for site in sites if site.name.startswith("decoder")}

    def targets(mode: str) -> list[tuple[str, list[str] | None]]:
        chosen: list[tuple[str, list[str] | None]] = [("all", None)]
        if per_stage:
            chosen += [(site.name, [site.name]) for site in sites if _applies(mode, site)]
        return chosen

    def evaluate(net: nn.Module, z: torch.Tensor | None) -> tuple[dict, torch.Tensor]:
        if z is None:
            z = _encode(net, x, encode_rows, batch_size)
        z_test = z[len(z) - n_test :]
        losses = _decode_nll(net, z_test, counts[test], library[test], batch_size)
        row = {"nll": float(losses.mean()), "n_cells": n_test}
        return row, z

    def classification(z: torch.Tensor) -> dict:
        if not classify:
            return {}
        n_train = len(z) - n_test
        with _small_linalg():
            frame = classifier_metrics(
                z[:n_train].numpy(),
                labels[encode_rows[:n_train]],
                z[n_train:].numpy(),
                labels[test],
                label_key=label_key,
                seed=seed,
                mlp_epochs=mlp_epochs,
            )
        return dict(zip(frame["metric"], frame["value"], strict=True))

    trained_row, trained_z = evaluate(knocked_out(model, "trained"), None)
    trained_metrics = classification(trained_z)
    rows = [{"mode": "trained", "stages": "none", **trained_row, **trained_metrics}]
    for mode in modes:
        if mode == "trained":
            continue
        for label, chosen in targets(mode):
            in_decoder = chosen is not None and set(chosen) <= decoder_stages
            net = knocked_out(model, mode, stages=chosen)
            if in_decoder:  # the latent is the trained model's
                row, _ = evaluate(net, trained_z)
                metrics = trained_metrics
            else:
                row, z = evaluate(net, None)
                metrics = classification(z)
            rows.append({"mode": mode, "stages": label, **row, **metrics})
    frame = pd.DataFrame(rows)
    frame.insert(frame.columns.get_loc("nll") + 1, "nll_change", frame["nll"] - rows[0]["nll"])
    return frame


# --------------------------------------------------------------------------------------------
# 4. CKA
# --------------------------------------------------------------------------------------------


def linear_cka(a, b) -> float:
    """Linear centred kernel alignment of two representations of the same cells.

    Kornblith et al. (2019): with ``A`` and ``B`` column-centred ``(cells, features)``,
    ``CKA = ||B^T A||_F^2 / (||A^T A||_F ||B^T B||_F)``, equal to the alignment of the centred
    Gram matrices, ``<A A^T, B B^T>_F / (||A A^T||_F ||B B^T||_F)``. It lies in ``[0, 1]``, is 1
    for the same representation and is invariant to orthogonal transforms and isotropic
    scaling of either side. Computed in float64 with the feature form or, when features
    outnumber cells, the Gram form (``cells x cells``, cheaper and no less accurate).

    Parameters
    ----------
    a, b
        ``(cells, features_a)`` and ``(cells, features_b)``, rows in the same cell order;
        higher-dimensional arrays are flattened per cell.

    Returns
    -------
    float
        NaN when either representation is constant across cells.
    """
    a = np.asarray(a, dtype=np.float64).reshape(len(a), -1)
    b = np.asarray(b, dtype=np.float64).reshape(len(b), -1)
    if len(a) != len(b):
        raise ValueError(f"a has {len(a)} cells, b {len(b)}")
    a, b = a - a.mean(0), b - b.mean(0)
    n, pa, pb = len(a), a.shape[1], b.shape[1]
    if n * n * (pa + pb) < n * (pa * pb + pa * pa + pb * pb):
        ka, kb = a @ a.T, b @ b.T  # (cells, cells)
        cross, norm_a, norm_b = (ka * kb).sum(), np.linalg.norm(ka), np.linalg.norm(kb)
    else:
        cross = np.linalg.norm(b.T @ a) ** 2
        norm_a, norm_b = np.linalg.norm(a.T @ a), np.linalg.norm(b.T @ b)
    if norm_a == 0 or norm_b == 0:
        return math.nan
    return float(cross / (norm_a * norm_b))


def _unit_grams(layers: dict[str, torch.Tensor]) -> dict[str, np.ndarray]:
    """Each layer's centred Gram matrix scaled to unit Frobenius norm, flattened (float64).

    ``CKA(a, b)`` is then the dot product of two of them. Each layer's activations are dropped
    from ``layers`` once used, which keeps the peak memory near that of the activations.
    """
    out = {}
    for name in list(layers):
        a = layers.pop(name).numpy()
        a = a - a.mean(0, dtype=np.float64).astype(np.float32)
        gram = (a @ a.T).astype(np.float64)  # (cells, cells); numpy's syrk, in float32
        norm = np.linalg.norm(gram)
        out[name] = (gram / norm if norm > 0 else np.full_like(gram, np.nan)).ravel()
    return out


def _grams(model: nn.Module, x, names, library, batch_size) -> dict[str, np.ndarray]:
    layers = _collect(_eval_copy(model), x, names, library=library, batch_size=batch_size)
    return _unit_grams(layers)


def cka_between(
    model_a: nn.Module,
    model_b: nn.Module,
    x,
    *,
    layers: Sequence[str] | None = None,
    library=None,
    batch_size: int = BATCH_SIZE,
) -> pd.DataFrame:
    """Linear CKA between the same-named layers of two models on the same cells.

    For a full model against an ablated variant, or the same configuration across seeds.
    Layer outputs come from the networks' ``forward_intermediates``, flattened per cell; Gram
    matrices are formed in float32 (relative error about ``1e-6``), normalised and compared
    in float64. Memory: the activations are held one model at a time, about
    ``cells x 175,000 x 4`` bytes for the default preset with all layers (0.7 GB per 1,000
    cells), plus ``cells^2 x 8`` bytes per layer and model for the Gram matrices.

    Parameters
    ----------
    model_a, model_b
        Networks reading the same inputs (not modified).
    x
        Inputs ``(cells, genes)``.
    layers
        Layer names; default: those of both models, in ``model_a``'s execution order
        (scViT's ``latent`` stands for the last bottleneck layer, the same tensor).
    library
        Total counts per cell (only the ``mean`` layer of ``library_scaling`` models uses it).
    batch_size
        Cells per forward pass.

    Returns
    -------
    pandas.DataFrame
        ``layer``, ``cka`` (NaN where a layer is constant across cells).
    """
    x = _as_tensor(x)
    library = _library(library, len(x))
    if layers is None:
        names_b = set(_layer_names(model_b, x, library))
        layers = [n for n in _layer_names(model_a, x, library) if n in names_b]
    layers = list(layers)
    grams_a = _grams(model_a, x, layers, library, batch_size)
    grams_b = _grams(model_b, x, layers, library, batch_size)
    values = [float(np.dot(grams_a[n], grams_b[n])) for n in layers]
    return pd.DataFrame({"layer": layers, "cka": values})


def cka_matrix(
    model_a: nn.Module,
    model_b: nn.Module,
    x,
    *,
    layers_a: Sequence[str] | None = None,
    layers_b: Sequence[str] | None = None,
    library=None,
    batch_size: int = BATCH_SIZE,
) -> pd.DataFrame:
    """Linear CKA between every layer of ``model_a`` and every layer of ``model_b``.

    Pass the same model twice for the layer-by-layer similarity within one network. Computed
    as :func:`cka_between` (same memory note).

    Parameters
    ----------
    model_a, model_b, x, library, batch_size
        As in :func:`cka_between`.
    layers_a, layers_b
        Layer names of each model (default: all, in execution order).

    Returns
    -------
    pandas.DataFrame
        A matrix: index ``layer_a`` (``model_a``'s layers), columns ``layer_b``; ``.stack()``
        gives the tidy form, ``seaborn.heatmap`` plots it as it is.
    """
    x = _as_tensor(x)
    library = _library(library, len(x))
    layers_a = list(layers_a or _layer_names(model_a, x, library))
    layers_b = list(layers_b or _layer_names(model_b, x, library))
    grams_a = _grams(model_a, x, layers_a, library, batch_size)
    grams_b = grams_a if model_b is model_a else None
    if grams_b is None or not set(layers_b) <= set(layers_a):
        grams_b = _grams(model_b, x, layers_b, library, batch_size)
    left = np.stack([grams_a.pop(n) for n in layers_a])  # (layers_a, cells^2)
    right = left if grams_b is grams_a and layers_b == layers_a else None
    if right is None:
        right = np.stack([grams_b[n] for n in layers_b])
    return pd.DataFrame(
        left @ right.T,
        index=pd.Index(layers_a, name="layer_a"),
        columns=pd.Index(layers_b, name="layer_b"),
    )


# --------------------------------------------------------------------------------------------
# 5. effective rank
# --------------------------------------------------------------------------------------------


def matrix_effective_rank(a) -> torch.Tensor:
    """Roy and Vetterli's (2007) effective rank of a matrix, or of each in a batch.

    ``erank(A) = exp(-sum_k p_k log p_k)`` with ``p_k = s_k / sum_j s_j`` the singular values
    normalised to sum 1 (not their squares): 1 for a rank-1 matrix, ``n`` for an ``n x n``
    identity (or any matrix with ``n`` equal singular values). A zero matrix gives NaN.

    Parameters
    ----------
    a
        ``(..., m, n)``.

    Returns
    -------
    torch.Tensor
        ``(...)`` float64.
    """
    return _erank_from_singular_values(_singular_values(_as_tensor(a)))


def _singular_values(a: torch.Tensor) -> torch.Tensor:
    """Singular values ``(..., min(m, n))``, descending, of ``(..., m, n)`` in float64.

    From the eigenvalues of the smaller Gram matrix: batched ``eigvalsh`` of small matrices
    is far faster than batched ``svdvals`` on CPU, and in float64 the smallest singular values
    it resolves (about ``1e-8`` of the largest) are far below what the effective rank feels.
    """
    a = a.double()
    gram = a @ a.mT if a.shape[-2] <= a.shape[-1] else a.mT @ a
    return torch.linalg.eigvalsh(gram).clamp_min(0).sqrt().flip(-1)


def _erank_from_singular_values(s: torch.Tensor) -> torch.Tensor:
    p = s / s.sum(-1, keepdim=True)
    return torch.exp(-torch.xlogy(p, p).sum(-1))


def _erank_across_cells(a: torch.Tensor) -> float:
    """Effective rank of the column-centred ``(cells, features)`` matrix."""
    a = a.numpy().astype(np.float64)
    a -= a.mean(0)
    gram = a @ a.T if a.shape[1] > a.shape[0] else a.T @ a  # numpy's symmetric product
    with _small_linalg():
        eig = np.linalg.eigvalsh(gram)[::-1].copy()  # squared singular values
    s = torch.from_numpy(np.sqrt(np.clip(eig, 0, None)))
    return float(_erank_from_singular_values(s))


def effective_rank(
    model: nn.Module, x, *, library=None, batch_size: int = BATCH_SIZE
) -> pd.DataFrame:
    """Effective rank (:func:`matrix_effective_rank`) of every token layer and the latent.

    The token layers are the network's ``token_layers()`` (scViT: the stem and every stage;
    scPerceiver: the tokens after the cross-attention, every block, the decoder's tokens).
    Per cell: the ``(tokens, dim)`` matrix of the layer, as it is (not centred); how many
    independent directions one cell's tokens use. Across cells: the layer flattened per cell,
    centred over cells; how many directions the population of cells uses.

    Parameters
    ----------
    model, x, library, batch_size
        As in :func:`attention_entropy`.

    Returns
    -------
    pandas.DataFrame
        One row per layer in execution order (scViT: ``stem``, ``encoder.{i}``, ``latent``,
        ``decoder.{i}``): ``layer``, ``tokens``, ``dim``, ``per_cell`` (mean over cells),
        ``per_cell_max`` ``min(tokens, dim)``, ``across_cells``, ``across_cells_max``
        ``min(cells - 1, tokens x dim)``. ``latent`` has no tokens: its per-cell columns are
        NaN.
    """
    net = _eval_copy(model)
    x = _as_tensor(x)
    library = _library(library, len(x))
    wanted = {*net.token_layers(), "latent"}
    device = _device(net)
    names: list[str] = []
    shapes: dict[str, tuple[int, ...]] = {}
    per_cell: dict[str, list[torch.Tensor]] = {}
    flat: dict[str, list[torch.Tensor]] = {}
    with torch.no_grad():
        for sl in _slices(len(x), batch_size):
            record = net.forward_intermediates(x[sl].to(device), library=library[sl].to(device))
            if not names:  # execution order
                names = [name for name in record if name in wanted]
                missing = wanted.difference(names)
                if missing:
                    raise ValueError(f"forward_intermediates has no layer(s) {sorted(missing)}")
            for name in names:
                out = record[name].float()
                shapes[name] = tuple(out.shape[1:])
                if out.ndim == 3:
                    per_cell.setdefault(name, []).append(matrix_effective_rank(out).cpu())
                flat.setdefault(name, []).append(out.flatten(1).cpu())
    rows = []
    for name in names:
        a = torch.cat(flat.pop(name))
        if len(shapes[name]) == 2:
            tokens, dim = shapes[name]
            cell, cell_max = float(torch.cat(per_cell[name]).mean()), min(tokens, dim)
        else:
            tokens, dim, cell, cell_max = 1, shapes[name][0], math.nan, math.nan
        rows.append(
            {
                "layer": name,
                "tokens": tokens,
                "dim": dim,
                "per_cell": cell,
                "per_cell_max": cell_max,
                "across_cells": _erank_across_cells(a),
                "across_cells_max": min(len(a) - 1, a.shape[1]),
            }
        )
    return pd.DataFrame(rows)


# --------------------------------------------------------------------------------------------
# 6. what the conv stem spans
# --------------------------------------------------------------------------------------------


def _require_scvit_stem(model: nn.Module, what: str) -> None:
    """scViT's stem functions read ``model.stem`` and ``model.patchify``: refuse other nets."""
    if not (callable(getattr(model, "patchify", None)) and hasattr(model, "stem")):
        raise TypeError(
            f"{what} reads scViT's stem (model.stem, model.patchify); "
            f"{type(model).__name__} has none"
        )


def _stem_tokens(net: ScViT, x: torch.Tensor, batch_size: int) -> Iterator[torch.Tensor]:
    """Stem outputs ``(B, tokens, windows)`` in batches, float64 on the CPU."""
    device = _device(net)
    with torch.no_grad():
        for sl in _slices(len(x), batch_size):
            yield net.patchify(x[sl].to(device)).double().cpu()


def _cosine_matrices(tokens: torch.Tensor, *, centred: bool) -> torch.Tensor:
    """``(B, C, C)`` cosine similarity between the token rows of each cell."""
    if centred:
        tokens = tokens - tokens.mean(-1, keepdim=True)
    unit = tokens / tokens.norm(dim=-1, keepdim=True).clamp_min(1e-30)
    return unit @ unit.transpose(-1, -2)


def token_similarity(
    model: ScViT, x, *, centred: bool = False, batch_size: int = BATCH_SIZE
) -> pd.DataFrame:
    """Mean over cells of the ``tokens x tokens`` similarity of the stem's output tokens.

    Each token is one conv channel's response along the gene windows (a row of
    ``n_windows`` values). ``centred=False`` gives the cosine similarity of the rows,
    ``centred=True`` their Pearson correlation across windows. For a heatmap.

    Returns
    -------
    pandas.DataFrame
        ``(tokens, tokens)``, index and columns the token numbers.
    """
    _require_scvit_stem(model, "token_similarity")
    net = _eval_copy(model)
    x = _as_tensor(x)
    total = 0
    for tokens in _stem_tokens(net, x, batch_size):
        total = total + _cosine_matrices(tokens, centred=centred).sum(0)
    matrix = (total / len(x)).numpy()
    index = pd.RangeIndex(matrix.shape[0], name="token")
    return pd.DataFrame(matrix, index=index, columns=index.rename("token_b"))


def _spectrum_row(
    part: str, matrix: torch.Tensor, top_k: Sequence[int]
) -> tuple[dict, tuple[np.ndarray, np.ndarray]]:
    s = _singular_values(matrix)
    energy = s**2 / (s**2).sum()
    row = {
        "part": part,
        "shape": "x".join(str(d) for d in matrix.shape),
        "effective_rank": float(_erank_from_singular_values(s)),
        "max_rank": min(matrix.shape),
        **{f"top{k}_share": float(energy[:k].sum()) for k in top_k},
        "condition": float(s[0] / s[-1]) if s[-1] > 0 else math.inf,
    }
    return row, (s.numpy(), energy.numpy())


def stem_span(
    model: ScViT, x, *, top_k: Sequence[int] = (1, 2, 5), batch_size: int = BATCH_SIZE
) -> pd.DataFrame:
    """What the conv stem's tokens span: its weights' spectra and its output tokens.

    The stem is ``Conv1d(1, C, k, stride=k) -> BatchNorm -> SELU [-> k=5 convs] -> 1x1 conv``:
    token ``t`` at window ``w`` is ``sum_c W2[t, c] SELU(bn_c(W1[c] . window_w)) + b2[t]``, the
    same ``C``-channel feature map applied to every window. Tokens are conv channels, each
    spanning all windows, so they differ only through the rows of the ``C x C`` mixing ``W2``
    and can be no more diverse than the ``C`` responses behind them. The rows:

    * ``stem.<path> weight``: each conv's weight as ``(out channels, in channels x kernel)``;
    * ``... weight x BN``: the first conv with its BatchNorm folded in (evaluation mode:
      ``diag(gamma / sqrt(var + eps)) W1``), the affine map before the SELU;
    * ``stem linearised`` (no extra convs only): ``lambda W2 diag(bn scale) W1``, the whole
      stem's ``(C, k)`` map from a window to the ``C`` tokens with the SELU replaced by its
      slope ``lambda = 1.0507`` on positive inputs (exact for windows whose pre-activations are
      all positive; the stem itself is not linear);
    * ``tokens``: the stem's output of each cell, ``(C tokens, windows)``, centred across
      tokens (what PCA of the tokens sees); effective rank and shares of variance in the top
      principal components are averaged over cells, as are the mean off-diagonal
      ``|cosine|`` (raw rows) and ``|correlation|`` (rows centred across windows) between
      tokens. The similarity matrices themselves: :func:`token_similarity`.

    Without the conv stem (``conv_stem=False``) only the ``tokens`` row is computed.

    Parameters
    ----------
    model, x, batch_size
        As in :func:`attention_entropy`.
    top_k
        Numbers of leading components whose share of the squared singular values (variance,
        for the tokens) is reported.

    Returns
    -------
    pandas.DataFrame
        One row per part: ``part``, ``shape``, ``effective_rank`` (Roy and Vetterli),
        ``max_rank``, ``top{k}_share``, ``condition`` (largest over smallest singular value),
        ``mean_abs_cosine`` and ``mean_abs_correlation`` (tokens row only). The spectra
        behind the shares: :func:`stem_spectra`.
    """
    _require_scvit_stem(model, "stem_span")
    rows, _ = _stem_analysis(_eval_copy(model), _as_tensor(x), top_k, batch_size)
    return pd.DataFrame(rows)


def stem_spectra(model: ScViT, x, *, batch_size: int = BATCH_SIZE) -> pd.DataFrame:
    """The spectra summarised by :func:`stem_span`, one row per part and component.

    Returns
    -------
    pandas.DataFrame
        ``part`` (as in :func:`stem_span`), ``component`` (0-based, largest first),
        ``singular_value`` (NaN for ``tokens``: each cell has its own), ``share`` (of the
        squared singular values; for ``tokens`` the mean over cells of each principal
        component's share of the variance across tokens).
    """
    _require_scvit_stem(model, "stem_spectra")
    _, spectra = _stem_analysis(_eval_copy(model), _as_tensor(x), (), batch_size)
    frames = []
    for part, (values, share) in spectra.items():
        frames.append(
            pd.DataFrame(
                {
                    "part": part,
                    "component": np.arange(len(share)),
                    "singular_value": values,
                    "share": share,
                }
            )
        )
    return pd.concat(frames, ignore_index=True)


def _stem_analysis(
    net: ScViT, x: torch.Tensor, top_k: Sequence[int], batch_size: int
) -> tuple[list[dict], dict[str, tuple[np.ndarray, np.ndarray]]]:
    """:func:`stem_span`'s rows and each part's (singular values, shares)."""
    rows, spectra = [], {}
    modules = dict(net.stem.named_modules())
    convs = [(n, m) for n, m in modules.items() if isinstance(m, nn.Conv1d)]
    first_scale = None
    for name, conv in convs:
        weight = conv.weight.detach().cpu().double().reshape(conv.out_channels, -1)
        row, spectra[f"stem.{name} weight"] = _spectrum_row(f"stem.{name} weight", weight, top_k)
        rows.append(row)
        # torchvision's ConvNormActivation: [conv, norm, activation] as .0, .1, .2
        norm = modules.get(re.sub(r"0$", "1", name)) if name.endswith(".0") else None
        if isinstance(norm, nn.BatchNorm1d):
            scale = norm.weight.detach().cpu().double() / torch.sqrt(
                norm.running_var.detach().cpu().double() + norm.eps
            )
            part = f"stem.{name} weight x BN"
            row, spectra[part] = _spectrum_row(part, scale[:, None] * weight, top_k)
            rows.append(row)
            if first_scale is None:
                first_scale = scale[:, None] * weight
    if net.config.conv_stem and net.config.extra_convs == 0 and len(convs) == 2:
        mixing = convs[1][1].weight.detach().cpu().double().reshape(convs[1][1].out_channels, -1)
        selu_slope = 1.0507009873554805
        row, spectra["stem linearised"] = _spectrum_row(
            "stem linearised", selu_slope * mixing @ first_scale, top_k
        )
        rows.append(row)

    share_sum, erank_sum, cos_sum, corr_sum = 0, 0.0, 0.0, 0.0
    for tokens in _stem_tokens(net, x, batch_size):
        c = tokens.shape[1]
        off = ~torch.eye(c, dtype=torch.bool)
        cos_sum += float(_cosine_matrices(tokens, centred=False).abs()[:, off].mean(1).sum())
        corr_sum += float(_cosine_matrices(tokens, centred=True).abs()[:, off].mean(1).sum())
        centred = tokens - tokens.mean(1, keepdim=True)  # centred across tokens
        s = _singular_values(centred)  # (B, min(C, windows))
        erank_sum += float(_erank_from_singular_values(s).sum())
        share_sum = share_sum + (s**2 / (s**2).sum(-1, keepdim=True)).sum(0)
    share = (share_sum / len(x)).numpy()
    spectra["tokens"] = (np.full(len(share), np.nan), share)
    c, windows = net.config.n_tokens, net.config.token_length
    rows.append(
        {
            "part": "tokens",
            "shape": f"{c}x{windows}",
            "effective_rank": erank_sum / len(x),
            "max_rank": min(c - 1, windows),
            **{f"top{k}_share": float(share[:k].sum()) for k in top_k},
            "condition": math.nan,
            "mean_abs_cosine": cos_sum / len(x),
            "mean_abs_correlation": corr_sum / len(x),
        }
    )
    return rows, spectra


# --------------------------------------------------------------------------------------------
# 7. which output token produces which gene
# --------------------------------------------------------------------------------------------


def decoder_gene_tokens(model: ScViT) -> pd.DataFrame:
    """Map each gene's mean, dispersion and gate parameters to the output token producing it.

    Structural, read from the model itself: a tensor of flat positions ``(1, C, 3 L)`` (the
    output layer's shape, ``L = config.head_length``) goes through ``model.split_head``, so
    each gene's three raw parameters come out as the positions they were cut from; the token
    is ``position // 3 L``. No weights are involved.

    Returns
    -------
    pandas.DataFrame
        One row per gene (model order): ``gene`` (index), ``mean_token``, ``theta_token``,
        ``gate_token`` (the gate part exists in the output layer for every likelihood, unused
        by ``"nb"``), ``n_tokens`` (distinct tokens among the three), ``block_token``
        (``gene // L``: the token that reads the gene in the gene-block layout, i.e. the stem
        ablation ``conv_stem=False``, whose tokens are ``L`` consecutive genes; with the conv
        stem every token reads every gene, so no token "contains" it) and ``from_block_token``
        (all three parameters come from ``block_token``).
    """
    if not callable(getattr(model, "split_head", None)):
        raise TypeError(
            f"decoder_gene_tokens reads scViT's output head (model.split_head); "
            f"{type(model).__name__} has none"
        )
    c, three_l = model.config.n_tokens, 3 * model.config.head_length
    positions = torch.arange(c * three_l).reshape(1, c, three_l)  # (1, C, 3L)
    parts = [p.reshape(-1).numpy() for p in model.split_head(positions)]  # 3 x (genes,)
    tokens = np.stack([p // three_l for p in parts], axis=1)  # (genes, 3)
    genes = np.arange(model.config.n_genes)
    block = genes // model.config.head_length
    frame = pd.DataFrame(
        {
            "mean_token": tokens[:, 0],
            "theta_token": tokens[:, 1],
            "gate_token": tokens[:, 2],
            "n_tokens": [len(set(row)) for row in tokens.tolist()],
            "block_token": block,
            "from_block_token": (tokens == block[:, None]).all(1),
        },
        index=pd.Index(genes, name="gene"),
    )
    return frame


def gene_token_summary(frame: pd.DataFrame) -> pd.DataFrame:
    """Counts of genes by how many output tokens produce their three parameters.

    Parameters
    ----------
    frame
        :func:`decoder_gene_tokens`'s result.

    Returns
    -------
    pandas.DataFrame
        Rows ``"1 token"``, ``"2 tokens"``, ``"3 tokens"``, ``"mean from block token"``,
        ``"all from block token"``; columns ``quantity``, ``n_genes``, ``share``.
    """
    n = len(frame)
    counts = frame["n_tokens"].value_counts()
    rows = [(f"{k} token{'s' if k > 1 else ''}", int(counts.get(k, 0))) for k in (1, 2, 3)]
    rows.append(("mean from block token", int((frame["mean_token"] == frame["block_token"]).sum())))
    rows.append(("all from block token", int(frame["from_block_token"].sum())))
    out = pd.DataFrame(rows, columns=["quantity", "n_genes"])
    out["share"] = out["n_genes"] / max(n, 1)
    return out


# --------------------------------------------------------------------------------------------
# 8. linear probes per layer
# --------------------------------------------------------------------------------------------


def _pca_scores(train: np.ndarray, test: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """Probe features: standardised with the train cells' statistics, projected on their
    top-``k`` principal components, then scaled by one number so the mean variance is 1.

    The last scaling is isotropic (it keeps the PCA geometry, unlike standardising each
    component, which would blow near-zero-variance components up to unit variance) and only
    conditions the logistic regression.
    """
    mean, std = train.mean(0), train.std(0)
    std = np.where(std > 0, std, 1.0)
    train, test = (train - mean) / std, (test - mean) / std
    if train.shape[1] > k:
        if train.shape[1] > train.shape[0]:  # through the (cells x cells) Gram: cheaper
            gram = (train @ train.T).astype(np.float64)
            with _small_linalg():
                eig, u = np.linalg.eigh(gram)
            eig, u = eig[::-1][:k], u[:, ::-1][:, :k]
            keep = eig > eig[0] * 1e-10  # numerically zero components carry nothing
            components = train.T @ (u[:, keep] / np.sqrt(eig[keep])).astype(train.dtype)
        else:
            with _small_linalg():
                _, _, vh = np.linalg.svd(train, full_matrices=False)
            components = vh[:k].T
        train, test = train @ components, test @ components  # (cells, k)
    scale = np.sqrt((train**2).mean())
    scale = scale if scale > 0 else 1.0
    return train / scale, test / scale


def layer_probes(
    model: nn.Module,
    x,
    labels,
    split,
    *,
    max_features: int = 256,
    seed: int = 0,
    library=None,
    layers: Sequence[str] | None = None,
    batch_size: int = BATCH_SIZE,
) -> pd.DataFrame:
    """A linear probe of the labels on the input and on every layer's output.

    For each layer (flattened per cell): features standardised with the train cells'
    statistics, projected on the train cells' top ``max_features`` principal components
    (when there are more features; fitted through the cells x cells Gram matrix), scaled by
    one number to unit mean variance, and a logistic regression
    (scikit-learn's defaults, ``max_iter=1000``) fitted on the train cells; accuracy and
    macro-F1 on the test cells. Run it on a trained and an untrained network to see where
    training adds or loses linearly readable information.

    Parameters
    ----------
    model
        The network (not modified).
    x
        Inputs ``(cells, genes)``.
    labels, split
        ``(cells,)`` labels and split values (``"train"``, ``"test"``, others ignored).
    max_features
        Principal components kept per layer (fewer when there are fewer train cells).
    seed
        The logistic regression's ``random_state``.
    library
        Total counts per cell (only the ``mean`` layer of ``library_scaling`` models uses it).
    layers
        Layer names (default: all of the network's ``forward_intermediates``, each tensor
        once: scViT's ``latent`` stands for the last bottleneck layer); ``"input"`` is always
        probed first.
    batch_size
        Cells per forward pass.

    Returns
    -------
    pandas.DataFrame
        One row per layer in execution order: ``layer``, ``n_features``, ``n_components``,
        ``accuracy``, ``macro_f1``.
    """
    from sklearn.linear_model import LogisticRegression
    from sklearn.metrics import accuracy_score, f1_score

    x = _as_tensor(x)
    library = _library(library, len(x))
    labels = np.asarray(labels).astype(str)
    train, test = _rows(split, "train", len(x)), _rows(split, "test", len(x))
    if split is None or not len(train) or not len(test):
        raise ValueError("layer_probes needs train and test cells in split")
    net = _eval_copy(model)
    names = list(layers) if layers is not None else _layer_names(net, x, library)
    collected = _collect(net, x, names, library=library, batch_size=batch_size)
    collected = {"input": x, **collected}
    k = max(1, min(max_features, len(train) - 1))
    rows = []
    for name in list(collected):
        a = collected.pop(name).numpy()
        tr, te = _pca_scores(a[train], a[test], k)
        with _small_linalg():
            probe = LogisticRegression(max_iter=1000, random_state=seed)
            pred = probe.fit(tr, labels[train]).predict(te)
        rows.append(
            {
                "layer": name,
                "n_features": a.shape[1],
                "n_components": tr.shape[1],
                "accuracy": float(accuracy_score(labels[test], pred)),
                "macro_f1": float(f1_score(labels[test], pred, average="macro", zero_division=0)),
            }
        )
    return pd.DataFrame(rows)


# --------------------------------------------------------------------------------------------
# 9. likelihood beyond the null models
# --------------------------------------------------------------------------------------------


def likelihood_beyond_null(
    model: nn.Module, x, counts, split, *, library=None, batch_size: int = BATCH_SIZE
) -> pd.DataFrame:
    """Test NLL of the model against the per-gene negative-binomial null models.

    The nulls are :func:`scvit_core.baselines.fit_null_nb` fitted on the train cells' counts:
    a constant mean per gene, and the mean scaled by each cell's library size. A decoder
    that uses its latent at all should beat the constant null; the library-scaled null
    already knows each cell's depth, which the model must infer from its input.

    Sign convention: ``gain`` is *null NLL minus this row's NLL*, so positive is better than
    the null; ``gap_closed`` is ``(NLL_constant - NLL) / (NLL_constant - NLL_library)``: 0 at
    the constant null, 1 at the library-scaled null, above 1 beyond it, negative when worse
    than the constant null.

    Parameters
    ----------
    model
        The network (not modified).
    x
        Inputs ``(cells, genes)``.
    counts
        Raw counts ``(cells, genes)``.
    split
        ``(cells,)`` split values; nulls are fitted on ``"train"``, everything is scored on
        ``"test"``.
    library
        Total counts per cell for the model (default ``counts.sum(1)``, as in training).
    batch_size
        Cells per forward pass.

    Returns
    -------
    pandas.DataFrame
        Rows ``null_constant``, ``null_library``, ``model``; columns ``nll`` (mean per test
        cell, summed over genes), ``nll_per_gene`` (``nll / genes``, nats), ``gain_vs_constant``
        and ``gain_vs_library`` (nats per cell), ``gain_vs_constant_per_gene`` and
        ``gain_vs_library_per_gene`` (nats per cell per gene), ``gap_closed``.
    """
    from scvit_core.baselines import fit_null_nb

    x, counts = _as_tensor(x), _as_tensor(counts)
    library = counts.sum(1) if library is None else _library(library, len(x))
    train, test = _rows(split, "train", len(x)), _rows(split, "test", len(x))
    if split is None or not len(train) or not len(test):
        raise ValueError("likelihood_beyond_null needs train and test cells in split")
    counts_np = counts.numpy().astype(np.float64)
    values = {}
    for name, scaled in (("null_constant", False), ("null_library", True)):
        null = fit_null_nb(counts_np[train], library_scaled=scaled)
        values[name] = float(null.nll(counts_np[test]).mean())
    net = _eval_copy(model)
    z = _encode(net, x, test, batch_size)
    values["model"] = float(_decode_nll(net, z, counts[test], library[test], batch_size).mean())
    n_genes = counts.shape[1]
    constant, scaled = values["null_constant"], values["null_library"]
    rows = []
    for name, value in values.items():
        rows.append(
            {
                "model": name,
                "nll": value,
                "nll_per_gene": value / n_genes,
                "gain_vs_constant": constant - value,
                "gain_vs_library": scaled - value,
                "gain_vs_constant_per_gene": (constant - value) / n_genes,
                "gain_vs_library_per_gene": (scaled - value) / n_genes,
                "gap_closed": (constant - value) / (constant - scaled)
                if constant != scaled
                else math.nan,
            }
        )
    return pd.DataFrame(rows)


def amortisation_gap(
    model: nn.Module,
    x,
    counts,
    split=None,
    *,
    library=None,
    steps: int = 200,
    lr: float = 0.05,
    batch_size: int = BATCH_SIZE,
) -> pd.DataFrame:
    """How much of the test NLL a better encoder could still remove, for this decoder.

    Each test cell is decoded twice under the frozen decoder: from the encoder's latent (the
    posterior mean, as the reported test NLL) and from the latent that minimises that cell's
    own NLL, found by Adam started at the encoder's latent (no prior term: the best any
    encoder, amortised or not, could give this decoder). The difference is the amortisation
    gap; what remains is the decoder's: no encoder, of any architecture, brings this
    decoder's test NLL below ``nll_optimal``. A local search, so ``nll_optimal`` is an upper
    bound of that floor and the gap a lower bound. Each cell keeps the best latent seen
    along its path, so ``nll_optimal <= nll_encoder`` cell by cell.

    Parameters
    ----------
    model
        The network (not modified).
    x
        Inputs ``(cells, genes)``.
    counts
        Raw counts ``(cells, genes)``.
    split
        ``(cells,)`` split values; only the ``"test"`` cells are scored (None: every cell).
    library
        Total counts per cell for the model (default ``counts.sum(1)``, as in training).
    steps, lr
        Adam steps and learning rate of the search in latent space (cells are independent:
        the result does not depend on the batching).
    batch_size
        Cells per search.

    Returns
    -------
    pandas.DataFrame
        One row: ``cells``; ``nll_encoder`` and ``nll_optimal`` (mean per cell, summed over
        genes); ``gap`` (their difference, nats per cell) and ``gap_relative`` (``gap /
        nll_encoder``); ``latent_shift`` (mean ``||z* - z|| / ||z||``: how far the best
        latent lies from the encoder's).
    """
    x, counts = _as_tensor(x), _as_tensor(counts)
    library = counts.sum(1) if library is None else _library(library, len(x))
    rows = np.arange(len(x)) if split is None else _rows(split, "test", len(x))
    if not len(rows):
        raise ValueError("amortisation_gap needs test cells in split (or split=None)")
    if steps < 1 or lr <= 0:
        raise ValueError(f"steps must be >= 1 and lr > 0, got steps={steps}, lr={lr}")
    net = _eval_copy(model)
    for parameter in net.parameters():
        parameter.requires_grad_(False)
    device = _device(net)
    z0 = _encode(net, x, rows, batch_size)
    before, after, shift = [], [], []
    for sl in _slices(len(rows), batch_size):
        cells = rows[sl]
        target, lib = counts[cells].to(device), library[cells].to(device)
        start = z0[sl].to(device)
        z = start.clone().requires_grad_(True)
        optimiser = torch.optim.Adam([z], lr=lr)
        best, best_z = None, start.clone()
        for step in range(steps + 1):  # the last pass only scores the last step
            params = AutoencoderOutput(z, *net.decode(z, library=lib))
            loss = nll(params, target, likelihood=net.config.likelihood)  # (B,)
            with torch.no_grad():
                if best is None:
                    best = loss.detach().clone()
                    before.append(best.double().cpu().numpy())
                better = loss < best
                best = torch.where(better, loss, best)
                best_z[better] = z[better]
            if step == steps or not loss.requires_grad:  # done, or a decoder that ignores z
                break
            optimiser.zero_grad()
            loss.sum().backward()
            optimiser.step()
        after.append(best.double().cpu().numpy())
        shift.append(((best_z - start).norm(dim=1) / start.norm(dim=1).clamp_min(1e-12)).cpu())
    nll_encoder = float(np.concatenate(before).mean())
    nll_optimal = float(np.concatenate(after).mean())
    return pd.DataFrame(
        [
            {
                "cells": len(rows),
                "nll_encoder": nll_encoder,
                "nll_optimal": nll_optimal,
                "gap": nll_encoder - nll_optimal,
                "gap_relative": (nll_encoder - nll_optimal) / nll_encoder,
                "latent_shift": float(torch.cat(shift).mean()),
            }
        ]
    )


# --------------------------------------------------------------------------------------------
# 10. gradient-norm share per block
# --------------------------------------------------------------------------------------------

GRAD_LEVELS = ("group", "block", "stage", "component")


def _grad_block(group: str, n_stages: int, level: str) -> str:
    """Name of the block that owns a parameter group (see :func:`grad_norm_share`)."""
    if level == "group":
        return group
    parts = group.split(".")
    top = parts[0]
    if top in ("encoder", "decoder") and len(parts) >= 3 and parts[1].isdigit():
        index = int(parts[1])
        if top == "decoder":  # module list index -> the encoder stage it mirrors
            index = n_stages - 1 - index
        kind = "norm" if parts[2].startswith("norm") else parts[2]
        if level == "stage":
            return f"{top}.{index}"
        if level == "component":
            return kind
        return f"{top}.{index}.{kind}"
    named = {"stem": "stem", "bottleneck": "bottleneck", "decoder_dense": "decoder.dense"}
    name = named.get(top, group)
    if level == "component":
        return {"bottleneck": "dense", "decoder.dense": "dense"}.get(name, name)
    return name


def grad_norm_share(
    frame: pd.DataFrame, *, level: str = "block", n_stages: int | None = None
) -> pd.DataFrame:
    """Aggregate recorded gradient norms to blocks and give each block's share per step.

    The rows come from training with ``TrainConfig(grad_norm_every=n)``
    (:attr:`scvit_core.train.TrainResult.grad_norms`): one L2 norm per parameter group (the
    parameters owned by one module, e.g. ``encoder.0.attention`` and
    ``encoder.0.attention.out_proj``). A block's norm is ``sqrt(sum of its groups' squared
    norms)`` and its share is its *squared* norm over the step's total squared norm, so the
    shares of a step sum to 1.

    Parameters
    ----------
    frame
        Columns ``step``, ``epoch``, ``group``, ``grad_norm``.
    level
        ``"group"`` (as recorded), ``"block"`` (``stem``, ``encoder.{i}.{linear,norm,
        attention}``, ``bottleneck``, ``decoder.dense``, ``decoder.{i}.{attention,linear,
        norm}``, ``head``), ``"stage"`` (``stem``, ``encoder.{i}``, ``bottleneck``,
        ``decoder.dense``, ``decoder.{i}``, ``head``) or ``"component"`` (``stem``,
        ``linear``, ``norm``, ``attention``, ``dense``, ``head``). Decoder stages are named by
        the encoder stage they mirror, as in :meth:`ScViT.forward_intermediates` (the
        module list ``decoder.0`` runs first and mirrors the last stage).
    n_stages
        Number of encoder stages (default: inferred from the ``encoder.{i}`` groups).

    Returns
    -------
    pandas.DataFrame
        ``step``, ``epoch``, ``block``, ``grad_norm``, ``share``; blocks in order of first
        appearance.
    """
    if level not in GRAD_LEVELS:
        raise ValueError(f"level must be one of {GRAD_LEVELS}, got {level!r}")
    if n_stages is None:
        found = [int(m.group(1)) for g in frame["group"] if (m := re.match(r"encoder\.(\d+)\.", g))]
        n_stages = max(found) + 1 if found else 0
    blocks = [_grad_block(g, n_stages, level) for g in frame["group"]]
    work = frame.assign(block=blocks, square=frame["grad_norm"].astype(float) ** 2)
    order = list(dict.fromkeys(blocks))
    out = work.groupby(["step", "epoch", "block"], sort=False, as_index=False)["square"].sum()
    total = out.groupby("step")["square"].transform("sum")
    out["grad_norm"] = np.sqrt(out["square"])
    out["share"] = out["square"] / total.where(total > 0)
    out["block"] = pd.Categorical(out["block"], categories=order)
    out = out.sort_values(["step", "block"], kind="stable").reset_index(drop=True)
    out["block"] = out["block"].astype(str)
    return out[["step", "epoch", "block", "grad_norm", "share"]]
