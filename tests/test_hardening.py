"""Every public entry point against bad input, faults and tampered files (issue 14).

Each case asserts its outcome: the error type and a key phrase of its message, or the correct
result. The user's AnnData and files are hashed before and after every call that reads them.
"""

from __future__ import annotations

import hashlib
import logging
import warnings
from pathlib import Path

import anndata as ad
import numpy as np
import pandas as pd
import pytest
import scipy.sparse as sp
import torch

from scvit_core import _constants as K
from scvit_core.api import ScPerceiverModel, ScViTModel
from scvit_core.config import ScViTConfig
from scvit_core.data import CountDataError
from scvit_core.perceiver import PerceiverConfig

logging.getLogger("lightning.pytorch").setLevel(logging.ERROR)
logging.getLogger("lightning.fabric").setLevel(logging.ERROR)

N_CELLS, N_GENES = 60, 30
ROOT = Path(__file__).resolve().parents[1]
QUIET = dict(enable_progress_bar=False)


def counts_adata(*, seed: int = 0, labels: str | None = "str") -> ad.AnnData:
    """60 cells x 30 genes of NB counts (no empty cell), labels as plain strings by default."""
    rng = np.random.default_rng(seed)
    counts = rng.negative_binomial(2, 0.3, size=(N_CELLS, N_GENES)).astype(np.int32)
    counts[:, 0] += 1
    obs = pd.DataFrame(index=[f"c{i}" for i in range(N_CELLS)])
    values = np.repeat(["a", "b", "c"], [30, 20, 10])
    if labels == "str":
        obs[K.CELL_TYPE] = values  # object dtype: the usual case for an AnnData built in memory
    elif labels == "category":
        obs[K.CELL_TYPE] = pd.Categorical(values)
    elif labels == "int":
        obs[K.CELL_TYPE] = np.repeat([3, 1, 2], [30, 20, 10])
    var = pd.DataFrame(index=[f"G{j:02d}" for j in range(N_GENES)])
    return ad.AnnData(X=sp.csr_matrix(counts), obs=obs, var=var)


def scvit_config(n_genes: int = N_GENES) -> ScViTConfig:
    return ScViTConfig.small(n_genes, likelihood="nb", stages=((8, 8, 4, 4), (8, 4, 8, 2)))


def perceiver_config(n_genes: int = N_GENES) -> PerceiverConfig:
    return PerceiverConfig.for_genes(
        n_genes, dim=16, n_tokens=4, heads=2, encoder_blocks=1, decoder_blocks=1
    )


def fingerprint(adata: ad.AnnData) -> str:
    """A hash of everything a user could see change in an AnnData."""
    digest = hashlib.sha256()

    def add(value) -> None:
        if value is None:
            digest.update(b"None")
        elif sp.issparse(value):
            value = sp.csr_matrix(value)
            for part in (value.data, value.indices, value.indptr):
                digest.update(np.ascontiguousarray(part).tobytes())
            digest.update(str((value.shape, value.dtype)).encode())
        elif isinstance(value, np.ndarray):
            digest.update(np.ascontiguousarray(value).tobytes() + str(value.dtype).encode())
        elif isinstance(value, pd.DataFrame):
            digest.update(pd.util.hash_pandas_object(value, index=True).to_numpy().tobytes())
            digest.update(str(list(value.columns) + list(map(str, value.dtypes))).encode())
        else:
            digest.update(repr(value).encode())

    X = adata.X[:] if adata.isbacked else adata.X
    add(X)
    add(adata.obs)
    add(adata.var)
    for name in sorted(adata.layers):
        add(name)
        add(adata.layers[name])
    for name in sorted(adata.obsm):
        add(name)
        add(np.asarray(adata.obsm[name]))
    add(sorted(adata.uns))
    add(adata.is_view)
    return digest.hexdigest()


