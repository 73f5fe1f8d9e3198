"""Offline tests of the HBCA loader: a small file with the atlas's schema and a local server."""

from __future__ import annotations

import hashlib
import http.server
import re
import socket
import threading

import anndata
import numpy as np
import pandas as pd
import pytest
import scipy.sparse as sp

from scvit_core._constants import CELL_TYPE, UNS
from scvit_core.data._validate import CountDataError
from scvit_core.data.hbca import (
    REPORT_SIZES,
    DownloadError,
    download,
    load_hbca,
    stratified_subsample,
    synthetic_hbca,
)

# Unbalanced classes whose proportional shares of 100 cells are whole numbers.
CLASS_SIZES = {
    "Astrocyte": 150,
    "Oligodendrocyte": 90,
    "Microglia": 45,
    "Fibroblast": 12,
    "Ependymal": 3,
}
N_CELLS, N_GENES = sum(CLASS_SIZES.values()), 50


# ---------------------------------------------------------------------------------------
# A small file with the HBCA / CELLxGENE schema
# ---------------------------------------------------------------------------------------


def _atlas(*, counts_in_raw: bool = True, integer: bool = True) -> anndata.AnnData:
    return synthetic_hbca(CLASS_SIZES, N_GENES, counts_in_raw=counts_in_raw, integer=integer)


@pytest.fixture(scope="module")
def atlas_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("hbca") / "hbca_small.h5ad"
    _atlas().write_h5ad(path)
    return path


def _expected_counts(adata: anndata.AnnData, cells, genes) -> np.ndarray:
    src = adata.raw.to_adata() if adata.raw is not None else adata
    return src[list(cells), list(genes)].X.toarray()


# ---------------------------------------------------------------------------------------
# load_hbca
# ---------------------------------------------------------------------------------------


