"""Peak memory and cells/s of training and embedding from disk, as the number of cells grows.

Writes synthetic count files (CSR ``.h5ad``, written block by block) of 20k, 100k and 500k
cells x 2,000 genes and one of 5k cells x the report's 59,480 genes, then, for each file, in a
fresh process: opens it backed, trains one epoch (batches of shuffled chunks of consecutive
rows) and writes the latent of every cell to an ``.h5ad`` batch by batch. Printed per file:
peak RSS of that process, training cells/s (the epoch, validation included) and embedding
cells/s. The same training on the 100k file loaded into memory is the throughput reference.

The model is a deliberately small scViT (``ScViTConfig.small`` with two stages): a cheap model
leaves the reading of the data the largest share of the time, the harshest setting for the
stream-versus-memory comparison.

Second part (``--loss-epochs``, default 5): the loss curve of fully random batches against
shuffled chunks of consecutive cells, on zeisel2015 (its 3,005 cells are stored in 50 runs of
one cell type, so a chunk of 64 is nearly always one type: a hard case for chunks).

Ends with ``RESULT peak_ratio=<largest / smallest peak RSS over the 2,000-gene files>
stream_vs_memory=<streamed / in-memory training cells/s at 100k cells>``.

Run: ``python benchmarks/streaming_memory.py [--tmp DIR] [--sizes 20000 100000 500000]``.
"""

from __future__ import annotations

import argparse
import json
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

GENES, PAPER_GENES = 2000, 59_480


def small_config(n_genes: int):
    """``ScViTConfig.small`` cut to two narrow stages (8 tokens; NB likelihood)."""
    from scvit_core.config import ScViTConfig

    first_in = ScViTConfig.small(n_genes).stages[0][2]  # genes per token
    return ScViTConfig.small(n_genes, likelihood="nb", stages=((8, 8, first_in, 4), (8, 4, 8, 2)))


def write_counts(path: Path, n_cells: int, n_genes: int, *, seed: int = 0) -> None:
    """Synthetic Poisson counts written ``block`` rows at a time (never whole in memory)."""
    import anndata as ad
    import h5py
    import pandas as pd
    import scipy.sparse as sp
    from anndata.io import sparse_dataset, write_elem

    rng = np.random.default_rng(seed)
    block = min(2000, n_cells)
    rate = rng.gamma(0.5, 0.2 * 2, size=n_genes)  # gene means around 0.2, skewed
    base = sp.csr_matrix(rng.poisson(rate, size=(block, n_genes)).astype(np.int32))
    base = base + sp.csr_matrix(
        (np.ones(block, np.int32), (np.arange(block), np.zeros(block))), shape=base.shape
    )
    split = rng.choice(np.array(["train", "validation", "test"]), n_cells, p=[0.8, 0.1, 0.1])
    obs = pd.DataFrame({"split": pd.Categorical(split)}, index=[f"cell{i}" for i in range(n_cells)])
    var = pd.DataFrame(index=[f"gene{j:05d}" for j in range(n_genes)])
    ad.AnnData(obs=obs, var=var).write_h5ad(path)
    with h5py.File(path, "r+") as f:
        for start in range(0, n_cells, block):
            rows = rng.permutation(block)[: min(block, n_cells - start)]
            chunk = sp.csr_matrix(base[rows])
            if start == 0:
                write_elem(f, "X", chunk)
            else:
                sparse_dataset(f["X"]).append(chunk)


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux: KB


def worker(path: Path, *, backed: bool, batch_size: int, chunk_size: int, out: Path) -> dict:
    """One epoch of training and one embedding of ``path``; runs in a fresh process."""
    import anndata as ad
    import torch

    from scvit_core import ScViTModel

    torch.set_num_threads(1)
    adata = ad.read_h5ad(path, backed="r" if backed else None)
    n_train = int((adata.obs["split"] == "train").sum())
    model = ScViTModel(adata, small_config(adata.n_vars))
    model.train(
        epochs=1,
        batch_size=batch_size,
        chunk_size=chunk_size if backed else None,
        accelerator="cpu",
        enable_progress_bar=False,
        output_dir=out / "training",
    )
    train_rate = n_train / float(model.history["time_s"].iloc[0])
    start = time.perf_counter()
    if backed:
        model.write_latent_representation(out / "latent.h5ad", adata, batch_size=1024)
    else:
        model.get_latent_representation(adata, batch_size=1024)
    embed_rate = adata.n_obs / (time.perf_counter() - start)
    return {
        "cells": adata.n_obs,
        "genes": adata.n_vars,
        "backed": backed,
        "peak_rss_mb": peak_rss_mb(),
        "train_cells_per_s": train_rate,
        "embed_cells_per_s": embed_rate,
    }


