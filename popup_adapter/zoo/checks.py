"""One model's checks: adapt, train a step, count, check the base, merge, save; then reload in a
fresh process."""

from __future__ import annotations

import json
import subprocess
import sys
import time
import traceback
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from .. import PopupError, PopupModel, get_popup_model
from ..structure import structure_fingerprint
from .cases import Case, NotRun, first_line

_K = 0.5


@dataclass
class Row:
    """One model's line of the table."""

    family: str
    model: str
    library: str
    result: str = "FAIL"
    note: str = ""
    masked_share: float | None = None
    masked_tensors: int | None = None
    seconds: float = 0.0
    details: dict[str, Any] = field(default_factory=dict)


def output_tensor(output: Any) -> torch.Tensor:
    """The main tensor of a model's output: itself, ``logits``, or the first tensor of a
    ``ModelOutput``.

    Args:
        output: what a model returned.

    Returns:
        The tensor.
    """
    if isinstance(output, torch.Tensor):
        return output
    logits = getattr(output, "logits", None)
    if isinstance(logits, torch.Tensor):
        return logits
    values = output.to_tuple() if hasattr(output, "to_tuple") else tuple(output)
    return next(v for v in values if isinstance(v, torch.Tensor))


def forward_output(model: nn.Module, inputs: dict[str, torch.Tensor]) -> torch.Tensor:
    """The main output tensor of ``model`` on ``inputs`` (``{"x": tensor}`` for a timm model,
    keyword arguments for a transformers one).

    Args:
        model: the model.
        inputs: its inputs, by name.

    Returns:
        The output tensor.
    """
    if set(inputs) == {"x"}:
        return output_tensor(model(inputs["x"]))
    return output_tensor(model(**inputs))


def _adapt(case: Case, row: Row, notes: list[str]):
    """The plain model, an input it runs on, and the adapted model (None: refused, in ``row``);
    the warnings of the adaptation go into ``notes``."""
    with torch.random.fork_rng(devices=[]):  # what the model draws, not the caller's RNG
        torch.manual_seed(1)
        plain = case.build()
    inputs = case.inputs(plain)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        try:
            model = get_popup_model(plain, k=_K)
        except PopupError as refusal:
            row.result, row.note = "refused", first_line(refusal)
            return inputs, None
    notes += sorted(
        str(w.message).splitlines()[0].split(";")[0]
        for w in caught
        if w.category is UserWarning and "matrix weights" not in str(w.message)
    )
    row.masked_tensors, row.masked_share = len(dict(model.popup_layers())), model.coverage.share
    if model.coverage.unmasked:
        names = ", ".join(name for name, _ in model.coverage.unmasked[:3])
        more = len(model.coverage.unmasked) - 3
        notes.append(f"not masked: {names}{f' and {more} more' if more > 0 else ''}")
    return inputs, model


def _check_gradients(model, inputs: dict[str, torch.Tensor], notes: list[str]) -> None:
    """Every score gets a finite gradient (a layer this forward does not use gets none), and
    some a nonzero one."""
    layers = dict(model.popup_layers())
    model.train()
    forward_output(model, inputs).float().square().mean().backward()
    unused = [n for n, layer in layers.items() if layer.popup_scores["default"].grad is None]
    grads = [layer.popup_scores["default"].grad for layer in layers.values()]
    grads = [g for g in grads if g is not None]
    if not grads or not all(torch.isfinite(g).all() for g in grads):
        raise AssertionError("a score gradient is missing or not finite")
    if not any(g.abs().sum() > 0 for g in grads):
        raise AssertionError("every score gradient is zero")
    if unused:
        notes.append(f"{len(unused)} masked tensors unused by this forward ({unused[0]}...)")
    model.zero_grad(set_to_none=True)


def _check_counts(model) -> None:
    """Exact kept counts, per expert for an expert bank."""
    layers = dict(model.popup_layers())
    for name, mask in model.get_masks().items():
        layer = layers[name]
        parts = mask.unbind(0) if layer.per_expert else (mask,)
        counts = {int(part.sum()) for part in parts}
        if counts != {layer.popup_kept["default"]}:
            raise AssertionError(f"{name} keeps {counts}, not {layer.popup_kept['default']}")


def _check_rebuild(case: Case, model) -> None:
    """The base does not depend on torch's global RNG: another build under another seed has
    the same fingerprint and structure."""
    with torch.random.fork_rng(devices=[]), warnings.catch_warnings():
        torch.manual_seed(12345)
        warnings.simplefilter("ignore")
        again = get_popup_model(case.build(), k=_K)
    if again.base_fingerprint != model.base_fingerprint:
        raise AssertionError("another build gives another base fingerprint")
    if structure_fingerprint(again.base_structure) != structure_fingerprint(model.base_structure):
        raise AssertionError("another build gives another structure")


