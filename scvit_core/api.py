"""``ScViTModel`` and ``ScPerceiverModel``: the autoencoders on AnnData in the scverse style.

Both are :class:`AutoencoderModel` (like ``scvi.model.SCVI``), which differ only in their
architecture and its default input and training settings::

    model = ScViTModel(adata)                 # ScViTConfig.for_genes(adata.n_vars)
    model = ScPerceiverModel(adata)           # PerceiverConfig.for_genes(adata.n_vars)
    model.train(epochs=10)                    # obs["split"]: train / validation
    z = model.get_latent_representation()     # (cells, 64); adata untouched
    model.get_reconstruction_error(split="test")  # {"reconstruction_loss": ...} scVI's units
    model.save("run/"); ScViTModel.load("run/", adata)

The user's AnnData is never modified unless a call says so (``store=True``, ``store_split=True``).
Every entry point checks its data with :func:`scvit_core.data.prepare_counts` (raw counts,
cells and genes, unique gene names); data with another gene set are aligned to the model's gene
list with :func:`scvit_core.align_genes` and the change is reported as a warning.
"""

from __future__ import annotations

import copy
import json
import pickle
import shutil
import uuid
import warnings
from pathlib import Path
from typing import Any

import anndata as ad
import numpy as np
import pandas as pd
import scipy.sparse as sp
import torch

from scvit_core import _constants as K
from scvit_core.architectures import AnyConfig, architecture_of, config_for_genes, config_from_dict
from scvit_core.data import (
    CountDataError,
    GeneAlignment,
    check_anndata,
    check_unique_genes,
    count_dataloader,
    prepare_counts,
    read_rows,
    stratified_split,
)
from scvit_core.train import (
    AutoencoderLightning,
    TrainConfig,
    TrainResult,
    fit,
    history_frame,
    per_cell_nll,
    transform_input,
)

CONFIG_FILE = "config.json"
TRAIN_CONFIG_FILE = "train_config.json"
GENES_FILE = "genes.txt"
WEIGHTS_FILE = "model.pt"
HISTORY_FILE = "history.csv"
MODEL_FILES = (CONFIG_FILE, TRAIN_CONFIG_FILE, GENES_FILE, WEIGHTS_FILE, HISTORY_FILE)
"""What :meth:`AutoencoderModel.save` writes; all but the history are needed to load."""

NULL_FIT_CELLS = 20_000
"""Training cells of a backed AnnData the starting null model is fitted on (all, in memory)."""


def default_device() -> torch.device:
    """``cuda`` if available, else ``mps``, else ``cpu``."""
    if torch.cuda.is_available():
        return torch.device("cuda")
    if torch.backends.mps.is_available():
        return torch.device("mps")
    return torch.device("cpu")


