"""One call, one report: :func:`diagnose` runs every diagnostic of a trained network.

The report answers, for one model on its test cells, the questions of issue 5 in a fixed
order: does attention attend to anything (entropy), does its update matter next to the
residual (norms, attribution through each branch, knock-out at inference), how many directions
do the tokens use (effective rank), what do the conv stem's tokens span, which output token
produces each gene's parameters, where is cell type linearly readable before and after
training (layer probes, against the same network untrained), and how much of the count
likelihood the model explains beyond per-gene null models. Each answer is a tidy table;
:meth:`Diagnosis.figures` draws them with seaborn and :meth:`Diagnosis.save` writes both.

Any network with the interface of :class:`~scvit_core.model.Interpretable` is diagnosed
(scViT, scPerceiver); the conv-stem tables need scViT's conv stem and the gene-token table its
output head, and are left out for other networks.
"""

from __future__ import annotations

import copy
import json
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import anndata as ad
import matplotlib.pyplot as plt
import numpy as np
import pandas as pd
import seaborn as sns
import torch
from tqdm.auto import tqdm

from scvit_core import _constants as K

from . import diagnostics as D
from .attribution import LatentTarget, MeanTarget, attribute, prepare

__all__ = ["Diagnosis", "branch_shares", "diagnose", "diagnose_run", "untrained_like"]


@dataclass
class Diagnosis:
    """The tables of :func:`diagnose`, their timings and the model they describe.

    Attributes
    ----------
    tables
        Name -> tidy DataFrame: ``entropy``, ``update_norms``, ``branches`` (attribution
        through attention versus the skip path), ``sanity`` (the attribution methods' own
        checks), ``knockout``, ``effective_rank``, ``stem`` and ``token_similarity`` (absent
        without scViT's conv stem), ``gene_tokens`` (absent without scViT's output head),
        ``probes`` (trained and untrained), ``beyond_null``.
    seconds
        Wall time of each step.
    description
        What was diagnosed (model, likelihood, switches, cells).
    """

    tables: dict[str, pd.DataFrame]
    seconds: dict[str, float] = field(default_factory=dict)
    description: dict = field(default_factory=dict)

    def __getitem__(self, name: str) -> pd.DataFrame:
        return self.tables[name]

    def headline(self) -> dict[str, float]:
        """A few numbers that summarise the report (see the keys' names)."""
        t, out = self.tables, {}
        if "entropy" in t and len(t["entropy"]):
            out["attention entropy / uniform (mean over heads)"] = t["entropy"][
                "entropy_ratio"
            ].mean()
        if "update_norms" in t and len(t["update_norms"]):
            out["||attention update|| / ||skip|| (mean over stages)"] = t["update_norms"][
                "ratio"
            ].mean()
        if "branches" in t and len(t["branches"]):
            out["attribution share through attention (mean over stages)"] = t["branches"][
                "attention_share"
            ].mean()
        if "knockout" in t:
            k = t["knockout"]
            k = k[k["stages"].isin(["none", "all"])].set_index("mode")
            for mode in ("uniform", "identity", "zero"):
                if mode in k.index:
                    change = k.loc[mode, "nll"] / k.loc["trained", "nll"] - 1
                    out[f"test NLL change, attention {mode} (%)"] = 100 * change
        if "probes" in t:
            p = t["probes"]
            last = p[p["layer"] == "latent"]
            for state, part in last.groupby("state"):
                out[f"linear probe accuracy on the latent, {state}"] = part["accuracy"].iloc[0]
        if "beyond_null" in t:
            b = t["beyond_null"].set_index("model")
            out["share of the constant-to-library-null gap closed"] = b.loc["model", "gap_closed"]
        return out

    def figures(self) -> dict[str, plt.Figure]:
        """Seaborn figures of the main tables, keyed by table name."""
        figs, t = {}, self.tables
        if len(t.get("entropy", ())):
            fig, ax = plt.subplots(figsize=(7, 3.5))
            sns.barplot(data=t["entropy"], x="layer", y="entropy_ratio", hue="head", ax=ax)
            ax.axhline(1, color="black", lw=1, ls="--")
            ax.set(ylabel="entropy / uniform entropy", xlabel="", title="attention entropy")
            ax.tick_params(axis="x", rotation=45)
            figs["entropy"] = fig
        if len(t.get("branches", ())):
            fig, ax = plt.subplots(figsize=(7, 3.5))
            sns.barplot(data=t["branches"], x="stage", y="attention_share", ax=ax, color="C0")
            ax.set(
                ylim=(0, 1),
                ylabel="share of |attribution| via attention",
                xlabel="",
                title="attention versus skip path",
            )
            ax.tick_params(axis="x", rotation=45)
            figs["branches"] = fig
        if len(t.get("probes", ())):
            fig, ax = plt.subplots(figsize=(9, 3.5))
            order = list(dict.fromkeys(t["probes"]["layer"]))
            sns.pointplot(
                data=t["probes"], x="layer", y="accuracy", hue="state", order=order, ax=ax
            )
            ax.set(xlabel="", ylabel="linear-probe test accuracy", title="cell type per layer")
            ax.tick_params(axis="x", rotation=90)
            figs["probes"] = fig
        if "knockout" in t:
            k = t["knockout"]
            k = k[k["stages"].isin(["none", "all"])]
            fig, ax = plt.subplots(figsize=(5, 3.5))
            sns.barplot(data=k, x="mode", y="nll", ax=ax, color="C1")
            ax.set(ylabel="test NLL per cell", xlabel="attention at inference")
            figs["knockout"] = fig
        return figs

    def save(self, directory: str | Path) -> Path:
        """Write every table as CSV, the figures as PNG and a ``diagnosis.json`` summary."""
        out = Path(directory)
        out.mkdir(parents=True, exist_ok=True)
        for name, table in self.tables.items():
            table.to_csv(out / f"{name}.csv", index=False)
        for name, fig in self.figures().items():
            fig.savefig(out / f"{name}.png", dpi=110, bbox_inches="tight")
            plt.close(fig)
        summary = {
            "description": self.description,
            "seconds": self.seconds,
            "headline": {k: float(v) for k, v in self.headline().items()},
        }
        (out / "diagnosis.json").write_text(json.dumps(summary, indent=2, default=str))
        return out

    @classmethod
    def load(cls, directory: str | Path) -> Diagnosis:
        """Read a report written by :meth:`save`."""
        path = Path(directory)
        summary = json.loads((path / "diagnosis.json").read_text())
        tables = {
            p.stem: pd.read_csv(p, keep_default_na=False, na_values=[""])
            for p in sorted(path.glob("*.csv"))
        }
        return cls(tables, summary["seconds"], summary["description"])


