"""docs/check_site.py sees what a reader would: run on a tiny site with one of each problem."""

import importlib.util
import shutil
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
pytestmark = pytest.mark.skipif(
    not (shutil.which("chromedriver") and shutil.which("chromium")),
    reason="needs Chromium and chromium-driver (Debian packages)",
)

BAD_PAGE = """<!doctype html><html><head><meta charset="utf-8">
<style>article { width: 400px; font-family: monospace; } pre { position: relative; }
code { display: block; overflow: auto; } .md-clipboard { position: absolute; right: 0; top: 0;
width: 30px; height: 20px; }</style></head><body><article>
<pre><button class="md-clipboard"></button><code>{long_line}</code></pre>
<img src="missing.png" alt="a figure">
<p>See :class:`PopupModel` and [get_popup_model][popup_adapter.get_popup_model].</p>
<table><tr><td>{long_cell}</td></tr></table>
</article><script>console.error("boom")</script></body></html>
"""
GOOD_PAGE = """<!doctype html><html><head><meta charset="utf-8"></head><body>
<article style="width: 600px"><p>Plain text, <code>code</code> and nothing wrong.</p></article>
</body></html>"""


def load_checker():
    spec = importlib.util.spec_from_file_location("check_site", ROOT / "docs" / "check_site.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_every_problem_is_reported_and_a_clean_page_passes(tmp_path, capsys):
    site = tmp_path / "site"
    (site / "bad").mkdir(parents=True)
    page = BAD_PAGE.replace("{long_line}", "x = 1  # " + "wide " * 40)
    (site / "bad" / "index.html").write_text(page.replace("{long_cell}", "cell" * 60))
    (site / "index.html").write_text(GOOD_PAGE)
    shots = tmp_path / "shots"
    assert load_checker().main(["--site", str(site), "--screenshots", str(shots)]) == 1
    out = capsys.readouterr().out
    assert out.startswith("FAIL /bad/\n") and "\nok   /\n" in out  # the clean page passes
    reported = out.split("\nok   /\n", 1)[0]
    assert "1 page(s) with problems" in out
    for problem in (
        "code block wider than its column",
        "text under the copy button",
        "image not loaded",
        "a Sphinx role printed as text",
        "a Markdown link or reference printed as text",
        "table wider than the column",
        "console severe",
    ):
        assert problem in reported, problem
    assert (shots / "index.png").stat().st_size > 0 and (shots / "bad.png").stat().st_size > 0
