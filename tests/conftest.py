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
