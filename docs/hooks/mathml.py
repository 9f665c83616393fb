"""MkDocs hook: the formulas that ``pymdownx.arithmatex`` (generic mode) set apart,
rendered to MathML when the site is built.

Browsers draw MathML themselves, so a formula needs no script and nothing fetched from a
CDN: the page reads the same offline. ``$x$`` is inline, ``$$x$$`` (or ``\\[x\\]``) a
display block.
"""

from __future__ import annotations

import html
import re

from latex2mathml.converter import convert

#: arithmatex's generic output: ``<span class="arithmatex">\(x\)</span>`` inline,
#: ``<div class="arithmatex">\[x\]</div>`` for a block
_MATH = re.compile(
    r'<(?P<tag>span|div) class="arithmatex">'
    r"\s*\\[(\[](?P<tex>.*?)\\[)\]]\s*"
    r"</(?P=tag)>",
    re.S,
)


def _mathml(match: re.Match) -> str:
    display = "block" if match["tag"] == "div" else "inline"
    return convert(html.unescape(match["tex"]).strip(), display=display)


def on_page_content(html_text: str, **_: object) -> str:
    """Replace every arithmatex formula of a page by its MathML."""
    return _MATH.sub(_mathml, html_text)
