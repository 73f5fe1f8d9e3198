"""The evaluation protocol of DESIGN.md section 5, for any model with an encoder.

Latent readouts are trained on the ``train`` cells and scored on the ``test`` cells of the
stored split, at every label level a dataset has (``obs["cell_type"]``, ``obs["cell_type_fine"]``):

* the report's MLP classifier (:class:`ReportMLP`, DESIGN.md section 2), kNN (k = 15) and
  logistic regression: accuracy and macro-F1 each;
* scib-metrics bio-conservation on the test cells: NMI and ARI of k-means clusters against the
  labels (``nmi_ari_cluster_labels_kmeans``: it runs on CPU in seconds, Leiden needs a kNN graph
  and is slower) and ``silhouette_label``. A failing scib call gives NaN and a warning.

Results are one **tidy** :class:`pandas.DataFrame` with columns ``metric``, ``label_key``,
``value`` (one row per metric x label level). Metrics that use no label (reconstruction, cost)
have ``label_key == ""``. Frames from several models, seeds or checkpoints are concatenated
after adding columns such as ``model`` and ``seed``.

Cost helpers (:func:`cost_metrics`, :func:`hardware_string`, :func:`peak_memory_mb`) and the
comparison of the final-epoch and best-validation weights of a trained
:class:`~scvit_core.api.ScViTModel` (:func:`evaluate_checkpoints`) complete the protocol.
"""

from __future__ import annotations

import copy
import os
import platform
import resource
import sys
import time
import warnings
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from typing import Any

import anndata as ad
import numpy as np
import pandas as pd
import torch
from torch import nn

from scvit_core import _constants as K

COLUMNS = ["metric", "label_key", "value"]
"""Columns of every tidy result frame."""

LABEL_KEYS = (K.CELL_TYPE, K.CELL_TYPE_FINE)
"""Label levels evaluated where present."""


# --------------------------------------------------------------------------------------------
# the report's MLP classifier
# --------------------------------------------------------------------------------------------


class ReportMLP(nn.Module):
    """The report's downstream classifier: ``n_in -> 256 -> 256 -> K``.

    DESIGN.md section 2 gives LeakyReLU, LayerNorm, Dropout(0.4) from the second layer and
    LogSoftmax + NLLLoss; it leaves the order within a block open. Here each hidden block is
    ``Linear -> LayerNorm -> LeakyReLU``, and Dropout(0.4) follows the second hidden block (the
    first block has none), then ``Linear -> LogSoftmax``.
    """

    def __init__(self, n_in: int, n_classes: int, *, hidden: int = 256, dropout: float = 0.4):
        super().__init__()
        self.layers = nn.Sequential(
            nn.Linear(n_in, hidden),
            nn.LayerNorm(hidden),
            nn.LeakyReLU(),
            nn.Linear(hidden, hidden),
            nn.LayerNorm(hidden),
            nn.LeakyReLU(),
            nn.Dropout(dropout),
            nn.Linear(hidden, n_classes),
            nn.LogSoftmax(dim=-1),
        )

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        """Log class probabilities ``(B, K)`` for latents ``(B, n_in)``."""
        return self.layers(z)


