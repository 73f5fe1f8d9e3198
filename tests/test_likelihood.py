"""Likelihoods against scipy.stats.nbinom with the zero inflation written out by hand."""

import numpy as np
import pytest
import torch
from scipy import stats
from scipy.special import expit

from scvit_core import likelihood as lik
from scvit_core.likelihood import OutputActivations, distribution, log_prob, nb_mean, nll


class Params:
    def __init__(self, mean, theta, gate_logits=None):
        self.mean, self.theta, self.gate_logits = mean, theta, gate_logits


def random_params(seed=0, shape=(20, 30)):
    rng = np.random.default_rng(seed)
    mean = rng.lognormal(0.0, 2.0, shape)
    theta = rng.lognormal(0.0, 1.5, shape)
    gate = rng.normal(0.0, 2.0, shape)
    counts = rng.negative_binomial(2, 0.2, shape).astype(float)
    counts[rng.random(shape) < 0.4] = 0.0
    return mean, theta, gate, counts


def scipy_zinb_logpmf(counts, nb_mean_, theta, pi):
    """log(pi + (1 - pi) NB(0)) at 0 and log((1 - pi) NB(x)) elsewhere; NB with mean nb_mean_."""
    p = theta / (theta + nb_mean_)  # scipy: P(k) = C(k + n - 1, k) p^n (1 - p)^k, mean n (1-p)/p
    nb = stats.nbinom(n=theta, p=p)
    zero = np.log(pi + (1 - pi) * nb.pmf(0))
    nonzero = np.log1p(-pi) + nb.logpmf(counts)
    return np.where(counts == 0, zero, nonzero)


def as_params(mean, theta, gate):
    t = lambda a: None if a is None else torch.tensor(a, dtype=torch.float64)  # noqa: E731
    return Params(t(mean), t(theta), t(gate))


def test_corrected_matches_scipy():
    mean, theta, gate, counts = random_params(0)
    got = log_prob(as_params(mean, theta, gate), torch.tensor(counts), likelihood="corrected")
    want = scipy_zinb_logpmf(counts, mean, theta, expit(gate))
    np.testing.assert_allclose(got.numpy(), want, rtol=1e-9, atol=1e-9)


def test_nb_matches_scipy():
    mean, theta, _, counts = random_params(1)
    got = log_prob(as_params(mean, theta, None), torch.tensor(counts), likelihood="nb")
    want = stats.nbinom(n=theta, p=theta / (theta + mean)).logpmf(counts)
    np.testing.assert_allclose(got.numpy(), want, rtol=1e-9, atol=1e-9)


def test_legacy_matches_scipy_with_implied_mean():
    mean, theta, gate, counts = random_params(2)
    implied = theta * mean / (mean + theta)  # r m / (m + r), written out independently
    got = log_prob(as_params(mean, theta, gate), torch.tensor(counts), likelihood="legacy")
    want = scipy_zinb_logpmf(counts, implied, theta, expit(gate))
    np.testing.assert_allclose(got.numpy(), want, rtol=1e-9, atol=1e-9)


@pytest.mark.parametrize("likelihood", ["legacy", "corrected", "nb"])
def test_distribution_mean(likelihood):
    mean, theta, gate, _ = random_params(3)
    params = as_params(mean, theta, None if likelihood == "nb" else gate)
    d = distribution(params, likelihood=likelihood)
    nb = theta * mean / (mean + theta) if likelihood == "legacy" else mean
    want = nb if likelihood == "nb" else (1 - expit(gate)) * nb
    np.testing.assert_allclose(d.mean.numpy(), want, rtol=1e-9)
    np.testing.assert_allclose(
        nb_mean(params.mean, params.theta, likelihood=likelihood).numpy(), nb, rtol=1e-12
    )


def test_legacy_mean_is_bounded_by_theta_and_mean():
    mean, theta, _, _ = random_params(4)
    implied = nb_mean(torch.tensor(mean), torch.tensor(theta), likelihood="legacy").numpy()
    assert np.all(implied < np.minimum(mean, theta))


