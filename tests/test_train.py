"""Trainer: one-epoch smoke trainings per likelihood and ablation, determinism, NaN, resume."""

from __future__ import annotations

import logging
import math

import numpy as np
import pytest
import torch

import scvit_core as sc
from scvit_core.config import ScViTConfig
from scvit_core.data import stratified_subsample
from scvit_core.train import (
    NORM_TARGET,
    NonFiniteLossError,
    ScViTLightning,
    TrainConfig,
    fit,
    transform_input,
)

logging.getLogger("lightning.pytorch").setLevel(logging.ERROR)
logging.getLogger("lightning.fabric").setLevel(logging.ERROR)

N_GENES = 4000  # the default dataset's genes; every test trains on all of them


@pytest.fixture(scope="module")
def zeisel():
    """A label-stratified 600-cell subsample of the default dataset (its stored split kept)."""
    adata = sc.load_dataset("zeisel2015")
    return adata[stratified_subsample(adata.obs["cell_type"], 600, seed=0)].copy()


def loaders(adata, *, batch_size=64, seed=0):
    train = sc.count_dataloader(
        adata, split="train", batch_size=batch_size, shuffle=True, seed=seed
    )
    val = sc.count_dataloader(adata, split="validation", batch_size=256)
    return train, val


def make_module(config: ScViTConfig, seed: int = 0, **train) -> ScViTLightning:
    torch.manual_seed(seed)
    options = dict(epochs=1, batch_size=64, seed=seed, enable_progress_bar=False) | train
    tc = TrainConfig(**options)
    return ScViTLightning(config, tc)


# The report's structural variants, each on the default dataset's own preset
# (ScViTConfig.for_genes(4000): the paper's stages with 100 gene windows per token).
CASES = {
    "legacy": dict(likelihood="legacy"),
    "corrected": dict(likelihood="corrected"),
    "nb": dict(likelihood="nb"),
    "corrected-library": dict(likelihood="corrected", library_scaling=True),
    "no-attention": dict(attention=False),
    "no-conv-stem": dict(conv_stem=False),
    "shared-linear": dict(patchwise=False),
    "extra-convs": dict(extra_convs=1),
    "bigger": dict(width=1.5),
}


@pytest.mark.parametrize("case", list(CASES))
def test_one_epoch_lowers_validation_loss(zeisel, tmp_path, case):
    config = ScViTConfig.for_genes(N_GENES, **CASES[case])
    module = make_module(config)
    result = fit(module, *loaders(zeisel), output_dir=tmp_path)
    (row,) = result.history.to_dict("records")
    assert math.isfinite(result.initial_val_loss) and math.isfinite(row["val_loss"])
    assert row["val_loss"] < result.initial_val_loss
    assert (tmp_path / "checkpoints" / "last.ckpt").exists()
    assert result.best_checkpoint and (tmp_path / "logs").is_dir()


def test_input_transforms():
    counts = torch.tensor([[0.0, 1.0, 3.0], [0.0, 0.0, 0.0]])
    assert torch.equal(transform_input(counts, "counts"), counts)
    assert torch.allclose(transform_input(counts, "log1p"), torch.log1p(counts))
    norm = transform_input(counts, "log1p_norm")
    assert torch.allclose(torch.expm1(norm[0]).sum(), torch.tensor(NORM_TARGET))
    assert torch.equal(norm[1], torch.zeros(3))  # an empty cell stays zero, not NaN
    with pytest.raises(ValueError, match="input_transform"):
        TrainConfig(input_transform="scaled")


def test_log1p_norm_input_keeps_count_target(zeisel, tmp_path):
    module = make_module(ScViTConfig.small(N_GENES, likelihood="nb"), input_transform="log1p_norm")
    result = fit(module, *loaders(zeisel), output_dir=tmp_path)
    assert result.history["val_loss"].iloc[0] < result.initial_val_loss
    assert module.hparams["train_config"]["input_transform"] == "log1p_norm"


