"""The ``scvit`` command line: ``train``, ``embed``, ``evaluate`` and ``diagnose``.

::

    scvit train zeisel2015 --epochs 10 --out runs/zeisel
    scvit train zeisel2015 --epochs 10 --out runs/zeisel --resume   # after a crash
    scvit train zeisel2015 --model perceiver --out runs/zeisel-perceiver
    scvit embed runs/zeisel zeisel2015 --out latent.h5ad
    scvit evaluate runs/zeisel zeisel2015
    scvit diagnose runs/zeisel zeisel2015 --out runs/zeisel/diagnosis

Bad input (not raw counts, unknown dataset, missing files, ...) prints one line
``error: ...`` and exits with status 2; a NaN loss during training exits with status 1.
"""

from __future__ import annotations

import argparse
import logging
import sys
import warnings
from pathlib import Path

import numpy as np

from scvit_core.data import CountDataError


def _load(data: str, *, layer: str | None, max_cells: int | None, seed: int, backed=False):
    from scvit_core import _constants as K
    from scvit_core.data import load_dataset, stratified_subsample

    adata = load_dataset(data, layer=layer, backed=backed)
    if max_cells is not None and max_cells < adata.n_obs:
        labels = adata.obs[K.CELL_TYPE] if K.CELL_TYPE in adata.obs else np.zeros(adata.n_obs)
        subset = adata[stratified_subsample(labels, max_cells, seed=seed)]
        adata = subset.to_memory() if adata.isbacked else subset.copy()
    where = " (on disk)" if adata.isbacked else ""
    if _rank() == 0:
        print(
            f"data: {data}: {adata.n_obs:,} cells x {adata.n_vars:,} genes{where}", file=sys.stderr
        )
    return adata


def _rank() -> int:
    """This process's global rank when Lightning started it for DDP (0 otherwise)."""
    import os

    return int(os.environ.get("RANK", os.environ.get("LOCAL_RANK", "0")))


def _config(args: argparse.Namespace, n_genes: int):
    from scvit_core.config import ScViTConfig

    if args.model == "perceiver":
        from scvit_core.perceiver import SCVI_NETWORKS, PerceiverConfig

        if args.no_attention and args.mlp in ("both", "scvi"):
            raise ValueError(
                f"--no-attention changes nothing with --mlp {args.mlp} (no attention is left); "
                "drop one of them"
            )
        overrides = dict(attention=not args.no_attention)
        if args.likelihood is not None:
            overrides["likelihood"] = args.likelihood
        if args.mlp == "scvi":
            overrides.update(SCVI_NETWORKS)
        for side in ("encoder", "decoder"):
            if args.mlp in (side, "both"):
                overrides[side] = "mlp"
        if args.no_conv_stem or args.shared_linear or args.extra_convs or args.width != 1.0:
            raise ValueError(
                "--no-conv-stem, --shared-linear, --extra-convs and --width are scViT's "
                "switches; scPerceiver has none of them (drop them or use --model scvit)"
            )
        return PerceiverConfig.for_genes(n_genes, **overrides)
    if args.mlp is not None:
        raise ValueError("--mlp is scPerceiver's switch; add --model perceiver or drop it")
    overrides = dict(likelihood=args.likelihood or "legacy", library_scaling=args.library_scaling)
    overrides.update(
        attention=not args.no_attention,
        conv_stem=not args.no_conv_stem,
        patchwise=not args.shared_linear,
        extra_convs=args.extra_convs,
    )
    if args.preset == "paper":
        return ScViTConfig.paper(**overrides, width=args.width)
    if args.preset == "small":
        return ScViTConfig.small(n_genes, **overrides)
    return ScViTConfig.for_genes(n_genes, width=args.width, **overrides)