def fit_report_mlp(
    z_train: np.ndarray,
    y_train: np.ndarray,
    *,
    n_classes: int | None = None,
    epochs: int = 10,
    lr: float = 0.005,
    batch_size: int = 256,
    seed: int = 0,
) -> ReportMLP:
    """Train :class:`ReportMLP` on ``(z_train, y_train)``; returned in eval mode.

    Parameters
    ----------
    z_train
        Latents ``(cells, dims)``; used as they are (the report does not standardise them).
    y_train
        Integer class codes ``0 .. K-1``.
    n_classes
        ``K`` (default ``y_train.max() + 1``).
    epochs, lr, batch_size
        The report: 10 epochs, lr 0.005. The optimiser is AdamW with PyTorch's default weight
        decay, as in the reference code's autoencoder training (the classifier's optimiser is
        not stated; the reference uses AdamW throughout). Batch size is not stated; 256.
    seed
        Seeds weights, dropout and batch order without touching the global random state.

    Returns
    -------
    ReportMLP
        The trained classifier (its output is log class probabilities; the interpretation
        package attributes its logits, see :class:`interpret.attribution.ClassifierTarget`).
    """
    y_train = np.asarray(y_train, dtype=np.int64)
    k = int(n_classes if n_classes is not None else y_train.max() + 1)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = ReportMLP(z_train.shape[1], k)
        opt = torch.optim.AdamW(model.parameters(), lr=lr)
        loss_fn = nn.NLLLoss()
        z = torch.as_tensor(np.asarray(z_train, dtype=np.float32))
        y = torch.as_tensor(y_train)
        generator = torch.Generator().manual_seed(seed)
        model.train()
        for _ in range(epochs):
            order = torch.randperm(len(z), generator=generator)
            for start in range(0, len(z), batch_size):
                idx = order[start : start + batch_size]
                if len(idx) < 2 and len(z) > 1:
                    continue  # a single-cell batch gives LayerNorm nothing to learn from
                opt.zero_grad()
                loss_fn(model(z[idx]), y[idx]).backward()
                opt.step()
    return model.eval()


def mlp_predict(
    z_train: np.ndarray,
    y_train: np.ndarray,
    z_test: np.ndarray,
    *,
    n_classes: int | None = None,
    epochs: int = 10,
    lr: float = 0.005,
    batch_size: int = 256,
    seed: int = 0,
) -> np.ndarray:
    """Train :class:`ReportMLP` on ``(z_train, y_train)`` and predict classes of ``z_test``.

    Parameters
    ----------
    z_train, z_test
        Latents ``(cells, dims)``.
    y_train, n_classes, epochs, lr, batch_size, seed
        As in :func:`fit_report_mlp`, which trains the classifier.

    Returns
    -------
    numpy.ndarray
        Predicted class codes ``(test cells,)``.
    """
    model = fit_report_mlp(
        z_train,
        y_train,
        n_classes=n_classes,
        epochs=epochs,
        lr=lr,
        batch_size=batch_size,
        seed=seed,
    )
    with torch.no_grad():
        logp = model(torch.as_tensor(np.asarray(z_test, dtype=np.float32)))
    return logp.argmax(1).numpy()


# --------------------------------------------------------------------------------------------
# classifier and scib metrics
# --------------------------------------------------------------------------------------------


def classifier_metrics(
    z_train: np.ndarray,
    y_train: Sequence,
    z_test: np.ndarray,
    y_test: Sequence,
    *,
    label_key: str = K.CELL_TYPE,
    seed: int = 0,
    n_neighbors: int = 15,
    mlp_epochs: int = 10,
) -> pd.DataFrame:
    """MLP, kNN and logistic-regression accuracy and macro-F1 on the test latents.

    Parameters
    ----------
    z_train, z_test
        Latents of the training and test cells.
    y_train, y_test
        Labels (any hashable values). A test label never seen in training counts as an error
        for every classifier.
    label_key
        Written to the ``label_key`` column.
    seed
        Seed of the MLP and of the logistic regression's solver.
    n_neighbors
        k of the kNN classifier (15; fewer if there are fewer training cells).
    mlp_epochs
        Epochs of the MLP (the report: 10).

    Returns
    -------
    pandas.DataFrame
        Rows ``{mlp,knn,logreg}_{accuracy,macro_f1}`` in the tidy format.
    """
    from sklearn.linear_model import LogisticRegression
    from sklearn.metrics import accuracy_score, f1_score
    from sklearn.neighbors import KNeighborsClassifier
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler
    from threadpoolctl import threadpool_limits

    y_train, y_test = _as_labels(y_train), _as_labels(y_test)
    classes = np.unique(np.concatenate([y_train, y_test]))
    code_train = np.searchsorted(classes, y_train)
    code_test = np.searchsorted(classes, y_test)
    preds: dict[str, np.ndarray] = {}
    preds["mlp"] = mlp_predict(
        z_train, code_train, z_test, n_classes=len(classes), epochs=mlp_epochs, seed=seed
    )
    k = max(1, min(n_neighbors, len(z_train)))
    # One BLAS thread: the matrices are tiny (cells x 64), and BLAS threads spinning beside
    # torch's made the logistic regression ~15x slower (most of a run's evaluation).
    with threadpool_limits(1, user_api="blas"):
        knn = KNeighborsClassifier(n_neighbors=k).fit(z_train, code_train)
        preds["knn"] = knn.predict(z_test)
        if len(np.unique(code_train)) > 1:
            # Standardised, because latents of different models have very different scales.
            logreg = make_pipeline(
                StandardScaler(), LogisticRegression(max_iter=1000, random_state=seed)
            )
            preds["logreg"] = logreg.fit(z_train, code_train).predict(z_test)
        else:
            preds["logreg"] = np.full(len(z_test), code_train[0])
    rows = []
    for name, pred in preds.items():
        rows.append((f"{name}_accuracy", label_key, float(accuracy_score(code_test, pred))))
        f1 = f1_score(code_test, pred, average="macro", zero_division=0)
        rows.append((f"{name}_macro_f1", label_key, float(f1)))
    return pd.DataFrame(rows, columns=COLUMNS)


