"""Experiment runner: spec keys, caching, provenance, the tidy results table."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from scvit_core import _constants as K
from scvit_core.experiments import (
    GRAD_NORM_EVERY,
    ExperimentSpec,
    prepare_data,
    results_table,
    run,
    run_many,
    summarise,
)


def test_spec_key_is_stable_and_ignores_the_label():
    a = ExperimentSpec.make("scvit", likelihood="corrected", attention=False, seed=1)
    b = ExperimentSpec.make("scvit", attention=False, likelihood="corrected", seed=1, label="x")
    assert a.key == b.key and len(a.key) == 16
    assert a.options == (("attention", False), ("likelihood", "corrected"))
    assert a.key != ExperimentSpec.make("scvit", likelihood="corrected", seed=2).key
    assert ExperimentSpec.from_dict(json.loads(json.dumps(a.to_dict()))) == a
    assert b.name == "x" and a.name == "scvit attention=False likelihood=corrected"


@pytest.mark.parametrize(
    ("fields", "message"),
    [
        (dict(model="svm"), "model must be one of"),
        (dict(preset="huge"), "preset must be one of"),
        (dict(train_fraction=0), "train_fraction must be in"),
        (dict(profile="laptop"), "unknown profile 'laptop'"),
    ],
)
def test_bad_specs_are_rejected(fields, message):
    with pytest.raises(ValueError, match=message):
        ExperimentSpec(**fields)


def test_training_fraction_keeps_validation_and_test_cells():
    full = prepare_data(ExperimentSpec(profile="ci"))
    half = prepare_data(ExperimentSpec(profile="ci", train_fraction=0.5))
    counts = full.obs[K.SPLIT].value_counts()
    assert full.n_obs == 600
    assert half.obs[K.SPLIT].value_counts()["train"] == round(0.5 * counts["train"])
    for split in ("validation", "test"):
        assert (half.obs[K.SPLIT] == split).sum() == counts[split]
    # the same cells for every seed
    again = prepare_data(ExperimentSpec(profile="ci", train_fraction=0.5, seed=3))
    assert list(again.obs_names) == list(half.obs_names)


def test_null_model_run_is_cached_with_provenance(tmp_path):
    spec = ExperimentSpec.make("null_nb_library", profile="ci", label="null")
    first = run(spec, directory=tmp_path)
    assert not first.cached and (tmp_path / spec.key / "metrics.csv").exists()
    assert first.provenance["profile"] == "ci" and first.provenance["cells"]["test"] > 0
    assert set(first.provenance["versions"]) >= {"torch", "scvi-tools", "anndata"}
    second = run(spec, directory=tmp_path)
    assert second.cached
    assert second.value("reconstruction_loss") == pytest.approx(first.value("reconstruction_loss"))
    assert not list(tmp_path.glob("*.partial"))


def test_scvit_run_reuses_its_model_and_fills_the_table(tmp_path):
    spec = ExperimentSpec.make("scvit", profile="ci", epochs=1, label="faithful")
    (result,) = run_many([spec], directory=tmp_path)
    # both checkpoints are evaluated, with scVI-unit reconstruction and latent readouts
    for checkpoint in ("final", "best"):
        assert np.isfinite(result.value("reconstruction_loss", checkpoint=checkpoint))
        assert 0 <= result.value("knn_accuracy", label_key=K.CELL_TYPE, checkpoint=checkpoint) <= 1
    assert result.value("n_parameters") > 1e6 and result.value("cells_per_s") > 0
    assert list(result.history["epoch"]) == [1]
    # the gradient norms of training, recorded by the run (the diagnosis chapter reads them)
    norms = pd.read_csv(result.directory / "grad_norms.csv")
    assert set(norms.columns) == {"step", "epoch", "group", "grad_norm"}
    assert (norms["step"] % GRAD_NORM_EVERY == 0).all() and (norms["grad_norm"] >= 0).all()
    # the trained model is stored and reused: same test error without retraining
    model = result.load_model()
    rec = model.get_reconstruction_error(split="test")["reconstruction_loss"]
    assert rec == pytest.approx(result.value("reconstruction_loss"), rel=1e-6)

    table = results_table(tmp_path)
    assert set(table["name"]) == {"faithful"}  # the label of the run is stored with it
    relabelled = dataclasses.replace(spec, label="renamed")  # same key: the same stored run
    labelled = results_table(tmp_path, specs=[relabelled])
    assert set(labelled["name"]) == {"renamed"}
    summary = summarise(labelled, ["reconstruction_loss", "knn_accuracy"])
    assert list(summary["metric"]) == ["reconstruction_loss", "knn_accuracy"]
    assert (summary["seeds"] == 1).all()
    with pytest.raises(FileNotFoundError, match="no stored result"):
        results_table(tmp_path, specs=[ExperimentSpec.make("pca", profile="ci")])


def test_runs_of_an_earlier_profile_definition_are_left_out(tmp_path):
    spec = ExperimentSpec.make("null_nb", profile="ci")
    run(spec, directory=tmp_path)
    assert len(results_table(tmp_path)) == 1
    # as if the ci profile had been redefined since: the stored key no longer matches
    (tmp_path / spec.key).rename(tmp_path / ("0" * 16))
    assert results_table(tmp_path).empty


def test_scvi_run_stores_its_model(tmp_path):
    spec = ExperimentSpec.make("scvi", profile="ci", epochs=1)
    (result,) = run_many([spec], directory=tmp_path)
    model = result.load_model()
    assert model.is_trained and model.module.n_latent == 64
    adata = prepare_data(spec)
    assert model.get_latent_representation(adata).shape == (adata.n_obs, 64)


def test_changing_a_models_code_invalidates_its_runs_only(monkeypatch, tmp_path):
    """One changed line of scPerceiver's file: new keys for scPerceiver, the same for scVI."""
    import shutil

    import scvit_core
    from scvit_core import experiments as E

    package = Path(scvit_core.__file__).resolve().parent
    copy = tmp_path / "scvit_core"
    shutil.copytree(package, copy, ignore=shutil.ignore_patterns("__pycache__", "files"))
    before = {m: ExperimentSpec.make(m).key for m in ("perceiver", "scvit", "scvi", "pca")}
    monkeypatch.setattr(E, "__file__", str(copy / "experiments.py"))
    same = {m: ExperimentSpec.make(m).key for m in before}
    assert same == before  # the copy is the same code
    path = copy / "perceiver.py"
    path.write_text(path.read_text().replace("init_std: float = 1.0", "init_std: float = 0.5"))
    after = {m: ExperimentSpec.make(m).key for m in before}
    assert after["perceiver"] != before["perceiver"]
    assert {m: after[m] for m in ("scvit", "scvi", "pca")} == {
        m: before[m] for m in ("scvit", "scvi", "pca")
    }


