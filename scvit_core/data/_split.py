"""A seeded, label-stratified train/validation/test split, stored in ``obs`` with the data."""

from __future__ import annotations

import anndata as ad
import numpy as np
import pandas as pd

from .. import _constants as K
from ._validate import CountDataError


def stratified_split(
    labels: pd.Series | np.ndarray | None,
    n_cells: int,
    *,
    fractions: tuple[float, float, float] = (0.8, 0.1, 0.1),
    seed: int = 0,
) -> np.ndarray:
    """Assign each cell to ``train``, ``validation`` or ``test``.

    Within every label the cells are shuffled with ``seed`` and cut by ``fractions``
    (rounded per label, the remainder going to train), so each split keeps the label
    proportions and every label with at least three cells appears in all three splits.

    Parameters
    ----------
    labels
        One label per cell, or None for an unstratified split.
    n_cells
        Number of cells (checked against ``labels``).
    fractions
        Train, validation and test fractions; must sum to 1.
    seed
        Seed of the shuffle; the same seed gives the same split.

    Returns
    -------
    numpy.ndarray
        Array of ``n_cells`` strings from :data:`scvit_core._constants.SPLITS`.
    """
    fractions = tuple(float(f) for f in fractions)
    if len(fractions) != 3 or min(fractions) < 0 or not np.isclose(sum(fractions), 1.0):
        raise ValueError(
            f"fractions must be three non-negative numbers summing to 1, got {fractions}"
        )
    if labels is None:
        labels = np.zeros(n_cells, dtype=int)
    labels = np.asarray(labels).astype(str)
    if len(labels) != n_cells:
        raise ValueError(f"got {len(labels)} labels for {n_cells} cells")
    rng = np.random.default_rng(seed)
    out = np.empty(n_cells, dtype=object)
    # Sorted unique labels make the result independent of the order labels first appear in.
    for label in np.unique(labels):
        members = np.flatnonzero(labels == label)
        members = members[rng.permutation(len(members))]
        n_val = round(fractions[1] * len(members))
        n_test = round(fractions[2] * len(members))
        if len(members) >= 3:  # keep every label visible in validation and test
            n_val, n_test = (
                max(n_val, 1 if fractions[1] else 0),
                max(n_test, 1 if fractions[2] else 0),
            )
        n_train = len(members) - n_val - n_test
        out[members[:n_train]] = K.SPLITS[0]
        out[members[n_train : n_train + n_val]] = K.SPLITS[1]
        out[members[n_train + n_val :]] = K.SPLITS[2]
    return out


def add_split(
    adata: ad.AnnData,
    *,
    labels_key: str | None = K.CELL_TYPE,
    fractions: tuple[float, float, float] = (0.8, 0.1, 0.1),
    seed: int = 0,
    overwrite: bool = False,
) -> None:
    """Store a stratified split in ``adata.obs["split"]`` (in place).

    An existing valid split is kept unless ``overwrite`` is True, so every model trained on
    the same file sees the same cells.
    """
    if K.SPLIT in adata.obs and not overwrite:
        values = set(adata.obs[K.SPLIT].astype(str).unique())
        if values <= set(K.SPLITS):
            return
        raise CountDataError(
            f"adata.obs[{K.SPLIT!r}] holds {sorted(values)}, expected values from {K.SPLITS}. "
            "Rename that column or pass overwrite=True to replace it."
        )
    labels = adata.obs[labels_key].to_numpy() if labels_key and labels_key in adata.obs else None
    split = stratified_split(labels, adata.n_obs, fractions=fractions, seed=seed)
    adata.obs[K.SPLIT] = pd.Categorical(split, categories=list(K.SPLITS))


def _allocate(counts: np.ndarray, n_cells: int) -> np.ndarray:
    """Cells per label: proportional, largest-remainder rounding, >= 1 each if possible."""
    quota = n_cells * counts / counts.sum()
    alloc = np.floor(quota).astype(np.int64)
    if n_cells >= len(counts):
        alloc = np.maximum(alloc, 1)
        # Raising small labels to one cell can overshoot; take the excess back from the
        # labels that are most over their quota (ties: the earlier label).
        while (excess := int(alloc.sum()) - n_cells) > 0:
            over = np.where(alloc > 1, alloc - quota, -np.inf)
            take = np.argsort(-over, kind="stable")[:excess]
            take = take[alloc[take] > 1]
            alloc[take] -= 1
    remainder = n_cells - int(alloc.sum())
    if remainder > 0:
        # Largest remainders first; the stable sort makes ties go to the earlier label.
        order = np.argsort(-(quota - alloc), kind="stable")
        alloc[order[:remainder]] += 1
    return alloc


def stratified_subsample(labels, n_cells: int, *, seed: int = 0) -> np.ndarray:
    """Choose ``n_cells`` rows so each label keeps its share of the data.

    Each label gets ``n_cells * count / total`` cells, rounded down, and the cells left
    over go to the labels with the largest remainders, so the total is exactly ``n_cells``.
    When ``n_cells`` is at least the number of labels, every label keeps at least one cell
    (taken back from the most over-allocated labels); with fewer cells than labels the
    rarest labels may get none. Within a label, cells are drawn uniformly without
    replacement.

    Parameters
    ----------
    labels
        One label per cell (array-like or pandas Series/Categorical); missing values are
        an error.
    n_cells
        How many cells to keep, between 1 and ``len(labels)``.
    seed
        Seed of the random draw; the same labels and seed give the same rows.

    Returns
    -------
    numpy.ndarray
        Sorted integer row indices (increasing, as h5py needs for reading rows).

    Raises
    ------
    ValueError
        ``n_cells`` not positive, more than the cells available, or missing labels.
    """
    codes, _ = pd.factorize(pd.Series(np.asarray(labels, dtype=object)), sort=True)
    if (codes < 0).any():
        raise ValueError(
            f"{int((codes < 0).sum())} cells have no label; drop or label them before subsampling."
        )
    n_total = len(codes)
    n_cells = int(n_cells)
    if n_cells < 1:
        raise ValueError(f"n_cells must be at least 1, got {n_cells}.")
    if n_cells > n_total:
        raise ValueError(
            f"Asked for {n_cells:,} cells but only {n_total:,} are available. Pass "
            f"n_cells <= {n_total:,}, or use a larger file."
        )
    counts = np.bincount(codes)
    alloc = _allocate(counts, n_cells)
    rng = np.random.default_rng(seed)
    # Labels are visited in sorted order so the draw depends only on (labels, seed).
    by_label = np.argsort(codes, kind="stable")
    bounds = np.concatenate([[0], np.cumsum(counts)])
    chosen = [
        rng.choice(by_label[bounds[k] : bounds[k + 1]], size=alloc[k], replace=False)
        for k in range(len(counts))
    ]
    return np.sort(np.concatenate(chosen)).astype(np.int64)