def branch_shares(
    net: torch.nn.Module,
    x: torch.Tensor,
    reference: torch.Tensor,
    *,
    library: torch.Tensor | None = None,
    latent_dims: int = 2,
    genes: int = 2,
) -> tuple[pd.DataFrame, pd.DataFrame]:
    """How much of each stage's output relevance flows through attention versus the skip path.

    At every residual sum ``skip + attention(skip)`` (the attention sites with an update and a
    skip branch) the two inputs' DeepLIFT attributions add up to the sum's (exactly, on the
    attribution-safe path), so their shares of the absolute attribution say which branch
    carries the explained output. Encoder stages explain the ``latent_dims`` latent dimensions
    of largest variance over ``x``; decoder stages (sites named ``decoder.*``) the decoded mean
    of the ``genes`` genes of largest mean input.

    Returns
    -------
    branches, sanity
        ``branches``: one row per stage with ``attention_share`` (mean over targets),
        ``attention_abs``, ``skip_abs``; ``sanity``: the convergence delta of every call.
    """
    stages = [site.name for site in D.attention_sites(net) if site.residual]
    if not stages:
        return pd.DataFrame(), pd.DataFrame()
    with torch.no_grad():
        z = net.encode(x)
    dims = torch.argsort(z.var(0), descending=True)[:latent_dims].tolist()
    top_genes = torch.argsort(x.mean(0), descending=True)[:genes].tolist()
    # attribution-safe copies made once and reused by every call
    latent = prepare(LatentTarget(net))
    mean = prepare(MeanTarget(net, top_genes))
    rows, checks = [], []
    for stage in stages:
        is_encoder = stage.startswith("encoder")
        target_model, targets = (latent, dims) if is_encoder else (mean, range(len(top_genes)))
        args = None if is_encoder or library is None else (library,)
        for k in targets:
            # one call: the attention branch, and (for the completeness check) its complement,
            # the skip branch, whose attributions come back in extra["complement"]
            r = attribute(
                target_model,
                x,
                method="deeplift",
                layer=f"{stage}.attention",
                target=k,
                baselines=reference.expand_as(x),
                additional_forward_args=args,
            )
            skip = np.asarray(r.extra["complement"]["attributions"])
            parts = {
                "attention": np.abs(r.attributions).reshape(len(x), -1).sum(1),  # (cells,)
                "skip": np.abs(skip).reshape(len(x), -1).sum(1),
            }
            checks.append(
                {
                    "stage": stage,
                    "target": int(k),
                    "method": "deeplift",
                    "sanity": r.sanity.name,
                    "relative_error": r.sanity.relative,
                    "tolerance": r.sanity.tolerance,
                    "passed": bool(r.sanity.passed),
                }
            )
            if not r.sanity.passed:  # incomplete attributions are not evidence: left out
                continue
            total = np.maximum(parts["attention"] + parts["skip"], 1e-30)
            rows.append(
                {
                    "stage": stage,
                    "target": int(k),
                    "attention_abs": parts["attention"].mean(),
                    "skip_abs": parts["skip"].mean(),
                    "attention_share": float(np.mean(parts["attention"] / total)),
                }
            )
    frame = pd.DataFrame(
        rows, columns=["stage", "target", "attention_abs", "skip_abs", "attention_share"]
    )
    branches = frame.groupby("stage", sort=False)[
        ["attention_abs", "skip_abs", "attention_share"]
    ].mean()
    return branches.reset_index(), pd.DataFrame(checks)


