"""Execute the book's notebooks a few at a time into Jupyter Book's execution cache.

``jupyter-book build`` (``execute_notebooks: cache``) executes the notebooks one after the
other; most pages take seconds once ``python -m scvit_core.study`` has trained and diagnosed
every run, but one core idles while the longest page runs. This script executes every
notebook of the table of contents that the cache does not hold, ``--workers`` at a time (each
kernel with its share of the CPU threads), and stores each in the same jupyter-cache database
the way myst-nb does (``myst_nb.core.execute.cache``), so the build that follows reads them
all from the cache and only renders::

    python scripts/execute_notebooks.py --toc book/_toc.yml --path-output _build/cpu --workers 2

A notebook that fails is reported with its traceback and the script exits with status 1 (the
build would fail on it too); the others still run.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from concurrent.futures import ThreadPoolExecutor, as_completed
from pathlib import Path

import nbformat
import yaml
from jupyter_cache import get_cache
from jupyter_cache.base import CacheBundleIn
from jupyter_cache.executors.utils import single_nb_execution

ROOT = Path(__file__).resolve().parent.parent
THREAD_VARIABLES = ("OMP_NUM_THREADS", "MKL_NUM_THREADS")


def toc_notebooks(toc: Path, root: Path = ROOT) -> list[Path]:
    """The ``.ipynb`` files of a jb-book table of contents (paths relative to ``root``)."""
    entries = yaml.safe_load(toc.read_text())
    files = [entries["root"]]
    stack = list(entries.get("parts", [])) + list(entries.get("chapters", []))
    while stack:
        entry = stack.pop(0)
        if "file" in entry:
            files.append(entry["file"])
        stack[:0] = list(entry.get("chapters", [])) + list(entry.get("sections", []))
    paths = [root / f"{name}.ipynb" for name in files]
    return [p for p in paths if p.exists()]


def _cached(cache, path: Path) -> bool:
    try:  # the match myst-nb makes: the code cells and the kernel spec
        cache.match_cache_notebook(nbformat.read(path, as_version=4))
    except KeyError:
        return False
    return True


def _execute(path: Path, timeout: int):
    nb = nbformat.read(path, as_version=4)
    result = single_nb_execution(
        nb, cwd=str(Path(path).parent), timeout=timeout, allow_errors=False, meta_override=True
    )
    return nb, result.time, result.exc_string if result.err is not None else None


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--toc", type=Path, default=ROOT / "book" / "_toc.yml")
    parser.add_argument("--root", type=Path, default=ROOT, help="the book's root directory")
    parser.add_argument("--path-output", type=Path, required=True, help="jupyter-book's")
    parser.add_argument("--workers", type=int, default=2, help="notebooks executed at once")
    parser.add_argument("--timeout", type=int, default=10800, help="seconds per notebook")
    parser.add_argument(
        "--first",
        type=Path,
        action="append",
        default=[],
        help="a notebook to start before the others, e.g. the longest, so that no core idles "
        "while it ends the run alone (repeatable; paths as in the table of contents)",
    )
    args = parser.parse_args(argv)
    if args.workers < 1:
        parser.error(f"--workers must be at least 1, got {args.workers}")
    if not args.root.is_dir():
        parser.error(f"--root: no directory {args.root} (the book's root, with its notebooks)")
    if not args.toc.is_file():
        parser.error(f"--toc: no table of contents at {args.toc} (e.g. book/_toc.yml)")
    try:
        notebooks = toc_notebooks(args.toc, args.root)
    except (yaml.YAMLError, KeyError, TypeError, AttributeError) as error:
        parser.error(f"--toc: {args.toc} is not a jb-book table of contents ({error!r})")

    listed = {p.resolve() for p in notebooks}
    first = [(args.root / p).resolve() for p in args.first]
    unknown = [p for p, full in zip(args.first, first, strict=True) if full not in listed]
    if unknown:
        parser.error(f"--first: {unknown[0]} is not a notebook of {args.toc}")

    cache = get_cache(str(args.path_output / "_build" / ".jupyter_cache"))
    pending = [p for p in notebooks if not _cached(cache, p)]
    rank = {full: i for i, full in enumerate(first)}
    pending.sort(key=lambda p: rank.get(p.resolve(), len(first)))  # stable: then the toc's order
    print(f"executing {len(pending)} notebooks, {args.workers} at a time", flush=True)
    start, failed = time.perf_counter(), []
    # each kernel (a process started by a thread here) inherits its share of the cores
    threads = str(max(1, (os.cpu_count() or 1) // args.workers))
    saved = {name: os.environ.get(name) for name in THREAD_VARIABLES}
    os.environ.update(dict.fromkeys(THREAD_VARIABLES, threads))
    try:
        with ThreadPoolExecutor(args.workers) as pool:
            futures = {pool.submit(_execute, p, args.timeout): p for p in pending}
            for future in as_completed(futures):
                path = futures[future]
                failed += _store(cache, path, *future.result(), args.root)
    finally:
        for name, value in saved.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value
    print(
        f"{len(pending) - len(failed)} notebooks executed in "
        f"{time.perf_counter() - start:.0f} s" + (f"; failed: {failed}" if failed else ""),
        flush=True,
    )
    return 1 if failed else 0


def _store(cache, path: Path, nb, seconds: float, error: str | None, root: Path) -> list[str]:
    """Cache an executed notebook as myst-nb does; ``[name]`` if it failed, else ``[]``."""
    name = str(path.relative_to(root))
    if error is not None:
        print(f"{name}: FAILED\n{error}", flush=True)
        return [name]
    record = cache.add_nb_to_project(str(path))  # as myst-nb stages it
    cache.cache_notebook_bundle(
        CacheBundleIn(nb, record.uri, data={"execution_seconds": seconds}),
        check_validity=False,
        overwrite=True,
    )
    print(f"{name}: {seconds:.0f} s", flush=True)
    return []


if __name__ == "__main__":
    sys.exit(main())
