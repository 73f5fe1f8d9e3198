"""Evaluation protocol: null models, baselines, latent readouts, and one unit for every NLL."""

from __future__ import annotations

import logging
import warnings
from types import SimpleNamespace

import numpy as np
import pandas as pd
import pytest
import scipy.sparse as sp
import torch
from scipy.stats import nbinom

import scvit_core as sc
from scvit_core import _constants as K
from scvit_core import baselines as B
from scvit_core import evaluate as E
from scvit_core.api import ScViTModel
from scvit_core.config import ScViTConfig
from scvit_core.data import stratified_subsample
from scvit_core.likelihood import nll as scvit_nll

logging.getLogger("lightning.pytorch").setLevel(logging.ERROR)
logging.getLogger("lightning.fabric").setLevel(logging.ERROR)
logging.getLogger("scvi").setLevel(logging.ERROR)


@pytest.fixture(scope="module")
def zeisel():
    """480 Zeisel cells (stratified) x the 400 genes with most counts, no empty cells."""
    adata = sc.load_dataset("zeisel2015")
    adata = adata[stratified_subsample(adata.obs[K.CELL_TYPE], 480, seed=0)]
    totals = np.asarray(adata.X.sum(0)).ravel()
    adata = adata[:, np.sort(np.argsort(-totals)[:400])]
    adata = adata[np.asarray(adata.X.sum(1)).ravel() > 0].copy()
    return adata


@pytest.fixture(scope="module")
def scvit(zeisel, tmp_path_factory):
    model = ScViTModel(zeisel, ScViTConfig.small(zeisel.n_vars, likelihood="corrected"))
    model.train(
        epochs=2,
        batch_size=64,
        enable_progress_bar=False,
        output_dir=tmp_path_factory.mktemp("run"),
    )
    return model


@pytest.fixture(scope="module")
def scvi_result(zeisel):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return B.train_scvi(zeisel, n_latent=8, max_epochs=2, seed=0, accelerator="cpu")


def _test_cells(adata):
    return adata[(adata.obs[K.SPLIT] == "test").to_numpy()]


# --- one unit for every reconstruction number ----------------------------------------------


def test_scvi_reconstruction_error_by_hand(scvi_result, zeisel):
    """scVI's number is -log p(x | z) under its ZINB, summed over genes, for one z ~ q(z | x)."""
    model = scvi_result.model
    per_cell = B.scvi_reconstruction_error(model, zeisel, seed=3, return_mean=False)
    per_cell = per_cell["reconstruction_loss"]
    mean = B.scvi_reconstruction_error(model, zeisel, seed=3)["reconstruction_loss"]
    assert mean == pytest.approx(per_cell.mean(), rel=1e-6)

    # By hand: the same data loader and seed (so the same posterior sample), scVI's inference
    # with the observed library size, and its ZINB re-read as pyro's zero-inflated NB with
    # logits log(mu) - log(theta): scViT's "corrected" likelihood, i.e. our own code path.
    data = model._validate_anndata(B._counts_adata(zeisel, "test", None))
    torch.manual_seed(3)
    rows = []
    with torch.inference_mode():
        for tensors in model._make_data_loader(adata=data):
            inf = model.module.inference(**model.module._get_inference_input(tensors))
            x = tensors["X"]
            np.testing.assert_allclose(inf["library"][:, 0], torch.log(x.sum(1)), rtol=1e-6)
            px = model.module.generative(**model.module._get_generative_input(tensors, inf))["px"]
            params = SimpleNamespace(mean=px.mu, theta=px.theta, gate_logits=px.zi_logits)
            rows.append(scvit_nll(params, x, likelihood="corrected"))
    by_hand = torch.cat(rows).double().numpy()
    assert len(by_hand) == (zeisel.obs[K.SPLIT] == "test").sum()
    np.testing.assert_allclose(per_cell, by_hand, rtol=1e-4)


def test_scvit_reconstruction_error_is_mean_of_likelihood_nll(scvit, zeisel):
    test = _test_cells(zeisel)
    counts = torch.tensor(test.X.toarray(), dtype=torch.float32)
    model = scvit.model.cpu().eval()
    with torch.no_grad():
        out = model(counts, library=counts.sum(1))
        by_hand = scvit_nll(out, counts, likelihood="corrected").double().mean()
    value = scvit.get_reconstruction_error(zeisel, split="test")["reconstruction_loss"]
    assert value == pytest.approx(float(by_hand), rel=1e-6)


@pytest.mark.parametrize("library_scaled", [False, True])
def test_null_nll_matches_scipy(zeisel, library_scaled):
    null = B.fit_null_nb(zeisel, library_scaled=library_scaled)
    test = _test_cells(zeisel)
    X = test.X[:5].toarray().astype(float)
    mu = null.mean(X.sum(1))
    by_hand = -nbinom.logpmf(X, null.theta, null.theta / (null.theta + mu)).sum(1)
    np.testing.assert_allclose(null.nll(X), by_hand, rtol=1e-9)
    np.testing.assert_allclose(null.nll(zeisel, split="test")[:5], by_hand, rtol=1e-9)
    train_mean = np.asarray(zeisel.X[(zeisel.obs[K.SPLIT] == "train").to_numpy()].mean(0))
    if not library_scaled:  # fitted on the training cells only
        np.testing.assert_allclose(null.gene_param, train_mean.ravel())