def diagnose(
    model,
    adata: ad.AnnData | None = None,
    *,
    untrained=None,
    max_cells: int = 1000,
    attribution_cells: int = 16,
    label_key: str = K.CELL_TYPE,
    seed: int = 0,
    progress: bool = True,
) -> Diagnosis:
    """Every diagnostic of issue 5 for one trained network, as one report.

    Parameters
    ----------
    model
        A trained API model: :class:`~scvit_core.api.ScViTModel`, the scPerceiver's, or any
        object with ``model`` (the network), ``adata``, ``config`` and
        ``train_config.input_transform``.
    adata
        Cells with raw counts, ``obs[label_key]`` and ``obs["split"]`` (default: the model's
        own AnnData); not modified. Test cells are scored, training cells fit the probes and
        the null models.
    untrained
        The same network untrained, for the layer probes' "untrained" rows (default: built from
        the model's configuration with its seed, :func:`untrained_like`). Pass ``False`` to
        skip.
    max_cells
        A label-stratified subsample of this many cells is diagnosed.
    attribution_cells
        Test cells explained by the attribution step.
    seed
        Seeds the subsample, the classifiers and the untrained network: pass the trained
        model's seed so both networks start from the same weights.
    progress
        Show a progress bar over the steps.

    Returns
    -------
    Diagnosis
    """
    inp = D.diagnostic_inputs(model, adata, label_key=label_key, max_cells=max_cells, seed=seed)
    net = copy.deepcopy(model.model).eval()  # the caller's network keeps its mode
    x, lib = inp.inputs, inp.library
    if inp.split is None or inp.labels is None:
        raise ValueError(
            f"diagnose needs obs[{K.SPLIT!r}] and obs[{label_key!r}]; load the data with "
            "scvit_core.load_dataset or add them (scvit_core.data.add_split)"
        )
    test = np.flatnonzero(inp.split == "test")
    train = np.flatnonzero(inp.split == "train")
    rng = np.random.default_rng(seed)
    explained = np.sort(rng.choice(test, min(attribution_cells, test.size), replace=False))
    if untrained is None:
        untrained = untrained_like(model, seed=seed)
    steps: dict[str, Callable[[], dict[str, pd.DataFrame]]] = {
        "entropy": lambda: {"entropy": D.attention_entropy(net, x, library=lib)},
        "update_norms": lambda: {"update_norms": D.update_norms(net, x, library=lib)},
        "branches": lambda: dict(
            zip(
                ("branches", "sanity"),
                branch_shares(
                    net,
                    x[explained],
                    x[train].mean(0, keepdim=True),
                    library=lib[explained],
                ),
                strict=True,
            )
        ),
        "knockout": lambda: {
            "knockout": D.attention_knockout(
                net, x, inp.counts, library=lib, labels=inp.labels, split=inp.split, seed=seed
            )
        },
        "effective_rank": lambda: {"effective_rank": D.effective_rank(net, x, library=lib)},
        "stem": lambda: {
            "stem": D.stem_span(net, x),
            "token_similarity": D.token_similarity(net, x),
        },
        "gene_tokens": lambda: {"gene_tokens": D.gene_token_summary(D.decoder_gene_tokens(net))},
        "probes": lambda: {"probes": _probes(net, untrained, inp, seed)},
        "beyond_null": lambda: {
            "beyond_null": D.likelihood_beyond_null(net, x, inp.counts, inp.split, library=lib)
        },
    }
    if not net.config.attention:  # scPerceiver's constant mixing weights are no attention
        for name in ("entropy", "update_norms", "branches", "knockout"):
            steps.pop(name)
    if not (getattr(net.config, "conv_stem", False) and hasattr(net, "stem")):
        steps.pop("stem")  # scViT's conv stem only
    if not callable(getattr(net, "split_head", None)):
        steps.pop("gene_tokens")  # scViT's output head only
    tables, seconds = {}, {}
    bar = tqdm(steps.items(), desc="diagnose", disable=not progress)
    for name, step in bar:
        bar.set_postfix_str(name)
        start = time.perf_counter()
        tables.update(step())
        seconds[name] = time.perf_counter() - start
    config = net.config
    description = {
        "network": type(net).__name__,
        "likelihood": config.likelihood,
        "attention": config.attention,
        # the switches each architecture has (scViT: stem, patch-wise; scPerceiver: tokens...)
        **{
            key: getattr(config, key)
            for key in ("conv_stem", "patchwise", "tokens", "library_scaling", "variational")
            if hasattr(config, key)
        },
        "cells": int(x.shape[0]),
        "test_cells": int(test.size),
        "attribution_cells": int(explained.size),
        "seed": seed,
    }
    return Diagnosis(tables, seconds, description)