def cmd_train(args: argparse.Namespace) -> int:
    from scvit_core.api import MODEL_CLASSES

    out = Path(args.out)
    if (out / "model.pt").exists() and not args.overwrite:
        raise FileExistsError(f"{out} already holds a model; pass --overwrite")
    checkpoint = out / "training" / "checkpoints" / "last.ckpt"
    if args.resume and not checkpoint.exists():
        raise FileNotFoundError(f"--resume: no checkpoint {checkpoint}; run without --resume")
    adata = _load(
        args.data, layer=args.layer, max_cells=args.max_cells, seed=args.seed, backed=args.backed
    )
    config = _config(args, adata.n_vars)
    model = MODEL_CLASSES[args.model](adata, config, seed=args.seed)
    if _rank() == 0:
        print(model, file=sys.stderr)
    if args.resume:
        print(f"resuming from {checkpoint}", file=sys.stderr)
    # options left unset keep the model's own defaults (scViT: the reference code's)
    given = dict(
        epochs=args.epochs,
        batch_size=args.batch_size,
        lr=args.lr,
        input_transform=args.input_transform,
        precision=args.precision,
    )
    model.train(
        **{k: v for k, v in given.items() if v is not None},
        seed=args.seed,
        early_stopping_patience=args.patience,
        accelerator=args.accelerator,
        devices=args.devices,
        strategy=args.strategy,
        num_nodes=args.num_nodes,
        chunk_size=args.chunk_size,
        checkpoint_interval_s=args.checkpoint_every,
        enable_progress_bar=not args.no_progress,
        output_dir=out / "training",
        ckpt_path=checkpoint if args.resume else None,
    )
    if model.train_result.global_rank != 0:
        return 0  # under DDP rank 0 writes the model and reports
    model.save(out, overwrite=args.overwrite)
    print(model.history.to_string(index=False), file=sys.stderr)
    print(f"saved model to {out}")
    return 0


def cmd_embed(args: argparse.Namespace) -> int:
    import pandas as pd

    from scvit_core import _constants as K
    from scvit_core.api import ScViTModel

    out = Path(args.out)
    source = Path(args.data)
    if source.exists() and out.resolve() == source.resolve():
        raise ValueError(f"--out {out} is the input file; the input is never overwritten")
    if out.exists() and not args.overwrite:
        raise FileExistsError(f"{out} exists; pass --overwrite")
    if out.suffix not in (".h5ad", ".npy", ".csv"):
        raise ValueError(f"--out must end in .h5ad, .npy or .csv, got {out.name!r}")
    adata = _load(args.data, layer=args.layer, max_cells=None, seed=0, backed=args.backed)
    model = ScViTModel.load(args.model)
    out.parent.mkdir(parents=True, exist_ok=True)
    if adata.isbacked and out.suffix == ".h5ad":
        model.write_latent_representation(out, adata, split=args.split)
        print(f"wrote the latent of {adata.n_obs:,} cells to {out}, batch by batch")
        return 0
    z = model.get_latent_representation(adata, split=args.split)
    keep = np.ones(adata.n_obs, bool) if args.split is None else adata.obs[K.SPLIT] == args.split
    names = adata.obs_names[np.asarray(keep)]
    out.parent.mkdir(parents=True, exist_ok=True)
    if out.suffix == ".npy":
        np.save(out, z)
    elif out.suffix == ".csv":
        columns = [f"z{i}" for i in range(z.shape[1])]
        pd.DataFrame(z, index=names, columns=columns).to_csv(out)
    else:
        result = adata[np.asarray(keep)].copy()
        result.obsm[K.LATENT] = z
        result.write_h5ad(out)
    print(f"wrote {z.shape[0]:,} x {z.shape[1]} latent to {out}")
    return 0


def cmd_evaluate(args: argparse.Namespace) -> int:
    from scvit_core import _constants as K
    from scvit_core.api import ScViTModel

    adata = _load(args.data, layer=args.layer, max_cells=args.max_cells, seed=0)
    model = ScViTModel.load(args.model)
    if K.SPLIT not in adata.obs:
        raise CountDataError(f"the data have no obs[{K.SPLIT!r}] column to pick test cells from")
    error = model.get_reconstruction_error(adata, split=args.split)
    n = int((adata.obs[K.SPLIT] == args.split).sum())
    print(f"reconstruction_loss ({args.split}, {n:,} cells): {error['reconstruction_loss']:.2f}")
    if K.CELL_TYPE in adata.obs:
        from sklearn.neighbors import KNeighborsClassifier

        z_train = model.get_latent_representation(adata, split="train")
        z_test = model.get_latent_representation(adata, split=args.split)
        labels = adata.obs[K.CELL_TYPE].astype(str)
        y_train = labels[adata.obs[K.SPLIT] == "train"].to_numpy()
        y_test = labels[adata.obs[K.SPLIT] == args.split].to_numpy()
        knn = KNeighborsClassifier(n_neighbors=min(15, len(y_train))).fit(z_train, y_train)
        accuracy = float((knn.predict(z_test) == y_test).mean())
        print(f"knn_accuracy (15-NN, train -> {args.split}): {accuracy:.4f}")
    return 0


