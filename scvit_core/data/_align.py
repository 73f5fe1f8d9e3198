"""Gene alignment to a reference gene order (the report's "standardized order")."""

from __future__ import annotations

import os
import tempfile
import weakref
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import anndata as ad
import h5py
import numpy as np
import pandas as pd
import scipy.sparse as sp

from .. import _constants as K
from ._validate import CountDataError, check_unique_genes


def standard_gene_order(genes: Sequence[str]) -> pd.Index:
    """The report's "standardized order": gene identifiers sorted as strings."""
    index = pd.Index(np.asarray(genes, dtype=str))
    check_unique_genes(index, source="the gene list")
    return index.sort_values()


@dataclass(frozen=True)
class GeneAlignment:
    """What :func:`align_genes` changed: counts and names of matched, missing and extra genes."""

    n_reference: int
    n_query: int
    n_matched: int
    missing: tuple[str, ...]  # in the reference, absent from the data: zero-filled
    extra: tuple[str, ...]  # in the data, absent from the reference: dropped
    n_case_only: int  # missing genes that would match if case were ignored
    reordered: bool  # whether the matched genes changed position

    @property
    def n_missing(self) -> int:
        return len(self.missing)

    @property
    def n_extra(self) -> int:
        return len(self.extra)

    def to_dict(self) -> dict:
        """A JSON- and h5ad-friendly summary (counts plus the first few names)."""
        return {
            "n_reference": self.n_reference,
            "n_query": self.n_query,
            "n_matched": self.n_matched,
            "n_missing": self.n_missing,
            "n_extra": self.n_extra,
            "n_case_only": self.n_case_only,
            "reordered": self.reordered,
            "missing_examples": list(self.missing[:10]),
            "extra_examples": list(self.extra[:10]),
        }

    def __str__(self) -> str:
        text = (
            f"gene alignment to a reference of {self.n_reference} genes: {self.n_matched} "
            f"matched{' (reordered)' if self.reordered else ''}, {self.n_missing} missing "
            f"(zero-filled), {self.n_extra} extra (dropped) out of {self.n_query} in the data"
        )
        if self.n_case_only:
            text += (
                f"; {self.n_case_only} missing genes differ only in letter case (another "
                "species' symbols?)"
            )
        return text


