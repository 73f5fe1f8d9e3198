"""scPerceiver against scVI at scVI's own default budget, side by side, on any labelled counts.

::

    python benchmarks/versus_scvi.py --dataset zeisel2015 --seeds 3
    python benchmarks/versus_scvi.py --dataset path/to/data.h5ad --labels-key celltype
    python benchmarks/versus_scvi.py --dataset zeisel2015 --model scvi-networks

For each seed both models train on the same cells of the stored split (a label-stratified
subsample of at most ``--max-cells`` cells, the cpu profile's 1,500 by default), one after the
other in this process, and are scored on the same test cells under the evaluation protocol:
the test NLL at the posterior mean (and at one posterior sample, scvi-tools' reading), and the
report's MLP, kNN and logistic-regression accuracy on the latent. scVI trains for scvi-tools'
``get_max_epochs_heuristic`` epochs (400 below 20k cells) with ``n_latent=64``; scPerceiver
for its own default budget (:func:`scvit_core.api.perceiver_epochs`). ``--model
scvi-networks`` trains scVI's encoder and decoder under scPerceiver's count model and training
(:data:`scvit_core.perceiver.SCVI_NETWORKS`, chapter 08's third model) in its place. One
table row per model and seed is printed, then exactly one line::

    RESULT dataset=<name> model=<scperceiver or scvi-networks> nll=<x> scvi_nll=<y> mlp=<a>
        scvi_mlp=<b> knn=<c> scvi_knn=<d> time_ratio=<the model's / scVI's training wall time>

(on one line; means over seeds; NLL at the posterior mean).
"""

from __future__ import annotations

import argparse
import logging
import time
import warnings
from pathlib import Path

import numpy as np
import pandas as pd


def load(dataset: str, *, labels_key: str | None, max_cells: int):
    from scvit_core import _constants as K
    from scvit_core.data import load_dataset, stratified_subsample

    adata = load_dataset(dataset, labels_key=labels_key, empty_cells="drop")
    if K.CELL_TYPE not in adata.obs:
        raise SystemExit(
            f"error: {dataset} has no labels; pass --labels-key with the obs column of cell types"
        )
    if adata.n_obs > max_cells:
        adata = adata[stratified_subsample(adata.obs[K.CELL_TYPE], max_cells)].copy()
    return adata


def readouts(adata, latent: np.ndarray, seed: int) -> dict[str, float]:
    """The latent's MLP, kNN and logistic-regression accuracy of the cell type on the test cells.

    Where ``adata`` has finer labels (``obs["cell_type_fine"]``, e.g. zeisel2015's 48 minor
    types) the MLP's accuracy on them is added as ``mlp_fine``.
    """
    from scvit_core import _constants as K
    from scvit_core.evaluate import evaluate_embedding

    keys = [K.CELL_TYPE] + [K.CELL_TYPE_FINE] * (K.CELL_TYPE_FINE in adata.obs)
    table = evaluate_embedding(adata, latent, label_keys=keys, seed=seed, scib=False)
    values = table.set_index(["label_key", "metric"])["value"]
    row = {k: float(values[K.CELL_TYPE, f"{k}_accuracy"]) for k in ("mlp", "knn", "logreg")}
    if len(keys) > 1:
        row["mlp_fine"] = float(values[K.CELL_TYPE_FINE, "mlp_accuracy"])
    return row


MODELS = ("scperceiver", "scvi-networks")
"""What ``--model`` trains against scVI: scPerceiver, or scVI's networks under its count model."""


def fit_perceiver(adata, seed: int, model_name: str = "scperceiver"):
    """scPerceiver (or ``"scvi-networks"``) at its defaults and default budget:
    ``(model, training wall time in s)``."""
    from scvit_core.api import ScPerceiverModel
    from scvit_core.perceiver import SCVI_NETWORKS

    overrides = SCVI_NETWORKS if model_name == "scvi-networks" else {}
    model = ScPerceiverModel(adata, seed=seed, **overrides)
    start = time.perf_counter()
    model.train(seed=seed, enable_progress_bar=False)
    return model, time.perf_counter() - start


def fit_scvi(adata, seed: int):
    """scVI at scvi-tools' default budget with ``n_latent=64``: ``(SCVIResult, epochs)``."""
    from scvi.model._utils import get_max_epochs_heuristic

    from scvit_core import _constants as K
    from scvit_core.baselines import train_scvi

    n_train = int((adata.obs[K.SPLIT] == "train").sum())
    epochs = get_max_epochs_heuristic(n_train)
    return train_scvi(adata, max_epochs=epochs, seed=seed, n_latent=64), epochs


def run_perceiver(adata, seed: int, model_name: str = "scperceiver") -> dict[str, float]:
    model, wall = fit_perceiver(adata, seed, model_name)
    row = {
        "epochs": int(model.train_config.epochs),
        "time_s": wall,
        "nll": model.get_reconstruction_error(split="test")["reconstruction_loss"],
        "nll_sample": model.get_reconstruction_error(split="test", sample=True, seed=seed)[
            "reconstruction_loss"
        ],
    }
    return row | readouts(adata, model.get_latent_representation(), seed)


def run_scvi(adata, seed: int) -> dict[str, float]:
    from scvit_core.baselines import scvi_latent, scvi_reconstruction_error

    result, epochs = fit_scvi(adata, seed)
    row = {"epochs": epochs, "time_s": result.wall_time_s}
    for posterior, key in (("mean", "nll"), ("sample", "nll_sample")):
        row[key] = scvi_reconstruction_error(
            result.model, adata, split="test", posterior=posterior, seed=seed
        )["reconstruction_loss"]
    return row | readouts(adata, scvi_latent(result.model, adata, split=None), seed)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--dataset", default="zeisel2015", help="dataset name or .h5ad path")
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--labels-key", default=None, help="obs column of cell types")
    parser.add_argument("--max-cells", type=int, default=1500, help="stratified subsample")
    parser.add_argument(
        "--model",
        choices=MODELS,
        default="scperceiver",
        help="scperceiver, or scVI's networks under scPerceiver's count model (scvi-networks)",
    )
    args = parser.parse_args()

    from scvit_core.train import quiet_lightning

    warnings.filterwarnings("ignore")
    logging.getLogger("scvi").setLevel(logging.ERROR)
    adata = load(args.dataset, labels_key=args.labels_key, max_cells=args.max_cells)
    name = Path(args.dataset).stem if args.dataset.endswith(".h5ad") else args.dataset
    print(f"{name}: {adata.n_obs:,} cells x {adata.n_vars:,} genes, {args.seeds} seed(s)")
    rows = []
    for seed in range(args.seeds):
        for model in (args.model, "scvi"):
            with quiet_lightning(True):
                if model == "scvi":
                    fields = run_scvi(adata, seed)
                else:
                    fields = run_perceiver(adata, seed, model)
                row = {"model": model, "seed": seed} | fields
            rows.append(row)
            print(
                "  ".join(
                    f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in row.items()
                ),
                flush=True,
            )
    table = pd.DataFrame(rows)
    means = table.groupby("model").mean(numeric_only=True)
    print(means.round(4).to_string())
    new, ref = means.loc[args.model], means.loc["scvi"]
    print(
        f"RESULT dataset={name} model={args.model} nll={new['nll']:.2f} scvi_nll={ref['nll']:.2f} "
        f"mlp={new['mlp']:.4f} scvi_mlp={ref['mlp']:.4f} knn={new['knn']:.4f} "
        f"scvi_knn={ref['knn']:.4f} time_ratio={new['time_s'] / ref['time_s']:.3f}"
    )


if __name__ == "__main__":
    main()
