"""Checks that a matrix holds usable raw counts (DESIGN.md section 8).

Every check reads the matrix in row chunks, so a backed (on-disk) matrix is never loaded
whole. Nothing here modifies its input.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pandas as pd
import scipy.sparse as sp


class CountDataError(ValueError):
    """The data cannot be used as raw counts; the message says what is wrong and how to fix it."""


@dataclass(frozen=True)
class CountSummary:
    """What :func:`validate_counts` saw."""

    n_cells: int
    n_genes: int
    n_nonzero: int
    total_counts: float
    n_empty_cells: int
    empty_cells: np.ndarray  # boolean mask, one entry per cell

    @property
    def sparsity(self) -> float:
        """Fraction of entries that are zero."""
        return 1.0 - self.n_nonzero / max(self.n_cells * self.n_genes, 1)


def _row_chunks(X, chunk_size: int):
    for start in range(0, X.shape[0], chunk_size):
        block = X[start : start + chunk_size]
        if sp.issparse(block):
            block = sp.csr_matrix(block)
            yield start, block.data, block
        else:
            block = np.asarray(block)
            yield start, block.ravel(), block


def validate_counts(
    X,
    *,
    source: str = "adata.X",
    require_integer: bool = True,
    allow_empty_cells: bool = False,
    chunk_size: int = 10_000,
) -> CountSummary:
    """Check that ``X`` (cells x genes) holds non-negative, finite, integer counts.

    Parameters
    ----------
    X
        Dense array, scipy sparse matrix, or a backed anndata matrix.
    source
        How the user refers to ``X``; used in error messages.
    require_integer
        Count likelihoods need integers; set False to accept non-negative reals.
    allow_empty_cells
        If False, cells whose counts are all zero are an error.
    chunk_size
        Rows read at a time.

    Returns
    -------
    CountSummary
        Shape, non-zeros, total counts and the mask of empty cells.

    Raises
    ------
    CountDataError
        Empty data, NaN or infinite values, negative values, non-integers, or empty cells.
    """
    n_cells, n_genes = X.shape
    if n_cells == 0 or n_genes == 0:
        raise CountDataError(
            f"{source} is empty ({n_cells} cells x {n_genes} genes). "
            "Check the file and any subsetting applied before this call."
        )
    n_nonzero, total = 0, 0.0
    library = np.zeros(n_cells)
    for start, values, block in _row_chunks(X, chunk_size):
        if values.dtype.kind not in "biuf":
            raise CountDataError(
                f"{source} has dtype {values.dtype}; counts must be numeric. "
                "Convert it with X.astype(np.int32)."
            )
        if values.dtype.kind == "f":
            bad = ~np.isfinite(values)
            if bad.any():
                raise CountDataError(
                    f"{source} contains {int(bad.sum())} NaN or infinite values in rows "
                    f"{start}-{start + block.shape[0] - 1}. Counts must be finite: "
                    "remove or repair those cells."
                )
            if require_integer and (values != np.round(values)).any():
                example = values[values != np.round(values)][0]
                raise CountDataError(
                    f"{source} contains non-integer values (e.g. {example:.4g}); this looks "
                    "normalised or log-transformed, but count likelihoods need raw counts. "
                    "Pass layer= with the raw counts (e.g. layer='counts' or layer='raw.X')."
                )
        if (values < 0).any():
            raise CountDataError(
                f"{source} contains {int((values < 0).sum())} negative values; counts must "
                "be >= 0. This looks like scaled or centred data: pass the raw counts via layer=."
            )
        n_nonzero += int(np.count_nonzero(values))
        row_sums = np.asarray(block.sum(axis=1)).ravel()
        library[start : start + len(row_sums)] = row_sums
        total += float(row_sums.sum())
    empty = library == 0
    if empty.any() and not allow_empty_cells:
        raise CountDataError(
            f"{source} has {int(empty.sum())} cells whose counts are all zero; they carry "
            "no information and break library-size normalisation. Filter them first with "
            "scanpy.pp.filter_cells(adata, min_counts=1), or load the data with "
            "load_dataset(..., empty_cells='drop') (the number dropped is recorded in adata.uns)."
        )
    return CountSummary(n_cells, n_genes, n_nonzero, total, int(empty.sum()), empty)


def check_unique_genes(var_names: pd.Index, *, source: str = "adata.var_names") -> None:
    """Raise :class:`CountDataError` if gene names repeat (alignment would be ambiguous)."""
    duplicated = var_names[var_names.duplicated()].unique()
    if len(duplicated):
        shown = ", ".join(map(str, duplicated[:5]))
        raise CountDataError(
            f"{source} has {len(duplicated)} duplicated gene names (e.g. {shown}); genes "
            "cannot be matched to a reference order. Make them unique first, e.g. with "
            "adata.var_names_make_unique(), or sum the duplicates."
        )


def check_labels(obs: pd.DataFrame, labels_key: str, *, source: str = "adata.obs") -> None:
    """Raise :class:`CountDataError` if ``labels_key`` is not in ``obs`` or has missing values."""
    if labels_key not in obs.columns:
        raise CountDataError(
            f"{source} has no column {labels_key!r}; available columns: "
            f"{list(obs.columns)}. Pass labels_key= naming the cell-type column."
        )
    n_missing = int(obs[labels_key].isna().sum())
    if n_missing:
        raise CountDataError(
            f"{source}[{labels_key!r}] has {n_missing} missing labels. Fill or drop those "
            "cells, or pass another labels_key=."
        )
