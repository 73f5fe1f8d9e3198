"""An attribution-safe copy of a PyTorch model: exact DeepLIFT rules, same numbers.

DeepLIFT (Captum's ``DeepLift``) and DeepSHAP (shap's ``DeepExplainer``) both run *one*
forward pass on a batch made of two equal halves, ``[inputs; references]`` (shap: one cell
repeated once per background cell, then the background), and read the attribution of a unit
``u`` as ``m_u * (u(x) - u(r))``, where the multiplier ``m_u`` is whatever the backward pass
returns. Completeness, ``sum_u m_u (u(x) - u(r)) = f(x) - f(r)``, holds exactly when every
operation's backward maps multipliers by a rule that is exact for the pair ``(x, r)``. The
libraries have such rules only for modules in their own tables (shap's ``op_handler``, Captum's
``SUPPORTED_NON_LINEAR``); everything else gets the plain gradient, which is exact for linear
maps only. Functional softmax and products (fused attention), LayerNorm and activations missing
from a table (``nn.SELU`` in Captum 0.9) therefore break completeness, by an amount nobody
reports. This module replaces every nonlinearity by a module whose backward *is* the rule:

``Rescale(fn)``
    Any element-wise ``fn``. Multiplier ``(fn(x) - fn(r)) / (x - r)`` for both halves (the
    derivative at the midpoint where ``x`` and ``r`` nearly coincide). Exact for any
    element-wise function, monotonic or not, so a composite such as ``clamp(relu(.))`` is one
    ``Rescale``.
``Product`` / ``ProductMatMul``
    ``a * b`` and ``a @ b`` with the two-factor Shapley rule
    ``Δ(ab) = ½(a_x + a_r) Δb + Δa ½(b_x + b_r)``, exact.
``LogSumExp``
    The mean of the pair's softmax weights, plus the (third-order) remainder spread along
    ``Δs``: exact, and of order one for any score gap.
``SafeSoftmax`` / ``SafeLogSoftmax`` / ``SafeLayerNorm``
    Written as ``exp(s - logsumexp(s))``, ``s - logsumexp(s)`` and ``Rescale`` and
    ``Product`` pieces around linear operations, hence exact.

All rules apply only inside :func:`deeplift_rules`; outside it (the default, and what
integrated gradients, conductance and internal influence need) the modules compute ordinary
gradients. Forward values equal the original modules' within float32 rounding in both modes.

:func:`attribution_safe` builds the copy (the user's model is never modified); :func:`probe`
returns an identity :class:`Probe` module run on a layer's output, so shap (which attributes
to a module's *input*) and Captum's layer methods (a module's *output*) attribute the same
tensor. :func:`layer_names` lists the names a model understands: for a model holding one
network with a ``layer_paths()`` method (scViT, scPerceiver, see
:class:`~scvit_core.model.Interpretable`) its names, e.g. those of ``forward_intermediates``
plus ``{stage}.skip``, ``{stage}.attention`` and ``{stage}.residual`` (the residual sum
``skip + attention``); for any other model the dotted paths of its submodules.

Assumptions: the batch is the first dimension of every tensor entering a rule module (true of
scViT, scPerceiver, scVI's encoder and the report's MLP); a factor shared by the whole batch
(batch dimension 1, or a parameter expanded to the batch) is allowed. Products with
parameter-only tensors written as plain ``*`` / ``@`` (scPerceiver's gene embeddings) are
linear in the cell, so their plain gradients are exact. ``nn.MultiheadAttention`` is refused:
its softmax and products are functional calls that no module swap can reach.
"""

from __future__ import annotations

import copy
import functools
from collections.abc import Callable, Iterator
from contextlib import contextmanager

import torch
import torch.nn.functional as F
from torch import nn

from scvit_core import likelihood as L
from scvit_core.likelihood import OutputActivations
from scvit_core.model import Attention, MatMul, Mul

MODES = ("gradient", "deeplift")

# |x - r| below this (relative to max(1, |x|, |r|)) uses the derivative at the midpoint instead
# of the secant: there the secant is 0 / 0 or rounding noise, while the derivative differs
# from the exact secant only at second order in |x - r|.
SECANT_EPS = 1e-6

