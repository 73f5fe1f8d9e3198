"""Training throughput of scViT against the machine's matmul rate and against scVI.

For the default dataset's preset (``ScViTConfig.for_genes(4000)`` on zeisel2015) and the
``paper`` preset (59,480 genes, batch 256, synthetic negative-binomial counts) this prints
training cells/s, the achieved model GFLOP/s (``3 x`` analytic forward FLOPs from
:mod:`scvit_core.flops` ``x`` cells/s), torch's float32 matmul GFLOP/s measured in the same run,
their ratio, peak memory, and scVI's cells/s on the same data with the scViT/scVI time ratio.
A step is the trainer's own (its optimiser and per-cell NLL) without Lightning's loop; only
steady-state steps are timed (warm-up steps are excluded). Peak memory is the process's peak
on CPU, so the zeisel preset runs first.

For the default dataset's preset and scPerceiver it also prints training cells/s in bfloat16
mixed precision and the step time against float32 (the trainer's ``precision="auto"`` picks
bfloat16 where the device computes it natively). Per preset it also times the likelihood's
forward and backward pass alone on one batch of the model's own outputs (the fused
:func:`scvit_core.likelihood.nll`, and pyro's ``log_prob`` for reference) and prints its share
of the step. Beside the scViT/scVI time ratio: the ratio of
their FLOPs per cell (scVI's counted by ``torch.utils.flop_counter`` on one batch), the time
ratio were both equally efficient, and the lowest time ratio scViT's FLOPs allow, scViT at
the measured matmul rate against scVI as measured.

    python benchmarks/train_throughput.py --quick     # a few minutes on 2 CPU cores
"""

from __future__ import annotations

import argparse
import logging
import resource
import sys
import time
import warnings
from types import SimpleNamespace

import anndata as ad
import numpy as np
import scipy.sparse as sp
import torch

from scvit_core import load_dataset
from scvit_core.config import ScViTConfig
from scvit_core.flops import TRAIN_FACTOR, total_forward_flops
from scvit_core.likelihood import log_prob, nll
from scvit_core.model import ScViT
from scvit_core.perceiver import PerceiverConfig
from scvit_core.train import (
    ScViTLightning,
    TrainConfig,
    forward_counts,
    per_cell_nll,
    resolve_precision,
)


def peak_memory_mb(device: torch.device) -> float:
    """Peak memory: CUDA allocator peak on GPU, else the process's peak RSS."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    kb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # kilobytes on Linux
    return kb / 1024 if sys.platform != "darwin" else kb / 2**20


def matmul_gflops(device: torch.device, *, n: int = 2048, repeats: int = 5) -> float:
    """Measured float32 GFLOP/s of an ``n x n`` matmul (best of ``repeats``)."""
    a, b = torch.randn(n, n, device=device), torch.randn(n, n, device=device)
    a @ b  # warm-up
    best = float("inf")
    for _ in range(repeats):
        _sync(device)
        start = time.perf_counter()
        a @ b
        _sync(device)
        best = min(best, time.perf_counter() - start)
    return 2 * n**3 / best / 1e9


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def train_cells_per_s(
    config: ScViTConfig | PerceiverConfig,
    batches: list[torch.Tensor],
    *,
    warmup: int,
    device: torch.device,
    train: TrainConfig | None = None,
    bf16: bool = False,
) -> float:
    """Steady-state training cells/s: AdamW steps on ``batches`` after ``warmup`` steps.

    ``train`` is the model's training configuration (default: ``TrainConfig()``, scViT's);
    ``bf16`` runs the forward pass under bfloat16 autocast, as Lightning's ``bf16-mixed``
    (the likelihood stays float32, :func:`~scvit_core.train.per_cell_nll`). The KL term of a
    variational model is added at full weight.
    """
    torch.manual_seed(0)
    train = train or TrainConfig()
    module = ScViTLightning(config, train).to(device)
    model = module.model.train()
    optimizer = module.configure_optimizers()["optimizer"]

    def step(counts: torch.Tensor) -> None:
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16):
            per_cell, out = per_cell_nll(model, counts, input_transform=train.input_transform)
        loss = per_cell.mean() + (0.0 if out.kl is None else out.kl.float().mean())
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()

    for i in range(warmup):
        step(batches[i % len(batches)])
    _sync(device)
    start = time.perf_counter()
    cells = 0
    for counts in batches:
        step(counts)
        cells += counts.shape[0]
    _sync(device)
    return cells / (time.perf_counter() - start)


def likelihood_seconds(
    config: ScViTConfig, counts: torch.Tensor, *, device: torch.device, repeats: int = 3
) -> tuple[float, float]:
    """Best-of-``repeats`` seconds of the likelihood's forward + backward on one batch.

    On the (untrained) model's own outputs for ``counts``: the fused NLL the trainer uses,
    and pyro's ``log_prob`` summed over genes (the reference), as ``(fused, pyro)``.
    """
    torch.manual_seed(0)
    model = ScViTLightning(config, TrainConfig()).model.to(device).train()
    with torch.no_grad():
        out = forward_counts(model, counts, input_transform="counts")
    del model
    fields = ("mean", "theta", "gate_logits")
    params = {k: getattr(out, k) for k in fields if getattr(out, k) is not None}

    def fused(p, x):
        return nll(p, x, likelihood=config.likelihood)

    def pyro(p, x):
        return -log_prob(p, x, likelihood=config.likelihood).sum(-1)

    best = {}
    for name, fn in (("fused", fused), ("pyro", pyro)):
        best[name] = float("inf")
        for i in range(repeats + 1):  # the first is a warm-up
            leaves = {k: v.detach().float().requires_grad_() for k, v in params.items()}
            leaves.setdefault("gate_logits", None)
            p = SimpleNamespace(**leaves)
            _sync(device)
            start = time.perf_counter()
            fn(p, counts).mean().backward()
            _sync(device)
            if i:
                best[name] = min(best[name], time.perf_counter() - start)
    return best["fused"], best["pyro"]


def scvi_forward_flops(adata, *, batch_size: int) -> float:
    """scVI's (``n_latent=64``) forward FLOPs per cell, counted on one batch of ``adata``."""
    import scvi
    from torch.utils.flop_counter import FlopCounterMode

    data = adata.copy()
    scvi.model.SCVI.setup_anndata(data)
    model = scvi.model.SCVI(data, n_latent=64)
    tensors = next(iter(model._make_data_loader(adata=data, batch_size=batch_size)))
    with torch.no_grad(), FlopCounterMode(display=False) as counter:
        model.module(tensors)
    return counter.get_total_flops() / len(tensors["X"])


