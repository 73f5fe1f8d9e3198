"""Training scViT with PyTorch Lightning, as in the reference code (DESIGN.md sections 2 and 7).

The trainer knows batches of counts and nothing about files or AnnData:

* the input transform (:data:`INPUT_TRANSFORMS`) turns each batch of raw counts into the
  network's input; the likelihood target is always the raw counts, and the library size (total
  counts per cell) is passed to the model for ``library_scaling``;
* AdamW (lr 0.005, PyTorch's default weight decay) with ``CosineAnnealingWarmRestarts(T_0=1)``
  stepped after *every batch* at the fractional epoch ``epoch + i / n_batches`` (the reference
  code's ``scheduler.step(epoch + i / iters)``);
* validation loss every epoch, optional early stopping, a CSV log, checkpoints (the last epoch
  and the best validation loss, written at most every ``checkpoint_interval_s`` seconds by
  :class:`ThrottledCheckpoint`), progress bar, mixed precision and multi-device (DDP) are
  Lightning's own and are passed through from :class:`TrainConfig`; under DDP each process
  reads its own share of every batch (:class:`~scvit_core.data.CellBatchSampler`), the epoch
  losses are summed over processes and checkpoints are written by rank 0 only;
* a NaN or infinite loss stops training with :class:`NonFiniteLossError`, which names the epoch
  and batch and the last good checkpoint (kept: nothing is saved after the bad step).
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import math
import tempfile
import time
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import lightning as L
import pandas as pd
import torch
from lightning.pytorch.callbacks import EarlyStopping, ModelCheckpoint
from lightning.pytorch.loggers import CSVLogger
from lightning_utilities.core.apply_func import apply_to_collection
from torch import nn
from torch.utils.data import DataLoader

from scvit_core.architectures import AnyConfig, build_network, config_from_dict
from scvit_core.data import CellBatchSampler
from scvit_core.likelihood import nll
from scvit_core.model import AutoencoderOutput

INPUT_TRANSFORMS = ("counts", "log1p", "log1p_norm")
"""What the network reads: raw counts, ``log1p(counts)``, or ``log1p`` of counts scaled to
:data:`NORM_TARGET` per cell. The likelihood target is the raw counts in every case."""

NORM_TARGET = 1e4

SCHEDULES = ("cosine_restarts", "one_cycle")
"""Learning-rate schedules: the reference code's ``CosineAnnealingWarmRestarts(T_0=1)`` stepped
at fractional epochs, or ``OneCycleLR`` (10% warm-up, cosine decay to ~0 by the last step)."""


class NonFiniteLossError(RuntimeError):
    """The training or validation loss became NaN or infinite; training was stopped.

    Attributes
    ----------
    epoch, batch
        Where it happened (0-based, as Lightning counts).
    last_checkpoint
        Path of the last good checkpoint, or None if none had been written yet.
    """

    def __init__(
        self, message: str, *, epoch: int, batch: int, last_checkpoint: str | None
    ) -> None:
        super().__init__(message)
        self.epoch, self.batch, self.last_checkpoint = epoch, batch, last_checkpoint


@contextlib.contextmanager
def quiet_lightning(enabled: bool = True):
    """Lightning's and scvi-tools' start-up notices off (warnings and errors still shown)."""
    if not enabled:
        yield
        return
    names = ("lightning.pytorch", "lightning.fabric", "scvi")
    saved = {name: logging.getLogger(name).level for name in names}
    try:
        for name in names:
            logging.getLogger(name).setLevel(logging.WARNING)
        yield
    finally:
        for name, level in saved.items():
            logging.getLogger(name).setLevel(level)


@dataclass(frozen=True)
class TrainConfig:
    """How to train; saved with the model, because ``input_transform`` defines its input.

    Attributes
    ----------
    epochs
        Passes over the training cells (the report: 10).
    batch_size
        Cells per batch (the reference: 1024 or 256).
    lr
        AdamW learning rate (the reference: 0.005; 0.003 for its larger variant).
    weight_decay
        AdamW weight decay (PyTorch's default, as the reference leaves it).
    seed
        Seeds weights, dropout and the batch order; with ``deterministic`` a CPU rerun gives
        identical losses.
    input_transform
        One of :data:`INPUT_TRANSFORMS`.
    early_stopping_patience
        Stop after this many epochs without a lower validation loss (None: never).
    accelerator, devices, strategy, precision
        Passed to :class:`lightning.Trainer` (e.g. ``"gpu"``, ``4``, ``"ddp"``, ``"bf16-mixed"``);
        ``precision="auto"`` (the default): :func:`resolve_precision` (bfloat16 mixed precision
        where the device computes bfloat16 natively, float32 elsewhere; the likelihood and
        every evaluation stay in float32); ``"32-true"`` for float32 everywhere.
    deterministic
        Lightning's ``deterministic`` switch (deterministic kernels).
    gradient_clip_val
        Gradient-norm clipping (None: off, as in the reference).
    enable_progress_bar
        Lightning's progress bar. Off, Lightning's start-up notices (accelerator found, tips)
        are off too; its warnings and errors are still shown.
    num_workers
        DataLoader workers used by callers that build loaders (the API and the CLI).
    grad_norm_every
        Record the L2 norm of each parameter group's gradient every this many optimiser
        steps (0: off); see :class:`GradNormLogger` and :attr:`TrainResult.grad_norms`.
    schedule
        One of :data:`SCHEDULES`.
    kl_weight, kl_warmup
        Variational models only: the loss is ``NLL + w KL`` with ``w`` rising linearly from 0
        to ``kl_weight`` over the first ``kl_warmup`` share of the optimiser steps (scVI warms
        up over 400 epochs, all of its default budget below 20k cells).
    chunk_size
        Shuffle chunks of this many consecutive training cells rather than single cells
        (None): batches read from a file on disk become a few contiguous reads
        (:class:`~scvit_core.data.CellBatchSampler`).
    num_nodes
        Machines, each running ``devices`` processes (Lightning's ``num_nodes``; under SLURM
        or torchrun Lightning reads the ranks from the environment).
    checkpoint_interval_s
        Checkpoint files (the last epoch, the best validation loss) are written at most every
        this many seconds, at the end of training and when it fails; in between they are kept
        in memory (:class:`ThrottledCheckpoint`). A killed process loses at most this much
        training and the epoch in progress. 0: after every epoch, as Lightning.
    """

    epochs: int = 10
    batch_size: int = 256
    lr: float = 0.005
    weight_decay: float = 0.01
    seed: int = 0
    input_transform: str = "counts"
    early_stopping_patience: int | None = None
    accelerator: str = "auto"
    devices: int | str = "auto"
    strategy: str = "auto"
    precision: str | int = "auto"
    deterministic: bool = True
    gradient_clip_val: float | None = None
    enable_progress_bar: bool = True
    num_workers: int = 0
    grad_norm_every: int = 0
    schedule: str = "cosine_restarts"
    kl_weight: float = 1.0
    kl_warmup: float = 1.0
    chunk_size: int | None = None
    num_nodes: int = 1
    checkpoint_interval_s: float = 30.0

    def __post_init__(self) -> None:
        if self.schedule not in SCHEDULES:
            raise ValueError(f"schedule must be one of {SCHEDULES}, got {self.schedule!r}")
        if self.kl_weight < 0 or not 0 <= self.kl_warmup <= 1:
            raise ValueError("kl_weight must be >= 0 and kl_warmup in [0, 1]")
        if self.input_transform not in INPUT_TRANSFORMS:
            raise ValueError(
                f"input_transform must be one of {INPUT_TRANSFORMS}, got {self.input_transform!r}"
            )
        if self.epochs < 1 or self.batch_size < 1:
            raise ValueError("epochs and batch_size must be at least 1")
        if self.lr <= 0:
            raise ValueError(f"lr must be positive, got {self.lr}")
        if self.grad_norm_every < 0:
            raise ValueError(f"grad_norm_every must be >= 0, got {self.grad_norm_every}")
        if self.checkpoint_interval_s < 0:
            raise ValueError(
                f"checkpoint_interval_s must be >= 0, got {self.checkpoint_interval_s}"
            )
        if self.chunk_size is not None and self.chunk_size < 1:
            raise ValueError(f"chunk_size must be at least 1 or None, got {self.chunk_size}")

    def to_dict(self) -> dict[str, Any]:
        """Plain, JSON-serialisable dictionary."""
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> TrainConfig:
        """Inverse of :meth:`to_dict`; unknown keys are an error."""
        return cls(**data)

    def replace(self, **changes: Any) -> TrainConfig:
        """A copy with some fields changed (re-validated)."""
        return dataclasses.replace(self, **changes)


def transform_input(counts: torch.Tensor, transform: str) -> torch.Tensor:
    """The network's input for a batch of raw counts ``(B, genes)`` (same shape).

    Parameters
    ----------
    counts
        Raw counts, float.
    transform
        ``"counts"`` (unchanged), ``"log1p"``, or ``"log1p_norm"``: ``log1p`` of the counts
        scaled to :data:`NORM_TARGET` per cell (an empty cell stays all zero).
    """
    if transform == "counts":
        return counts
    if transform == "log1p":
        return torch.log1p(counts)
    if transform == "log1p_norm":
        library = counts.sum(dim=1, keepdim=True).clamp_min(1.0)  # (B, 1); avoid 0 / 0
        return torch.log1p(counts * (NORM_TARGET / library))
    raise ValueError(f"input_transform must be one of {INPUT_TRANSFORMS}, got {transform!r}")


def forward_counts(
    model: nn.Module, counts: torch.Tensor, *, input_transform: str, sample: bool | None = None
) -> AutoencoderOutput:
    """Run ``model`` on raw counts ``(B, genes)``: transform the input, pass the library size.

    ``sample`` (variational models): decode a sample of ``q(z | x)`` (True) or its mean
    (False); None follows the model's training mode. Deterministic models ignore it.
    """
    library = counts.sum(dim=1)  # (B,) used by library_scaling, ignored otherwise
    kwargs = {} if sample is None else {"sample": sample}
    return model(transform_input(counts, input_transform), library=library, **kwargs)


def per_cell_nll(
    model: nn.Module, counts: torch.Tensor, *, input_transform: str, sample: bool | None = None
) -> tuple[torch.Tensor, AutoencoderOutput]:
    """Per-cell NLL ``(B,)`` of the raw counts (summed over genes), and the model's output.

    The likelihood runs in float32 even under mixed precision: the log-gamma terms of the
    negative binomial lose too much in 16-bit. ``sample`` as in :func:`forward_counts`.
    """
    out = forward_counts(model, counts, input_transform=input_transform, sample=sample)
    params = AutoencoderOutput(
        out.z,
        out.mean.float(),
        out.theta.float(),
        None if out.gate_logits is None else out.gate_logits.float(),
    )
    loss = nll(params, counts.float(), likelihood=model.config.likelihood)
    return loss, out


@torch.no_grad()
def evaluate_loss(
    model: nn.Module,
    loader: DataLoader | Any,
    *,
    input_transform: str,
    device: torch.device | None = None,
) -> float:
    """Mean per-cell NLL over every batch of ``loader`` with the model in evaluation mode.

    The model's training/evaluation mode is restored afterwards.
    """
    was_training = model.training
    device = device or next(model.parameters()).device
    model.eval()
    total, n = 0.0, 0
    try:
        for batch in loader:
            counts = batch["counts"].to(device)
            loss, _ = per_cell_nll(model, counts, input_transform=input_transform)
            total += float(loss.double().sum())
            n += counts.shape[0]
    finally:
        model.train(was_training)
    return total / max(n, 1)


class AutoencoderLightning(L.LightningModule):
    """Lightning wrapper of either autoencoder (scViT, scPerceiver): loss, optimiser, schedule.

    Parameters
    ----------
    model_config
        The network (a :class:`~scvit_core.config.ScViTConfig` or
        :class:`~scvit_core.perceiver.PerceiverConfig`, or its ``to_dict()``); see
        :mod:`scvit_core.architectures`.
    train_config
        Optimiser, schedule and input transform (a :class:`TrainConfig` or its ``to_dict()``).

    Notes
    -----
    Both configs are stored as plain dictionaries in the checkpoint's hyper-parameters, so a
    checkpoint rebuilds its module with ``AutoencoderLightning.load_from_checkpoint(path)``. The
    per-epoch history (train and validation loss, learning rate) and the gradient norms
    recorded by :class:`GradNormLogger` are saved in the checkpoint too, so a resumed run keeps
    its earlier epochs.
    """

    def __init__(
        self,
        model_config: AnyConfig | dict,
        train_config: TrainConfig | dict | None = None,
    ) -> None:
        super().__init__()
        if isinstance(model_config, dict):
            model_config = config_from_dict(model_config)
        if train_config is None:
            train_config = TrainConfig()
        elif isinstance(train_config, dict):
            train_config = TrainConfig.from_dict(train_config)
        self.save_hyperparameters(
            {"model_config": model_config.to_dict(), "train_config": train_config.to_dict()}
        )
        self.model_config, self.train_config = model_config, train_config
        self.model = build_network(model_config)
        self.history: list[dict[str, float]] = []
        self.grad_norms: list[dict[str, Any]] = []  # rows written by GradNormLogger
        self._sums = {"train": [0.0, 0], "val": [0.0, 0]}
        self._batch_idx = 0
        self._epoch_start = time.perf_counter()

    def forward(self, counts: torch.Tensor) -> AutoencoderOutput:
        return forward_counts(self.model, counts, input_transform=self.train_config.input_transform)

    def kl_weight(self) -> float:
        """The KL term's weight at the current step (linear warm-up, :class:`TrainConfig`)."""
        cfg = self.train_config
        if cfg.kl_warmup == 0 or self._trainer is None:
            return cfg.kl_weight
        total = max(int(self.trainer.estimated_stepping_batches), 1)
        return cfg.kl_weight * min(1.0, self.global_step / (cfg.kl_warmup * total))

    def _loss(self, batch: dict[str, torch.Tensor], batch_idx: int, stage: str) -> torch.Tensor:
        counts = batch["counts"]  # (B, genes) raw counts: the likelihood's target
        per_cell, out = per_cell_nll(
            self.model, counts, input_transform=self.train_config.input_transform
        )
        loss = per_cell.mean()  # the reconstruction NLL, logged and monitored
        if not torch.isfinite(loss):
            self._raise_non_finite(float(loss), batch_idx, stage)
        objective = loss
        if out.kl is not None and stage == "train":
            objective = loss + self.kl_weight() * out.kl.float().mean()
        self._sums[stage][0] += float(per_cell.detach().double().sum())
        self._sums[stage][1] += counts.shape[0]
        self.log(
            f"{stage}_loss",
            loss,
            on_step=stage == "train",
            on_epoch=True,
            prog_bar=True,
            batch_size=counts.shape[0],
            sync_dist=True,  # a no-op in one process; under DDP a mean over processes
        )
        return objective

    def _raise_non_finite(self, value: float, batch_idx: int, stage: str) -> None:
        last = None
        callback = self.trainer.checkpoint_callback if self._trainer is not None else None
        if callback is not None:
            last = getattr(callback, "last_model_path", "") or callback.best_model_path or None
        where = (
            f"last good checkpoint: {last} (resume with ckpt_path={last!r})"
            if last
            else "no checkpoint had been written yet (the failure came in the first epoch)"
        )
        what = "training" if stage == "train" else "validation"
        raise NonFiniteLossError(
            f"{what} loss is {value} at epoch {self.current_epoch}, batch {batch_idx} "
            f"(global step {self.global_step}); training stopped. Likely causes: a learning rate "
            f"too high for this model (lr={self.train_config.lr}; try 0.001), 16-bit precision "
            f"overflow (precision={self.train_config.precision!r}; try '32-true'), or input that "
            "is not raw counts or has extreme values (check validate_counts and "
            f"input_transform={self.train_config.input_transform!r}). {where}.",
            epoch=self.current_epoch,
            batch=batch_idx,
            last_checkpoint=last,
        )

    # Lightning hooks --------------------------------------------------------------------

    def training_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> torch.Tensor:
        self._batch_idx = batch_idx
        return self._loss(batch, batch_idx, "train")

    def validation_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> torch.Tensor:
        return self._loss(batch, batch_idx, "val")

    def configure_optimizers(self) -> dict[str, Any]:
        # The fused kernel updates all parameters in one pass: on CPU the per-tensor loop
        # costs ~0.5 s per step for the paper preset's 125M parameters, fused ~0.05 s.
        device = next(self.model.parameters()).device
        optimizer = torch.optim.AdamW(
            self.model.parameters(),
            lr=self.train_config.lr,
            weight_decay=self.train_config.weight_decay,
            fused=device.type in ("cpu", "cuda", "mps"),
        )
        if self.train_config.schedule == "one_cycle":
            scheduler = torch.optim.lr_scheduler.OneCycleLR(
                optimizer,
                max_lr=self.train_config.lr,
                total_steps=max(int(self.trainer.estimated_stepping_batches), 1),
                pct_start=0.1,
            )
        else:
            scheduler = torch.optim.lr_scheduler.CosineAnnealingWarmRestarts(optimizer, T_0=1)
        return {
            "optimizer": optimizer,
            "lr_scheduler": {"scheduler": scheduler, "interval": "step", "frequency": 1},
        }

    def lr_scheduler_step(self, scheduler: Any, metric: Any) -> None:
        if self.train_config.schedule != "cosine_restarts":
            scheduler.step()
            return
        # The reference steps after batch i at the fractional epoch ``epoch + i / n_batches``;
        # Lightning's default would call step() without the epoch (one "epoch" per batch).
        n_batches = max(int(self.trainer.num_training_batches), 1)
        scheduler.step(self.current_epoch + self._batch_idx / n_batches)

    def on_train_epoch_start(self) -> None:
        self._sums["train"] = [0.0, 0]
        self._epoch_start = time.perf_counter()

    def on_validation_epoch_start(self) -> None:
        self._sums["val"] = [0.0, 0]

    def on_train_epoch_end(self) -> None:
        # Validation has run by now (Lightning validates inside the training epoch). Under DDP
        # each process saw its own share of the cells: sum the shares for exact per-cell means.
        sums = torch.tensor([*self._sums["train"], *self._sums["val"]], dtype=torch.float64)
        if self.trainer.world_size > 1:
            sums = self.trainer.strategy.reduce(sums.to(self.device), reduce_op="sum").cpu()
        train_sum, train_n, val_sum, val_n = sums.tolist()
        self.history.append(
            {
                "epoch": self.current_epoch + 1,
                "train_loss": train_sum / train_n if train_n else math.nan,
                "val_loss": val_sum / val_n if val_n else math.nan,
                "lr": float(self.optimizers().param_groups[0]["lr"]),
                "time_s": time.perf_counter() - self._epoch_start,
            }
        )

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        checkpoint["scvit_history"] = [dict(row) for row in self.history]
        checkpoint["scvit_grad_norms"] = [dict(row) for row in self.grad_norms]

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        self.history = [dict(row) for row in checkpoint.get("scvit_history", [])]
        self.grad_norms = [dict(row) for row in checkpoint.get("scvit_grad_norms", [])]


def grad_norms_by_module(module: torch.nn.Module) -> dict[str, float]:
    """L2 norm of the gradient of each parameter group of ``module``.

    A group is the parameters owned directly by one submodule, named by its path (the
    parameter name without its last component: ``encoder.0.attention`` holds
    ``in_proj_weight`` and ``in_proj_bias``, ``encoder.0.attention.out_proj`` its own two).
    Parameters without a gradient are left out; the root module's own parameters form the
    group ``""``.
    """
    grads: dict[str, list[torch.Tensor]] = {}
    for name, param in module.named_parameters():
        if param.grad is not None:
            grads.setdefault(name.rpartition(".")[0], []).append(param.grad.detach())
    if not grads:
        return {}
    # One squared sum per group, moved to the host in one transfer.
    squares = torch.stack([sum(g.double().pow(2).sum() for g in group) for group in grads.values()])
    return dict(zip(grads, squares.sqrt().tolist(), strict=True))


class ThrottledCheckpoint(ModelCheckpoint):
    """Lightning's :class:`ModelCheckpoint` that writes its files at most every ``interval_s``.

    The checkpoints it would write in between (the best and the last, at the end of an epoch)
    are kept in memory, a copy each, and written once ``interval_s`` seconds have passed since
    the last write, when training ends and when it fails (a NaN loss, an exception, Ctrl-C).
    After training the files are exactly :class:`ModelCheckpoint`'s; during training they lag
    by at most ``interval_s`` and the epoch in progress, which is what a killed process loses.
    (Writing two checkpoints of a few MB after every epoch of a few hundred milliseconds was
    ~9% of a short run's wall time.) Under DDP only rank 0 writes, as Lightning.
    """

    def __init__(self, *args: Any, interval_s: float = 30.0, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.interval_s = interval_s
        self._pending: dict[str, dict[str, Any]] = {}
        self._written_at = time.monotonic()
        self._writing_step = -1  # the global step whose checkpoints are being written

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        super().on_train_start(trainer, pl_module)
        self._written_at = time.monotonic()

    def _save_checkpoint(self, trainer: L.Trainer, filepath: str) -> None:
        if self._writing_step != trainer.global_step:  # one decision for a step's files
            due = time.monotonic() - self._written_at >= self.interval_s
            # every process takes rank 0's decision: writing now meets a barrier (as
            # Lightning's own ``train_time_interval``)
            if trainer.strategy.broadcast(due):
                self._flush(trainer)
                self._writing_step = trainer.global_step
        if self._writing_step == trainer.global_step:
            super()._save_checkpoint(trainer, filepath)  # written now, as Lightning would
            self._written_at = time.monotonic()
            return
        # Lightning's own checkpoint dictionary, its tensors copied: training goes on
        checkpoint = trainer._checkpoint_connector.dump_checkpoint(self.save_weights_only)
        self._pending[filepath] = apply_to_collection(
            checkpoint, torch.Tensor, lambda t: t.detach().clone()
        )
        self._last_global_step_saved = trainer.global_step
        self._last_checkpoint_saved = filepath

    def on_train_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        super().on_train_epoch_end(trainer, pl_module)
        if self._should_save_on_train_epoch_end(trainer):
            self._save_last_if_stale(trainer)

    def on_validation_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        super().on_validation_end(trainer, pl_module)
        if not self._should_save_on_train_epoch_end(trainer):
            self._save_last_if_stale(trainer)

    def _save_last_if_stale(self, trainer: L.Trainer) -> None:
        # Lightning 2.6 saves ``last`` only when it saved a top-k checkpoint at the same step:
        # without this, last.ckpt would hold the best epoch, not the last one
        if (
            self.save_last
            and not self._should_skip_saving_checkpoint(trainer)
            and self._last_global_step_saved != trainer.global_step
        ):
            self._save_last_checkpoint(trainer, self._monitor_candidates(trainer))

    def _remove_checkpoint(self, trainer: L.Trainer, filepath: str) -> None:
        if self._pending.pop(filepath, None) is None or Path(filepath).exists():
            super()._remove_checkpoint(trainer, filepath)

    def _flush(self, trainer: L.Trainer) -> None:
        """Write the checkpoints kept in memory (rank 0 writes, as Lightning)."""
        for filepath, checkpoint in self._pending.items():
            trainer.strategy.save_checkpoint(checkpoint, filepath)
        self._pending.clear()
        self._written_at = time.monotonic()

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        super().on_train_end(trainer, pl_module)
        self._flush(trainer)

    def on_exception(
        self, trainer: L.Trainer, pl_module: L.LightningModule, exception: BaseException
    ) -> None:
        super().on_exception(trainer, pl_module, exception)
        self._flush(trainer)


class GradNormLogger(L.Callback):
    """Record each parameter group's gradient norm every ``every`` optimiser steps.

    Runs after the backward pass and before the optimiser step (gradients are unscaled by
    then under mixed precision, and not yet clipped). Rows ``{"step", "epoch", "group",
    "grad_norm"}`` are appended to ``pl_module.grad_norms``, with groups as in
    :func:`grad_norms_by_module` over the network ``pl_module.model``; ``step`` is the
    0-based optimiser step and ``epoch`` the 0-based epoch it belongs to.
    """

    def __init__(self, every: int) -> None:
        if every < 1:
            raise ValueError(f"every must be at least 1, got {every}")
        self.every = every

    def on_before_optimizer_step(
        self, trainer: L.Trainer, pl_module: L.LightningModule, optimizer: Any
    ) -> None:
        step = trainer.global_step
        if step % self.every:
            return
        epoch = trainer.current_epoch
        for group, norm in grad_norms_by_module(pl_module.model).items():
            pl_module.grad_norms.append(
                {"step": step, "epoch": epoch, "group": group, "grad_norm": norm}
            )


@dataclass
class TrainResult:
    """What :func:`fit` returns.

    Attributes
    ----------
    history
        One row per epoch: ``epoch`` (1-based), ``train_loss`` (mean over the epoch's batches,
        training mode), ``val_loss`` (evaluation mode, end of epoch), ``lr``, ``time_s``.
    initial_val_loss
        Validation loss before the first step (NaN when resuming or without validation).
    best_checkpoint, last_checkpoint
        Paths written by Lightning's ModelCheckpoint ("" if none).
    log_dir
        Directory of the CSV log.
    grad_norms
        With ``TrainConfig.grad_norm_every > 0``: one row per recorded step and parameter
        group, ``step``, ``epoch``, ``group``, ``grad_norm`` (see :class:`GradNormLogger`);
        empty otherwise. Aggregate it with :func:`interpret.diagnostics.grad_norm_share`.
    """

    history: pd.DataFrame
    initial_val_loss: float
    best_checkpoint: str
    last_checkpoint: str
    log_dir: str
    grad_norms: pd.DataFrame = dataclasses.field(default_factory=lambda: grad_norm_frame([]))
    global_rank: int = 0
    """This process's rank under DDP (0 alone): only rank 0 should write files."""


ScViTLightning = AutoencoderLightning
"""The name of :class:`AutoencoderLightning` from before there were two models."""


def fit(
    module: AutoencoderLightning,
    train_loader: DataLoader,
    val_loader: DataLoader | None = None,
    *,
    output_dir: str | Path | None = None,
    ckpt_path: str | Path | None = None,
    trainer_kwargs: dict[str, Any] | None = None,
) -> TrainResult:
    """Train ``module`` with the settings of its :class:`TrainConfig`.

    Parameters
    ----------
    module
        The model to train (modified in place).
    train_loader, val_loader
        Batches of ``{"counts": (B, genes) raw counts, ...}``
        (:func:`scvit_core.count_dataloader`). Without ``val_loader`` there is no validation,
        checkpoints follow the training loss and early stopping is off.
    output_dir
        Where checkpoints (``checkpoints/last.ckpt``, ``checkpoints/best-*.ckpt``) and the CSV
        log (``logs/``) go; a new temporary directory if None.
    ckpt_path
        Resume from this Lightning checkpoint (weights, optimiser, schedule, epoch, history).
    trainer_kwargs
        Extra :class:`lightning.Trainer` arguments (override those built from the config).

    Returns
    -------
    TrainResult

    Raises
    ------
    NonFiniteLossError
        A NaN or infinite loss; the last good checkpoint is kept and named in the message.
    """
    cfg = module.train_config
    out = Path(output_dir) if output_dir is not None else Path(tempfile.mkdtemp(prefix="scvit-"))
    out.mkdir(parents=True, exist_ok=True)
    L.seed_everything(cfg.seed, workers=True, verbose=False)

    monitor = "val_loss" if val_loader is not None else "train_loss_epoch"
    checkpoint = ThrottledCheckpoint(
        dirpath=out / "checkpoints",
        interval_s=cfg.checkpoint_interval_s,
        filename="best-{epoch:03d}",
        monitor=monitor,
        mode="min",
        save_top_k=1,
        save_last=True,
    )
    callbacks: list[L.Callback] = [checkpoint]
    if cfg.grad_norm_every:
        callbacks.append(GradNormLogger(cfg.grad_norm_every))
    if cfg.early_stopping_patience is not None and val_loader is not None:
        callbacks.append(
            EarlyStopping(monitor="val_loss", mode="min", patience=cfg.early_stopping_patience)
        )
    logger = CSVLogger(save_dir=str(out), name="logs")
    kwargs: dict[str, Any] = dict(
        max_epochs=cfg.epochs,
        accelerator=cfg.accelerator,
        devices=cfg.devices,
        num_nodes=cfg.num_nodes,
        strategy=cfg.strategy,
        precision=resolve_precision(cfg.precision, cfg.accelerator),
        deterministic=cfg.deterministic,
        gradient_clip_val=cfg.gradient_clip_val,
        enable_progress_bar=cfg.enable_progress_bar,
        enable_model_summary=False,
        callbacks=callbacks,
        logger=logger,
        default_root_dir=str(out),
        num_sanity_val_steps=0,  # the initial validation loss below replaces it
        log_every_n_steps=1,
        limit_val_batches=1.0 if val_loader is not None else 0,
        # A CellBatchSampler shards the cells across processes itself; Lightning's own
        # replacement would wrap it and pad or repeat batches.
        use_distributed_sampler=not isinstance(train_loader.sampler, CellBatchSampler),
    )
    kwargs.update(trainer_kwargs or {})
    with quiet_lightning(not cfg.enable_progress_bar):
        trainer = L.Trainer(**kwargs)

    initial = math.nan
    if val_loader is not None and ckpt_path is None:
        # Before the first step, on the device training will use (the module is moved back).
        device = _initial_device(cfg.accelerator)
        module.model.to(device)
        initial = evaluate_loss(
            module.model, val_loader, input_transform=cfg.input_transform, device=device
        )
        module.model.cpu()
    with quiet_lightning(not cfg.enable_progress_bar), warnings.catch_warnings():
        # Single-process loading is deliberate here (batches are sliced from memory).
        warnings.filterwarnings("ignore", ".*does not have many workers.*")
        warnings.filterwarnings("ignore", ".*`training_step` returned `None`.*")
        # Lightning's own use of a torch API that torch 2.14 deprecates; nothing to act on here
        warnings.filterwarnings("ignore", ".*isinstance\\(treespec, LeafSpec\\).*")
        # Lightning keeps the modules' modes as it finds them, and a query of the model leaves
        # them in evaluation mode (no dropout, frozen batch statistics).
        module.train()
        trainer.fit(
            module,
            train_dataloaders=train_loader,
            val_dataloaders=val_loader,
            ckpt_path=str(ckpt_path) if ckpt_path is not None else None,
        )
    return TrainResult(
        history=history_frame(module.history),
        initial_val_loss=initial,
        best_checkpoint=checkpoint.best_model_path,
        last_checkpoint=checkpoint.last_model_path,
        log_dir=logger.log_dir,
        grad_norms=grad_norm_frame(module.grad_norms),
        global_rank=trainer.global_rank,
    )


def resolve_precision(precision: str | int, accelerator: str = "auto") -> str | int:
    """Lightning's precision for ``precision``; ``"auto"`` picks it for the device.

    ``"auto"`` is ``"bf16-mixed"`` where the device training will use computes bfloat16
    natively (a CUDA GPU with bfloat16, a CPU with AVX512-BF16 or AMX, where bfloat16 matrix
    products run several times faster than float32 ones) and ``"32-true"`` elsewhere (MPS, older
    GPUs and CPUs, where bfloat16 is emulated and slower). The likelihood stays in float32
    either way (:class:`AutoencoderLightning`), and evaluation runs in float32.
    """
    if precision != "auto":
        return precision
    device = _initial_device(accelerator)
    if device.type == "cuda":
        native = torch.cuda.is_bf16_supported(including_emulation=False)
    elif device.type == "cpu":
        native = torch.cpu._is_avx512_bf16_supported() or torch.cpu._is_amx_tile_supported()
    else:
        native = False
    return "bf16-mixed" if native else "32-true"


def _initial_device(accelerator: str) -> torch.device:
    if accelerator in ("auto", "gpu", "cuda") and torch.cuda.is_available():
        return torch.device("cuda")
    if accelerator in ("auto", "mps") and torch.backends.mps.is_available():
        return torch.device("mps")
    return torch.device("cpu")


def history_frame(rows: list[dict[str, float]]) -> pd.DataFrame:
    """Per-epoch history rows as a DataFrame with fixed columns."""
    columns = ["epoch", "train_loss", "val_loss", "lr", "time_s"]
    return pd.DataFrame(rows, columns=columns)


def grad_norm_frame(rows: list[dict[str, Any]]) -> pd.DataFrame:
    """Gradient-norm rows (:class:`GradNormLogger`) as a DataFrame with fixed columns."""
    return pd.DataFrame(rows, columns=["step", "epoch", "group", "grad_norm"])
