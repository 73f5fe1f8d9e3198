"""Copy a figure of a built chapter into the repository, for the README.

    python scripts/readme_figure.py PAGE.html --section ID [--index N] [--out PATH]

PAGE.html is a page of the built book (``make readme-figure`` uses the results page,
``_build/cpu/_build/html/notebooks/study_at_a_glance.html``); ``--section`` is the id of the
figure (a ``{glue:figure}``'s ``:name:``, as in ``study_at_a_glance.html#fig-glance-why``) or
of the section holding it (the anchor of its heading), and ``--index`` picks among the images
there (default: the first). The image file the
page shows is copied to ``--out`` (default ``book/figures/key_figure.png``), so the README shows
exactly what the book shows. ``make readme-figure`` runs this on the last ``make book``.
"""

from __future__ import annotations

import argparse
import html.parser
import shutil
import sys
from pathlib import Path
from urllib.parse import unquote, urlparse

DEFAULT_OUT = Path("book/figures/key_figure.png")


class _SectionImages(html.parser.HTMLParser):
    """``src`` of every ``<img>`` with the ids of the ``<section>``/``<figure>`` around it."""

    def __init__(self) -> None:
        super().__init__()
        self.stack: list[str | None] = []  # ids of the open <section> and <figure> elements
        self.images: list[tuple[str, set[str]]] = []

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        values = dict(attrs)
        if tag in ("section", "figure"):
            self.stack.append(values.get("id"))
        elif tag == "img" and values.get("src"):
            self.images.append((values["src"], {s for s in self.stack if s}))

    def handle_endtag(self, tag: str) -> None:
        if tag in ("section", "figure") and self.stack:
            self.stack.pop()


def section_images(page: Path, section: str) -> list[Path]:
    """Image files shown in ``section`` of ``page``, in page order."""
    parser = _SectionImages()
    parser.feed(page.read_text(encoding="utf-8"))
    found = [src for src, sections in parser.images if section in sections]
    return [(page.parent / unquote(urlparse(src).path)).resolve() for src in found]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("page", type=Path, help="a chapter of the built book (.html)")
    parser.add_argument("--section", required=True, help="id of the section with the figure")
    parser.add_argument("--index", type=int, default=0, help="which image of the section")
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT)
    args = parser.parse_args(argv)

    if not args.page.is_file():
        print(f"no built page {args.page}: build the book first (make book)", file=sys.stderr)
        return 1
    images = section_images(args.page, args.section)
    if not images:
        print(f"no image in section #{args.section} of {args.page}", file=sys.stderr)
        return 1
    if not 0 <= args.index < len(images):
        print(f"section #{args.section} has {len(images)} image(s)", file=sys.stderr)
        return 1
    source = images[args.index]
    if source.suffix.lower() != args.out.suffix.lower():
        print(f"{source.name} is not a {args.out.suffix} file", file=sys.stderr)
        return 1
    args.out.parent.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(source, args.out)
    print(f"{args.page}#{args.section} [{args.index}] -> {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
