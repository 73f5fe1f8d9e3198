"""The Human Brain Cell Atlas (HBCA) at the report's scale: download, check, subsample.

The report trained on label-stratified subsets of the Human Brain Cell Atlas v1.0
(Siletti et al. 2023, *Science*, doi:10.1126/science.add7046) with 42,116 and 168,464 cells,
labelled by ``supercluster_term`` and with genes (Ensembl ids) sorted by identifier, the
reference code's "standardized order". The atlas is published on CELLxGENE Discover
(collection ``283d65eb-dd53-496d-adb7-7570c7caa443``) as ``.h5ad`` files far larger than
memory (all neurons: about 33 GB, 2.48 M cells), so :func:`load_hbca` opens the file backed,
chooses the cells from ``obs`` alone and reads only those rows.

Nothing here runs in CI with a network: the tests use a small local file with the same
schema and a local HTTP server.
"""

from __future__ import annotations

import http.client
import os
import re
import urllib.error
import urllib.parse
import urllib.request
import warnings
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import anndata
import numpy as np
import pandas as pd
import scipy.sparse as sp
from tqdm import tqdm  # tqdm.auto needs ipywidgets in notebooks

from .._constants import CELL_TYPE, UNS
from ._files import DATA_DIR_ENV, sha256sum
from ._split import add_split, stratified_subsample
from ._validate import CountDataError, check_labels, check_unique_genes, validate_counts

__all__ = [
    "HBCA_SOURCES",
    "REPORT_SIZES",
    "DownloadError",
    "HBCASource",
    "download",
    "load_hbca",
    "sha256sum",
    "stratified_subsample",
    "synthetic_hbca",
]

REPORT_SIZES = (42_116, 168_464)
"""Training-set sizes of the report's Table 1 (cells)."""

HBCA_GENES = 59_480
"""Genes of the atlas's files (and of scViT's ``paper`` preset)."""

_CHUNK_ROWS = 10_000  # rows read from disk at a time: bounds memory for wide backed matrices


@dataclass(frozen=True)
class HBCASource:
    """One downloadable HBCA file.

    ``sha256`` stays ``None`` until someone has downloaded the file and pinned its digest:
    a checksum is never guessed.
    """

    url: str
    title: str
    n_cells: int
    size: str
    sha256: str | None = None

    @property
    def filename(self) -> str:
        return Path(urllib.parse.urlparse(self.url).path).name


# CELLxGENE serves each *dataset version* at datasets.cellxgene.cziscience.com/<id>.h5ad; a
# revision of the collection publishes new ids, so check the collection page
# (https://cellxgene.cziscience.com/collections/283d65eb-dd53-496d-adb7-7570c7caa443) if a
# URL stops working and add the new one here (or pass url=). These two ids are the ones
# used by public analysis scripts of the "All neurons" / "All non-neuronal cells" datasets
# (e.g. EMR-bioinformatics/cellGeometry_manuscript); their digests have not been pinned yet.
HBCA_SOURCES: dict[str, HBCASource] = {
    "neurons": HBCASource(
        url="https://datasets.cellxgene.cziscience.com/c2f66cd5-4ff4-4578-876c-55783a57cf8f.h5ad",
        title="Human Brain Cell Atlas v1.0: all neurons",
        n_cells=2_480_956,
        size="33 GB",
    ),
    "non_neuronal": HBCASource(
        url="https://datasets.cellxgene.cziscience.com/99f27be8-9fac-451e-9723-9e4c7191589e.h5ad",
        title="Human Brain Cell Atlas v1.0: all non-neuronal cells",
        n_cells=888_263,
        size="4 GB",
    ),
}
"""Known HBCA files by name; extend it (or pass ``url=``) to use another CELLxGENE file."""


class DownloadError(RuntimeError):
    """A download failed or produced the wrong file; the message says what to do."""


# ---------------------------------------------------------------------------------------
# Download
# ---------------------------------------------------------------------------------------


def _sidecar(dest: Path) -> Path:
    # sha256sum-format record of what download() wrote, so a later load can report the
    # digest without re-hashing tens of GB.
    return dest.with_suffix(dest.suffix + ".sha256")


def _read_sidecar(dest: Path) -> str | None:
    side = _sidecar(dest)
    if not side.is_file():
        return None
    fields = side.read_text().split()
    return fields[0] if fields else None


def _offline_hint(url: str, dest: Path) -> str:
    return (
        f"No network? Download {url} elsewhere and place it at {dest}; "
        f"a partial download in {dest.name}.part resumes on the next call."
    )


