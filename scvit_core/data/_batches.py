"""Minibatches of counts read from sparse (or backed) matrices, one batch at a time."""

from __future__ import annotations

import anndata as ad
import numpy as np
import pandas as pd
import scipy.sparse as sp
import torch
from torch.utils.data import DataLoader, Dataset

from .. import _constants as K
from ._sampler import CellBatchSampler


class CountBatches(Dataset):
    """Cells of an AnnData served as dense float32 minibatches.

    Indexed by a whole batch of row indices (a :class:`~scvit_core.data.CellBatchSampler`
    drives it), so only the rows of one batch are ever densified. Rows are read in
    increasing order, which backed (h5py) matrices require and which keeps CSR slicing
    cache-friendly; from a backed matrix each run of consecutive rows is one slice read (two
    reads of the file) rather than one read per row.

    Each item is a dict: ``"counts"`` (B, genes) float32, ``"index"`` (B,) int64 row
    numbers into ``adata``, and ``"label"`` (B,) int64 codes of ``obs["cell_type"]``
    (:func:`label_codes`: -1 where a cell or the data have no label).
    """

    def __init__(self, adata: ad.AnnData, *, split: str | None = None, layer: str | None = None):
        if split is not None and split not in K.SPLITS:
            raise ValueError(f"split must be one of {K.SPLITS} or None, got {split!r}")
        if split is not None and K.SPLIT not in adata.obs:
            raise KeyError(
                f"adata.obs has no {K.SPLIT!r} column; load the data with "
                "scvit_core.load_dataset or add one with scvit_core.add_split."
            )
        self.X = adata.layers[layer] if layer is not None else adata.X
        self.rows = (
            np.flatnonzero(adata.obs[K.SPLIT].to_numpy() == split)
            if split is not None
            else np.arange(adata.n_obs)
        )
        self.labels = label_codes(adata.obs)

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, batch: list[int]) -> dict[str, torch.Tensor]:
        rows = np.sort(self.rows[np.asarray(batch)])
        block = read_rows(self.X, rows)
        dense = block.toarray() if sp.issparse(block) else np.asarray(block)
        return {
            "counts": torch.from_numpy(dense.astype(np.float32, copy=False)),
            "index": torch.from_numpy(rows.astype(np.int64)),
            "label": torch.from_numpy(self.labels[rows]),
        }


MAX_GAP = 32
"""Rows a read from disk may skip over and discard rather than start a new read."""


def read_rows(X, rows: np.ndarray):
    """Rows ``rows`` (sorted) of ``X``, as ``X[rows]``.

    A backed matrix is read one span of nearby rows at a time (rows less than
    :data:`MAX_GAP` apart share a read; the rows between are discarded), so a batch of a few
    runs costs a few reads of the file however many cells it holds; a backed CSR matrix is
    read straight from its HDF5 arrays with its row pointers cached.
    """
    if sp.issparse(X) or isinstance(X, np.ndarray) or len(rows) == 0:
        return X[rows]
    breaks = np.flatnonzero(np.diff(rows) > MAX_GAP) + 1
    starts, stops = np.concatenate([[0], breaks]), np.concatenate([breaks, [len(rows)]])
    if getattr(X, "format", None) == "csr" and hasattr(X, "group"):
        return _BackedCSR.of(X).rows(rows, starts, stops)
    blocks = []
    for a, b in zip(starts, stops, strict=True):
        first = int(rows[a])
        block = X[first : int(rows[b - 1]) + 1]
        blocks.append(block[rows[a:b] - first])
    if sp.issparse(blocks[0]):
        return sp.vstack(blocks, format="csr")
    return np.concatenate([np.asarray(b) for b in blocks])


