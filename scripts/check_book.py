"""Check the built HTML book in a real browser: headless Chromium driven by Playwright.

    python scripts/check_book.py [HTML_DIR] [--toc book/_toc.yml] [--chromium PATH]
    python scripts/check_book.py --browser-only     # install Chromium if missing, then exit

HTML_DIR (default ``_build/ci/_build/html``, what ``make check-book`` builds) is served from
127.0.0.1 and every HTML page in it is opened in Debian's Chromium (``apt-get install -y
chromium`` is run when no ``chromium`` is found and we are root). A page fails when

* a cell shows an error: a traceback output, or stderr output naming a Traceback or an Error;
* the browser logs a JavaScript console error or an uncaught exception;
* an image does not load (a failed request, or ``naturalWidth == 0``), or any other request of
  the page fails, or the page asks for something outside the book (it must work offline);
* an internal link points at a file that does not exist, or at an ``#anchor`` that is no
  element id of its target page;
* its navigation sidebar does not reach every document of the table of contents (and every
  document of the table of contents must have been built);
* a cell's output is wider than the content column at the width a reader opens the book with
  (``VIEWPORT``, 1300 px): a line of text (or a table) the reader would have to scroll sideways
  to read;
* an image of the page's content is not inside a figure with a caption (a ``{glue:figure}`` or
  a MyST figure: numbered, captioned, citable by ``{numref}``).

Each page's line also counts the code cells whose input is shown unfolded (``hide-input``
folds a cell's code behind a toggle). ``--pending PAGE`` (repeatable) lists pages whose
presentation is still being reworked: their clipped outputs and uncaptioned figures are printed
as ``pending`` without failing the page; every other check still applies to them.

Prints one line per page (and one per problem) and exits non-zero if any page fails.
Playwright is used with the system's Chromium (``executable_path``): it downloads nothing.
"""

from __future__ import annotations

import argparse
import functools
import html.parser
import http.server
import os
import re
import shutil
import subprocess
import sys
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import unquote, urldefrag, urlparse

DEFAULT_HTML = Path("_build/ci/_build/html")
DEFAULT_TOC = Path("book/_toc.yml")
SKIP_DIRS = {"_static", "_sources", "_images"}  # assets, not pages
NAV_SELECTOR = "nav.bd-docs-nav"  # sphinx-book-theme's left sidebar
VIEWPORT = {"width": 1300, "height": 900}  # a laptop's browser window
STDERR_ERROR = re.compile(r"Traceback|\b[A-Za-z]*Error\b")

# Runs in the page once it has loaded: the facts the checks need, read from the live DOM.
PAGE_FACTS_JS = """
async (navSelector) => {
  const images = Array.from(document.images);
  images.forEach((img) => { img.loading = "eager"; });
  await Promise.all(images.map((img) => img.complete ? null : new Promise((done) => {
    img.addEventListener("load", done, {once: true});
    img.addEventListener("error", done, {once: true});
  })));
  const nav = document.querySelector(navSelector);
  return {
    images: images.map((img) => ({src: img.currentSrc || img.src,
                                  ok: img.complete && img.naturalWidth > 0})),
    links: Array.from(document.querySelectorAll("a[href]")).map((a) => a.href),
    ids: Array.from(document.querySelectorAll("[id], a[name]"))
      .map((e) => e.id || e.getAttribute("name")),
    nav: nav === null ? null : Array.from(nav.querySelectorAll("a[href]")).map((a) => a.href),
    tracebacks: Array.from(document.querySelectorAll(".output.traceback"))
      .map((e) => e.innerText),
    stderr: Array.from(document.querySelectorAll(".output.stderr")).map((e) => e.innerText),
    clipped: clippedOutputs(),
    uncaptioned: uncaptionedImages(),
    shownInputs: Array.from(document.querySelectorAll(".cell_input"))
      .filter(visible).length,
  };

  // Rendered for the reader: not display:none and not inside a closed <details> (a fold).
  function visible(e) {
    return e.checkVisibility ? e.checkVisibility() : e.getClientRects().length > 0;
  }

  // Outputs a reader sees (not folded away) that are wider than the box they are shown in.
  function clippedOutputs() {
    const found = [];
    for (const output of document.querySelectorAll(".cell_output")) {
      if (!visible(output)) continue;  // folded (hide-output)
      const box = output.getBoundingClientRect().width;
      for (const el of output.querySelectorAll("pre, table")) {
        if (!visible(el)) continue;
        const over = el.tagName === "PRE"
          ? el.scrollWidth - el.clientWidth
          : el.getBoundingClientRect().width - box;
        if (over > 1) {
          const lines = el.innerText.split("\\n");
          const longest = lines.reduce((a, b) => (b.length > a.length ? b : a), "");
          found.push({tag: el.tagName.toLowerCase(), over: Math.round(over),
                      line: el.tagName === "PRE" ? longest : lines[0]});
        }
      }
    }
    return found;
  }

  // Images of the page's content that are not in a <figure> with a non-empty <figcaption>.
  function uncaptionedImages() {
    const content = document.querySelector("article") || document.body;
    return Array.from(content.querySelectorAll("img"))
      .filter((img) => {
        const figure = img.closest("figure");
        const caption = figure && figure.querySelector("figcaption");
        return !(caption && caption.innerText.trim());
      })
      .map((img) => img.getAttribute("src") || "");
  }
}
"""


