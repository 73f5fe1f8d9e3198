"""One run of a profile's faithful scViT, end to end: data, training, evaluation, diagnosis.

    python scripts/run_profile.py --profile paper           # the report's sizes (GPU, HBCA file)
    python scripts/run_profile.py --profile paper --smoke   # the same path in 2 steps on CPU

``--smoke`` runs the profile's ``-smoke`` variant (:func:`scvit_core.profiles.smoke`): for
``paper``, the HBCA loader on a synthetic file with the atlas's schema and 59,480 genes, the
``paper``-sized network, the experiment runner (training, evaluation of the final and best
checkpoints, cost, the saved model) and the diagnosis of ``interpret``. Prints one line per
stage with its wall time; the run is stored in the results directory like any other.
"""

from __future__ import annotations

import argparse
import sys
import time
import warnings

from scvit_core.experiments import ExperimentSpec, results_dir, run, smoke_dataset
from scvit_core.profiles import get_profile


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--profile", default=None, help="default: $SCVIT_PROFILE, else cpu")
    parser.add_argument("--smoke", action="store_true", help="2 training steps on a few cells")
    parser.add_argument("--results", default=None, help="default: $SCVIT_RESULTS_DIR or ./results")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--no-diagnosis", action="store_true")
    args = parser.parse_args(argv)
    warnings.filterwarnings("ignore")

    profile = get_profile(args.profile)
    if args.smoke:
        profile = get_profile(f"{profile.name}-smoke")
    directory = results_dir(args.results)
    dataset = (
        smoke_dataset(profile.name, directory / "smoke-data") if args.smoke else profile.dataset
    )
    spec = ExperimentSpec.for_profile(
        "scvit", profile=profile.name, dataset=dataset, seed=args.seed
    )
    start = time.perf_counter()
    result = run(spec, directory=directory, force=args.smoke)
    cells = result.provenance["cells"]
    print(
        f"run {spec.name!r} ({profile.name}, {result.provenance['genes']:,} genes, "
        f"{cells['train']:,}/{cells['validation']:,}/{cells['test']:,} cells, "
        f"{result.provenance['epochs']} epochs): test NLL "
        f"{result.value('reconstruction_loss'):.1f}, {time.perf_counter() - start:.0f} s",
        flush=True,
    )
    if not args.no_diagnosis:
        from interpret import diagnose_run

        start = time.perf_counter()
        # smoke: every step of the diagnosis on fewer cells, without the untrained
        # network's repeat of the layer probes (the same code on other weights)
        small = dict(max_cells=60, attribution_cells=2, untrained=False) if args.smoke else {}
        report = diagnose_run(result, force=args.smoke, progress=False, **small)
        print(f"diagnosis: {len(report.tables)} tables, {time.perf_counter() - start:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
