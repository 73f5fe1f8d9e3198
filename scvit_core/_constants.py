"""Names of AnnData fields the project reads and writes, in one place (scvi's ``REGISTRY_KEYS``)."""

CELL_TYPE = "cell_type"
"""``obs`` column with the main cell-type label."""

CELL_TYPE_FINE = "cell_type_fine"
"""``obs`` column with the finer label level, where a dataset has one."""

SPLIT = "split"
"""``obs`` column with the stored train/validation/test assignment."""

SPLITS = ("train", "validation", "test")
"""The values of :data:`SPLIT`, in order."""

LATENT = "X_scvit"
"""``obsm`` key for the scViT latent representation (written only when asked)."""

UNS = "scvit"
"""``uns`` key holding provenance and reports (dataset name, source, corrections applied)."""