@pytest.fixture(scope="module")
def trained():
    """A tiny scViT trained one epoch on :func:`counts_adata` (categorical labels)."""
    model = ScViTModel(counts_adata(labels="category"), scvit_config())
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model.train(epochs=1, batch_size=16, **QUIET)
    return model


# --- the four failures of the "Why" ------------------------------------------------


@pytest.mark.parametrize("labels", ["str", "int", "category", None])
def test_predict_with_labels_of_any_dtype_or_none(trained, labels):
    """Why 1: plain-string labels crashed the batch loader (``.cat`` accessor)."""
    adata = counts_adata(labels=labels)
    before = fingerprint(adata)
    z = trained.get_latent_representation(adata)
    assert z.shape == (N_CELLS, trained.config.n_latent) and np.isfinite(z).all()
    error = trained.get_reconstruction_error(adata)["reconstruction_loss"]
    assert np.isfinite(error)
    assert fingerprint(adata) == before


@pytest.mark.parametrize("query", ["get_latent_representation", "get_reconstruction_error"])
def test_queries_reject_normalised_data(trained, query):
    """Why 2: the latent of log1p-normalised data came back silently."""
    adata = counts_adata(labels="category")
    adata.X = sp.csr_matrix(np.log1p(adata.X.toarray()).astype(np.float32))
    before = fingerprint(adata)
    with pytest.raises(CountDataError, match="non-integer values.*layer="):
        getattr(trained, query)(adata)
    assert fingerprint(adata) == before


@pytest.mark.parametrize("cls", [ScViTModel, ScPerceiverModel])
def test_construction_rejects_empty_data(cls):
    """Why 3: a model accepted 0 cells and failed only at ``train``."""
    config = scvit_config() if cls is ScViTModel else perceiver_config()
    with pytest.raises(CountDataError, match="0 cells"):
        cls(counts_adata()[:0].copy(), config)
    with pytest.raises(CountDataError, match="0 genes"):
        cls(counts_adata()[:, :0].copy())


def test_load_refuses_a_pickled_payload_with_its_own_message(trained, tmp_path):
    """Why 4: a pickled ``model.pt`` surfaced PyTorch's text suggesting ``weights_only=False``."""
    path = trained.save(tmp_path / "model")
    torch.save({"weights": pd.Series([1.0])}, path / "model.pt")  # any pickled Python object
    with pytest.raises(ValueError, match="pickled Python objects") as info:
        ScViTModel.load(path, counts_adata())
    assert "weights_only" not in str(info.value)


# --- one validation path: every form of data works or fails clearly ------------------------


def _backed(adata: ad.AnnData, tmp_path) -> ad.AnnData:
    path = tmp_path / "backed.h5ad"
    adata.write_h5ad(path)
    return ad.read_h5ad(path, backed="r")


def _form(name: str, tmp_path) -> ad.AnnData:
    """:func:`counts_adata` in one of the forms a user may hold it."""
    adata = counts_adata()
    dense = adata.X.toarray()
    if name == "dense int64":
        adata.X = dense.astype(np.int64)
    elif name == "sparse int64":
        adata.X = sp.csr_matrix(dense.astype(np.int64))
    elif name == "dense float16":
        adata.X = dense.astype(np.float16)
    elif name == "sparse float32 csc":
        adata.X = sp.csc_matrix(dense.astype(np.float32))
    elif name == "view":
        return adata[adata.obs[K.CELL_TYPE] != "c"]
    elif name == "backed":
        return _backed(adata, tmp_path)
    elif name == "duplicated cell names":
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # anndata's "obs_names not unique"
            adata.obs_names = ["same"] * N_CELLS
    elif name == "all-zero genes":
        dense[:, 5:10] = 0
        adata.X = sp.csr_matrix(dense)
    elif name == "single cell":
        return adata[:1].copy()
    elif name == "missing labels":
        adata.obs[K.CELL_TYPE] = adata.obs[K.CELL_TYPE].where(np.arange(N_CELLS) % 7 > 0)
    return adata