def test_seeded_rerun_and_schedule(zeisel, tmp_path):
    config = ScViTConfig.small(N_GENES)
    runs = [
        fit(make_module(config, seed=3), *loaders(zeisel, seed=3), output_dir=tmp_path / str(i))
        for i in range(2)
    ]
    a, b = (r.history for r in runs)
    assert a["train_loss"].tolist() == b["train_loss"].tolist()
    assert a["val_loss"].tolist() == b["val_loss"].tolist()
    # Stepped after batch i at epoch + i / n: the last of n batches leaves (n - 1) / n.
    n = math.ceil((zeisel.obs["split"] == "train").sum() / 64)
    expected = 0.005 * (1 + math.cos(math.pi * (n - 1) / n)) / 2
    assert a["lr"].iloc[0] == pytest.approx(expected, rel=1e-9)


def test_planted_nan_stops_with_error_and_keeps_checkpoint(zeisel, tmp_path):
    module = make_module(ScViTConfig.small(N_GENES), epochs=3)
    forward = module.model.forward

    def poisoned(x, **kwargs):
        out = forward(x, **kwargs)
        if module.training and module.current_epoch == 1:
            out.mean = out.mean * torch.nan  # a NaN from the second epoch on
        return out

    module.model.forward = poisoned
    with pytest.raises(NonFiniteLossError, match=r"epoch 1, batch 0") as info:
        fit(module, *loaders(zeisel), output_dir=tmp_path)
    assert "last good checkpoint" in str(info.value)
    last = info.value.last_checkpoint
    assert last is not None and last.endswith("last.ckpt")
    state = torch.load(last, map_location="cpu", weights_only=True)
    assert state["epoch"] == 0  # written after epoch 0, not overwritten by the bad step
    assert all(
        torch.isfinite(v).all() for v in state["state_dict"].values() if v.is_floating_point()
    )


@pytest.mark.parametrize("interval", [0.0, 3600.0])
def test_checkpoints_are_written_at_most_every_interval_and_last_is_the_last_epoch(
    zeisel, tmp_path, interval
):
    module = make_module(ScViTConfig.small(N_GENES), epochs=4, checkpoint_interval_s=interval)
    on_disk, start = [], module.on_train_epoch_start

    def record():  # at the start of each epoch: what the epochs before it wrote
        on_disk.append(sorted(p.name for p in (tmp_path / "checkpoints").glob("*.ckpt")))
        start()

    module.on_train_epoch_start = record
    result = fit(module, *loaders(zeisel), output_dir=tmp_path)
    if interval:  # nothing written during the 4 short epochs, all of it at the end
        assert on_disk == [[]] * 4
    else:  # after every epoch, as Lightning's ModelCheckpoint
        assert all("last.ckpt" in names for names in on_disk[1:])
    best_epoch = int(result.history["val_loss"].idxmin())
    files = sorted(p.name for p in (tmp_path / "checkpoints").iterdir())
    assert files == sorted([f"best-epoch={best_epoch:03d}.ckpt", "last.ckpt"])
    last = torch.load(result.last_checkpoint, map_location="cpu", weights_only=True)
    best = torch.load(result.best_checkpoint, map_location="cpu", weights_only=True)
    assert last["epoch"] == 3 and len(last["scvit_history"]) == 4  # not the best epoch's
    assert best["epoch"] == best_epoch
    for name, value in module.state_dict().items():  # the final weights, not a later copy
        assert torch.equal(last["state_dict"][name], value), name


def test_resume_from_checkpoint(zeisel, tmp_path):
    config = ScViTConfig.small(N_GENES, likelihood="nb")
    first = fit(make_module(config), *loaders(zeisel), output_dir=tmp_path / "a")
    resumed = make_module(config, seed=9, epochs=2)
    result = fit(
        resumed, *loaders(zeisel), output_dir=tmp_path / "b", ckpt_path=first.last_checkpoint
    )
    assert result.history["epoch"].tolist() == [1, 2]
    np.testing.assert_equal(result.history["val_loss"].iloc[0], first.history["val_loss"].iloc[0])
    assert math.isnan(result.initial_val_loss)


