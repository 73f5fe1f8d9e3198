"""scPerceiver variants on one dataset and seed: how the default configuration was chosen.

::

    python benchmarks/perceiver_variants.py zeisel2015 \
        '[["base", {"dispersion": "gene", "input_masking": 0}, {}],
          ["masking 0.4", {"input_masking": 0.4}, {}]]' [SEED]

Each variant is ``[name, PerceiverConfig overrides, TrainConfig overrides]``, trained at the
default budget on the cells of :func:`versus_scvi.load` (the cpu profile's at most 1,500) and
printed as one ``RES`` line: the test NLL at the posterior mean and at one sample, the training
cells' NLL (how much of the test gap is fitting versus generalising), the MLP, kNN and
logistic-regression accuracy of the latent, epochs and wall time.
"""

from __future__ import annotations

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
    dataset, variants = sys.argv[1], json.loads(sys.argv[2])
    seed = int(sys.argv[3]) if len(sys.argv) > 3 else 0
    adata = load(dataset, labels_key=None, max_cells=1500)
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
            f"RES {dataset} {name} seed={seed} test={nll['test']:.1f} "
            f"sample={sample['reconstruction_loss']:.1f} train={nll['train']:.1f} "
            f"mlp={r['mlp']:.3f} knn={r['knn']:.3f} lr={r['logreg']:.3f} "
            f"epochs={model.train_config.epochs} time={wall:.0f}",
            flush=True,
        )


if __name__ == "__main__":
    main()
