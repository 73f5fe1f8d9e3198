"""scViT, a vision-transformer autoencoder for single-cell RNA-seq: data, model, training."""

from importlib.metadata import PackageNotFoundError, version

from .api import ScViTModel
from .config import ScViTConfig
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
    "ScViTConfig",
    "ScViTModel",
    "add_split",
    "align_genes",
    "available_datasets",
    "count_dataloader",
    "get_profile",
    "load_dataset",
    "standard_gene_order",
    "validate_counts",
]
