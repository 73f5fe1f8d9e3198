"""Shared fixtures: a tiny synthetic AnnData and the optional real data directory."""

from __future__ import annotations

import os
from pathlib import Path

import anndata as ad
import numpy as np
import pandas as pd
import pytest
import scipy.sparse as sp


@pytest.fixture
def tiny_counts() -> ad.AnnData:
    """60 cells x 30 genes of negative-binomial counts, three labels, named genes."""
    rng = np.random.default_rng(0)
    counts = rng.negative_binomial(2, 0.3, size=(60, 30)).astype(np.int32)
    counts[:, 0] += 1  # no empty cells
    obs = pd.DataFrame(
        {"celltype": pd.Categorical(np.repeat(["a", "b", "c"], [30, 20, 10]))},
        index=[f"c{i}" for i in range(60)],
    )
    var = pd.DataFrame(index=[f"G{j:02d}" for j in range(30)])
    return ad.AnnData(X=sp.csr_matrix(counts), obs=obs, var=var)


@pytest.fixture
def data_dir() -> Path:
    """The real data directory ($SCVIT_DATA_DIR); tests using it skip where it is absent."""
    value = os.environ.get("SCVIT_DATA_DIR")
    if not value or not Path(value).is_dir():
        pytest.skip("no data directory: set SCVIT_DATA_DIR (the Makefile uses ../shared/data)")
    return Path(value)


PERCEIVER_GENES = 48


def small_perceiver(seed: int = 0, *, sharp: bool = True, **overrides):
    """A tiny randomly initialised scPerceiver (48 genes, 4 tokens of width 16, one block each
    side), in evaluation mode.

    ``sharp`` scales up the gene embeddings, the query/key maps and (``attention=False``) draws
    the constant mixing logits at random, so that attention weights are far from uniform and
    the outputs depend clearly on the cell (embeddings of unit scale whatever ``init_std``).
    """
    import torch

    from scvit_core.perceiver import PerceiverConfig, ScPerceiver

    base = dict(dim=16, n_tokens=4, heads=2, encoder_blocks=1, decoder_blocks=1)
    if overrides.get("tokens") == "conv":
        base.update(patch_size=8, conv_channels=4)
    base.update(overrides)
    torch.manual_seed(seed)
    net = ScPerceiver(PerceiverConfig.for_genes(PERCEIVER_GENES, **base))
    if sharp:
        generator = torch.Generator().manual_seed(seed)
        with torch.no_grad():
            for name, p in net.named_parameters():
                owner, _, leaf = name.rpartition(".")
                if leaf in ("expression", "identity", "gene_queries", "queries"):
                    p.mul_(1.0 / net.config.init_std)  # unit scale whatever the default
                elif owner.rpartition(".")[2] in ("q", "k") and leaf == "weight":
                    p.mul_(4)
                elif leaf == "in_proj_weight":
                    p[: 2 * p.shape[1]].mul_(4)  # queries and keys of self-attention
                elif leaf == "logits":
                    p.copy_(2 * torch.randn(p.shape, generator=generator))
    return net.eval()


@pytest.fixture(scope="session")
def make_perceiver():
    """:func:`small_perceiver`, for tests that build scPerceivers."""
    return small_perceiver


@pytest.fixture(scope="session")
def tiny_scvi():
    """An scVI (4 latent dimensions, 16 hidden units) trained for one epoch on 200 cells x 60
    genes of negative-binomial counts: ``(model, counts)``."""
    import warnings

    import scvi

    rng = np.random.default_rng(0)
    counts = rng.negative_binomial(2, 0.3, size=(200, 60)).astype(np.float32)
    adata = ad.AnnData(counts)
    scvi.settings.seed = 0
    scvi.model.SCVI.setup_anndata(adata)
    model = scvi.model.SCVI(adata, n_latent=4, n_hidden=16)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # Lightning's notes on a 3-batch epoch
        model.train(max_epochs=1, batch_size=64, accelerator="cpu", enable_progress_bar=False)
    return model, counts
