"""The README's key figure and results table are copied from a built page of the book."""

import importlib.util
import sys
from pathlib import Path

SCRIPTS = Path(__file__).resolve().parents[1] / "scripts"


def _load(name: str):
    spec = importlib.util.spec_from_file_location(name, SCRIPTS / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module


results_table = _load("results_table")
readme_figure = _load("readme_figure")

PAGE = """<html><body>
<section id="the-answer"><table><tr><td>not this one</td></tr></table></section>
<section id="the-results-table"><span id="glance-results-table"></span>
<h2>The results table</h2>
<div class="output text_html"><table id="T_1">
<thead><tr><th class="col_heading">model</th><th class="col_heading">test NLL | nats</th></tr>
</thead><tbody><tr><td>scVI</td><td>6,791 ± 31</td></tr>
<tr><td>PCA-64</td><td></td></tr></tbody></table></div></section>
<figure id="fig-glance-why"><img src="../_images/why.png"><figcaption>Fig. 2</figcaption></figure>
</body></html>"""


def test_the_results_table_is_copied_from_its_section(tmp_path: Path):
    page = tmp_path / "_build" / "cpu" / "_build" / "html" / "study_at_a_glance.html"
    page.parent.mkdir(parents=True)
    page.write_text(PAGE)
    rows = results_table.section_table(page, "the-results-table")
    assert rows == [["model", "test NLL | nats"], ["scVI", "6,791 ± 31"], ["PCA-64", ""]]
    assert results_table.section_table(page, "glance-results-table") == rows  # the label's id
    readme = tmp_path / "README.md"
    readme.write_text(f"intro\n{results_table.START}\nold\n{results_table.END}\nend\n")
    assert results_table.main([str(page), "--readme", str(readme), "--check"]) == 1
    assert results_table.main([str(page), "--readme", str(readme)]) == 0
    text = readme.read_text()
    assert "Profile `cpu`" in text and "| scVI | 6,791 ± 31 |" in text
    assert "| model | test NLL \\| nats |\n|---|---|" in text
    assert text.startswith("intro\n") and text.endswith("end\n")
    assert results_table.main([str(page), "--readme", str(readme), "--check"]) == 0


def test_the_key_figure_is_found_by_its_figure_id(tmp_path: Path):
    page = tmp_path / "html" / "notebooks" / "study_at_a_glance.html"
    page.parent.mkdir(parents=True)
    page.write_text(PAGE)
    assert readme_figure.section_images(page, "fig-glance-why") == [
        (tmp_path / "html" / "_images" / "why.png").resolve()
    ]


def test_the_scvi_yardstick_is_the_mean_time_of_the_default_budget_runs(tmp_path, monkeypatch):
    import json

    import pandas as pd

    from scvit_core.experiments import DEFAULT_BUDGET, RESULTS_DIR_ENV

    monkeypatch.setenv(RESULTS_DIR_ENV, str(tmp_path))
    rows = [  # (key, model, epochs, dataset, seconds): one row per metric of a run
        ("a", "scvi", DEFAULT_BUDGET, "zeisel2015", 400.0),
        ("a", "scvi", DEFAULT_BUDGET, "zeisel2015", 400.0),
        ("b", "scvi", DEFAULT_BUDGET, "zeisel2015", 500.0),
        ("c", "scvi", 10, "zeisel2015", 10.0),  # the report's budget
        ("d", "scvi", DEFAULT_BUDGET, "pbmc68k", 50.0),  # another dataset
        ("e", "perceiver", None, "zeisel2015", 300.0),
    ]
    for key, *_, seconds in rows:
        (tmp_path / key).mkdir(exist_ok=True)
        (tmp_path / key / "provenance.json").write_text(json.dumps({"run_time_s": seconds}))
    runs = pd.DataFrame(
        [r[:4] for r in rows], columns=["key", "model", "epochs", "dataset"]
    ).assign(profile="cpu")
    assert results_table.scvi_yardstick(runs) == (450.0, 2)
    assert results_table.scvi_yardstick(runs[runs["model"] != "scvi"]) is None
