"""Write the README's results table: the table of "The study at a glance", copied from the book.

    python scripts/results_table.py PAGE.html [--section ID] [--readme README.md] [--check]

PAGE.html is the results page of a built book (``make results-table`` passes
``_build/<profile>/_build/html/notebooks/study_at_a_glance.html``, the last ``make book``);
the table in its section ``--section`` (default ``the-results-table``) is the one a cell of
that page computes from the cached runs, so the README shows exactly the book's numbers. It
replaces the text between the README's ``<!-- results:start -->`` and ``<!-- results:end -->``
markers; ``--check`` only says whether the README is current.
"""

from __future__ import annotations

import argparse
import html.parser
import json
import os
import re
import sys
from pathlib import Path

START, END = "<!-- results:start -->", "<!-- results:end -->"
PAGE_SOURCE = "notebooks/study_at_a_glance.ipynb"
SECTION = "the-results-table"


class _SectionTables(html.parser.HTMLParser):
    """The rows (lists of cell texts) of every ``<table>``, with the ids of its sections."""

    def __init__(self) -> None:
        super().__init__()
        self.stack: list[set[str]] = []  # ids of the open <section> elements
        self.tables: list[tuple[list[list[str]], set[str]]] = []
        self.cell: list[str] | None = None

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        values = dict(attrs)
        if tag == "section":
            self.stack.append({values["id"]} if values.get("id") else set())
        elif tag == "span" and values.get("id") and self.stack:
            self.stack[-1].add(values["id"])  # a label's target (`(name)=` before a heading)
        elif tag == "table":
            self.tables.append(([], set().union(*self.stack)))
        elif tag == "tr" and self.tables:
            self.tables[-1][0].append([])
        elif tag in ("td", "th"):
            self.cell = []

    def handle_data(self, data: str) -> None:
        if self.cell is not None:
            self.cell.append(data)

    def handle_endtag(self, tag: str) -> None:
        if tag == "section" and self.stack:
            self.stack.pop()
        elif tag in ("td", "th") and self.cell is not None and self.tables:
            self.tables[-1][0][-1].append(" ".join("".join(self.cell).split()))
            self.cell = None


def section_table(page: Path, section: str) -> list[list[str]]:
    """Rows of the first table in ``section`` of ``page`` (header first)."""
    parser = _SectionTables()
    parser.feed(page.read_text(encoding="utf-8"))
    for rows, sections in parser.tables:
        if section in sections:
            return [row for row in rows if row]
    raise SystemExit(f"no table in section #{section} of {page}")


def markdown(rows: list[list[str]]) -> str:
    width = max(len(row) for row in rows)
    rows = [row + [""] * (width - len(row)) for row in rows]
    lines = ["| " + " | ".join(cell.replace("|", "\\|") for cell in row) + " |" for row in rows]
    lines.insert(1, "|" + "---|" * width)
    return "\n".join(lines)


def block(page: Path, section: str) -> str:
    profile = page.parts[page.parts.index("_build") + 1] if "_build" in page.parts else "?"
    intro = (
        f"Profile `{profile}`: the results table of [The study at a glance]({PAGE_SOURCE}), "
        "copied from the last book build by `make results-table` (mean ± sd over seeds; test "
        "cells; final-epoch weights). Training times are wall-clock seconds on the machine that "
        "made each run; runs that shared its cores with other jobs took longer, so compare "
        "speeds with `make benchmarks` (ratios measured in one run), not with this column."
    )
    table = markdown(section_table(page, section))
    return f"{START}\n{intro}\n\n{table}{provenance(page, profile)}\n{END}"


def provenance(page: Path, profile: str) -> str:
    """The commits that made the stored runs of ``profile`` and the last build's wall time.

    A build that trained every run is also given in units of its own scVI runs at scvi-tools'
    default budget (:func:`scvi_yardstick`), which compares builds made on machines of
    different speed.
    """
    from scvit_core.experiments import results_table

    runs = results_table()
    runs = runs[runs["profile"] == profile] if not runs.empty else runs
    text = ""
    if not runs.empty:
        commits = sorted({str(c)[:10] for c in runs["git_commit"].dropna()})
        text += f"\n\nRuns made at commit{'s' if len(commits) > 1 else ''}: {', '.join(commits)}."
    build = page.parents[len(page.parts) - page.parts.index("_build") - 3] / "build_time.json"
    if build.exists():
        info = json.loads(build.read_text())
        text += (
            f" The `make book` that built the page (commit {info['commit']}, starting with "
            f"{info['runs_before']} stored runs) took {info['seconds'] / 60:.0f} min on "
            f"{os.cpu_count()} CPU cores ({build.name} of `_build/{info['profile']}`)"
        )
        yardstick = scvi_yardstick(runs) if info["runs_before"] == 0 else None
        if yardstick:
            seconds, n = yardstick
            text += (
                f", {info['seconds'] / seconds:.1f} times the mean wall time of its {n} scVI "
                f"runs at scvi-tools' default budget ({seconds:.0f} s each): scVI trains the "
                "same way in every build (scvi-tools is pinned), so the ratio compares builds "
                "on machines of different speed"
            )
        text += "."
    return text


def scvi_yardstick(runs) -> tuple[float, int] | None:
    """Mean whole-run seconds of the scVI runs at the default budget on the profile's dataset.

    ``runs``: :func:`scvit_core.experiments.results_table` rows of one profile; None without
    such runs.
    """
    from scvit_core.experiments import DEFAULT_BUDGET, results_dir
    from scvit_core.profiles import get_profile

    if runs.empty:
        return None
    dataset = get_profile(runs["profile"].iloc[0]).dataset
    chosen = runs[
        (runs["model"] == "scvi")
        & (runs["epochs"] == DEFAULT_BUDGET)
        & (runs["dataset"] == dataset)
    ]
    seconds = [
        json.loads((results_dir() / key / "provenance.json").read_text()).get("run_time_s")
        for key in chosen["key"].unique()
    ]
    seconds = [s for s in seconds if s]
    return (sum(seconds) / len(seconds), len(seconds)) if seconds else None


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("page", type=Path, help="the built results page (.html)")
    parser.add_argument("--section", default=SECTION, help="id of the section with the table")
    parser.add_argument("--readme", type=Path, default=Path(__file__).parents[1] / "README.md")
    parser.add_argument("--check", action="store_true", help="exit 1 if the README is stale")
    args = parser.parse_args(argv)
    if not args.page.is_file():
        print(f"no built page {args.page}: build the book first (make book)", file=sys.stderr)
        return 1
    text = args.readme.read_text()
    if START not in text or END not in text:
        raise SystemExit(f"{args.readme} has no {START} ... {END} markers")
    new = block(args.page, args.section)
    updated = re.sub(re.escape(START) + ".*?" + re.escape(END), lambda _: new, text, flags=re.S)
    if args.check:
        print("README results table is", "current" if updated == text else "STALE")
        return 0 if updated == text else 1
    args.readme.write_text(updated)
    print(f"{args.page}#{args.section} -> the results table of {args.readme}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
