"""Per-layer attributions with shap and Captum, each with its own sanity figure.

One entry point, :func:`attribute`, runs any of six methods on any layer of a *target model*:
a small ``nn.Module`` mapping a batch of model inputs ``(cells, genes)`` to a 2-d output
``(cells, outputs)`` of which one column (``target``) is explained.

====================  ================================================  ==================
method                library call                                      sanity figure
====================  ================================================  ==================
deepshap              ``shap.DeepExplainer`` (DeepSHAP)                 additivity error
deeplift              Captum ``DeepLift`` / ``LayerDeepLift``           convergence delta
deepliftshap          Captum ``DeepLiftShap`` / ``LayerDeepLiftShap``   convergence delta
integrated_gradients  Captum ``IntegratedGradients`` / ``Layer...``     convergence delta
conductance           Captum ``LayerConductance`` (layer only)          convergence delta
internal_influence    Captum ``InternalInfluence`` (layer only)         not applicable
====================  ================================================  ==================

Every figure is ``error = sum(attributions) - (f(x) - f(reference))`` per cell (per cell and
background cell for ``deepliftshap``), where ``f(reference)`` is the mean over the background
for ``deepshap``; ``relative`` is ``mean |error| / mean |f(x) - f(reference)|``. The three
DeepLIFT-family methods are exact on the safe path (:func:`interpret.safe.attribution_safe`),
so their tolerance is float32 rounding; the path integrals (integrated gradients,
conductance) carry a quadrature error that shrinks with ``n_steps``
(:data:`INTEGRAL_TOLERANCE`). Internal influence integrates gradients without multiplying by
the change of the layer, so it has no completeness property to check.

All methods attribute the *same* tensor, the layer's output (through the
:class:`~interpret.safe.Probe` on it); ``layer=None`` attributes the input features (genes).

Targets: :class:`LatentTarget` (a latent dimension), :class:`MeanTarget` (decoded means of
some genes), :class:`ClassifierTarget` (a class logit of the report's MLP on the latent) and
:func:`scvi_encoder` (scVI's latent mean, for the same analysis of scVI).
"""

from __future__ import annotations

import copy
import itertools
import warnings
from collections.abc import Sequence
from contextlib import nullcontext
from dataclasses import dataclass, field
from typing import Any

import anndata as ad
import numpy as np
import pandas as pd
import torch
from scipy import stats
from torch import nn

from interpret.safe import (
    Log1p,
    attribution_fast,
    attribution_safe,
    branch_complement,
    deeplift_rules,
    probe,
    shap_passthrough,
)
from scvit_core.evaluate import ReportMLP

METHODS = (
    "deepshap",
    "deeplift",
    "deepliftshap",
    "integrated_gradients",
    "conductance",
    "internal_influence",
)
"""Names accepted by :func:`attribute`."""

EXACT_METHODS = ("deepshap", "deeplift", "deepliftshap")
LAYER_ONLY = ("conductance", "internal_influence")
BACKGROUND_METHODS = ("deepshap", "deepliftshap")

EXACT_TOLERANCE = 1e-3
"""Relative completeness error allowed for the DeepLIFT family on the safe path.

Exact in real arithmetic; float32 rounding in sums over thousands of units leaves relative
errors of about 1e-6 to 1e-5 (measured on the 4,000-gene preset, see the tests)."""

INTEGRAL_TOLERANCE = {"integrated_gradients": 0.10, "conductance": 0.20}
"""Relative completeness error allowed for the path methods at 32 steps.

Their error is the quadrature error of a path integral whose integrand (the gradient) jumps
wherever a SELU/ReLU/clamp changes branch, so it falls roughly as ``1 / n_steps``
(:func:`tolerance` scales these figures accordingly). Measured on the 4,000-gene preset
(random weights, Zeisel cells as log1p counts, zero reference, target latent dimension 0),
16 cells at 16 / 32 / 64 steps: integrated gradients 0.12 / 0.035 / 0.020 on the genes,
0.071 / 0.060 / 0.018 on ``stem``, 0.099 / 0.042 / 0.021 on ``encoder.0``; conductance (a left
Riemann-Stieltjes sum, first order) 0.19 / 0.093 / 0.059 on ``stem`` and 0.25 / 0.095 / 0.061
on ``encoder.0``. At 32 steps on other cell sets the worst figures were 0.061 (integrated
gradients, ``encoder.0``, 8 cells) and 0.12 (conductance, ``encoder.0.attention`` with its
skip branch, 8 cells). The limits are about 1.6 times those."""


def tolerance(method: str, n_steps: int = 32) -> float:
    """Relative completeness error allowed for ``method`` (NaN for internal influence)."""
    if method in EXACT_METHODS:
        return EXACT_TOLERANCE
    if method in INTEGRAL_TOLERANCE:
        return INTEGRAL_TOLERANCE[method] * 32 / max(n_steps, 1)
    if method == "internal_influence":
        return float("nan")
    raise ValueError(f"unknown method {method!r}; one of {METHODS}")