@pytest.mark.parametrize("likelihood", ["legacy", "corrected", "nb"])
def test_nll_sums_over_genes(likelihood):
    mean, theta, gate, counts = random_params(5)
    params = as_params(mean, theta, None if likelihood == "nb" else gate)
    counts = torch.tensor(counts)
    per_cell = nll(params, counts, likelihood=likelihood)
    assert per_cell.shape == (20,)
    torch.testing.assert_close(per_cell, -log_prob(params, counts, likelihood=likelihood).sum(1))


def test_legacy_activations_follow_reference():
    raw = torch.linspace(-5, 5, 11).reshape(1, -1)
    mean, theta, gate = OutputActivations("legacy")(raw, raw, raw)
    torch.testing.assert_close(mean, raw.relu().clamp(lik.LEGACY_MEAN_MIN, lik.LEGACY_MEAN_MAX))
    disp = torch.nn.functional.softplus(raw).clamp(
        lik.LEGACY_DISPERSION_MIN, lik.LEGACY_DISPERSION_MAX
    )
    torch.testing.assert_close(theta, 1 / disp)
    torch.testing.assert_close(gate, torch.nn.functional.logsigmoid(raw))
    assert torch.all(torch.sigmoid(gate) <= 0.5)  # zero inflation at most 1/2


def test_library_scaling_sums_to_library():
    torch.manual_seed(0)
    raw = torch.randn(4, 50)
    library = torch.tensor([10.0, 200.0, 3000.0, 45.0])
    mean, _, _ = OutputActivations("corrected", library_scaling=True)(raw, raw, raw, library)
    torch.testing.assert_close(mean.sum(1), library)
    with pytest.raises(ValueError, match="library"):
        OutputActivations("corrected", library_scaling=True)(raw, raw, raw)
    with pytest.raises(ValueError, match="legacy"):
        OutputActivations("legacy", library_scaling=True)


@pytest.mark.parametrize("likelihood", ["legacy", "corrected", "nb"])
def test_extreme_inputs_are_nan_free(likelihood):
    raw = torch.tensor([[-1e30, -1e4, -50.0, 0.0, 50.0, 1e4, 1e30]], requires_grad=True)
    counts = torch.tensor([[0.0, 1e5, 0.0, 3.0, 0.0, 1e5, 7.0]])
    params = Params(*OutputActivations(likelihood)(raw, raw * 0.5, -raw))
    loss = nll(params, counts, likelihood=likelihood).mean()
    loss.backward()
    assert torch.isfinite(loss)
    assert torch.isfinite(raw.grad).all()


def test_unknown_likelihood():
    with pytest.raises(ValueError, match="unknown likelihood"):
        OutputActivations("poisson")


@pytest.mark.parametrize("likelihood", ["corrected", "nb"])
def test_tiny_dispersion_parameter_does_not_stop_training(likelihood):
    # theta at its lower clamp with a large mean: sigmoid(logits) rounds to 1 in float32, which
    # pyro's argument validation rejected mid-training; log_prob itself is finite.
    mean = torch.tensor([[100.0, 5.0]])
    theta = torch.full_like(mean, lik.THETA_MIN)
    gate = None if likelihood == "nb" else torch.zeros_like(mean)
    counts = torch.tensor([[0.0, 3.0]])
    value = nll(Params(mean, theta, gate), counts, likelihood=likelihood)
    assert torch.isfinite(value).all()
    r = float(lik.THETA_MIN)
    expected = -stats.nbinom.logpmf([0, 3], r, r / (mean.double().numpy()[0] + r))
    if likelihood == "corrected":  # gate probability 1/2 mixes in a point mass at zero
        expected = -np.log(0.5 * np.exp(-expected) + np.array([0.5, 0.0]))
    np.testing.assert_allclose(value.numpy()[0], expected.sum(), rtol=1e-3)