def test_subsample_size_proportions_and_counts(atlas_file):
    adata = load_hbca(100, path=atlas_file, progress=False)
    assert adata.shape == (100, N_GENES)
    # Proportional allocation of 100 out of 300 cells: exactly a third of each class.
    shares = adata.obs[CELL_TYPE].value_counts().to_dict()
    assert shares == {k: v // 3 for k, v in CLASS_SIZES.items()}
    assert isinstance(adata.obs[CELL_TYPE].dtype, pd.CategoricalDtype)
    # The stored split every model trains on: 10% of each class of 50, 30, 15, 4 and 1
    # cells in test (5 + 3 + 2), plus one for the class of 4, none for the singleton.
    assert set(adata.obs["split"]) == {"train", "validation", "test"}
    assert (adata.obs["split"] == "test").sum() == 11
    # Integer CSR counts, genes in standardized (sorted) order, symbols carried along.
    assert sp.issparse(adata.X) and adata.X.format == "csr" and adata.X.dtype == np.int32
    assert list(adata.var_names) == sorted(adata.var_names)
    symbols = adata.var["feature_name"]
    assert all(s == f"SYM{g[-4:]}" for g, s in zip(adata.var_names, symbols, strict=True))
    # The values are the raw counts of exactly those cells, not the normalised X.
    source = anndata.read_h5ad(atlas_file)
    expected = _expected_counts(source, adata.obs_names, adata.var_names)
    np.testing.assert_array_equal(adata.X.toarray(), expected)
    assert (
        adata.obs[CELL_TYPE].astype(str).to_numpy()
        == source.obs.loc[adata.obs_names, "supercluster_term"].astype(str).to_numpy()
    ).all()


def test_provenance_is_recorded_and_writable(atlas_file, tmp_path):
    adata = load_hbca(60, path=atlas_file, seed=3, progress=False, obs_keys=["donor_id"])
    prov = adata.uns[UNS]
    assert prov["n_cells_requested"] == 60 and prov["seed"] == 3
    assert prov["labels_key"] == "supercluster_term" and prov["counts_from"] == "raw.X"
    assert prov["source"] == str(atlas_file) and prov["sha256_verified"] is False
    assert (adata.obs["donor_id"] == "H18.30.001").all()
    adata.write_h5ad(tmp_path / "out.h5ad")  # provenance must survive h5ad


def test_subsample_is_deterministic(atlas_file):
    a = load_hbca(50, path=atlas_file, seed=1, progress=False)
    b = load_hbca(50, path=atlas_file, seed=1, progress=False)
    c = load_hbca(50, path=atlas_file, seed=2, progress=False)
    assert list(a.obs_names) == list(b.obs_names)
    assert list(a.obs_names) != list(c.obs_names)


def test_counts_in_x_without_raw(tmp_path):
    path = tmp_path / "x_counts.h5ad"
    source = _atlas(counts_in_raw=False)
    source.write_h5ad(path)
    adata = load_hbca(30, path=path, progress=False)
    assert adata.uns[UNS]["counts_from"] == "X"
    np.testing.assert_array_equal(
        adata.X.toarray(), _expected_counts(source, adata.obs_names, adata.var_names)
    )


def test_sha256_pinned_local_file(atlas_file):
    digest = hashlib.sha256(atlas_file.read_bytes()).hexdigest()
    adata = load_hbca(20, path=atlas_file, sha256=digest, progress=False)
    assert adata.uns[UNS]["sha256"] == digest and adata.uns[UNS]["sha256_verified"]
    with pytest.raises(DownloadError, match=f"has sha256 {digest}, expected 0+"):
        load_hbca(20, path=atlas_file, sha256="0" * 64, progress=False)


def test_missing_labels_key(atlas_file):
    with pytest.raises(CountDataError, match=r"no column 'cell_class'.*labels_key="):
        load_hbca(20, path=atlas_file, labels_key="cell_class", progress=False)


def test_too_many_cells(atlas_file):
    with pytest.raises(ValueError, match=f"Asked for {REPORT_SIZES[0]:,} cells but only 300"):
        load_hbca(path=atlas_file, progress=False)


def test_non_integer_counts(tmp_path):
    path = tmp_path / "normalised.h5ad"
    _atlas(counts_in_raw=False, integer=False).write_h5ad(path)
    with pytest.raises(CountDataError, match=r"non-integer values.*raw counts"):
        load_hbca(30, path=path, progress=False)


def test_no_file_says_how_to_supply_one(tmp_path, monkeypatch):
    monkeypatch.delenv("SCVIT_DATA_DIR", raising=False)
    with pytest.raises(FileNotFoundError, match=r"load_hbca\(path="):
        load_hbca(10, progress=False)
    with pytest.raises(FileNotFoundError, match="No known HBCA file in "):
        load_hbca(10, data_dir=tmp_path, progress=False)
    with pytest.raises(FileNotFoundError, match=r"datasets\.cellxgene\.cziscience\.com"):
        load_hbca(10, path=tmp_path / "absent.h5ad", progress=False)


# ---------------------------------------------------------------------------------------
# stratified_subsample
# ---------------------------------------------------------------------------------------


def test_every_label_keeps_a_cell():
    labels = np.array(["big"] * 1000 + ["rare1", "rare2"])
    rows = stratified_subsample(labels, 3, seed=0)
    assert sorted(labels[rows]) == ["big", "rare1", "rare2"]
    rows = stratified_subsample(labels, 10, seed=0)
    assert pd.Series(labels[rows]).value_counts().to_dict() == {"big": 8, "rare1": 1, "rare2": 1}


@pytest.mark.parametrize("n", [1, 2, 7, 61, 299, 300])
def test_total_is_exact_and_rows_sorted_unique(n):
    labels = np.repeat(list(CLASS_SIZES), list(CLASS_SIZES.values()))
    rows = stratified_subsample(labels, n, seed=5)
    assert len(rows) == n and len(np.unique(rows)) == n
    assert np.all(np.diff(rows) > 0) and rows.dtype.kind == "i"
    if n >= len(CLASS_SIZES):
        assert set(labels[rows]) == set(CLASS_SIZES)
    # Largest remainder: each share within one cell of its quota (before the floor of one).
    got = pd.Series(labels[rows]).value_counts()
    for k, size in CLASS_SIZES.items():
        assert abs(got.get(k, 0) - n * size / N_CELLS) < 1 or got.get(k, 0) == 1


def test_subsample_errors():
    with pytest.raises(ValueError, match="only 3 are available"):
        stratified_subsample(["a", "b", "a"], 4)
    with pytest.raises(ValueError, match="at least 1"):
        stratified_subsample(["a", "b"], 0)
    with pytest.raises(ValueError, match="1 cells have no label"):
        stratified_subsample(pd.Series(["a", None, "b"]), 2)


# ---------------------------------------------------------------------------------------
# download, against a server on 127.0.0.1
# ---------------------------------------------------------------------------------------

PAYLOAD = np.random.default_rng(1).bytes(50_000)
DIGEST = hashlib.sha256(PAYLOAD).hexdigest()


class _Handler(http.server.BaseHTTPRequestHandler):
    payload = PAYLOAD
    support_range = True
    requests: list  # (Range header, bytes sent); set per server

    def do_GET(self):  # http.server's naming
        size, start = len(self.payload), 0
        wanted = self.headers.get("Range")
        match = re.fullmatch(r"bytes=(\d+)-", wanted or "")
        if self.support_range and match:
            start = int(match.group(1))
            if start >= size:
                self.requests.append((wanted, 0))
                self.send_response(416)
                self.send_header("Content-Range", f"bytes */{size}")
                self.send_header("Content-Length", "0")
                self.end_headers()
                return
            self.send_response(206)
            self.send_header("Content-Range", f"bytes {start}-{size - 1}/{size}")
        else:
            self.send_response(200)
        body = self.payload[start:]
        # Logged before answering: the client may finish before this thread resumes.
        self.requests.append((wanted, len(body)))
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args):  # keep test output quiet
        pass