def align_genes(
    adata: ad.AnnData,
    reference: Sequence[str],
    *,
    layer: str | None = None,
    min_matched: int = 1,
    out: str | os.PathLike | None = None,
    chunk_size: int = 10_000,
) -> tuple[ad.AnnData, GeneAlignment]:
    """Put the genes of ``adata`` in the order of ``reference``.

    Genes of the reference absent from the data are filled with zero counts, genes of the
    data absent from the reference are dropped, and matched genes are reordered. The input
    is not modified.

    Parameters
    ----------
    adata
        Cells x genes; ``var_names`` are matched exactly (case-sensitive) to ``reference``.
    reference
        The target gene order, e.g. a trained model's gene list or
        :func:`standard_gene_order` of some genes.
    layer
        Align this layer instead of ``X`` (it becomes ``X`` of the result).
    min_matched
        Fewest matched genes accepted; fewer is an error (wrong identifiers or species).
    out
        A backed ``adata`` only: the ``.h5ad`` file the aligned counts are written to,
        ``chunk_size`` cells at a time (the matrix is never read whole), and which the result
        is opened from, backed. Default: a temporary file deleted with the result.
    chunk_size
        Cells aligned at a time from a backed ``adata``.

    Returns
    -------
    aligned
        A new AnnData (backed if ``adata`` is): ``X`` sparse CSR (dtype kept; float16 becomes
        float32), ``obs`` copied,
        ``var_names`` equal to ``reference``, ``var["present"]`` False for zero-filled genes,
        and the report in ``uns["scvit"]["gene_alignment"]``.
    report
        A :class:`GeneAlignment`; ``print(report)`` gives a one-line summary.
    """
    check_unique_genes(adata.var_names, source="the data's var_names")
    ref = pd.Index(np.asarray(reference, dtype=str))
    check_unique_genes(ref, source="the reference gene list")
    if len(ref) == 0:
        raise CountDataError("the reference gene list is empty.")

    query = adata.var_names.astype(str)
    position = query.get_indexer(ref)  # for each reference gene: its column in the data, or -1
    present = position >= 0
    n_matched = int(present.sum())
    missing = ref[~present]
    extra = query[~query.isin(ref)]
    lower_query = set(query.str.lower())
    n_case_only = int(sum(g.lower() in lower_query for g in missing))
    report = GeneAlignment(
        n_reference=len(ref),
        n_query=len(query),
        n_matched=n_matched,
        missing=tuple(missing),
        extra=tuple(extra),
        n_case_only=n_case_only,
        reordered=not np.all(np.diff(position[present]) > 0),
    )
    if n_matched < min_matched:
        raise CountDataError(
            f"only {n_matched} of {len(ref)} reference genes are in the data "
            f"(need {min_matched}). Are both gene lists the same kind of identifier "
            "(symbols vs Ensembl ids) and the same species? " + str(report)
        )

    X = adata.layers[layer] if layer is not None else adata.X
    var = pd.DataFrame(index=ref.copy())
    var["present"] = present
    uns = {K.UNS: {**adata.uns.get(K.UNS, {}), "gene_alignment": report.to_dict()}}
    if adata.isbacked and layer is None:
        aligned = _align_backed(X, position, present, adata.obs.copy(), var, uns, out, chunk_size)
        return aligned, report
    if not sp.issparse(X):
        X = np.asarray(X)
        # scipy.sparse has no float16; float32 holds every float16 value exactly
        X = sp.csr_matrix(X.astype(np.float32) if X.dtype == np.float16 else X)
    # A 0/1 selection matrix moves column position[r] to column r and leaves missing
    # columns empty; the product stays sparse and keeps integer dtypes.
    selector = sp.csr_matrix(
        (np.ones(n_matched, dtype=X.dtype), (position[present], np.flatnonzero(present))),
        shape=(len(query), len(ref)),
    )
    aligned_X = sp.csr_matrix(X @ selector)
    aligned_X.sort_indices()
    aligned = ad.AnnData(X=aligned_X, obs=adata.obs.copy(), var=var)
    aligned.uns[K.UNS] = uns[K.UNS]
    return aligned, report


def _align_backed(X, position, present, obs, var, uns, out, chunk_size) -> ad.AnnData:
    """Align a backed matrix ``chunk_size`` rows at a time into an ``.h5ad`` file, opened backed."""
    from anndata.io import sparse_dataset, write_elem

    if out is None:
        handle, name = tempfile.mkstemp(suffix=".h5ad", prefix="scvit-aligned-")
        os.close(handle)
        path = Path(name)
    else:
        path = Path(out)
    dtype = np.dtype(X.dtype)
    dtype = np.dtype(np.float32) if dtype == np.float16 else dtype
    selector = sp.csr_matrix(
        (np.ones(int(present.sum()), dtype=dtype), (position[present], np.flatnonzero(present))),
        shape=(X.shape[1], len(var)),
    )
    ad.AnnData(obs=obs, var=var, uns=uns).write_h5ad(path)  # everything but X
    with h5py.File(path, "r+") as f:
        for start in range(0, X.shape[0], chunk_size):
            block = X[start : start + chunk_size]
            block = sp.csr_matrix(block if sp.issparse(block) else np.asarray(block, dtype=dtype))
            chunk = sp.csr_matrix(block.astype(dtype, copy=False) @ selector)
            chunk.sort_indices()
            if start == 0:
                write_elem(f, "X", chunk)
            else:
                sparse_dataset(f["X"]).append(chunk)
    aligned = ad.read_h5ad(path, backed="r")
    if out is None:
        weakref.finalize(aligned, _remove, path)
    return aligned


def _remove(path: Path) -> None:
    path.unlink(missing_ok=True)
