"""scPerceiver variants on one dataset and seed: how the default configuration was chosen.

::

    python benchmarks/perceiver_variants.py zeisel2015 \
        '[["base", {"dispersion": "gene", "input_masking": 0}, {}],
          ["masking 0.4", {"input_masking": 0.4}, {}]]' [SEED] [--max-cells N] [--labels-key KEY]

Each variant is ``[name, PerceiverConfig overrides, TrainConfig overrides]``, trained at the
default budget (or the ``epochs`` of its TrainConfig overrides) on the cells of
:func:`versus_scvi.load` (a stratified subsample of at most ``--max-cells``, the cpu profile's
1,500 by default) and printed as one ``RES`` line: the test NLL at the posterior mean and at
one sample, the training cells' NLL (how much of the test gap is fitting versus generalising),
the MLP, kNN and logistic-regression accuracy of the latent (and the MLP's on minor types,
where the dataset has them), epochs and wall time.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
import warnings
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))


def main() -> None:
    from versus_scvi import load, readouts

    from scvit_core.api import ScPerceiverModel
    from scvit_core.train import quiet_lightning

    warnings.filterwarnings("ignore")
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("dataset")
    parser.add_argument("variants", type=json.loads, help="JSON list of [name, config, train]")
    parser.add_argument("seed", type=int, nargs="?", default=0)
    parser.add_argument("--max-cells", type=int, default=1500, help="stratified subsample")
    parser.add_argument("--labels-key", default=None, help="obs column of cell types")
    args = parser.parse_args()
    dataset, variants, seed = args.dataset, args.variants, args.seed
    adata = load(dataset, labels_key=args.labels_key, max_cells=args.max_cells)
    for name, config, train in variants:
        model = ScPerceiverModel(adata, seed=seed, **config)
        start = time.perf_counter()
        with quiet_lightning(True):
            model.train(seed=seed, enable_progress_bar=False, **train)
        wall = time.perf_counter() - start
        nll = {
            split: model.get_reconstruction_error(split=split)["reconstruction_loss"]
            for split in ("test", "train")
        }
        sample = model.get_reconstruction_error(split="test", sample=True, seed=seed)
        r = readouts(adata, model.get_latent_representation(), seed)
        print(
            f"RES {dataset} {name} cells={adata.n_obs} seed={seed} test={nll['test']:.1f} "
            f"sample={sample['reconstruction_loss']:.1f} train={nll['train']:.1f} "
            f"mlp={r['mlp']:.3f} knn={r['knn']:.3f} lr={r['logreg']:.3f} "
            + (f"mlp_fine={r['mlp_fine']:.3f} " if "mlp_fine" in r else "")
            + f"epochs={model.train_config.epochs} time={wall:.0f}",
            flush=True,
        )


if __name__ == "__main__":
    main()