# Class names that shap's DeepExplainer may treat as "passthrough" (plain gradient): the rule
# modules (their backward is already the rule) and scViT's linear building blocks. Registered
# only while an explanation runs (:func:`shap_passthrough`).
SHAP_PASSTHROUGH = (
    "Rescale",
    "LogSumExp",
    "Product",
    "ProductMatMul",
    "Probe",
    "MatmulConv1d",
    "PatchwiseLinear",
    "GeneBlocks",
    "NonDynamicallyQuantizableLinear",
)


# --------------------------------------------------------------------------------------------
# the rules
# --------------------------------------------------------------------------------------------


class RuleModule(nn.Module):
    """Base of the modules whose backward follows :func:`deeplift_rules` when it is active."""

    mode: str = "gradient"


def _halves(t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    if t.shape[0] % 2:
        raise RuntimeError(
            "DeepLIFT rules need a batch of two equal halves [inputs; references], got a batch "
            f"of {t.shape[0]}; run the backward pass inside a DeepLift/DeepExplainer call only"
        )
    return t.chunk(2)


def _pair_mean(t: torch.Tensor) -> torch.Tensor:
    """``½(t_x + t_r)`` for both halves; a tensor shared by the batch (dim 0 of 1) is kept."""
    if t.dim() == 0 or t.shape[0] == 1:
        return t
    a, b = _halves(t)
    mean = (a + b) / 2
    return torch.cat([mean, mean])


class _RescaleFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: torch.Tensor, fn: Callable) -> torch.Tensor:
        y = fn(x)
        ctx.save_for_backward(x, y)
        ctx.fn = fn
        return y

    @staticmethod
    def backward(ctx, grad_y: torch.Tensor):
        x, y = ctx.saved_tensors
        x_in, x_ref = _halves(x)
        y_in, y_ref = _halves(y)
        dx, dy = x_in - x_ref, y_in - y_ref
        scale = torch.maximum(x_in.abs(), x_ref.abs()).clamp_min(1.0)
        near = dx.abs() < SECANT_EPS * scale
        # the secant of the forward's own outputs, so m * dx reproduces dy to rounding
        secant = dy / torch.where(near, torch.ones_like(dx), dx)
        if near.any():
            with torch.enable_grad():
                mid = ((x_in + x_ref) / 2).detach().requires_grad_()
                (slope,) = torch.autograd.grad(ctx.fn(mid).sum(), mid)  # element-wise fn
            secant = torch.where(near, slope, secant)
        return grad_y * torch.cat([secant, secant]), None


class Rescale(RuleModule):
    """Element-wise ``fn`` with DeepLIFT's rescale rule, exact for any element-wise function.

    Parameters
    ----------
    fn
        An element-wise function of one tensor (``F.selu``, a clamp of a softplus, ...). It is
        stored as a plain callable, not a module, so no library sees an activation module to
        apply its own rule to.
    name
        Shown in ``repr``.
    """

    def __init__(self, fn: Callable[[torch.Tensor], torch.Tensor], name: str | None = None):
        super().__init__()
        self.fn = fn
        self.name = name or getattr(fn, "__name__", type(fn).__name__)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.mode == "deeplift" and torch.is_grad_enabled():
            return _RescaleFunction.apply(x, self.fn)
        return self.fn(x)

    def extra_repr(self) -> str:
        return self.name


class _ProductFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, a: torch.Tensor, b: torch.Tensor, matmul: bool) -> torch.Tensor:
        ctx.save_for_backward(a, b)
        ctx.matmul = matmul
        return torch.matmul(a, b) if matmul else a * b

    @staticmethod
    def backward(ctx, grad_y: torch.Tensor):
        a, b = ctx.saved_tensors
        # Shapley rule: each factor's multiplier is the pair mean of the other factor
        a_bar, b_bar = _pair_mean(a), _pair_mean(b)
        grad_a = grad_b = None
        if ctx.matmul:
            if ctx.needs_input_grad[0]:
                grad_a = torch.matmul(grad_y, b_bar.transpose(-2, -1))
            if ctx.needs_input_grad[1]:
                grad_b = torch.matmul(a_bar.transpose(-2, -1), grad_y)
        else:
            if ctx.needs_input_grad[0]:
                grad_a = grad_y * b_bar
            if ctx.needs_input_grad[1]:
                grad_b = grad_y * a_bar
        # undo broadcasting
        grad_a = None if grad_a is None else _sum_to(grad_a, a.shape)
        grad_b = None if grad_b is None else _sum_to(grad_b, b.shape)
        return grad_a, grad_b, None