def untrained_like(model, *, seed: int = 0):
    """The API model's network with its initial (random) weights, for the untrained probes.

    Built as the trained model was, from its configuration and input transform with ``seed``:
    :meth:`~scvit_core.api.AutoencoderModel.untrained` for an API model (the weights of
    :func:`scvit_core.baselines.untrained_scvit` for scViT; no data needed, so a model loaded
    without data works too), ``type(model)(adata, config, seed=, input_transform=)`` for any
    other class.
    """
    from scvit_core.api import AutoencoderModel

    if isinstance(model, AutoencoderModel):
        return model.untrained(seed=seed)
    kwargs = dict(seed=seed, input_transform=model.train_config.input_transform)
    return type(model)(model.adata, model.config, **kwargs)


def _probes(net, untrained, inp: D.DiagnosticInputs, seed: int) -> pd.DataFrame:
    frames = [
        D.layer_probes(
            net, inp.inputs, inp.labels, inp.split, seed=seed, library=inp.library
        ).assign(state="trained")
    ]
    if untrained is not False:
        frames.append(
            D.layer_probes(
                copy.deepcopy(untrained.model).eval(),
                inp.inputs,
                inp.labels,
                inp.split,
                seed=seed,
                library=inp.library,
            ).assign(state="untrained")
        )
    return pd.concat(frames, ignore_index=True)


def diagnose_run(result, *, force: bool = False, progress: bool = True, **kwargs) -> Diagnosis:
    """:func:`diagnose` of an experiment runner's run, cached beside the run.

    Parameters
    ----------
    result
        A :class:`~scvit_core.experiments.ExperimentResult` of a run whose
        ``load_model()`` gives a trained API model (an scViT run, or any network
        :func:`diagnose` takes).
    force
        Recompute even if ``<run>/diagnosis/`` holds a report.
    **kwargs
        Passed to :func:`diagnose` (the seed is the run's, so the untrained network starts
        from the trained one's initial weights).
    """
    out = Path(result.directory) / "diagnosis"
    if (out / "diagnosis.json").exists() and not force:
        return Diagnosis.load(out)
    report = diagnose(result.load_model(), seed=result.spec.seed, progress=progress, **kwargs)
    report.save(out)
    return report
