"""Experiment runner: a spec -> a trained model and its metrics, cached by the spec's hash.

One :class:`ExperimentSpec` names everything that defines a run (model, preset, likelihood and
ablation switches, dataset, profile, seed, training-set fraction). :func:`run` trains and
evaluates it once under the evaluation protocol (DESIGN.md section 5) and stores, in
``results/<key>/``::

    spec.json        the spec
    metrics.csv      tidy metrics: metric, label_key, checkpoint, value
    history.csv      per-epoch losses (scViT)
    provenance.json  git commit, library versions, hardware, profile, seed, time
    model/           the trained scViT (ScViTModel.save), reused by later notebooks

A second call with the same spec reads the cache instead of training again.
:func:`results_table` gathers every stored run into one tidy table for notebooks and the
README.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import platform
import shutil
import subprocess
import time
import warnings
from dataclasses import dataclass, field
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path
from typing import Any

import anndata as ad
import numpy as np
import pandas as pd

from . import _constants as K
from .data import load_dataset, stratified_subsample
from .profiles import get_profile
from .train import quiet_lightning

RESULTS_DIR_ENV = "SCVIT_RESULTS_DIR"
"""Environment variable naming the results directory (default ``./results``)."""

MODELS = ("scvit", "untrained_scvit", "perceiver", "scvi", "pca", "null_nb", "null_nb_library")
"""What a spec can run: scViT, the same network untrained, scPerceiver (the model built from
the diagnosis), scVI, PCA-64, and the two per-gene negative-binomial null models (constant
mean; mean scaled by library size)."""

DEFAULT_BUDGET = "default"
"""``ExperimentSpec.epochs`` value meaning the model's own default budget: scvi-tools'
``get_max_epochs_heuristic`` for scVI, :func:`scvit_core.api.perceiver_epochs` for
scPerceiver (scPerceiver's default even when ``epochs`` is None)."""

HBCA_PATH_PREFIX = "hbca:"
"""``ExperimentSpec.dataset`` ``"hbca:PATH"``: the HBCA loader on the file at ``PATH``."""

PRESETS = ("default", "paper")
METRIC_COLUMNS = ["metric", "label_key", "checkpoint", "value"]
_PACKAGES = ("torch", "lightning", "pyro-ppl", "anndata", "scanpy", "scvi-tools", "scvit")


# The source files whose code determines each model's numbers (paths relative to the package),
# and the installed packages that do. Evaluation, the data layer and this runner (epochs,
# subsamples, how each model is trained and read) are common to all.
_COMMON_CODE = ("_constants.py", "profiles.py", "evaluate.py", "experiments.py", "data/")
_CODE = {
    "scvit": (
        "config.py",
        "model.py",
        "likelihood.py",
        "train.py",
        "api.py",
        "architectures.py",
        "baselines.py",
    ),
    "perceiver": (
        "perceiver.py",
        "model.py",
        "likelihood.py",
        "train.py",
        "api.py",
        "architectures.py",
        "config.py",
        "baselines.py",
    ),
    "scvi": ("baselines.py", "likelihood.py"),
    "pca": ("baselines.py",),
    "null_nb": ("baselines.py", "likelihood.py"),
}
_CODE["untrained_scvit"] = _CODE["scvit"]
_CODE["null_nb_library"] = _CODE["null_nb"]
_CODE_PACKAGES = ("torch", "pyro-ppl", "scvi-tools", "lightning", "scikit-learn", "scib-metrics")


def code_fingerprint(model: str) -> str:
    """16 hex digits of the SHA-256 of the code behind ``model``'s numbers.

    The source of the files listed for the model (its network, likelihood, trainer and API for
    the autoencoders; the baselines for scVI, PCA and the nulls), the evaluation protocol and
    the data layer, plus the installed versions of the libraries that compute them. Part of
    every run's cache key, so a run made by other code is never served: changing one line of
    scPerceiver's file retrains scPerceiver and nothing else.
    """
    root = Path(__file__).resolve().parent
    digest = hashlib.sha256()
    for entry in sorted(set(_COMMON_CODE + _CODE[model])):
        files = sorted((root / entry).rglob("*.py")) if entry.endswith("/") else [root / entry]
        for path in files:
            digest.update(str(path.relative_to(root)).encode())
            digest.update(path.read_bytes())
    for package in _CODE_PACKAGES:
        try:
            digest.update(f"{package}=={version(package)}".encode())
        except PackageNotFoundError:
            digest.update(f"{package} missing".encode())
    return digest.hexdigest()[:16]


@dataclass(frozen=True)
class ExperimentSpec:
    """Everything that defines one run; its :attr:`key` names the cache entry.

    Attributes
    ----------
    model
        One of :data:`MODELS`.
    dataset
        A name or path for :func:`scvit_core.load_dataset`.
    profile
        ``ci``, ``cpu`` or ``paper``: fixes the cell subsample and the default epochs.
    seed
        Seed of the weights, dropout and batch order (not of the data: every seed sees the
        same cells).
    preset
        scViT's architecture: ``"default"`` (``ScViTConfig.for_genes`` of the dataset) or
        ``"paper"`` (59,480 genes).
    options
        ``ScViTConfig`` overrides as sorted ``(name, value)`` pairs, e.g.
        ``(("attention", False), ("likelihood", "corrected"))``; see :meth:`make`.
    epochs
        Training epochs (None: the profile's; scPerceiver: its own default budget), or
        :data:`DEFAULT_BUDGET` for the model's own default budget. The profile's
        ``max_epochs`` caps either default.
    train_fraction
        Share of the training cells used (label-stratified, the same cells for every seed);
        validation and test cells are always all kept.
    """

    model: str = "scvit"
    dataset: str = "zeisel2015"
    profile: str = "cpu"
    seed: int = 0
    preset: str = "default"
    options: tuple[tuple[str, Any], ...] = ()
    epochs: int | str | None = None
    train_fraction: float = 1.0
    label: str = field(default="", compare=False)  # a display name; not part of the key

    def __post_init__(self) -> None:
        if self.model not in MODELS:
            raise ValueError(f"model must be one of {MODELS}, got {self.model!r}")
        if self.preset not in PRESETS:
            raise ValueError(f"preset must be one of {PRESETS}, got {self.preset!r}")
        if isinstance(self.epochs, str) and self.epochs != DEFAULT_BUDGET:
            raise ValueError(f"epochs must be an integer, None or {DEFAULT_BUDGET!r}")
        if not 0 < self.train_fraction <= 1:
            raise ValueError(f"train_fraction must be in (0, 1], got {self.train_fraction}")
        get_profile(self.profile)  # unknown profiles fail here, with the list of known ones

    @classmethod
    def make(cls, model: str = "scvit", *, label: str = "", **fields: Any) -> ExperimentSpec:
        """A spec whose ``ScViTConfig`` overrides are given as keywords.

        Keywords that are fields of the spec set those fields; every other keyword is a
        ``ScViTConfig`` override (``likelihood="corrected"``, ``attention=False``, ...).
        """
        names = {f.name for f in dataclasses.fields(cls)}
        own = {k: v for k, v in fields.items() if k in names}
        options = tuple(sorted((k, v) for k, v in fields.items() if k not in names))
        return cls(model=model, options=options, label=label, **own)

    @classmethod
    def for_profile(
        cls, model: str = "scvit", *, profile: str | None = None, **fields: Any
    ) -> ExperimentSpec:
        """:meth:`make` with the dataset and name of a profile (default: the current one)."""
        chosen = get_profile(profile)
        defaults = {"dataset": chosen.dataset, "profile": chosen.name}
        return cls.make(model, **(defaults | fields))

    @property
    def key(self) -> str:
        """16 hex digits of the SHA-256 of the spec (without its label), its profile and code.

        The profile's settings and the fingerprint of the code behind the model's numbers
        (:func:`code_fingerprint`) are part of the key, so redefining a profile or changing
        the code invalidates the cached runs instead of silently reusing them.
        """
        payload = {k: v for k, v in dataclasses.asdict(self).items() if k != "label"}
        payload["profile"] = dataclasses.asdict(get_profile(self.profile))
        payload["code"] = code_fingerprint(self.model)
        text = json.dumps(payload, sort_keys=True, default=str)
        return hashlib.sha256(text.encode()).hexdigest()[:16]

    @property
    def name(self) -> str:
        """The label, or a name built from the model and its options."""
        if self.label:
            return self.label
        parts = [self.model] + [f"{k}={v}" for k, v in self.options]
        if self.train_fraction < 1:
            parts.append(f"train_fraction={self.train_fraction}")
        return " ".join(parts)

    def to_dict(self) -> dict[str, Any]:
        """JSON-friendly dict (options as a mapping)."""
        data = dataclasses.asdict(self)
        data["options"] = dict(self.options)
        return data

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> ExperimentSpec:
        """Inverse of :meth:`to_dict`."""
        data = dict(data)
        data["options"] = tuple(sorted(data.get("options", {}).items()))
        return cls(**data)


@dataclass
class ExperimentResult:
    """A finished (or cached) run."""

    spec: ExperimentSpec
    directory: Path
    metrics: pd.DataFrame
    history: pd.DataFrame
    provenance: dict[str, Any]
    cached: bool

    def value(self, metric: str, *, label_key: str = "", checkpoint: str = "final") -> float:
        """One metric's value (``checkpoint`` is ignored for metrics that have none)."""
        rows = self.metrics[
            (self.metrics["metric"] == metric) & (self.metrics["label_key"] == label_key)
        ]
        if rows["checkpoint"].ne("").any():
            rows = rows[rows["checkpoint"] == checkpoint]
        if len(rows) != 1:
            raise KeyError(f"no single value for {metric!r} [{label_key!r}, {checkpoint!r}]")
        return float(rows["value"].iloc[0])

    def load_model(self, adata: ad.AnnData | None = None):
        """The trained model of this run (scViT's ``ScViTModel`` or scvi-tools' ``SCVI``).

        Bound to ``adata``, by default the cells the run used (:func:`prepare_data`); scVI gets
        a copy, as scvi-tools registers the AnnData it is given. Runs of scVI made before
        models were stored have none: rerun them with ``run(spec, force=True)``.
        """
        path = self.directory / "model"
        if not path.exists():
            raise FileNotFoundError(
                f"run {self.spec.name!r} stored no model ({self.spec.model}); models are kept "
                "for scvit and scvi runs (rerun with run(spec, force=True) if it predates that)"
            )
        adata = prepare_data(self.spec) if adata is None else adata
        if self.spec.model == "scvi":
            import scvi

            with quiet_lightning(True):  # no "File ... already downloaded" notice
                return scvi.model.SCVI.load(str(path), adata=adata.copy())
        from .api import ScViTModel

        return ScViTModel.load(path, adata)


def results_dir(directory: str | os.PathLike | None = None) -> Path:
    """``directory``, else ``$SCVIT_RESULTS_DIR``, else ``./results``."""
    return Path(directory or os.environ.get(RESULTS_DIR_ENV) or "results")


def prepare_data(spec: ExperimentSpec) -> ad.AnnData:
    """The cells a spec runs on: the dataset, the profile's subsample, the training fraction.

    Every subsample is label-stratified with seed 0, so all models and seeds of a profile see
    the same cells. ``dataset="hbca"`` (the ``paper`` profile) reads a stratified subsample of
    the Human Brain Cell Atlas with :func:`scvit_core.data.load_hbca` (the file comes from
    ``$SCVIT_DATA_DIR``; its error message says how to supply it); ``"hbca:PATH"`` reads the
    file at ``PATH`` instead (e.g. :func:`smoke_dataset`'s).
    """
    profile = get_profile(spec.profile)
    if spec.dataset == "hbca" or spec.dataset.startswith(HBCA_PATH_PREFIX):
        from .data import load_hbca

        path = spec.dataset.removeprefix(HBCA_PATH_PREFIX) if spec.dataset != "hbca" else None
        # Enough cells that the train split (80%) holds the largest of the report's sizes.
        adata = load_hbca(round(max(profile.train_cells) / 0.8), path=path, progress=True)
    else:
        adata = load_dataset(spec.dataset, empty_cells="drop")
    if profile.max_cells and adata.n_obs > profile.max_cells:
        adata = adata[stratified_subsample(adata.obs[K.CELL_TYPE], profile.max_cells)].copy()
    if spec.train_fraction < 1:
        train = np.flatnonzero(adata.obs[K.SPLIT].to_numpy() == "train")
        n_keep = max(1, round(spec.train_fraction * len(train)))
        kept = train[stratified_subsample(adata.obs[K.CELL_TYPE].to_numpy()[train], n_keep)]
        keep = adata.obs[K.SPLIT].to_numpy() != "train"
        keep[kept] = True
        adata = adata[keep].copy()
    return adata


def run(
    spec: ExperimentSpec,
    *,
    directory: str | os.PathLike | None = None,
    force: bool = False,
    progress: bool = False,
) -> ExperimentResult:
    """Train and evaluate ``spec``, or read its cached result.

    Parameters
    ----------
    spec
        What to run.
    directory
        Results directory (see :func:`results_dir`).
    force
        Run again even if a cached result exists (it is replaced).
    progress
        Show training progress bars.

    Returns
    -------
    ExperimentResult
    """
    run_dir = results_dir(directory) / spec.key
    if (run_dir / "metrics.csv").exists() and not force:
        return _read(run_dir, cached=True)
    if run_dir.exists():
        shutil.rmtree(run_dir)  # a stale or partial run: the directory is ours
    tmp_dir = run_dir.with_name(run_dir.name + ".partial")
    if tmp_dir.exists():
        shutil.rmtree(tmp_dir)
    tmp_dir.mkdir(parents=True)

    start = time.perf_counter()
    adata = prepare_data(spec)
    epochs = training_epochs(spec, int((adata.obs[K.SPLIT] == "train").sum()))
    with quiet_lightning(not progress):
        metrics, history = _RUNNERS[spec.model](spec, adata, epochs, tmp_dir, progress)
    metrics = metrics.reindex(columns=METRIC_COLUMNS).fillna({"checkpoint": "", "label_key": ""})
    metrics.to_csv(tmp_dir / "metrics.csv", index=False)
    history.to_csv(tmp_dir / "history.csv", index=False)
    (tmp_dir / "spec.json").write_text(json.dumps(spec.to_dict(), indent=2, default=str))
    provenance = _provenance(spec, adata, epochs)
    provenance["run_time_s"] = round(time.perf_counter() - start, 2)  # data, training, evaluation
    (tmp_dir / "provenance.json").write_text(json.dumps(provenance, indent=2))
    tmp_dir.rename(run_dir)  # a run is in the cache only once it is complete
    return _read(run_dir, cached=False)


def smoke_dataset(profile: str, directory: str | os.PathLike) -> str:
    """The ``dataset`` of a smoke run of ``profile`` (:func:`scvit_core.profiles.smoke`).

    The profile's own dataset, except the HBCA: a synthetic file with the atlas's schema and
    its 59,480 genes (:func:`scvit_core.data.hbca.synthetic_hbca`), written once into
    ``directory`` and read through the same loader (``"hbca:PATH"``).
    """
    chosen = get_profile(profile)
    if chosen.dataset != "hbca":
        return chosen.dataset
    from .data.hbca import synthetic_hbca

    n_cells = round(max(chosen.train_cells) / 0.8) * 3 // 2  # the loader subsamples from it
    path = Path(directory) / f"hbca_synthetic_{n_cells}.h5ad"
    if not path.exists():
        path.parent.mkdir(parents=True, exist_ok=True)
        shares = {"Astrocyte": 0.5, "Oligodendrocyte": 0.3, "Microglia": 0.15, "Fibroblast": 0.05}
        sizes = {label: max(2, round(share * n_cells)) for label, share in shares.items()}
        tmp = path.with_suffix(".partial.h5ad")
        synthetic_hbca(sizes, rate=0.1).write_h5ad(tmp)
        tmp.rename(path)
    return f"{HBCA_PATH_PREFIX}{path}"


def training_epochs(spec: ExperimentSpec, n_train: int) -> int:
    """The epochs a spec trains for, given its number of training cells."""
    profile = get_profile(spec.profile)
    if isinstance(spec.epochs, int):
        return spec.epochs
    default = spec.epochs == DEFAULT_BUDGET or (spec.epochs is None and spec.model == "perceiver")
    if not default:
        return profile.epochs
    if spec.model == "perceiver":
        from .api import perceiver_epochs

        epochs = perceiver_epochs(n_train)
    elif spec.model == "scvi":
        from scvi.model._utils import get_max_epochs_heuristic

        epochs = get_max_epochs_heuristic(n_train)
    else:
        epochs = profile.epochs
    return min(epochs, profile.max_epochs) if profile.max_epochs else epochs


GRAD_NORM_EVERY = 5
"""An autoencoder run records each block's gradient norm every this many optimiser steps, in
``<run>/grad_norms.csv`` (read by the diagnosis chapter; recording does not change training)."""

WORKERS_ENV = "SCVIT_WORKERS"
"""Environment variable: how many runs :func:`run_many` trains at once (default 1)."""


def workers_from_env() -> int:
    """Runs trained at once by default: ``$SCVIT_WORKERS``, else 1."""
    text = os.environ.get(WORKERS_ENV, "1")
    if not text.strip().isdigit():
        raise ValueError(f"${WORKERS_ENV} must be a whole number of runs at once, got {text!r}")
    return int(text)


def run_many(
    specs: list[ExperimentSpec], *, workers: int | None = None, **kwargs: Any
) -> list[ExperimentResult]:
    """:func:`run` for each spec, printing one line per run; the uncached ones in parallel.

    Parameters
    ----------
    specs
        What to run (a spec listed twice runs once).
    workers
        Runs trained at once, each in its own process with ``threads / workers`` of this
        process's torch threads (default ``$SCVIT_WORKERS``, else 1: one run at a time, in this
        process).
        On a 2-core CPU two one-thread runs finish about 1.3-1.6 times sooner than one two-thread
        run after the other (small matrices use a second thread poorly); on one GPU keep 1.
        The numbers do not depend on it beyond floating-point summation order.
    **kwargs
        Passed to :func:`run` (``directory``, ``force``, ``progress``).

    Returns
    -------
    list of ExperimentResult
        In the order of ``specs``.
    """
    if workers is None:
        workers = workers_from_env()
    if workers < 1:
        raise ValueError(f"workers must be at least 1, got {workers} (from ${WORKERS_ENV}?)")
    directory = results_dir(kwargs.get("directory"))
    force = kwargs.get("force", False)
    pending = list(
        {
            s.key: s for s in specs if force or not (directory / s.key / "metrics.csv").exists()
        }.values()
    )
    seconds: dict[str, float] = {}
    if workers > 1 and len(pending) > 1:
        pending.sort(key=_expected_cost, reverse=True)  # longest first: no long run starts last
        seconds = _run_parallel(pending, min(workers, len(pending)), kwargs)
        kwargs = {**kwargs, "force": False}  # every pending run is now stored
    results = []
    for i, spec in enumerate(specs, 1):
        start = time.perf_counter()
        result = run(spec, **kwargs)
        if spec.key in seconds:
            state = f"{seconds.pop(spec.key):.0f} s (in parallel)"
        elif not result.cached:
            state = f"{time.perf_counter() - start:.0f} s"
        else:
            commit = str(result.provenance.get("git_commit", "unknown"))[:10]
            state = f"cached, made at commit {commit} by the same code"
        print(f"[{i}/{len(specs)}] {spec.name} (seed {spec.seed}): {state}", flush=True)
        results.append(result)
    return results


# Rough cost of a run on a CPU relative to scViT at the profile's epochs, for ordering a pool
# longest first (only the order matters): scPerceiver trains for its own longer budget, scVI's
# cost grows with its epochs (400 at its default budget on small data cost about one scViT run),
# and PCA, the nulls and untrained scViT take seconds.
_RELATIVE_COST = {"perceiver": 2.5, "scvit": 1.0}


def _expected_cost(spec: ExperimentSpec) -> float:
    if spec.model == "scvi":
        epochs = spec.epochs if isinstance(spec.epochs, int) else get_profile(spec.profile).epochs
        cost = (400 if spec.epochs == DEFAULT_BUDGET else epochs) / 400
    else:
        cost = _RELATIVE_COST.get(spec.model, 0.001)
    width = float(dict(spec.options).get("width", 1.0))
    return cost * spec.train_fraction * width**2


def _run_parallel(
    specs: list[ExperimentSpec], workers: int, kwargs: dict[str, Any]
) -> dict[str, float]:
    """Run ``specs`` in ``workers`` fresh processes; each run's seconds by key."""
    seconds = in_processes(_timed_run, [(spec, kwargs) for spec in specs], workers)
    return {spec.key: s for spec, s in zip(specs, seconds, strict=True)}


def in_processes(function: Any, jobs: list[tuple], workers: int) -> list[Any]:
    """``function(*job, threads)`` for each job, in ``workers`` fresh processes; results in order.

    Each job gets ``threads / workers`` of this process's torch threads, the last to start too:
    given all of them while another job still runs, its OpenMP threads outnumber the cores and
    wait on each other (beside a one-thread run on 2 cores, a two-thread scPerceiver run on
    pbmc68k took ~9 s per epoch against 0.4 s alone); a last job alone on its share only leaves
    the rest idle.
    ``function`` must be importable (a module-level function): the processes are spawned.
    """
    import multiprocessing
    from concurrent.futures import ProcessPoolExecutor

    import torch

    share = max(1, torch.get_num_threads() // workers)
    context = multiprocessing.get_context("spawn")  # no forked torch or Lightning state
    with ProcessPoolExecutor(workers, mp_context=context, initializer=_init_worker) as pool:
        futures = [pool.submit(function, *job, share) for job in jobs]
        return [future.result() for future in futures]  # a failed job raises here


def _init_worker() -> None:
    warnings.filterwarnings("ignore")  # a worker's output does not reach the notebook anyway


def _timed_run(spec: ExperimentSpec, kwargs: dict[str, Any], threads: int) -> float:
    import torch

    torch.set_num_threads(threads)
    start = time.perf_counter()
    run(spec, **kwargs)
    return time.perf_counter() - start


def results_table(
    directory: str | os.PathLike | None = None, *, specs: list[ExperimentSpec] | None = None
) -> pd.DataFrame:
    """Every stored run (or those of ``specs``) as one tidy table.

    Runs made under an earlier definition of their profile (whose key no longer matches) are
    left out.

    Columns: the spec's fields (``name`` for its display name, ``options`` as text), then
    ``metric``, ``label_key``, ``checkpoint``, ``value``.
    """
    base = results_dir(directory)
    if specs is not None:
        dirs = [base / s.key for s in specs]
        missing = [s.name for s, d in zip(specs, dirs, strict=True) if not d.exists()]
        if missing:
            raise FileNotFoundError(f"no stored result for {missing}; run them first")
        labels = [s.label for s in specs]
    else:
        dirs = sorted(p for p in base.glob("*") if (p / "metrics.csv").exists())
        labels = [None] * len(dirs)
    frames = []
    for path, label in zip(dirs, labels, strict=True):
        result = _read(path, cached=True)
        if result.spec.key != path.name:
            continue  # made under an earlier definition of its profile: stale
        spec = dataclasses.replace(result.spec, label=label) if label else result.spec
        table = result.metrics.copy()
        for name, value in spec.to_dict().items():
            table[name] = json.dumps(value, sort_keys=True) if name == "options" else value
        table["name"] = spec.name
        table["key"] = spec.key
        table["git_commit"] = result.provenance.get("git_commit", "unknown")
        frames.append(table)
    if not frames:
        return pd.DataFrame(columns=["name", "key", *METRIC_COLUMNS])
    table = pd.concat(frames, ignore_index=True)
    front = ["name", "model", "seed", "dataset", "profile", "train_fraction", "key"]
    return table[front + [c for c in table.columns if c not in front]]


def summarise(
    table: pd.DataFrame,
    metrics: list[str],
    *,
    by: str = "name",
    label_key: str = K.CELL_TYPE,
    checkpoint: str = "final",
) -> pd.DataFrame:
    """Mean, standard deviation and number of seeds of ``metrics`` per ``by`` group.

    Rows whose metric has no label level (reconstruction loss, cost) are matched with
    ``label_key=""``; rows without a checkpoint (baselines) are kept for any ``checkpoint``.
    """
    rows = table[table["metric"].isin(metrics)]
    rows = rows[(rows["label_key"] == "") | (rows["label_key"] == label_key)]
    rows = rows[(rows["checkpoint"] == "") | (rows["checkpoint"] == checkpoint)]
    rows = rows.assign(value=pd.to_numeric(rows["value"]))
    grouped = rows.groupby([by, "metric"], sort=False)["value"]
    out = grouped.agg(["mean", "std", "count"]).rename(columns={"count": "seeds"})
    return out.reset_index()


# runners ------------------------------------------------------------------------------------


def _scvit_config(spec: ExperimentSpec, adata: ad.AnnData):
    from .config import ScViTConfig

    options = dict(spec.options)
    if spec.preset == "paper":
        if adata.n_vars != ScViTConfig.paper().n_genes:
            raise ValueError(
                f"preset 'paper' needs the report's {ScViTConfig.paper().n_genes:,} genes, the "
                f"data have {adata.n_vars:,}; use preset 'default' (the same structure for the "
                "data's own genes) or align the genes first."
            )
        return ScViTConfig.paper(**options)
    # for_genes keeps the report's structure; with 59,480 genes it is the paper preset
    return ScViTConfig.for_genes(adata.n_vars, **options)


def _run_autoencoder(spec, adata, epochs, out_dir, progress):
    from .api import ScPerceiverModel, ScViTModel
    from .evaluate import cost_metrics, evaluate_checkpoints

    if spec.model == "perceiver":
        model = ScPerceiverModel(adata, seed=spec.seed, **dict(spec.options))
    else:
        model = ScViTModel(adata, _scvit_config(spec, adata), seed=spec.seed)
    start = time.perf_counter()
    model.train(
        epochs=epochs,
        seed=spec.seed,
        output_dir=out_dir / "training",
        enable_progress_bar=progress,
        grad_norm_every=GRAD_NORM_EVERY,
    )
    wall = time.perf_counter() - start
    model.train_result.grad_norms.to_csv(out_dir / "grad_norms.csv", index=False)
    with warnings.catch_warnings():
        # A difference between the final and the best checkpoint is recorded, not warned.
        warnings.simplefilter("ignore", UserWarning)
        both = evaluate_checkpoints(model, scib=True, seed=spec.seed)
    rows = []
    for checkpoint in ("final", "best"):
        part = both[["metric", "label_key", checkpoint]].rename(columns={checkpoint: "value"})
        rows.append(part.assign(checkpoint=checkpoint))
    if model.is_variational:  # scvi-tools' reading: one sample of q(z | x), seeded
        sampled = model.get_reconstruction_error(split="test", sample=True, seed=spec.seed)
        rows.append(_reconstruction_row(sampled["reconstruction_loss"], sample=True))
    n_train = int((adata.obs[K.SPLIT] == "train").sum())
    cost = cost_metrics(wall_time_s=wall, n_cells=n_train, n_epochs=epochs, module=model.model)
    model.save(out_dir / "model")
    shutil.rmtree(out_dir / "training", ignore_errors=True)  # checkpoints: evaluated, saved
    return pd.concat([*rows, _numeric(cost)], ignore_index=True), model.history


def _run_untrained(spec, adata, epochs, out_dir, progress):
    from .baselines import untrained_scvit
    from .evaluate import evaluate_scvit

    model = untrained_scvit(adata, _scvit_config(spec, adata), seed=spec.seed)
    metrics = evaluate_scvit(model, scib=True, seed=spec.seed)
    return metrics, pd.DataFrame()


def _run_scvi(spec, adata, epochs, out_dir, progress):
    from .baselines import scvi_latent, scvi_reconstruction_error, train_scvi
    from .evaluate import cost_metrics, evaluate_embedding

    result = train_scvi(adata, max_epochs=epochs, seed=spec.seed, enable_progress_bar=progress)
    rec = {
        posterior: scvi_reconstruction_error(
            result.model, adata, split="test", posterior=posterior, seed=spec.seed
        )["reconstruction_loss"]
        for posterior in ("mean", "sample")
    }
    latent = scvi_latent(result.model, adata, split=None)
    metrics = [
        _reconstruction_row(rec["mean"]),
        _reconstruction_row(rec["sample"], sample=True),
        evaluate_embedding(adata, latent, seed=spec.seed),
        _numeric(
            cost_metrics(
                wall_time_s=result.wall_time_s,
                n_cells=result.n_train,
                n_epochs=epochs,
                module=result.model.module,
            )
        ),
    ]
    # scvi-tools logs some keys on fewer epochs than others: align them on the epoch index
    logged = [v.iloc[:, 0].rename(k) for k, v in result.model.history.items() if len(v)]
    history = pd.concat(logged, axis=1).reset_index(drop=True) if logged else pd.DataFrame()
    result.model.save(str(out_dir / "model"))  # scvi-tools' own format, for later notebooks
    return pd.concat(metrics, ignore_index=True), history


def _run_pca(spec, adata, epochs, out_dir, progress):
    from .baselines import pca_baseline
    from .evaluate import evaluate_embedding

    out = pca_baseline(adata, seed=spec.seed)
    latent = np.zeros((adata.n_obs, out["train"].shape[1]), dtype=np.float32)
    split = adata.obs[K.SPLIT].to_numpy()
    for name in K.SPLITS:
        latent[split == name] = out[name]
    return evaluate_embedding(adata, latent, seed=spec.seed), pd.DataFrame()


def _run_null(library_scaled: bool):
    def runner(spec, adata, epochs, out_dir, progress):
        from .baselines import fit_null_nb

        null = fit_null_nb(adata, library_scaled=library_scaled)
        rec = null.reconstruction_error(adata, split="test")["reconstruction_loss"]
        return _reconstruction_row(rec), pd.DataFrame()

    return runner


_RUNNERS = {
    "scvit": _run_autoencoder,
    "perceiver": _run_autoencoder,
    "untrained_scvit": _run_untrained,
    "scvi": _run_scvi,
    "pca": _run_pca,
    "null_nb": _run_null(False),
    "null_nb_library": _run_null(True),
}


# storage ------------------------------------------------------------------------------------


def _reconstruction_row(value: float, *, sample: bool = False) -> pd.DataFrame:
    """The test NLL (scVI's units) as a metrics row: ``reconstruction_loss`` at the posterior
    mean (the only reading of a deterministic model), ``reconstruction_loss_sample`` at one
    posterior sample (scvi-tools' ``get_reconstruction_error``)."""
    metric = "reconstruction_loss_sample" if sample else "reconstruction_loss"
    return pd.DataFrame({"metric": [metric], "label_key": [""], "value": [value]})


def _numeric(cost: pd.DataFrame) -> pd.DataFrame:
    """Cost rows without the hardware string (kept in the provenance instead)."""
    return cost[cost["metric"] != "hardware"].astype({"value": float})


def _read(run_dir: Path, *, cached: bool) -> ExperimentResult:
    spec = ExperimentSpec.from_dict(json.loads((run_dir / "spec.json").read_text()))
    metrics = pd.read_csv(run_dir / "metrics.csv", keep_default_na=False)
    metrics["value"] = pd.to_numeric(metrics["value"], errors="coerce")
    history_file = run_dir / "history.csv"
    history = pd.read_csv(history_file) if history_file.stat().st_size > 1 else pd.DataFrame()
    provenance = json.loads((run_dir / "provenance.json").read_text())
    return ExperimentResult(spec, run_dir, metrics, history, provenance, cached)


def _provenance(spec: ExperimentSpec, adata: ad.AnnData, epochs: int) -> dict[str, Any]:
    from .evaluate import hardware_string

    versions = {}
    for package in _PACKAGES:
        try:
            versions[package] = version(package)
        except PackageNotFoundError:
            versions[package] = "not installed"
    return {
        "spec_key": spec.key,
        "code_fingerprint": code_fingerprint(spec.model),
        "git_commit": _git_commit(),
        "versions": versions,
        "python": platform.python_version(),
        "hardware": hardware_string(),
        "precision": _precision(spec.model),
        "profile": spec.profile,
        "seed": spec.seed,
        "epochs": epochs,
        "cells": {s: int((adata.obs[K.SPLIT] == s).sum()) for s in K.SPLITS},
        "genes": int(adata.n_vars),
        "finished": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
    }


def _precision(model: str) -> str:
    """The training precision a run of ``model`` used on this machine (scVI: float32)."""
    from .api import MODEL_CLASSES
    from .train import TrainConfig, resolve_precision

    if model not in MODEL_CLASSES:
        return "32-true"  # scvi-tools' default; PCA, the nulls and untrained scViT do not train
    default = MODEL_CLASSES[model].default_train.get("precision", TrainConfig.precision)
    return str(resolve_precision(default))


def _git_commit() -> str:
    here = Path(__file__).resolve().parent
    try:
        out = subprocess.run(
            ["git", "rev-parse", "HEAD"], cwd=here, capture_output=True, text=True, check=True
        )
        dirty = subprocess.run(
            ["git", "status", "--porcelain", "--untracked-files=no"],
            cwd=here,
            capture_output=True,
            text=True,
            check=True,
        ).stdout.strip()
        return out.stdout.strip() + ("-dirty" if dirty else "")
    except (OSError, subprocess.CalledProcessError):
        return "unknown"