def bio_conservation(
    z: np.ndarray, labels: Sequence, *, label_key: str = K.CELL_TYPE, seed: int = 0
) -> pd.DataFrame:
    """scib-metrics NMI, ARI (k-means clusters vs labels) and label silhouette.

    Each call is guarded: an exception (a missing package, too few cells or labels, a jax
    error) gives NaN and a :class:`RuntimeWarning` naming the metric, never a crash.

    Parameters
    ----------
    z
        Latents of the test cells.
    labels
        Their labels.
    label_key
        Written to the ``label_key`` column.
    seed
        Unused: scib-metrics' jax k-means (k = number of labels) has a fixed seed of its own,
        so the scores are deterministic. Kept for a uniform signature.

    Returns
    -------
    pandas.DataFrame
        Rows ``nmi``, ``ari``, ``silhouette_label`` in the tidy format. The silhouette is
        scib's rescaled one, ``(s + 1) / 2`` in ``[0, 1]``.
    """
    z = np.asarray(z, dtype=np.float32)
    labels = _as_labels(labels)
    values = {"nmi": np.nan, "ari": np.nan, "silhouette_label": np.nan}
    try:
        from scib_metrics import nmi_ari_cluster_labels_kmeans

        out = nmi_ari_cluster_labels_kmeans(z, labels)
        values["nmi"], values["ari"] = float(out["nmi"]), float(out["ari"])
    except Exception as err:  # any failure becomes NaN, reported below
        warnings.warn(f"scib NMI/ARI failed ({label_key}): {err!r}", RuntimeWarning, stacklevel=2)
    try:
        from scib_metrics import silhouette_label

        values["silhouette_label"] = float(silhouette_label(z, labels, rescale=True))
    except Exception as err:
        warnings.warn(
            f"scib silhouette_label failed ({label_key}): {err!r}", RuntimeWarning, stacklevel=2
        )
    return pd.DataFrame([(m, label_key, v) for m, v in values.items()], columns=COLUMNS)