def _open(url: str, offset: int, timeout: float):
    headers = {"User-Agent": "scvit-core"}
    if offset:
        headers["Range"] = f"bytes={offset}-"
    return urllib.request.urlopen(urllib.request.Request(url, headers=headers), timeout=timeout)


def download(
    url: str,
    dest: str | os.PathLike,
    *,
    sha256: str | None = None,
    progress: bool = True,
    chunk_size: int = 1 << 20,
    timeout: float = 60.0,
) -> Path:
    """Download ``url`` to ``dest``, resuming an interrupted download and checking its digest.

    Bytes go to ``<dest>.part`` and are renamed to ``dest`` only when complete (and, if
    ``sha256`` is given, verified), so ``dest`` never holds a partial file. An existing
    ``.part`` is resumed with an HTTP ``Range`` request; a server that ignores ranges
    (answers 200) restarts the file from the beginning. The digest of the finished file is
    recorded next to it in ``<dest>.sha256``.

    Parameters
    ----------
    url
        HTTP(S) address of the file.
    dest
        Where the file should end up; parent directories are created.
    sha256
        Expected hex SHA-256 digest. If ``dest`` already exists it is checked against this
        and returned without downloading; if ``None``, an existing ``dest`` is trusted.
    progress
        Show a tqdm progress bar.
    chunk_size
        Bytes read from the connection at a time.
    timeout
        Seconds to wait for the server before giving up.

    Returns
    -------
    pathlib.Path
        ``dest``.

    Raises
    ------
    DownloadError
        Network failure, an HTTP error, or a digest mismatch (of the download or of an
        existing ``dest``); the message names the paths and what to do.
    """
    dest = Path(dest)
    part = dest.with_suffix(dest.suffix + ".part")
    expected = sha256.lower() if sha256 else None

    if dest.exists():
        if expected is None:
            return dest
        actual = sha256sum(dest)
        if actual == expected:
            return dest
        # The file is the user's: report, never delete or overwrite it.
        raise DownloadError(
            f"{dest} exists but its sha256 is {actual}, expected {expected}. It may be a "
            f"different version of the file or corrupted. Move or delete it to download "
            f"{url} again, or pass the sha256 of the version you mean to use."
        )

    dest.parent.mkdir(parents=True, exist_ok=True)
    offset = part.stat().st_size if part.exists() else 0
    try:
        try:
            response = _open(url, offset, timeout)
        except urllib.error.HTTPError as err:
            if err.code != 416 or not offset:
                raise
            # 416: nothing left after `offset`. Either the .part is already complete or it
            # is longer than the file (a changed upstream file); restart in the latter case.
            total = re.search(r"/(\d+)", err.headers.get("Content-Range", "") or "")
            err.close()
            if total and int(total.group(1)) == offset:
                response = None
            else:
                offset = 0
                response = _open(url, 0, timeout)
        if response is not None:
            with response:
                _write_body(response, part, offset, chunk_size, progress, dest.name)
    except urllib.error.HTTPError as err:
        raise DownloadError(
            f"Downloading {url} failed: HTTP {err.code} {err.reason}. Check the URL "
            f"(CELLxGENE file ids change when a collection is revised). "
            f"{_offline_hint(url, dest)}"
        ) from err
    except (urllib.error.URLError, http.client.HTTPException, OSError) as err:
        reason = getattr(err, "reason", err)
        raise DownloadError(
            f"Downloading {url} failed ({reason}). {_offline_hint(url, dest)}"
        ) from err

    actual = sha256sum(part)
    if expected is not None and actual != expected:
        # Only our own .part is removed, so the next call starts clean instead of resuming a
        # corrupt file.
        part.unlink()
        raise DownloadError(
            f"Checksum mismatch for {url}: expected sha256 {expected}, got {actual}. The "
            f"partial file was removed. If the download was corrupted, run again; if the "
            f"file changed upstream, check its source and pass sha256={actual!r} only if "
            f"you trust it."
        )
    os.replace(part, dest)  # atomic on one filesystem: dest is complete or absent
    _sidecar(dest).write_text(f"{actual}  {dest.name}\n")
    return dest