# --------------------------------------------------------------------------------------------
# targets
# --------------------------------------------------------------------------------------------


class LatentTarget(nn.Module):
    """A network's latent ``z = model.encode(x)`` ``(cells, n_latent)`` (scViT, scPerceiver's
    posterior mean); the target index is a latent dimension."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.model.encode(x)


class MeanTarget(nn.Module):
    """A network's decoded mean of ``genes`` ``(cells, len(genes))``: ``model.decode`` of
    ``model.encode(x)`` (scViT, scPerceiver at its posterior mean); the target indexes ``genes``.

    With ``library_scaling`` the decoder needs each cell's library size: pass it as
    ``additional_forward_args=(library,)`` to :func:`attribute`. It is held at the explained
    cell's value for the reference too, so attributions explain the effect of the expression
    profile at fixed depth.
    """

    def __init__(self, model: nn.Module, genes: Sequence[int]) -> None:
        super().__init__()
        self.model = model
        self.register_buffer("genes", torch.as_tensor(list(genes), dtype=torch.long))

    def forward(self, x: torch.Tensor, library: torch.Tensor | None = None) -> torch.Tensor:
        mean, _, _ = self.model.decode(self.model.encode(x), library=library)
        return mean[:, self.genes]


class ClassifierTarget(nn.Module):
    """Logits ``(cells, classes)`` of a trained classifier on a network's latent (or any
    encoder's).

    Parameters
    ----------
    model
        A network with an ``encode`` method (scViT, scPerceiver; it is used), or any encoder
        module mapping inputs to the latent (e.g. :func:`scvi_encoder`).
    mlp
        A trained :class:`~scvit_core.evaluate.ReportMLP` (from
        :func:`~scvit_core.evaluate.fit_report_mlp`) or any ``nn.Sequential``; a final
        ``LogSoftmax`` is dropped, so the explained quantity is a logit. ``target=None`` in
        :func:`attribute` explains each cell's predicted class.
    """

    def __init__(self, model: nn.Module, mlp: nn.Module) -> None:
        super().__init__()
        layers = list(mlp.layers if isinstance(mlp, ReportMLP) else mlp)
        if isinstance(layers[-1], nn.LogSoftmax):
            layers = layers[:-1]
        self.model = model
        self.classifier = nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        z = self.model.encode(x) if callable(getattr(self.model, "encode", None)) else self.model(x)
        return self.classifier(z)


class ScviEncoder(nn.Module):
    """scVI's encoder as a module: raw counts ``(cells, genes)`` -> latent mean ``(cells, d)``.

    What scvi-tools 1.4's ``VAE._regular_inference`` computes for ``qz.loc`` with one batch and
    no covariates: ``mean_encoder(encoder(log1p(counts)))`` (``log1p`` only with
    ``log_variational``). Shares its weights with the scVI model it was made from.
    """

    def __init__(self, module: nn.Module) -> None:
        super().__init__()
        z_encoder = module.z_encoder
        if getattr(z_encoder, "distribution", "normal") != "normal":
            raise NotImplementedError("only scVI's normal latent distribution is supported")
        if module.encode_covariates and (module.n_batch > 1 or module.n_continuous_cov > 0):
            raise NotImplementedError("scVI models that encode covariates are not supported")
        if getattr(z_encoder.encoder, "n_cov", 0) > 0:
            raise NotImplementedError("scVI encoders with covariate inputs are not supported")
        self.log1p = Log1p() if module.log_variational else nn.Identity()
        self.encoder = z_encoder.encoder
        self.mean_encoder = z_encoder.mean_encoder

    def forward(self, counts: torch.Tensor) -> torch.Tensor:
        return self.mean_encoder(self.encoder(self.log1p(counts)))


def scvi_encoder(scvi_model: Any) -> ScviEncoder:
    """scVI's latent mean as a target model (counts in, ``get_latent_representation`` out).

    Parameters
    ----------
    scvi_model
        A trained ``scvi.model.SCVI`` with one batch and no covariates.
    """
    return ScviEncoder(scvi_model.module)


class ScviAutoencoder(nn.Module):
    """scVI's encoder and decoder behind the interface the diagnostics read.

    ``encode(counts)`` is :class:`ScviEncoder` (the posterior mean); ``decode(z, library=)``
    gives ``(mean, theta, gate_logits)`` of scVI's generative model with the observed library
    size, as scvi-tools 1.4's ``VAE.generative`` with one batch: ``mean = library x px_scale``,
    ``theta = exp(px_r)`` (one per gene) and the zero-inflation logits. scVI's ZINB is this
    package's ``"corrected"`` likelihood (an NB of mean ``mean``, gate ``sigmoid(logits)``) and
    its NB the ``"nb"`` one, so :func:`interpret.diagnostics.likelihood_beyond_null` and
    :func:`~interpret.diagnostics.amortisation_gap` score scVI in the same units as the
    package's networks. The input is raw counts (``log1p`` inside, as scVI). Shares its
    weights with the scVI model it was made from.
    """

    def __init__(self, module: nn.Module) -> None:
        super().__init__()
        from types import SimpleNamespace

        likelihood = {"zinb": "corrected", "nb": "nb"}.get(module.gene_likelihood)
        if likelihood is None:
            raise NotImplementedError(
                f"scVI's {module.gene_likelihood!r} likelihood is not supported (zinb or nb)"
            )
        if module.dispersion != "gene":
            raise NotImplementedError(
                f"scVI's {module.dispersion!r} dispersion is not supported (gene only)"
            )
        self.encoder = ScviEncoder(module)
        self.decoder = module.decoder
        self.px_r = module.px_r
        self.config = SimpleNamespace(likelihood=likelihood, n_latent=module.n_latent)

    def encode(self, counts: torch.Tensor) -> torch.Tensor:
        return self.encoder(counts)

    def decode(
        self, z: torch.Tensor, *, library: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
        if library is None:
            raise ValueError("scVI decodes with the observed library size; pass library=")
        log_library = torch.log(library.reshape(-1, 1).to(z.dtype))
        batch = torch.zeros(len(z), 1, device=z.device)
        _, _, mean, gate = self.decoder("gene", z, log_library, batch)
        theta = torch.exp(self.px_r).expand_as(mean)
        return mean, theta, gate if self.config.likelihood == "corrected" else None


def scvi_autoencoder(scvi_model: Any) -> ScviAutoencoder:
    """scVI's encoder and decoder as one network for the diagnostics (counts in).

    Parameters
    ----------
    scvi_model
        A trained ``scvi.model.SCVI`` with one batch, no covariates, gene-wise dispersion and
        a ZINB or NB likelihood.
    """
    return ScviAutoencoder(scvi_model.module)


class _Selected(nn.Module):
    """One output column of a target model, its extra arguments bound to one cell (for shap,
    which explains every output column and passes no extra arguments)."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model
        self.index = 0
        self.args: tuple[torch.Tensor, ...] = ()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        args = tuple(a.expand(x.shape[0], *a.shape[1:]) for a in self.args)
        return self.model(x, *args)[:, self.index : self.index + 1]