@dataclass
class PageReport:
    """What the browser found on one page."""

    page: str
    problems: list[str] = field(default_factory=list)
    images: int = 0
    links: int = 0
    shown_inputs: int = 0  # code cells whose input is not folded
    pending: list[str] = field(default_factory=list)  # presentation problems of a --pending page

    @property
    def ok(self) -> bool:
        return not self.problems


# the browser -------------------------------------------------------------------------------


def find_chromium(path: str | None = None, *, install: bool = True) -> str | None:
    """Path of a Chromium executable; installs Debian's ``chromium`` if allowed and missing."""
    if path:
        return path if Path(path).exists() else shutil.which(path)
    for name in ("chromium", "chromium-browser"):
        if found := shutil.which(name):
            return found
    if not install:
        return None
    if os.geteuid() != 0 or not shutil.which("apt-get"):
        raise SystemExit(
            "No chromium found: install it (Debian/Ubuntu: `apt-get install -y chromium`) or "
            "pass --chromium PATH."
        )
    print("chromium not found: installing Debian's package", flush=True)
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    install_cmd = ["apt-get", "install", "-y", "chromium"]
    if subprocess.run(install_cmd, env=env).returncode != 0:  # stale package lists
        subprocess.run(["apt-get", "update"], env=env, check=True)
        subprocess.run(install_cmd, env=env, check=True)
    return shutil.which("chromium")


@contextmanager
def serve(directory: Path) -> Iterator[str]:
    """Serve ``directory`` over HTTP on 127.0.0.1 (a free port); yields the base URL."""

    class Quiet(http.server.SimpleHTTPRequestHandler):
        def log_message(self, *args) -> None:
            pass

    handler = functools.partial(Quiet, directory=str(directory))
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}/"
    finally:
        server.shutdown()
        server.server_close()


# the table of contents ---------------------------------------------------------------------


def toc_documents(toc: Path) -> list[str]:
    """Every document of a Jupyter Book ``_toc.yml`` (root, parts, chapters, sections)."""
    import yaml

    data = yaml.safe_load(toc.read_text())
    docs = [data["root"]]

    def walk(entries: list[dict]) -> None:
        for entry in entries or []:
            if "file" in entry:
                docs.append(str(Path(entry["file"]).with_suffix("")))
            walk(entry.get("sections", []))
            walk(entry.get("chapters", []))

    walk(data.get("chapters", []))
    for part in data.get("parts", []):
        walk(part.get("chapters", []))
    return docs


# checks ------------------------------------------------------------------------------------


def html_pages(html_dir: Path) -> list[str]:
    """Pages of the built book, relative to ``html_dir``, sorted."""
    return sorted(
        p.relative_to(html_dir).as_posix()
        for p in html_dir.rglob("*.html")
        if not SKIP_DIRS & set(p.relative_to(html_dir).parts)
    )