def test_all_reconstruction_numbers_same_units(scvit, scvi_result, zeisel):
    values = {
        "scvi": B.scvi_reconstruction_error(scvi_result.model, zeisel)["reconstruction_loss"],
        "scvit": scvit.get_reconstruction_error(zeisel, split="test")["reconstruction_loss"],
        "null": B.fit_null_nb(zeisel).reconstruction_error(zeisel, split="test")[
            "reconstruction_loss"
        ],
        "null_library": B.fit_null_nb(zeisel, library_scaled=True).reconstruction_error(
            zeisel, split="test"
        )["reconstruction_loss"],
    }
    v = np.array(list(values.values()))
    assert np.isfinite(v).all() and (v > 0).all(), values
    # Summed over 400 genes per cell: all in the hundreds to thousands, within 10x of each other.
    assert v.max() / v.min() < 10, values


# --- null models ----------------------------------------------------------------------------


def test_library_scaled_null_beats_constant_on_varying_libraries():
    rng = np.random.default_rng(0)
    n, genes = 1000, 40
    library = rng.lognormal(np.log(500), 0.8, n)
    share = rng.dirichlet(np.ones(genes))
    X = rng.negative_binomial(5.0, 5.0 / (5.0 + library[:, None] * share[None, :]))
    train, test = X[:800], X[800:]
    constant = B.fit_null_nb(sp.csr_matrix(train))
    scaled = B.fit_null_nb(sp.csr_matrix(train), library_scaled=True)
    assert constant.converged and scaled.converged
    assert scaled.nll(test).mean() < 0.9 * constant.nll(test).mean()


@pytest.mark.parametrize("theta", [0.5, 4.0])
def test_mle_theta_recovers_known_dispersion(theta):
    rng = np.random.default_rng(1)
    mu = np.array([0.5, 2.0, 10.0, 50.0])
    X = rng.negative_binomial(theta, theta / (theta + mu), size=(20000, 4))
    null = B.fit_null_nb(X)
    np.testing.assert_allclose(null.gene_param, X.mean(0))
    np.testing.assert_allclose(null.theta, theta, rtol=0.12)
    # Library scaling on data whose mean does not follow the library still converges (cells
    # with no counts carry no information on theta and are skipped).
    scaled = B.fit_null_nb(X, library_scaled=True)
    assert scaled.converged and np.isfinite(scaled.nll(X)).all()


def test_poisson_gene_clamped_not_diverging():
    X = np.random.default_rng(2).poisson(3.0, size=(2000, 2))
    null = B.fit_null_nb(X)
    assert np.isfinite(null.nll(X)).all() and (null.theta > 10).all()


# --- latent readouts ------------------------------------------------------------------------


def toy_latent(seed, separable):
    rng = np.random.default_rng(seed)
    y = np.repeat(np.array(["a", "b", "c", "d"]), 60)
    z = rng.normal(size=(240, 16)).astype(np.float32)
    if separable:
        z[:, :4] += 8.0 * (y[:, None] == np.array(["a", "b", "c", "d"])[None, :])
    idx = rng.permutation(240)
    return z[idx], y[idx]


def test_classifiers_on_separable_and_random_latents():
    z, y = toy_latent(0, separable=True)
    table = E.classifier_metrics(z[:160], y[:160], z[160:], y[160:], seed=0)
    assert list(table.columns) == E.COLUMNS and (table["label_key"] == K.CELL_TYPE).all()
    assert table.set_index("metric")["value"].min() >= 0.97, table
    z, y = toy_latent(1, separable=False)
    table = E.classifier_metrics(z[:160], y[:160], z[160:], y[160:], seed=0)
    acc = table[table["metric"].str.endswith("accuracy")]["value"]
    assert (acc < 0.5).all(), table  # chance is 0.25


def test_mlp_is_seeded_and_matches_report_architecture():
    z, y = toy_latent(0, separable=True)
    codes = np.searchsorted(np.unique(y), y)
    a = E.mlp_predict(z[:160], codes[:160], z[160:], seed=5)
    b = E.mlp_predict(z[:160], codes[:160], z[160:], seed=5)
    np.testing.assert_array_equal(a, b)
    mlp = E.ReportMLP(64, 7)
    shapes = [m.weight.shape for m in mlp.modules() if isinstance(m, torch.nn.Linear)]
    assert shapes == [(256, 64), (256, 256), (7, 256)]
    assert [m.p for m in mlp.modules() if isinstance(m, torch.nn.Dropout)] == [0.4]


