"""Property-based tests (hypothesis): likelihoods against scipy, gene alignment round trips,
validation with one planted defect.

Seeded (``derandomize=True``, no example database) and bounded, so every run draws the same
examples and the file takes a few seconds.
"""

from __future__ import annotations

import math

import anndata as ad
import numpy as np
import pandas as pd
import pytest
import scipy.sparse as sp
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from scipy import special

from scvit_core import likelihood as lik
from scvit_core.data import (
    MIN_GENE_OVERLAP,
    CountDataError,
    align_genes,
    prepare_counts,
    validate_counts,
)

SETTINGS = settings(
    max_examples=60,
    derandomize=True,
    database=None,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)


# --- NB / ZINB log-likelihoods against scipy, in both parametrisations ---------------------


def log_uniform(low: float, high: float) -> st.SearchStrategy[float]:
    return st.floats(math.log10(low), math.log10(high)).map(lambda e: 10.0**e)


# the clamps themselves, and anything between them
MEANS = st.one_of(
    st.sampled_from([lik.MEAN_MIN, lik.MEAN_MAX]), log_uniform(lik.MEAN_MIN, lik.MEAN_MAX)
)
THETAS = st.one_of(
    st.sampled_from([lik.THETA_MIN, lik.THETA_MAX]), log_uniform(lik.THETA_MIN, lik.THETA_MAX)
)
GATES = st.floats(-30.0, 30.0)
COUNTS = st.one_of(st.just(0), st.integers(0, 20), st.integers(0, 10**6))
ENTRIES = st.lists(st.tuples(MEANS, THETAS, GATES, COUNTS), min_size=1, max_size=32)


class Params:
    def __init__(self, mean, theta, gate_logits):
        self.mean, self.theta, self.gate_logits = mean, theta, gate_logits


def scipy_log_prob(x, mean, theta, gate, likelihood: str) -> tuple[np.ndarray, np.ndarray]:
    """``log p(x)`` written from the documented NB mean with scipy's special functions, and the
    tolerance of a float64 computation of it: a few dozen ulps of its largest terms (the
    log-gamma differences cancel), plus, with zero inflation, pyro's softplus error.

    ``scipy.stats.nbinom`` needs ``p = theta / (theta + mu)``, which rounds to 1 when theta is
    at its upper clamp and mu small, so the reference is its log-pmf written out stably.
    """
    mu = theta * mean / (mean + theta) if likelihood == "legacy" else mean  # the NB's mean
    terms = [
        special.gammaln(x + theta),
        -special.gammaln(theta),
        -special.gammaln(x + 1),
        -theta * np.log1p(mu / theta),  # theta * log(theta / (theta + mu))
        special.xlogy(x, mu),
        -x * np.log(theta + mu),  # with the previous: x * log(mu / (theta + mu))
    ]
    log_nb = np.sum(terms, axis=0)
    tolerance = 1e-10 + 1e-14 * np.sum(np.abs(terms), axis=0)
    if likelihood == "nb":
        return log_nb, tolerance
    log_pi, log_1m_pi = -np.logaddexp(0, -gate), -np.logaddexp(0, gate)  # pi = sigmoid(gate)
    log_nb0 = -theta * np.log1p(mu / theta)
    zero = np.logaddexp(log_pi, log_1m_pi + log_nb0)
    # pyro's softplus has torch's threshold of 20 (softplus(y) = y above it): an error of at
    # most exp(-20) = 2.1e-9 in the log-probability
    return np.where(x == 0, zero, log_1m_pi + log_nb), tolerance + 1e-14 * np.abs(gate) + 2.1e-9


def assert_close(got: np.ndarray, want: np.ndarray, tolerance: np.ndarray) -> None:
    error = np.abs(got - want)
    worst = np.argmax(error / tolerance)
    assert error[worst] <= tolerance[worst], (got[worst], want[worst])


