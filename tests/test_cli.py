"""``scvit train`` -> ``embed`` -> ``evaluate`` -> ``diagnose`` in fresh processes, and clean
errors."""

from __future__ import annotations

import subprocess
import sys

import anndata as ad
import numpy as np
import pytest
import scipy.sparse as sp

from scvit_core.cli import _config, build_parser


def scvit(*args: str, cwd=None) -> subprocess.CompletedProcess:
    command = [sys.executable, "-m", "scvit_core.cli", *map(str, args)]
    return subprocess.run(command, capture_output=True, text=True, cwd=cwd, timeout=600)


def test_train_embed_evaluate(tmp_path):
    model = tmp_path / "model"
    run = scvit(
        "train",
        "zeisel2015",
        "--preset",
        "small",
        "--max-cells",
        "300",
        "--epochs",
        "1",
        "--batch-size",
        "64",
        "--no-progress",
        "--out",
        model,
    )
    assert run.returncode == 0, run.stderr
    assert (model / "model.pt").exists() and (model / "genes.txt").exists()

    for name in ("latent.npy", "latent.h5ad"):
        run = scvit("embed", model, "zeisel2015", "--out", tmp_path / name)
        assert run.returncode == 0, run.stderr
    z = np.load(tmp_path / "latent.npy")
    assert z.shape == (3005, 8) and np.isfinite(z).all()
    np.testing.assert_array_equal(ad.read_h5ad(tmp_path / "latent.h5ad").obsm["X_scvit"], z)

    run = scvit("evaluate", model, "zeisel2015")
    assert run.returncode == 0, run.stderr
    assert "reconstruction_loss (test, " in run.stdout and "knn_accuracy" in run.stdout

    report = tmp_path / "diagnosis"
    args = ("--max-cells", "300", "--attribution-cells", "2", "--no-progress", "--out", report)
    run = scvit("diagnose", model, "zeisel2015", *args)
    assert run.returncode == 0, run.stderr
    assert "attention entropy / uniform" in run.stdout
    assert (report / "diagnosis.json").exists() and (report / "probes.csv").exists()
    run = scvit("diagnose", model, "zeisel2015", *args)  # refuses to overwrite a report
    assert run.returncode == 2 and "--overwrite" in run.stderr


def test_bad_input_is_one_line_exit_2(tmp_path):
    bad = tmp_path / "bad.h5ad"
    X = sp.random(20, 10, density=0.5, format="csr", random_state=0, dtype=np.float32)
    X.data[:] = -1.0
    ad.AnnData(X=X).write_h5ad(bad)
    run = scvit("train", bad, "--out", tmp_path / "m", "--epochs", "1")
    assert run.returncode == 2
    lines = run.stderr.strip().splitlines()
    assert lines[-1].startswith("error: ") and "negative" in lines[-1]
    assert "Traceback" not in run.stderr
    run = scvit("evaluate", tmp_path / "nowhere", "zeisel2015")
    assert run.returncode == 2 and run.stderr.strip().splitlines()[-1].startswith("error: ")


def test_mlp_switch_sets_the_perceiver_networks():
    parser = build_parser()

    def config(*extra):
        args = parser.parse_args(["train", "zeisel2015", "--out", "m", *extra])
        return _config(args, 30)

    both = config("--model", "perceiver", "--mlp", "both")
    assert (both.encoder, both.decoder) == ("mlp", "mlp")
    decoder = config("--model", "perceiver", "--mlp", "decoder")
    assert (decoder.encoder, decoder.decoder) == ("attention", "mlp")
    default = config("--model", "perceiver")
    assert (default.encoder, default.decoder) == ("attention", "attention")
    scvi = config("--model", "perceiver", "--mlp", "scvi")  # chapter 08's third model
    assert (scvi.encoder, scvi.decoder, scvi.norm, scvi.dropout) == ("mlp", "mlp", "batch", 0.1)
    assert (both.norm, both.dropout) == (default.norm, default.dropout)
    with pytest.raises(ValueError, match="scPerceiver's switch"):
        config("--mlp", "both")
    for mlp in ("both", "scvi"):  # no attention left to switch off
        with pytest.raises(ValueError, match="--no-attention changes nothing"):
            config("--model", "perceiver", "--mlp", mlp, "--no-attention")
    encoder = config("--model", "perceiver", "--mlp", "encoder", "--no-attention")
    assert (encoder.encoder, encoder.attention) == ("mlp", False)  # the decoder's is off


def test_train_and_evaluate_the_perceiver(tmp_path):
    model = tmp_path / "perceiver"
    run = scvit(
        "train", "zeisel2015", "--model", "perceiver", "--max-cells", "300", "--epochs", "1",
        "--no-progress", "--out", model,
    )  # fmt: skip
    assert run.returncode == 0, run.stderr
    assert (
        "ScPerceiverModel" in run.stderr
        and '"architecture": "perceiver"' in (model / "config.json").read_text()
    )
    run = scvit("evaluate", model, "zeisel2015", "--max-cells", "300")
    assert run.returncode == 0, run.stderr
    assert "reconstruction_loss (test" in run.stdout and "knn_accuracy" in run.stdout
    bad = scvit(
        "train", "zeisel2015", "--model", "perceiver", "--no-conv-stem", "--out", tmp_path / "b"
    )
    assert bad.returncode == 2 and "scViT's switches" in bad.stderr
