"""scripts/check_book.py on a tiny handmade site: a good page passes, a broken one fails."""

import importlib.util
import sys
from pathlib import Path

import pytest

pytest.importorskip("playwright")

SCRIPT = Path(__file__).resolve().parents[1] / "scripts" / "check_book.py"
spec = importlib.util.spec_from_file_location("check_book", SCRIPT)
check_book = importlib.util.module_from_spec(spec)
sys.modules["check_book"] = check_book  # dataclasses look their module up there
spec.loader.exec_module(check_book)

CHROMIUM = check_book.find_chromium(install=False)
pytestmark = pytest.mark.skipif(CHROMIUM is None, reason="no chromium (make browser installs it)")

# a 1x1 PNG
PIXEL = bytes.fromhex(
    "89504e470d0a1a0a0000000d4948445200000001000000010806000000"
    "1f15c4890000000d4944415478da63f8cfc0f01f0005000201a0e3b8cb0000000049454e44ae426082"
)
NAV = '<nav class="bd-docs-nav"><a href="index.html">home</a> <a href="good.html">good</a></nav>'


def page(body: str, nav: str = NAV) -> str:
    return f"<!DOCTYPE html><html><head><title>t</title></head><body>{nav}{body}</body></html>"


@pytest.fixture
def site(tmp_path: Path) -> Path:
    (tmp_path / "img.png").write_bytes(PIXEL)
    (tmp_path / "index.html").write_text(page('<p id="top">home <a href="good.html#fig">x</a></p>'))
    (tmp_path / "good.html").write_text(
        page(
            '<section id="fig"><figure><img src="img.png"><figcaption>Fig. 1 a pixel</figcaption>'
            '</figure></section><a href="index.html#top">up</a>'
            '<div class="cell_output" style="width: 300px"><pre>a short line</pre>'
            "<details><pre>" + "folded " * 100 + "</pre></details></div>"
        )
    )
    (tmp_path / "bad.html").write_text(
        page(
            '<img src="missing.png">'
            '<a href="nowhere.html">dead</a> <a href="good.html#no-such-id">dead anchor</a>'
            '<div class="output traceback"><pre>ValueError: boom</pre></div>'
            '<div class="output stderr"><pre>Traceback (most recent call last):</pre></div>'
            '<div class="output stderr"><pre>a harmless warning</pre></div>'
            '<div class="cell_output" style="width: 300px">'
            '<pre style="overflow-x: auto">' + "a very long line " * 40 + "</pre>"
            '<table><tr><td style="min-width: 900px">wide</td></tr></table></div>'
            '<figure><img src="img.png"><figcaption> </figcaption></figure>'
            "<script>undefinedFunction();</script>",
            nav='<nav class="bd-docs-nav"><a href="index.html">home</a></nav>',
        )
    )
    return tmp_path


def test_good_pages_pass_and_a_broken_page_fails(site: Path):
    reports = check_book.check_book(site, toc_docs=["index", "good"], chromium=CHROMIUM)
    by_page = {r.page: r for r in reports}
    assert by_page["index.html"].ok, by_page["index.html"].problems
    assert by_page["good.html"].ok, by_page["good.html"].problems
    assert by_page["good.html"].images == 1

    problems = "\n".join(by_page["bad.html"].problems)
    assert "image did not load: missing.png" in problems
    assert "HTTP 404: missing.png" in problems
    assert "broken link: nowhere.html" in problems
    assert "broken anchor: good.html#no-such-id" in problems
    assert "error output in a cell: ValueError: boom" in problems
    assert "stderr output with 'Traceback'" in problems
    assert "harmless" not in problems
    assert "uncaught JavaScript" in problems
    assert "navigation does not reach: good" in problems
    assert "output pre wider than the content column" in problems
    assert "'a very long line a very long line" in problems
    assert "output table wider than the content column" in problems
    assert "figure without a caption: missing.png" in problems
    assert "figure without a caption: img.png" in problems  # an empty caption
    assert "folded" not in "\n".join(by_page["good.html"].problems)


def test_a_toc_document_that_was_not_built_fails(site: Path):
    reports = check_book.check_book(
        site, toc_docs=["index", "good", "chapter"], chromium=CHROMIUM, pages=["index.html"]
    )
    problems = [p for r in reports for p in r.problems]
    assert "chapter is in the TOC but not built" in problems
    assert any(p.startswith("navigation does not reach: chapter") for p in problems)


def test_toc_documents_reads_jupyter_book_tocs(tmp_path: Path):
    toc = tmp_path / "_toc.yml"
    toc.write_text(
        "format: jb-book\nroot: book/intro\nchapters:\n"
        "  - file: notebooks/01_data\n    sections:\n      - file: notebooks/01b.ipynb\n"
        "  - file: book/references\n"
    )
    assert check_book.toc_documents(toc) == [
        "book/intro",
        "notebooks/01_data",
        "notebooks/01b",
        "book/references",
    ]


def test_a_pending_page_reports_layout_problems_without_failing(site: Path):
    (site / "bad.html").write_text(
        page(
            '<div class="cell_output" style="width: 300px">'
            '<pre style="overflow-x: auto">' + "a very long line " * 40 + "</pre></div>"
            '<img src="img.png">'
        )
    )
    reports = check_book.check_book(
        site, chromium=CHROMIUM, pages=["bad.html"], pending={"bad.html"}
    )
    assert reports[0].ok, reports[0].problems
    pending = "\n".join(reports[0].pending)
    assert "wider than the content column" in pending
    assert "figure without a caption: img.png" in pending