def cmd_diagnose(args: argparse.Namespace) -> int:
    from scvit_core.api import ScViTModel

    out = Path(args.out)
    if out.exists() and any(out.iterdir()) and not args.overwrite:
        raise FileExistsError(f"{out} is not empty; pass --overwrite")
    from interpret import diagnose  # the optional `interpret` extra

    adata = _load(args.data, layer=args.layer, max_cells=None, seed=args.seed)
    model = ScViTModel.load(args.model, adata)
    report = diagnose(
        model,
        adata,
        max_cells=args.max_cells,
        attribution_cells=args.attribution_cells,
        seed=args.seed,
        progress=not args.no_progress,
    )
    report.save(out)
    for name, value in report.headline().items():
        print(f"{name}: {value:.4g}")
    print(f"wrote {len(report.tables)} tables and their figures to {out}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    """The ``scvit`` argument parser."""
    parser = argparse.ArgumentParser(prog="scvit", description=__doc__.split("\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)

    train = sub.add_parser("train", help="train a model on a dataset name or .h5ad file")
    train.add_argument("data", help="dataset name (e.g. zeisel2015) or path to an .h5ad file")
    train.add_argument("--out", required=True, help="model directory to write")
    train.add_argument("--overwrite", action="store_true")
    train.add_argument(
        "--resume",
        action="store_true",
        help="continue an interrupted run from its last checkpoint (same options)",
    )
    train.add_argument("--layer", default=None, help="layer with the raw counts (default X)")
    train.add_argument("--max-cells", type=int, default=None, help="stratified subsample")
    train.add_argument(
        "--model",
        choices=("scvit", "perceiver"),
        default="scvit",
        help="scvit (the report's model) or perceiver (scPerceiver, built from the diagnosis)",
    )
    train.add_argument("--preset", choices=("default", "paper", "small"), default="default")
    train.add_argument(
        "--likelihood",
        choices=("legacy", "corrected", "nb"),
        default=None,
        help="default: legacy for scvit, nb for perceiver",
    )
    train.add_argument("--library-scaling", action="store_true")
    train.add_argument("--no-attention", action="store_true")
    train.add_argument("--no-conv-stem", action="store_true")
    train.add_argument(
        "--mlp",
        choices=("encoder", "decoder", "both", "scvi"),
        default=None,
        help="perceiver: scVI's shape of MLP (LayerNorm) in place of the attention encoder, "
        "decoder or both; scvi: scVI's encoder and decoder exactly (BatchNorm, Dropout(0.1))",
    )
    train.add_argument("--shared-linear", action="store_true", help="one linear for all tokens")
    train.add_argument("--extra-convs", type=int, default=0)
    train.add_argument("--width", type=float, default=1.0, help="bigger model: width > 1")
    train.add_argument(
        "--input-transform",
        choices=("counts", "log1p", "log1p_norm"),
        default=None,
        help="default: counts for scvit, log1p for perceiver",
    )
    train.add_argument(
        "--epochs", type=int, default=None, help="default: 10 (scvit), its own budget (perceiver)"
    )
    train.add_argument("--batch-size", type=int, default=None, help="default: 256 / 64")
    train.add_argument("--lr", type=float, default=None, help="default: 0.005 / 0.003")
    train.add_argument("--seed", type=int, default=0)
    train.add_argument("--patience", type=int, default=None, help="early stopping patience")
    train.add_argument("--backed", action="store_true", help="read an .h5ad from disk in batches")
    train.add_argument(
        "--chunk-size",
        type=int,
        default=None,
        help="shuffle chunks of this many consecutive cells (suits --backed); default: cells",
    )
    train.add_argument("--accelerator", default="auto", help="cpu, gpu, ... (Lightning's)")
    train.add_argument("--devices", default="auto", help="processes per node, e.g. 2")
    train.add_argument("--strategy", default="auto", help="e.g. ddp (one process per device)")
    train.add_argument("--num-nodes", type=int, default=1, help="machines (SLURM or torchrun)")
    train.add_argument(
        "--precision",
        help="Lightning's (32-true, bf16-mixed, ...) or auto (bf16-mixed where the hardware "
        "computes bfloat16 natively, the default)",
    )
    train.add_argument(
        "--checkpoint-every",
        type=float,
        default=30.0,
        metavar="SECONDS",
        help="write checkpoints (for --resume) at most this often, and at the end; 0: every epoch",
    )
    train.add_argument("--no-progress", action="store_true", help="no progress bar")
    train.set_defaults(func=cmd_train)

    embed = sub.add_parser("embed", help="write the latent representation of a dataset")
    embed.add_argument("model", help="model directory written by 'scvit train'")
    embed.add_argument("data", help="dataset name or .h5ad path")
    embed.add_argument("--out", required=True, help="output .h5ad, .npy or .csv")
    embed.add_argument("--split", choices=("train", "validation", "test"), default=None)
    embed.add_argument("--layer", default=None)
    embed.add_argument(
        "--backed",
        action="store_true",
        help="read the .h5ad from disk; an .h5ad --out is "
        "then written batch by batch (obs and obsm['X_scvit'], no counts)",
    )
    embed.add_argument("--overwrite", action="store_true")
    embed.set_defaults(func=cmd_embed)

    evaluate = sub.add_parser("evaluate", help="test reconstruction error and kNN accuracy")
    evaluate.add_argument("model", help="model directory written by 'scvit train'")
    evaluate.add_argument("data", help="dataset name or .h5ad path")
    evaluate.add_argument("--split", choices=("validation", "test"), default="test")
    evaluate.add_argument("--layer", default=None)
    evaluate.add_argument("--max-cells", type=int, default=None)
    evaluate.set_defaults(func=cmd_evaluate)

    diag = sub.add_parser(
        "diagnose", help="attention, attribution and representation diagnostics of a model"
    )
    diag.add_argument("model", help="model directory written by 'scvit train'")
    diag.add_argument("data", help="dataset name or .h5ad path (with obs 'split', 'cell_type')")
    diag.add_argument("--out", required=True, help="directory for the tables and figures")
    diag.add_argument("--overwrite", action="store_true")
    diag.add_argument("--layer", default=None)
    diag.add_argument("--max-cells", type=int, default=1000, help="cells diagnosed")
    diag.add_argument("--attribution-cells", type=int, default=16, help="test cells explained")
    diag.add_argument("--seed", type=int, default=0, help="seed of the training run")
    diag.add_argument("--no-progress", action="store_true", help="no progress bar")
    diag.set_defaults(func=cmd_diagnose)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Entry point of ``scvit``; returns the exit status."""
    args = build_parser().parse_args(argv)
    if getattr(args, "devices", None) not in (None, "auto"):
        args.devices = int(args.devices) if str(args.devices).isdigit() else args.devices
    # Lightning sets its loggers' levels when it is first imported: import it before quieting
    # its start-up notices (accelerator summary, tips), keeping warnings and errors.
    from scvit_core.train import NonFiniteLossError

    for name in ("lightning.pytorch", "lightning.fabric"):
        logging.getLogger(name).setLevel(logging.WARNING)
    warnings.filterwarnings("ignore", category=DeprecationWarning)
    warnings.filterwarnings("ignore", message=".*is deprecated.*")

    try:
        return args.func(args)
    except NonFiniteLossError as err:
        print(f"error: {err}", file=sys.stderr)
        return 1
    except (CountDataError, FileNotFoundError, FileExistsError, KeyError, ValueError) as err:
        message = str(err).strip("'\"").replace("\n", " ")
        print(f"error: {message}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
