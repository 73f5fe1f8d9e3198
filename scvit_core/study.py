"""The study's runs in one place: what each chapter of the book trains, under a profile.

The chapters build their specs from these functions, and :func:`book_specs` lists every run of
the book, so ``python -m scvit_core.study`` trains them all in one pool before the book is
built (``make book`` does): two runs train at once from the first to the last, longest first,
instead of one pool per chapter each ending with an idle core. It then computes the book's
diagnoses (:func:`diagnosed_specs`) two at a time. The notebooks read every run and report
from the cache. Labels are display names, not part of a run's key
(:attr:`~scvit_core.experiments.ExperimentSpec.key`): a chapter may relabel a run and still
read it from the cache.
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Iterable
from typing import Any

from . import _constants as K
from .experiments import (
    DEFAULT_BUDGET,
    ExperimentSpec,
    in_processes,
    prepare_data,
    results_dir,
    run_many,
    workers_from_env,
)
from .perceiver import SCVI_NETWORKS
from .profiles import Profile, get_profile

SECOND_DATASET = "pbmc68k"
"""The dataset every comparison is repeated on."""

SCVIT_VARIANTS: dict[str, dict[str, Any]] = {
    "full": {},
    "no attention": {"attention": False},
    "no patching": {"conv_stem": False},
    "neither": {"attention": False, "conv_stem": False},
    "shared linear": {"patchwise": False},
    "extra convs": {"extra_convs": 2},
    "bigger": {"width": 1.5},
}
"""scViT's ablation (chapter 04): each variant's ``ScViTConfig`` switches."""

REPORT_VARIANTS = ("full", "no attention", "no patching", "neither")
"""The variants of the report's finding (attention and patching): every seed."""

SCVI_NETWORKS_LABEL = "scVI's networks, scPerceiver's count model"
"""The display name of :data:`~scvit_core.perceiver.SCVI_NETWORKS` (scPerceiver's count model on
scVI's encoder and decoder) in chapter 08 and the results table."""

PERCEIVER_ABLATIONS: dict[str, dict[str, Any]] = {
    "scPerceiver": {},
    "library scaling off": {"library_scaling": False},
    "conv-channel tokens (as scViT)": {"tokens": "conv"},
    "BatchNorm + Dropout(0.5) (as scViT)": {"norm": "batch", "dropout": 0.5},
    "legacy likelihood (as scViT)": {"likelihood": "legacy"},
    "attention removed (constant mixing)": {"attention": False},
    "scVI's networks, same count model": SCVI_NETWORKS,
}
"""scPerceiver's causal test (chapter 08): each fix of the diagnosis reverted alone, and last
both attention networks replaced by scVI's (:data:`~scvit_core.perceiver.SCVI_NETWORKS`)
under the same count model, likelihood and training: what the attention adds beyond them.

The default that answers no finding (``dispersion="gene-cell"``) and the input-masking option
(off by default) are not reverted here: ``benchmarks/perceiver_variants.py`` measures them.
"""


def seeded(
    model: str,
    label: str = "",
    *,
    seeds: Iterable[int] | None = None,
    profile: str | None = None,
    **fields: Any,
) -> list[ExperimentSpec]:
    """One spec per seed (default: the profile's ``range(n_seeds)``), under the profile."""
    chosen = get_profile(profile)
    seeds = range(chosen.n_seeds) if seeds is None else seeds
    return [
        ExperimentSpec.for_profile(model, profile=chosen.name, seed=s, label=label, **fields)
        for s in seeds
    ]


def nulls(
    dataset: str | None = None, *, profile: str | None = None, library_only: bool = False
) -> list[ExperimentSpec]:
    """The null models: a constant-mean NB and a library-scaled NB (deterministic: one run)."""
    chosen = get_profile(profile)
    fields = {"profile": chosen.name, "dataset": dataset or chosen.dataset}
    make = ExperimentSpec.for_profile
    library = make("null_nb_library", label="null NB, library-scaled", **fields)
    if library_only:
        return [library]
    return [make("null_nb", label="null NB, constant mean", **fields), library]


def n_train(profile: str | None = None) -> int:
    """Training cells of the profile's dataset (its stored split, after the subsample)."""
    adata = prepare_data(ExperimentSpec.for_profile(profile=get_profile(profile).name))
    return int((adata.obs[K.SPLIT] == "train").sum())


def scvi_long_epochs(profile: str | None = None) -> int:
    """scVI's longer budget of chapter 03: the profile's, else scvi-tools' heuristic.

    Without a budget of its own, chapter 03's longer runs are chapter 08's runs at
    :data:`~scvit_core.experiments.DEFAULT_BUDGET`.
    """
    chosen = get_profile(profile)
    if chosen.scvi_long_epochs:
        return chosen.scvi_long_epochs
    from scvi.model._utils import get_max_epochs_heuristic

    return get_max_epochs_heuristic(n_train(chosen.name))