def _sum_to(t: torch.Tensor, shape: torch.Size) -> torch.Tensor:
    return t if t.shape == shape else t.sum_to_size(shape)


class Product(RuleModule):
    """``a * b`` (broadcasting) with the exact two-factor Shapley rule under DeepLIFT."""

    matmul = False

    def forward(self, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        if self.mode == "deeplift" and torch.is_grad_enabled():
            return _ProductFunction.apply(a, b, self.matmul)
        return torch.matmul(a, b) if self.matmul else a * b


class ProductMatMul(Product):
    """``a @ b`` with the exact two-factor Shapley rule under DeepLIFT (attention's products)."""

    matmul = True


class _LogSumExpFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, s: torch.Tensor, dim: int) -> torch.Tensor:
        y = torch.logsumexp(s, dim, keepdim=True)
        ctx.save_for_backward(s, y)
        ctx.dim = dim
        return y

    @staticmethod
    def backward(ctx, grad_y: torch.Tensor):
        s, y = ctx.saved_tensors
        dim = ctx.dim
        s_in, s_ref = _halves(s)
        y_in, y_ref = _halves(y)
        ds = s_in - s_ref
        # trapezoid rule: the mean of the pair's softmax weights (each in [0, 1])
        weights = (torch.exp(s_in - y_in) + torch.exp(s_ref - y_ref)) / 2
        # its error (third order in Δs), spread along Δs so the rule is exact
        residual = (y_in - y_ref) - (weights * ds).sum(dim, keepdim=True)
        norm2 = (ds * ds).sum(dim, keepdim=True)
        scale = torch.maximum(s_in.abs(), s_ref.abs()).amax(dim, keepdim=True).clamp_min(1.0)
        near = norm2 < (SECANT_EPS * scale) ** 2
        correction = torch.where(near, 0.0, residual / torch.where(near, 1.0, norm2))
        weights = weights + correction * ds
        return grad_y * torch.cat([weights, weights]), None


class LogSumExp(RuleModule):
    """``logsumexp`` over ``dim`` (kept), with an exact, well-conditioned rule under DeepLIFT.

    The multiplier of score ``j`` is the mean of the input's and the reference's softmax
    weights (the trapezoid rule for the path integral of the gradient), plus the trapezoid's
    error spread along ``Δs`` in proportion to ``Δs_j``, so ``Σ_j m_j Δs_j`` equals
    ``Δ logsumexp`` exactly. Multipliers stay of order one whatever the score gap between input
    and reference, since no ``exp`` of an unnormalised score is ever formed.
    """

    def __init__(self, dim: int = -1) -> None:
        super().__init__()
        self.dim = dim

    def forward(self, s: torch.Tensor) -> torch.Tensor:
        if self.mode == "deeplift" and torch.is_grad_enabled():
            return _LogSumExpFunction.apply(s, self.dim)
        return torch.logsumexp(s, self.dim, keepdim=True)

    def extra_repr(self) -> str:
        return f"dim={self.dim}"


class SafeSoftmax(RuleModule):
    """Softmax as ``exp(s - logsumexp(s))``: a :class:`LogSumExp` and one :class:`Rescale`.

    Both rules work on normalised quantities (log-probabilities <= 0, softmax weights in
    [0, 1]), so they are exact and finite for any score gap between input and reference. The
    textbook split ``exp(s - c) * (1 / Σ exp(s - c))`` is exact too, but its terms grow like
    ``exp(gap)`` and cancel: in float32 it loses completeness from gaps of about 30 and gives
    NaN beyond about 170, which sharp trained attention reaches.
    """

    def __init__(self, dim: int = -1) -> None:
        super().__init__()
        self.dim = dim
        self.logsumexp = LogSumExp(dim)
        self.exp = Rescale(torch.exp, "exp")

    def forward(self, s: torch.Tensor) -> torch.Tensor:
        if s.dim() and s.shape[0] == 1:  # shared by the batch (learned constant weights)
            return torch.softmax(s, self.dim)  # the same for input and reference: no rule
        return self.exp(s - self.logsumexp(s))

    def extra_repr(self) -> str:
        return f"dim={self.dim}"


