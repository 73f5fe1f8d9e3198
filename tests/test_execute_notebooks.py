"""scripts/execute_notebooks.py fills Jupyter Book's execution cache as myst-nb would."""

import importlib.util
import os
import sys
from pathlib import Path

import nbformat
from jupyter_cache import get_cache

SCRIPT = Path(__file__).resolve().parents[1] / "scripts" / "execute_notebooks.py"


def _load():
    spec = importlib.util.spec_from_file_location("execute_notebooks", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    sys.modules["execute_notebooks"] = module
    spec.loader.exec_module(module)
    return module


execute_notebooks = _load()


def _notebook(path: Path, *sources: str) -> None:
    nb = nbformat.v4.new_notebook()
    nb.metadata["kernelspec"] = {"name": "python3", "display_name": "Python 3"}
    nb.cells = [nbformat.v4.new_code_cell(s) for s in sources]
    nbformat.write(nb, path)


def test_notebooks_are_executed_into_the_cache_and_failures_reported(tmp_path, capsys):
    (tmp_path / "pages").mkdir()
    threads = "import os\nprint(os.environ['OMP_NUM_THREADS'])"
    _notebook(tmp_path / "pages" / "good.ipynb", "x = 1", threads)
    _notebook(tmp_path / "pages" / "bad.ipynb", "raise ValueError('planted')")
    (tmp_path / "intro.md").write_text("# intro\n")
    toc = tmp_path / "_toc.yml"
    toc.write_text(
        "format: jb-book\nroot: intro\nchapters:\n"
        "  - file: pages/good\n  - file: pages/bad\n  - file: references\n"
    )
    assert execute_notebooks.toc_notebooks(toc, tmp_path) == [
        tmp_path / "pages" / "good.ipynb",
        tmp_path / "pages" / "bad.ipynb",
    ]
    out = tmp_path / "_build" / "ci"
    argv = ["--toc", str(toc), "--root", str(tmp_path), "--path-output", str(out)]
    assert execute_notebooks.main([*argv, "--workers", "2"]) == 1  # bad.ipynb fails
    log = capsys.readouterr().out
    assert "pages/bad.ipynb: FAILED" in log and "planted" in log
    assert "1 notebooks executed" in log

    # what myst-nb looks up (execute_notebooks: cache) finds the executed notebook
    cache = get_cache(str(out / "_build" / ".jupyter_cache"))
    record = cache.match_cache_notebook(nbformat.read(tmp_path / "pages" / "good.ipynb", 4))
    _, merged = cache.merge_match_into_notebook(nbformat.read(tmp_path / "pages" / "good.ipynb", 4))
    assert record.data["execution_seconds"] > 0
    cores = max(1, (os.cpu_count() or 1) // 2)
    assert merged.cells[1].outputs[0]["text"].strip() == str(cores)  # the kernel's share

    # a second run executes only what the cache lacks
    toc.write_text("format: jb-book\nroot: intro\nchapters:\n  - file: pages/good\n")
    assert execute_notebooks.main(argv) == 0
    assert "executing 0 notebooks" in capsys.readouterr().out


def test_a_wrong_toc_or_root_is_named(tmp_path, capsys):
    import pytest

    out = ["--path-output", str(tmp_path / "_build")]
    cases = {
        "no table of contents at": ["--toc", str(tmp_path / "missing.yml")],
        "no directory": ["--root", str(tmp_path / "nowhere")],
    }
    (tmp_path / "notes.yml").write_text("- just\n- a list\n")
    cases["is not a jb-book table of contents"] = ["--toc", str(tmp_path / "notes.yml")]
    for message, argv in cases.items():
        with pytest.raises(SystemExit) as exit_:
            execute_notebooks.main([*argv, *out])
        assert exit_.value.code == 2
        assert message in capsys.readouterr().err
    assert not (tmp_path / "_build").exists()  # nothing was created


def test_first_notebooks_start_before_the_others(tmp_path, capsys):
    import pytest

    (tmp_path / "intro.md").write_text("# intro\n")
    log = tmp_path / "order.txt"
    for name in ("short", "long"):
        _notebook(tmp_path / f"{name}.ipynb", f"open({str(log)!r}, 'a').write('{name} ')")
    toc = tmp_path / "_toc.yml"
    toc.write_text("format: jb-book\nroot: intro\nchapters:\n  - file: short\n  - file: long\n")
    argv = ["--toc", str(toc), "--root", str(tmp_path), "--workers", "1"]
    out = ["--path-output", str(tmp_path / "_build")]
    assert execute_notebooks.main([*argv, *out, "--first", "long.ipynb"]) == 0
    assert log.read_text().split() == ["long", "short"]  # then the table of contents' order

    with pytest.raises(SystemExit) as exit_:  # a name the book does not have is a usage error
        execute_notebooks.main(
            [*argv, "--path-output", str(tmp_path / "other"), "--first", "x.ipynb"]
        )
    assert exit_.value.code == 2
    assert "--first: x.ipynb is not a notebook of" in capsys.readouterr().err
    assert not (tmp_path / "other").exists()