class AutoencoderModel:
    """An autoencoder bound to a gene list, trained and queried on AnnData.

    Use :class:`ScViTModel` or :class:`ScPerceiverModel`; they set :attr:`architecture` and
    the defaults of input and training.

    Parameters
    ----------
    adata
        Cells x genes with raw counts (in ``X`` or ``layers[layer]``). Its gene list becomes
        the model's; it is not modified.
    config
        The network; default: the architecture's ``for_genes(adata.n_vars)``.
    layer
        Layer with the raw counts (None: ``X``).
    input_transform
        What the network reads (``"counts"``, ``"log1p"``, ``"log1p_norm"``); saved with the
        model. Default: the class's :attr:`default_input_transform`. Overridden by
        ``train(input_transform=...)``.
    **config_overrides
        Fields of the configuration (e.g. ``likelihood="corrected"``, ``attention=False``);
        scViT's ``width`` too when ``config`` is None.
    seed
        Seed of the initial weights (drawn without touching the global random state); the
        training seed is ``TrainConfig.seed``.
    """

    architecture: str = "scvit"
    """Which network (:mod:`scvit_core.architectures`)."""
    default_input_transform: str = "counts"
    default_train: dict[str, Any] = {}  # noqa: RUF012 - read only
    """:class:`TrainConfig` fields that differ from its defaults for this architecture."""

    def __init__(
        self,
        adata: ad.AnnData,
        config: AnyConfig | None = None,
        *,
        layer: str | None = None,
        input_transform: str | None = None,
        seed: int = 0,
        **config_overrides: Any,
    ) -> None:
        check_anndata(adata, layer=layer)
        if config is None:
            config = config_for_genes(self.architecture, adata.n_vars, **config_overrides)
        elif config_overrides:
            config = config.replace(**config_overrides)
        if architecture_of(config) != self.architecture:
            raise TypeError(
                f"{type(self).__name__} takes a {self.architecture} configuration, got a "
                f"{architecture_of(config)} one; use {MODEL_CLASSES[architecture_of(config)]}"
            )
        if config.n_genes != adata.n_vars:
            raise ValueError(
                f"config.n_genes is {config.n_genes} but adata has {adata.n_vars} genes; "
                "build the configuration with for_genes(adata.n_vars) or align the genes first."
            )
        self._build(adata, [str(g) for g in adata.var_names], config, layer, input_transform, seed)

    def _build(self, adata, genes, config, layer, input_transform, seed) -> None:
        """Set every attribute; ``adata`` None for a model loaded without data."""
        self.adata: ad.AnnData | None = adata
        self.layer = layer
        self.genes: list[str] = genes
        self.config = config
        self.train_config = TrainConfig(
            input_transform=input_transform or self.default_input_transform,
            **self.default_train,
        )
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            self.module = AutoencoderLightning(config, self.train_config)
        self.history: pd.DataFrame = history_frame([])
        self.train_result: TrainResult | None = None
        self.last_alignment: GeneAlignment | None = None
        self.is_trained = False

    def __repr__(self) -> str:
        n = sum(p.numel() for p in self.module.model.parameters())
        return (
            f"{type(self).__name__}({len(self.genes)} genes, {n:,} parameters, likelihood="
            f"{self.config.likelihood!r}, input={self.train_config.input_transform!r}, "
            f"trained={self.is_trained})"
        )

    @property
    def model(self):
        """The underlying network (:class:`~scvit_core.model.ScViT` or
        :class:`~scvit_core.perceiver.ScPerceiver`)."""
        return self.module.model

    @property
    def is_variational(self) -> bool:
        """Whether the latent is a posterior ``q(z | x)`` (then the NLL has two readings)."""
        return bool(getattr(self.config, "variational", False))

    # training ------------------------------------------------------------------------------

    def train(
        self,
        *,
        train_config: TrainConfig | None = None,
        output_dir: str | Path | None = None,
        ckpt_path: str | Path | None = None,
        store_split: bool = False,
        split_seed: int = 0,
        trainer_kwargs: dict[str, Any] | None = None,
        **train_overrides: Any,
    ) -> AutoencoderModel:
        """Train on the ``train`` cells of ``obs["split"]``, validating on ``validation``.

        Parameters
        ----------
        train_config
            Training settings; default: the current ones (``TrainConfig()`` with this model's
            input transform).
        output_dir
            Checkpoints and CSV log (a temporary directory if None).
        ckpt_path
            Resume from a Lightning checkpoint written by an earlier call.
        store_split
            If ``obs["split"]`` is absent a stratified split (by ``obs["cell_type"]`` when
            present, seed ``split_seed``) is made; it is written to the user's AnnData only
            if this is True.
        split_seed
            Seed of that split.
        trainer_kwargs
            Extra :class:`lightning.Trainer` arguments.
        **train_overrides
            Fields of :class:`TrainConfig` (``epochs=``, ``batch_size=``, ``lr=``, ...).

        Returns
        -------
        AutoencoderModel
            ``self``; the per-epoch losses are in :attr:`history`.
        """
        cfg = train_config or self.train_config
        if train_overrides:
            cfg = cfg.replace(**train_overrides)
        adata = self._bound_data("to train it")
        prepare_counts(adata, layer=self.layer, allow_empty_cells=False)
        data = _with_split(adata, self.layer, store=store_split, seed=split_seed)
        _training_cells(data)
        if self.is_trained and ckpt_path is None:
            warnings.warn("training continues from the current weights", stacklevel=2)
        self.train_config = cfg
        # The module keeps its weights; only its training settings change.
        self.module.train_config = cfg
        self.module.hparams["train_config"] = cfg.to_dict()

        if not self.is_trained and ckpt_path is None:
            self._init_from_data(data)
        train_loader = count_dataloader(
            data,
            split="train",
            batch_size=cfg.batch_size,
            shuffle=True,
            chunk_size=cfg.chunk_size,
            # a last batch of one cell stops batch normalisation in training mode: it joins
            # the batch before it (on every process under DDP)
            min_last_batch=2,
            shard=True,
            seed=cfg.seed,
            num_workers=cfg.num_workers,
        )
        has_val = (data.obs[K.SPLIT] == "validation").any()
        val_loader = (
            count_dataloader(
                data,
                split="validation",
                batch_size=cfg.batch_size,
                num_workers=cfg.num_workers,
                shard=True,
            )
            if has_val
            else None
        )
        result = fit(
            self.module,
            train_loader,
            val_loader,
            output_dir=output_dir,
            ckpt_path=ckpt_path,
            trainer_kwargs=trainer_kwargs,
        )
        self.module.cpu()
        self.train_result = result
        self.history = result.history
        self.is_trained = True
        return self

    def _init_from_data(self, data: ad.AnnData) -> None:
        """Let a network that wants it start from the training cells' null model."""
        init = getattr(self.model, "init_gene_parameters", None)
        if init is None:
            return
        from scvit_core.baselines import fit_null_nb

        rows = np.flatnonzero(data.obs[K.SPLIT].to_numpy() == "train")
        if data.isbacked and len(rows) > NULL_FIT_CELLS:
            # On disk the null model is fitted on a fixed subsample: memory stays bounded.
            rng = np.random.default_rng(0)
            rows = np.sort(rng.choice(rows, NULL_FIT_CELLS, replace=False))
        train = read_rows(data.X, rows)
        if train.dtype == np.float16:  # scipy.sparse has no float16
            train = train.astype(np.float32)
        train = sp.csr_matrix(train)
        null = fit_null_nb(train, library_scaled=True)
        library = float(np.median(np.asarray(train.sum(1)).ravel()))
        init(torch.as_tensor(null.gene_param), torch.as_tensor(null.theta), library)

    def untrained(self, *, seed: int = 0) -> AutoencoderModel:
        """A copy of this model with initial weights drawn with ``seed``, never trained.

        The null model of latent readouts: with the trained model's seed both start from the
        same weights (those of a new model built with that seed). The copy shares the data,
        configuration and input transform.
        """
        other = copy.copy(self)
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            other.module = AutoencoderLightning(self.config, self.train_config)
        other.history, other.train_result, other.is_trained = history_frame([]), None, False
        return other

    # inference -----------------------------------------------------------------------------

    def _bound_data(self, purpose: str = "to query it without adata=") -> ad.AnnData:
        """The AnnData the model is bound to; a model loaded without data has none."""
        if self.adata is None:
            raise ValueError(
                f"this model was loaded without data; pass adata= to the call, or load it "
                f"with data {purpose}: {type(self).__name__}.load(path, adata)"
            )
        return self.adata

    def _prepare(self, adata: ad.AnnData | None, layer: str | None) -> ad.AnnData:
        """The raw counts of ``adata`` (default: the model's own data) in the model's gene
        order, checked by :func:`~scvit_core.data.prepare_counts`; an alignment is reported."""
        if adata is None or adata is self.adata:
            adata, layer = self._bound_data(), self.layer if layer is None else layer
        prepared = prepare_counts(adata, self.genes, layer=layer)
        if prepared.alignment is not None:
            self.last_alignment = prepared.alignment
            warnings.warn(f"data aligned to the model's genes: {prepared.alignment}", stacklevel=3)
        return prepared.adata

    def _batches(self, adata: ad.AnnData, split: str | None, batch_size: int):
        if split is not None:
            if split not in K.SPLITS:
                raise ValueError(f"split must be one of {K.SPLITS} or None, got {split!r}")
            if K.SPLIT not in adata.obs:
                raise KeyError(
                    f"split={split!r} needs adata.obs[{K.SPLIT!r}]; load the data with "
                    "scvit_core.load_dataset or add one with scvit_core.add_split."
                )
            if not (adata.obs[K.SPLIT].astype(str) == split).any():
                raise ValueError(
                    f"adata.obs[{K.SPLIT!r}] has no {split!r} cells; pass another split= or "
                    "split=None for every cell."
                )
        return count_dataloader(adata, split=split, batch_size=batch_size)

    @torch.inference_mode()
    def get_latent_representation(
        self,
        adata: ad.AnnData | None = None,
        *,
        split: str | None = None,
        layer: str | None = None,
        batch_size: int = 1024,
        store: bool = False,
    ) -> np.ndarray | None:
        """The latent representation of every cell (of one split), in evaluation mode.

        Parameters
        ----------
        adata
            Data to embed (default: the training data). Another gene set is aligned to the
            model's gene list (zero-filled / dropped genes are reported in a warning).
        split
            Only the cells of this ``obs["split"]`` value, in their order in ``adata``.
        layer
            Layer of ``adata`` with the raw counts (default: the model's layer for its own
            data, else ``X``). Normalised data are an error: the model transforms raw counts
            itself (``train_config.input_transform``).
        batch_size
            Cells per forward pass.
        store
            Write the latent to ``adata.obsm["X_scvit"]`` (all cells; ``split`` must be None)
            and return None. Otherwise ``adata`` is left untouched.

        Returns
        -------
        numpy.ndarray or None
            ``(cells, n_latent)`` float32, or None with ``store=True``.
        """
        if store and split is not None:
            raise ValueError("store=True writes every cell's latent; pass split=None")
        target = self._bound_data() if adata is None else adata
        data = self._prepare(target, layer)
        device = default_device()
        model = self.module.model.to(device).eval()
        chunks, rows = [], []
        for batch in self._batches(data, split, batch_size):
            x = transform_input(batch["counts"].to(device), self.train_config.input_transform)
            chunks.append(model.encode(x).float().cpu().numpy())  # (B, n_latent)
            rows.append(batch["index"].numpy())
        latent = _in_row_order(chunks, rows, self.config.n_latent)
        if store:
            target.obsm[K.LATENT] = latent
            return None
        return latent

    @torch.inference_mode()
    def write_latent_representation(
        self,
        path: str | Path,
        adata: ad.AnnData | None = None,
        *,
        split: str | None = None,
        layer: str | None = None,
        batch_size: int = 1024,
    ) -> Path:
        """Write the latent of every cell (of one split) to an ``.h5ad``, batch by batch.

        For data larger than memory (a backed AnnData): the file gets ``obs`` and
        ``obsm["X_scvit"]`` (cells, n_latent) float32, filled as the batches are encoded, and
        no count matrix. Arguments as in :meth:`get_latent_representation`.
        """
        import h5py

        target = self._bound_data() if adata is None else adata
        data = self._prepare(target, layer)
        keep = np.ones(data.n_obs, bool)
        if split is not None:
            keep = data.obs[K.SPLIT].astype(str).to_numpy() == split
        position = np.cumsum(keep) - 1  # row in the file of each kept cell
        skeleton = ad.AnnData(obs=data.obs[keep].copy())
        skeleton.uns[K.UNS] = {"latent_of": type(self).__name__, "split": split or "all"}
        path = Path(path)
        skeleton.write_h5ad(path)
        device = default_device()
        model = self.module.model.to(device).eval()
        with h5py.File(path, "r+") as f:
            obsm = f["obsm"]
            out = obsm.create_dataset(
                K.LATENT, shape=(int(keep.sum()), self.config.n_latent), dtype="float32"
            )
            out.attrs.update({"encoding-type": "array", "encoding-version": "0.2.0"})
            for batch in self._batches(data, split, batch_size):
                x = transform_input(batch["counts"].to(device), self.train_config.input_transform)
                rows = position[batch["index"].numpy()]  # increasing: batches come in order
                out[rows[0] : rows[-1] + 1] = model.encode(x).float().cpu().numpy()
        return path

    @torch.inference_mode()
    def get_reconstruction_error(
        self,
        adata: ad.AnnData | None = None,
        *,
        split: str | None = None,
        layer: str | None = None,
        batch_size: int = 1024,
        return_mean: bool = True,
        sample: bool = False,
        seed: int = 0,
    ) -> dict[str, float | np.ndarray]:
        """Negative log-likelihood of the raw counts, in scVI's units.

        As ``scvi.model.SCVI.get_reconstruction_error``: ``-log p(x_cell | z)`` summed over
        genes for each cell, then averaged over cells (the model in evaluation mode, under its
        own likelihood). Lower is better. A variational model decodes its posterior mean, or
        with ``sample=True`` one sample of ``q(z | x)`` as scvi-tools does.

        Parameters
        ----------
        adata
            Data (default: the training data); another gene set is aligned and reported.
        split
            Only the cells of this ``obs["split"]`` value (e.g. ``"test"``).
        layer
            Layer of ``adata`` with the raw counts (default as for
            :meth:`get_latent_representation`).
        batch_size
            Cells per forward pass.
        return_mean
            False gives the per-cell values (in the cells' order) instead of their mean.
        sample
            Decode one posterior sample (variational models; ignored otherwise).
        seed
            Seed of that sample (the global random state is left as it was).

        Returns
        -------
        dict
            ``{"reconstruction_loss": value}``.
        """
        data = self._prepare(adata, layer)
        device = default_device()
        model = self.module.model.to(device).eval()
        chunks, rows = [], []
        sample = sample and self.is_variational
        with torch.random.fork_rng(devices=[] if device.type == "cpu" else [device]):
            torch.manual_seed(seed)
            for batch in self._batches(data, split, batch_size):
                loss, _ = per_cell_nll(
                    model,
                    batch["counts"].to(device),
                    input_transform=self.train_config.input_transform,
                    sample=sample if self.is_variational else None,
                )
                chunks.append(loss.double().cpu().numpy()[:, None])  # (B, 1)
                rows.append(batch["index"].numpy())
        per_cell = _in_row_order(chunks, rows, 1, dtype=np.float64)[:, 0]
        value = float(per_cell.mean()) if return_mean else per_cell
        return {"reconstruction_loss": value}

    # persistence ---------------------------------------------------------------------------

    def save(self, dir_path: str | Path, *, overwrite: bool = False) -> Path:
        """Write config, training config, gene list, weights and history to ``dir_path``.

        Files: ``config.json``, ``train_config.json``, ``genes.txt`` (one gene a line),
        ``model.pt`` (a plain ``state_dict`` loadable with ``weights_only=True``),
        ``history.csv``. An existing model directory is an error unless ``overwrite``.

        The files are written to a temporary directory beside ``dir_path`` that is then renamed
        into place, so a crash never leaves a half-written model that loads. Anything else in an
        existing ``dir_path`` (training logs, a diagnosis) is kept.

        After multi-process (DDP) training every process runs the caller's script; only rank 0
        writes, the others return ``dir_path`` without writing.
        """
        path = Path(dir_path)
        if self.train_result is not None and self.train_result.global_rank != 0:
            return path
        if (path / WEIGHTS_FILE).exists() and not overwrite:
            raise FileExistsError(f"{path} already holds a model; pass overwrite=True")
        if path.exists() and not path.is_dir():
            raise FileExistsError(f"{path} is a file; pass a directory for the model")
        path.parent.mkdir(parents=True, exist_ok=True)
        staging = path.with_name(f".{path.name}.saving-{uuid.uuid4().hex[:8]}")
        staging.mkdir()
        try:
            self._write_files(staging)
            _move_into_place(staging, path)
        finally:
            shutil.rmtree(staging, ignore_errors=True)  # gone unless something failed
        return path

    def _write_files(self, path: Path) -> None:
        (path / CONFIG_FILE).write_text(json.dumps(self.config.to_dict(), indent=2))
        meta = {"train_config": self.train_config.to_dict(), "layer": self.layer}
        meta["is_trained"] = self.is_trained
        (path / TRAIN_CONFIG_FILE).write_text(json.dumps(meta, indent=2))
        (path / GENES_FILE).write_text("\n".join(self.genes) + "\n")
        state = {k: v.detach().cpu() for k, v in self.module.model.state_dict().items()}
        torch.save(state, path / WEIGHTS_FILE)
        self.history.to_csv(path / HISTORY_FILE, index=False)

    @classmethod
    def load(cls, dir_path: str | Path, adata: ad.AnnData | None = None) -> AutoencoderModel:
        """Load a model written by :meth:`save`, as the class of its architecture.

        Every file must be present and consistent (the gene list, the configuration's
        ``n_genes`` and the weights' shapes), and the weights a plain ``state_dict``: a file
        holding other pickled Python objects is refused, never unpickled.

        Parameters
        ----------
        dir_path
            The model directory.
        adata
            Data to bind the model to (default queries use it); another gene set is aligned
            to the saved gene list and reported. Without it every query needs ``adata=``.

        Raises
        ------
        FileNotFoundError
            ``dir_path`` is not a complete saved model.
        ValueError
            A file is unreadable, inconsistent with the others, or holds pickled objects.
        """
        path = Path(dir_path)
        required = (CONFIG_FILE, TRAIN_CONFIG_FILE, GENES_FILE, WEIGHTS_FILE)
        missing = [name for name in required if not (path / name).is_file()]
        if missing:
            what = "holds no saved model" if len(missing) == len(required) else "is incomplete"
            raise FileNotFoundError(
                f"{path} {what} ({', '.join(missing)} missing); a model directory is written "
                "by save() (or 'scvit train'). Save or train the model again."
            )
        config_dict = _read_json(path / CONFIG_FILE)
        try:
            config = config_from_dict(config_dict)
        except (KeyError, TypeError, ValueError) as err:
            raise ValueError(f"{path / CONFIG_FILE} is not a valid configuration: {err}") from None
        cls = MODEL_CLASSES[architecture_of(config)]
        meta = _read_json(path / TRAIN_CONFIG_FILE)
        try:
            train_config = TrainConfig.from_dict(meta["train_config"])
        except (KeyError, TypeError, ValueError) as err:
            raise ValueError(
                f"{path / TRAIN_CONFIG_FILE} is not a valid training configuration: {err!r}"
            ) from None
        genes = (path / GENES_FILE).read_text().splitlines()
        check_unique_genes(pd.Index(genes), source=str(path / GENES_FILE))
        if len(genes) != config.n_genes:
            raise ValueError(
                f"{path}: {GENES_FILE} lists {len(genes)} genes but {CONFIG_FILE} has "
                f"n_genes={config.n_genes}; the files come from different models. Save the "
                "model again."
            )
        state = _read_weights(path / WEIGHTS_FILE)
        if adata is None:
            model = cls.__new__(cls)
            model._build(None, genes, config, None, None, 0)
        else:
            layer = meta.get("layer")
            if layer is not None and layer not in adata.layers:
                layer = None  # the saved layer names the training data's counts
            prepared = prepare_counts(adata, genes, layer=layer)
            if prepared.alignment is None:
                model = cls(adata, config, layer=layer)
            else:
                warnings.warn(
                    f"data aligned to the model's genes: {prepared.alignment}", stacklevel=2
                )
                model = cls(prepared.adata, config)
                model.last_alignment = prepared.alignment
        model.train_config = model.module.train_config = train_config
        _load_weights(model.module.model, state, path / WEIGHTS_FILE)
        model.is_trained = bool(meta.get("is_trained", True))
        if (path / HISTORY_FILE).exists():
            model.history = pd.read_csv(path / HISTORY_FILE)
        return model


