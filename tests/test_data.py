"""Data layer: loading, the bad-input cases of DESIGN.md section 8, alignment, splits, batches."""

from __future__ import annotations

import hashlib
import socket

import anndata as ad
import numpy as np
import pytest
import scipy.sparse as sp

import scvit_core
from scvit_core import CountDataError, align_genes, load_dataset, standard_gene_order
from scvit_core.data import count_dataloader, stratified_split, validate_counts


def _write(adata: ad.AnnData, tmp_path, name="data.h5ad"):
    path = tmp_path / name
    adata.write_h5ad(path)
    return path


def _sha(path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


# --- the embedded default -------------------------------------------------------------


def test_zeisel2015_offline_without_shared(monkeypatch):
    monkeypatch.delenv("SCVIT_DATA_DIR", raising=False)

    def no_network(*args, **kwargs):
        raise AssertionError("load_dataset('zeisel2015') tried to use the network")

    monkeypatch.setattr(socket, "create_connection", no_network)
    monkeypatch.setattr(socket.socket, "connect", no_network)
    adata = load_dataset("zeisel2015")
    assert adata.shape == (3005, 4000)
    assert sp.isspmatrix_csr(adata.X) and adata.X.dtype == np.int32
    assert adata.obs["cell_type"].nunique() == 7
    assert adata.obs["cell_type_fine"].nunique() == 48
    assert adata.X.sum() > 0 and adata.X.min() >= 0
    counts = adata.obs["cell_type"].value_counts()
    assert counts["oligodendrocytes"] == 820  # the published class sizes
    assert adata.obs["split"].value_counts().to_dict() == {
        "train": 2403,
        "validation": 301,
        "test": 301,
    }


def test_pbmc68k_counts_are_recovered():
    adata = load_dataset("pbmc68k")
    assert adata.shape == (700, 765)
    assert adata.obs["cell_type"].nunique() == 10
    assert adata.X.dtype == np.int32
    assert adata.uns["scvit"]["fraction_within_0.05_of_integer"] > 0.9999
    # library sizes match the stored totals of the 765 genes' share of counts
    assert "CD3D" in adata.var_names


# --- section 8: each bad input gets an error that names the problem and the fix ---------


@pytest.mark.parametrize(
    ("mutate", "message"),
    [
        (lambda X: X * -1, "negative values"),
        (lambda X: X + 0.5, "non-integer values"),
        (lambda X: np.where(X == X.max(), np.nan, X), "NaN or infinite"),
        (lambda X: np.where(X == X.max(), np.inf, X), "NaN or infinite"),
        (lambda X: np.vstack([X, np.zeros(X.shape[1])]), "counts are all zero"),
        (lambda X: X[:0], "is empty"),
    ],
    ids=["negative", "non-integer", "nan", "inf", "empty-cell", "no-cells"],
)
def test_bad_counts_are_rejected(tiny_counts, mutate, message):
    X = mutate(tiny_counts.X.toarray().astype(float))
    with pytest.raises(CountDataError, match=message):
        validate_counts(X)
    with pytest.raises(CountDataError, match=message):
        validate_counts(sp.csr_matrix(X))


def test_bad_file_is_rejected_and_left_untouched(tiny_counts, tmp_path):
    tiny_counts.X = tiny_counts.X.astype(np.float32) / 3.0  # normalised-looking data
    path = _write(tiny_counts, tmp_path)
    before = _sha(path)
    with pytest.raises(CountDataError, match="Pass layer= with the raw counts"):
        load_dataset(path)
    assert _sha(path) == before


def test_layer_and_raw_are_read(tiny_counts, tmp_path):
    tiny_counts.layers["counts"] = tiny_counts.X.copy()
    tiny_counts.raw = tiny_counts.copy()
    tiny_counts.X = tiny_counts.X.astype(np.float32) / 3.0
    path = _write(tiny_counts, tmp_path)
    for layer in ("counts", "raw.X"):
        adata = load_dataset(path, layer=layer, labels_key="celltype")
        assert adata.X.dtype == np.int32 and adata.X.sum() > 0
    with pytest.raises(CountDataError, match="no layer 'spliced'"):
        load_dataset(path, layer="spliced")


def test_duplicated_genes_are_rejected(tiny_counts, tmp_path):
    tiny_counts.var_names = ["G00"] * 2 + list(tiny_counts.var_names[2:])
    with pytest.raises(CountDataError, match="duplicated gene names .*var_names_make_unique"):
        load_dataset(_write(tiny_counts, tmp_path))


def test_missing_label_column_lists_the_columns(tiny_counts, tmp_path):
    with pytest.raises(
        CountDataError, match=r"no column 'celltypes'; available columns: \['celltype'\]"
    ):
        load_dataset(_write(tiny_counts, tmp_path), labels_key="celltypes")


def test_missing_labels_are_rejected(tiny_counts, tmp_path):
    tiny_counts.obs["celltype"] = tiny_counts.obs["celltype"].astype(object)
    tiny_counts.obs.iloc[3, 0] = None
    with pytest.raises(CountDataError, match="1 missing labels"):
        load_dataset(_write(tiny_counts, tmp_path), labels_key="celltype")


def test_empty_cells_error_or_drop(tiny_counts, tmp_path):
    X = tiny_counts.X.toarray()
    X[[5, 7]] = 0
    tiny_counts.X = sp.csr_matrix(X)
    path = _write(tiny_counts, tmp_path)
    with pytest.raises(
        CountDataError, match="2 cells whose counts are all zero.*empty_cells='drop'"
    ):
        load_dataset(path)
    with pytest.warns(UserWarning, match="dropped 2 cells"):
        adata = load_dataset(path, empty_cells="drop")
    assert adata.n_obs == 58 and adata.uns["scvit"]["dropped_empty_cells"] == 2


def test_unknown_name_and_missing_data_dir(monkeypatch, tmp_path):
    monkeypatch.delenv("SCVIT_DATA_DIR", raising=False)
    with pytest.raises(FileNotFoundError, match="unknown dataset 'nope'. Known names: zeisel2015"):
        load_dataset("nope")
    with pytest.raises(FileNotFoundError, match="set \\$SCVIT_DATA_DIR"):
        load_dataset("pbmc14k")
    with pytest.raises(FileNotFoundError, match="jyyulab/scMINER"):
        load_dataset("pbmc14k", data_dir=tmp_path)


def test_checksum_mismatch_is_reported(tiny_counts, tmp_path):
    _write(tiny_counts, tmp_path, name="zheng2017_pbmc14k_scminer_3500.h5ad")
    with pytest.raises(CountDataError, match="not the recorded version"):
        load_dataset("pbmc14k", data_dir=tmp_path)


# --- gene alignment ----------------------------------------------------------------------


def test_alignment_reorders_fills_drops_and_reports(tiny_counts):
    original = tiny_counts.copy()
    reference = ["G05", "G01", "NEW1", "G03", "NEW2"]
    aligned, report = align_genes(tiny_counts, reference)
    assert list(aligned.var_names) == reference
    assert (report.n_matched, report.n_missing, report.n_extra) == (3, 2, 27)
    assert report.reordered
    dense, src = aligned.X.toarray(), tiny_counts.X.toarray()
    np.testing.assert_array_equal(dense[:, 0], src[:, 5])
    np.testing.assert_array_equal(dense[:, 3], src[:, 3])
    assert dense[:, [2, 4]].sum() == 0
    assert list(aligned.var["present"]) == [True, True, False, True, False]
    assert aligned.X.dtype == tiny_counts.X.dtype
    assert "3 matched (reordered), 2 missing (zero-filled), 27 extra (dropped)" in str(report)
    assert aligned.uns["scvit"]["gene_alignment"]["n_missing"] == 2
    # the input is untouched
    assert (tiny_counts.X != original.X).nnz == 0
    assert list(tiny_counts.var_names) == list(original.var_names)


def test_alignment_rejects_duplicates_and_disjoint_genes(tiny_counts):
    with pytest.raises(CountDataError, match="reference gene list has 1 duplicated"):
        align_genes(tiny_counts, ["G01", "G01"])
    with pytest.raises(CountDataError, match="only 0 of 2 reference genes.*same species"):
        align_genes(tiny_counts, ["X1", "X2"])


def test_alignment_flags_case_only_matches(tiny_counts):
    _, report = align_genes(tiny_counts, ["G01", "g02"])
    assert report.n_case_only == 1 and "letter case" in str(report)


def test_standard_gene_order_sorts():
    assert list(standard_gene_order(["ENSG3", "ENSG1", "ENSG2"])) == ["ENSG1", "ENSG2", "ENSG3"]


# --- splits -----------------------------------------------------------------------------


def test_split_is_seeded_and_stratified():
    labels = np.repeat(["a", "b", "c"], [500, 300, 7])
    first = stratified_split(labels, len(labels), seed=3)
    assert np.array_equal(first, stratified_split(labels, len(labels), seed=3))
    assert not np.array_equal(first, stratified_split(labels, len(labels), seed=4))
    for label, n in (("a", 500), ("b", 300)):
        in_label = first[labels == label]
        assert (in_label == "test").sum() == round(0.1 * n)
    rare = first[labels == "c"]
    assert {"train", "validation", "test"} <= set(rare)


def test_stored_split_is_kept(tiny_counts, tmp_path):
    adata = load_dataset(_write(tiny_counts, tmp_path), labels_key="celltype", split_seed=1)
    again = load_dataset(_write(adata, tmp_path, "with_split.h5ad"), split_seed=2)
    assert np.array_equal(adata.obs["split"].to_numpy(), again.obs["split"].to_numpy())


# --- minibatches -------------------------------------------------------------------------


def test_batches_match_rows_and_cover_the_split(tiny_counts, tmp_path):
    adata = load_dataset(_write(tiny_counts, tmp_path), labels_key="celltype")
    loader = count_dataloader(adata, split="train", batch_size=16, shuffle=True, seed=0)
    seen = []
    for batch in loader:
        rows = batch["index"].numpy()
        assert np.all(np.diff(rows) > 0)
        np.testing.assert_array_equal(batch["counts"].numpy(), adata.X[rows].toarray())
        assert batch["counts"].dtype.is_floating_point
        seen.extend(rows)
    assert sorted(seen) == list(np.flatnonzero(adata.obs["split"] == "train"))
    order = [
        b["index"][0].item()
        for b in count_dataloader(adata, split="train", batch_size=16, shuffle=True, seed=0)
    ]
    assert order == [
        b["index"][0].item()
        for b in count_dataloader(adata, split="train", batch_size=16, shuffle=True, seed=0)
    ]


def test_backed_reading_serves_the_same_batches(tiny_counts, tmp_path):
    path = _write(tiny_counts, tmp_path)
    before = _sha(path)
    memory = load_dataset(path, labels_key="celltype")
    backed = load_dataset(path, labels_key="celltype", backed=True)
    assert backed.isbacked
    for a, b in zip(
        count_dataloader(memory, batch_size=7), count_dataloader(backed, batch_size=7), strict=True
    ):
        np.testing.assert_array_equal(a["counts"].numpy(), b["counts"].numpy())
        np.testing.assert_array_equal(a["label"].numpy(), b["label"].numpy())
    backed.file.close()
    assert _sha(path) == before


# --- the real data directory --------------------------------------------------------------


@pytest.mark.parametrize("name", sorted(scvit_core.data.DATA_DIR_DATASETS))
def test_data_dir_datasets_load(data_dir, name):
    entry = scvit_core.data.DATA_DIR_DATASETS[name]
    adata = load_dataset(
        name, data_dir=data_dir, empty_cells="drop" if name == "allen_m1" else "error"
    )
    assert adata.n_obs > 100 and adata.X.dtype == np.int32
    assert adata.obs["cell_type"].nunique() >= 3
    assert adata.uns["scvit"]["sha256"] == entry.sha256


def test_cross_dataset_alignment_on_real_genes(data_dir):
    pbmc14k = load_dataset("pbmc14k", data_dir=data_dir)
    pbmc68k = load_dataset("pbmc68k")
    aligned, report = align_genes(pbmc68k, pbmc14k.var_names)
    assert report.n_matched > 500 and aligned.n_vars == pbmc14k.n_vars
    assert aligned.X.sum() <= pbmc68k.X.sum()
