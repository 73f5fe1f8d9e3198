"""Count likelihoods of scViT: pure functions plus ``pyro.distributions`` objects.

Conventions (pyro / torch ``NegativeBinomial(total_count=r, logits=l)``)::

    P(X = x) = Gamma(x + r) / (Gamma(r) x!) * (1 - p)^r * p^x,   p = sigmoid(l)
    E[X]     = r * p / (1 - p) = r * exp(l)

Three likelihoods, all parametrised by the decoded ``mean`` ``m``, the inverse dispersion
``theta`` ``r`` (pyro's ``total_count``) and, with zero inflation, ``gate_logits`` ``g``
(zero-inflation probability ``pi = sigmoid(g)``):

``"corrected"``
    Zero-inflated NB whose NB part has mean ``m``: ``l = log(m) - log(r)``, so
    ``E[X] = (1 - pi) * m``. Gate logits are unconstrained.
``"nb"``
    The same NB without zero inflation: ``E[X] = m``.
``"legacy"``
    The reference code exactly (DESIGN.md section 2): ``l = log(m) - log(m + r)``. That is
    ``log p`` of the intended parametrisation, not ``logit p``, so pyro reads
    ``p = sigmoid(l) = m / (2m + r)`` and the NB mean is ``r * exp(l) = r * m / (m + r)``,
    below both ``m`` and ``r``. The gate logits are ``logsigmoid(.)`` of the network output,
    so ``pi = sigmoid(logsigmoid(.)) <= 0.5``.

The network's raw outputs become these parameters in :class:`OutputActivations`, one module
instance per nonlinearity so attribution methods can hook each of them.
"""

from __future__ import annotations

from typing import Protocol

import pyro.distributions as dist
import torch
from torch import nn

# Clamp bounds of the legacy head, mean = clamp(relu(.)) and dispersion = clamp(softplus(.)).
# DESIGN.md does not give them; these are the values of the reference code's "ZINB" branch
# (model.py of the report's public repository).
LEGACY_MEAN_MIN = 1e-6
LEGACY_MEAN_MAX = 1e6
LEGACY_DISPERSION_MIN = 1e-6
LEGACY_DISPERSION_MAX = 1e6

# Clamp bounds of the corrected and NB heads, chosen like the legacy ones: they keep every log
# finite and the NB logits within about +-28.
MEAN_MIN = 1e-6
MEAN_MAX = 1e6
THETA_MIN = 1e-6
THETA_MAX = 1e6


class NBParams(Protocol):
    """Anything carrying the likelihood parameters, each ``(cells, genes)``."""

    mean: torch.Tensor
    theta: torch.Tensor
    gate_logits: torch.Tensor | None


def nb_logits(mean: torch.Tensor, theta: torch.Tensor, *, likelihood: str) -> torch.Tensor:
    """NB logits ``l`` passed to pyro for a decoded mean and inverse dispersion.

    Parameters
    ----------
    mean
        Decoded mean ``m > 0``.
    theta
        Inverse dispersion ``r > 0`` (pyro's ``total_count``).
    likelihood
        ``"corrected"``/``"nb"``: ``l = log m - log r`` (NB mean ``m``);
        ``"legacy"``: ``l = log m - log(m + r)`` (NB mean ``r m / (m + r)``).
    """
    if likelihood == "legacy":
        return torch.log(mean) - torch.log(mean + theta)
    _check(likelihood)
    return torch.log(mean) - torch.log(theta)


def nb_mean(mean: torch.Tensor, theta: torch.Tensor, *, likelihood: str) -> torch.Tensor:
    """Mean of the NB part under pyro's parametrisation: ``m``, or ``r m / (m + r)`` (legacy)."""
    if likelihood == "legacy":
        return theta * mean / (mean + theta)
    _check(likelihood)
    return mean


