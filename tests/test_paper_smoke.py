"""The paper profile's whole path on CPU: ``scripts/run_profile.py --profile paper --smoke``."""

import importlib.util
import json
from pathlib import Path

import pytest

from scvit_core.data.hbca import HBCA_GENES
from scvit_core.experiments import ExperimentSpec, results_table
from scvit_core.profiles import get_profile, smoke

SCRIPT = Path(__file__).resolve().parents[1] / "scripts" / "run_profile.py"
spec = importlib.util.spec_from_file_location("run_profile", SCRIPT)
run_profile = importlib.util.module_from_spec(spec)
spec.loader.exec_module(run_profile)


def test_smoke_profile_keeps_the_dataset_and_shrinks_the_rest():
    paper = get_profile("paper")
    small = get_profile("paper-smoke")
    assert small == smoke(paper) and small.name == "paper-smoke"
    assert small.dataset == paper.dataset == "hbca"
    assert small.epochs == 2 and small.n_seeds == 1 and max(small.train_cells) < 200
    # a different profile definition: its runs never share a cache key with paper's
    a = ExperimentSpec.for_profile("scvit", profile="paper")
    b = ExperimentSpec.for_profile("scvit", profile="paper-smoke")
    assert a.key != b.key
    with pytest.raises(ValueError, match="NAME-smoke"):
        get_profile("nonesuch-smoke")


def test_paper_profile_runs_end_to_end_on_cpu(tmp_path, capsys):
    """HBCA loader on a synthetic 59,480-gene file, the paper-sized network trained for two
    steps by the runner, evaluated (final and best checkpoints), saved, and diagnosed."""
    assert run_profile.main(["--profile", "paper", "--smoke", "--results", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert f"{HBCA_GENES:,} genes" in out and "diagnosis: " in out
    table = results_table(tmp_path)
    assert set(table["profile"]) == {"paper-smoke"}
    run_dir = tmp_path / table["key"].iloc[0]
    provenance = json.loads((run_dir / "provenance.json").read_text())
    assert provenance["genes"] == HBCA_GENES and provenance["epochs"] == 2
    loss = table[(table["metric"] == "reconstruction_loss") & (table["checkpoint"] == "best")]
    assert len(loss) == 1 and loss["value"].iloc[0] > 0
    assert (run_dir / "model").is_dir() and (run_dir / "diagnosis" / "diagnosis.json").exists()
