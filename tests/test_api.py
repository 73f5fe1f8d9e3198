"""ScViTModel: AnnData in, latents and scVI-unit reconstruction errors out, save/load."""

from __future__ import annotations

import logging
import warnings

import numpy as np
import pytest
import torch

import scvit_core as sc
from scvit_core import _constants as K
from scvit_core.api import ScViTModel
from scvit_core.config import ScViTConfig
from scvit_core.data import stratified_subsample
from scvit_core.likelihood import distribution

logging.getLogger("lightning.pytorch").setLevel(logging.ERROR)
logging.getLogger("lightning.fabric").setLevel(logging.ERROR)


@pytest.fixture(scope="module")
def zeisel():
    adata = sc.load_dataset("zeisel2015")
    return adata[stratified_subsample(adata.obs["cell_type"], 300, seed=0)].copy()


@pytest.fixture(scope="module")
def trained(zeisel, tmp_path_factory):
    model = ScViTModel(zeisel, ScViTConfig.small(zeisel.n_vars, likelihood="corrected"))
    model.train(
        epochs=1,
        batch_size=64,
        enable_progress_bar=False,
        output_dir=tmp_path_factory.mktemp("run"),
    )
    return model


def snapshot(adata):
    return (adata.X.copy(), adata.obs.copy(), dict(adata.obsm), dict(adata.uns), adata.n_vars)


def assert_unchanged(adata, before):
    X, obs, obsm, uns, n_vars = before
    assert (adata.X != X).nnz == 0 and adata.n_vars == n_vars
    assert adata.obs.equals(obs) and set(adata.obsm) == set(obsm) and set(adata.uns) == set(uns)


def test_default_config_and_history(trained, zeisel):
    assert ScViTModel(zeisel).config == ScViTConfig.for_genes(zeisel.n_vars)
    assert list(trained.history.columns[:3]) == ["epoch", "train_loss", "val_loss"]
    assert len(trained.history) == 1 and np.isfinite(trained.history["val_loss"]).all()


def test_latent_leaves_adata_untouched_unless_store(trained, zeisel):
    before = snapshot(zeisel)
    z = trained.get_latent_representation(zeisel)
    assert z.shape == (zeisel.n_obs, 8) and z.dtype == np.float32 and np.isfinite(z).all()
    assert_unchanged(zeisel, before)
    test = trained.get_latent_representation(zeisel, split="test")
    # Same cells in other batches: equal up to float rounding (BLAS blocking depends on shape).
    np.testing.assert_allclose(
        test, z[(zeisel.obs[K.SPLIT] == "test").to_numpy()], rtol=1e-5, atol=1e-6
    )
    copy = zeisel.copy()
    assert trained.get_latent_representation(copy, store=True) is None
    np.testing.assert_array_equal(copy.obsm[K.LATENT], z)


def test_reconstruction_error_in_scvi_units(trained, zeisel):
    """scVI: -log p summed over genes per cell, averaged over cells, key reconstruction_loss."""
    test = zeisel[zeisel.obs[K.SPLIT] == "test"]
    counts = torch.tensor(test.X.toarray(), dtype=torch.float32)
    model = trained.model.cpu().eval()
    with torch.no_grad():
        out = model(counts, library=counts.sum(1))
        log_p = distribution(out, likelihood="corrected").log_prob(counts)  # (cells, genes)
    by_hand = float((-log_p.sum(dim=1)).double().mean())
    error = trained.get_reconstruction_error(zeisel, split="test")
    assert set(error) == {"reconstruction_loss"}
    assert error["reconstruction_loss"] == pytest.approx(by_hand, rel=1e-6)
    per_cell = trained.get_reconstruction_error(zeisel, split="test", return_mean=False)
    assert per_cell["reconstruction_loss"].shape == (test.n_obs,)


def test_save_load_identical(trained, zeisel, tmp_path):
    trained.save(tmp_path / "model")
    with pytest.raises(FileExistsError):
        trained.save(tmp_path / "model")
    loaded = ScViTModel.load(tmp_path / "model", zeisel)
    assert loaded.config == trained.config and loaded.genes == trained.genes
    assert loaded.train_config == trained.train_config
    np.testing.assert_array_equal(
        loaded.get_latent_representation(), trained.get_latent_representation()
    )
    assert loaded.get_reconstruction_error(split="test") == trained.get_reconstruction_error(
        zeisel, split="test"
    )
    unbound = ScViTModel.load(tmp_path / "model")
    np.testing.assert_array_equal(
        unbound.get_latent_representation(zeisel), trained.get_latent_representation()
    )


def test_gene_mismatch_is_aligned_and_reported(trained, zeisel):
    z = trained.get_latent_representation(zeisel)
    # The same genes in another order: aligned back, same latent.
    shuffled = zeisel[:, np.random.default_rng(0).permutation(zeisel.n_vars)].copy()
    with pytest.warns(UserWarning, match="reordered"):
        np.testing.assert_array_equal(trained.get_latent_representation(shuffled), z)
    # 10 genes missing (zero-filled), one extra (dropped).
    part = zeisel[:, 10:].copy()
    part.var_names = [*part.var_names[:-1], "not_a_gene"]
    with pytest.warns(UserWarning, match="11 missing .* 1 extra"):
        z_part = trained.get_latent_representation(part)
    assert z_part.shape == z.shape
    assert trained.last_alignment.n_missing == 11 and trained.last_alignment.n_extra == 1
    assert part.n_vars == zeisel.n_vars - 10  # the query itself is untouched


def test_train_without_split_does_not_modify_adata(tiny_counts, tmp_path):
    adata = tiny_counts
    before = snapshot(adata)
    config = ScViTConfig.small(30, likelihood="nb", stages=((8, 8, 4, 4), (8, 4, 8, 2)))
    model = ScViTModel(adata, config)
    model.train(epochs=1, batch_size=16, enable_progress_bar=False, output_dir=tmp_path)
    assert_unchanged(adata, before)
    assert K.SPLIT not in adata.obs
    model.train(
        epochs=1, batch_size=16, enable_progress_bar=False, output_dir=tmp_path, store_split=True
    )
    assert set(adata.obs[K.SPLIT].unique()) <= set(K.SPLITS)


def test_quiet_training_prints_no_lightning_notices(tiny_counts, tmp_path, capfd, caplog):
    config = ScViTConfig.small(30, likelihood="nb", stages=((8, 8, 4, 4), (8, 4, 8, 2)))
    model = ScViTModel(tiny_counts, config)
    capfd.readouterr()
    # this module silences Lightning for the other tests; a user's session does not
    lightning_info = caplog.at_level(logging.INFO, logger="lightning.pytorch")
    with lightning_info, warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        model.train(epochs=1, batch_size=16, enable_progress_bar=False, output_dir=tmp_path)
    out, err = capfd.readouterr()
    shown = out + err + caplog.text + "".join(str(w.message) for w in caught)
    for notice in ("GPU available", "TPU available", "Tip:", "LeafSpec"):
        assert notice not in shown


def test_bad_counts_are_rejected(tiny_counts):
    adata = tiny_counts.copy()
    adata.X = adata.X.astype(np.float32)
    adata.X.data[0] = -1.0
    model = ScViTModel(adata, ScViTConfig.small(30, stages=((8, 8, 4, 4), (8, 4, 8, 2))))
    with pytest.raises(sc.CountDataError, match="negative"):
        model.train(epochs=1, enable_progress_bar=False)
    with pytest.raises(ValueError, match="n_genes"):
        ScViTModel(adata, ScViTConfig.small(64))