FORMS = [
    "dense int64",
    "sparse int64",
    "dense float16",
    "sparse float32 csc",
    "view",
    "backed",
    "duplicated cell names",
    "all-zero genes",
    "single cell",
    "missing labels",
]


@pytest.mark.parametrize("form", FORMS)
def test_queries_work_on_every_form_and_leave_it_untouched(trained, form, tmp_path):
    adata = _form(form, tmp_path)
    before = fingerprint(adata)
    reference = trained.get_latent_representation(_form("dense int64", tmp_path))
    z = trained.get_latent_representation(adata)
    nll = trained.get_reconstruction_error(adata, return_mean=False)["reconstruction_loss"]
    assert z.shape == (adata.n_obs, trained.config.n_latent) and np.isfinite(z).all()
    assert nll.shape == (adata.n_obs,) and np.isfinite(nll).all()
    if form in ("dense int64", "sparse int64", "dense float16", "sparse float32 csc", "backed"):
        np.testing.assert_allclose(z, reference, rtol=1e-5, atol=1e-6)  # the same counts
    assert fingerprint(adata) == before


@pytest.mark.parametrize("form", [f for f in FORMS if f != "single cell"])
@pytest.mark.parametrize("cls", [ScViTModel, ScPerceiverModel])
def test_training_works_on_every_form_and_leaves_it_untouched(cls, form, tmp_path):
    adata = _form(form, tmp_path)
    before = fingerprint(adata)
    config = scvit_config() if cls is ScViTModel else perceiver_config()
    model = cls(adata, config)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        model.train(epochs=1, batch_size=16, output_dir=tmp_path / "run", **QUIET)
    assert np.isfinite(model.history["train_loss"]).all()
    if form == "missing labels":
        assert any("9 missing labels" in str(w.message) for w in caught)
    assert fingerprint(adata) == before


def test_single_gene_trains_and_embeds(tmp_path):
    adata = counts_adata()[:, :1].copy()
    for cls in (ScViTModel, ScPerceiverModel):
        model = cls(adata).train(
            epochs=1, batch_size=16, output_dir=tmp_path / cls.__name__, **QUIET
        )
        assert np.isfinite(model.get_latent_representation()).all()


def _defect(name: str) -> tuple[ad.AnnData, dict]:
    """:func:`counts_adata` with one defect, and the keyword arguments that expose it."""
    adata = counts_adata()
    dense = adata.X.toarray().astype(np.float32)
    kwargs: dict = {}
    if name == "negative":
        dense[3, 4] = -1
    elif name == "non-integer":
        dense = np.log1p(dense)
    elif name == "NaN":
        dense[3, 4] = np.nan
    elif name == "infinite":
        dense[3, 4] = np.inf
    elif name == "empty cell":
        dense[3] = 0
    elif name == "duplicated genes":
        adata.var_names = ["G00", *adata.var_names[:-1]]
    elif name == "missing layer":
        kwargs["layer"] = "counts"
    adata.X = sp.csr_matrix(dense) if name != "NaN" else dense
    return adata, kwargs


DEFECTS = {
    "negative": "negative values",
    "non-integer": "non-integer values.*raw counts",
    "NaN": "NaN or infinite",
    "infinite": "NaN or infinite",
    "empty cell": "counts are all zero.*filter_cells",
    "duplicated genes": "duplicated gene names.*var_names_make_unique",
    "missing layer": "no layer 'counts'",
}


@pytest.mark.parametrize("defect", list(DEFECTS))
def test_defects_are_refused_at_every_entry_point(trained, defect, tmp_path):
    saved = trained.save(tmp_path / "model")
    entry_points = {
        "train": lambda a, kw: ScViTModel(a, scvit_config(), **kw).train(epochs=1, **QUIET),
        "latent": lambda a, kw: trained.get_latent_representation(a, **kw),
        "reconstruction": lambda a, kw: trained.get_reconstruction_error(a, **kw),
        "load": lambda a, kw: ScViTModel.load(saved, a),
    }
    for name, call in entry_points.items():
        adata, kwargs = _defect(defect)
        if defect == "missing layer" and name == "load":
            continue  # load binds the saved layer only where the data have it
        if defect == "empty cell" and name != "train":
            continue  # predicting on an empty cell is fine (tested above); training is not
        before = fingerprint(adata)
        with pytest.raises(CountDataError, match=DEFECTS[defect]):
            call(adata, kwargs)
        assert fingerprint(adata) == before, name