def check_book(
    html_dir: Path,
    *,
    toc_docs: list[str] | None = None,
    chromium: str,
    pages: list[str] | None = None,
    pending: set[str] = frozenset(),
) -> list[PageReport]:
    """Open every page of ``html_dir`` in headless Chromium and check it (see the module doc).

    ``toc_docs`` (document names without suffix) enables the navigation check; ``pages``
    restricts the pages opened (default: every HTML page); on the ``pending`` pages, clipped
    outputs and uncaptioned figures go to ``PageReport.pending`` instead of failing the page.
    """
    from playwright.sync_api import sync_playwright

    html_dir = html_dir.resolve()
    pages = html_pages(html_dir) if pages is None else pages
    reports: dict[str, PageReport] = {}
    ids: dict[str, set[str]] = {}
    links: dict[str, list[str]] = {}
    with serve(html_dir) as base, sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=chromium)
        context = browser.new_context(viewport=VIEWPORT)
        outside: list[str] = []

        def only_local(route) -> None:
            if route.request.url.startswith(base):
                route.continue_()
            else:  # the book must work offline: nothing may be fetched from elsewhere
                outside.append(route.request.url)
                route.abort()

        context.route("**/*", only_local)
        for name in pages:
            report = reports[name] = PageReport(name)
            page = context.new_page()
            outside.clear()
            problems = report.problems

            def on_console(message, problems=problems) -> None:
                if message.type == "error":
                    where = message.location.get("url", "")
                    problems.append(
                        f"console error: {message.text}" + (f" ({where})" * bool(where))
                    )

            def on_request_failed(request, problems=problems) -> None:
                if request.url.startswith(base):  # outside requests are reported below
                    problems.append(
                        f"request failed: {_short(request.url, base)} ({request.failure})"
                    )

            def on_response(response, problems=problems) -> None:
                if response.status >= 400:
                    problems.append(f"HTTP {response.status}: {_short(response.url, base)}")

            page.on("console", on_console)
            page.on(
                "pageerror", lambda error, p=problems: p.append(f"uncaught JavaScript: {error}")
            )
            page.on("requestfailed", on_request_failed)
            page.on("response", on_response)
            page.goto(base + name, wait_until="load")
            facts = _page_facts(page)
            page.close()

            problems += [f"requested from outside the book: {url}" for url in outside]
            for text in facts["tracebacks"]:
                problems.append(f"error output in a cell: {_first_line(text)}")
            for text in facts["stderr"]:
                if match := STDERR_ERROR.search(text):
                    problems.append(f"stderr output with {match.group(0)!r}: {_first_line(text)}")
            layout = report.pending if name in pending else problems
            for clip in facts["clipped"]:
                layout.append(
                    f"output {clip['tag']} wider than the content column by {clip['over']} px: "
                    f"{clip['line'].strip()[:100]!r}"
                )
            for src in facts["uncaptioned"]:
                layout.append(f"figure without a caption: {src}")
            report.shown_inputs = facts["shownInputs"]
            report.images = len(facts["images"])
            for image in facts["images"]:
                if not image["ok"]:
                    problems.append(f"image did not load: {_short(image['src'], base)}")
            ids[name] = set(facts["ids"])
            links[name] = facts["links"]
            if toc_docs is not None:
                _check_nav(facts["nav"], toc_docs, base, problems)
        browser.close()

    for name, hrefs in links.items():
        report = reports[name]
        local = [h for h in hrefs if h.startswith(base)]
        report.links = len(local)
        for href in local:
            if problem := _check_link(href, base, html_dir, ids):
                report.problems.append(problem)
    for doc in toc_docs or []:
        if not (html_dir / f"{doc}.html").exists():
            reports.setdefault("(table of contents)", PageReport("(table of contents)"))
            reports["(table of contents)"].problems.append(f"{doc} is in the TOC but not built")
    return list(reports.values())


def _page_facts(page, attempts: int = 3) -> dict:
    """Run PAGE_FACTS_JS once the page has settled (a redirecting page navigates first)."""
    from playwright.sync_api import Error

    for attempt in range(attempts):
        page.wait_for_load_state("networkidle")
        try:
            return page.evaluate(PAGE_FACTS_JS, NAV_SELECTOR)
        except Error:  # the page navigated (e.g. index.html's redirect) while we read it
            if attempt == attempts - 1:
                raise
    raise AssertionError("unreachable")


