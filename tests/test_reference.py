"""The API reference documents the public API, all of it, in Markdown that renders.

The pages under ``docs/reference`` render objects with mkdocstrings (``::: name``); griffe, the
library mkdocstrings reads the code with, parses the same docstrings here, so what these tests
check is what the site shows: every public name on a page, no internal one, every argument
described, and no Sphinx role (``:class:`...```), which mkdocstrings prints as literal text.
"""

from __future__ import annotations

import re
from pathlib import Path

import griffe
import pytest

import popup_adapter
import popup_adapter.training

ROOT = Path(__file__).resolve().parent.parent
PAGES = sorted((ROOT / "docs" / "reference").glob("*.md"))
DIRECTIVE = re.compile(r"^::: (?P<name>[\w.]+)\n(?P<options>(?:    .*\n)*)", re.M)
SPHINX_ROLE = re.compile(r":(class|meth|func|attr|mod|exc|data|obj|ref):`")

#: how mkdocs.yml has mkdocstrings read a Returns/Yields section: one value, its description
#: over several lines (griffe's default makes each line a separate returned value)
DOCSTRING_OPTIONS = {"returns_multiple_items": False}
PACKAGE = griffe.load(
    "popup_adapter",
    search_paths=[str(ROOT)],
    docstring_parser="google",
    docstring_options=DOCSTRING_OPTIONS,
    resolve_aliases=True,
)


def public_names() -> set[str]:
    """What the reference must cover: ``popup_adapter.__all__`` and the training API."""
    top = {f"popup_adapter.{n}" for n in popup_adapter.__all__ if n != "__version__"}
    return top | {f"popup_adapter.training.{n}" for n in popup_adapter.training.__all__}


def rendered() -> dict[str, list[str] | None]:
    """``{rendered name: the members its page lists (None: all public ones)}``."""
    found = {}
    for page in PAGES:
        for match in DIRECTIVE.finditer(page.read_text()):
            members = re.findall(r"^ {8}- (\w+)$", match["options"], re.M)
            found[match["name"]] = members or None
    return found


def documented_objects() -> list[griffe.Object]:
    """Every object the reference renders: the named ones and their rendered members."""
    objects = []
    for name, members in rendered().items():
        obj = PACKAGE[name.removeprefix("popup_adapter.")]
        obj = obj.final_target if obj.is_alias else obj
        objects.append(obj)
        if obj.is_class:
            names = members or [m for m in obj.all_members if not m.startswith("_")]
            for member in names:
                child = obj.all_members[member]
                child = child.final_target if child.is_alias else child
                if not child.is_attribute:  # fields are documented under the class's Args:
                    objects.append(child)
    return objects


def test_every_public_name_is_on_a_page_and_no_internal_one():
    names = set(rendered())
    top_level_methods = {n for n in names if n.startswith("popup_adapter.PopupModel.")}
    assert public_names() - names == set(), "public names missing from docs/reference"
    assert names - public_names() - top_level_methods == set(), "internal names rendered"


def test_no_sphinx_role_in_any_docstring():
    """mkdocstrings renders Markdown: a role would be printed as ``:class:`X``` text."""
    leftovers = [
        f"{obj.path}: {match.group(0)}"
        for obj in _all_objects(PACKAGE)
        if obj.docstring and (match := SPHINX_ROLE.search(obj.docstring.value))
    ]
    assert leftovers == [], "use Markdown cross-references, [`Name`][popup_adapter.Name]"


def _all_objects(obj: griffe.Object):
    yield obj
    for member in obj.members.values():
        if not member.is_alias:
            yield from _all_objects(member)


def _described(obj: griffe.Object) -> dict[str, str]:
    """``{parameter: description}`` from an object's docstring sections (a class's own and its
    ``__init__``'s, which the reference shows as one)."""
    sources = [obj]
    if obj.is_class and "__init__" in obj.all_members:
        sources.append(obj.all_members["__init__"])
    described = {}
    for source in sources:
        if not source.docstring:
            continue
        for section in source.docstring.parsed:
            if section.kind in (griffe.DocstringSectionKind.parameters,):
                described.update({p.name.lstrip("*"): p.description for p in section.value})
    return described


def _parameters(obj: griffe.Object) -> list[str]:
    if obj.is_function:
        parameters = obj.parameters
    elif obj.is_class and "__init__" in obj.all_members:
        parameters = obj.all_members["__init__"].parameters
    else:
        return []
    return [p.name for p in parameters if p.name not in ("self", "cls")]


@pytest.mark.parametrize("obj", documented_objects(), ids=lambda obj: obj.path)
def test_documented_object_describes_every_argument(obj):
    assert obj.docstring, f"{obj.path} has no docstring"
    described = _described(obj)
    missing = [p for p in _parameters(obj) if not described.get(p, "").strip()]
    assert missing == [], f"{obj.path}: arguments without a description under Args:"
    if obj.is_function and obj.returns not in (None, "None") and not _is_property(obj):
        kinds = {section.kind for section in obj.docstring.parsed}
        generator = str(obj.returns).startswith(("Iterator", "Generator"))
        wanted = (
            griffe.DocstringSectionKind.yields if generator else griffe.DocstringSectionKind.returns
        )
        assert wanted in kinds, f"{obj.path} returns {obj.returns} without a {wanted.value} section"


def _is_property(obj: griffe.Object) -> bool:
    return "property" in obj.labels


def test_the_site_reads_returns_as_the_tests_do():
    """The options above are the site's: a Returns section renders as one row, not a row per
    line of its description."""
    config = (ROOT / "mkdocs.yml").read_text()
    for option, value in DOCSTRING_OPTIONS.items():
        assert f"{option}: {str(value).lower()}" in config
    returns = PACKAGE["PopupModel.batchnorm_stats"].docstring.parsed
    (section,) = [s for s in returns if s.kind is griffe.DocstringSectionKind.returns]
    assert len(section.value) == 1 and "trained_state" in section.value[0].description
    assert section.value[0].description.startswith('``{"<bn name>.running_mean"')
