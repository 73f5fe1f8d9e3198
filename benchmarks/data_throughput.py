"""Cells per second of minibatch assembly, against a dense in-memory reference in the same run.

Three ways of serving the same shuffled batches of the default dataset:

- ``dense``: the whole matrix densified once, rows fancy-indexed (the reference: fast, but
  it holds cells x genes float32 in memory, 59,480 genes x 168k cells is 40 GB);
- ``csr``: ``scvit_core.count_dataloader`` on the in-memory sparse matrix (what training uses);
- ``backed``: the same loader on an ``.h5ad`` opened read-only on disk.

Run: ``python benchmarks/data_throughput.py [--batch-size 256] [--repeats 3]``.
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from scvit_core import count_dataloader, load_dataset


def _best_rate(fn, n_cells: int, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return n_cells / min(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch-size", type=int, default=256)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()

    adata = load_dataset("zeisel2015")
    n = adata.n_obs
    order = np.random.default_rng(0).permutation(n)
    batches = [np.sort(order[i : i + args.batch_size]) for i in range(0, n, args.batch_size)]

    dense = adata.X.toarray().astype(np.float32)

    def serve_dense():
        for rows in batches:
            torch.from_numpy(dense[rows])

    def serve(data):
        def run():
            for _ in count_dataloader(data, batch_size=args.batch_size, shuffle=True, seed=0):
                pass

        return run

    results = {"dense": _best_rate(serve_dense, n, args.repeats)}
    results["csr"] = _best_rate(serve(adata), n, args.repeats)
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "zeisel2015.h5ad"
        adata.write_h5ad(path)
        backed = load_dataset(path, backed=True)
        results["backed"] = _best_rate(serve(backed), n, args.repeats)
        backed.file.close()

    dense_mb = dense.nbytes / 2**20
    sparse_mb = (adata.X.data.nbytes + adata.X.indices.nbytes + adata.X.indptr.nbytes) / 2**20
    print(
        f"data throughput: zeisel2015 {adata.n_obs} cells x {adata.n_vars} genes, "
        f"batch {args.batch_size}, best of {args.repeats}"
    )
    print(f"{'method':<8} {'cells/s':>12} {'ratio to dense':>15}")
    for name, rate in results.items():
        print(f"{name:<8} {rate:>12,.0f} {rate / results['dense']:>15.2f}")
    print(
        f"memory held: dense {dense_mb:.0f} MiB, CSR {sparse_mb:.0f} MiB "
        f"(ratio {sparse_mb / dense_mb:.2f}); backed holds one batch"
    )


if __name__ == "__main__":
    main()