@pytest.fixture
def server(request):
    params = getattr(request, "param", {})
    handler = type("Handler", (_Handler,), {"requests": [], **params})
    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    httpd.url = f"http://127.0.0.1:{httpd.server_address[1]}/data.bin"
    httpd.requests = handler.requests
    yield httpd
    httpd.shutdown()
    httpd.server_close()


def test_fresh_download(server, tmp_path):
    dest = download(server.url, tmp_path / "data.bin", progress=False, chunk_size=4096)
    assert dest.read_bytes() == PAYLOAD
    assert not (tmp_path / "data.bin.part").exists()
    assert (tmp_path / "data.bin.sha256").read_text().split()[0] == DIGEST
    assert server.requests == [(None, len(PAYLOAD))]


def test_resume_requests_only_the_rest(server, tmp_path):
    (tmp_path / "data.bin.part").write_bytes(PAYLOAD[:12_345])
    dest = download(server.url, tmp_path / "data.bin", sha256=DIGEST, progress=False)
    assert dest.read_bytes() == PAYLOAD
    assert server.requests == [("bytes=12345-", len(PAYLOAD) - 12_345)]


def test_complete_part_is_finished_without_a_body(server, tmp_path):
    (tmp_path / "data.bin.part").write_bytes(PAYLOAD)
    dest = download(server.url, tmp_path / "data.bin", sha256=DIGEST, progress=False)
    assert dest.read_bytes() == PAYLOAD
    assert server.requests == [(f"bytes={len(PAYLOAD)}-", 0)]


@pytest.mark.parametrize("server", [{"support_range": False}], indirect=True)
def test_server_without_range_restarts_cleanly(server, tmp_path):
    (tmp_path / "data.bin.part").write_bytes(b"stale bytes from elsewhere")
    dest = download(server.url, tmp_path / "data.bin", sha256=DIGEST, progress=False)
    assert dest.read_bytes() == PAYLOAD  # not the stale prefix plus the file
    assert server.requests == [("bytes=26-", len(PAYLOAD))]


def test_checksum_mismatch(server, tmp_path):
    with pytest.raises(DownloadError, match=f"expected sha256 {'0' * 64}, got {DIGEST}"):
        download(server.url, tmp_path / "data.bin", sha256="0" * 64, progress=False)
    assert not (tmp_path / "data.bin").exists()
    assert not (tmp_path / "data.bin.part").exists()  # our own partial file only


def test_present_file_is_not_downloaded_again(server, tmp_path):
    dest = tmp_path / "data.bin"
    dest.write_bytes(PAYLOAD)
    assert download(server.url, dest, sha256=DIGEST, progress=False) == dest
    assert download(server.url, dest, progress=False) == dest
    assert server.requests == []
    # A present file with another digest is the user's: reported, never overwritten.
    with pytest.raises(DownloadError, match="exists but its sha256 is"):
        download(server.url, dest, sha256="f" * 64, progress=False)
    assert dest.read_bytes() == PAYLOAD


def test_network_failure_says_what_to_do(tmp_path):
    with socket.socket() as sock:  # a port with nobody listening
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    dest = tmp_path / "data.bin"
    with pytest.raises(DownloadError, match=rf"No network\? .*place it at {re.escape(str(dest))}"):
        download(f"http://127.0.0.1:{port}/x", dest, progress=False, timeout=5)


def test_load_hbca_downloads_into_data_dir(server, tmp_path, atlas_file):
    server.RequestHandlerClass.payload = atlas_file.read_bytes()
    digest = hashlib.sha256(atlas_file.read_bytes()).hexdigest()
    with pytest.warns(UserWarning, match=f"sha256={digest!r}"):
        adata = load_hbca(40, url=server.url, data_dir=tmp_path, progress=False)
    assert adata.n_obs == 40 and adata.uns[UNS]["url"] == server.url
    assert adata.uns[UNS]["sha256"] == digest and not adata.uns[UNS]["sha256_verified"]
    # Pinned and present: verified, and no second request.
    adata = load_hbca(40, url=server.url, data_dir=tmp_path, sha256=digest, progress=False)
    assert adata.uns[UNS]["sha256_verified"] and len(server.requests) == 1