def comparison(dataset: str | None = None, *, profile: str | None = None) -> dict[str, list]:
    """Chapter 03's comparison (Table 1): scVI, scViT legacy and corrected, baselines, nulls.

    On the profile's dataset it adds scVI at the longer budget, untrained scViT, PCA-64 and
    scViT on the profile's smaller training sets; on another dataset (``dataset``) it keeps
    scVI, both scViTs and the nulls.
    """
    chosen = get_profile(profile)
    on = {"profile": chosen.name}
    if dataset is not None and dataset != chosen.dataset:
        on["dataset"] = dataset
        return {
            "scVI": seeded("scvi", "scVI", **on),
            "scViT legacy": seeded("scvit", "scViT (legacy)", **on),
            "scViT corrected": seeded("scvit", "scViT (corrected)", likelihood="corrected", **on),
            "null": nulls(dataset, profile=chosen.name),
        }
    long = scvi_long_epochs(chosen.name)
    if chosen.scvi_long_epochs:
        longer = seeded("scvi", f"scVI ({long} epochs)", epochs=long, **on)
    else:  # scvi-tools' default budget: chapter 08's runs, trained once for both chapters
        longer = seeded("scvi", f"scVI ({long} epochs, default)", epochs=DEFAULT_BUDGET, **on)
    groups = {
        "scVI": seeded("scvi", "scVI", **on),
        "scVI, longer": longer,
        "scViT legacy": seeded("scvit", "scViT (legacy)", **on),
        "scViT corrected": seeded("scvit", "scViT (corrected)", likelihood="corrected", **on),
        "scViT untrained": seeded("untrained_scvit", "scViT untrained", **on),
        "PCA": seeded("pca", "PCA-64", **on),
        "null": nulls(profile=chosen.name),
    }
    for f in (f for f in chosen.train_fractions if f < 1):
        groups[f"scViT legacy {f}"] = seeded(
            "scvit", f"scViT (legacy), {f:.0%} of training cells", train_fraction=f, **on
        )
    return groups


def scvit_ablation(
    *, report_only: bool = False, profile: str | None = None
) -> dict[str, list[ExperimentSpec]]:
    """Chapter 04's ablation of scViT (07's: ``report_only``, the report's four variants).

    The report's variants run every seed; the others the profile's ablation seeds, read
    against the full model's seed-to-seed spread.
    """
    chosen = get_profile(profile)
    return {
        name: seeded(
            "scvit",
            seeds=None if name in REPORT_VARIANTS else chosen.variant_seeds,
            profile=chosen.name,
            **switches,
        )
        for name, switches in SCVIT_VARIANTS.items()
        if name in REPORT_VARIANTS or not report_only
    }


def perceiver_comparison(
    dataset: str | None = None, *, profile: str | None = None
) -> dict[str, list]:
    """Chapter 08's comparison: scPerceiver against scVI at its default budget and the rest.

    The rest: scVI's networks under scPerceiver's count model (:data:`SCVI_NETWORKS_LABEL`), scVI at
    the report's budget, scViT (corrected), PCA-64 and the null models. On another dataset
    (``dataset``): scPerceiver, scVI's networks, scVI at its default budget and the
    library-scaled null.
    """
    chosen = get_profile(profile)
    on = {"profile": chosen.name}
    if dataset is not None and dataset != chosen.dataset:
        on["dataset"] = dataset
        return {
            "scPerceiver": seeded("perceiver", "scPerceiver", **on),
            SCVI_NETWORKS_LABEL: seeded("perceiver", SCVI_NETWORKS_LABEL, **on, **SCVI_NETWORKS),
            "scVI (default budget)": seeded(
                "scvi", "scVI (default budget)", epochs=DEFAULT_BUDGET, **on
            ),
            "null": nulls(dataset, profile=chosen.name, library_only=True),
        }
    return {
        "scPerceiver": seeded("perceiver", "scPerceiver", **on),
        SCVI_NETWORKS_LABEL: seeded("perceiver", SCVI_NETWORKS_LABEL, **on, **SCVI_NETWORKS),
        "scVI (default budget)": seeded(
            "scvi", "scVI (default budget)", epochs=DEFAULT_BUDGET, **on
        ),
        "scVI": seeded("scvi", "scVI", **on),
        "scViT (corrected)": seeded("scvit", "scViT (corrected)", likelihood="corrected", **on),
        "PCA-64": seeded("pca", "PCA-64", **on),
        "null": nulls(profile=chosen.name),
    }


def perceiver_ablation(*, profile: str | None = None) -> dict[str, list[ExperimentSpec]]:
    """Chapter 08's ablation: the full model every seed, each reverted fix the ablation seeds.

    A reverted fix of seed ``s`` is paired with the full model's run of seed ``s``.
    """
    chosen = get_profile(profile)
    return {
        name: seeded(
            "perceiver",
            f"scPerceiver, {name}" if switches else "scPerceiver",
            seeds=chosen.variant_seeds if switches else None,
            profile=chosen.name,
            **switches,
        )
        for name, switches in PERCEIVER_ABLATIONS.items()
    }


