"""Mask or LoRA? Every method of ``text_classification.py`` on one task, one budget, one machine.

    python recipes/compare_peft.py                 # run what is missing (resumable), then report
    python recipes/compare_peft.py --report-only   # the table and figure from the runs so far

Each run is ``text_classification.py`` in a process of its own, into
``--root/<run name>/seed<seed>``; a run whose ``run.json`` exists is not repeated, so a stopped
comparison continues where it stopped. The report is a markdown table (accuracy mean and spread
over seeds, trainable parameters, published bytes, training time) and a figure of accuracy
against published bytes (log scale).
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
from pathlib import Path

RECIPE = Path(__file__).with_name("text_classification.py")
#: ``name: recipe flags``, in the order they run (the most informative first)
RUNS = {
    "LoRA r=8, attention": ["--mode", "lora", "--lora-r", "8"],
    "mask k=0.9": ["--mode", "mask", "--k", "0.9"],
    "IA3": ["--mode", "ia3"],
    "mask k=0.99": ["--mode", "mask", "--k", "0.99"],
    "LoRA r=1, attention": ["--mode", "lora", "--lora-r", "1"],
    "VeRA r=256, query/value": ["--mode", "vera"],
    "mask k=0.95": ["--mode", "mask", "--k", "0.95"],
    "LoRA r=8, all linear": ["--mode", "lora", "--lora-r", "8", "--peft-targets", "all-linear"],
    "full fine-tuning": ["--mode", "finetune"],
    "head only": ["--mode", "head"],
    "LoRA r=1, all linear": ["--mode", "lora", "--lora-r", "1", "--peft-targets", "all-linear"],
    "mask k=0.5": ["--mode", "mask", "--k", "0.5"],
    # making masks competitive: fewer layers (as LoRA chooses its targets), the learning rate
    "mask k=0.99, attention": ["--mode", "mask", "--k", "0.99", "--mask-targets", "attention"],
    "mask k=0.9, attention": ["--mode", "mask", "--k", "0.9", "--mask-targets", "attention"],
    "mask k=0.99, lr 3e-3": ["--mode", "mask", "--k", "0.99", "--lr", "3e-3"],
    "mask k=0.99, lr 3e-4": ["--mode", "mask", "--k", "0.99", "--lr", "3e-4"],
}


#: which family a run belongs to, by how its name starts (the figure's colours)
KINDS = {"mask": ("mask",), "PEFT": ("LoRA", "IA3", "VeRA"), "dense": ("full", "head")}


def run_missing(root: Path, seeds: list[int], epochs: int) -> None:
    """Run every (run, seed) without a ``run.json`` yet, one after the other."""
    for seed in seeds:
        for name, flags in RUNS.items():
            folder = root / slug(name) / f"seed{seed}"
            if (folder / "run.json").is_file():
                continue
            command = [sys.executable, str(RECIPE), *flags, "--epochs", str(epochs)]
            command += ["--seed", str(seed), "--output-dir", str(folder)]
            print(f"== {name}, seed {seed}: {' '.join(command[1:])}", flush=True)
            subprocess.run(command, check=True)


def slug(name: str) -> str:
    return "".join(c if c.isalnum() else "-" for c in name.lower()).strip("-")


def collect(root: Path) -> dict[str, list[dict]]:
    """``{run name: [run.json of each seed]}`` of the runs finished so far."""
    return {
        name: reports
        for name in RUNS
        if (reports := [json.loads(p.read_text()) for p in (root / slug(name)).glob("*/run.json")])
    }


def published(report: dict) -> int:
    """Bytes to publish: the saved folder; for head-only training the trained tensors alone
    (the recipe saves the whole model, but only the pooler and classifier changed)."""
    if report["mode"] == "head":
        return 4 * report["trainable_parameters"]
    return report["published_bytes"]


def table(results: dict[str, list[dict]]) -> str:
    lines = [
        "| method | test accuracy (mean, min-max) | seeds | trainable params | published bytes "
        "| train time (s) |",
        "|---|---|---|---|---|---|",
    ]
    for name, reports in results.items():
        top1 = [100 * r["top1"] for r in reports]
        spread = f" ({min(top1):.2f}-{max(top1):.2f})" if len(top1) > 1 else ""
        lines.append(
            f"| {name} | {statistics.mean(top1):.2f}%{spread} | {len(top1)} | "
            f"{reports[0]['trainable_parameters']:,d} | {published(reports[0]):,d} | "
            f"{statistics.median(r['train_seconds'] for r in reports):.0f} |"
        )
    return "\n".join(lines)


def figure(results: dict[str, list[dict]], out: Path) -> None:
    """Accuracy against published bytes, one numbered point per method (min-max over seeds as
    error bars), the numbers named in a legend beside the plot: names written at the points
    overlap where methods cluster."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(10, 5))
    styles = {"mask": ("o", "#c62828"), "PEFT": ("s", "#1565c0"), "dense": ("^", "#2e7d32")}
    for number, (name, reports) in enumerate(results.items(), start=1):
        top1 = [100 * r["top1"] for r in reports]
        mean, x = statistics.mean(top1), published(reports[0])
        kind = next(k for k, words in KINDS.items() if name.startswith(words))
        marker, colour = styles[kind]
        ax.errorbar(
            x,
            mean,
            yerr=[[mean - min(top1)], [max(top1) - mean]],
            fmt=marker,
            color=colour,
            capsize=3,
            label=f"{number}  {name}",
        )
        ax.annotate(str(number), (x, mean), textcoords="offset points", xytext=(5, 3), fontsize=9)
    ax.set_xscale("log")
    ax.margins(x=0.15, y=0.1)
    ax.set_xlabel("bytes to publish (log scale)")
    ax.set_ylabel("test accuracy (%)")
    ax.set_title("all-MiniLM-L6-v2 on Rotten Tomatoes: masks (red), PEFT (blue), dense (green)")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(loc="center left", bbox_to_anchor=(1.02, 0.5), fontsize=9, frameon=False)
    fig.savefig(out, dpi=110, bbox_inches="tight")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--root", default="out/peft_compare")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0])
    parser.add_argument("--epochs", type=int, default=1)
    parser.add_argument("--report-only", action="store_true")
    parser.add_argument("--figure", default="docs/img/popup_vs_peft.png")
    args = parser.parse_args(argv)
    root = Path(args.root)
    if not args.report_only:
        run_missing(root, args.seeds, args.epochs)
    results = collect(root)
    print(table(results))
    if results:
        figure(results, Path(args.figure))
        print(f"figure: {args.figure}")


if __name__ == "__main__":
    main()