class ScViTModel(AutoencoderModel):
    """scViT (the report's model) on AnnData; see :class:`AutoencoderModel`.

    Default configuration ``ScViTConfig.for_genes(adata.n_vars)`` (the report's structure and
    legacy likelihood), raw counts as input, the reference code's training settings, in
    bfloat16 mixed precision where the hardware computes it natively (``precision="auto"``, as
    every model of the package; ``train(precision="32-true")`` for float32 everywhere).
    """

    architecture = "scvit"
    default_input_transform = "counts"


def perceiver_epochs(n_cells: int) -> int:
    """scPerceiver's default epoch budget for ``n_cells`` training cells.

    About 1,100 optimiser steps of 64 cells (``round(72,000 / n_cells)`` epochs), but between
    60 and 100 passes over each training cell, and at most ~19,000 steps
    (``round(1,200,000 / n_cells)`` epochs, at least 10), as scvi-tools'
    ``get_max_epochs_heuristic`` (``min(round(20,000 / n * 400), 400)``) caps scVI's steps
    above 20,000 cells. In steps: growing with the cells up to ~720, constant up to ~1,200,
    then growing again up to 20,000.

    Below ~720 cells the 100 passes bind: more passes over few cells memorise them. On
    lamanno2016's 193 training cells (seed 0) 60, 100, 140 and 200 epochs gave test NLL
    10,943, 10,860, 11,055 and 11,921 (train 10,743 -> 9,267; scVI 11,392), on pbmc68k's 558
    100 epochs 643.7 against 648.9 at the earlier 129, on darmanis2015's 372 100 epochs
    31,060 against 56,859 at the earlier 194 (train 26,200 and 23,963).
    Between ~720 and ~1,200 cells a fixed amount of work: on zeisel2015's 1,189 training cells
    twice the steps gained 0.15% test NLL (6,022 -> 6,013) for twice the time. With more cells
    the same steps leave likelihood on the table: on all of zeisel2015's 3,005 cells (2,400
    training, seed 0) 30, 45 and 60 epochs gave 5,952, 5,923 and 5,908
    (``benchmarks/results/perceiver_budget.txt``).
    """
    n = max(n_cells, 1)
    return int(min(max(round(72_000 / n), 60), max(round(1_200_000 / n), 10), 100))