def evaluate_latent(
    z_train: np.ndarray,
    z_test: np.ndarray,
    labels_train: dict[str, Sequence],
    labels_test: dict[str, Sequence],
    *,
    seed: int = 0,
    scib: bool = True,
    mlp_epochs: int = 10,
) -> pd.DataFrame:
    """All latent readouts at every label level.

    Parameters
    ----------
    z_train, z_test
        Latents of the training and test cells.
    labels_train, labels_test
        ``{label_key: labels}`` for the same cells, one entry per label level.
    seed
        Seed of the classifiers.
    scib
        Also compute the scib-metrics scores (on the test cells).
    mlp_epochs
        Epochs of the report's MLP.

    Returns
    -------
    pandas.DataFrame
        Tidy: ``metric``, ``label_key``, ``value``.
    """
    z_train, z_test = np.asarray(z_train), np.asarray(z_test)
    if set(labels_train) != set(labels_test):
        raise ValueError("labels_train and labels_test must have the same label levels")
    frames = []
    for key in labels_train:
        y_train, y_test = labels_train[key], labels_test[key]
        if len(y_train) != len(z_train) or len(y_test) != len(z_test):
            raise ValueError(f"labels {key!r} do not match the number of latents")
        frames.append(
            classifier_metrics(
                z_train, y_train, z_test, y_test, label_key=key, seed=seed, mlp_epochs=mlp_epochs
            )
        )
        if scib:
            frames.append(bio_conservation(z_test, y_test, label_key=key, seed=seed))
    return pd.concat(frames, ignore_index=True) if frames else pd.DataFrame(columns=COLUMNS)


def evaluate_embedding(
    adata: ad.AnnData,
    latent: np.ndarray,
    *,
    label_keys: Sequence[str] | None = None,
    seed: int = 0,
    scib: bool = True,
    mlp_epochs: int = 10,
) -> pd.DataFrame:
    """:func:`evaluate_latent` for a latent of *every* cell of ``adata``, split by ``obs["split"]``.

    Parameters
    ----------
    adata
        Cells with ``obs["split"]`` and label columns.
    latent
        ``(adata.n_obs, dims)`` in the cells' order.
    label_keys
        Label columns (default: those of :data:`LABEL_KEYS` present in ``adata.obs``).

    Returns
    -------
    pandas.DataFrame
        Tidy: ``metric``, ``label_key``, ``value``.
    """
    if K.SPLIT not in adata.obs:
        raise KeyError(f"adata.obs has no {K.SPLIT!r} column")
    latent = np.asarray(latent)
    if len(latent) != adata.n_obs:
        raise ValueError(f"latent has {len(latent)} rows, adata {adata.n_obs} cells")
    keys = _label_keys(adata, label_keys)
    split = adata.obs[K.SPLIT].astype(str).to_numpy()
    train, test = split == "train", split == "test"
    labels = {k: adata.obs[k].astype(str).to_numpy() for k in keys}
    return evaluate_latent(
        latent[train],
        latent[test],
        {k: v[train] for k, v in labels.items()},
        {k: v[test] for k, v in labels.items()},
        seed=seed,
        scib=scib,
        mlp_epochs=mlp_epochs,
    )


def evaluate_scvit(
    model: Any,
    adata: ad.AnnData | None = None,
    *,
    label_keys: Sequence[str] | None = None,
    seed: int = 0,
    scib: bool = True,
    latent: bool = True,
    mlp_epochs: int = 10,
) -> pd.DataFrame:
    """Reconstruction error on the test cells and the latent readouts of an ``ScViTModel``.

    Returns
    -------
    pandas.DataFrame
        Tidy; the row ``reconstruction_loss`` (``label_key == ""``) is the test NLL in scVI's
        units, followed by :func:`evaluate_embedding`'s rows if ``latent``.
    """
    adata = model.adata if adata is None else adata
    rec = model.get_reconstruction_error(adata, split="test")["reconstruction_loss"]
    frames = [pd.DataFrame([("reconstruction_loss", "", float(rec))], columns=COLUMNS)]
    if latent:
        z = model.get_latent_representation(adata)
        frames.append(
            evaluate_embedding(
                adata, z, label_keys=label_keys, seed=seed, scib=scib, mlp_epochs=mlp_epochs
            )
        )
    return pd.concat(frames, ignore_index=True)


# --------------------------------------------------------------------------------------------
# cost
# --------------------------------------------------------------------------------------------


@contextmanager
def timer() -> Iterator[dict[str, float]]:
    """Wall time of a ``with`` block: ``with timer() as t: ...; t["wall_time_s"]``."""
    out = {"wall_time_s": float("nan")}
    start = time.perf_counter()
    try:
        yield out
    finally:
        out["wall_time_s"] = time.perf_counter() - start