@SETTINGS
@given(entries=ENTRIES)
@pytest.mark.parametrize("likelihood", ["corrected", "nb", "legacy"])
def test_likelihood_matches_scipy(likelihood, entries):
    mean, theta, gate, x = map(np.array, zip(*entries, strict=True))
    x = x.astype(np.float64)
    params = Params(
        *(torch.tensor(a, dtype=torch.float64) for a in (mean, theta)),
        None if likelihood == "nb" else torch.tensor(gate, dtype=torch.float64),
    )
    got = lik.log_prob(params, torch.tensor(x), likelihood=likelihood).numpy()
    want, tolerance = scipy_log_prob(x, mean, theta, gate, likelihood)
    assert np.isfinite(got).all()
    assert_close(got, want, tolerance)


@SETTINGS
@given(
    raw=st.lists(st.tuples(*[st.floats(-60.0, 60.0)] * 3), min_size=1, max_size=16),
    counts=st.lists(COUNTS, min_size=16, max_size=16),
)
@pytest.mark.parametrize("likelihood", ["corrected", "nb", "legacy"])
def test_network_head_stays_within_its_clamps_and_matches_scipy(likelihood, raw, counts):
    """Raw outputs far beyond the clamps: the parameters are clamped, the likelihood finite."""
    head = OutputHead(likelihood)
    a, b, c = (torch.tensor(v, dtype=torch.float64)[:, None] for v in zip(*raw, strict=True))
    mean, theta, gate = head(a, b, c)
    low = lik.LEGACY_MEAN_MIN if likelihood == "legacy" else lik.MEAN_MIN
    assert (mean >= low).all() and (theta >= lik.THETA_MIN).all() and (theta <= 1e6).all()
    x = torch.tensor(counts[: len(raw)], dtype=torch.float64)[:, None]
    got = lik.log_prob(Params(mean, theta, gate), x, likelihood=likelihood).numpy()
    gate_np = np.zeros_like(got) if gate is None else gate.numpy()
    want, tolerance = scipy_log_prob(x.numpy(), mean.numpy(), theta.numpy(), gate_np, likelihood)
    assert_close(got, want, tolerance)


class OutputHead(torch.nn.Module):
    """:class:`~scvit_core.likelihood.OutputActivations` in float64."""

    def __init__(self, likelihood: str) -> None:
        super().__init__()
        self.act = lik.OutputActivations(likelihood).double()

    def forward(self, a, b, c):
        return self.act(a, b, c)


# --- gene alignment: permutations, subsets and supersets round-trip ------------------------

UNIVERSE = [f"g{i}" for i in range(24)]
GENE_LISTS = st.lists(st.sampled_from(UNIVERSE), unique=True, min_size=1, max_size=16)


def dense(X) -> np.ndarray:
    return X.toarray() if sp.issparse(X) else np.asarray(X)


def _matrix(counts: np.ndarray, form: str):
    if form == "dense float16":
        return counts.astype(np.float16)
    if form == "csc int64":
        return sp.csc_matrix(counts.astype(np.int64))
    return sp.csr_matrix(counts.astype(np.float32))


@SETTINGS
@given(
    reference=GENE_LISTS,
    query=GENE_LISTS,
    seed=st.integers(0, 2**32 - 1),
    n_cells=st.integers(1, 6),
    form=st.sampled_from(["dense float16", "csc int64", "csr float32"]),
)
def test_alignment_round_trips(reference, query, seed, n_cells, form):
    counts = np.random.default_rng(seed).integers(0, 50, size=(n_cells, len(query)))
    adata = ad.AnnData(X=_matrix(counts, form), var=pd.DataFrame(index=query))
    shared = [g for g in reference if g in query]
    if not shared:
        with pytest.raises(CountDataError, match=f"only 0 of {len(reference)} reference genes"):
            align_genes(adata, reference)
        return
    aligned, report = align_genes(adata, reference)
    assert (report.n_matched, report.n_missing, report.n_extra) == (
        len(shared),
        len(reference) - len(shared),
        len(query) - len(shared),
    )
    assert list(aligned.var_names) == reference
    expected = np.zeros((n_cells, len(reference)))
    for j, gene in enumerate(reference):
        if gene in query:
            expected[:, j] = counts[:, query.index(gene)]
    np.testing.assert_array_equal(aligned.X.toarray(), expected)
    assert aligned.var["present"].tolist() == [g in query for g in reference]
    # and back: the matched genes return to their columns, the dropped ones come back as zeros
    back, again = align_genes(aligned, query)
    assert (again.n_matched, again.n_missing, again.n_extra) == (
        len(shared),
        len(query) - len(shared),
        len(reference) - len(shared),
    )
    np.testing.assert_array_equal(back.X.toarray(), counts * np.isin(query, reference))
    assert list(adata.var_names) == query  # the input is untouched
    np.testing.assert_array_equal(dense(adata.X), counts)
    # the models' entry path: the same alignment, refused below the minimum overlap
    if len(shared) >= math.ceil(MIN_GENE_OVERLAP * len(reference)):
        prepared = prepare_counts(adata, reference)
        np.testing.assert_array_equal(dense(prepared.adata.X), expected)
    else:
        with pytest.raises(CountDataError, match=f"only {len(shared)} of {len(reference)}"):
            prepare_counts(adata, reference)


