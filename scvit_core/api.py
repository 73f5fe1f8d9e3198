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
Data with another gene set are aligned to the model's gene list with
:func:`scvit_core.align_genes` and the change is reported as a warning.
"""

from __future__ import annotations

import json
import warnings
from pathlib import Path
from typing import Any

import anndata as ad
import numpy as np
import pandas as pd
import torch

from scvit_core import _constants as K
from scvit_core.architectures import AnyConfig, architecture_of, config_for_genes, config_from_dict
from scvit_core.data import (
    GeneAlignment,
    align_genes,
    count_dataloader,
    stratified_split,
    validate_counts,
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
        self.adata = adata
        self.layer = layer
        self.genes: list[str] = [str(g) for g in adata.var_names]
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
        adata = self.adata
        validate_counts(_counts(adata, self.layer), source=_source(self.layer))
        data = _with_split(adata, self.layer, store=store_split, seed=split_seed)
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
            seed=cfg.seed,
            num_workers=cfg.num_workers,
        )
        has_val = (data.obs[K.SPLIT] == "validation").any()
        val_loader = (
            count_dataloader(
                data, split="validation", batch_size=cfg.batch_size, num_workers=cfg.num_workers
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

        null = fit_null_nb(data, library_scaled=True, split="train")
        train = data.X[np.flatnonzero(data.obs[K.SPLIT].to_numpy() == "train")]
        library = float(np.median(np.asarray(train.sum(1)).ravel()))
        init(torch.as_tensor(null.gene_param), torch.as_tensor(null.theta), library)

    # inference -----------------------------------------------------------------------------

    def _prepare(self, adata: ad.AnnData | None, *, require_integer: bool) -> ad.AnnData:
        """The data in the model's gene order (aligned and reported if needed), counts in X."""
        adata = self.adata if adata is None else adata
        layer = self.layer if adata is self.adata else None
        if [str(g) for g in adata.var_names] != self.genes:
            adata, report = align_genes(adata, self.genes, layer=layer)
            layer = None
            self.last_alignment = report
            warnings.warn(f"data aligned to the model's genes: {report}", stacklevel=3)
        validate_counts(
            _counts(adata, layer),
            source=_source(layer),
            require_integer=require_integer,
            allow_empty_cells=True,
        )
        if layer is not None:
            adata = ad.AnnData(X=adata.layers[layer], obs=adata.obs)
        return adata

    def _batches(self, adata: ad.AnnData, split: str | None, batch_size: int):
        if split is not None and K.SPLIT not in adata.obs:
            raise KeyError(
                f"split={split!r} needs adata.obs[{K.SPLIT!r}]; load the data with "
                "scvit_core.load_dataset or add one with scvit_core.add_split."
            )
        return count_dataloader(adata, split=split, batch_size=batch_size)

    @torch.inference_mode()
    def get_latent_representation(
        self,
        adata: ad.AnnData | None = None,
        *,
        split: str | None = None,
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
        target = self.adata if adata is None else adata
        data = self._prepare(target, require_integer=False)
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
    def get_reconstruction_error(
        self,
        adata: ad.AnnData | None = None,
        *,
        split: str | None = None,
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
        data = self._prepare(adata, require_integer=True)
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
        """
        path = Path(dir_path)
        if (path / WEIGHTS_FILE).exists() and not overwrite:
            raise FileExistsError(f"{path} already holds a model; pass overwrite=True")
        path.mkdir(parents=True, exist_ok=True)
        (path / CONFIG_FILE).write_text(json.dumps(self.config.to_dict(), indent=2))
        meta = {"train_config": self.train_config.to_dict(), "layer": self.layer}
        meta["is_trained"] = self.is_trained
        (path / TRAIN_CONFIG_FILE).write_text(json.dumps(meta, indent=2))
        (path / GENES_FILE).write_text("\n".join(self.genes) + "\n")
        state = {k: v.detach().cpu() for k, v in self.module.model.state_dict().items()}
        torch.save(state, path / WEIGHTS_FILE)
        self.history.to_csv(path / HISTORY_FILE, index=False)
        return path

    @classmethod
    def load(cls, dir_path: str | Path, adata: ad.AnnData | None = None) -> AutoencoderModel:
        """Load a model written by :meth:`save`, as the class of its architecture.

        Parameters
        ----------
        dir_path
            The model directory.
        adata
            Data to bind the model to (default queries use it); another gene set is aligned
            to the saved gene list and reported. Without it the model is bound to an empty
            AnnData with the saved genes and every query needs ``adata=``.
        """
        path = Path(dir_path)
        if not (path / WEIGHTS_FILE).exists():
            raise FileNotFoundError(f"{path} holds no saved scViT model ({WEIGHTS_FILE} missing)")
        config = config_from_dict(json.loads((path / CONFIG_FILE).read_text()))
        cls = MODEL_CLASSES[architecture_of(config)]
        meta = json.loads((path / TRAIN_CONFIG_FILE).read_text())
        genes = (path / GENES_FILE).read_text().splitlines()
        layer = meta.get("layer")
        if adata is None:
            bound = ad.AnnData(
                X=np.zeros((0, len(genes)), dtype=np.float32), var=pd.DataFrame(index=genes)
            )
            layer = None
        elif [str(g) for g in adata.var_names] != genes:
            bound, report = align_genes(adata, genes, layer=layer)
            layer = None
            warnings.warn(f"data aligned to the model's genes: {report}", stacklevel=2)
        else:
            bound = adata
        model = cls(bound, config, layer=layer)
        model.train_config = TrainConfig.from_dict(meta["train_config"])
        model.module.train_config = model.train_config
        state = torch.load(path / WEIGHTS_FILE, map_location="cpu", weights_only=True)
        model.module.model.load_state_dict(state)
        model.is_trained = bool(meta.get("is_trained", True))
        if (path / HISTORY_FILE).exists():
            model.history = pd.read_csv(path / HISTORY_FILE)
        return model


class ScViTModel(AutoencoderModel):
    """scViT (the report's model) on AnnData; see :class:`AutoencoderModel`.

    Default configuration ``ScViTConfig.for_genes(adata.n_vars)`` (the report's structure and
    legacy likelihood), raw counts as input, the reference code's training settings.
    """

    architecture = "scvit"
    default_input_transform = "counts"


def perceiver_epochs(n_cells: int) -> int:
    """scPerceiver's default epoch budget for ``n_cells`` training cells.

    ``round(72,000 / n_cells)`` epochs (about 1,100 optimiser steps of 64 cells), at least 10
    and at most 200: a fixed amount of work per model rather than per cell, as scvi-tools'
    ``get_max_epochs_heuristic`` (``min(round(20,000 / n * 400), 400)``) caps scVI's. It is
    chosen to cost about scVI's default budget in wall time; on zeisel2015 (1,189 training
    cells, seed 0) 2.5 times more steps (151 epochs) overfit: test NLL 6,267 against 6,173.
    """
    return int(min(max(round(72_000 / max(n_cells, 1)), 10), 200))


class ScPerceiverModel(AutoencoderModel):
    """scPerceiver (the model built from the diagnosis) on AnnData; see :class:`AutoencoderModel`.

    Default configuration ``PerceiverConfig.for_genes(adata.n_vars)``, input ``log1p(counts)``
    (as scVI's encoder), AdamW at lr 3e-3 with a one-cycle schedule, batches of 64 cells, KL
    warm-up over the first half of training. ``train()`` without ``epochs`` uses
    :func:`perceiver_epochs` of the training cells. The decoder starts from the training
    cells' library-scaled null model (``init_gene_parameters``).
    """

    architecture = "perceiver"
    default_input_transform = "log1p"
    default_train = {  # noqa: RUF012 - read only
        "batch_size": 64,
        "lr": 3e-3,
        "weight_decay": 1e-4,
        "schedule": "one_cycle",
        "kl_warmup": 0.5,
    }

    def train(self, *, train_config: TrainConfig | None = None, **kwargs: Any) -> ScPerceiverModel:
        """As :meth:`AutoencoderModel.train`; ``epochs`` defaults to :func:`perceiver_epochs`."""
        if train_config is None and "epochs" not in kwargs:
            data = self.adata
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


def _source(layer: str | None) -> str:
    return "adata.X" if layer is None else f"adata.layers[{layer!r}]"


def _with_split(adata: ad.AnnData, layer: str | None, *, store: bool, seed: int) -> ad.AnnData:
    """``adata`` with a valid ``obs["split"]``, made if absent without touching ``adata``.

    The returned object shares the count matrix with ``adata`` (no copy of the data).
    """
    if K.SPLIT in adata.obs:
        values = set(adata.obs[K.SPLIT].astype(str).unique())
        if not values <= set(K.SPLITS):
            raise ValueError(
                f"adata.obs[{K.SPLIT!r}] holds {sorted(values)}, expected values from {K.SPLITS}"
            )
        if layer is None:
            return adata
        return ad.AnnData(X=adata.layers[layer], obs=adata.obs[[K.SPLIT]].copy())
    labels = adata.obs[K.CELL_TYPE].to_numpy() if K.CELL_TYPE in adata.obs else None
    split = pd.Categorical(stratified_split(labels, adata.n_obs, seed=seed), categories=K.SPLITS)
    if store:
        adata.obs[K.SPLIT] = split
    obs = pd.DataFrame({K.SPLIT: split}, index=adata.obs_names.copy())
    if K.CELL_TYPE in adata.obs:
        obs[K.CELL_TYPE] = pd.Categorical(adata.obs[K.CELL_TYPE].to_numpy())
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