def distribution(
    params: NBParams, *, likelihood: str
) -> dist.ZeroInflatedNegativeBinomial | dist.NegativeBinomial:
    """The pyro distribution over counts, batch shape ``(cells, genes)``.

    Parameters
    ----------
    params
        ``mean``, ``theta`` and (except for ``"nb"``) ``gate_logits``.
    likelihood
        ``"legacy"``, ``"corrected"`` or ``"nb"`` (see the module docstring).
    """
    logits = nb_logits(params.mean, params.theta, likelihood=likelihood)
    # Argument validation is off: the parameters are valid by construction (clamped positive
    # mean and theta), while the validator also checks the derived ``probs = sigmoid(logits)``,
    # which rounds to exactly 1 in float32 for large logits (mean / theta > ~1.7e7, e.g. theta
    # at its lower clamp) and would stop training although log_prob, computed from the
    # logits, is finite. A NaN or infinite loss is caught by the trainer instead.
    if likelihood == "nb":
        return dist.NegativeBinomial(total_count=params.theta, logits=logits, validate_args=False)
    return dist.ZeroInflatedNegativeBinomial(
        total_count=params.theta,
        logits=logits,
        gate_logits=params.gate_logits,
        validate_args=False,
    )


def log_prob(params: NBParams, counts: torch.Tensor, *, likelihood: str) -> torch.Tensor:
    """Per-gene log-likelihood of raw ``counts``, shape ``(cells, genes)``, by pyro.

    The reference the fused :func:`count_nll` is tested against; the loss uses the latter.
    """
    return distribution(params, likelihood=likelihood).log_prob(counts)


def nll(params: NBParams, counts: torch.Tensor, *, likelihood: str) -> torch.Tensor:
    """Negative log-likelihood per cell, summed over genes, shape ``(cells,)``.

    The training loss (and the report's "reconstruction loss") is its mean over cells. It
    equals ``-log_prob(params, counts, likelihood=likelihood).sum(-1)`` and is computed by
    :func:`count_nll` (one pass, hand-written gradient, float32 or wider).
    """
    gate_logits = None if likelihood == "nb" else params.gate_logits
    if params.mean.device.type == "meta":  # shapes only (memory estimates): no data to index
        return -log_prob(params, counts, likelihood=likelihood).sum(-1)
    return count_nll(params.mean, params.theta, gate_logits, counts, likelihood=likelihood)


def count_nll(
    mean: torch.Tensor,
    theta: torch.Tensor,
    gate_logits: torch.Tensor | None,
    counts: torch.Tensor,
    *,
    likelihood: str,
) -> torch.Tensor:
    """Per-cell NLL of ``counts`` under the NB or ZINB of :func:`distribution`, fused.

    The same numbers as pyro's ``log_prob`` summed over the last axis (genes), with fewer
    passes over the ``(cells, genes)`` tensors and the gradient written by hand:

    - a zero count costs no log-gamma: ``log NB(0) = -r softplus(l)``, and a gene with a zero
      count is only touched by whole-tensor passes; the log-gamma and digamma terms, and the
      ``x log sigmoid(l)`` term, are evaluated on the non-zero counts only (sparse data);
    - the gradient with respect to ``mean``, ``theta`` and ``gate_logits`` is computed in the
      forward pass and saved, so the backward pass is three multiplications.

    Per gene, with ``q = exp(l)`` (``m / r``; legacy ``m / (m + r)``) and
    ``z = -g - r log(1 + q)``::

        -log p(0) = -softplus(z) + softplus(-g)
        -log p(x) = -z + softplus(-g) - x log(q / (1 + q)) - lgamma(r + x) + lgamma(r)
                    + lgamma(x + 1)                                          (x > 0)

    (``nb``: the same without ``g`` and its two softplus terms, ``-log p(0) = r log(1 + q)``.)
    The likelihood is computed in float32 at least, outside autocast, whatever the inputs'
    precision. Pyro's ``log_prob`` (:func:`log_prob`) stays the reference of the tests.

    Parameters
    ----------
    mean, theta
        Decoded mean ``m`` and inverse dispersion ``r``, ``(..., genes)``.
    gate_logits
        Zero-inflation logits ``g`` (None for ``"nb"``).
    counts
        Raw counts ``x``, broadcastable to ``mean``; not differentiated.
    likelihood
        ``"legacy"``, ``"corrected"`` or ``"nb"`` (see the module docstring).

    Returns
    -------
    torch.Tensor
        ``(...)``, the NLL summed over the last axis.
    """
    _check(likelihood)
    if likelihood != "nb" and gate_logits is None:
        raise ValueError(f"the {likelihood!r} likelihood needs gate_logits")
    gate = gate_logits if likelihood != "nb" else None
    dtype = torch.promote_types(mean.dtype, torch.float32)
    inputs = (mean, theta, counts) if gate is None else (mean, theta, counts, gate)
    inputs = [t.to(dtype) for t in torch.broadcast_tensors(*inputs)]
    shape = inputs[0].shape
    # (cells, genes), contiguous: the flat indices of the non-zero counts address every tensor
    inputs = [t.reshape(-1, shape[-1]).contiguous() for t in inputs]
    mean, theta, counts = inputs[:3]
    gate = inputs[3] if gate is not None else None
    legacy = likelihood == "legacy"
    with torch.autocast(mean.device.type, enabled=False):
        needs_grad = torch.is_grad_enabled() and any(t.requires_grad for t in inputs)
        if needs_grad:
            out = _FusedNLL.apply(mean, theta, gate, counts.detach(), legacy)
        else:
            out = _nll_and_grads(mean, theta, gate, counts, legacy=legacy, grad=False)[0]
    return out.reshape(shape[:-1])


