"""The docs page of the conformance table."""

from __future__ import annotations

import datetime
from pathlib import Path

import timm
import torch
import transformers

from .checks import Row


def write_table(rows: list[Row], path: Path, command: str) -> None:
    """The docs page: what ran, how many passed, and a row per model.

    Args:
        rows: every model's row.
        path: the markdown file to write.
        command: the command that produced the rows (printed on the page).
    """

    passed = sum(row.result == "pass" for row in rows)
    by_library = {lib: [r for r in rows if r.library == lib] for lib in ("timm", "transformers")}
    lines = [
        "# Model zoo conformance",
        "",
        "Every row is one model adapted with `get_popup_model(model, k=0.5)` and checked by",
        "`popup_adapter.zoo`: a training step in which every score gets a finite gradient, exact",
        "kept counts (per expert for mixture-of-experts banks), masked == merged (max abs",
        "difference <= 1e-5, float32), the same base fingerprint and structure when built again",
        "under another global seed, and the saved artifact loaded without `model=` in a fresh",
        "process giving identical outputs. *masked* is the share of the model's matrix weights",
        "(rank >= 2, outside embeddings, norms, position tables and biases) that the masks cover.",
        "",
        f"**{passed} of {len(rows)} passed**, measured on {datetime.date.today().isoformat()} with "
        f"timm {timm.__version__}, transformers {transformers.__version__}, torch "
        f"{torch.__version__.split('+')[0]}, on CPU:",
        "",
        "```bash",
        command,
        "```",
        "",
        "A *refused* row is a model `get_popup_model` declines with the reason given; *not run*",
        "means the plain model itself does not run on this machine.",
    ]
    for library, part in by_library.items():
        if not part:
            continue
        ok = sum(row.result == "pass" for row in part)
        title = "timm: one model per family" if library == "timm" else "transformers"
        lines += ["", f"## {title} ({ok} of {len(part)} passed)", ""]
        lines += ["| family | model | result | masked | note |", "|---|---|---|---|---|"]
        for row in sorted(part, key=lambda r: r.family):
            share = "" if row.masked_share is None else f"{100 * row.masked_share:.1f}%"
            note = "see [notes](#notes)" if row.note else ""
            lines.append(f"| {row.family} | `{row.model}` | {row.result} | {share} | {note} |")
    noted = [row for row in rows if row.note]
    if noted:
        lines += ["", "## Notes", ""]
        lines += [f"- **{r.library} {r.family}**: {' '.join(r.note.split())}" for r in noted]
    path.write_text("\n".join(lines) + "\n")
