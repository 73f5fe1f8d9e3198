"""Per-layer attributions and representation diagnostics for PyTorch autoencoders.

:mod:`interpret.safe` builds an attribution-safe copy of a model (exact DeepLIFT rules for
softmax, products, LayerNorm and every element-wise activation; the same numbers as the fast
path) and reaches any layer's output through a probe. :mod:`interpret.attribution` runs
DeepSHAP and Captum's layer methods on it, each result carrying its own sanity figure, and
compares methods and randomised models. :mod:`interpret.diagnostics` measures attention,
tokens and representations; :func:`diagnose` runs all of it on one trained network as one
report (also ``scvit diagnose`` on the command line); :mod:`interpret.genes` checks gene-level
attributions against marker genes.

Every tool reads a network through one small interface,
:class:`~scvit_core.model.Interpretable` (``encode``, ``decode``, ``forward_intermediates``,
``attention_sites``, ``token_layers``, ``layer_paths``), implemented by scViT and scPerceiver.
"""

from .attribution import (
    METHODS,
    AttributionResult,
    ClassifierTarget,
    LatentTarget,
    MeanTarget,
    Sanity,
    ScviAutoencoder,
    ScviEncoder,
    attribute,
    method_agreement,
    parameter_blocks,
    prepare,
    randomisation_check,
    rank_agreement,
    reinitialise,
    scvi_autoencoder,
    scvi_encoder,
    tolerance,
)
from .genes import PBMC_MARKERS, class_gene_scores, de_markers, marker_recovery
from .report import Diagnosis, branch_shares, diagnose, diagnose_run
from .safe import (
    LogSumExp,
    Probe,
    Product,
    ProductMatMul,
    Rescale,
    SafeLayerNorm,
    SafeLogSoftmax,
    SafeOutputActivations,
    SafeSoftmax,
    attribution_fast,
    attribution_safe,
    branch_complement,
    deeplift_rules,
    layer_names,
    probe,
)

__all__ = [
    "METHODS",
    "PBMC_MARKERS",
    "AttributionResult",
    "ClassifierTarget",
    "Diagnosis",
    "LatentTarget",
    "LogSumExp",
    "MeanTarget",
    "Probe",
    "Product",
    "ProductMatMul",
    "Rescale",
    "SafeLayerNorm",
    "SafeLogSoftmax",
    "SafeOutputActivations",
    "SafeSoftmax",
    "Sanity",
    "ScviAutoencoder",
    "ScviEncoder",
    "attribute",
    "attribution_fast",
    "attribution_safe",
    "branch_complement",
    "branch_shares",
    "class_gene_scores",
    "de_markers",
    "deeplift_rules",
    "diagnose",
    "diagnose_run",
    "layer_names",
    "marker_recovery",
    "method_agreement",
    "parameter_blocks",
    "prepare",
    "probe",
    "randomisation_check",
    "rank_agreement",
    "reinitialise",
    "scvi_autoencoder",
    "scvi_encoder",
    "tolerance",
]