class _FusedNLL(torch.autograd.Function):
    """:func:`count_nll`'s autograd node: gradients computed forward, scaled backward."""

    @staticmethod
    def forward(ctx, mean, theta, gate, counts, legacy):
        value, grads = _nll_and_grads(mean, theta, gate, counts, legacy=legacy, grad=True)
        ctx.has_gate = gate is not None
        ctx.save_for_backward(*grads)
        return value

    @staticmethod
    def backward(ctx, grad_value):
        grad_value = grad_value.unsqueeze(-1)  # (cells, 1)
        grads = [g * grad_value for g in ctx.saved_tensors]
        if not ctx.has_gate:
            grads.append(None)
        return grads[0], grads[1], grads[2], None, None


def _nll_and_grads(
    mean: torch.Tensor,
    theta: torch.Tensor,
    gate: torch.Tensor | None,
    counts: torch.Tensor,
    *,
    legacy: bool,
    grad: bool,
) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """Per-cell NLL ``(cells,)`` and, with ``grad``, its gradient per ``(mean, theta, gate)``.

    Whole-tensor passes assume every count is zero; the non-zero counts (flat indices
    ``nz``) then get their own terms, and their gradients are overwritten.
    """
    F = torch.nn.functional
    n_cells, n_genes = mean.shape
    m, r = mean.detach(), theta.detach()
    nz = counts.reshape(-1).nonzero().squeeze(1)  # flat indices of the non-zero counts
    # per-cell segments of nz (row-major order): lengths for segment sums
    bounds = torch.searchsorted(nz, torch.arange(n_cells + 1, device=nz.device) * n_genes)
    lengths = bounds.diff()

    # whole tensors: -log NB(0) = r softplus(l) = r log(1 + q)
    s = m + r
    sp = torch.div(m, s if legacy else r).log1p_()  # softplus(l)
    if gate is None:
        z = sp * r  # -log NB(0); p(0) = exp(-z) without zero inflation
        value = z.sum(-1)
    else:
        g = gate.detach()
        neg_g = -g
        z = torch.addcmul(neg_g, r, sp, value=-1)  # log NB(0) - g
        value = F.softplus(neg_g).sum(-1) - F.softplus(z).sum(-1)

    # non-zero counts: x log(q / (1 + q)) + lgamma(r + x) - lgamma(r) - lgamma(x + 1), where
    # q / (1 + q) = m / (m + r) (legacy: m / (2m + r)) = 1 / (1 + t), t = r / m (legacy s / m);
    # -log1p(t) keeps its precision when t is small, where x can be large
    xs, ms, rs, ss = (t.reshape(-1).take(nz) for t in (counts, m, r, s))
    ss2 = ss + ms if legacy else ss  # 2m + r (legacy) or m + r
    # pyro's order: lgamma(x + 1) - lgamma(r + x) is exact in float32 when both are large
    log_norm = (torch.lgamma(xs + 1) - torch.lgamma(rs + xs)) + torch.lgamma(rs)
    terms = -xs * torch.log1p((ss if legacy else rs) / ms) - log_norm
    if gate is not None:  # the whole-tensor pass counted softplus(z) there, not z
        terms -= F.softplus(-z.reshape(-1).take(nz))
    value = value - torch.segment_reduce(terms, "sum", lengths=lengths)
    if not grad:
        return value, []

    # gradient of the zero-count formula everywhere, weighted by the NB's share of p(0),
    # w = sigmoid(z) (1 without zero inflation)
    inv_s = s.reciprocal_()
    if legacy:  # d/dm r sp = r^2 / (s s2), d/dr = sp - r m / (s s2), s2 = 2m + r
        a = torch.mul(r, inv_s)  # r / s
        inv_s2 = (m + r).add_(m).reciprocal_()
        d_mean = a * r * inv_s2
        d_theta = sp.sub_(a.mul_(m).mul_(inv_s2))
    else:  # d/dm r sp = r / s, d/dr = sp - m / s
        d_mean = torch.mul(r, inv_s)
        d_theta = sp.sub_(inv_s.mul_(m))
    grads = [d_mean, d_theta]
    if gate is not None:
        w = torch.sigmoid(z)
        d_mean.mul_(w)
        d_theta.mul_(w)
        grads.append(w.sub_(torch.sigmoid(neg_g)))  # d/dg: sigmoid(z) - sigmoid(-g)

    # non-zero counts: the NB's full gradient, weight 1
    dpsi = torch.digamma(rs + xs) - torch.digamma(rs)
    if legacy:
        d_mean_nz = rs / ss2 * (rs / ss - xs / ms)
        d_theta_nz = torch.log1p(ms / ss) - rs * ms / (ss * ss2) + xs / ss2 - dpsi
    else:
        d_mean_nz = rs / ss * (1 - xs / ms)
        d_theta_nz = torch.log1p(ms / rs) + (xs - ms) / ss - dpsi
    d_mean.view(-1)[nz] = d_mean_nz
    d_theta.view(-1)[nz] = d_theta_nz
    if gate is not None:
        grads[2].view(-1)[nz] = torch.sigmoid(g.reshape(-1).take(nz))
    return value, grads