# --- validation: clean counts pass, one planted defect is always caught ---------------------

PLANTED = {
    "negative": "negative values",
    "non-integer": "non-integer values",
    "NaN": "NaN or infinite",
    "infinite": "NaN or infinite",
    "empty cell": "counts are all zero",
    "duplicated gene": "duplicated gene names",
}


@pytest.mark.filterwarnings("ignore:Variable names are not unique")
@SETTINGS
@given(
    seed=st.integers(0, 2**32 - 1),
    shape=st.tuples(st.integers(1, 40), st.integers(2, 30)),
    density=st.floats(0.0, 0.5),
    form=st.sampled_from(["csr", "csc", "dense"]),
    dtype=st.sampled_from([np.float32, np.float64, np.int32, np.int64]),
    chunk_size=st.integers(1, 50),
    defect=st.sampled_from([None, *PLANTED]),
)
def test_validation_catches_any_single_defect(
    seed, shape, density, form, dtype, chunk_size, defect
):
    rng = np.random.default_rng(seed)
    n_cells, n_genes = shape
    counts = np.where(rng.random(shape) < density, rng.integers(1, 1000, shape), 0)
    counts[np.arange(n_cells), rng.integers(0, n_genes, n_cells)] += 1  # no empty cell
    cell, gene = rng.integers(0, n_cells), rng.integers(0, n_genes)
    genes = [f"g{j}" for j in range(n_genes)]
    if defect in ("non-integer", "NaN", "infinite"):
        dtype = np.float32 if dtype in (np.int32, np.int64) else dtype
    values = counts.astype(dtype)
    if defect == "negative":
        values[cell, gene] = -rng.integers(1, 5)
    elif defect == "non-integer":
        values[cell, gene] += 0.5
    elif defect == "NaN":
        values[cell, gene] = np.nan
    elif defect == "infinite":
        values[cell, gene] = np.inf * rng.choice([-1, 1])
    elif defect == "empty cell":
        values[cell] = 0
    elif defect == "duplicated gene":
        genes[gene] = genes[(gene + 1) % n_genes]
    X = values if form == "dense" else getattr(sp, f"{form}_matrix")(values)
    if defect == "empty cell" and form != "dense" and rng.random() < 0.5:
        X = sp.csr_matrix(X)
        X.data[X.indptr[cell] : X.indptr[cell + 1]] = 0  # explicit zeros: still an empty cell
    adata = ad.AnnData(X=X, var=pd.DataFrame(index=genes))
    if defect is None:
        summary = validate_counts(X, chunk_size=chunk_size)
        assert (summary.n_nonzero, summary.total_counts) == (np.count_nonzero(counts), counts.sum())
        assert prepare_counts(adata, allow_empty_cells=False).adata is adata
        return
    if defect != "duplicated gene":
        with pytest.raises(CountDataError, match=PLANTED[defect]):
            validate_counts(X, chunk_size=chunk_size)
    with pytest.raises(CountDataError, match=PLANTED[defect]):
        prepare_counts(adata, allow_empty_cells=False)
