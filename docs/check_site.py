"""Build the docs site, open every page in headless Chromium, and fail on what a reader
would see.

    python docs/check_site.py                    # build, check, shots in out/site-check
    python docs/check_site.py --screenshots DIR  # elsewhere
    python docs/check_site.py --site DIR         # check an already built site

``mkdocs build --strict`` catches broken links and unresolved references; this
catches what only a browser shows, at 1280 px wide: a console error, an image that
did not load, a request that leaves 127.0.0.1 (a CDN the page depends on), a code
block, table or formula wider than its column, text under a code block's copy
button, and Markdown or Sphinx-role syntax printed as text. Each page is saved as a
full-page screenshot, to look at.

Needs Chromium and its WebDriver (Debian: ``chromium``, ``chromium-driver``) and
``selenium``.
"""

from __future__ import annotations

import argparse
import base64
import functools
import http.server
import os
import re
import shutil
import subprocess
import sys
import tempfile
import threading
from pathlib import Path

from selenium import webdriver
from selenium.webdriver.chrome.service import Service

WIDTH = 1280
#: text that means Markdown or a docstring role was not rendered (code blocks excluded)
RAW_TEXT = {
    "a Sphinx role": re.compile(r":(class|meth|func|attr|mod|exc|data|obj|ref):`"),
    "a Markdown link or reference": re.compile(r"\]\[|\]\(\S"),
    "Markdown emphasis": re.compile(r"\*\*\S"),
    "a Markdown heading": re.compile(r"^#{1,6} \w", re.M),
    "a code fence": re.compile(r"```"),
    "unrendered math": re.compile(r"\$\$|\\\(|\\\["),
    "a Mermaid diagram": re.compile(r"\b(flowchart|graph) (LR|TD|TB)\b"),
}

#: one script per page, returning every problem it sees as a string
PAGE_PROBLEMS_JS = r"""
const problems = [];
const article = document.querySelector("article");
const column = article.getBoundingClientRect();
const where = (el) =>
  (el.textContent || el.outerHTML).trim().replace(/\s+/g, " ").slice(0, 60);
for (const img of document.images) {
  if (!img.complete || img.naturalWidth === 0) {
    problems.push(`image not loaded: ${img.src}`);
  }
}
for (const entry of performance.getEntriesByType("resource")) {
  if (!entry.name.startsWith(location.origin)) {
    problems.push(`fetched from outside: ${entry.name}`);
  }
}
for (const code of article.querySelectorAll("pre > code")) {
  if (code.scrollWidth > code.clientWidth + 1) {
    problems.push(`code block wider than its column (${code.scrollWidth} > ` +
                  `${code.clientWidth} px): ${where(code)}`);
  }
  const button = code.parentElement.querySelector(".md-clipboard");
  if (!button) continue;
  const b = button.getBoundingClientRect();
  const range = document.createRange();
  range.selectNodeContents(code);
  for (const r of range.getClientRects()) {
    const across = r.right > b.left && r.left < b.right;
    if (r.width > 0 && across && r.bottom > b.top && r.top < b.bottom) {
      problems.push(`text under the copy button: ${where(code)}`);
      break;
    }
  }
}
for (const el of article.querySelectorAll("table, math[display=block], img, svg")) {
  const r = el.getBoundingClientRect();
  if (r.right > column.right + 1 || r.left < column.left - 1) {
    const widths = `${Math.round(r.width)} > ${Math.round(column.width)} px`;
    problems.push(`${el.tagName.toLowerCase()} wider than the column (${widths}): ` +
                  where(el));
  }
}
const text = article.cloneNode(true);
text.querySelectorAll("pre, code, script, style, math").forEach((el) => el.remove());
return {problems, text: text.innerText};
"""


def build(site: Path) -> None:
    env = {**os.environ, "NO_MKDOCS_2_WARNING": "1"}
    command = ["mkdocs", "build", "--strict", "--quiet", "--site-dir", str(site)]
    subprocess.run(command, check=True, env=env)


def serve(site: Path) -> str:
    """Serve ``site`` on 127.0.0.1 from a daemon thread; returns its base URL."""
    handler = functools.partial(QuietHandler, directory=str(site))
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    return f"http://127.0.0.1:{server.server_address[1]}/"


class QuietHandler(http.server.SimpleHTTPRequestHandler):
    def log_message(self, *args: object) -> None:
        pass


def pages(site: Path) -> list[str]:
    """Every page's path under the site, as a URL path (``""`` is the home page)."""
    found = []
    for index in sorted(site.rglob("index.html")):
        relative = index.parent.relative_to(site).as_posix()
        if not relative.startswith(("assets", "search")):
            found.append("" if relative == "." else f"{relative}/")
    return found


def browser(chromium: str, driver: str) -> webdriver.Chrome:
    options = webdriver.ChromeOptions()
    options.binary_location = chromium
    for flag in (
        "--headless=new",
        "--no-sandbox",
        "--disable-gpu",
        "--disable-dev-shm-usage",
    ):
        options.add_argument(flag)
    options.add_argument(f"--window-size={WIDTH},900")
    options.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    return webdriver.Chrome(service=Service(driver), options=options)


def check_page(chrome: webdriver.Chrome, url: str, screenshot: Path) -> list[str]:
    """The problems of one page; its full-page screenshot saved to ``screenshot``."""
    chrome.get(url)
    found = chrome.execute_script(PAGE_PROBLEMS_JS)
    problems = list(found["problems"])
    for what, pattern in RAW_TEXT.items():
        if match := pattern.search(found["text"]):
            start = max(0, match.start() - 30)
            context = " ".join(found["text"][start : match.end() + 30].split())
            problems.append(f"{what} printed as text: ...{context}...")
    height = chrome.execute_script("return document.documentElement.scrollHeight")
    shot = chrome.execute_cdp_cmd(
        "Page.captureScreenshot",
        {
            "captureBeyondViewport": True,
            "clip": {"x": 0, "y": 0, "width": WIDTH, "height": height, "scale": 1},
        },
    )
    screenshot.write_bytes(base64.b64decode(shot["data"]))
    # console entries reach the log asynchronously (a failed image's can come after the
    # load event, under load): leaving the page first keeps them this page's, not the
    # next one's (a clean page was failed with the previous page's 404 that way)
    chrome.get("about:blank")
    problems += [
        f"console {entry['level'].lower()}: {entry['message']}"
        for entry in chrome.get_log("browser")
        if entry["level"] in ("SEVERE", "WARNING")
    ]
    return problems


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--site", type=Path, help="an already built site (default: build one)"
    )
    parser.add_argument("--screenshots", type=Path, default=Path("out/site-check"))
    parser.add_argument("--chromium", default=shutil.which("chromium") or "chromium")
    parser.add_argument(
        "--driver", default=shutil.which("chromedriver") or "chromedriver"
    )
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory() as built:
        site = args.site or Path(built)
        if args.site is None:
            build(site)
        base = serve(site)
        args.screenshots.mkdir(parents=True, exist_ok=True)
        chrome = browser(args.chromium, args.driver)
        failed = 0
        try:
            for page in pages(site):
                name = (page.strip("/").replace("/", "_") or "index") + ".png"
                problems = check_page(chrome, base + page, args.screenshots / name)
                failed += bool(problems)
                print(f"{'FAIL' if problems else 'ok  '} /{page}")
                for problem in problems:
                    print(f"       {problem}")
        finally:
            chrome.quit()
    print(f"{failed} page(s) with problems; screenshots in {args.screenshots}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
