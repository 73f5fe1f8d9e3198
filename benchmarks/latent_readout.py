"""Is a latent's MLP accuracy limited by the report's classifier or by the latent itself?

::

    python benchmarks/latent_readout.py zeisel2015 [SEED] [--max-cells N] [--labels-key KEY]

Trains scPerceiver (its defaults) and scVI (scvi-tools' default budget, ``n_latent=64``) on the
cells of :func:`versus_scvi.load`, as ``versus_scvi.py`` does, fits PCA-64 on the training
cells' log-normalised counts, then reads each latent, for the cell type and (where the dataset
has them, as zeisel2015's 48) the minor types, with the
report's MLP four ways: as the protocol does (raw latent, 10 epochs), on the latent
standardised per dimension (the training cells' mean and sd), for 100 epochs, and both; each
over 5 classifier seeds, with the test cells' accuracy's mean and sd. A gap that closes with
standardisation or a longer budget is the classifier's (the latent's scale); one that stays is
the latent's. Also prints the spread of the latent's dimensions, the 15-nearest-neighbour
accuracy on the raw and the standardised latent and, for the finer labels, the protocol's
accuracy within each major type (mean over classifier seeds, with its number of test cells).
"""

from __future__ import annotations

import argparse
import logging
import sys
import warnings
from pathlib import Path

import numpy as np
import pandas as pd

sys.path.insert(0, str(Path(__file__).resolve().parent))


def main() -> None:
    from versus_scvi import fit_perceiver, fit_scvi, load

    from scvit_core import _constants as K
    from scvit_core.baselines import pca_baseline, scvi_latent
    from scvit_core.train import quiet_lightning

    warnings.filterwarnings("ignore")
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("dataset")
    parser.add_argument("seed", type=int, nargs="?", default=0)
    parser.add_argument("--max-cells", type=int, default=1500, help="stratified subsample")
    parser.add_argument("--labels-key", default=None, help="obs column of cell types")
    args = parser.parse_args()
    adata = load(args.dataset, labels_key=args.labels_key, max_cells=args.max_cells)
    train = (adata.obs[K.SPLIT] == "train").to_numpy()

    with quiet_lightning(True):
        model, _ = fit_perceiver(adata, args.seed)
        logging.disable(logging.WARNING)
        result, _ = fit_scvi(adata, args.seed)
    latents = {
        "scperceiver": model.get_latent_representation(),
        "scvi": scvi_latent(result.model, adata, split=None),
    }
    pca = pca_baseline(adata, n_components=64, seed=args.seed)
    latents["pca-64"] = np.zeros((adata.n_obs, pca["train"].shape[1]), dtype=np.float32)
    for split in K.SPLITS:
        latents["pca-64"][(adata.obs[K.SPLIT] == split).to_numpy()] = pca[split]
    label_keys = [k for k in (K.CELL_TYPE, K.CELL_TYPE_FINE) if k in adata.obs]

    for name, z in latents.items():
        z = np.asarray(z, dtype=np.float32)
        sd = z[train].std(0)
        print(
            f"{name}: mean |z| {np.abs(z).mean():.3f}, sd per dimension min/median/max "
            f"{sd.min():.3f}/{np.median(sd):.3f}/{sd.max():.3f}"
        )
        standardised = (z - z[train].mean(0)) / (sd + 1e-6)
        for key in label_keys:
            read_latent(adata, key, z, standardised)


def read_latent(adata, key: str, z: np.ndarray, standardised: np.ndarray) -> None:
    """Print the MLP's accuracy four ways and the kNN's two ways for one label column."""
    from sklearn.neighbors import KNeighborsClassifier

    from scvit_core import _constants as K
    from scvit_core.evaluate import mlp_predict

    codes = adata.obs[key].astype("category").cat.codes.to_numpy()
    train = (adata.obs[K.SPLIT] == "train").to_numpy()
    test = (adata.obs[K.SPLIT] == "test").to_numpy()
    print(f"  {key} ({codes.max() + 1} types)")
    for label, latent, mlp_epochs in (
        ("protocol (raw, 10 epochs)", z, 10),
        ("standardised, 10 epochs", standardised, 10),
        ("raw, 100 epochs", z, 100),
        ("standardised, 100 epochs", standardised, 100),
    ):
        correct = np.array(
            [
                mlp_predict(
                    latent[train],
                    codes[train],
                    latent[test],
                    n_classes=int(codes.max()) + 1,
                    epochs=mlp_epochs,
                    seed=s,
                )
                == codes[test]
                for s in range(5)
            ]
        )  # (classifier seeds, test cells)
        accuracy = correct.mean(1)
        print(
            f"    MLP {label:26s} {np.mean(accuracy):.4f} (sd {np.std(accuracy):.4f}, "
            "5 classifier seeds)"
        )
        if key != K.CELL_TYPE and mlp_epochs == 10 and latent is z:
            # where the protocol's reading of finer labels fails: within which major type
            major = adata.obs[K.CELL_TYPE].astype(str).to_numpy()[test]
            by_major = pd.Series(correct.mean(0)).groupby(major).agg(["mean", "size"])
            print(
                "      by major type: "
                + ", ".join(
                    f"{m} {r['mean']:.2f} ({r['size']:.0f})" for m, r in by_major.iterrows()
                )
            )
    knn = [
        KNeighborsClassifier(15).fit(x[train], codes[train]).score(x[test], codes[test])
        for x in (z, standardised)
    ]
    print(f"    kNN (15) raw {knn[0]:.4f}, standardised {knn[1]:.4f}", flush=True)


if __name__ == "__main__":
    main()