# --------------------------------------------------------------------------------------------
# results
# --------------------------------------------------------------------------------------------


@dataclass
class Sanity:
    """A method's own check of its attributions.

    Attributes
    ----------
    name
        ``"additivity error"`` (shap), ``"convergence delta"`` (Captum) or
        ``"not applicable"``.
    values
        ``sum(attributions) - (f(x) - f(reference))`` per cell, or per cell and background cell
        ``(cells, background)`` for ``deepliftshap``; NaN when not applicable.
    gap
        ``f(x) - f(reference)``, the same shape as ``values``.
    relative
        ``mean |values| / mean |gap|``.
    tolerance
        The largest ``relative`` that passes.
    passed
        ``relative <= tolerance``; None when the method has no such property.
    note
        Why a figure is not applicable, or what the reference was.
    """

    name: str
    values: np.ndarray
    gap: np.ndarray
    relative: float
    tolerance: float
    passed: bool | None
    note: str = ""


@dataclass
class AttributionResult:
    """Attributions of one method to one layer for one target.

    Attributes
    ----------
    method, layer, target
        As passed to :func:`attribute` (``layer`` None: the input genes; ``target`` the
        explained output index per cell).
    attributions
        ``(cells, units)``: the layer's output flattened per cell.
    shape
        The layer's output shape per cell (``(tokens, dim)`` for scViT's stages).
    sanity
        The method's completeness check, :class:`Sanity`.
    cells
        Cell identifiers (row labels).
    safe
        Whether the attribution-safe copy was used.
    """

    method: str
    layer: str | None
    target: np.ndarray
    attributions: np.ndarray
    shape: tuple[int, ...]
    sanity: Sanity
    cells: np.ndarray
    safe: bool = True
    extra: dict = field(default_factory=dict)

    @property
    def layer_label(self) -> str:
        return "input" if self.layer is None else self.layer

    def to_frame(self) -> pd.DataFrame:
        """Tidy frame: ``layer, cell, unit, attribution`` (+ ``token, dim`` for 2-d layers)."""
        n_cells, n_units = self.attributions.shape
        frame = pd.DataFrame(
            {
                "layer": self.layer_label,
                "cell": np.repeat(self.cells, n_units),
                "unit": np.tile(np.arange(n_units), n_cells),
                "attribution": self.attributions.ravel(),
            }
        )
        if len(self.shape) == 2:
            token, dim = np.unravel_index(frame["unit"].to_numpy(), self.shape)
            frame["token"], frame["dim"] = token, dim
        frame.insert(0, "method", self.method)
        return frame

    def to_anndata(self, var_names: Sequence[str] | None = None) -> ad.AnnData:
        """Cells x units AnnData of the attributions (genes for input-level attributions).

        Parameters
        ----------
        var_names
            Names of the units (the model's genes when ``layer`` is None); default unit indices.
        """
        n_units = self.attributions.shape[1]
        names = [str(i) for i in range(n_units)] if var_names is None else list(var_names)
        if len(names) != n_units:
            raise ValueError(f"{len(names)} var_names for {n_units} units")
        obs = pd.DataFrame({"target": self.target}, index=[str(c) for c in self.cells])
        adata = ad.AnnData(
            X=self.attributions.astype(np.float32), obs=obs, var=pd.DataFrame(index=names)
        )
        s = self.sanity
        adata.uns["attribution"] = {
            "method": self.method,
            "layer": self.layer_label,
            "shape": list(self.shape),
            "safe": self.safe,
            "sanity": {
                "name": s.name,
                "relative": s.relative,
                "tolerance": s.tolerance,
                "passed": "n/a" if s.passed is None else bool(s.passed),
            },
        }
        return adata