def count_parameters(module: nn.Module, *, trainable_only: bool = False) -> int:
    """Number of parameters of a torch module (all, or only those requiring gradients)."""
    return sum(p.numel() for p in module.parameters() if p.requires_grad or not trainable_only)


def peak_memory_mb() -> float:
    """Peak memory in MiB: ``torch.cuda.max_memory_allocated`` on a GPU, else the process's
    peak resident set size (``ru_maxrss``: KiB on Linux, bytes on macOS).

    The CPU figure is the whole process's high-water mark since it started (data included),
    not only the model's.
    """
    if torch.cuda.is_available():
        return torch.cuda.max_memory_allocated() / 2**20
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return rss / 2**20 if sys.platform == "darwin" else rss / 2**10


def hardware_string() -> str:
    """CPU model (``/proc/cpuinfo`` or ``platform.processor()``), cores, torch threads, GPU."""
    cpu = ""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.lower().startswith("model name"):
                    cpu = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    cpu = cpu or platform.processor() or platform.machine() or "unknown CPU"
    parts = [f"{cpu} ({os.cpu_count()} cores, torch threads {torch.get_num_threads()})"]
    if torch.cuda.is_available():
        names = [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())]
        parts.append("GPU " + ", ".join(names))
    elif torch.backends.mps.is_available():
        parts.append("Apple MPS")
    return "; ".join(parts)


def cost_metrics(
    *,
    wall_time_s: float,
    n_cells: int,
    n_epochs: int = 1,
    module: nn.Module | None = None,
    n_parameters: int | None = None,
) -> pd.DataFrame:
    """Cost rows of the tidy format (``label_key == ""``).

    Parameters
    ----------
    wall_time_s
        Training (or inference) time.
    n_cells
        Cells processed per epoch.
    n_epochs
        Epochs in ``wall_time_s``; ``cells_per_s = n_cells * n_epochs / wall_time_s``.
    module, n_parameters
        The network (its parameters are counted) or the count itself.

    Returns
    -------
    pandas.DataFrame
        Rows ``wall_time_s``, ``cells_per_s``, ``n_parameters``, ``peak_memory_mb``, and
        ``hardware`` (a string in ``value``, which is therefore an object column).
    """
    if n_parameters is None and module is not None:
        n_parameters = count_parameters(module)
    rate = n_cells * n_epochs / wall_time_s if wall_time_s > 0 else float("nan")
    rows = [
        ("wall_time_s", "", float(wall_time_s)),
        ("cells_per_s", "", float(rate)),
        ("n_parameters", "", float("nan") if n_parameters is None else int(n_parameters)),
        ("peak_memory_mb", "", peak_memory_mb()),
        ("hardware", "", hardware_string()),
    ]
    return pd.DataFrame(rows, columns=COLUMNS)


# --------------------------------------------------------------------------------------------
# final-epoch weights versus the best-validation checkpoint
# --------------------------------------------------------------------------------------------


def load_checkpoint_weights(model: Any, path: str) -> Any:
    """A copy of an ``ScViTModel`` with the weights of a Lightning checkpoint.

    The checkpoint's ``state_dict`` holds the :class:`~scvit_core.train.ScViTLightning` keys,
    ``model.<name>``; the prefix is stripped and the network loaded strictly. The copy shares
    ``model.adata`` (never copied) and leaves ``model`` untouched.
    """
    ckpt = torch.load(path, map_location="cpu", weights_only=True)
    state = {k.removeprefix("model."): v for k, v in ckpt["state_dict"].items()}
    other = copy.copy(model)
    other.module = copy.deepcopy(model.module)
    other.module.model.load_state_dict(state)
    other.module.cpu()
    return other