def test_run_many_in_parallel_stores_the_same_runs(tmp_path, capsys, monkeypatch):
    """Two worker processes train the uncached specs; the results are those of a serial run."""
    specs = [
        ExperimentSpec.make("null_nb", profile="ci"),
        ExperimentSpec.make("null_nb_library", profile="ci"),
    ]
    parallel = run_many([*specs, specs[0]], directory=tmp_path / "parallel", workers=2)
    lines = capsys.readouterr().out.splitlines()
    assert [r.spec.key for r in parallel] == [s.key for s in [*specs, specs[0]]]
    assert "(in parallel)" in lines[0] and "(in parallel)" in lines[1] and "cached" in lines[2]
    serial = run_many(specs, directory=tmp_path / "serial", workers=1)
    for a, b in zip(parallel, serial, strict=False):
        assert a.value("reconstruction_loss") == pytest.approx(b.value("reconstruction_loss"))
        assert a.provenance["run_time_s"] > 0
    with pytest.raises(ValueError, match="workers must be at least 1"):
        run_many(specs, directory=tmp_path, workers=0)
    monkeypatch.setenv("SCVIT_WORKERS", "two")
    with pytest.raises(ValueError, match="SCVIT_WORKERS must be a whole number"):
        run_many(specs, directory=tmp_path)