@pytest.mark.parametrize("cls", [ScViTModel, ScPerceiverModel])
def test_not_an_anndata_is_refused(cls):
    with pytest.raises(CountDataError, match="expected an AnnData.*anndata.AnnData"):
        cls(np.ones((5, 3)))


def test_layer_with_counts_is_read_everywhere(trained):
    adata = counts_adata(labels="category")
    adata.layers["counts"] = adata.X.copy()
    adata.X = sp.csr_matrix(np.log1p(adata.X.toarray()).astype(np.float32))
    before = fingerprint(adata)
    z = trained.get_latent_representation(adata, layer="counts")
    np.testing.assert_array_equal(z, trained.get_latent_representation(counts_adata()))
    error = trained.get_reconstruction_error(adata, layer="counts")["reconstruction_loss"]
    assert error == trained.get_reconstruction_error(counts_adata())["reconstruction_loss"]
    assert fingerprint(adata) == before


def test_gene_mismatch_is_aligned_above_a_minimum_overlap(trained):
    adata = counts_adata()
    z = trained.get_latent_representation(adata)
    permuted = adata[:, np.random.default_rng(1).permutation(N_GENES)].copy()
    with pytest.warns(UserWarning, match="30 matched \\(reordered\\)"):
        np.testing.assert_array_equal(trained.get_latent_representation(permuted), z)
    superset = ad.concat([adata, counts_adata(seed=2)], axis=1)  # 30 more genes, renamed
    superset.var_names = [*adata.var_names, *(f"X{j}" for j in range(N_GENES))]
    with pytest.warns(UserWarning, match="0 missing .* 30 extra"):
        np.testing.assert_array_equal(trained.get_latent_representation(superset), z)
    half = adata[:, :15].copy()  # exactly the minimum overlap (50% of the model's genes)
    with pytest.warns(UserWarning, match="15 missing \\(zero-filled\\)"):
        trained.get_latent_representation(half)
    assert trained.last_alignment.n_missing == 15
    with pytest.raises(CountDataError, match="only 14 of 30 reference genes .*need 15"):
        trained.get_latent_representation(adata[:, :14].copy())


def test_training_split_without_cells_is_an_error(tmp_path):
    adata = counts_adata()
    adata.obs[K.SPLIT] = "validation"
    with pytest.raises(CountDataError, match="0 'train' cells"):
        ScViTModel(adata, scvit_config()).train(epochs=1, **QUIET)
    adata.obs[K.SPLIT] = ["train", *["validation"] * (N_CELLS - 1)]
    with pytest.raises(CountDataError, match="1 'train' cells; training needs at least 2"):
        ScPerceiverModel(adata, perceiver_config()).train(epochs=1, **QUIET)
    # 17 training cells in batches of 16: the last batch of one cell is dropped, not fatal
    adata.obs[K.SPLIT] = ["train"] * 17 + ["validation"] * (N_CELLS - 17)
    model = ScViTModel(adata, scvit_config())
    model.train(epochs=1, batch_size=16, output_dir=tmp_path, **QUIET)
    assert np.isfinite(model.history["train_loss"]).all()
    with pytest.raises(ValueError, match="no 'test' cells"):
        model.get_latent_representation(split="test")
    with pytest.raises(ValueError, match="split must be one of"):
        model.get_reconstruction_error(split="testing")


