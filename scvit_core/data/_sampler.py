"""Which cells go in which minibatch: seeded, disk-friendly and aware of several processes.

:class:`CellBatchSampler` yields lists of positions (into the cells a
:class:`~scvit_core.data.CountBatches` serves). One epoch is one permutation of all positions,
cut into *global* batches of ``world_size * batch_size`` cells; each process takes its own
share of every global batch. So, for any number of processes:

* every cell is seen exactly once per epoch, by exactly one process (no padding, no
  duplicated cells, unlike :class:`torch.utils.data.DistributedSampler`);
* every process takes the same number of steps (DDP needs it to keep its all-reduces paired);
* the cells of each optimiser step are those of single-process training with batches of
  ``world_size * batch_size`` cells and the same seed.

With one process and ``chunk_size=None`` the batches are exactly those of
``BatchSampler(RandomSampler(generator=seeded))``, the loader this class replaces.
"""

from __future__ import annotations

from collections.abc import Iterator

import numpy as np
import torch
from torch.utils.data import Sampler


def distributed_world() -> tuple[int, int]:
    """``(world_size, rank)`` of the initialised default process group, else ``(1, 0)``."""
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return torch.distributed.get_world_size(), torch.distributed.get_rank()
    return 1, 0


class CellBatchSampler(Sampler[list[int]]):
    """Minibatches of cell positions ``0 .. n_cells - 1``, sharded across processes.

    Parameters
    ----------
    n_cells
        Cells to sample from.
    batch_size
        Cells per batch *per process* (Lightning's convention: the global batch is
        ``world_size * batch_size``).
    shuffle
        A new random order every epoch, fixed by ``seed`` and the epoch; otherwise the cells'
        own order.
    chunk_size
        With ``shuffle``: shuffle chunks of this many consecutive cells instead of single cells
        (the chunks' order is random, the cells inside a chunk keep their order). A batch then
        reads ``batch_size / chunk_size`` runs of consecutive rows, which a file on disk serves
        far faster than as many scattered rows. None or 1: fully random cells.
    drop_last
        Drop a last global batch smaller than the others.
    min_last_batch
        A last global batch that would give some process fewer than this many cells is merged
        into the batch before it (2 keeps batch normalisation working in training mode).
    seed
        Seed of the shuffle; every process must use the same one.
    shard
        Share the cells among the processes of :mod:`torch.distributed`, read each time an
        epoch starts (so a sampler built before Lightning starts its processes shards
        correctly). Off, every process gets every cell (inference after training).
    num_replicas, rank
        The processes and this one's rank, given explicitly (implies sharding).

    Notes
    -----
    The epoch's order depends only on ``seed`` and the epoch (see :meth:`_permutation`), so a
    resumed run repeats the orders of an uninterrupted one. Lightning calls
    :meth:`set_epoch` before every epoch; a plain loop that does not moves to the next epoch
    each time the sampler is iterated.
    """

    def __init__(
        self,
        n_cells: int,
        *,
        batch_size: int,
        shuffle: bool = False,
        chunk_size: int | None = None,
        drop_last: bool = False,
        min_last_batch: int = 1,
        seed: int = 0,
        shard: bool = False,
        num_replicas: int | None = None,
        rank: int | None = None,
    ) -> None:
        if batch_size < 1:
            raise ValueError(f"batch_size must be at least 1, got {batch_size}")
        if chunk_size is not None and chunk_size < 1:
            raise ValueError(f"chunk_size must be at least 1 or None, got {chunk_size}")
        if (num_replicas is None) != (rank is None):
            raise ValueError("pass both num_replicas and rank, or neither")
        if num_replicas is not None and not 0 <= rank < num_replicas:
            raise ValueError(f"rank must be in [0, {num_replicas}), got {rank}")
        self.n_cells, self.batch_size = int(n_cells), batch_size
        self.shuffle, self.chunk_size = shuffle, chunk_size
        self.drop_last, self.min_last_batch = drop_last, min_last_batch
        self.seed, self.shard = seed, shard
        self.num_replicas, self.rank = num_replicas, rank
        self.epoch = 0
        self._generator: torch.Generator | None = None
        self._drawn = 0  # permutations drawn from _generator so far

    def set_epoch(self, epoch: int) -> None:
        """Use the order of this epoch (0-based) next."""
        self.epoch = int(epoch)

    def world(self) -> tuple[int, int]:
        """``(world_size, rank)`` this sampler shards for."""
        if self.num_replicas is not None:
            return self.num_replicas, self.rank
        return distributed_world() if self.shard else (1, 0)

    def _permutation(self, n: int, epoch: int) -> np.ndarray:
        """The epoch's ``randperm(n)`` from the generator seeded with ``seed``.

        Draw ``2 * epoch`` (0-based): :class:`~torch.utils.data.RandomSampler` draws two
        permutations per epoch (the second for an empty remainder), and drawing the same ones
        keeps single-process runs identical to those made with it.
        """
        target = 2 * epoch
        if self._generator is None or self._drawn > target:
            self._generator = torch.Generator().manual_seed(self.seed)
            self._drawn = 0
        while True:
            perm = torch.randperm(n, generator=self._generator)
            self._drawn += 1
            if self._drawn > target:
                return perm.numpy()

    def order(self, epoch: int | None = None) -> np.ndarray:
        """Every position once, in the order of ``epoch`` (default: the current one)."""
        epoch = self.epoch if epoch is None else epoch
        if not self.shuffle:
            return np.arange(self.n_cells)
        if not self.chunk_size or self.chunk_size == 1:
            return self._permutation(self.n_cells, epoch)
        starts = np.arange(0, self.n_cells, self.chunk_size)
        return _expand_chunks(
            starts[self._permutation(len(starts), epoch)], self.chunk_size, self.n_cells
        )

    def global_batches(self, epoch: int | None = None) -> list[np.ndarray]:
        """The epoch's global batches (positions), before they are shared among processes."""
        world_size, _ = self.world()
        order = self.order(epoch)
        size = world_size * self.batch_size
        batches = [order[i : i + size] for i in range(0, len(order), size)]
        if batches and len(batches[-1]) < size:
            if self.drop_last:
                batches.pop()
            elif len(batches) > 1 and len(batches[-1]) < world_size * self.min_last_batch:
                last = batches.pop()
                batches[-1] = np.concatenate([batches[-1], last])
        if batches and len(batches[-1]) < world_size:
            raise ValueError(
                f"{self.n_cells} cells cannot give each of {world_size} processes a batch; "
                "use fewer processes or more cells."
            )
        return batches

    def __iter__(self) -> Iterator[list[int]]:
        world_size, rank = self.world()
        batches = self.global_batches()
        if self.shuffle:
            self.epoch += 1  # a loop that never calls set_epoch still gets a new order
        for batch in batches:
            # array_split: the shares differ by at most one cell, none is empty
            yield np.array_split(batch, world_size)[rank].tolist()

    def __len__(self) -> int:
        world_size, _ = self.world()
        size = world_size * self.batch_size
        full, rest = divmod(self.n_cells, size)
        if rest and not self.drop_last and (full == 0 or rest >= world_size * self.min_last_batch):
            return full + 1
        return full


def _expand_chunks(starts: np.ndarray, chunk_size: int, n: int) -> np.ndarray:
    """Positions of the chunks beginning at ``starts``, in that order (the last may be short)."""
    positions = (starts[:, None] + np.arange(chunk_size)).ravel()
    return positions[positions < n]