def _save_and_merge(model, inputs, folder: Path, row: Row, notes: list[str]) -> None:
    """Save the artifact with an input and its output, then check masked == merged."""
    model.eval()
    with torch.no_grad():
        masked = forward_output(model, inputs)
    model.save_pretrained(folder / "artifact")
    save_file(
        {**{f"input.{k}": v for k, v in inputs.items()}, "output": masked.contiguous()},
        folder / "io.safetensors",
    )
    merged = model.merge_and_unload()
    with torch.no_grad():
        merged_output = forward_output(merged, inputs).float()
    difference = (merged_output - masked.float()).abs().max().item()
    row.details["merged_max_abs_diff"] = difference
    if not difference <= 1e-5:
        raise AssertionError(f"masked and merged outputs differ by {difference:.3g}")
    if difference:
        notes.append(f"merged differs by {difference:.1e}")


def check_model(case: Case, folder: Path) -> Row:
    """Adapt, train one step, count, merge, and save into ``folder`` for `check_reload`.

    Args:
        case: the model to check.
        folder: where its artifact and the input/output pair are saved.

    Returns:
        The row: "reload pending" when every in-process check passed, else "refused", "not
        run" or "FAIL" with the reason (and a traceback in ``details`` for a failure).
    """
    row = Row(case.family, case.model, case.library)
    start = time.perf_counter()
    notes: list[str] = []
    try:
        inputs, model = _adapt(case, row, notes)
        if model is None:
            return row
        _check_gradients(model, inputs, notes)
        _check_counts(model)
        _check_rebuild(case, model)
        _save_and_merge(model, inputs, folder, row, notes)
        row.result = "reload pending"
    except NotRun as reason:
        row.result, notes = "not run", [str(reason)]
    except Exception as error:  # a failure of ours: its traceback goes into the details
        row.result = "FAIL"
        notes.insert(0, first_line(error))
        row.details["traceback"] = traceback.format_exc()[-3000:]
    finally:
        if row.result != "refused":
            row.note = "; ".join(notes)
        row.seconds = round(time.perf_counter() - start, 1)
    return row


def reload_artifacts(folders: list[Path]) -> dict[str, str]:
    """In this process: load each saved artifact without ``model=`` and compare its output on
    the saved input; ``{folder: "ok" or what went wrong}``.

    Args:
        folders: artifact folders written by `check_model`.

    Returns:
        ``{folder: "ok" or the reason}``.
    """
    results = {}
    for folder in folders:
        try:
            io = load_file(folder / "io.safetensors")
            inputs = {k.removeprefix("input."): v for k, v in io.items() if k.startswith("input.")}
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                loaded = PopupModel.from_pretrained(folder / "artifact")
            with torch.no_grad():
                out = forward_output(loaded, inputs)
            same = torch.equal(out, io["output"])
            results[str(folder)] = "ok" if same else "reloaded outputs differ"
        except Exception as error:
            results[str(folder)] = f"reload failed: {first_line(error)}"
    return results


def check_reload(folders: list[Path], timeout: float = 1800) -> dict[str, str]:
    """`reload_artifacts` in a fresh Python process (nothing cached from the save).

    Args:
        folders: artifact folders written by `check_model`.
        timeout: seconds the fresh process may take.

    Returns:
        As `reload_artifacts`; every folder gets the process's error if it died.
    """
    if not folders:
        return {}
    command = [sys.executable, "-m", "popup_adapter.zoo", "--reload", *map(str, folders)]
    done = subprocess.run(command, capture_output=True, text=True, timeout=timeout)
    lines = [line for line in done.stdout.splitlines() if line.startswith("{")]
    if done.returncode != 0 or not lines:
        reason = first_line(RuntimeError((done.stderr or "no output").strip().splitlines()[-1]))
        return {str(folder): f"reload process failed: {reason}" for folder in folders}
    return json.loads(lines[-1])


def finish(row: Row, reload_result: str | None) -> Row:
    """Fold the fresh-process reload into a row that passed the in-process checks.

    Args:
        row: a row from `check_model`.
        reload_result: its folder's result from `check_reload` (None: not reloaded).

    Returns:
        The final row.
    """
    if row.result != "reload pending":
        return row
    if reload_result == "ok":
        row.result = "pass"
    else:
        row.result = "FAIL"
        row.note = "; ".join(filter(None, [reload_result or "not reloaded", row.note]))
    return row
