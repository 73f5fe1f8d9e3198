"""Baselines and null models of the evaluation protocol (DESIGN.md section 5).

Null models for the count NLL, fitted on the training cells only, so that a model's
reconstruction number can be read at all:

* :func:`fit_null_nb` with ``library_scaled=False``: per-gene negative binomial with a constant
  mean ``mu_g`` (the gene's training mean) and inverse dispersion ``theta_g`` (maximum
  likelihood);
* the same with ``library_scaled=True``: ``mu_cg = l_c * p_g`` with ``l_c`` the cell's total
  count and ``p_g`` the gene's share of the training counts; ``theta_g`` by maximum likelihood.

A decoder that does not beat them uses nothing from its latent. Both report
:meth:`NullNB.nll`, ``-log p(x_cell)`` summed over genes, in the units of
``scvi.model.SCVI.get_reconstruction_error`` and
:meth:`scvit_core.api.ScViTModel.get_reconstruction_error` (average it over cells).

Baselines for the latent readouts: scVI through scvi-tools (:func:`train_scvi`), PCA-64 on
log1p-normalised counts (:func:`pca_baseline`), raw counts with logistic regression
(:func:`counts_logreg_baseline`), and the scViT network with untrained weights
(:func:`untrained_scvit`).
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any

import anndata as ad
import numpy as np
import pyro.distributions as dist
import scipy.sparse as sp
import torch
from scipy.special import digamma, polygamma

from scvit_core import _constants as K
from scvit_core.likelihood import THETA_MAX, nb_logits

NORM_TARGET = 1e4
"""Counts per cell after normalisation for the PCA and logistic-regression baselines."""

MEAN_FLOOR = 1e-6
"""Smallest null-model mean (as :data:`scvit_core.likelihood.MEAN_MIN`): a gene with no
training counts gets this mean, so its test counts are possible but very unlikely."""

THETA_MIN_FIT = 1e-4
"""Lower bound of the fitted inverse dispersion (upper: ``likelihood.THETA_MAX``; a gene that is
not over-dispersed has its MLE at infinity and is clamped there, i.e. almost Poisson)."""


# --------------------------------------------------------------------------------------------
# null models for the count NLL
# --------------------------------------------------------------------------------------------


@dataclass
class NullNB:
    """A fitted per-gene negative binomial null model.

    Attributes
    ----------
    gene_param
        ``(genes,)``: the constant mean ``mu_g`` (``library_scaled=False``) or the gene's share
        ``p_g`` of the training counts (``library_scaled=True``, sums to 1).
    theta
        ``(genes,)`` inverse dispersion (pyro's ``total_count``), maximum likelihood.
    library_scaled
        Whether the mean is ``l_c * p_g`` (``l_c`` = the cell's total count).
    n_train
        Training cells used for the fit.
    converged
        Whether the Newton iterations met their tolerance for every gene.
    """

    gene_param: np.ndarray
    theta: np.ndarray
    library_scaled: bool
    n_train: int
    converged: bool = True

    @property
    def n_genes(self) -> int:
        """Number of genes."""
        return len(self.gene_param)

    def mean(self, library: np.ndarray) -> np.ndarray:
        """Mean ``(cells, genes)`` for cells with total counts ``library`` ``(cells,)``."""
        library = np.asarray(library, dtype=np.float64).reshape(-1, 1)
        if self.library_scaled:
            mu = library * self.gene_param[None, :]
        else:
            mu = np.broadcast_to(self.gene_param[None, :], (len(library), self.n_genes))
        return np.maximum(mu, MEAN_FLOOR)

    def nll(
        self,
        data: ad.AnnData | np.ndarray | sp.spmatrix,
        *,
        split: str | None = None,
        layer: str | None = None,
        chunk_size: int = 2048,
    ) -> np.ndarray:
        """Per-cell negative log-likelihood, summed over genes (scVI's units before the mean).

        Parameters
        ----------
        data
            AnnData (counts in ``X`` or ``layers[layer]``) or a cells x genes count matrix, with
            the genes of the fit in the same order.
        split
            With AnnData: only the cells of this ``obs["split"]`` value.
        layer
            With AnnData: layer holding the counts.
        chunk_size
            Cells per dense block.

        Returns
        -------
        numpy.ndarray
            ``(cells,)`` float64; its mean is the reconstruction error.
        """
        X = _select(data, split=split, layer=layer)
        if X.shape[1] != self.n_genes:
            raise ValueError(f"data have {X.shape[1]} genes, the null model {self.n_genes}")
        theta = torch.as_tensor(self.theta, dtype=torch.float64)
        out = []
        for start in range(0, X.shape[0], chunk_size):
            block = _dense(X[start : start + chunk_size])  # (B, genes) float64
            mu = torch.as_tensor(self.mean(block.sum(1)))
            counts = torch.as_tensor(block)
            # Same parametrisation as scViT's "nb" likelihood: logits = log(mu) - log(theta).
            logits = nb_logits(mu, theta.expand_as(mu), likelihood="nb")
            d = dist.NegativeBinomial(
                total_count=theta.expand_as(mu), logits=logits, validate_args=False
            )
            out.append((-d.log_prob(counts).sum(1)).numpy())
        return np.concatenate(out) if out else np.zeros(0)

    def reconstruction_error(
        self, data: ad.AnnData | np.ndarray | sp.spmatrix, *, split: str | None = None, **kwargs
    ) -> dict[str, float]:
        """``{"reconstruction_loss": mean per-cell NLL}``, as scVI's reconstruction error."""
        return {"reconstruction_loss": float(self.nll(data, split=split, **kwargs).mean())}


def fit_null_nb(
    data: ad.AnnData | np.ndarray | sp.spmatrix,
    *,
    library_scaled: bool = False,
    split: str | None = "train",
    layer: str | None = None,
    max_iter: int = 100,
    tol: float = 1e-8,
) -> NullNB:
    """Fit a per-gene negative-binomial null model on the training cells.

    Parameters
    ----------
    data
        AnnData with ``obs["split"]`` (only ``split`` cells are used), or a count matrix (all
        its rows are used; ``split`` is ignored).
    library_scaled
        False: constant mean ``mu_g`` = the gene's training mean. True: ``mu_cg = l_c * p_g``
        with ``p_g`` the gene's share of all training counts (the maximum-likelihood mean
        shape under Poisson sampling; under the NB it is the usual plug-in).
    split
        The split to fit on (None: every cell).
    layer
        AnnData layer with the counts (None: ``X``).
    max_iter, tol
        Newton iterations on ``log theta`` per gene (vectorised over genes) and the tolerance
        on the per-cell score.

    Returns
    -------
    NullNB
    """
    if isinstance(data, ad.AnnData) and split is not None and K.SPLIT not in data.obs:
        raise KeyError(f"split={split!r} needs adata.obs[{K.SPLIT!r}]")
    X = _select(data, split=split if isinstance(data, ad.AnnData) else None, layer=layer)
    X = sp.csr_matrix(X, dtype=np.float64)
    if X.shape[0] == 0:
        raise ValueError("no training cells to fit the null model on")
    if X.data.size and (X.data.min() < 0 or not np.isfinite(X.data).all()):
        raise ValueError("counts must be finite and non-negative")
    n = X.shape[0]
    totals = np.asarray(X.sum(0)).ravel()  # (genes,)
    library = np.asarray(X.sum(1)).ravel()  # (cells,)
    if library_scaled:
        gene_param = totals / max(totals.sum(), 1.0)
        scale = library
    else:
        gene_param = totals / n
        scale = np.ones(n)
    if library_scaled:
        # An empty cell has mean 0 whatever theta is: it carries no information on theta.
        keep = library > 0
        X, scale = X[keep], scale[keep]
    theta, converged = fit_theta(X, scale, np.maximum(gene_param, MEAN_FLOOR), max_iter, tol)
    return NullNB(gene_param, theta, library_scaled, n, converged)


def fit_theta(
    X: sp.csr_matrix,
    scale: np.ndarray,
    gene_param: np.ndarray,
    max_iter: int = 100,
    tol: float = 1e-8,
) -> tuple[np.ndarray, bool]:
    """Maximum-likelihood ``theta_g`` of ``NB(mean = scale_c * gene_param_g, theta_g)``.

    Newton's method on ``eta = log theta``, every gene at once. The digamma terms are needed
    only at nonzero counts (``psi(0 + theta) - psi(theta) = 0``), and the dense terms depend on a
    cell only through ``scale_c``, so they are summed over its distinct values: one for the
    constant-mean model, a few hundred library sizes for the scaled one. A step is capped at
    one unit of ``eta``; where the log-likelihood is not locally concave the step follows the
    score's sign. Start: method of moments on ``x / scale``.

    Returns
    -------
    theta, converged
        ``(genes,)`` and whether every gene's ``|score| / n_cells < tol`` at the end.
    """
    X = sp.csr_matrix(X)
    n, _ = X.shape
    rows = np.repeat(np.arange(n), np.diff(X.indptr))
    cols, x = X.indices, X.data
    mu_nz = scale[rows] * gene_param[cols]  # mean at each nonzero entry
    values, counts = np.unique(scale, return_counts=True)  # distinct scales, (S,)
    mu_u = values[:, None] * gene_param[None, :]  # (S, genes)

    # Method of moments on the scale-normalised counts: var = m + m^2 / theta.
    m = gene_param
    y = sp.csr_matrix((x / scale[rows], cols, X.indptr), shape=X.shape)
    ey2 = np.asarray(y.multiply(y).sum(0)).ravel() / n
    var = ey2 - (np.asarray(y.sum(0)).ravel() / n) ** 2
    excess = var - m * np.mean(1.0 / scale)
    theta = np.where(excess > 1e-12, m**2 / np.maximum(excess, 1e-12), 1e3)
    theta = np.clip(theta, 1e-2, 1e4)

    # The special functions depend on an entry only through (gene, count): evaluate them once
    # per distinct pair (a few per cent of the nonzeros in real data), weighted by multiplicity.
    pairs, mult = np.unique(np.stack([cols, x]), axis=1, return_counts=True)
    p_cols, p_x = pairs[0].astype(np.int64), pairs[1]

    converged = False
    for _ in range(max_iter):
        t_p = theta[p_cols]
        t_nz = theta[cols]
        a = np.bincount(p_cols, mult * (digamma(p_x + t_p) - digamma(t_p)), minlength=len(m))
        b = np.bincount(
            p_cols, mult * (polygamma(1, p_x + t_p) - polygamma(1, t_p)), minlength=len(m)
        )
        c = np.bincount(cols, x / (t_nz + mu_nz), minlength=len(m))
        d = np.bincount(cols, x / (t_nz + mu_nz) ** 2, minlength=len(m))
        tm = theta[None, :] + mu_u  # (S, genes)
        w = counts[:, None]
        score = (
            a
            + n * (np.log(theta) + 1.0)
            - (w * np.log(tm)).sum(0)
            - (w * theta[None, :] / tm).sum(0)
            - c
        )
        hess = b + n / theta - (w / tm).sum(0) - (w * mu_u / tm**2).sum(0) + d
        g_eta = theta * score  # d/d eta
        h_eta = theta**2 * hess + g_eta
        step = np.where(h_eta < 0, -g_eta / np.where(h_eta < 0, h_eta, -1.0), np.sign(g_eta))
        step = np.clip(step, -1.0, 1.0)
        at_max = (theta >= THETA_MAX) & (g_eta > 0)  # MLE at infinity: Poisson limit
        at_min = (theta <= THETA_MIN_FIT) & (g_eta < 0)
        active = np.abs(score) / n >= tol * np.maximum(1.0, 1.0 / theta)
        active &= ~(at_max | at_min)
        if not active.any():
            converged = True
            break
        theta = np.where(active, np.clip(theta * np.exp(step), THETA_MIN_FIT, THETA_MAX), theta)
    return theta, converged


# --------------------------------------------------------------------------------------------
# scVI
# --------------------------------------------------------------------------------------------


@dataclass
class SCVIResult:
    """A trained scVI baseline.

    Attributes
    ----------
    model
        The ``scvi.model.SCVI`` (trained on a copy of the training cells).
    wall_time_s
        Seconds spent in ``model.train``.
    n_train
        Training cells.
    """

    model: Any
    wall_time_s: float
    n_train: int


def train_scvi(
    adata: ad.AnnData,
    *,
    n_latent: int = 64,
    max_epochs: int = 10,
    seed: int = 0,
    batch_size: int = 128,
    layer: str | None = None,
    accelerator: str = "auto",
    enable_progress_bar: bool = False,
    **train_kwargs: Any,
) -> SCVIResult:
    """Train scVI (scvi-tools' defaults otherwise) on the ``train`` cells of ``obs["split"]``.

    The report's reference is ``SCVI(adata, n_latent=64).train(max_epochs=10)``. Here scVI sees
    only a copy of our training cells, with ``train_size=1.0``: scvi-tools would otherwise hold
    out 10% of them for its own validation, which it does not use for model selection by
    default, so keeping them makes both models train on the same cells. The user's AnnData is
    not modified.

    Parameters
    ----------
    adata
        Raw counts with ``obs["split"]``.
    n_latent
        Latent size (64 in the report).
    max_epochs
        Epochs (10 in the report; scvi-tools' own default budget is ``min(round(20000 /
        n_cells * 400), 400)``).
    seed
        ``scvi.settings.seed`` (seeds torch, numpy and Python globally, as scvi-tools does).
    batch_size
        Cells per batch (scvi-tools' default 128).
    layer
        Layer with the counts (None: ``X``).
    accelerator, enable_progress_bar, **train_kwargs
        Passed to ``SCVI.train``.

    Returns
    -------
    SCVIResult
    """
    import scvi

    if K.SPLIT not in adata.obs:
        raise KeyError(f"train_scvi needs adata.obs[{K.SPLIT!r}]")
    train = _counts_adata(adata, "train", layer)
    scvi.settings.seed = seed
    scvi.model.SCVI.setup_anndata(train)
    model = scvi.model.SCVI(train, n_latent=n_latent)
    start = time.perf_counter()
    model.train(
        max_epochs=max_epochs,
        train_size=1.0,
        batch_size=batch_size,
        accelerator=accelerator,
        enable_progress_bar=enable_progress_bar,
        **train_kwargs,
    )
    wall = time.perf_counter() - start
    model.module.eval()
    return SCVIResult(model, wall, train.n_obs)


def scvi_latent(
    model: Any, adata: ad.AnnData, *, split: str | None = "test", layer: str | None = None
) -> np.ndarray:
    """scVI's latent (posterior mean, ``give_mean=True``) of the cells of one split."""
    return model.get_latent_representation(_counts_adata(adata, split, layer), give_mean=True)


def scvi_reconstruction_error(
    model: Any,
    adata: ad.AnnData,
    *,
    split: str | None = "test",
    layer: str | None = None,
    return_mean: bool = True,
    seed: int | None = 0,
    posterior: str = "sample",
) -> dict[str, float | np.ndarray]:
    """scVI's reconstruction error ``-log p(x | z)`` on the cells of one split.

    Summed over genes and averaged over cells under scVI's ZINB with the observed library size:
    the same units as :meth:`ScViTModel.get_reconstruction_error` and :meth:`NullNB.nll`.

    Parameters
    ----------
    posterior
        ``"sample"``: scvi-tools' own ``get_reconstruction_error``, which decodes *one sample*
        of ``q(z | x)`` (random; ``seed``, torch's global seed set just before, makes it
        repeatable). ``"mean"``: the decoder at the posterior mean ``E[z | x]``, the number to
        compare with a deterministic autoencoder.

    Returns
    -------
    dict
        ``{"reconstruction_loss": float}`` (or per-cell ``numpy.ndarray`` with
        ``return_mean=False``).
    """
    if posterior not in ("sample", "mean"):
        raise ValueError(f"posterior must be 'sample' or 'mean', got {posterior!r}")
    data = _counts_adata(adata, split, layer)
    model.module.eval()
    if seed is not None:
        torch.manual_seed(seed)
    if posterior == "sample":
        out = model.get_reconstruction_error(data, return_mean=return_mean)
        value = out["reconstruction_loss"]
        if return_mean:
            return {"reconstruction_loss": float(value)}
        return {"reconstruction_loss": np.asarray(value.detach().cpu(), dtype=np.float64)}
    module, per_cell = model.module, []
    with torch.inference_mode():
        for tensors in model._make_data_loader(adata=model._validate_anndata(data)):
            inference = module.inference(**module._get_inference_input(tensors))
            inference = {**inference, "z": inference["qz"].loc}  # the posterior mean
            px = module.generative(**module._get_generative_input(tensors, inference))["px"]
            x = tensors["X"].to(px.mu.device if hasattr(px, "mu") else "cpu")
            per_cell.append(-px.log_prob(x).sum(-1).double().cpu().numpy())
    values = np.concatenate(per_cell) if per_cell else np.zeros(0)
    return {"reconstruction_loss": float(values.mean()) if return_mean else values}


# --------------------------------------------------------------------------------------------
# PCA, raw counts, untrained network
# --------------------------------------------------------------------------------------------


def log_normalise(X: np.ndarray | sp.spmatrix, *, target: float = NORM_TARGET) -> np.ndarray:
    """``log1p(counts / library * target)`` as a dense float32 array (empty cells stay 0)."""
    X = sp.csr_matrix(X, dtype=np.float64)
    library = np.maximum(np.asarray(X.sum(1)).ravel(), 1.0)
    scaled = sp.diags(target / library) @ X
    return np.log1p(scaled.toarray()).astype(np.float32)


def pca_baseline(
    adata: ad.AnnData,
    *,
    n_components: int = 64,
    layer: str | None = None,
    seed: int = 0,
) -> dict[str, np.ndarray]:
    """PCA on log1p-normalised counts (``1e4`` per cell), fitted on the training cells only.

    Parameters
    ----------
    adata
        Raw counts with ``obs["split"]``.
    n_components
        Components (64, the latent size of the report); capped at ``min(train cells, genes)``.
    layer
        Layer with the counts (None: ``X``).
    seed
        ``random_state`` of the (possibly randomised) SVD solver.

    Returns
    -------
    dict
        ``{"train": (train cells, k), "validation": ..., "test": ...}`` float32 latents, and
        ``"model"``: the fitted :class:`sklearn.decomposition.PCA`.
    """
    from sklearn.decomposition import PCA

    train = log_normalise(_select(adata, split="train", layer=layer))
    k = min(n_components, *train.shape)
    pca = PCA(n_components=k, random_state=seed).fit(train)
    out: dict[str, Any] = {"model": pca}
    for split in K.SPLITS:
        X = log_normalise(_select(adata, split=split, layer=layer))
        out[split] = pca.transform(X).astype(np.float32) if X.shape[0] else np.zeros((0, k))
    return out


def counts_logreg_baseline(
    adata: ad.AnnData,
    *,
    label_key: str = K.CELL_TYPE,
    layer: str | None = None,
    seed: int = 0,
    max_iter: int = 1000,
) -> dict[str, float]:
    """Logistic regression on log1p-normalised counts (all genes), train -> test cells.

    How much a linear readout gets from the counts without any learned representation.

    Returns
    -------
    dict
        ``{"accuracy": ..., "macro_f1": ...}`` on the test cells.
    """
    from sklearn.linear_model import LogisticRegression
    from sklearn.metrics import accuracy_score, f1_score
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    if label_key not in adata.obs:
        raise KeyError(f"adata.obs has no {label_key!r} column")
    labels = adata.obs[label_key].astype(str).to_numpy()
    split = adata.obs[K.SPLIT].astype(str).to_numpy()
    X_train = log_normalise(_select(adata, split="train", layer=layer))
    X_test = log_normalise(_select(adata, split="test", layer=layer))
    clf = make_pipeline(
        StandardScaler(), LogisticRegression(max_iter=max_iter, random_state=seed)
    ).fit(X_train, labels[split == "train"])
    pred = clf.predict(X_test)
    y_test = labels[split == "test"]
    return {
        "accuracy": float(accuracy_score(y_test, pred)),
        "macro_f1": float(f1_score(y_test, pred, average="macro", zero_division=0)),
    }


def untrained_scvit(adata: ad.AnnData, *args: Any, seed: int = 0, **kwargs: Any):
    """The scViT network with its initial (random) weights: the null model for latent readouts.

    Same arguments as :class:`scvit_core.api.ScViTModel` and the same ``seed`` as the trained
    model it is compared with, so both start from the same weights; it is simply never trained.
    Training that does not beat it has taught the latent nothing.
    """
    from scvit_core.api import ScViTModel

    return ScViTModel(adata, *args, seed=seed, **kwargs)


# --------------------------------------------------------------------------------------------
# helpers
# --------------------------------------------------------------------------------------------


def _select(
    data: ad.AnnData | np.ndarray | sp.spmatrix, *, split: str | None, layer: str | None
) -> np.ndarray | sp.spmatrix:
    """The count matrix of ``data`` (one split of an AnnData, or the matrix itself)."""
    if not isinstance(data, ad.AnnData):
        return data
    X = data.X if layer is None else data.layers[layer]
    if split is None:
        return X
    if K.SPLIT not in data.obs:
        raise KeyError(f"split={split!r} needs adata.obs[{K.SPLIT!r}]")
    return X[np.flatnonzero(data.obs[K.SPLIT].astype(str).to_numpy() == split)]


def _dense(X: np.ndarray | sp.spmatrix) -> np.ndarray:
    return (X.toarray() if sp.issparse(X) else np.asarray(X)).astype(np.float64)


def _counts_adata(adata: ad.AnnData, split: str | None, layer: str | None) -> ad.AnnData:
    """A fresh AnnData (counts in float32 ``X``) of one split, for scvi-tools to register."""
    X = _select(adata, split=split, layer=layer)
    X = X.astype(np.float32) if sp.issparse(X) else np.asarray(X, dtype=np.float32)
    rows = (
        np.arange(adata.n_obs)
        if split is None
        else np.flatnonzero(adata.obs[K.SPLIT].astype(str).to_numpy() == split)
    )
    return ad.AnnData(X=sp.csr_matrix(X), obs=adata.obs.iloc[rows].copy(), var=adata.var[[]].copy())