def run_fresh(path: Path, *, backed: bool, args: argparse.Namespace, out: Path) -> dict:
    command = [sys.executable, __file__, "--worker", str(path), "--out", str(out)]
    command += ["--batch-size", str(args.batch_size), "--chunk-size", str(args.chunk_size)]
    if not backed:
        command.append("--in-memory")
    result = subprocess.run(command, capture_output=True, text=True)
    if result.returncode:
        raise RuntimeError(f"worker failed:\n{result.stderr[-3000:]}")
    return json.loads(result.stdout.strip().splitlines()[-1])


def loss_curves(epochs: int, batch_size: int, chunk_size: int) -> list[dict]:
    """Validation loss per epoch on zeisel2015: random cells against shuffled chunks."""
    from scvit_core import ScViTModel, load_dataset

    adata = load_dataset("zeisel2015")
    rows = []
    for name, chunks in (("random cells", None), (f"chunks of {chunk_size}", chunk_size)):
        model = ScViTModel(adata, small_config(adata.n_vars))
        model.train(
            epochs=epochs,
            batch_size=batch_size,
            chunk_size=chunks,
            accelerator="cpu",
            enable_progress_bar=False,
        )
        for row in model.history.itertuples():
            rows.append({"sampling": name, "epoch": row.epoch, "val_loss": row.val_loss})
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[20_000, 100_000, 500_000])
    parser.add_argument("--paper-cells", type=int, default=5_000, help="cells x 59,480 genes")
    parser.add_argument("--memory-cells", type=int, default=100_000, help="in-memory reference")
    parser.add_argument("--batch-size", type=int, default=256)
    parser.add_argument("--chunk-size", type=int, default=64)
    parser.add_argument("--loss-epochs", type=int, default=5, help="0: skip the loss curves")
    parser.add_argument("--tmp", type=Path, default=None, help="where the files go (deleted)")
    parser.add_argument("--worker", type=Path, default=None, help=argparse.SUPPRESS)
    parser.add_argument("--in-memory", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--out", type=Path, default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker is not None:
        result = worker(
            args.worker,
            backed=not args.in_memory,
            batch_size=args.batch_size,
            chunk_size=args.chunk_size,
            out=args.out,
        )
        print(json.dumps(result))
        return

    import pandas as pd

    tmp = Path(tempfile.mkdtemp(prefix="scvit-stream-", dir=args.tmp))
    try:
        files = [(n, GENES) for n in args.sizes] + [(args.paper_cells, PAPER_GENES)]
        rows = []
        for n_cells, n_genes in files:
            path = tmp / f"counts_{n_cells}x{n_genes}.h5ad"
            start = time.perf_counter()
            write_counts(path, n_cells, n_genes)
            size_mb = path.stat().st_size / 2**20
            print(f"wrote {path.name} ({size_mb:,.0f} MB) in {time.perf_counter() - start:.0f} s")
            row = run_fresh(path, backed=True, args=args, out=tmp / f"run_{n_cells}x{n_genes}")
            rows.append({**row, "file_mb": size_mb})
            print(json.dumps(rows[-1]), flush=True)
            if n_cells == args.memory_cells and n_genes == GENES:
                row = run_fresh(path, backed=False, args=args, out=tmp / "run_memory")
                rows.append({**row, "file_mb": size_mb})
                print(json.dumps(rows[-1]), flush=True)
            if n_cells != args.memory_cells:
                path.unlink()
        table = pd.DataFrame(rows)
        table["where"] = np.where(table["backed"], "disk", "memory")
        columns = ["cells", "genes", "where", "file_mb", "peak_rss_mb"]
        columns += ["train_cells_per_s", "embed_cells_per_s"]
        print()
        print(f"batch {args.batch_size}, chunks of {args.chunk_size} cells, one epoch, 1 thread")
        print(table[columns].to_string(index=False, float_format=lambda v: f"{v:,.0f}"))

        disk = table[table["backed"] & (table["genes"] == GENES)]
        ratio = disk["peak_rss_mb"].max() / disk["peak_rss_mb"].min()
        memory = table[~table["backed"]]
        speed = float("nan")
        if len(memory):
            same = disk[disk["cells"] == args.memory_cells]
            speed = same["train_cells_per_s"].iloc[0] / memory["train_cells_per_s"].iloc[0]

        if args.loss_epochs:
            curves = pd.DataFrame(loss_curves(args.loss_epochs, args.batch_size, args.chunk_size))
            wide = curves.pivot(index="epoch", columns="sampling", values="val_loss")
            print()
            print(f"validation loss on zeisel2015 (batch {args.batch_size}), by sampling:")
            print(wide.to_string(float_format=lambda v: f"{v:,.1f}"))
        print()
        print(f"RESULT peak_ratio={ratio:.3f} stream_vs_memory={speed:.3f}")
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
