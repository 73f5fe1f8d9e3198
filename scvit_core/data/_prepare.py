"""The one path every entry point takes from a user's AnnData to counts a model can read.

:func:`check_anndata` makes the checks that need no pass over the counts (an AnnData, cells and
genes, the layer, unique gene names); :func:`prepare_counts` adds the checks of every value
(:func:`~scvit_core.data.validate_counts`) and the alignment to a model's gene list
(:func:`~scvit_core.data.align_genes`). Neither modifies its input.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import anndata as ad

from ._align import GeneAlignment, align_genes
from ._validate import CountDataError, CountSummary, check_unique_genes, validate_counts

MIN_GENE_OVERLAP = 0.5
"""Fewest of a model's genes, as a fraction, that data must have to be aligned to it: below
that, most of the model's input would be zero-filled and its output meaningless."""


@dataclass(frozen=True)
class PreparedCounts:
    """What :func:`prepare_counts` returns."""

    adata: ad.AnnData
    """Counts in ``X`` (in the reference gene order if one was given), the input's ``obs``.
    The input itself when nothing had to change (no layer, no alignment)."""
    alignment: GeneAlignment | None
    """The alignment to the reference genes, or None if the genes already matched."""
    summary: CountSummary
    """What the value checks saw (cells, genes, non-zeros, empty cells)."""


def counts_source(layer: str | None) -> str:
    """How error messages name the counts: ``adata.X`` or ``adata.layers['name']``."""
    return "adata.X" if layer is None else f"adata.layers[{layer!r}]"


def check_anndata(adata: ad.AnnData, *, layer: str | None = None) -> None:
    """Raise :class:`CountDataError` for data no model can use, without reading the counts.

    Parameters
    ----------
    adata
        Cells x genes; in memory, a view or backed.
    layer
        Layer that should hold the raw counts (None: ``X``).

    Raises
    ------
    CountDataError
        Not an AnnData, no cells or no genes, a missing layer or ``X``, duplicated gene names.
    """
    if not isinstance(adata, ad.AnnData):
        raise CountDataError(
            f"expected an AnnData of cells x genes, got {type(adata).__name__}. Wrap a count "
            "matrix first: anndata.AnnData(X=counts, var=pandas.DataFrame(index=gene_names))."
        )
    n_cells, n_genes = adata.shape
    if n_cells == 0 or n_genes == 0:
        raise CountDataError(
            f"the data are empty ({n_cells} cells x {n_genes} genes). Check the file and any "
            "subsetting or filtering applied before this call."
        )
    if layer is not None and layer not in adata.layers:
        raise CountDataError(
            f"adata has no layer {layer!r}; its layers: {list(adata.layers)}. Pass layer= "
            "naming the layer with the raw counts, or layer=None for X."
        )
    if layer is None and adata.X is None:
        raise CountDataError("adata has no X matrix; pass layer= naming the raw counts.")
    check_unique_genes(adata.var_names)


def prepare_counts(
    adata: ad.AnnData,
    genes: Sequence[str] | None = None,
    *,
    layer: str | None = None,
    allow_empty_cells: bool = True,
    min_gene_overlap: float = MIN_GENE_OVERLAP,
) -> PreparedCounts:
    """Check ``adata`` and return its raw counts, in the order of ``genes`` if given.

    The checks, in order: :func:`check_anndata`; every value of the counts
    (:func:`~scvit_core.data.validate_counts`: finite, non-negative integers; models read raw
    counts and transform them themselves, so normalised data are an error that names the
    fix); then, if the gene names differ from ``genes``, the alignment
    (:func:`~scvit_core.data.align_genes`: reordered, missing genes zero-filled, extra genes
    dropped) with at least ``min_gene_overlap`` of ``genes`` matched.

    Parameters
    ----------
    adata
        Cells x genes with raw counts; in memory (dense or sparse, any integer or float dtype),
        a view or backed. Not modified.
    genes
        A model's gene list; None keeps the data's genes.
    layer
        Layer with the raw counts (None: ``X``).
    allow_empty_cells
        Whether cells with no counts are accepted (training refuses them).
    min_gene_overlap
        Fewest of ``genes``, as a fraction, that must be in the data.

    Returns
    -------
    PreparedCounts

    Raises
    ------
    CountDataError
        Whatever the checks find; the message says what is wrong and how to fix it.
    """
    check_anndata(adata, layer=layer)
    counts = adata.X if layer is None else adata.layers[layer]
    summary = validate_counts(
        counts, source=counts_source(layer), allow_empty_cells=allow_empty_cells
    )
    alignment = None
    if genes is not None and list(map(str, adata.var_names)) != list(map(str, genes)):
        needed = max(1, math.ceil(min_gene_overlap * len(genes)))
        adata, alignment = align_genes(adata, genes, layer=layer, min_matched=needed)
    elif layer is not None:
        adata = ad.AnnData(X=counts, obs=adata.obs.copy(), var=adata.var.copy())
    return PreparedCounts(adata, alignment, summary)