# --------------------------------------------------------------------------------------------
# attribute
# --------------------------------------------------------------------------------------------


def prepare(target_model: nn.Module, *, safe: bool | None = None) -> nn.Module:
    """The copy :func:`attribute` works on: attribution-safe (default) or the fast path.

    Parameters
    ----------
    target_model
        A model, or a copy made here before (used as it is, so repeated :func:`attribute`
        calls skip the copy).
    safe
        True (default for a model): :func:`~interpret.safe.attribution_safe`; False: the
        model as it runs (:func:`~interpret.safe.attribution_fast`). For a copy, None accepts
        either kind and True/False must match it.
    """
    kind = getattr(target_model, "_attribution_copy", None)
    if kind is not None:
        if safe is not None and kind != ("safe" if safe else "fast"):
            raise ValueError(f"a {kind!r} copy was passed with safe={safe}")
        return target_model
    return attribution_fast(target_model) if safe is False else attribution_safe(target_model)


def attribute(
    target_model: nn.Module,
    x: torch.Tensor | np.ndarray,
    *,
    method: str,
    layer: str | None = None,
    target: int | Sequence[int] | None = 0,
    baselines: torch.Tensor | np.ndarray | None = None,
    n_steps: int = 32,
    additional_forward_args: tuple | None = None,
    internal_batch_size: int = 128,
    batch_size: int = 64,
    safe: bool | None = None,
    cell_ids: Sequence | None = None,
) -> AttributionResult:
    """Attribute one output of ``target_model`` to a layer's output (or the input genes).

    Parameters
    ----------
    target_model
        Maps ``(cells, features)`` (and ``additional_forward_args``) to ``(cells, outputs)``;
        e.g. :class:`LatentTarget`. Never modified: the method runs on a copy
        (:func:`prepare`), or on a copy passed in.
    x
        Cells to explain, ``(cells, features)``, in the model's input units.
    method
        One of :data:`METHODS`.
    layer
        A name from :func:`interpret.safe.layer_names`; None attributes the input features.
        ``conductance`` and ``internal_influence`` need a layer.
    target
        Output index explained: one for all cells, one per cell, or None for each cell's
        largest output (the predicted class of a :class:`ClassifierTarget`).
    baselines
        ``deepshap``/``deepliftshap``: a background sample ``(n, features)``, ``n >= 2``,
        required (e.g. training cells; cost grows linearly with ``n``). Other methods: a
        reference per cell ``(cells, features)`` or one for all ``(1, features)``; default all
        zeros (no expression).
    n_steps
        Steps of the path methods: Gauss-Legendre nodes for ``integrated_gradients`` and
        ``internal_influence``, ``n_steps + 1`` equally spaced points from the reference to the
        input for ``conductance`` (Captum's Gauss-Legendre default for conductance telescopes
        the layer's change between the first and last node, not between reference and input,
        so it misses part of the path). Tolerances scale as ``32 / n_steps``.
    additional_forward_args
        Extra per-cell tensors for the target model (scViT's library size with
        ``library_scaling``); each ``(cells, ...)``, held at the explained cell's value for its
        references.
    internal_batch_size
        Rows per forward pass of the path methods (``cells x n_steps`` rows in all).
    batch_size
        Cells per Captum call (``deepliftshap`` runs ``cells x background`` pairs at once and
        lowers it to keep about 2,048 rows per call).
    safe
        Use the attribution-safe copy (True, the default for a model) or the model as it is
        (False, the fast path, whose sanity figure shows the libraries' error); a copy from
        :func:`prepare` is used as it is.
    cell_ids
        Row labels of the result (default ``0 .. cells - 1``).

    Returns
    -------
    AttributionResult
        With its :class:`Sanity`. For a residual branch of scViT (``*.attention``,
        ``*.skip``), which is not a cut through the network, completeness holds for the two
        branches together: DeepLIFT-family methods and conductance are also run on the other
        branch (``extra["complement"]``, twice the cost) and the figure checks the sum;
        integrated gradients is checked against ``f(x) - f(x with the branch at its
        reference)``, its own completeness statement.
    """
    if method not in METHODS:
        raise ValueError(f"unknown method {method!r}; one of {METHODS}")
    if method in LAYER_ONLY and layer is None:
        raise ValueError(f"{method} attributes to a layer; pass layer=...")
    model = prepare(target_model, safe=safe)
    x = _as_tensor(x)
    _check_cells(x, "x")
    args = tuple(_as_tensor(a) for a in (additional_forward_args or ()))
    for i, a in enumerate(args):
        if a.shape[:1] != x.shape[:1]:
            raise ValueError(
                f"additional_forward_args[{i}] has {a.shape[0] if a.ndim else 0} rows, x has "
                f"{len(x)} cells; pass one row per cell"
            )
    refs = _references(method, x, baselines)
    targets = _resolve_targets(model, x, target, args)
    if layer is not None:
        _check_layer_runs(model, layer, x, args)
    options = dict(n_steps=n_steps, internal_batch_size=internal_batch_size, batch_size=batch_size)

    def run(name: str | None) -> tuple[np.ndarray, np.ndarray | None]:
        module = None if name is None else probe(model, name)
        return _attributions(model, module, method, x, refs, targets, args, **options)

    attrs, errors = run(layer)
    fx = _target_outputs(model, x, targets, args)
    if method in BACKGROUND_METHODS:
        gap = fx - _background_outputs(model, refs, targets, args).mean(1)
        note = f"reference: mean output over {len(refs)} background cells"
    else:
        gap = fx - _target_outputs(model, refs, targets, args)
        note = "reference: baselines"
    name = "convergence delta"
    if method == "deepshap":  # shap's additivity check, per cell against its own reference
        name, errors = "additivity error", attrs.reshape(len(x), -1).sum(1) - gap
    extra: dict = {}
    other = None if layer is None else branch_complement(model, layer)
    if other is not None and method != "internal_influence":
        if method == "integrated_gradients":
            gap = fx - _counterfactual_outputs(model, probe(model, layer), x, refs, targets, args)
            errors = attrs.reshape(len(x), -1).sum(1) - gap
            note = f"reference: f with {layer} alone at its reference value"
        else:
            other_attrs, _ = run(other)
            errors = errors + other_attrs.reshape(len(x), -1).sum(1)
            extra["complement"] = {"layer": other, "attributions": other_attrs}
            name = f"{name} of {layer} + {other}"
            note = f"{note}; {layer} is a residual branch, completeness holds with {other}"
    if method == "internal_influence":
        why = "internal influence integrates gradients only; it has no completeness property"
        nan = np.full(len(x), np.nan)
        sanity = Sanity("not applicable", nan, gap, float("nan"), float("nan"), None, why)
    else:
        sanity = _sanity(name, errors, gap, note)
        sanity.tolerance = tolerance(method, n_steps)
        sanity.passed = bool(sanity.relative <= sanity.tolerance)  # False if NaN
    return AttributionResult(
        method=method,
        layer=layer,
        target=targets,
        attributions=attrs.reshape(len(x), -1),
        shape=tuple(attrs.shape[1:]),
        sanity=sanity,
        cells=np.arange(len(x)) if cell_ids is None else np.asarray(cell_ids),
        safe=getattr(model, "_attribution_copy", None) == "safe",
        extra=extra,
    )