def test_training_after_a_query_trains_in_training_mode(tmp_path):
    model = ScViTModel(counts_adata(), scvit_config())
    model.get_latent_representation()  # leaves the network in evaluation mode
    modes = []
    hook = model.model.register_forward_pre_hook(lambda m, _: modes.append(m.training))
    model.train(epochs=1, batch_size=16, output_dir=tmp_path, **QUIET)
    hook.remove()
    assert True in modes  # training batches ran in training mode (validation ones did not)


# --- files: atomic save, checked load --------------------------------------------------------


def _tree_hash(path) -> dict[str, str]:
    return {
        str(p.relative_to(path)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(path.rglob("*"))
        if p.is_file()
    }


def test_save_is_atomic(trained, tmp_path, monkeypatch):
    def crash(*args, **kwargs):
        raise OSError("disk full")

    target = tmp_path / "model"
    with monkeypatch.context() as patch:
        patch.setattr(torch, "save", crash)
        with pytest.raises(OSError, match="disk full"):
            trained.save(target)
    assert not target.exists() and not list(tmp_path.iterdir())  # nothing half-written
    trained.save(target)
    (target / "diagnosis").mkdir()
    (target / "diagnosis" / "report.json").write_text("{}")
    before = _tree_hash(target)
    with monkeypatch.context() as patch:
        patch.setattr(torch, "save", crash)
        with pytest.raises(OSError, match="disk full"):
            trained.save(target, overwrite=True)
    assert _tree_hash(target) == before  # the old model is intact
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model"]
    ScViTModel.load(target)
    trained.save(target, overwrite=True)  # other entries of the directory are kept
    assert (target / "diagnosis" / "report.json").read_text() == "{}"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model"]


def _corrupt(path, how: str) -> None:
    if how == "missing genes":
        (path / "genes.txt").unlink()
    elif how == "gene count":
        genes = (path / "genes.txt").read_text().splitlines()
        (path / "genes.txt").write_text("\n".join(genes[:-1]) + "\n")
    elif how == "duplicated genes":
        genes = (path / "genes.txt").read_text().splitlines()
        (path / "genes.txt").write_text("\n".join([genes[0], *genes[:-1]]) + "\n")
    elif how == "weights shape":
        state = torch.load(path / "model.pt", weights_only=True)
        name = next(k for k, v in state.items() if v.ndim == 2)
        state[name] = state[name][:, :-1]
        torch.save(state, path / "model.pt")
    elif how == "missing weight":
        state = torch.load(path / "model.pt", weights_only=True)
        state.pop(next(iter(state)))
        torch.save(state, path / "model.pt")
    elif how == "truncated weights":
        data = (path / "model.pt").read_bytes()
        (path / "model.pt").write_bytes(data[: len(data) // 2])
    elif how == "not json":
        (path / "config.json").write_text("{not json")
    elif how == "not a config":
        (path / "config.json").write_text('{"architecture": "scvit", "n_gens": 30}')
    elif how == "no training config":
        (path / "train_config.json").write_text('{"layer": null}')
    elif how == "pickled weights":
        torch.save(pd.Series([1.0]), path / "model.pt")


TAMPERED = {
    "missing genes": (FileNotFoundError, "is incomplete \\(genes.txt missing\\)"),
    "gene count": (ValueError, "lists 29 genes but config.json has n_genes=30"),
    "duplicated genes": (CountDataError, "duplicated gene names"),
    "weights shape": (ValueError, "does not fit the saved configuration.*is \\("),
    "missing weight": (ValueError, "does not fit the saved configuration: 1 missing"),
    "truncated weights": (ValueError, "truncated or corrupt"),
    "not json": (ValueError, "config.json is not valid JSON"),
    "not a config": (ValueError, "config.json is not a valid configuration"),
    "no training config": (ValueError, "train_config.json is not a valid training config"),
    "pickled weights": (ValueError, "pickled Python objects.*refused"),
}


@pytest.mark.parametrize("how", list(TAMPERED))
def test_load_refuses_tampered_files(trained, how, tmp_path):
    path = trained.save(tmp_path / "model")
    _corrupt(path, how)
    before = _tree_hash(path)
    error, message = TAMPERED[how]
    for adata in (None, counts_adata()):
        with pytest.raises(error, match=message) as info:
            ScViTModel.load(path, adata)
        assert "weights_only" not in str(info.value)
    assert _tree_hash(path) == before
    with pytest.raises(FileNotFoundError, match="holds no saved model"):
        ScViTModel.load(tmp_path / "nowhere")


def test_model_loaded_without_data_needs_adata(trained, tmp_path):
    from interpret.report import untrained_like

    model = ScViTModel.load(trained.save(tmp_path / "model"))
    for call in (model.get_latent_representation, model.get_reconstruction_error):
        with pytest.raises(ValueError, match="loaded without data; pass adata="):
            call()
    with pytest.raises(ValueError, match="loaded without data.*load\\(path, adata\\)"):
        model.train(epochs=1)
    adata = counts_adata()
    np.testing.assert_array_equal(
        model.get_latent_representation(adata), trained.get_latent_representation(adata)
    )
    # the untrained network of a diagnosis needs no data: the weights a new model starts from
    fresh = ScViTModel(adata, trained.config, seed=3).model.state_dict()
    for name, value in untrained_like(model, seed=3).model.state_dict().items():
        torch.testing.assert_close(value, fresh[name], rtol=0, atol=0)


# --- the command line: every subcommand, bad input, NaN, SIGKILL and resume -----------------


@pytest.fixture
def h5ad(tmp_path):
    """:func:`counts_adata` written to a file (labels and split stored)."""
    path = tmp_path / "tiny.h5ad"
    adata = counts_adata(labels="category")
    adata.write_h5ad(path)
    return path


def _cli(capsys, *args) -> tuple[int, str, str]:
    from scvit_core.cli import main

    status = main([str(a) for a in args])
    out, err = capsys.readouterr()
    return status, out, err


CLI_TRAIN = ("--preset", "small", "--epochs", "1", "--batch-size", "16", "--no-progress")


def test_every_subcommand_refuses_bad_input_in_one_line(h5ad, tmp_path, capsys):
    bad = tmp_path / "normalised.h5ad"
    adata = counts_adata()
    adata.X = sp.csr_matrix(np.log1p(adata.X.toarray()).astype(np.float32))
    adata.write_h5ad(bad)
    model = tmp_path / "model"
    assert _cli(capsys, "train", h5ad, "--out", model, *CLI_TRAIN)[0] == 0
    files = {path: hashlib.sha256(path.read_bytes()).hexdigest() for path in (bad, h5ad)}
    pickled = tmp_path / "pickled"
    ScViTModel.load(model).save(pickled)
    torch.save(pd.Series([1.0]), pickled / "model.pt")
    cases = [
        (("train", bad, "--out", tmp_path / "m2", *CLI_TRAIN), "non-integer values"),
        (("train", h5ad, "--out", model, *CLI_TRAIN), "already holds a model"),
        (("train", h5ad, "--out", tmp_path / "m3", "--resume", *CLI_TRAIN), "no checkpoint"),
        (("embed", model, bad, "--out", tmp_path / "z.npy"), "non-integer values"),
        (("embed", model, h5ad, "--out", h5ad, "--overwrite"), "is the input file"),
        (("evaluate", model, bad), "non-integer values"),
        (("evaluate", pickled, h5ad), "pickled Python objects"),
        (("evaluate", tmp_path / "nowhere", h5ad), "holds no saved model"),
        (("diagnose", model, bad, "--out", tmp_path / "d"), "non-integer values"),
        (("diagnose", pickled, h5ad, "--out", tmp_path / "d"), "pickled Python objects"),
    ]
    for args, phrase in cases:
        status, _, err = _cli(capsys, *args)
        last = err.strip().splitlines()[-1]
        assert status == 2 and last.startswith("error: ") and phrase in last, (args, err)
        assert "Traceback" not in err and "weights_only" not in err
    assert {p: hashlib.sha256(p.read_bytes()).hexdigest() for p in files} == files
    assert not (tmp_path / "m2").exists() and not (tmp_path / "z.npy").exists()


def test_cli_nan_loss_exits_1_and_keeps_the_last_good_checkpoint(
    h5ad, tmp_path, capsys, monkeypatch
):
    from scvit_core import train as T

    per_cell_nll, calls = T.per_cell_nll, []

    def poisoned(model, counts, **kwargs):
        loss, out = per_cell_nll(model, counts, **kwargs)
        if model.training:
            calls.append(1)
            if len(calls) > 3:  # 48 training cells in batches of 16: from epoch 1 on
                loss = loss * torch.nan
        return loss, out

    monkeypatch.setattr(T, "per_cell_nll", poisoned)
    out = tmp_path / "model"
    status, _, err = _cli(capsys, "train", h5ad, "--out", out, *CLI_TRAIN[:2], "--epochs", "3",
                          "--batch-size", "16", "--no-progress")  # fmt: skip
    assert status == 1, err
    last = err.strip().splitlines()[-1]
    assert last.startswith("error: training loss is nan at epoch 1, batch 0")
    assert "last good checkpoint" in last and "Traceback" not in err
    checkpoint = out / "training" / "checkpoints" / "last.ckpt"
    assert torch.load(checkpoint, map_location="cpu", weights_only=True)["epoch"] == 0
    assert not (out / "model.pt").exists()


PAUSING_TRAINER = """
import sys, time
from pathlib import Path
from scvit_core import train as T

marker, checkout, argv = Path(sys.argv[1]), Path(sys.argv[2]), sys.argv[3:]
training_step = T.AutoencoderLightning.training_step

def paused(self, batch, batch_idx):
    if self.current_epoch == 2 and batch_idx == 1:  # mid-epoch, after two checkpoints
        marker.write_text(str(self.current_epoch))
        time.sleep(600)  # until the test kills the process
    time.sleep(0.1)  # 3 batches an epoch: each epoch outlasts --checkpoint-every 0.25
    return training_step(self, batch, batch_idx)

T.AutoencoderLightning.training_step = paused
from scvit_core.cli import main
assert Path(T.__file__).resolve().is_relative_to(checkout), T.__file__  # the code under test
sys.exit(main(argv))
"""


def test_sigkill_mid_epoch_resumes_from_the_last_checkpoint(h5ad, tmp_path, capsys):
    import os
    import signal
    import subprocess
    import sys
    import time

    out, marker = tmp_path / "model", tmp_path / "paused"
    args = ["train", str(h5ad), "--out", str(out), *CLI_TRAIN[:2], "--epochs", "4",
            "--batch-size", "16", "--no-progress", "--checkpoint-every", "0.25"]  # fmt: skip
    script = tmp_path / "pausing.py"
    script.write_text(PAUSING_TRAINER)
    process = subprocess.Popen(
        [sys.executable, str(script), str(marker), str(ROOT), *args],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        # this checkout's package, whatever the installed one is
        env={**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)},
    )
    try:
        deadline = time.monotonic() + 300
        while not marker.exists() and process.poll() is None and time.monotonic() < deadline:
            time.sleep(0.1)
        assert marker.exists(), process.communicate(timeout=5)[1].decode()[-2000:]
        os.kill(process.pid, signal.SIGKILL)
        assert process.wait(timeout=30) == -signal.SIGKILL
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()
    checkpoint = out / "training" / "checkpoints" / "last.ckpt"
    saved = torch.load(checkpoint, map_location="cpu", weights_only=True)
    assert saved["epoch"] == 1  # killed in epoch 2: at most that epoch's work is lost
    assert not (out / "model.pt").exists()  # no model from the killed run

    status, _, err = _cli(capsys, *args, "--resume")
    assert status == 0, err
    assert "resuming from" in err
    model = ScViTModel.load(out)
    assert model.history["epoch"].tolist() == [1, 2, 3, 4]  # as many epochs as asked for
    assert np.isfinite(model.history["train_loss"]).all()


# --- the experiment runner and interpret ----------------------------------------------------


def test_experiment_runner_ignores_partial_runs(tmp_path):
    from scvit_core.experiments import ExperimentSpec, run

    spec = ExperimentSpec.make("null_nb", profile="ci")
    (tmp_path / f"{spec.key}.partial").mkdir(parents=True)  # a run killed while writing
    (tmp_path / f"{spec.key}.partial" / "metrics.csv").write_text("metric,value\nfake,0\n")
    (tmp_path / spec.key).mkdir()  # a directory without metrics: not a complete run
    (tmp_path / spec.key / "history.csv").write_text("")
    result = run(spec, directory=tmp_path)
    assert not result.cached and np.isfinite(result.value("reconstruction_loss"))
    assert not (tmp_path / f"{spec.key}.partial").exists()
    assert run(spec, directory=tmp_path).cached
    with pytest.raises(FileNotFoundError, match="dataset 'no_such_data'"):
        run(
            ExperimentSpec.make("null_nb", profile="ci", dataset="no_such_data"), directory=tmp_path
        )


def test_diagnose_checks_its_data(trained):
    from interpret import diagnose
    from interpret.diagnostics import diagnostic_inputs

    adata, _ = _defect("non-integer")
    before = fingerprint(adata)
    with pytest.raises(CountDataError, match="non-integer values"):
        diagnose(trained, adata, progress=False)
    assert fingerprint(adata) == before
    labelled = _form("missing labels", None)
    with pytest.raises(CountDataError, match="9 missing labels"):
        diagnose(trained, labelled, progress=False)
    unlabelled = counts_adata(labels=None)
    with pytest.raises(
        ValueError, match="diagnose needs obs\\['split'\\] and obs\\['cell_type'\\]"
    ):
        diagnose(trained, unlabelled, progress=False)
    # labels are optional for the inputs themselves, of any dtype
    for labels in ("str", "int", None):
        inp = diagnostic_inputs(trained, counts_adata(labels=labels))
        assert inp.inputs.shape == (N_CELLS, N_GENES) and torch.isfinite(inp.inputs).all()


def test_attribute_checks_its_inputs(trained):
    from interpret import LatentTarget, attribute

    target = LatentTarget(trained.model.eval())
    x = torch.rand(4, N_GENES) * 5
    ok = attribute(target, x, method="integrated_gradients", target=1, n_steps=4)
    assert ok.attributions.shape == (4, N_GENES)
    n_latent = trained.config.n_latent
    bad = {
        "NaN": (dict(x=torch.where(x > 4, torch.nan, x)), "x holds .* NaN or infinite"),
        "no cells": (dict(x=x[:0]), "at least one cell"),
        "not 2-d": (dict(x=x[0]), "must be \\(cells, features\\)"),
        "genes": (dict(x=x[:, :-1]), "expected input of shape \\(cells, 30\\)"),
        "target": (dict(x=x, target=n_latent), f"output index in \\[0, {n_latent}\\)"),
        "targets": (dict(x=x, target=[0, 1]), "one per cell \\(4\\)"),
        "baselines": (dict(x=x, baselines=torch.zeros(2, N_GENES)), "2 rows for 4 cells"),
        "baseline genes": (dict(x=x, baselines=torch.zeros(1, 3)), "3 features per cell"),
        "inf baseline": (
            dict(x=x, baselines=torch.full((1, N_GENES), torch.inf)),
            "baselines holds",
        ),
    }
    for name, (kwargs, message) in bad.items():
        kwargs = {"target": 0, **kwargs}
        with pytest.raises(ValueError, match=message):
            attribute(target, method="integrated_gradients", n_steps=4, **kwargs)
        assert name