class ScPerceiverModel(AutoencoderModel):
    """scPerceiver (the model built from the diagnosis) on AnnData; see :class:`AutoencoderModel`.

    Default configuration ``PerceiverConfig.for_genes(adata.n_vars)``, input ``log1p(counts)``
    (as scVI's encoder), AdamW at lr 3e-3 with a one-cycle schedule, batches of 64 cells, KL
    warm-up over the whole training (as scVI's 400 warm-up epochs at its default budget below
    20k cells: the KL weight reaches 1 at the last step), bfloat16 mixed precision where the
    hardware computes it natively (``precision="auto"``,
    :func:`~scvit_core.train.resolve_precision`; float32 elsewhere). ``train()`` without
    ``epochs`` uses :func:`perceiver_epochs` of the training cells. The decoder starts from
    the training cells' library-scaled null model (``init_gene_parameters``).
    """

    architecture = "perceiver"
    default_input_transform = "log1p"
    default_train = {  # noqa: RUF012 - read only
        "batch_size": 64,
        "lr": 3e-3,
        "weight_decay": 1e-4,
        "schedule": "one_cycle",
        "kl_warmup": 1.0,
    }

    def train(self, *, train_config: TrainConfig | None = None, **kwargs: Any) -> ScPerceiverModel:
        """As :meth:`AutoencoderModel.train`; ``epochs`` defaults to :func:`perceiver_epochs`."""
        if train_config is None and "epochs" not in kwargs:
            data = self._bound_data("to train it")
            n = int((data.obs[K.SPLIT] == "train").sum()) if K.SPLIT in data.obs else data.n_obs
            kwargs["epochs"] = perceiver_epochs(n)
        return super().train(train_config=train_config, **kwargs)