def _write_body(response, part: Path, offset: int, chunk_size: int, progress: bool, name: str):
    status = response.status
    if offset and status == 206:
        content_range = response.headers.get("Content-Range", "")
        if not content_range.startswith(f"bytes {offset}-"):
            raise DownloadError(
                f"The server answered the resume request at byte {offset} with "
                f"Content-Range {content_range!r}. Delete {part} and run again."
            )
        mode = "ab"
    else:
        # A 200 answer is the whole file even when a range was asked for: start over rather
        # than append a second copy to the partial file.
        offset, mode = 0, "wb"
    length = response.headers.get("Content-Length")
    total = offset + int(length) if length is not None else None
    with (
        open(part, mode) as fh,
        tqdm(
            total=total,
            initial=offset,
            unit="B",
            unit_scale=True,
            unit_divisor=1024,
            desc=name,
            disable=not progress,
        ) as bar,
    ):
        while block := response.read(chunk_size):
            fh.write(block)
            bar.update(len(block))
    written = part.stat().st_size
    if total is not None and written != total:
        raise DownloadError(
            f"The connection closed after {written} of {total} bytes; run again to resume "
            f"from {part}."
        )


# ---------------------------------------------------------------------------------------
# Loader
# ---------------------------------------------------------------------------------------


def _how_to_supply() -> str:
    known = "\n".join(f"  {k!r}: {s.title} ({s.size}): {s.url}" for k, s in HBCA_SOURCES.items())
    return (
        "Supply the HBCA file in one of these ways:\n"
        "  load_hbca(path='/path/to/file.h5ad')  (a file you downloaded yourself), or\n"
        f"  load_hbca(source=NAME, data_dir=DIR)  (or set ${DATA_DIR_ENV}=DIR), which downloads"
        " into DIR, or\n"
        "  load_hbca(url='https://datasets.cellxgene.cziscience.com/<id>.h5ad', data_dir=DIR).\n"
        f"Known sources (HBCA_SOURCES):\n{known}"
    )


def _resolve(
    path, url: str | None, source: str | None, sha256: str | None, data_dir, progress: bool
) -> tuple[Path, str | None, str | None, bool]:
    """Return (local file, url it came from, pinned sha256, whether download() checked it)."""
    if source is not None:
        if source not in HBCA_SOURCES:
            raise KeyError(
                f"Unknown HBCA source {source!r}; known: {sorted(HBCA_SOURCES)}. Add it to "
                "HBCA_SOURCES or pass url=."
            )
        entry = HBCA_SOURCES[source]
        url = url or entry.url
        sha256 = sha256 or entry.sha256

    if path is not None:
        path = Path(path).expanduser()
        if not path.exists():
            if url is None:
                raise FileNotFoundError(f"No HBCA file at {path}.\n{_how_to_supply()}")
            download(url, path, sha256=sha256, progress=progress)
            return path, url, sha256, sha256 is not None
        return path, url, sha256, False

    data_dir = data_dir if data_dir is not None else (os.environ.get(DATA_DIR_ENV) or None)
    if data_dir is None:
        raise FileNotFoundError(
            f"No HBCA file given and no data directory (data_dir= or ${DATA_DIR_ENV}).\n"
            f"{_how_to_supply()}"
        )
    data_dir = Path(data_dir).expanduser()
    if url is not None:
        name = Path(urllib.parse.urlparse(url).path).name or "hbca.h5ad"
        file = download(url, data_dir / name, sha256=sha256, progress=progress)
        return file, url, sha256, sha256 is not None
    # No URL: use a known file that is already there, never start a multi-GB download
    # the caller did not ask for.
    for entry in HBCA_SOURCES.values():
        candidate = data_dir / entry.filename
        if candidate.is_file():
            return candidate, entry.url, sha256 or entry.sha256, False
    raise FileNotFoundError(f"No known HBCA file in {data_dir}.\n{_how_to_supply()}")


def _read_rows(X, rows: np.ndarray) -> sp.csr_matrix:
    """Read the given (increasing) rows of a backed matrix as CSR, a chunk at a time."""
    blocks = []
    for start in range(0, len(rows), _CHUNK_ROWS):
        block = X[rows[start : start + _CHUNK_ROWS]]
        blocks.append(sp.csr_matrix(block))
    return sp.vstack(blocks, format="csr") if blocks else sp.csr_matrix((0, X.shape[1]))