def _check_nav(nav: list[str] | None, toc_docs: list[str], base: str, problems: list[str]):
    if nav is None:
        problems.append("no navigation sidebar")
        return
    reached = {_target(href, base)[0] for href in nav if href.startswith(base)}
    missing = [doc for doc in toc_docs if f"{doc}.html" not in reached]
    if missing:
        problems.append(f"navigation does not reach: {', '.join(missing)}")


def _target(href: str, base: str) -> tuple[str, str]:
    """``(file relative to the book, fragment)`` of a URL under ``base``."""
    url, fragment = urldefrag(href)
    path = unquote(urlparse(url).path)[len(urlparse(base).path) :]
    if path == "" or path.endswith("/"):
        path += "index.html"
    return path, unquote(fragment)


def _check_link(href: str, base: str, html_dir: Path, ids: dict[str, set[str]]) -> str | None:
    path, fragment = _target(href, base)
    if not (html_dir / path).is_file():
        return f"broken link: {_short(href, base)} (no file {path})"
    if fragment and path.endswith(".html"):
        if path not in ids:
            ids[path] = _file_ids(html_dir / path)
        if fragment not in ids[path]:
            return f"broken anchor: {_short(href, base)} (no id {fragment!r} in {path})"
    return None


def _file_ids(path: Path) -> set[str]:
    """Element ids of a page not opened in the browser (stdlib parser)."""

    class Ids(html.parser.HTMLParser):
        def __init__(self) -> None:
            super().__init__()
            self.ids: set[str] = set()

        def handle_starttag(self, tag, attrs) -> None:
            for key, value in attrs:
                if key == "id" or (tag == "a" and key == "name"):
                    self.ids.add(value or "")

    parser = Ids()
    parser.feed(path.read_text(encoding="utf-8", errors="replace"))
    return parser.ids


def _short(url: str, base: str) -> str:
    return url[len(base) :] if url.startswith(base) else url


def _first_line(text: str, limit: int = 160) -> str:
    lines = [line for line in text.strip().splitlines() if line.strip()]
    line = next((ln for ln in lines if STDERR_ERROR.search(ln)), lines[0] if lines else "")
    return line[:limit]


# command line ------------------------------------------------------------------------------


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("html_dir", nargs="?", type=Path, default=DEFAULT_HTML)
    parser.add_argument("--toc", type=Path, default=DEFAULT_TOC, help="the book's _toc.yml")
    parser.add_argument("--chromium", help="Chromium executable (default: chromium on PATH)")
    parser.add_argument(
        "--pending",
        action="append",
        default=[],
        metavar="PAGE",
        help="a page (e.g. notebooks/08_scperceiver.html) whose clipped outputs and "
        "uncaptioned figures are reported without failing it",
    )
    parser.add_argument(
        "--browser-only", action="store_true", help="install Chromium if missing, then exit"
    )
    args = parser.parse_args(argv)

    chromium = find_chromium(args.chromium)
    if args.browser_only:
        print(f"chromium: {chromium}")
        return 0
    if not (args.html_dir / "index.html").exists():
        print(f"no built book in {args.html_dir} (run `make check-book`)", file=sys.stderr)
        return 1
    toc_docs = toc_documents(args.toc) if args.toc else None
    pending = {p if p.endswith(".html") else f"{p}.html" for p in args.pending}
    reports = check_book(args.html_dir, toc_docs=toc_docs, chromium=chromium, pending=pending)
    width = max(len(r.page) for r in reports)
    for r in reports:
        state = "ok  " if r.ok else "FAIL"
        print(
            f"{state} {r.page:<{width}}  {r.images:3d} images  {r.links:4d} internal links  "
            f"{r.shown_inputs:3d} code cells unfolded"
        )
        for problem in r.pending:
            print(f"       - pending: {problem}")
        for problem in r.problems:
            print(f"       - {problem}")
    failed = [r for r in reports if not r.ok]
    print(
        f"check_book: {len(reports) - len(failed)} of {len(reports)} pages passed "
        f"({args.html_dir}, TOC {args.toc})"
    )
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