MODEL_CLASSES: dict[str, type[AutoencoderModel]] = {
    "scvit": ScViTModel,
    "perceiver": ScPerceiverModel,
}
"""The API class of each architecture (what :meth:`AutoencoderModel.load` returns)."""


def _counts(adata: ad.AnnData, layer: str | None):
    return adata.X if layer is None else adata.layers[layer]


def _training_cells(data: ad.AnnData) -> int:
    """The number of cells in the train split; fewer than two is an error."""
    n_train = int((data.obs[K.SPLIT].astype(str) == "train").sum())
    if n_train < 2:
        raise CountDataError(
            f"adata.obs[{K.SPLIT!r}] has {n_train} 'train' cells; training needs at least 2 "
            "(a minibatch of one cell stops batch normalisation). Assign more cells to "
            f"'train', or delete obs[{K.SPLIT!r}] to have a stratified split made."
        )
    return n_train


def _read_json(path: Path) -> dict:
    try:
        return json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise ValueError(f"{path} is not valid JSON ({err}); save the model again.") from None


def _read_weights(path: Path) -> dict[str, torch.Tensor]:
    """The ``state_dict`` in ``path``, read without unpickling anything but tensors."""
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError:
        # PyTorch's own message suggests unpickling the file: never do that with a model file
        raise ValueError(
            f"{path} holds pickled Python objects, not a plain state_dict of tensors, and is "
            "refused: unpickling a file can run arbitrary code. Save the model again with "
            "save() (it writes tensors only) from a copy you trust."
        ) from None
    except (RuntimeError, EOFError, OSError) as err:
        raise ValueError(
            f"{path} is not a readable weights file (truncated or corrupt: {err}). Save the "
            "model again."
        ) from None
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise ValueError(f"{path} holds no state_dict of tensors; save the model again.")
    return state