def scvi_cells_per_s(adata, *, batch_size: int, epochs: int) -> float:
    """scVI (``n_latent=64``) training cells/s on ``adata``, after a one-epoch warm-up."""
    import scvi

    logging.getLogger("scvi").setLevel(logging.ERROR)
    logging.getLogger("lightning.pytorch").setLevel(logging.ERROR)
    data = adata.copy()
    scvi.model.SCVI.setup_anndata(data)
    model = scvi.model.SCVI(data, n_latent=64)
    kwargs = dict(batch_size=batch_size, enable_progress_bar=False, accelerator="auto")
    model.train(max_epochs=1, **kwargs)  # warm-up
    start = time.perf_counter()
    model.train(max_epochs=epochs, **kwargs)
    elapsed = time.perf_counter() - start
    return len(model.train_indices) * epochs / elapsed


def perceiver_throughput(
    n_genes: int, batches: list[torch.Tensor], *, warmup: int, device: torch.device
) -> None:
    """scPerceiver's training cells/s in float32 and in bfloat16 mixed precision, and the ratio.

    With its own training configuration (``ScPerceiverModel.default_train``: batches of 64,
    ``log1p`` input) on the same cells as scViT's preset (see :func:`report_bf16`).
    """
    from scvit_core.api import ScPerceiverModel

    fields = {**ScPerceiverModel.default_train, "input_transform": "log1p"}
    # the one-cycle schedule needs a Lightning Trainer; the schedule does not change a step
    train = TrainConfig(**(fields | {"schedule": TrainConfig().schedule}))
    config = PerceiverConfig.for_genes(n_genes)
    small = [b for batch in batches for b in batch.split(train.batch_size)]
    rates = {
        bf16: train_cells_per_s(config, small, warmup=warmup, device=device, train=train, bf16=bf16)
        for bf16 in (False, True)
    }
    with torch.device("meta"):
        params = sum(p.numel() for p in ScViTLightning(config, train).model.parameters())
    print(f"[scPerceiver for_genes({n_genes})] params={params:,} batch={train.batch_size}")
    print(f"  training cells/s fp32     {rates[False]:10.1f}")
    report_bf16(rates[False], rates[True], device)


def report_bf16(fp32_cells_s: float, bf16_cells_s: float, device: torch.device) -> None:
    """bfloat16 mixed precision's cells/s, its step time against float32's, and what auto picks.

    ``precision="auto"`` (the trainer's default) trains in ``bf16-mixed`` only where the device
    computes bfloat16 natively; elsewhere bfloat16 is emulated, so the figure is for information.
    """
    auto = resolve_precision("auto", device.type)
    print(f"  training cells/s bf16     {bf16_cells_s:10.1f}")
    print(f"  step time bf16 / fp32     {fp32_cells_s / bf16_cells_s:10.2f} (auto: {auto})")


def report(name: str, config: ScViTConfig, cells_s: float, matmul: float, mem: float) -> None:
    model_gflops = TRAIN_FACTOR * total_forward_flops(config) * cells_s / 1e9
    print(f"[{name}] genes={config.n_genes:,} params={_params(config):,}")
    print(f"  training cells/s          {cells_s:10.1f}")
    print(f"  model GFLOP/s (3x fwd)    {model_gflops:10.1f}")
    print(f"  fp32 matmul GFLOP/s       {matmul:10.1f}")
    print(f"  ratio model / matmul      {model_gflops / matmul:10.1%}")
    print(f"  peak memory (MB)          {mem:10.0f}")


