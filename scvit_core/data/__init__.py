"""Data layer: loading, validation, gene alignment, stored splits and minibatches."""

from ._align import GeneAlignment, align_genes, standard_gene_order
from ._batches import CountBatches, count_dataloader, label_codes, read_rows
from ._datasets import DATA_DIR_DATASETS, DataDirDataset, available_datasets, load_dataset
from ._files import DATA_DIR_ENV, sha256sum
from ._prepare import MIN_GENE_OVERLAP, PreparedCounts, check_anndata, prepare_counts
from ._sampler import CellBatchSampler, distributed_world
from ._split import add_split, stratified_split, stratified_subsample
from ._validate import (
    CountDataError,
    CountSummary,
    check_labels,
    check_unique_genes,
    validate_counts,
)
from .hbca import REPORT_SIZES, load_hbca

__all__ = [
    "DATA_DIR_DATASETS",
    "DATA_DIR_ENV",
    "MIN_GENE_OVERLAP",
    "REPORT_SIZES",
    "CellBatchSampler",
    "CountBatches",
    "CountDataError",
    "CountSummary",
    "DataDirDataset",
    "GeneAlignment",
    "PreparedCounts",
    "add_split",
    "align_genes",
    "available_datasets",
    "check_anndata",
    "check_labels",
    "check_unique_genes",
    "count_dataloader",
    "distributed_world",
    "label_codes",
    "load_dataset",
    "load_hbca",
    "prepare_counts",
    "read_rows",
    "sha256sum",
    "standard_gene_order",
    "stratified_split",
    "stratified_subsample",
    "validate_counts",
]