def _load_weights(network: torch.nn.Module, state: dict[str, torch.Tensor], path: Path) -> None:
    """``network.load_state_dict(state)``, after checking names and shapes against the config."""
    expected = network.state_dict()
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
    wrong = [k for k in expected if k in state and state[k].shape != expected[k].shape]
    if missing or unexpected or wrong:
        details = [
            f"{len(missing)} missing (e.g. {missing[0]})" if missing else "",
            f"{len(unexpected)} unexpected (e.g. {unexpected[0]})" if unexpected else "",
            f"{wrong[0]} is {tuple(state[wrong[0]].shape)}, the configuration makes it "
            f"{tuple(expected[wrong[0]].shape)}"
            if wrong
            else "",
        ]
        raise ValueError(
            f"{path} does not fit the saved configuration: {'; '.join(d for d in details if d)}. "
            "The files come from different models; save the model again."
        )
    network.load_state_dict(state)


def _move_into_place(staging: Path, path: Path) -> None:
    """Rename the complete directory ``staging`` to ``path``, keeping what else ``path`` holds.

    An existing ``path`` is first renamed aside, so at every moment ``path`` is either the old
    model, absent, or the new one; entries other than :data:`MODEL_FILES` then move over.
    """
    if not path.exists():
        staging.rename(path)
        return
    old = path.with_name(f".{path.name}.replaced-{uuid.uuid4().hex[:8]}")
    path.rename(old)
    staging.rename(path)
    for entry in old.iterdir():
        if entry.name not in MODEL_FILES:
            entry.rename(path / entry.name)
    shutil.rmtree(old)


