"""``python -m popup_adapter.zoo``: every model in a process of its own, results resumable."""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import subprocess
import sys
import tempfile
from dataclasses import asdict
from pathlib import Path

import torch

from . import __doc__ as _DOC
from .cases import case_by_id, timm_families
from .checks import Row, check_model, check_reload, finish, reload_artifacts
from .table import write_architectures, write_table
from .transformers_configs import TRANSFORMERS


def _run_one(case_id: str, root: Path, timeout: float) -> Row:
    """Check one model in a process of its own, then reload it in another."""
    folder = root / case_id.split(":")[1]
    folder.mkdir(parents=True, exist_ok=True)
    command = [sys.executable, "-m", "popup_adapter.zoo", "--worker", case_id, str(folder)]
    library, name, *_ = case_id.split(":")
    try:
        done = subprocess.run(command, capture_output=True, text=True, timeout=timeout)
        row = Row(**json.loads((folder / "row.json").read_text()))
    except subprocess.TimeoutExpired:
        return Row(name, name, library, "FAIL", f"timed out after {timeout:.0f} s")
    except FileNotFoundError:
        tail = (done.stderr or "").strip().splitlines()[-1:] or ["no output"]
        return Row(name, name, library, "FAIL", f"process died: {tail[0][:300]}")
    return finish(row, check_reload([folder]).get(str(folder)))


def _selected(spec: str, everything: list[str]) -> list[str]:
    if spec == "all":
        return everything
    if spec == "none":
        return []
    chosen = spec.split(",")
    unknown = sorted(set(chosen) - set(everything))
    if unknown:
        raise SystemExit(f"unknown: {unknown}; known: {', '.join(everything)}")
    return chosen


def main(argv: list[str] | None = None) -> int:
    """Entry point of ``python -m popup_adapter.zoo``.

    Args:
        argv: the arguments (default ``sys.argv[1:]``).

    Returns:
        The process exit code: 0 when no row failed.
    """
    parser = argparse.ArgumentParser(prog="python -m popup_adapter.zoo", description=_DOC)
    parser.add_argument("--timm", default="all", help="families, comma-separated, all or none")
    parser.add_argument("--transformers", default="all", help="names, all or none")
    parser.add_argument("--results", default="out/zoo/results.jsonl", type=Path)
    parser.add_argument("--table", default=None, type=Path, help="write the Markdown table here")
    parser.add_argument(
        "--architectures", default=None, type=Path, help="write the supported-architectures page"
    )
    parser.add_argument("--timeout", default=900, type=float, help="seconds per model")
    parser.add_argument("--worker", nargs=2, metavar=("CASE", "FOLDER"), help=argparse.SUPPRESS)
    parser.add_argument("--reload", nargs="+", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    torch.set_num_threads(min(torch.get_num_threads(), os.cpu_count() or 1))

    if args.reload:
        print(json.dumps(reload_artifacts(args.reload)))
        return 0
    if args.worker:
        case_id, folder = args.worker
        row = check_model(case_by_id(case_id), Path(folder))
        Path(folder, "row.json").write_text(json.dumps(asdict(row)))
        return 0

    root = args.results.parent
    root.mkdir(parents=True, exist_ok=True)
    families = timm_families(root / "timm_families.json") if args.timm != "none" else {}
    case_ids = [f"timm:{f}:{families[f]}" for f in _selected(args.timm, sorted(families))]
    case_ids += [f"transformers:{n}" for n in _selected(args.transformers, list(TRANSFORMERS))]
    done = {}
    if args.results.is_file():
        for line in args.results.read_text().splitlines():
            row = Row(**json.loads(line))
            done[f"{row.library}:{row.family}"] = row
    with args.results.open("a") as results:
        for number, case_id in enumerate(case_ids, 1):
            key = ":".join(case_id.split(":")[:2])
            if key in done:
                continue
            with tempfile.TemporaryDirectory(dir=root) as scratch:
                row = _run_one(case_id, Path(scratch), args.timeout)
            done[key] = row
            results.write(json.dumps(asdict(row)) + "\n")
            results.flush()
            print(
                f"[{number}/{len(case_ids)}] {case_id}: {row.result} ({row.seconds} s) {row.note}"[
                    :400
                ]
            )
    rows = [done[key] for key in (":".join(c.split(":")[:2]) for c in case_ids) if key in done]
    passed = sum(row.result == "pass" for row in rows)
    print(f"{passed} of {len(rows)} passed")
    command = ("python -m popup_adapter.zoo " + " ".join(argv or sys.argv[1:])).strip()
    if args.table:
        write_table(rows, args.table, command)
    if args.architectures:
        write_architectures(rows, args.architectures, command)
    with contextlib.suppress(Exception):
        sys.stdout.flush()
    return 0 if all(row.result in ("pass", "refused", "not run") for row in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
