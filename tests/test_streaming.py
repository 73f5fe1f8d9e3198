"""Streaming from disk and multi-process training: the sampler, backed reads, DDP on CPU."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from torch.utils.data import BatchSampler, RandomSampler

from scvit_core.data import CellBatchSampler, read_rows

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.parametrize(("n", "batch_size"), [(100, 16), (97, 10), (1189, 256)])
def test_one_process_batches_are_those_of_random_sampler(n, batch_size):
    sampler = CellBatchSampler(n, batch_size=batch_size, shuffle=True, seed=3)
    legacy = BatchSampler(
        RandomSampler(range(n), generator=torch.Generator().manual_seed(3)), batch_size, False
    )
    for _ in range(3):
        assert list(sampler) == list(legacy)


@pytest.mark.parametrize("world_size", [2, 3])
@pytest.mark.parametrize("chunk_size", [None, 4])
def test_shards_cover_every_cell_once_with_equal_steps(world_size, chunk_size):
    n, batch_size = 101, 8
    shards = [
        CellBatchSampler(
            n,
            batch_size=batch_size,
            shuffle=True,
            chunk_size=chunk_size,
            seed=1,
            min_last_batch=2,
            num_replicas=world_size,
            rank=rank,
        )
        for rank in range(world_size)
    ]
    for epoch in range(2):
        for s in shards:
            s.set_epoch(epoch)
        batches = [list(s) for s in shards]
        assert len({len(b) for b in batches}) == 1 == len({len(s) for s in shards})
        assert len(batches[0]) == len(shards[0])
        cells = [c for per_rank in batches for batch in per_rank for c in batch]
        assert sorted(cells) == list(range(n))
        assert min(len(batch) for per_rank in batches for batch in per_rank) >= 2
        # each step's cells are those of one process with the global batch
        single = CellBatchSampler(
            n, batch_size=world_size * batch_size, shuffle=True, chunk_size=chunk_size, seed=1
        )
        single.set_epoch(epoch)
        glob = single.global_batches()
        if len(glob[-1]) < 2 * world_size:  # merged into the previous batch when sharded
            glob[-2:] = [np.concatenate(glob[-2:])]
        for step, cells_of_step in enumerate(glob):
            shared = sorted(c for per_rank in batches for c in per_rank[step])
            assert shared == sorted(cells_of_step.tolist())


def test_set_epoch_gives_each_epoch_its_own_order_and_resumes():
    a = CellBatchSampler(50, batch_size=7, shuffle=True, seed=0)
    orders = [list(a) for _ in range(3)]
    assert orders[0] != orders[1]
    b = CellBatchSampler(50, batch_size=7, shuffle=True, seed=0)
    b.set_epoch(2)
    assert list(b) == orders[2]


def test_chunks_are_runs_of_consecutive_cells():
    sampler = CellBatchSampler(100, batch_size=20, shuffle=True, chunk_size=5, seed=0)
    batches = list(sampler)
    assert sorted(c for b in batches for c in b) == list(range(100))
    for batch in batches:
        starts = sorted(set(c - c % 5 for c in batch))
        assert len(starts) == 4  # four chunks of five consecutive cells
        assert sorted(batch) == [s + i for s in starts for i in range(5)]


def test_too_few_cells_for_the_processes_is_an_error():
    with pytest.raises(ValueError, match="processes"):
        list(CellBatchSampler(2, batch_size=4, num_replicas=3, rank=0))


def test_read_rows_of_backed_matrix_equals_in_memory(tmp_path, tiny_counts):
    import anndata as ad

    tiny_counts.write_h5ad(tmp_path / "x.h5ad")
    backed = ad.read_h5ad(tmp_path / "x.h5ad", backed="r")
    rows = np.array([0, 1, 2, 3, 10, 20, 21, 59])
    expected = tiny_counts.X[rows].toarray()
    np.testing.assert_array_equal(read_rows(backed.X, rows).toarray(), expected)
    scattered = np.array([5, 9])
    np.testing.assert_array_equal(
        read_rows(backed.X, scattered).toarray(), tiny_counts.X[scattered].toarray()
    )


def test_ddp_two_cpu_processes_train_like_one(tmp_path):
    """2 processes (gloo): each epoch's cells are the training split exactly once, the loss
    falls, rank 0's saved model reloads in one process, and the result is close to one process
    with the same global batch."""
    from ddp_train import EPOCHS, run, tiny_data

    env = dict(os.environ, PYTHONPATH=str(ROOT), OMP_NUM_THREADS="1", MKL_NUM_THREADS="1")
    env.pop("LOCAL_RANK", None)
    subprocess.run(
        [
            sys.executable,
            str(ROOT / "tests" / "ddp_train.py"),
            str(tmp_path / "ddp"),
            "--devices",
            "2",
        ],
        check=True,
        env=env,
        cwd=tmp_path,
        timeout=300,
    )
    ddp = json.loads((tmp_path / "ddp" / "result.json").read_text())

    adata = tiny_data()
    train_rows = np.flatnonzero(adata.obs["split"].to_numpy() == "train")
    seen = [json.loads((tmp_path / "ddp" / f"seen-r{r}.json").read_text()) for r in (0, 1)]
    for epoch in range(EPOCHS):
        assert sorted(seen[0][epoch] + seen[1][epoch]) == train_rows.tolist()
        assert not set(seen[0][epoch]) & set(seen[1][epoch])

    history = ddp["history"]
    assert history["train_loss"][-1] < history["train_loss"][0]
    assert history["val_loss"][-1] < ddp["initial_val_loss"]
    assert [Path(p).name for p in [ddp["last_checkpoint"]]] == ["last.ckpt"]

    from scvit_core import ScViTModel

    reloaded = ScViTModel.load(tmp_path / "ddp" / "model", adata)
    test_loss = reloaded.get_reconstruction_error(split="test")["reconstruction_loss"]
    assert test_loss == pytest.approx(ddp["test_loss"], rel=1e-5)

    single = run(tmp_path / "single", devices=1, batch_size=32)
    np.testing.assert_allclose(history["val_loss"], single["history"]["val_loss"], rtol=0.02)
    assert ddp["test_loss"] == pytest.approx(single["test_loss"], rel=0.02)


def _write_counts(path: Path, n_cells: int, n_genes: int, *, seed: int = 0):
    """A CSR count file written in row blocks (as a large atlas would be), with a split."""
    import anndata as ad
    import pandas as pd
    import scipy.sparse as sp

    rng = np.random.default_rng(seed)
    blocks = []
    for start in range(0, n_cells, 2000):
        rows = min(2000, n_cells - start)
        dense = rng.poisson(0.5, size=(rows, n_genes)).astype(np.int32)
        dense[:, 0] += 1
        blocks.append(sp.csr_matrix(dense))
    obs = pd.DataFrame(
        {
            "split": pd.Categorical(
                rng.choice(["train", "validation", "test"], n_cells, p=[0.8, 0.1, 0.1])
            )
        },
        index=[f"c{i}" for i in range(n_cells)],
    )
    var = pd.DataFrame(index=[f"G{j:04d}" for j in range(n_genes)])
    ad.AnnData(sp.vstack(blocks, format="csr"), obs=obs, var=var).write_h5ad(path)
    return ad.read_h5ad(path, backed="r")


def test_align_genes_of_backed_file_reads_it_in_chunks(tmp_path):
    import tracemalloc

    from scvit_core.data import align_genes

    backed = _write_counts(tmp_path / "big.h5ad", 20_000, 300)
    nbytes = backed.X.group["data"].size * 4 + backed.X.group["indices"].size * 4
    genes = [f"G{j:04d}" for j in range(300)]
    reference = [*genes[::-1][:250], "NEW1", "NEW2"]  # reordered, dropped and missing genes
    tracemalloc.start()
    aligned, report = align_genes(backed, reference, out=tmp_path / "aligned.h5ad", chunk_size=500)
    _, peak = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    assert peak < nbytes / 4, (peak, nbytes)  # a few chunks, never the matrix
    assert aligned.isbacked and list(aligned.var_names) == reference
    assert report.n_missing == 2 and report.n_extra == 50
    rows = np.array([0, 1, 7_777, 19_999])
    expected = backed.to_memory()[rows][:, reference[:250]].X.toarray()
    got = aligned.X[rows].toarray()
    np.testing.assert_array_equal(got[:, :250], expected)
    assert not got[:, 250:].any()


@pytest.mark.parametrize("architecture", ["scvit", "perceiver"])
def test_train_embed_and_evaluate_a_backed_file(tmp_path, architecture):
    """Training reads a backed file in shuffled chunks; the latent written batch by batch to
    an .h5ad equals the in-memory one (both architectures)."""
    import anndata as ad

    from scvit_core import ScViTModel
    from scvit_core.api import ScPerceiverModel
    from scvit_core.config import ScViTConfig
    from scvit_core.perceiver import PerceiverConfig

    backed = _write_counts(tmp_path / "cells.h5ad", 600, 30)
    if architecture == "scvit":
        config = ScViTConfig.small(30, likelihood="nb", stages=((8, 8, 4, 4), (8, 4, 8, 2)))
        model = ScViTModel(backed, config)
    else:
        config = PerceiverConfig.for_genes(30, dim=16, n_tokens=4, heads=2)
        model = ScPerceiverModel(backed, config)
    model.train(
        epochs=1, batch_size=64, chunk_size=16, accelerator="cpu", enable_progress_bar=False
    )
    assert np.isfinite(model.history["val_loss"]).all()
    path = model.write_latent_representation(tmp_path / "latent.h5ad", backed, split="test")
    written = ad.read_h5ad(path)
    in_memory = backed.to_memory()
    expected = model.get_latent_representation(in_memory, split="test")
    assert list(written.obs_names) == list(in_memory.obs_names[in_memory.obs["split"] == "test"])
    np.testing.assert_allclose(written.obsm["X_scvit"], expected, rtol=1e-5, atol=1e-6)
    loss = model.get_reconstruction_error(backed, split="test")["reconstruction_loss"]
    assert loss == pytest.approx(
        model.get_reconstruction_error(in_memory, split="test")["reconstruction_loss"], rel=1e-6
    )