class SafeLogSoftmax(SafeSoftmax):
    """Log-softmax as ``s - logsumexp(s)``, exact under DeepLIFT."""

    def __init__(self, dim: int = -1) -> None:
        super().__init__(dim)
        del self.exp

    def forward(self, s: torch.Tensor) -> torch.Tensor:
        return s - self.logsumexp(s)


def _rsqrt_eps(v: torch.Tensor, eps: float) -> torch.Tensor:
    return torch.rsqrt(v + eps)


class SafeLayerNorm(RuleModule):
    """``nn.LayerNorm`` as ``(x - mean) * rsqrt(var + eps) * weight + bias``, exact under DeepLIFT.

    Same parameter names as ``nn.LayerNorm`` (``weight``, ``bias``), so state dicts load.
    """

    def __init__(
        self,
        normalized_shape: tuple[int, ...],
        eps: float = 1e-5,
        *,
        elementwise_affine: bool = True,
        bias: bool = True,
    ) -> None:
        super().__init__()
        self.normalized_shape = tuple(normalized_shape)
        self.eps = eps
        shape = self.normalized_shape
        self.weight = nn.Parameter(torch.ones(shape)) if elementwise_affine else None
        self.bias = nn.Parameter(torch.zeros(shape)) if elementwise_affine and bias else None
        self.square = Rescale(torch.square, "square")
        self.rsqrt = Rescale(functools.partial(_rsqrt_eps, eps=eps), f"rsqrt(. + {eps:g})")
        self.product = Product()

    @classmethod
    def from_layer_norm(cls, m: nn.LayerNorm) -> SafeLayerNorm:
        """A copy of ``m``'s parameters in a :class:`SafeLayerNorm`."""
        safe = cls(
            m.normalized_shape,
            m.eps,
            elementwise_affine=m.elementwise_affine,
            bias=m.bias is not None,
        )
        safe.load_state_dict(m.state_dict())
        return safe.to(m.weight.device if m.weight is not None else "cpu")

    def reset_parameters(self) -> None:
        if self.weight is not None:
            nn.init.ones_(self.weight)
        if self.bias is not None:
            nn.init.zeros_(self.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        dims = tuple(range(-len(self.normalized_shape), 0))
        d = x - x.mean(dims, keepdim=True)
        var = self.square(d).mean(dims, keepdim=True)  # biased, as nn.LayerNorm
        y = self.product(d, self.rsqrt(var))
        if self.weight is not None:
            y = y * self.weight
        if self.bias is not None:
            y = y + self.bias
        return y

    def extra_repr(self) -> str:
        return f"{self.normalized_shape}, eps={self.eps}"


# element-wise composites of the likelihood heads (module-level so copies and pickles work)


def _relu_clamp(a: torch.Tensor, lo: float, hi: float) -> torch.Tensor:
    return F.relu(a).clamp(lo, hi)


def _softplus_clamp(a: torch.Tensor, lo: float, hi: float) -> torch.Tensor:
    return F.softplus(a).clamp(lo, hi)


def _inverse_softplus_clamp(a: torch.Tensor, lo: float, hi: float) -> torch.Tensor:
    return 1.0 / F.softplus(a).clamp(lo, hi)


def _clamp(a: torch.Tensor, lo: float, hi: float) -> torch.Tensor:
    return a.clamp(lo, hi)


class SafeOutputActivations(RuleModule):
    """:class:`~scvit_core.likelihood.OutputActivations` built from rule modules.

    Each output is one :class:`Rescale` composite (a clamp of a ReLU or softplus, the legacy
    head's ``1 / clamp(softplus)``); the library-scaled mean is
    ``clamp(SafeSoftmax(a) * library)`` with the product as a :class:`Product`, and the clamp
    bounds of the likelihood (the legacy ones for ``legacy`` with ``library_scaling``, the
    scPerceiver's ablation).
    """

    def __init__(self, likelihood: str, *, library_scaling: bool = False) -> None:
        super().__init__()
        self.likelihood, self.library_scaling = likelihood, library_scaling
        part = functools.partial
        legacy = likelihood == "legacy"
        lo, hi = (L.LEGACY_MEAN_MIN, L.LEGACY_MEAN_MAX) if legacy else (L.MEAN_MIN, L.MEAN_MAX)
        if library_scaling:
            self.softmax = SafeSoftmax(-1)
            self.library_product = Product()
            self.mean_act = Rescale(part(_clamp, lo=lo, hi=hi), "clamp")
        elif legacy:
            self.mean_act = Rescale(part(_relu_clamp, lo=lo, hi=hi), "clamp(relu)")
        else:
            self.mean_act = Rescale(part(_softplus_clamp, lo=lo, hi=hi), "clamp(softplus)")
        if legacy:
            lo, hi = L.LEGACY_DISPERSION_MIN, L.LEGACY_DISPERSION_MAX
            self.theta_act = Rescale(part(_inverse_softplus_clamp, lo=lo, hi=hi), "1/clamp(sp)")
            self.gate_act = Rescale(F.logsigmoid, "logsigmoid")
        else:
            fn = part(_softplus_clamp, lo=L.THETA_MIN, hi=L.THETA_MAX)
            self.theta_act = Rescale(fn, "clamp(softplus)")

    def forward(
        self,
        mean_raw: torch.Tensor,
        theta_raw: torch.Tensor,
        gate_raw: torch.Tensor,
        library: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
        """Return ``(mean, theta, gate_logits)``, each ``(cells, genes)``."""
        if self.library_scaling:
            if library is None:
                raise ValueError("library_scaling needs each cell's library size")
            scaled = self.library_product(self.softmax(mean_raw), library.reshape(-1, 1))
            mean = self.mean_act(scaled)
        else:
            mean = self.mean_act(mean_raw)
        theta = self.theta_act(theta_raw)
        if self.likelihood == "legacy":
            return mean, theta, self.gate_act(gate_raw)
        return mean, theta, (None if self.likelihood == "nb" else gate_raw)


@contextmanager
def deeplift_rules(module: nn.Module) -> Iterator[nn.Module]:
    """Switch every rule module inside ``module`` to the DeepLIFT backward, then back.

    Inside the context a backward pass must come from a batch of two halves
    ``[inputs; references]`` (Captum's DeepLift family, shap's DeepExplainer).
    """
    rules = [m for m in module.modules() if isinstance(m, RuleModule)]
    previous = [m.mode for m in rules]
    for m in rules:
        m.mode = "deeplift"
    try:
        yield module
    finally:
        for m, mode in zip(rules, previous, strict=True):
            m.mode = mode


@contextmanager
def shap_passthrough(names: tuple[str, ...] = SHAP_PASSTHROUGH) -> Iterator[None]:
    """Register ``names`` in shap's PyTorch ``op_handler`` as passthrough, then restore it.

    shap warns about (and passes gradients through) module classes it does not know; the rule
    modules want exactly the gradient, so the warning would only be noise. Other unknown
    modules (``nn.LayerNorm`` on the fast path) still warn.
    """
    from shap.explainers._deep import deep_pytorch

    table = deep_pytorch.op_handler
    saved = dict(table)
    for name in names:
        table.setdefault(name, deep_pytorch.passthrough)
    try:
        yield
    finally:
        table.clear()
        table.update(saved)


# --------------------------------------------------------------------------------------------
# building the copy
# --------------------------------------------------------------------------------------------


class Log1p(nn.Module):
    """``log1p`` as a module (scVI's input transform), so the safe copy can give it a rule."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.log1p(x)


def _activation_fn(m: nn.Module) -> tuple[Callable, str] | None:
    """The element-wise function of an activation module, or None if ``m`` is not one."""
    part = functools.partial
    table: dict[type, Callable[[nn.Module], Callable]] = {
        nn.SELU: lambda m: F.selu,
        nn.ReLU: lambda m: F.relu,
        nn.LeakyReLU: lambda m: part(F.leaky_relu, negative_slope=m.negative_slope),
        nn.ELU: lambda m: part(F.elu, alpha=m.alpha),
        nn.Softplus: lambda m: part(F.softplus, beta=m.beta, threshold=m.threshold),
        nn.Sigmoid: lambda m: torch.sigmoid,
        nn.Tanh: lambda m: torch.tanh,
        nn.LogSigmoid: lambda m: F.logsigmoid,
        nn.GELU: lambda m: part(F.gelu, approximate=m.approximate),
        Log1p: lambda m: torch.log1p,
    }
    make = table.get(type(m))
    return None if make is None else (make(m), type(m).__name__.lower())


def _safe_replacement(m: nn.Module) -> nn.Module | None:
    if isinstance(m, nn.MultiheadAttention):
        raise NotImplementedError(
            "nn.MultiheadAttention computes its softmax and products functionally; rewrite it "
            "with explicit modules (as scvit_core.model.Attention) before attributing"
        )
    activation = _activation_fn(m)
    if activation is not None:
        return Rescale(*activation)
    if type(m) is nn.Softmax:
        return SafeSoftmax(-1 if m.dim is None else m.dim)
    if type(m) is nn.LogSoftmax:
        return SafeLogSoftmax(-1 if m.dim is None else m.dim)
    if type(m) is nn.LayerNorm:
        return SafeLayerNorm.from_layer_norm(m)
    if type(m) is Mul:  # a product of two cell-dependent tensors
        return Product()
    if type(m) is MatMul:
        return ProductMatMul()
    if type(m) is OutputActivations:
        return SafeOutputActivations(m.likelihood, library_scaling=m.library_scaling)
    return None


def _swap_modules(module: nn.Module) -> None:
    for name, child in list(module.named_children()):
        if isinstance(child, Attention):
            child.fused = False  # its qk/av products and softmax are then swapped below
        replacement = _safe_replacement(child)
        if replacement is None:
            _swap_modules(child)
        else:
            setattr(module, name, replacement)


def attribution_safe(model: nn.Module) -> nn.Module:
    """A copy of ``model`` (eval mode) whose DeepLIFT/DeepSHAP attributions are complete.

    Parameters
    ----------
    model
        Any ``nn.Module`` (scViT, a target wrapper around it, scVI's encoder, the report's MLP).
        It is not modified.

    Returns
    -------
    torch.nn.Module
        The copy, with every :class:`~scvit_core.model.Attention` unfused; every
        :class:`~scvit_core.model.MatMul` / :class:`~scvit_core.model.Mul` (attention's
        ``qk``/``av`` products, scPerceiver's products of two cell-dependent tensors) a
        :class:`ProductMatMul` / :class:`Product`; every ``nn.LayerNorm`` a
        :class:`SafeLayerNorm`; every element-wise activation module a :class:`Rescale`; every
        ``nn.Softmax``/``nn.LogSoftmax`` a :class:`SafeSoftmax`/:class:`SafeLogSoftmax` over
        the same dimension; the output activations a :class:`SafeOutputActivations`.
        Numerically the same function. Layers are reached with :func:`probe`.

    Notes
    -----
    Operations called as functions inside a ``forward`` (``torch.exp(...)``) cannot be
    swapped; attributing such a model still works, and its sanity figure shows the error.
    """
    if getattr(model, "_attribution_copy", None) is not None:
        raise ValueError("attribution_safe expects the original model, not a prepared copy")
    safe = copy.deepcopy(model).eval()
    replacement = _safe_replacement(safe)
    if replacement is not None:  # the model is itself one activation (toy models)
        safe = replacement.eval()
    _swap_modules(safe)
    safe._attribution_copy = "safe"
    safe._attribution_probes = {}
    return safe


def attribution_fast(model: nn.Module) -> nn.Module:
    """A copy of ``model`` (eval mode) with nothing swapped: the fast path, probes possible.

    Attributions of this copy show what the libraries give on the model as trained and run
    (fused attention, ``nn.LayerNorm``, library-unknown activations); their sanity figures are
    the measure of that error.
    """
    if getattr(model, "_attribution_copy", None) is not None:
        raise ValueError("attribution_fast expects the original model, not a prepared copy")
    fast = copy.deepcopy(model).eval()
    fast._attribution_copy = "fast"
    fast._attribution_probes = {}
    return fast


# --------------------------------------------------------------------------------------------
# layers and probes
# --------------------------------------------------------------------------------------------


class Probe(nn.Identity):
    """Identity run on a layer's output (by a forward hook), so every method sees that tensor.

    shap's DeepExplainer attributes to the probe's input and Captum's layer methods to its
    output: both are the layer's output. The hook hands the probe a fresh view, so the probe's
    tensor feeds only what the layer's output feeds (scViT's ``skip`` returns the very tensor
    that also enters attention).
    """

    def __init__(self, layer: str) -> None:
        super().__init__()
        self.layer = layer
        # when set, the layer's output is replaced by this tensor (counterfactual evaluations)
        self.replacement: torch.Tensor | None = None

    def hook(self, module: nn.Module, args: tuple, output: torch.Tensor) -> torch.Tensor:
        if not isinstance(output, torch.Tensor):
            raise TypeError(
                f"layer {self.layer!r} returns {type(output).__name__}, not a tensor; probe a "
                "module that returns one tensor"
            )
        if self.replacement is not None:
            return self(self.replacement.expand_as(output))
        return self(output.view_as(output))

    def extra_repr(self) -> str:
        return repr(self.layer)


def _find_network(model: nn.Module) -> tuple[str, nn.Module] | None:
    """``(path, module)`` of the one submodule with a ``layer_paths()`` method (the network
    inside a target wrapper, or the model itself), or None if there is not exactly one."""
    found = [
        (path, m) for path, m in model.named_modules() if callable(getattr(m, "layer_paths", None))
    ]
    return found[0] if len(found) == 1 else None


def _layer_paths(model: nn.Module) -> dict[str, str]:
    found = _find_network(model)
    if found is not None:
        prefix = f"{found[0]}." if found[0] else ""
        return {name: prefix + path for name, path in found[1].layer_paths().items()}
    containers = (nn.ModuleList, nn.ModuleDict)
    return {p: p for p, m in model.named_modules() if p and not isinstance(m, containers)}


def layer_names(model: nn.Module) -> list[str]:
    """Names of the layers whose outputs can be attributed, in execution order for a network.

    For a model containing one network with ``layer_paths()`` (the model itself or a target
    wrapping it), that method's names. scViT (:meth:`~scvit_core.model.ScViT.layer_paths`):
    ``stem``, ``encoder.{i}.linear``, ``encoder.{i}.skip``, ``encoder.{i}.attention``,
    ``encoder.{i}.residual`` (``skip + attention``, before the stage's activation),
    ``encoder.{i}``, ``bottleneck.{j}``, ``decoder.dense.{j}``, ``decoder.{i}.*`` likewise,
    ``head``. scPerceiver (:meth:`~scvit_core.perceiver.ScPerceiver.layer_paths`): ``tokens``,
    ``{block}.skip``, ``{block}.attention``, ``{block}``, ``encoder_norm``, ``posterior`` (or
    ``latent``), ``decoder.tokens``. Otherwise the dotted paths of the submodules.
    """
    return list(_layer_paths(model))


def probe(model: nn.Module, layer: str) -> Probe:
    """The :class:`Probe` on ``layer``'s output in a prepared copy (created on first use).

    Parameters
    ----------
    model
        A copy from :func:`attribution_safe` or :func:`attribution_fast`.
    layer
        A name from :func:`layer_names`.
    """
    probes = getattr(model, "_attribution_probes", None)
    if probes is None:
        raise ValueError("probes live in prepared copies: use attribution_safe(model) first")
    if layer not in probes:
        paths = _layer_paths(model)
        if layer not in paths:
            raise KeyError(f"unknown layer {layer!r}; known: {', '.join(paths)}")
        p = Probe(layer)
        # a bound method: deep copies of the model carry their own probe with the hook
        model.get_submodule(paths[layer]).register_forward_hook(p.hook)
        probes[layer] = p
    return probes[layer]


def branch_complement(model: nn.Module, layer: str) -> str | None:
    """The other branch of a residual sum: ``{stage}.skip`` for ``{stage}.attention`` and vice
    versa (a network with ``layer_paths()`` naming both); None for every other layer (a cut
    through the network)."""
    if _find_network(model) is None:
        return None
    stem, _, branch = layer.rpartition(".")
    other = {"attention": "skip", "skip": "attention"}.get(branch)
    if other is None or not stem or f"{stem}.{other}" not in _layer_paths(model):
        return None
    return f"{stem}.{other}"


def count_rule_modules(model: nn.Module) -> dict[str, int]:
    """How many modules of each rule class a copy holds (for reports and tests)."""
    counts: dict[str, int] = {}
    for m in model.modules():
        if isinstance(m, RuleModule):
            counts[type(m).__name__] = counts.get(type(m).__name__, 0) + 1
    return counts