def _with_split(adata: ad.AnnData, layer: str | None, *, store: bool, seed: int) -> ad.AnnData:
    """``adata`` with a valid ``obs["split"]``, made if absent without touching ``adata``.

    The returned object shares the count matrix with ``adata`` (no copy of the data).
    """
    if K.SPLIT in adata.obs:
        values = set(adata.obs[K.SPLIT].astype(str).unique())
        if not values <= set(K.SPLITS):
            raise ValueError(
                f"adata.obs[{K.SPLIT!r}] holds {sorted(values)}, expected values from {K.SPLITS}; "
                "fix the column, or delete it to have a stratified split made"
            )
        if layer is None:
            return adata
        return ad.AnnData(X=adata.layers[layer], obs=adata.obs[[K.SPLIT]].copy())
    labels = adata.obs[K.CELL_TYPE].to_numpy() if K.CELL_TYPE in adata.obs else None
    n_missing = int(pd.isna(labels).sum()) if labels is not None else 0
    if n_missing:
        warnings.warn(
            f"adata.obs[{K.CELL_TYPE!r}] has {n_missing} missing labels; the split made here "
            "keeps those cells together as one more label",
            stacklevel=3,
        )
    split = pd.Categorical(stratified_split(labels, adata.n_obs, seed=seed), categories=K.SPLITS)
    if store:
        adata.obs[K.SPLIT] = split
    obs = pd.DataFrame({K.SPLIT: split}, index=adata.obs_names.copy())
    if K.CELL_TYPE in adata.obs:
        obs[K.CELL_TYPE] = adata.obs[K.CELL_TYPE].to_numpy()  # any dtype: label_codes reads it
    return ad.AnnData(X=_counts(adata, layer), obs=obs)


def _in_row_order(
    chunks: list[np.ndarray], rows: list[np.ndarray], width: int, dtype=np.float32
) -> np.ndarray:
    """Stack batch results and put them in the order of the selected cells."""
    if not chunks:
        return np.zeros((0, width), dtype=dtype)
    values = np.concatenate(chunks).astype(dtype, copy=False)
    index = np.concatenate(rows)
    return values[np.argsort(index, kind="stable")]