def _attributions(
    model, layer_module, method, x, refs, targets, args, *, n_steps, internal_batch_size,
    batch_size,
) -> tuple[np.ndarray, np.ndarray | None]:  # fmt: skip
    """Attributions ``(cells, *layer shape)`` and Captum's convergence delta per cell (None for
    shap, whose additivity error :func:`attribute` computes, and for internal influence)."""
    with warnings.catch_warnings():
        # Captum announces its hooks on every DeepLift call and notes inputs without
        # requires_grad: nothing to act on
        warnings.filterwarnings("ignore", message="Setting forward, backward hooks")
        warnings.filterwarnings("ignore", message="Input Tensor .* did not already require")
        if method == "deepshap":
            return _deepshap(model, layer_module, x, refs, targets, args), None
        return _captum(
            model, layer_module, method, x, refs, targets, args, n_steps=n_steps,
            internal_batch_size=internal_batch_size, batch_size=batch_size,
        )  # fmt: skip


def _as_tensor(a: torch.Tensor | np.ndarray) -> torch.Tensor:
    if isinstance(a, torch.Tensor):
        return a.detach().float()
    return torch.as_tensor(np.asarray(a, dtype=np.float32))


def _check_cells(a: torch.Tensor, name: str, *, features: int | None = None) -> None:
    """Raise ``ValueError`` unless ``a`` is a finite ``(cells >= 1, features)`` matrix."""
    if a.ndim != 2 or a.shape[0] == 0:
        raise ValueError(
            f"{name} must be (cells, features) with at least one cell, got shape {tuple(a.shape)}"
        )
    if features is not None and a.shape[1] != features:
        raise ValueError(f"{name} has {a.shape[1]} features per cell, x has {features}")
    n_bad = int((~torch.isfinite(a)).sum())
    if n_bad:
        raise ValueError(
            f"{name} holds {n_bad} NaN or infinite values; attributions need finite inputs "
            "(the model's input of raw counts: scvit_core.train.transform_input)"
        )


