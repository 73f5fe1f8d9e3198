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
    """Per-gene log-likelihood of raw ``counts``, shape ``(cells, genes)``."""
    return distribution(params, likelihood=likelihood).log_prob(counts)


def nll(params: NBParams, counts: torch.Tensor, *, likelihood: str) -> torch.Tensor:
    """Negative log-likelihood per cell, summed over genes, shape ``(cells,)``.

    The training loss (and the report's "reconstruction loss") is its mean over cells.
    """
    return -log_prob(params, counts, likelihood=likelihood).sum(-1)


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
