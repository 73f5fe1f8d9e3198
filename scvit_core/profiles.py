"""One switch, ``SCVIT_PROFILE``, scales every experiment (DESIGN.md section 4).

``ci`` runs in seconds (nbval in CI), ``cpu`` is the default for ``make book`` on a
2-core laptop, ``paper`` reruns at the report's sizes on a GPU. Notebooks read the
profile with :func:`get_profile`; nothing else differs between profiles.

``<name>-smoke`` (:func:`smoke`), e.g. ``paper-smoke``, is a profile's whole path (its
dataset loader, the model sizes of its dataset, the runner, evaluation) in two training
steps on a few cells: the ``paper`` profile's is checkable on a CPU before a GPU is booked
(``python scripts/run_profile.py --profile paper --smoke``).
"""

from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass

PROFILE_ENV = "SCVIT_PROFILE"


@dataclass(frozen=True)
class Profile:
    """How large an experiment is under a profile."""

    name: str
    description: str
    dataset: str  # the dataset experiments run on
    max_cells: int | None  # stratified subsample of the dataset (None: all cells)
    epochs: int  # training epochs per model
    n_seeds: int  # seeds per configuration
    train_fractions: tuple[float, ...] = (1.0,)  # training-set sizes, as shares of the train split
    scvi_long_epochs: int | None = None  # scVI's longer budget (None: scvi-tools' own default)
    train_cells: tuple[int, ...] = ()  # the report's training-set sizes (paper profile)
    max_epochs: int | None = None  # caps the models' own default budgets (scVI, scPerceiver)
    # seeds of each reverted variant in an ablation whose full model has n_seeds: its change is
    # read against the full model's seed-to-seed spread (fewer runs where the budget is tight)
    ablation_seeds: int | None = None  # None: n_seeds

    @property
    def variant_seeds(self) -> range:
        """Seeds of a reverted variant in an ablation (the full model runs ``range(n_seeds)``)."""
        return range(min(self.ablation_seeds or self.n_seeds, self.n_seeds))


PROFILES: dict[str, Profile] = {
    "ci": Profile(
        "ci",
        "seconds per notebook; what nbval runs in CI",
        "zeisel2015",
        max_cells=600,
        epochs=1,
        n_seeds=1,
        train_fractions=(0.5, 1.0),
        scvi_long_epochs=2,
        max_epochs=2,
    ),
    "cpu": Profile(
        "cpu",
        "half the default dataset (1,500 cells) on 2 CPU cores, 3 seeds per model "
        "(1 per ablation variant)",
        "zeisel2015",
        max_cells=1500,
        epochs=10,
        n_seeds=3,
        train_fractions=(0.25, 1.0),  # the report's two sizes: a quarter and all of the cells
        ablation_seeds=1,
    ),
    "paper": Profile(
        "paper",
        "the report's sizes on a GPU: HBCA subsets",
        "hbca",
        max_cells=None,
        epochs=10,
        n_seeds=3,
        # 42,116 and 168,464 training cells: a quarter and all of the train split of a
        # stratified HBCA subsample of 168,464 / 0.8 cells
        train_fractions=(0.25, 1.0),
        train_cells=(42_116, 168_464),
    ),
}


SMOKE_TRAIN_CELLS = 96
"""Training cells of a smoke profile (one batch: a training step per epoch)."""


def smoke(profile: Profile) -> Profile:
    """``profile`` in a few training steps: its dataset (and so the model's sizes), few cells.

    Two epochs of one step each, one seed, :data:`SMOKE_TRAIN_CELLS` training cells (its
    ``train_cells``; others subsample ``max_cells`` of ``SMOKE_TRAIN_CELLS / 0.8``), so the
    evaluation and the best-checkpoint reload run too.
    """
    n_cells = round(SMOKE_TRAIN_CELLS / 0.8)
    return dataclasses.replace(
        profile,
        name=f"{profile.name}-smoke",
        description=f"{profile.name}'s path in 2 training steps on {n_cells} cells (CPU check)",
        max_cells=n_cells if profile.max_cells else None,
        epochs=2,
        n_seeds=1,
        train_fractions=(1.0,),
        scvi_long_epochs=2,
        train_cells=(SMOKE_TRAIN_CELLS,) if profile.train_cells else (),
        max_epochs=2,
        ablation_seeds=1,
    )


def get_profile(name: str | None = None) -> Profile:
    """The profile named ``name``, else ``$SCVIT_PROFILE``, else ``"cpu"`` (``NAME-smoke``:
    :func:`smoke` of profile ``NAME``)."""
    name = name or os.environ.get(PROFILE_ENV) or "cpu"
    base = name.removesuffix("-smoke")
    if name != base and base in PROFILES:
        return smoke(PROFILES[base])
    if name not in PROFILES:
        raise ValueError(
            f"unknown profile {name!r} (from {PROFILE_ENV} or the argument); "
            f"choose one of {', '.join(PROFILES)} (or NAME-smoke: a few steps of it)."
        )
    return PROFILES[name]