def _references(method: str, x: torch.Tensor, baselines) -> torch.Tensor:
    if method in BACKGROUND_METHODS:
        if baselines is None or len(baselines) < 2:
            raise ValueError(f"{method} needs a background sample: baselines=(n >= 2, features)")
        refs = _as_tensor(baselines)
        _check_cells(refs, "baselines", features=x.shape[1])
        return refs
    if baselines is None:
        return torch.zeros_like(x)
    refs = _as_tensor(baselines)
    _check_cells(refs, "baselines", features=x.shape[1])
    if refs.shape[0] not in (1, len(x)):
        raise ValueError(
            f"baselines has {refs.shape[0]} rows for {len(x)} cells; pass one reference for "
            "all cells (1, features) or one per cell (cells, features)"
        )
    return refs.expand_as(x).contiguous() if refs.shape[0] == 1 else refs


@torch.no_grad()
def _outputs(model: nn.Module, x: torch.Tensor, args: tuple, rows: int = 256) -> torch.Tensor:
    """``model(x, *args)`` in chunks, ``(cells, outputs)``."""
    parts = [
        model(x[i : i + rows], *(a[i : i + rows] for a in args)) for i in range(0, len(x), rows)
    ]
    return torch.cat(parts)


def _target_outputs(model, x, targets, args) -> np.ndarray:
    out = _outputs(model, x, args)  # (cells, outputs)
    return out[torch.arange(len(x)), torch.as_tensor(targets)].numpy()


def _check_layer_runs(model: nn.Module, layer: str, x: torch.Tensor, args: tuple) -> None:
    ran = []

    def seen(module: nn.Module, inputs: tuple, output: torch.Tensor) -> None:
        ran.append(True)

    handle = probe(model, layer).register_forward_hook(seen)
    try:
        _outputs(model, x[:1], tuple(a[:1] for a in args))
    finally:
        handle.remove()
    if not ran:
        raise ValueError(f"layer {layer!r} does not run when computing this target")


def _resolve_targets(model, x, target, args) -> np.ndarray:
    try:  # one cell first: an input the model cannot take fails here, with a clear message
        n_outputs = _outputs(model, x[:1], tuple(a[:1] for a in args)).shape[1]
    except RuntimeError as err:
        raise ValueError(
            f"the target model cannot take x of shape {tuple(x.shape)} ({err}); pass its "
            "inputs, (cells, genes) in the model's input units"
        ) from None
    if target is None:
        return _outputs(model, x, args).argmax(1).numpy()
    t = np.asarray(target, dtype=np.int64)
    t = np.full(len(x), int(t)) if t.ndim == 0 else t
    if t.shape != (len(x),) or t.min() < 0 or t.max() >= n_outputs:
        raise ValueError(
            f"target must be an output index in [0, {n_outputs}), one for all cells or one per "
            f"cell ({len(x)}), or None; got {target!r}"
        )
    return t


def _background_outputs(model, background, targets, args) -> np.ndarray:
    """``f(background_b)[target_i]`` with cell ``i``'s extra arguments: ``(cells, n)``."""
    if not args:
        out = _outputs(model, background, ())  # (n, outputs)
        return out[:, torch.as_tensor(targets)].T.numpy()
    rows = []
    for i, t in enumerate(targets):
        bound = tuple(a[i : i + 1].expand(len(background), *a.shape[1:]) for a in args)
        rows.append(_outputs(model, background, bound)[:, t].numpy())
    return np.stack(rows)


@torch.no_grad()
def _counterfactual_outputs(model, layer_probe, x, refs, targets, args) -> np.ndarray:
    """``f(x)`` with the probed layer's output replaced by its value at the reference."""
    captured = {}

    def capture(module: nn.Module, inputs: tuple, output: torch.Tensor) -> None:
        captured["ref"] = output

    handle = layer_probe.register_forward_hook(capture)
    try:
        _outputs(model, refs, args, rows=len(refs))
    finally:
        handle.remove()
    layer_probe.replacement = captured["ref"]
    try:
        return _target_outputs(model, x, targets, args)
    finally:
        layer_probe.replacement = None


def _sanity(name: str, errors: np.ndarray, gap: np.ndarray, note: str = "") -> Sanity:
    denominator = np.abs(gap).mean()
    relative = float(np.abs(errors).mean() / denominator) if denominator > 0 else float("nan")
    return Sanity(name, errors, gap, relative, float("nan"), None, note)


def _deepshap(model, layer_module, x, background, targets, args) -> np.ndarray:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # matplotlib deprecations raised by shap's import
        import shap

    selected = _Selected(model)
    selected.index = int(targets[0])
    selected.args = tuple(a[:1] for a in args)
    explained = selected if layer_module is None else (selected, layer_module)
    rows = []
    with deeplift_rules(model), shap_passthrough():
        explainer = shap.DeepExplainer(explained, background)
        for j in range(len(x)):
            selected.index = int(targets[j])
            selected.args = tuple(a[j : j + 1] for a in args)
            phi = explainer.shap_values(x[j : j + 1], check_additivity=False)  # see attribute
            rows.append(np.asarray(phi)[0, ..., 0])  # (1, *shape, 1 output)
    return np.stack(rows).astype(np.float32)