class OutputActivations(nn.Module):
    """Turn the decoder's three raw outputs into likelihood parameters.

    ``legacy``: ``mean = clamp(relu(a))``, ``theta = 1 / clamp(softplus(b))``,
    ``gate_logits = logsigmoid(c)``. ``corrected``/``nb``: ``mean = clamp(softplus(a))`` or,
    with ``library_scaling``, ``softmax(a) * library`` (scVI); ``theta = clamp(softplus(b))``;
    ``gate_logits = c`` (``None`` for ``nb``).

    ``allow_legacy_scaling`` admits the legacy parametrisation with a library-scaled mean
    (``clamp(softmax(a) * library)``, the rest legacy): the scPerceiver's ablation that reverts
    the likelihood alone. scViT's configuration keeps refusing the combination.
    """

    def __init__(
        self, likelihood: str, *, library_scaling: bool = False, allow_legacy_scaling: bool = False
    ) -> None:
        super().__init__()
        _check(likelihood)
        if library_scaling and likelihood == "legacy" and not allow_legacy_scaling:
            raise ValueError("library_scaling is not part of the legacy likelihood")
        self.likelihood = likelihood
        self.library_scaling = library_scaling
        if library_scaling:
            self.mean_act = nn.Softmax(dim=-1)
        elif likelihood == "legacy":
            self.mean_act = nn.ReLU()
        else:
            self.mean_act = nn.Softplus()
        if likelihood == "legacy":
            self.gate_act = nn.LogSigmoid()
        self.theta_act = nn.Softplus()

    def forward(
        self,
        mean_raw: torch.Tensor,
        theta_raw: torch.Tensor,
        gate_raw: torch.Tensor,
        library: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
        """Return ``(mean, theta, gate_logits)``, each ``(cells, genes)``."""
        legacy = self.likelihood == "legacy"
        lo, hi = (LEGACY_MEAN_MIN, LEGACY_MEAN_MAX) if legacy else (MEAN_MIN, MEAN_MAX)
        if self.library_scaling:
            if library is None:
                raise ValueError("library_scaling needs each cell's library size")
            mean = (self.mean_act(mean_raw) * library.reshape(-1, 1)).clamp(lo, hi)
        else:
            mean = self.mean_act(mean_raw).clamp(lo, hi)
        if legacy:
            dispersion = self.theta_act(theta_raw).clamp(
                LEGACY_DISPERSION_MIN, LEGACY_DISPERSION_MAX
            )
            return mean, 1.0 / dispersion, self.gate_act(gate_raw)
        theta = self.theta_act(theta_raw).clamp(THETA_MIN, THETA_MAX)
        return mean, theta, (None if self.likelihood == "nb" else gate_raw)


def _check(likelihood: str) -> None:
    if likelihood not in ("legacy", "corrected", "nb"):
        raise ValueError(f"unknown likelihood {likelihood!r}")
