"""A popup training step of this working tree against the same step of an earlier revision.

    python benchmarks/train_step_ab.py --against 1cadc07 [--models resnet18,resnet50,bert]

Both versions of popup_adapter are imported into one process (the earlier one from a temporary
``git worktree`` of ``--against``, under another module name), adapt the same architecture and
train on the same batch, round after round, the order alternating: machine drift reaches both
alike, which separate runs of ``train_step.py`` cannot promise. Prints medians, min-max and
``new / old``.
"""

from __future__ import annotations

import argparse
import importlib.util
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).parent))
from _models import build, logits_of

import popup_adapter

ROOT = Path(__file__).resolve().parent.parent


def load_revision(revision: str, folder: Path):
    """popup_adapter as of ``revision``, imported as the module ``popup_adapter_<revision>``."""
    subprocess.run(
        ["git", "-C", str(ROOT), "worktree", "add", "--detach", str(folder), revision],
        check=True,
        capture_output=True,
    )
    name = f"popup_adapter_{revision}"
    package = folder / "popup_adapter"
    spec = importlib.util.spec_from_file_location(
        name, package / "__init__.py", submodule_search_locations=[str(package)]
    )
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    share_kernels(module, folder)
    return module


def share_kernels(old, folder: Path) -> None:
    """One process can register the ``torch.ops.popup_adapter`` operators once: the earlier
    revision uses the library this one loads, which is only fair when the sources agree."""
    source = Path("popup_adapter/csrc/masked_weight.cpp")
    if (folder / source).read_bytes() != (ROOT / source).read_bytes():
        raise SystemExit(f"{source} differs between the revisions: compare them in two processes")
    old.kernels.load_kernels = popup_adapter.kernels.load_kernels
    # modules that imported load_kernels itself find the same library file (loaded once)
    old.kernels.build_directory = popup_adapter.kernels.build_directory


def make_step(model, batch):
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.SGD(params, lr=0.01, momentum=0.9)

    def step():
        inputs, labels = batch
        F.cross_entropy(logits_of(model(inputs)), labels).backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    return step


def compare(name: str, versions: dict, rounds: int, steps: int) -> str:
    batch = build(name)[1]()
    runs = {
        label: make_step(package.get_popup_model(build(name)[0], k=0.5).train(), batch)
        for label, package in versions.items()
    }
    times: dict[str, list[float]] = {label: [] for label in runs}
    for step in runs.values():  # warm-up: thresholds found, buffers allocated
        step()
    for round_ in range(rounds):
        order = list(runs) if round_ % 2 == 0 else list(runs)[::-1]
        for label in order:
            start = time.perf_counter()
            for _ in range(steps):
                runs[label]()
            times[label].append((time.perf_counter() - start) / steps)
    old, new = (statistics.median(times[label]) for label in ("old", "new"))
    spread = ", ".join(
        f"{label} {1000 * min(t):.0f}-{1000 * max(t):.0f}" for label, t in times.items()
    )
    return (
        f"{name:9s} old {1000 * old:.1f} ms, new {1000 * new:.1f} ms, "
        f"new/old {new / old:.3f}x ({spread})"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--against", required=True, help="the earlier git revision")
    parser.add_argument("--models", default="resnet18,resnet50,bert")
    parser.add_argument("--rounds", type=int, default=11)
    parser.add_argument("--steps", type=int, default=2, help="steps timed per round")
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp) / "old"
        try:
            versions = {"old": load_revision(args.against, folder), "new": popup_adapter}
            print(f"{args.against} against the working tree, k=0.5, {args.threads} threads")
            for name in args.models.split(","):
                print(compare(name, versions, args.rounds, args.steps), flush=True)
        finally:
            subprocess.run(
                ["git", "-C", str(ROOT), "worktree", "remove", "--force", str(folder)],
                capture_output=True,
            )


if __name__ == "__main__":
    main()