def _captum_method(method: str, model: nn.Module, layer_module: nn.Module | None):
    import captum.attr as ca

    if layer_module is None:
        classes = {
            "deeplift": ca.DeepLift,
            "deepliftshap": ca.DeepLiftShap,
            "integrated_gradients": ca.IntegratedGradients,
        }
        return classes[method](model)
    classes = {
        "deeplift": ca.LayerDeepLift,
        "deepliftshap": ca.LayerDeepLiftShap,
        "integrated_gradients": ca.LayerIntegratedGradients,
        "conductance": ca.LayerConductance,
        "internal_influence": ca.InternalInfluence,
    }
    return classes[method](model, layer_module)


def _captum(
    model, layer_module, method, x, refs, targets, args, *, n_steps, internal_batch_size,
    batch_size,
) -> tuple[np.ndarray, np.ndarray | None]:  # fmt: skip
    explainer = _captum_method(method, model, layer_module)
    exact = method in EXACT_METHODS
    kwargs: dict[str, Any] = {}
    if not exact:
        kwargs.update(n_steps=n_steps, internal_batch_size=internal_batch_size)
        # conductance telescopes the layer's change between consecutive points: they must
        # start at the reference and end at the input
        kwargs["method"] = "riemann_trapezoid" if method == "conductance" else "gausslegendre"
    if method != "internal_influence":
        kwargs["return_convergence_delta"] = True
    if method == "deepliftshap":  # cells x background pairs run in one batch
        batch_size = max(1, min(batch_size, 2048 // len(refs)))
    attrs, deltas = [], []
    for start in range(0, len(x), batch_size):
        rows = slice(start, start + batch_size)
        chunk_args = tuple(a[rows] for a in args)
        with deeplift_rules(model) if exact else nullcontext():
            out = explainer.attribute(
                x[rows],
                baselines=refs if method == "deepliftshap" else refs[rows],
                target=targets[rows].tolist(),
                additional_forward_args=chunk_args or None,
                **kwargs,
            )
        if method == "internal_influence":
            attrs.append(out.detach())
        else:
            attrs.append(out[0].detach())
            # DeepLiftShap: one delta per (cell, background cell); its attributions are the
            # mean over the background, so the cell's error is the mean delta
            deltas.append(out[1].detach().reshape(len(x[rows]), -1).mean(1))
    attributions = torch.cat(attrs).numpy()
    return attributions, (torch.cat(deltas).numpy() if deltas else None)


# --------------------------------------------------------------------------------------------
# comparisons
# --------------------------------------------------------------------------------------------


def _rowwise_spearman(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Spearman correlation of each row of ``a`` with the same row of ``b`` (NaN if constant)."""
    ra = stats.rankdata(a, axis=1)
    rb = stats.rankdata(b, axis=1)
    ra -= ra.mean(1, keepdims=True)
    rb -= rb.mean(1, keepdims=True)
    norm = np.sqrt((ra**2).sum(1) * (rb**2).sum(1))
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(norm > 0, (ra * rb).sum(1) / np.where(norm > 0, norm, 1), np.nan)


def _spearman(a: np.ndarray, b: np.ndarray) -> float:
    return float(_rowwise_spearman(a[None], b[None])[0])


def rank_agreement(a: np.ndarray, b: np.ndarray) -> tuple[float, float]:
    """Mean per-cell Spearman correlation of two ``(cells, units)`` attribution arrays, and
    the Spearman correlation of their mean ``|attribution|`` per unit."""
    per_cell = float(np.nanmean(_rowwise_spearman(a, b)))
    return per_cell, _spearman(np.abs(a).mean(0), np.abs(b).mean(0))


def method_agreement(results: Sequence[AttributionResult]) -> pd.DataFrame:
    """Rank agreement between methods attributing the same layer and target.

    Parameters
    ----------
    results
        Attributions of the same cells, e.g. every method on one layer.

    Returns
    -------
    pandas.DataFrame
        One row per pair of methods per (layer, target): ``layer``, ``target``, ``method_a``,
        ``method_b``, ``spearman_cells`` (Spearman correlation of the two attribution vectors
        within a cell, averaged over cells) and ``spearman_units`` (Spearman correlation of
        mean ``|attribution|`` per unit), both in ``[-1, 1]``.
    """
    groups: dict[tuple, list[AttributionResult]] = {}
    for r in results:
        groups.setdefault((r.layer_label, tuple(r.target.tolist())), []).append(r)
    rows = []
    for (layer, target), members in groups.items():
        shown = target[0] if len(set(target)) == 1 else "per cell"
        for a, b in itertools.combinations(members, 2):
            if a.attributions.shape != b.attributions.shape:
                raise ValueError(f"{a.method} and {b.method} on {layer} cover different cells")
            cells, units = rank_agreement(a.attributions, b.attributions)
            rows.append(
                dict(
                    layer=layer,
                    target=shown,
                    method_a=a.method,
                    method_b=b.method,
                    spearman_cells=cells,
                    spearman_units=units,
                )
            )
    columns = ["layer", "target", "method_a", "method_b", "spearman_cells", "spearman_units"]
    return pd.DataFrame(rows, columns=columns)


def parameter_blocks(model: nn.Module, x: torch.Tensor, args: tuple = ()) -> list[str]:
    """Paths of the model's parameter blocks in the order a forward pass first runs them.

    A block is an element of an ``nn.Sequential``/``nn.ModuleList`` or a module without such
    containers below it (scViT: stem convolutions, stages, dense blocks, head); modules with
    containers inside are opened.
    """
    containers = (nn.Sequential, nn.ModuleList)
    blocks: list[str] = []

    def has_parameters(m: nn.Module) -> bool:
        return next(m.parameters(), None) is not None

    def visit(module: nn.Module, prefix: str) -> None:
        for name, child in module.named_children():
            path = f"{prefix}{name}"
            if not has_parameters(child):
                continue
            if isinstance(child, containers):
                blocks.extend(f"{path}.{n}" for n, c in child.named_children() if has_parameters(c))
            elif any(isinstance(m, containers) for m in child.modules()):
                visit(child, f"{path}.")
            else:
                blocks.append(path)

    visit(model, "")
    order: dict[str, int] = {}

    def record(path: str):
        def hook(module: nn.Module, args: tuple, output: Any) -> None:
            order.setdefault(path, len(order))

        return hook

    handles = [model.get_submodule(p).register_forward_hook(record(p)) for p in blocks]
    try:
        _outputs(model, x[:2], tuple(a[:2] for a in args))
    finally:
        for h in handles:
            h.remove()
    return sorted((p for p in blocks if p in order), key=order.__getitem__)


def reinitialise(module: nn.Module, *, seed: int = 0) -> nn.Module:
    """Re-draw ``module``'s parameters (in place) from their initial distributions.

    Modules with ``reset_parameters`` use it (BatchNorm and LayerNorm return to identity
    scale and zero shift and lose their running statistics); other parameters (scViT's
    patch-wise weights) get Kaiming-uniform matrices and zero vectors.
    """
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        for m in module.modules():
            own = list(m.parameters(recurse=False))
            if not own:
                continue
            if hasattr(m, "reset_parameters"):
                m.reset_parameters()
            else:
                for p in own:
                    if p.dim() >= 2:
                        nn.init.kaiming_uniform_(p.data, nonlinearity="selu")
                    else:
                        nn.init.zeros_(p.data)
    return module


def randomisation_check(
    target_model: nn.Module,
    x: torch.Tensor | np.ndarray,
    *,
    method: str,
    layer: str | None = None,
    target: int | Sequence[int] | None = 0,
    cascade: bool = False,
    seed: int = 0,
    **kwargs: Any,
) -> pd.DataFrame:
    """Model-parameter randomisation test (Adebayo et al. 2018, "Sanity Checks for Saliency
    Maps"): attributions that survive re-initialised weights do not explain the model.

    Parameters
    ----------
    target_model
        The trained target model (not modified; copies are randomised).
    x, method, layer, target
        As in :func:`attribute`; ``target`` is resolved on the trained model and kept.
    cascade
        Also randomise cumulatively from the top (last-run) parameter block down
        (:func:`parameter_blocks`), one attribution per block.
    seed
        Seed of the re-initialisation.
    **kwargs
        Passed to :func:`attribute` (``baselines``, ``n_steps``, ``safe``, ...).

    Returns
    -------
    pandas.DataFrame
        Rows ``randomised`` = ``"none (rerun)"`` (the trained model attributed again: 1 for
        deterministic methods), ``"all"`` and, with ``cascade``, ``"top {k}: {block}"``;
        columns ``n_blocks``, ``spearman_cells`` and ``spearman_units`` (as in
        :func:`method_agreement`) against the trained model's attributions.
    """
    x = _as_tensor(x)
    args = tuple(_as_tensor(a) for a in (kwargs.get("additional_forward_args") or ()))
    trained = attribute(target_model, x, method=method, layer=layer, target=target, **kwargs)
    fixed = trained.target  # explain the same output index after randomising

    def compare(model: nn.Module, label: str, n_blocks: int) -> dict:
        result = attribute(model, x, method=method, layer=layer, target=fixed, **kwargs)
        cells, units = rank_agreement(trained.attributions, result.attributions)
        return dict(randomised=label, n_blocks=n_blocks, spearman_cells=cells, spearman_units=units)

    blocks = parameter_blocks(target_model, x, args)
    rows = [compare(target_model, "none (rerun)", 0)]
    rows.append(compare(reinitialise(copy.deepcopy(target_model), seed=seed), "all", len(blocks)))
    if cascade:
        model = copy.deepcopy(target_model)
        for k, block in enumerate(reversed(blocks), start=1):
            reinitialise(model.get_submodule(block), seed=seed + k)
            rows.append(compare(model, f"top {k}: {block}", k))
    return pd.DataFrame(rows)