def test_grad_norm_logging_every_group(zeisel, tmp_path):
    config = ScViTConfig.small(N_GENES)
    module = make_module(config, grad_norm_every=2)
    result = fit(module, *loaders(zeisel), output_dir=tmp_path)
    frame = result.grad_norms
    assert list(frame.columns) == ["step", "epoch", "group", "grad_norm"]
    n_steps = math.ceil((zeisel.obs["split"] == "train").sum() / 64)
    assert sorted(frame["step"].unique()) == list(range(0, n_steps, 2))
    assert set(frame["epoch"]) == {0}
    groups = {name.rpartition(".")[0] for name, _ in module.model.named_parameters()}
    for _, rows in frame.groupby("step"):
        assert set(rows["group"]) == groups and len(rows) == len(groups)
    assert np.isfinite(frame["grad_norm"]).all() and (frame["grad_norm"] > 0).all()
    # kept in the checkpoint like the history; off by default
    state = torch.load(result.last_checkpoint, map_location="cpu", weights_only=True)
    assert len(state["scvit_grad_norms"]) == len(frame)
    assert TrainConfig().grad_norm_every == 0
    with pytest.raises(ValueError, match="grad_norm_every"):
        TrainConfig(grad_norm_every=-1)


def test_grad_norms_by_module_matches_hand_computation():
    from scvit_core.train import grad_norms_by_module

    net = torch.nn.Sequential(torch.nn.Linear(3, 2), torch.nn.Linear(2, 1, bias=False))
    net(torch.ones(4, 3)).sum().backward()
    norms = grad_norms_by_module(net)
    first = torch.cat([net[0].weight.grad.flatten(), net[0].bias.grad]).norm()
    assert norms == pytest.approx({"0": float(first), "1": float(net[1].weight.grad.norm())})


@pytest.mark.parametrize("native", [True, False])
def test_auto_precision_is_bf16_only_where_the_cpu_has_it(monkeypatch, native):
    """``precision="auto"``: bf16-mixed on a CPU with AVX512-BF16 or AMX, float32 elsewhere;
    any other value is passed through. It is the trainer's default, so both models use it."""
    import scvit_core.train as train_module
    from scvit_core.api import ScPerceiverModel, ScViTModel

    monkeypatch.setattr(torch.cpu, "_is_avx512_bf16_supported", lambda: native)
    monkeypatch.setattr(torch.cpu, "_is_amx_tile_supported", lambda: native)
    expected = "bf16-mixed" if native else "32-true"
    assert train_module.resolve_precision("auto", "cpu") == expected
    assert train_module.resolve_precision("32-true", "cpu") == "32-true"
    assert train_module.resolve_precision("bf16-mixed", "cpu") == "bf16-mixed"
    assert train_module.TrainConfig().precision == "auto"
    for model in (ScPerceiverModel, ScViTModel):
        assert "precision" not in model.default_train


@pytest.mark.parametrize("likelihood", ["legacy", "corrected"])
def test_bf16_mixed_keeps_the_likelihood_in_float32(zeisel, tmp_path, monkeypatch, likelihood):
    """Under ``precision="bf16-mixed"`` (CPU autocast) the network's outputs are bfloat16
    and the likelihood still receives, computes and returns float32."""
    import scvit_core.train as train_module

    seen = []
    forward, nll = train_module.forward_counts, train_module.nll

    def spy_forward(*args, **kwargs):
        out = forward(*args, **kwargs)
        seen.append(("output", out.mean.dtype, torch.is_autocast_enabled("cpu")))
        return out

    def spy_nll(params, counts, **kwargs):
        loss = nll(params, counts, **kwargs)
        dtypes = {params.mean.dtype, params.theta.dtype, counts.dtype, loss.dtype}
        seen.append(("nll", dtypes, torch.is_autocast_enabled("cpu")))
        return loss

    monkeypatch.setattr(train_module, "forward_counts", spy_forward)
    monkeypatch.setattr(train_module, "nll", spy_nll)
    config = ScViTConfig.small(N_GENES, likelihood=likelihood)
    module = make_module(config, precision="bf16-mixed")
    result = fit(module, *loaders(zeisel), output_dir=tmp_path)
    assert math.isfinite(result.history["val_loss"].iloc[0])
    outputs = [s for s in seen if s[0] == "output" and s[2]]
    assert outputs and all(dtype == torch.bfloat16 for _, dtype, _ in outputs)
    calls = [s for s in seen if s[0] == "nll"]
    assert any(autocast for *_, autocast in calls)  # called inside the autocast region
    assert all(dtypes == {torch.float32} for _, dtypes, _ in calls)
