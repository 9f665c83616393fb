"""Every Python block in the docs runs: a page's blocks in order, in one namespace. And every
code block fits the site's text column (88 characters) and imports what it uses, so a reader can
copy any one block after the page's earlier ones.

An HTML comment before a block marks it: ``<!-- test: slow -->`` (pytest's ``slow`` marker) or
``<!-- test: skip (why) -->``. A page whose first line is ``<!-- test: hub -->`` runs in a fresh
process against the test Hub server, since it pushes and downloads.
"""

import ast
import json
import os
import re
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
from hub_server import HubServer

DOCS = Path(__file__).resolve().parent.parent / "docs"
BLOCK = re.compile(r"(?:<!-- test: (?P<mark>\w+)[^>]*-->\s*\n)?```python\n(?P<code>.*?)```", re.S)
PAGES = sorted(DOCS.rglob("*.md"))
FENCE = re.compile(r"^```(?P<lang>\w*)\n(?P<code>.*?)^```", re.S | re.M)
#: what the text column shows of a code block at 1280 px, checked in a browser by check_site.py
SNIPPET_COLUMNS = 88


def blocks(page: Path, include_slow: bool) -> list[str]:
    found = []
    for match in BLOCK.finditer(page.read_text()):
        mark = match.group("mark")
        if mark == "skip" or (mark == "slow" and not include_slow):
            continue
        found.append(match.group("code"))
    return found


def page_params():
    for page in PAGES:
        text = page.read_text()
        if "```python" not in text:
            continue
        slow = "<!-- test: slow" in text
        name = str(page.relative_to(DOCS))
        yield pytest.param(page, False, id=name)
        if slow:
            yield pytest.param(page, True, id=f"{name}[slow]", marks=pytest.mark.slow)


@pytest.mark.parametrize(("page", "include_slow"), list(page_params()))
def test_docs_page_runs(page, include_slow, tmp_path, monkeypatch):
    code = "\n".join(blocks(page, include_slow))
    monkeypatch.chdir(tmp_path)  # snippets write out/... here, as from a checkout's root
    (tmp_path / "recipes").symlink_to(DOCS.parent / "recipes")
    if page.read_text().startswith("<!-- test: hub -->"):
        with HubServer() as hub:
            env = {k: v for k, v in os.environ.items() if not k.startswith("HF_")}
            env.update(
                HF_ENDPOINT=hub.endpoint,
                HF_HUB_OFFLINE="0",
                HF_TOKEN="hf_docs",
                HF_HUB_CACHE=str(tmp_path / "cache"),
                HF_HUB_DISABLE_PROGRESS_BARS="1",
            )
            result = subprocess.run(
                [sys.executable, "-c", code],
                cwd=tmp_path,
                env=env,
                capture_output=True,
                text=True,
                timeout=600,
            )
        assert result.returncode == 0, result.stderr[-4000:]
        return
    exec(compile(textwrap.dedent(code), str(page), "exec"), {"__name__": "__docs__"})


def test_code_blocks_fit_the_column():
    too_wide = [
        f"{page.relative_to(DOCS)}: {line}"
        for page in PAGES
        for block in FENCE.finditer(page.read_text())
        for line in block["code"].splitlines()
        if len(line) > SNIPPET_COLUMNS
    ]
    assert too_wide == [], f"docs code lines wider than {SNIPPET_COLUMNS} columns"


def _assigned_names(code: str) -> set[str]:
    """Names a block defines for the blocks after it (not its imports: each block imports what
    it uses itself)."""
    names = set()
    for node in ast.walk(ast.parse(code)):
        if isinstance(node, ast.Name) and isinstance(node.ctx, ast.Store):
            names.add(node.id)
        elif isinstance(node, ast.FunctionDef | ast.ClassDef):
            names.add(node.name)
    return names


@pytest.mark.parametrize("page", [p for p in PAGES if "```python" in p.read_text()], ids=str)
def test_every_python_block_imports_what_it_uses(page):
    """ruff's undefined-name rule on each block alone, knowing only the variables (not the
    imports) of the page's earlier blocks."""
    earlier: set[str] = set()
    problems = []
    for code in blocks(page, include_slow=True):
        config = f"builtins={json.dumps(sorted(earlier))}"
        result = subprocess.run(
            [
                sys.executable,
                "-m",
                "ruff",
                "check",
                "--isolated",
                "--select",
                "F821",
                "--output-format",
                "concise",
                "--config",
                config,
                "--stdin-filename",
                "block.py",
                "-",
            ],
            input=code,
            capture_output=True,
            text=True,
        )
        problems += [line for line in result.stdout.splitlines() if "F821" in line]
        earlier |= _assigned_names(code)
    assert problems == [], f"{page.name}: a block uses a name it does not import: {problems}"


def _package_imports(path: Path) -> set[str]:
    """The package modules ``path`` imports at run time (not under ``TYPE_CHECKING``)."""
    tree = ast.parse(path.read_text())
    type_only = {
        id(node)
        for branch in ast.walk(tree)
        if isinstance(branch, ast.If) and getattr(branch.test, "id", "") == "TYPE_CHECKING"
        for node in ast.walk(branch)
    }
    imported = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and node.level == 1 and id(node) not in type_only:
            imported |= {node.module.split(".")[0]} if node.module else {a.name for a in node.names}
    return imported


def test_the_architecture_table_lists_every_module_below_what_it_imports():
    """docs/architecture.md says the package reads top-down: each file imports only files
    above it in its table. Hold the page to the code."""
    package = DOCS.parent / "popup_adapter"
    table = (DOCS / "architecture.md").read_text()
    order = [
        name
        for row in re.findall(r"^\| ((?:`[a-z_]+\.py`(?:, )?)+) \|", table, re.M)
        for name in re.findall(r"`([a-z_]+)\.py`", row)
    ]
    modules = {p.stem for p in package.glob("*.py")} - {"__init__"}
    assert sorted(order) == sorted(modules), "every module is in the table, once"
    position = {name: index for index, name in enumerate(order)}
    for name in order:
        for imported in _package_imports(package / f"{name}.py") & set(position):
            assert position[imported] < position[name], f"{name}.py imports {imported}.py below it"
