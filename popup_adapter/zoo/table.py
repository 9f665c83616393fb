"""The docs page of the conformance table."""

from __future__ import annotations

import datetime
from pathlib import Path

import timm
import torch
import transformers

from .checks import Row

LIBS = ("timm", "transformers")
#: the docs' code blocks fit this many columns (tests/test_docs.py checks every page)
COLUMNS = 88


def command_block(command: str) -> list[str]:
    """``command`` as a bash block, wrapped with backslashes to fit the docs' code column (a
    flag and its value stay on one line)."""
    words: list[str] = []
    for word in command.split():
        if words and words[-1].startswith("--") and " " not in words[-1] and word[0] != "-":
            words[-1] += f" {word}"
        else:
            words.append(word)
    lines, line = [], ""
    for word in words:
        if line and len(line) + len(word) + 3 > COLUMNS:
            lines.append(line + " \\")
            line = "   "
        line = f"{line} {word}" if line else word
    return ["```bash", *lines, line, "```"]


def write_table(rows: list[Row], path: Path, command: str) -> None:
    """The docs page: what ran, how many passed, and a row per model.

    Args:
        rows: every model's row.
        path: the markdown file to write.
        command: the command that produced the rows (printed on the page).
    """

    passed = sum(row.result == "pass" for row in rows)
    by_library = {lib: [r for r in rows if r.library == lib] for lib in LIBS}
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
        *command_block(command),
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


#: what ``get_popup_model`` leaves unmasked or refuses, whatever the model, and why (the
#: checks are in ``popup_adapter.base.unmaskable_reason`` and ``PopupModel.__init__``)
REFUSALS = [
    (
        "a normalisation layer's weight (BatchNorm, LayerNorm, RMSNorm, GroupNorm...)",
        "not masked: set to identity and frozen, as in the paper (`train_norms=True` trains "
        "them instead)",
    ),
    (
        "a weight computed by a parametrization or a hook (weight normalisation)",
        "not masked, and named in a warning: masking the stored tensor would not change what "
        "the layer computes",
    ),
    (
        "a target selector that matches nothing, or a module without a weight of its own",
        "`TargetModulesError` naming the closest module names",
    ),
    (
        "a model that already carries popup layers",
        "`AlreadyAdaptedError`: add a further mask with `add_adapter`",
    ),
    (
        "a model with unmerged PEFT adapters (LoRA, IA3, ...)",
        "`AdapterError`: merge them first, or mask the base and add PEFT on top",
    ),
    (
        "an FSDP wrapping that splits a masked layer from its base layer",
        "refused by the training loop (see [FSDP](how-to/fsdp.md))",
    ),
]


def write_architectures(rows: list[Row], path: Path, command: str) -> None:
    """The supported-architectures page: which families work, how to adapt each kind of
    model, and what is refused, from the same rows as the conformance table.

    Args:
        rows: every model's row.
        path: the markdown file to write.
        command: the command that produced the rows (printed on the page).
    """
    passed = {lib: [r for r in rows if r.library == lib and r.result == "pass"] for lib in LIBS}
    refused = [r for r in rows if r.result == "refused"]
    lines = [
        "# Supported architectures",
        "",
        "Generated from the [conformance run](conformance.md) of "
        f"{datetime.date.today().isoformat()} (timm {timm.__version__}, transformers "
        f"{transformers.__version__}): every model named here passed all of its checks, masked "
        "== merged and the artifact reloaded exactly in a fresh process among them.",
        "",
        *command_block(command),
        "",
        "## How to adapt each kind of model",
        "",
        "- **timm**: `get_popup_model(timm.create_model(name, pretrained=False, "
        "num_classes=N), k=...)`. The artifact records `num_classes`, `in_chans` and a ViT's "
        "`img_size`; any other constructor argument goes in `base_kwargs` "
        "([how-to](how-to/timm.md)).",
        "- **Input sizes**: whatever the plain model accepts; the mask does not depend on them. "
        "Models with a fixed position table (ViTs) take the `img_size` they were built with. "
        "The conformance run gives each model the smallest square input it accepts.",
        "- **Heads**: `num_classes=0` (pooled features) and `features_only=True` (feature "
        "maps; the wrapper class and `out_indices` are recorded) rebuild from the artifact.",
        "- **transformers**: any `PreTrainedModel` built from its config; the artifact stores "
        "the config ([how-to](how-to/transformers.md)).",
        '- **Pretrained weights**: `init="keep"` masks them instead of redrawing them; a '
        "transformers artifact records the Hub repo to load them from, a timm one needs "
        "`model=` at load ([how-to](how-to/pretrained.md)).",
    ]
    names = {
        "timm": ("timm families", lambda r: r.family),
        "transformers": ("transformers architectures", lambda r: f"{r.model} ({r.family})"),
    }
    for library, part in passed.items():
        title, name = names[library]
        lines += ["", f"## {len(part)} {title}", ""]
        lines += [", ".join(f"`{name(r)}`" for r in sorted(part, key=lambda r: r.family)) + "."]
    lines += ["", "## What is not masked or refused, and why", ""]
    lines += ["| what | what happens |", "|---|---|"]
    lines += [f"| {what} | {outcome} |" for what, outcome in REFUSALS]
    lines += [""]
    if refused:
        lines += ["Refused in the conformance run:", ""]
        lines += [f"- **{r.library} {r.family}**: {' '.join(r.note.split())}" for r in refused]
        lines += [""]
    else:
        lines += ["No model of the conformance run was refused.", ""]
    noted = [r for r in rows if r.note and r.result == "pass"]
    if noted:
        lines += ["Partly unmasked, as said above:", ""]
        lines += [f"- **{r.library} {r.family}**: {' '.join(r.note.split())}" for r in noted]
    path.write_text("\n".join(lines) + "\n")
