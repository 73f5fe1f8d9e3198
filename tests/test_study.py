"""The study's runs in one place: every chapter's specs, and the book's prefetch pool."""

from __future__ import annotations

import pytest

from scvit_core import experiments, study
from scvit_core.experiments import DEFAULT_BUDGET, ExperimentSpec
from scvit_core.profiles import get_profile


def test_book_specs_hold_every_chapter_run_once():
    profile = get_profile("cpu")
    specs = study.book_specs("cpu")
    keys = [s.key for s in specs]
    assert len(keys) == len(set(keys))
    chapters = [
        study.seeded("scvit", profile="cpu") + study.nulls(profile="cpu"),  # 02
        study.flat(study.comparison(profile="cpu")),  # 03
        study.flat(study.comparison("pbmc68k", profile="cpu")),
        study.flat(study.scvit_ablation(profile="cpu")),  # 04
        study.flat(study.scvit_ablation(report_only=True, profile="cpu")),  # 07
        study.flat(study.perceiver_comparison(profile="cpu")),  # 08
        study.flat(study.perceiver_ablation(profile="cpu")),
        study.flat(study.perceiver_comparison("pbmc68k", profile="cpu")),
        # 05 and 06 read single runs of seed 0 (and seed 1 of the faithful model)
        [ExperimentSpec.for_profile("scvit", profile="cpu", seed=s) for s in (0, 1)]
        + [ExperimentSpec.for_profile("scvit", profile="cpu", seed=0, conv_stem=False)]
        + [ExperimentSpec.for_profile("scvi", profile="cpu", dataset="pbmc68k", seed=0)],
    ]
    for chapter in chapters:
        assert {s.key for s in chapter} <= set(keys)
    # seeds: the report's variants and the full models every seed, reverted fixes fewer
    ablation = study.scvit_ablation(profile="cpu")
    assert [s.seed for s in ablation["no attention"]] == list(range(profile.n_seeds))
    assert [s.seed for s in ablation["bigger"]] == list(profile.variant_seeds)
    perceiver = study.perceiver_ablation(profile="cpu")
    assert [s.seed for s in perceiver["scPerceiver"]] == list(range(profile.n_seeds))
    assert [s.seed for s in perceiver["attention removed (constant mixing)"]] == list(
        profile.variant_seeds
    )
    assert dict(perceiver["library scaling off"][0].options) == {"library_scaling": False}
    mlp = dict(perceiver["scVI's networks, same count model"][0].options)
    assert mlp == {"encoder": "mlp", "decoder": "mlp", "norm": "batch", "dropout": 0.1}
    # the comparison's third model is the ablation's last row: the same runs (seed 0 shared)
    networks = study.perceiver_comparison(profile="cpu")[study.SCVI_NETWORKS_LABEL]
    assert perceiver["scVI's networks, same count model"][0].key == networks[0].key
    assert all(s.profile == "cpu" for s in specs)
    assert {s.dataset for s in specs} == {profile.dataset, study.SECOND_DATASET}
    budgets = {s.epochs for s in specs if s.model == "scvi"}
    # chapter 03's longer scVI is chapter 08's default budget (cpu has no budget of its own)
    assert budgets == {None, DEFAULT_BUDGET}
    longer = study.comparison(profile="cpu")["scVI, longer"]
    assert {s.key for s in longer} == {
        s.key for s in study.perceiver_comparison(profile="cpu")["scVI (default budget)"]
    }


def test_a_pool_starts_the_longest_runs_first(tmp_path, monkeypatch):
    """A pool orders its runs by expected cost, so no long run starts last."""
    started = []

    class Stop(Exception):
        pass

    def record(specs, workers, kwargs):
        started.extend(specs)
        raise Stop

    monkeypatch.setattr(experiments, "_run_parallel", record)
    specs = [
        ExperimentSpec.make("null_nb", profile="ci"),
        ExperimentSpec.make("scvi", profile="ci", epochs=1),
        ExperimentSpec.make("scvit", profile="ci", train_fraction=0.5),
        ExperimentSpec.make("perceiver", profile="ci"),
        ExperimentSpec.make("scvi", profile="ci", epochs=DEFAULT_BUDGET),
    ]
    with pytest.raises(Stop):
        experiments.run_many(specs, directory=tmp_path, workers=2)
    assert [s.model for s in started] == ["perceiver", "scvi", "scvit", "scvi", "null_nb"]
    assert started[1].epochs == DEFAULT_BUDGET


def test_main_lists_the_runs(capsys):
    study.main(["--profile", "ci", "--list"])
    out = capsys.readouterr().out.splitlines()
    assert out[-1] == f"{len(study.book_specs('ci'))} runs in profile ci"
    assert len(out) == len(study.book_specs("ci")) + 1


def test_main_rejects_no_workers(capsys):
    with pytest.raises(SystemExit):
        study.main(["--profile", "ci", "--workers", "0"])
    assert "--workers must be at least 1, got 0" in capsys.readouterr().err


def test_the_book_diagnoses_what_it_reads(tmp_path, monkeypatch):
    """The cached reports are skipped; the others are computed with the book's options."""
    assert study.diagnosis_options("ci") == {"max_cells": 300, "attribution_cells": 4}
    assert study.diagnosis_options("cpu") == {"max_cells": None, "attribution_cells": 16}
    specs = study.diagnosed_specs("ci")
    assert [s.model for s in specs] == ["scvit", "scvit", "perceiver"]
    assert {s.key for s in specs} <= {s.key for s in study.book_specs("ci")}
    monkeypatch.setenv("SCVIT_RESULTS_DIR", str(tmp_path))
    cached = tmp_path / specs[1].key / "diagnosis"
    cached.mkdir(parents=True)
    (cached / "diagnosis.json").write_text("{}")
    calls = []
    monkeypatch.setattr(study, "_diagnose", lambda spec, options, threads: calls.append(spec))
    assert study.diagnose_book("ci", workers=1) == 2
    assert [s.key for s in calls] == [specs[0].key, specs[2].key]