def load_hbca(
    n_cells: int | None = REPORT_SIZES[0],
    *,
    path: str | os.PathLike | None = None,
    url: str | None = None,
    source: str | None = None,
    sha256: str | None = None,
    data_dir: str | os.PathLike | None = None,
    labels_key: str = "supercluster_term",
    obs_keys: Sequence[str] = (),
    seed: int = 0,
    progress: bool = True,
) -> anndata.AnnData:
    """Load a label-stratified subset of the Human Brain Cell Atlas as raw integer counts.

    The file is opened backed; cells are chosen from ``obs`` with
    :func:`stratified_subsample` and only their rows are read, so the full atlas never
    has to fit in memory. Counts come from ``raw.X`` when the file has a ``raw`` (the
    CELLxGENE schema keeps raw counts there when ``X`` is normalised), else from ``X``.
    Genes are put in the report's "standardized order": columns sorted by gene id.

    Parameters
    ----------
    n_cells
        Cells to keep; the report used 42,116 and 168,464 (:data:`REPORT_SIZES`).
        ``None`` keeps every cell (and loads the whole matrix).
    path
        A local ``.h5ad``. If it does not exist and ``url``/``source`` is given, the file
        is downloaded there.
    url
        Where to download the file from, into ``data_dir`` (or to ``path``).
    source
        Name of an entry of :data:`HBCA_SOURCES` (e.g. ``"non_neuronal"``), supplying
        ``url`` and, once pinned, ``sha256``.
    sha256
        Expected digest of the file; checked before use when the file is downloaded or
        already present. Without it, the digest computed at download time is recorded
        in the provenance so it can be pinned.
    data_dir
        Directory for downloads and for finding known files; defaults to
        ``$SCVIT_DATA_DIR``.
    labels_key
        ``obs`` column with the cell-type label, copied to ``obs["cell_type"]``.
    obs_keys
        Further ``obs`` columns to keep (e.g. donor or region).
    seed
        Seed of the subsample.
    progress
        Show a progress bar while downloading.

    Returns
    -------
    anndata.AnnData
        In memory: ``X`` int32 CSR counts (cells x genes, genes sorted by id and named by
        them, with ``var["feature_name"]`` when the file has gene symbols),
        ``obs["cell_type"]`` categorical, and ``uns["scvit"]`` the provenance (file, url,
        sha256, sizes, seed, labels_key, where the counts came from), and the stored
        stratified split in ``obs["split"]``.

    Raises
    ------
    FileNotFoundError
        No file could be found or none was specified; the message lists the ways to
        supply one.
    DownloadError
        The download failed or its checksum did not match.
    CountDataError
        Missing label column or labels, duplicated gene ids, non-integer, negative or
        non-finite counts, or all-zero cells among those chosen.
    ValueError
        ``n_cells`` larger than the number of cells in the file.
    """
    file, url, sha256, checked = _resolve(path, url, source, sha256, data_dir, progress)
    digest, verified = None, False
    if sha256 is not None:
        # download() has just hashed the file when it fetched or found it; otherwise hash it
        # here (a sidecar could be stale if the file was replaced by hand).
        digest = sha256.lower() if checked else sha256sum(file)
        if digest != sha256.lower():
            raise DownloadError(
                f"{file} has sha256 {digest}, expected {sha256.lower()}. Pass the right "
                "sha256=, or move the file away to download it again."
            )
        verified = True
    else:
        digest = _read_sidecar(file)
        if digest is not None and url is not None:
            warnings.warn(
                f"{file.name} is not pinned to a checksum; its sha256 at download was "
                f"{digest}. Pass sha256={digest!r} (or set it in HBCA_SOURCES) to make "
                "later runs verify the file.",
                UserWarning,
                stacklevel=2,
            )

    backed = anndata.read_h5ad(file, backed="r")
    try:
        source_name = f"{file.name}"
        check_labels(backed.obs, labels_key, source=f"{source_name} obs")
        missing = [k for k in obs_keys if k not in backed.obs.columns]
        if missing:
            raise CountDataError(
                f"{source_name} obs has no column(s) {missing}; available: "
                f"{list(backed.obs.columns)}. Fix obs_keys=."
            )
        if backed.raw is not None:
            matrix, genes_var, counts_from = backed.raw.X, backed.raw.var, "raw.X"
        else:
            matrix, genes_var, counts_from = backed.X, backed.var, "X"
        check_unique_genes(genes_var.index, source=f"{source_name} {counts_from} genes")

        labels = backed.obs[labels_key]
        n_available = backed.n_obs
        if n_cells is None:
            rows = np.arange(n_available)
        else:
            rows = stratified_subsample(labels.to_numpy(), n_cells, seed=seed)
        X = _read_rows(matrix, rows)

        feature_name = None
        if "feature_name" in genes_var.columns:
            feature_name = genes_var["feature_name"]
        elif "feature_name" in backed.var.columns and genes_var.index.isin(backed.var.index).all():
            feature_name = backed.var["feature_name"].reindex(genes_var.index)
        obs = backed.obs.iloc[rows][list(obs_keys)].copy()
        obs[CELL_TYPE] = pd.Categorical(labels.iloc[rows].astype(str))
    finally:
        backed.file.close()

    where = f"{source_name} {counts_from} (chosen cells)"
    summary = validate_counts(X, source=where, require_integer=True, allow_empty_cells=True)
    if summary.n_empty_cells:
        raise CountDataError(
            f"{where} has {summary.n_empty_cells} cells whose counts are all zero; they "
            "carry no information and break library-size normalisation. Filter them from "
            "the file first (scanpy.pp.filter_cells(adata, min_counts=1)) or pass another "
            "seed=."
        )
    if X.nnz and X.data.max() > np.iinfo(np.int32).max:
        raise CountDataError(f"{where} has counts above the int32 range; they cannot be counts.")
    X = sp.csr_matrix(X, dtype=np.int32)

    # The reference code's "standardized order": genes sorted by identifier.
    order = np.argsort(genes_var.index.to_numpy(dtype=str), kind="stable")
    X = X[:, order].tocsr()
    X.sort_indices()
    var = pd.DataFrame(index=pd.Index(genes_var.index[order].astype(str), name=None))
    if feature_name is not None:
        var["feature_name"] = feature_name.iloc[order].astype(str).to_numpy()

    provenance = {
        "dataset": "hbca",
        "source": str(file),
        "url": url,
        "sha256": digest,
        "sha256_verified": verified,
        "n_cells_requested": -1 if n_cells is None else int(n_cells),
        "n_cells_available": int(n_available),
        "seed": int(seed),
        "labels_key": labels_key,
        "counts_from": counts_from,
        "gene_order": "sorted by gene id",
    }
    # h5ad cannot store None: leave unknown entries out instead.
    provenance = {k: v for k, v in provenance.items() if v is not None}
    obs.index = obs.index.astype(str)
    adata = anndata.AnnData(X=X, obs=obs, var=var, uns={UNS: provenance})
    # The same stored, stratified split as every other dataset (seeded like the subsample).
    add_split(adata, seed=seed)
    return adata


