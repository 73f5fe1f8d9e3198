"""Every public entry point against bad input, faults and tampered files (issue 14).

Each case asserts its outcome: the error type and a key phrase of its message, or the correct
result. The user's AnnData and files are hashed before and after every call that reads them.
"""

from __future__ import annotations

import hashlib
import logging
import warnings

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
