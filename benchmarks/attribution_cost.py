"""Cost of each attribution method per layer, against one forward + backward pass of the model.

For the default dataset's preset (``ScViTConfig.for_genes(4000)``, random weights: the cost
does not depend on them) and 32 Zeisel cells as log1p counts, this prints the seconds per cell
of every method of :func:`interpret.attribution.attribute` on the input genes, ``stem``,
``encoder.0.attention``, ``encoder.0`` and ``bottleneck.2`` (target: latent dimension 0), and,
measured in the same run, the seconds per cell of one plain forward + backward pass of the
encoder on the same batch; each method's cost is also given as a ratio to it. The sanity
figure of every call is printed alongside, so the table doubles as a check of the tolerances
on the preset. ``encoder.0.attention`` is a residual branch: the DeepLIFT family and
conductance also attribute the skip branch there to check completeness (twice the cost).

    python benchmarks/attribution_cost.py              # about 10 minutes on 2 CPU cores
"""

from __future__ import annotations

import argparse
import os
import sys
import time
import warnings

import numpy as np
import pandas as pd
import torch

from interpret.attribution import METHODS, LatentTarget, attribute, prepare
from scvit_core import load_dataset
from scvit_core.config import ScViTConfig
from scvit_core.model import ScViT

LAYERS = (None, "stem", "encoder.0.attention", "encoder.0", "bottleneck.2")


def forward_backward_seconds(target: torch.nn.Module, x: torch.Tensor, repeats: int = 3) -> float:
    """Best wall time of ``target(x).sum().backward()`` with inputs requiring grad."""
    best = float("inf")
    for _ in range(repeats + 1):  # the first call warms up
        xg = x.clone().requires_grad_()
        start = time.perf_counter()
        target(xg).sum().backward()
        best = min(best, time.perf_counter() - start)
        target.zero_grad(set_to_none=True)
    return best


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cells", type=int, default=32)
    parser.add_argument("--background", type=int, default=8, help="deepshap/deepliftshap")
    parser.add_argument("--n-steps", type=int, default=32)
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)

    adata = load_dataset("zeisel2015")
    counts = np.asarray(adata.X[: args.cells + args.background].todense(), dtype=np.float32)
    data = torch.as_tensor(np.log1p(counts))
    x, background = data[: args.cells], data[args.cells :]
    model = ScViT(ScViTConfig.for_genes(adata.n_vars)).eval()
    target = prepare(LatentTarget(model))  # the safe copy, built once

    reference = forward_backward_seconds(target, x) / len(x)
    print(
        f"scViT for_genes({adata.n_vars}): {sum(p.numel() for p in model.parameters()):,} "
        f"parameters; {len(x)} cells, {len(background)} background cells, n_steps "
        f"{args.n_steps}; {args.threads} threads, load average {os.getloadavg()[0]:.1f}"
    )
    print(f"reference: forward + backward {reference * 1e3:.2f} ms per cell\n")

    rows = []
    for layer in LAYERS:
        for method in METHODS:
            if layer is None and method in ("conductance", "internal_influence"):
                continue
            start = time.perf_counter()
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                result = attribute(
                    target,
                    x,
                    method=method,
                    layer=layer,
                    target=0,
                    baselines=background if method in ("deepshap", "deepliftshap") else None,
                    n_steps=args.n_steps,
                )
            seconds = (time.perf_counter() - start) / len(x)
            s = result.sanity
            rows.append(
                dict(
                    layer=result.layer_label,
                    method=method,
                    s_per_cell=round(seconds, 4),
                    x_fwd_bwd=round(seconds / reference, 1),
                    sanity=s.name.split(" of ")[0],
                    relative_error=f"{s.relative:.1e}",
                    tolerance=f"{s.tolerance:.2g}",
                    passed="n/a" if s.passed is None else s.passed,
                )
            )
            print(f"  {result.layer_label} {method}: {seconds:.3f} s/cell", file=sys.stderr)
    print(pd.DataFrame(rows).to_string(index=False))


if __name__ == "__main__":
    main()