def test_scib_metrics_finite_on_separable_and_guarded():
    z, y = toy_latent(0, separable=True)
    table = E.bio_conservation(z, y, label_key="cell_type")
    values = table.set_index("metric")["value"]
    assert np.isfinite(values).all() and values["nmi"] > 0.9 and values["ari"] > 0.9, table
    with pytest.warns(RuntimeWarning, match="scib"):
        bad = E.bio_conservation(z[:1], y[:1])  # one cell: nothing to cluster
    assert bad["value"].isna().any()


def test_evaluate_embedding_both_label_levels(zeisel):
    pca = B.pca_baseline(zeisel, n_components=16)
    n = {s: int((zeisel.obs[K.SPLIT] == s).sum()) for s in K.SPLITS}
    assert pca["train"].shape == (n["train"], 16) and pca["test"].shape == (n["test"], 16)
    latent = np.zeros((zeisel.n_obs, 16), dtype=np.float32)
    for s in K.SPLITS:
        latent[(zeisel.obs[K.SPLIT] == s).to_numpy()] = pca[s]
    table = E.evaluate_embedding(zeisel, latent, scib=False, mlp_epochs=2)
    assert set(table["label_key"]) == {K.CELL_TYPE, K.CELL_TYPE_FINE}
    assert len(table) == 12 and table["value"].between(0, 1).all()
    major = table[(table["label_key"] == K.CELL_TYPE) & (table["metric"] == "logreg_accuracy")]
    assert major["value"].item() > 0.7  # PCA of Zeisel's major types is easy
    counts = B.counts_logreg_baseline(zeisel)
    assert 0.7 < counts["accuracy"] <= 1 and 0 < counts["macro_f1"] <= 1


def test_untrained_null_and_scvi_latent_shapes(zeisel, scvi_result):
    untrained = B.untrained_scvit(zeisel, ScViTConfig.small(zeisel.n_vars), seed=0)
    assert not untrained.is_trained
    z = untrained.get_latent_representation(zeisel, split="test")
    n_test = int((zeisel.obs[K.SPLIT] == "test").sum())
    assert z.shape == (n_test, untrained.config.n_latent) and np.isfinite(z).all()
    again = B.untrained_scvit(zeisel, ScViTConfig.small(zeisel.n_vars), seed=0)
    np.testing.assert_array_equal(again.get_latent_representation(zeisel, split="test"), z)
    assert B.scvi_latent(scvi_result.model, zeisel).shape == (n_test, 8)
    assert scvi_result.wall_time_s > 0 and scvi_result.n_train == (
        (zeisel.obs[K.SPLIT] == "train").sum()
    )


# --- cost and checkpoints -------------------------------------------------------------------


def test_cost_rows(scvit):
    with E.timer() as t:
        sum(range(1000))
    table = E.cost_metrics(wall_time_s=t["wall_time_s"], n_cells=100, module=scvit.model)
    values = table.set_index("metric")["value"]
    assert values["n_parameters"] == sum(p.numel() for p in scvit.model.parameters())
    assert values["peak_memory_mb"] > 0 and values["cells_per_s"] > 0
    assert "torch threads" in values["hardware"]


def test_checkpoints_final_and_best(scvit, zeisel):
    last = E.load_checkpoint_weights(scvit, scvit.train_result.last_checkpoint)
    final_value = scvit.get_reconstruction_error(zeisel, split="test")["reconstruction_loss"]
    assert last.get_reconstruction_error(zeisel, split="test")[
        "reconstruction_loss"
    ] == pytest.approx(final_value, rel=1e-6)
    assert last.module is not scvit.module
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        table = E.evaluate_checkpoints(scvit, zeisel, latent=True, scib=False, mlp_epochs=1)
    assert {"metric", "label_key", "final", "best", "rel_diff", "differs"} <= set(table.columns)
    row = table[table["metric"] == "reconstruction_loss"].iloc[0]
    assert row["final"] == pytest.approx(final_value, rel=1e-6)
    assert table["differs"].dtype == bool and table.attrs["best_epoch"] in (1, 2)
    strict = pd.DataFrame(table)
    assert (strict["differs"] == (strict["rel_diff"].abs() > 0.05)).all()


def test_a_best_checkpoint_equal_to_the_final_weights_is_evaluated_once(scvit, zeisel, monkeypatch):
    """When the last epoch is the best, its checkpoint holds the final weights: no second pass."""
    calls = []
    evaluate = E.evaluate_scvit
    monkeypatch.setattr(E, "evaluate_scvit", lambda *a, **k: calls.append(1) or evaluate(*a, **k))
    monkeypatch.setattr(scvit.train_result, "best_checkpoint", scvit.train_result.last_checkpoint)
    table = E.evaluate_checkpoints(scvit, zeisel, latent=True, scib=False, mlp_epochs=1)
    assert len(calls) == 1
    assert (table["final"] == table["best"]).all() and not table["differs"].any()
    # a checkpoint with other weights is evaluated on its own
    other = E.load_checkpoint_weights(scvit, scvit.train_result.last_checkpoint)
    with torch.no_grad():
        next(other.model.parameters()).add_(1.0)
    assert not E._same_weights(scvit, other)