def evaluate_checkpoints(
    model: Any,
    adata: ad.AnnData | None = None,
    *,
    threshold: float = 0.05,
    label_keys: Sequence[str] | None = None,
    seed: int = 0,
    scib: bool = False,
    latent: bool = True,
    mlp_epochs: int = 10,
) -> pd.DataFrame:
    """Evaluate a trained ``ScViTModel``'s final-epoch weights and best-validation checkpoint.

    The "final" weights are the model's current ones (those of the last epoch after
    :meth:`ScViTModel.train`); the "best" are read from ``model.train_result.best_checkpoint``
    (Lightning's ModelCheckpoint on the validation loss). Both go through
    :func:`evaluate_scvit` on the same cells with the same seeds.

    Parameters
    ----------
    model
        An ``ScViTModel`` trained in this session (it has a ``train_result``).
    adata
        Data to evaluate on (default: the model's).
    threshold
        A metric is flagged when ``|best - final| > threshold * max(|final|, 1e-12)`` (relative
        difference; 5% by default). Any flag also raises a :class:`UserWarning`, because a
        model whose evaluation-mode loss moves while its training loss stays flat is itself a
        finding.
    label_keys, seed, scib, latent, mlp_epochs
        As in :func:`evaluate_scvit`.

    Returns
    -------
    pandas.DataFrame
        One row per metric x label level: ``metric``, ``label_key``, ``final``, ``best``,
        ``rel_diff`` (``(best - final) / |final|``), ``differs`` (bool). ``attrs`` holds the
        checkpoint paths and the best epoch.
    """
    result = getattr(model, "train_result", None)
    if result is None or not result.best_checkpoint:
        raise ValueError("the model has no best checkpoint: train it with ScViTModel.train first")
    kwargs = dict(label_keys=label_keys, seed=seed, scib=scib, latent=latent, mlp_epochs=mlp_epochs)
    final = evaluate_scvit(model, adata, **kwargs)
    best_model = load_checkpoint_weights(model, result.best_checkpoint)
    if _same_weights(model, best_model):  # the last epoch was the best: nothing to redo
        best = final
    else:
        best = evaluate_scvit(best_model, adata, **kwargs)
    table = final.rename(columns={"value": "final"})
    table["best"] = best["value"].to_numpy()
    table["rel_diff"] = (table["best"] - table["final"]) / np.maximum(
        np.abs(table["final"].astype(float)), 1e-12
    )
    table["differs"] = np.abs(table["rel_diff"]) > threshold
    table.attrs.update(
        best_checkpoint=result.best_checkpoint,
        last_checkpoint=result.last_checkpoint,
        best_epoch=_best_epoch(model),
    )
    if table["differs"].any():
        flagged = ", ".join(
            f"{r.metric}[{r.label_key}] {r.final:.4g} -> {r.best:.4g}"
            for r in table[table["differs"]].itertuples()
        )
        warnings.warn(
            f"final-epoch and best-validation weights differ by more than {threshold:.0%}: "
            f"{flagged}",
            UserWarning,
            stacklevel=2,
        )
    return table


# --------------------------------------------------------------------------------------------
# helpers
# --------------------------------------------------------------------------------------------


def _as_labels(labels: Sequence) -> np.ndarray:
    return np.asarray(pd.Series(np.asarray(labels, dtype=object)).astype(str))


def _label_keys(adata: ad.AnnData, label_keys: Sequence[str] | None) -> list[str]:
    if label_keys is None:
        keys = [k for k in LABEL_KEYS if k in adata.obs]
        if not keys:
            raise KeyError(f"adata.obs has none of the label columns {LABEL_KEYS}")
        return keys
    missing = [k for k in label_keys if k not in adata.obs]
    if missing:
        raise KeyError(f"adata.obs has no label column(s) {missing}")
    return list(label_keys)


def _same_weights(model: Any, other: Any) -> bool:
    ours = model.model.state_dict()
    theirs = other.module.model.state_dict()
    return ours.keys() == theirs.keys() and all(
        torch.equal(value.cpu(), theirs[name].cpu()) for name, value in ours.items()
    )


def _best_epoch(model: Any) -> int | None:
    history = getattr(model, "history", None)
    if history is None or len(history) == 0 or history["val_loss"].isna().all():
        return None
    return int(history.loc[history["val_loss"].idxmin(), "epoch"])
