"""Train a tiny scViT on synthetic counts with 1 or N CPU processes (the DDP test's worker).

Run as ``python tests/ddp_train.py OUT --devices 2 --batch-size 16``: Lightning's DDP starts the
other processes by running this same command again. Rank 0 writes the model to ``OUT/model``
and ``OUT/result.json``; every rank writes the cells it trained on, ``OUT/seen-r{rank}.json``
(one list of row numbers per epoch).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import anndata as ad
import numpy as np
import pandas as pd
import scipy.sparse as sp

N_CELLS, N_GENES, EPOCHS = 203, 30, 2


def tiny_data() -> ad.AnnData:
    """203 cells x 30 genes of negative-binomial counts in three groups, with a stored split."""
    from scvit_core.data import add_split

    rng = np.random.default_rng(0)
    groups = np.repeat([0, 1, 2], [90, 70, 43])
    mean = rng.gamma(2.0, 2.0, size=(3, N_GENES))[groups]  # (cells, genes)
    counts = rng.poisson(mean).astype(np.int32)
    counts[:, 0] += 1  # no empty cells
    obs = pd.DataFrame(
        {"cell_type": pd.Categorical(np.array(["a", "b", "c"])[groups])},
        index=[f"c{i}" for i in range(N_CELLS)],
    )
    var = pd.DataFrame(index=[f"G{j}" for j in range(N_GENES)])
    adata = ad.AnnData(sp.csr_matrix(counts), obs=obs, var=var)
    add_split(adata, labels_key="cell_type", seed=0)
    return adata


def run(out: Path, *, devices: int, batch_size: int) -> dict:
    """Train for :data:`EPOCHS` epochs; returns (rank 0 also writes) the run's summary."""
    from scvit_core import ScViTModel
    from scvit_core.config import ScViTConfig
    from scvit_core.train import AutoencoderLightning

    out.mkdir(parents=True, exist_ok=True)
    seen: dict[int, list[int]] = {}
    step = AutoencoderLightning.training_step

    def recording_step(self, batch, batch_idx):
        seen.setdefault(self.current_epoch, []).extend(batch["index"].tolist())
        return step(self, batch, batch_idx)

    AutoencoderLightning.training_step = recording_step
    try:
        adata = tiny_data()
        stages = ((8, 8, 4, 4), (8, 4, 8, 2))
        config = ScViTConfig.small(N_GENES, likelihood="nb", dropout=0.0, stages=stages)
        model = ScViTModel(adata, config, seed=0)
        model.train(
            epochs=EPOCHS,
            batch_size=batch_size,
            lr=0.003,
            accelerator="cpu",
            devices=devices,
            strategy="ddp" if devices > 1 else "auto",
            enable_progress_bar=False,
            output_dir=out / "training",
        )
    finally:
        AutoencoderLightning.training_step = step
    result = model.train_result
    rank = result.global_rank
    (out / f"seen-r{rank}.json").write_text(json.dumps([seen[e] for e in sorted(seen)]))
    summary = {
        "history": model.history.to_dict(orient="list"),
        "initial_val_loss": result.initial_val_loss,
        "last_checkpoint": result.last_checkpoint,
        "test_loss": model.get_reconstruction_error(split="test")["reconstruction_loss"],
    }
    if rank == 0:
        model.save(out / "model", overwrite=True)
        (out / "result.json").write_text(json.dumps(summary))
    return summary


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("out", type=Path)
    parser.add_argument("--devices", type=int, default=2)
    parser.add_argument("--batch-size", type=int, default=16)
    args = parser.parse_args()
    run(args.out, devices=args.devices, batch_size=args.batch_size)