def report_likelihood(cells_s: float, batch_size: int, seconds: tuple[float, float]) -> None:
    """The likelihood's forward + backward time and its share of a training step."""
    fused, pyro = seconds
    step = batch_size / cells_s
    print(f"  likelihood fwd+bwd (ms)   {1e3 * fused:10.0f} (pyro's log_prob: {1e3 * pyro:.0f})")
    print(
        f"  likelihood share of step  {fused / step:10.1%} "
        f"(with pyro's: {pyro / (step - fused + pyro):.1%})"
    )


def _params(config: ScViTConfig) -> int:
    with torch.device("meta"):
        return sum(p.numel() for p in ScViT(config).parameters())


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="fewest steps (CI, 2 cores)")
    parser.add_argument("--steps", type=int, default=None, help="timed steps per preset")
    parser.add_argument("--batch-size", type=int, default=256)
    parser.add_argument("--skip-paper", action="store_true")
    parser.add_argument("--skip-scvi", action="store_true")
    args = parser.parse_args(argv)
    steps = args.steps or (2 if args.quick else 10)
    warmup = 1 if args.quick else 3
    warnings.filterwarnings("ignore")
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    bs = args.batch_size
    print(f"device={device} threads={torch.get_num_threads()} batch={bs} timed steps={steps}")
    matmul = matmul_gflops(device)
    print(f"fp32 matmul (2048^3): {matmul:.1f} GFLOP/s")

    rng = np.random.default_rng(0)
    adata = load_dataset("zeisel2015")
    config = ScViTConfig.for_genes(adata.n_vars)
    order = rng.permutation(adata.n_obs)
    batches = [
        torch.from_numpy(adata.X[np.sort(order[i * bs : (i + 1) * bs])].toarray())
        .float()
        .to(device)
        for i in range(min(steps, adata.n_obs // bs))
    ]
    scvit_cells_s = train_cells_per_s(config, batches, warmup=warmup, device=device)
    report("zeisel2015 for_genes(4000)", config, scvit_cells_s, matmul, peak_memory_mb(device))
    report_likelihood(scvit_cells_s, bs, likelihood_seconds(config, batches[0], device=device))
    bf16 = train_cells_per_s(config, batches, warmup=warmup, device=device, bf16=True)
    report_bf16(scvit_cells_s, bf16, device)
    if not args.skip_scvi:
        scvi_cells_s = scvi_cells_per_s(adata, batch_size=bs, epochs=1 if args.quick else 2)
        print(f"[scVI n_latent=64 on zeisel2015] training cells/s {scvi_cells_s:10.1f}")
        ratio = scvi_cells_s / scvit_cells_s
        print(f"  scViT / scVI time ratio   {ratio:10.1f}x (the report: 15x)")
        flop_ratio = total_forward_flops(config) / scvi_forward_flops(adata, batch_size=bs)
        print(f"  FLOP ratio scViT / scVI   {flop_ratio:10.1f}x (the time ratio at equal GFLOP/s)")
        # the lowest time ratio scViT's FLOPs allow: scViT at the matmul rate, scVI as measured
        floor = TRAIN_FACTOR * total_forward_flops(config) * scvi_cells_s / (matmul * 1e9)
        print(f"  time ratio bound          {floor:10.1f}x (scViT at the fp32 matmul rate)")
        print(f"  time ratio, scViT in bf16 {scvi_cells_s / bf16:10.1f}x (scVI in fp32)")

    perceiver_throughput(adata.n_vars, batches, warmup=warmup, device=device)

    if not args.skip_paper:
        config = ScViTConfig.paper()
        # Synthetic NB counts of the right shape (mean ~0.4, sparse like scRNA-seq).
        counts = rng.negative_binomial(1, 0.7, size=(steps * bs, config.n_genes))
        counts = counts.astype(np.float32)
        batches = [torch.from_numpy(c).to(device) for c in np.split(counts, steps)]
        cells_s = train_cells_per_s(config, batches, warmup=warmup, device=device)
        report("paper", config, cells_s, matmul, peak_memory_mb(device))
        report_likelihood(cells_s, bs, likelihood_seconds(config, batches[0], device=device))
        del batches
        if not args.skip_scvi:
            synthetic = ad.AnnData(sp.csr_matrix(counts))
            scvi_cells_s = scvi_cells_per_s(synthetic, batch_size=bs, epochs=1)
            print(f"[scVI n_latent=64, 59,480 genes] training cells/s {scvi_cells_s:10.1f}")
            print(f"  scViT / scVI time ratio   {scvi_cells_s / cells_s:10.1f}x (the report: 15x)")


if __name__ == "__main__":
    main()
