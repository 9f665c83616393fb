"""A popup training step of this working tree against the same step of an earlier revision.

    python benchmarks/train_step_ab.py --against 1cadc07 [--models resnet18,resnet50,bert]

Each version of popup_adapter runs in a process of its own (the earlier one from a temporary
``git worktree`` of ``--against``, with its own compiled kernels: one process can register the
``torch.ops.popup_adapter`` operators only once, and the allocator's state is part of what a
kernel change can change). Both processes stay alive, adapt the same architecture, train on
the same batch, and take turns, round after round, the order alternating: machine drift reaches
both alike, which separate runs of ``train_step.py`` cannot promise. Prints medians, min-max and
``new / old``.
"""

from __future__ import annotations

import argparse
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def serve(root: Path, threads: int) -> None:
    """The child's loop: for each ``<model> <steps>`` line read, time that many training steps
    of popup_adapter from ``root`` (the model built and warmed up on first use) and write the
    seconds per step."""
    sys.path[:0] = [str(root), str(Path(__file__).parent)]
    answers, sys.stdout = sys.stdout, sys.stderr  # whatever else is printed stays off the pipe
    import torch
    import torch.nn.functional as F
    from _models import build, logits_of

    import popup_adapter

    imported = Path(popup_adapter.__file__).resolve()
    if not imported.is_relative_to(root.resolve()):
        raise SystemExit(f"popup_adapter came from {imported}, not from {root}")
    torch.set_num_threads(threads)
    steps_of = {}
    for line in sys.stdin:
        name, steps = line.split()
        if name not in steps_of:
            torch.manual_seed(0)  # the same batch in both processes
            model, make_batch = build(name)
            model = popup_adapter.get_popup_model(model, k=0.5).train()
            params = [p for p in model.parameters() if p.requires_grad]
            optimizer = torch.optim.SGD(params, lr=0.01, momentum=0.9)
            inputs, labels = make_batch()

            def step(model=model, optimizer=optimizer, inputs=inputs, labels=labels):
                F.cross_entropy(logits_of(model(inputs)), labels).backward()
                optimizer.step()
                optimizer.zero_grad(set_to_none=True)

            step()  # warm-up: thresholds found, buffers allocated
            steps_of[name] = step
        start = time.perf_counter()
        for _ in range(int(steps)):
            steps_of[name]()
        print((time.perf_counter() - start) / int(steps), file=answers, flush=True)


class Version:
    """popup_adapter from one source tree, in a live child process."""

    def __init__(self, root: Path, threads: int):
        command = [sys.executable, __file__, "--serve", str(root), "--threads", str(threads)]
        self.process = subprocess.Popen(
            command, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True
        )

    def time_steps(self, name: str, steps: int) -> float:
        self.process.stdin.write(f"{name} {steps}\n")
        self.process.stdin.flush()
        answer = self.process.stdout.readline()
        if not answer:
            raise SystemExit(f"the child timing {name} exited (code {self.process.wait()})")
        return float(answer)

    def close(self) -> None:
        self.process.stdin.close()
        self.process.wait()


def compare(name: str, versions: dict[str, Version], rounds: int, steps: int) -> str:
    for version in versions.values():
        version.time_steps(name, 1)  # built, warmed up, one more step untimed
    times: dict[str, list[float]] = {label: [] for label in versions}
    for round_ in range(rounds):
        order = list(versions) if round_ % 2 == 0 else list(versions)[::-1]
        for label in order:
            times[label].append(versions[label].time_steps(name, steps))
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
    parser.add_argument("--against", help="the earlier git revision")
    parser.add_argument("--models", default="resnet18,resnet50,bert")
    parser.add_argument("--rounds", type=int, default=11)
    parser.add_argument("--steps", type=int, default=2, help="steps timed per round")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--serve", type=Path, help=argparse.SUPPRESS)  # the child's mode
    args = parser.parse_args()
    if args.serve:
        return serve(args.serve, args.threads)
    if not args.against:
        parser.error("--against is required")
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp) / "old"
        subprocess.run(
            ["git", "-C", str(ROOT), "worktree", "add", "--detach", str(folder), args.against],
            check=True,
            capture_output=True,
        )
        versions = {"old": Version(folder, args.threads), "new": Version(ROOT, args.threads)}
        try:
            print(f"{args.against} against the working tree, k=0.5, {args.threads} threads")
            for name in args.models.split(","):
                print(compare(name, versions, args.rounds, args.steps), flush=True)
        finally:
            for version in versions.values():
                version.close()
            subprocess.run(
                ["git", "-C", str(ROOT), "worktree", "remove", "--force", str(folder)],
                capture_output=True,
            )


if __name__ == "__main__":
    main()