# ---------------------------------------------------------------------------------------
# A synthetic file with the atlas's schema (tests, smoke runs of the paper profile)
# ---------------------------------------------------------------------------------------


def synthetic_hbca(
    class_sizes: dict[str, int],
    n_genes: int = HBCA_GENES,
    *,
    rate: float = 1.0,
    counts_in_raw: bool = True,
    integer: bool = True,
    seed: int = 0,
) -> anndata.AnnData:
    """Random counts in the CELLxGENE schema of the HBCA files, for :func:`load_hbca`.

    Poisson(``rate``) counts (gene 0 at least 1: no empty cell) of cells labelled in
    ``obs["supercluster_term"]`` (``class_sizes`` cells each, shuffled), a ``donor_id``
    column, Ensembl-like gene ids in unsorted order with ``var["feature_name"]`` symbols
    ``SYM`` + the id's last four digits, and, with ``counts_in_raw``, the counts in
    ``raw.X`` beside a log1p-normalised ``X`` as CELLxGENE stores them. ``integer=False``
    adds 0.5 to gene 1 (not counts).
    """
    rng = np.random.default_rng(seed)
    labels = np.repeat(list(class_sizes), list(class_sizes.values()))
    rng.shuffle(labels)
    n_cells = len(labels)
    counts = rng.poisson(rate, size=(n_cells, n_genes)).astype(np.float32)
    counts[:, 0] += 1  # no empty cells
    if not integer:
        counts[:, 1] += 0.5
    # distinct ids, deliberately not in sorted order (load_hbca sorts them)
    numbers = rng.choice(10**10, size=n_genes, replace=False)
    gene_ids = np.array([f"ENSG{k:011d}" for k in numbers])
    var = pd.DataFrame({"feature_name": [f"SYM{g[-4:]}" for g in gene_ids]}, index=gene_ids)
    obs = pd.DataFrame(
        {"supercluster_term": pd.Categorical(labels), "donor_id": ["H18.30.001"] * n_cells},
        index=[f"cell{i:04d}" for i in range(n_cells)],
    )
    adata = anndata.AnnData(X=sp.csr_matrix(counts), obs=obs, var=var)
    if counts_in_raw:
        adata.raw = adata.copy()
        norm = counts / counts.sum(1, keepdims=True) * 1e4
        adata.X = sp.csr_matrix(np.log1p(norm))
    return adata