def flat(groups: dict[str, list[ExperimentSpec]]) -> list[ExperimentSpec]:
    """The specs of named groups, in order."""
    return [s for group in groups.values() for s in group]


def book_specs(profile: str | None = None) -> list[ExperimentSpec]:
    """Every run the book reads under ``profile``, each once (by key), in chapter order.

    Chapters 05-07 and the results page read runs of chapters 03, 04 and 08 (seed 0 of scViT
    and its variants, scVI on the second dataset), so they add none.
    """
    name = get_profile(profile).name
    groups = [
        comparison(profile=name),  # 02 (scViT legacy, nulls) and 03
        comparison(SECOND_DATASET, profile=name),
        scvit_ablation(profile=name),  # 04, 06, 07
        perceiver_comparison(profile=name),  # 08
        perceiver_ablation(profile=name),
        perceiver_comparison(SECOND_DATASET, profile=name),
    ]
    unique = {s.key: s for group in groups for s in flat(group)}
    return list(unique.values())


def diagnosis_options(profile: str | None = None) -> dict[str, Any]:
    """Options of :func:`interpret.diagnose_run` for every diagnosis of the book.

    Every test cell and 16 explained cells per attribution; 300 cells and 4 in profile ``ci``.
    A report is cached beside its run whatever its options, so every chapter uses these.
    """
    small = get_profile(profile).name == "ci"
    return {"max_cells": 300 if small else None, "attribution_cells": 4 if small else 16}


def diagnosed_specs(profile: str | None = None) -> list[ExperimentSpec]:
    """The runs the book diagnoses: seed 0 of scViT (legacy and corrected) and scPerceiver."""
    name = get_profile(profile).name
    return [
        ExperimentSpec.for_profile("scvit", profile=name, seed=0),
        ExperimentSpec.for_profile("scvit", profile=name, seed=0, likelihood="corrected"),
        ExperimentSpec.for_profile("perceiver", profile=name, seed=0),
    ]


def diagnose_book(profile: str | None = None, *, workers: int = 1) -> int:
    """Compute the book's diagnoses that are not cached, ``workers`` at a time; how many.

    Each in its own process with a share of the torch threads, as :func:`run_many` trains.
    """
    import torch

    name = get_profile(profile).name
    directory = results_dir()
    pending = [
        (s, diagnosis_options(name))
        for s in diagnosed_specs(name)
        if not (directory / s.key / "diagnosis" / "diagnosis.json").exists()
    ]
    if workers <= 1 or len(pending) <= 1:
        for job in pending:
            _diagnose(*job, torch.get_num_threads())
    else:
        in_processes(_diagnose, pending, min(workers, len(pending)))
    return len(pending)


def _diagnose(spec: ExperimentSpec, options: dict[str, Any], threads: int) -> None:
    import torch

    from interpret import diagnose_run

    from .experiments import run

    torch.set_num_threads(threads)
    diagnose_run(run(spec), progress=False, **options)


def main(argv: list[str] | None = None) -> None:
    """``python -m scvit_core.study``: train (or find in the cache) every run of the book."""
    parser = argparse.ArgumentParser(
        prog="python -m scvit_core.study",
        description="Train every run the book reads under a profile, longest first, in one "
        "pool of workers, then compute the book's diagnoses (interpret.diagnose_run); the "
        "notebooks read both from the results cache.",
    )
    parser.add_argument("--profile", help="default: $SCVIT_PROFILE, else cpu")
    parser.add_argument(
        "--workers", type=int, help="runs trained at once (default: $SCVIT_WORKERS, else 1)"
    )
    parser.add_argument("--list", action="store_true", help="list the runs and exit")
    args = parser.parse_args(argv)
    if args.workers is not None and args.workers < 1:
        parser.error(f"--workers must be at least 1, got {args.workers}")
    chosen: Profile = get_profile(args.profile)
    specs = book_specs(chosen.name)
    if args.list:
        for spec in specs:
            print(f"{spec.key}  {spec.dataset}  seed {spec.seed}  {spec.name}")
        print(f"{len(specs)} runs in profile {chosen.name}")
        return
    directory = results_dir()
    stored = sum((directory / s.key / "metrics.csv").exists() for s in specs)
    start = time.perf_counter()
    run_many(specs, workers=args.workers)
    print(
        f"profile {chosen.name}: {len(specs)} runs of the book, {len(specs) - stored} trained "
        f"in {time.perf_counter() - start:.0f} s, {stored} read from the cache",
        flush=True,
    )
    start = time.perf_counter()
    workers = args.workers if args.workers is not None else workers_from_env()
    done = diagnose_book(chosen.name, workers=workers)
    print(
        f"{len(diagnosed_specs(chosen.name))} diagnoses of the book, {done} computed in "
        f"{time.perf_counter() - start:.0f} s",
        flush=True,
    )


if __name__ == "__main__":
    main()
