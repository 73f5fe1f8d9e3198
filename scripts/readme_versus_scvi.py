"""Copy the RESULT lines of ``benchmarks/results/versus_scvi_*.txt`` into the README.

::

    python benchmarks/versus_scvi.py --dataset NAME > benchmarks/results/versus_scvi_NAME.txt
    python scripts/readme_versus_scvi.py

A benchmark still running (no RESULT line yet) contributes its finished per-seed rows.
"""

from __future__ import annotations

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def main() -> None:
    lines = []
    for path in sorted((ROOT / "benchmarks" / "results").glob("versus_scvi_*.txt")):
        text = path.read_text().splitlines()
        result = [line for line in text if line.startswith("RESULT ")]
        if result:
            lines += result
        else:
            lines += [f"# {path.name}: unfinished, rows so far:"]
            lines += [line for line in text if line.startswith("model=")]
    readme = ROOT / "README.md"
    block = (
        "<!-- versus-scvi:start -->\n```\n" + "\n".join(lines) + "\n```\n<!-- versus-scvi:end -->"
    )
    text = re.sub(
        r"<!-- versus-scvi:start -->.*<!-- versus-scvi:end -->",
        block,
        readme.read_text(),
        flags=re.S,
    )
    readme.write_text(text)
    print("\n".join(lines))


if __name__ == "__main__":
    main()
