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


# ---------------------------------------------------------------------------------------
# The fused NLL (count_nll, behind nll) against pyro's log_prob and autograd
# ---------------------------------------------------------------------------------------

LIKELIHOODS = ["legacy", "corrected", "nb"]


def extreme_params():
    """Every combination of clamp-bound and ordinary parameters with zero to huge counts."""
    grid = np.meshgrid(
        [lik.MEAN_MIN, 1e-2, 1.0, 1e3, lik.MEAN_MAX],  # mean
        [lik.THETA_MIN, 1e-2, 1.0, 1e3, lik.THETA_MAX],  # theta (legacy: 1 / dispersion)
        [-30.0, -3.0, 0.0, 3.0, 30.0],  # gate logits
        [0.0, 1.0, 7.0, 1e3, 1e5, 1e7],  # counts
        indexing="ij",
    )
    return [a.reshape(30, 25) for a in grid]  # 750 (cell, gene) pairs


def params_for(case):
    if case == "extreme":
        return extreme_params()
    mean, theta, gate, counts = random_params(10, shape=(16, 200))
    return mean, theta, gate, counts


def pyro_and_fused(mean, theta, gate, counts, likelihood, dtype):
    """Per-cell NLL and its gradients (mean, theta, gate) from pyro and from count_nll."""
    out = {}
    for name in ("pyro", "fused"):
        leaves = [torch.tensor(a, dtype=dtype, requires_grad=True) for a in (mean, theta, gate)]
        params = Params(*leaves[:2], None if likelihood == "nb" else leaves[2])
        x = torch.tensor(counts, dtype=dtype)
        if name == "pyro":
            value = -log_prob(params, x, likelihood=likelihood).sum(-1)
        else:
            value = nll(params, x, likelihood=likelihood)
        value.sum().backward()
        grads = [leaf.grad for leaf in leaves[: 2 if likelihood == "nb" else 3]]
        out[name] = [value.detach(), *grads]
    return out["pyro"], out["fused"]


@pytest.mark.parametrize("case", ["random", "extreme"])
@pytest.mark.parametrize("likelihood", LIKELIHOODS)
def test_fused_nll_and_gradients_equal_pyro(likelihood, case):
    mean, theta, gate, counts = params_for(case)
    want, got = pyro_and_fused(mean, theta, gate, counts, likelihood, torch.float64)
    torch.testing.assert_close(got[0], want[0], rtol=1e-9, atol=0)
    # Gradients within 1e-5 relative. Where a gradient is a difference of nearly equal terms
    # (d/dtheta ~ 1e-25 at mean 1e-6, theta 1e6: two 1e-12 terms) both agree only to
    # rounding, 1e-12 absolute. d/dgate = sigmoid(z) - sigmoid(-g) is off by up to e^-20 in
    # pyro, whose softplus is linear above 20 (gradient exactly 1): 3e-9 absolute there.
    for g, w, atol in zip(got[1:], want[1:], [1e-12, 1e-12, 3e-9], strict=False):
        torch.testing.assert_close(g, w, rtol=1e-5, atol=atol)
    # Without a gradient (evaluation) the forward-only path gives the same values.
    params = as_params(mean, theta, None if likelihood == "nb" else gate)
    with torch.no_grad():
        value = nll(params, torch.tensor(counts), likelihood=likelihood)
    torch.testing.assert_close(value, got[0], rtol=1e-12, atol=0)


@pytest.mark.parametrize("case", ["random", "extreme"])
@pytest.mark.parametrize("likelihood", LIKELIHOODS)
def test_fused_nll_float32_is_as_accurate_as_pyro(likelihood, case):
    """In float32 (the trainer's precision) pyro is itself off the exact values by up to
    ~2e-5 at the extremes (log-gamma of 1e6 + x); the fused NLL is no further off."""
    mean, theta, gate, counts = params_for(case)
    exact, _ = pyro_and_fused(mean, theta, gate, counts, likelihood, torch.float64)
    pyro32, fused32 = pyro_and_fused(mean, theta, gate, counts, likelihood, torch.float32)

    def error(a, b):  # largest error relative to the largest value of the tensor
        return float((a.double() - b).abs().max() / b.abs().max())

    for f, p, e in zip(fused32, pyro32, exact, strict=True):
        assert f.dtype == torch.float32
        assert error(f, e) <= 1.5 * error(p, e) + 1e-6

    def per_cell(a):  # largest relative error of a cell's NLL
        return float(((a.double() - exact[0]) / exact[0]).abs().max())

    assert per_cell(fused32[0]) <= 1.5 * per_cell(pyro32[0]) + 1e-6
    if case == "random":
        assert per_cell(fused32[0]) < 1e-5


def test_nll_stays_float32_under_bf16_autocast():
    mean, theta, gate, counts = random_params(11)
    leaves = [torch.tensor(a, dtype=torch.float32, requires_grad=True) for a in (mean, theta, gate)]
    x = torch.tensor(counts, dtype=torch.float32)
    want = nll(Params(*leaves), x, likelihood="corrected")
    with torch.autocast("cpu", dtype=torch.bfloat16):
        got = nll(Params(*leaves), x, likelihood="corrected")
        # bfloat16 parameters (a network's outputs under autocast) are computed in float32
        half = nll(Params(*(t.bfloat16() for t in leaves)), x, likelihood="corrected")
    assert got.dtype == half.dtype == torch.float32
    torch.testing.assert_close(got, want, rtol=0, atol=0)
    got.sum().backward()
    assert all(leaf.grad.dtype == torch.float32 for leaf in leaves)


def test_fused_nll_broadcasts_and_checks_its_gate():
    mean, theta, _, counts = random_params(12)
    m, x = torch.tensor(mean), torch.tensor(counts)
    r = torch.tensor(theta[0], requires_grad=True)  # (genes,): one theta per gene
    value = lik.count_nll(m, r, None, x, likelihood="nb")
    want = -log_prob(Params(m, r.expand_as(m)), x, likelihood="nb").sum(-1)
    torch.testing.assert_close(value, want, rtol=1e-12, atol=0)
    value.sum().backward()
    assert r.grad.shape == r.shape
    with pytest.raises(ValueError, match="needs gate_logits"):
        lik.count_nll(m, r, None, x, likelihood="corrected")
