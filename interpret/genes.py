"""Gene-level attributions and marker-gene recovery: an objective check of attribution quality.

An attribution method that explains a cell-type classifier should rank that type's known marker
genes above the rest. :func:`class_gene_scores` averages, over the cells of each class, the
attribution of every input gene to that class's logit; :func:`marker_recovery` scores the
ranking against marker lists, either canonical ones (:data:`PBMC_MARKERS`) or markers found in
the data by a Wilcoxon test (:func:`de_markers`), with the area under the ROC curve (0.5: the
markers are ranked like any gene; 1: above every other gene).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import anndata as ad
import numpy as np
import pandas as pd
import scanpy as sc
import torch
from sklearn.metrics import roc_auc_score

from scvit_core import _constants as K

from .attribution import attribute

PBMC_MARKERS: dict[str, list[str]] = {
    "CD19+ B": ["MS4A1", "CD79A", "CD79B"],
    "CD14+ Monocyte": ["LYZ", "S100A8", "S100A9", "FCN1"],
    "CD56+ NK": ["NKG7", "GNLY", "GZMB", "FCGR3A"],
    "Dendritic": ["FCER1A", "CST3", "CLEC10A", "HLA-DRA"],
    "CD8+ Cytotoxic T": ["CD8A", "CD8B", "CD3D", "CD3E"],
}
"""Canonical markers of the sorted blood populations of Zheng et al. (2017) that scanpy's
``pbmc68k_reduced`` labels (``bulk_labels``): B cells (MS4A1, CD79A/B), classical monocytes (LYZ,
S100A8/9, FCN1), NK cells (NKG7, GNLY, GZMB, FCGR3A), dendritic cells (FCER1A, CST3, CLEC10A,
HLA-DRA) and cytotoxic T cells (CD8A/B, CD3D/E); only genes present in that dataset's 765."""


def de_markers(
    adata: ad.AnnData,
    *,
    groupby: str = K.CELL_TYPE,
    n_genes: int = 10,
    split: str | None = "train",
    classes: Sequence[str] | None = None,
) -> dict[str, list[str]]:
    """Top up-regulated genes of each class (Wilcoxon, one class against the rest).

    Computed on ``log1p`` of counts normalised to 10^4 per cell, on the cells of ``split``
    (default ``train``, so that a check on test cells does not reuse them). ``adata`` holds raw
    counts and is not modified.

    Returns
    -------
    dict
        Class name -> its ``n_genes`` genes with the highest Wilcoxon scores.
    """
    cells = adata if split is None else adata[adata.obs[K.SPLIT] == split]
    data = ad.AnnData(cells.X.copy(), obs=cells.obs[[groupby]].copy(), var=cells.var[[]].copy())
    sc.pp.normalize_total(data, target_sum=1e4)
    sc.pp.log1p(data)
    groups = [str(c) for c in (classes or data.obs[groupby].astype(str).unique())]
    data.obs[groupby] = data.obs[groupby].astype(str).astype("category")
    sc.tl.rank_genes_groups(data, groupby, groups=groups, method="wilcoxon", n_genes=n_genes)
    names = data.uns["rank_genes_groups"]["names"]
    return {g: [str(n) for n in names[g]] for g in groups}


def class_gene_scores(
    target: torch.nn.Module,
    inputs: torch.Tensor,
    labels: Sequence[str],
    class_names: Sequence[str],
    gene_names: Sequence[str],
    *,
    baselines: torch.Tensor,
    method: str = "deepliftshap",
    cells_per_class: int = 32,
    seed: int = 0,
) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Mean attribution of each gene to each class's logit, over cells of that class.

    Parameters
    ----------
    target
        A classifier target returning one logit per class in the order of ``class_names``
        (e.g. :class:`interpret.ClassifierTarget`).
    inputs
        Model inputs ``(cells, genes)``.
    labels
        Each cell's class name.
    class_names
        The classes to explain (those with at least one cell in ``inputs``).
    gene_names
        Names of the input genes.
    baselines
        Reference cells for the attribution method (e.g. a sample of training cells).
    method
        An :func:`interpret.attribute` method attributing to the input (``layer=None``).
    cells_per_class
        At most this many cells per class (a seeded sample) are explained.

    Returns
    -------
    scores, sanity
        ``scores``: classes x genes mean attributions; ``sanity``: one row per class with the
        method's sanity figure (name, relative error, tolerance, passed).
    """
    labels = np.asarray(labels).astype(str)
    rng = np.random.default_rng(seed)
    rows, checks = {}, []
    for k, name in enumerate(class_names):
        cells = np.flatnonzero(labels == str(name))
        if cells.size == 0:
            continue
        if cells.size > cells_per_class:
            cells = np.sort(rng.choice(cells, cells_per_class, replace=False))
        result = attribute(target, inputs[cells], method=method, target=k, baselines=baselines)
        rows[str(name)] = result.attributions.mean(axis=0)
        checks.append(
            {
                "class": str(name),
                "cells": cells.size,
                "sanity": result.sanity.name,
                "relative_error": result.sanity.relative,
                "tolerance": result.sanity.tolerance,
                "passed": result.sanity.passed,
            }
        )
    scores = pd.DataFrame.from_dict(rows, orient="index", columns=list(map(str, gene_names)))
    return scores, pd.DataFrame(checks)


def marker_recovery(scores: pd.DataFrame, markers: Mapping[str, Sequence[str]]) -> pd.DataFrame:
    """How well each class's attribution ranking recovers its marker genes.

    Parameters
    ----------
    scores
        Classes x genes (from :func:`class_gene_scores`); higher means more evidence for the
        class.
    markers
        Class -> marker genes; genes absent from ``scores`` are ignored, classes absent from
        ``scores`` are skipped.

    Returns
    -------
    DataFrame
        One row per class: ``markers`` (how many were found), ``auroc`` (markers against all
        other genes), ``precision_at_k`` (share of markers among the top ``k`` genes, ``k`` =
        number of markers) and ``median_rank`` (1 = top gene).
    """
    out = []
    for name, genes in markers.items():
        if name not in scores.index:
            continue
        row = scores.loc[name]
        is_marker = row.index.isin(list(genes))
        if not is_marker.any() or is_marker.all():
            continue
        ranks = row.rank(ascending=False)
        k = int(is_marker.sum())
        top = row.sort_values(ascending=False).index[:k]
        out.append(
            {
                "class": name,
                "markers": k,
                "auroc": roc_auc_score(is_marker, row.to_numpy()),
                "precision_at_k": float(np.isin(top, list(genes)).mean()),
                "median_rank": float(np.median(ranks[is_marker])),
            }
        )
    return pd.DataFrame(out)