class _BackedCSR:
    """Direct reads of an on-disk CSR matrix: its row pointers in memory (8 bytes a cell),
    ``data`` and ``indices`` read by span from HDF5 (anndata's per-call overhead is avoided)."""

    _cache: dict[int, _BackedCSR] = {}  # noqa: RUF012 - one reader per open matrix

    def __init__(self, X) -> None:
        self.X = X
        self.indptr = X.group["indptr"][:].astype(np.int64)
        self.data, self.indices = X.group["data"], X.group["indices"]
        self.shape = X.shape

    @classmethod
    def of(cls, X) -> _BackedCSR:
        reader = cls._cache.get(id(X))
        if reader is None or reader.X is not X:
            reader = cls._cache[id(X)] = cls(X)
        return reader

    def rows(self, rows: np.ndarray, starts: np.ndarray, stops: np.ndarray) -> sp.csr_matrix:
        blocks = []
        for a, b in zip(starts, stops, strict=True):
            first, last = int(rows[a]), int(rows[b - 1]) + 1
            lo, hi = self.indptr[first], self.indptr[last]
            block = sp.csr_matrix(
                (self.data[lo:hi], self.indices[lo:hi], self.indptr[first : last + 1] - lo),
                shape=(last - first, self.shape[1]),
            )
            blocks.append(block[rows[a:b] - first])
        return blocks[0] if len(blocks) == 1 else sp.vstack(blocks, format="csr")


def label_codes(obs: pd.DataFrame) -> np.ndarray:
    """Integer codes ``(cells,)`` of ``obs["cell_type"]`` of any dtype, -1 where it is missing.

    Labels are optional: strings, integers and categories all work (codes follow the labels
    sorted as strings, or a categorical's own order), and data without the column get -1.
    """
    if K.CELL_TYPE not in obs:
        return np.full(len(obs), -1, dtype=np.int64)
    labels = obs[K.CELL_TYPE]
    if not isinstance(labels.dtype, pd.CategoricalDtype):
        labels = labels.where(labels.isna(), labels.astype(str))  # mixed types sort as strings
    return pd.Categorical(labels).codes.astype(np.int64)


def count_dataloader(
    adata: ad.AnnData,
    *,
    split: str | None = None,
    batch_size: int = 256,
    shuffle: bool = False,
    drop_last: bool = False,
    seed: int = 0,
    layer: str | None = None,
    num_workers: int = 0,
    chunk_size: int | None = None,
    min_last_batch: int = 1,
    shard: bool = False,
) -> DataLoader:
    """A :class:`~torch.utils.data.DataLoader` of count minibatches (see :class:`CountBatches`).

    Parameters
    ----------
    adata
        In-memory or backed AnnData with raw counts.
    split
        Only cells of this stored split (``"train"``, ``"validation"``, ``"test"``), or all.
    batch_size
        Cells per batch (per process when several train together: each process gets its own
        share of every epoch's cells, see :class:`~scvit_core.data.CellBatchSampler`).
    shuffle
        Draw batches in a random order fixed by ``seed`` (a new order every epoch, the
        same sequence of orders for the same seed). Rows within a batch come sorted.
    drop_last
        Drop a last, smaller batch.
    seed
        Seed of the shuffle.
    layer
        Read counts from this layer instead of ``X``.
    num_workers
        Worker processes for batch assembly (0: in the main process).
    chunk_size
        With ``shuffle``: shuffle chunks of this many consecutive cells rather than single
        cells, so that a batch from a file on disk is a few contiguous reads (see
        :class:`~scvit_core.data.CellBatchSampler`). None: fully random batches.
    min_last_batch
        A last batch with fewer cells than this (per process) joins the one before it.
    shard
        Under :mod:`torch.distributed` (DDP), give each process its own share of the cells
        (training and validation); off, every process reads every cell.
    """
    dataset = CountBatches(adata, split=split, layer=layer)
    sampler = CellBatchSampler(
        len(dataset),
        batch_size=batch_size,
        shuffle=shuffle,
        chunk_size=chunk_size,
        drop_last=drop_last,
        min_last_batch=min_last_batch,
        seed=seed,
        shard=shard,
    )
    return DataLoader(
        dataset,
        sampler=sampler,
        batch_size=None,  # the sampler already yields whole batches
        num_workers=num_workers,
    )
