"""scViT: a vision-transformer autoencoder for single-cell RNA-seq, and its data layer."""

from importlib.metadata import PackageNotFoundError, version

from .data import (
    CountDataError,
    GeneAlignment,
    add_split,
    align_genes,
    available_datasets,
    count_dataloader,
    load_dataset,
    standard_gene_order,
    validate_counts,
)
from .profiles import Profile, get_profile

try:
    __version__ = version("scvit")
except PackageNotFoundError:  # running from a source tree that is not installed
    __version__ = "0+unknown"

__all__ = [
    "CountDataError",
    "GeneAlignment",
    "Profile",
    "add_split",
    "align_genes",
    "available_datasets",
    "count_dataloader",
    "get_profile",
    "load_dataset",
    "standard_gene_order",
    "validate_counts",
]
