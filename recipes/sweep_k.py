"""Accuracy against the fraction of weights kept: the paper's central figure, for your model.

    python recipes/sweep_k.py                                   # Conv2/4/6 on Fashion-MNIST
    python recipes/sweep_k.py --models conv4 --ks 0.1,0.3,0.5 --inits signed_constant --epochs 2

For each model, init (``signed_constant``, ``kaiming_normal``, and their ``+scaled`` variants
with ``scale_fan``), k and seed, a mask is searched with the shared training loop; the same
architecture is trained densely for each learning rate of ``--dense-lrs`` (the best one is the
baseline). Every finished run is a row of ``results.csv``; an interrupted sweep started again
skips the finished rows and resumes the unfinished run from its last checkpoint. At the end a
figure in the paper's style (x: % of weights kept, y: test accuracy, one line per init, dense as
a horizontal band over seeds) is written per model, when matplotlib is installed.
"""

from __future__ import annotations

import argparse
import csv
import statistics
import time
from pathlib import Path

from data import load_fashion_mnist

from popup_adapter import get_popup_model
from popup_adapter.convnets import create_conv_net
from popup_adapter.training import TrainingArguments, latest_checkpoint, train

FIELDS = ["model", "width", "init", "k", "seed", "lr", "epochs", "top1", "seconds"]


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", default="conv2,conv4,conv6")
    parser.add_argument("--width", type=float, default=1.0)
    parser.add_argument("--ks", default="0.1,0.3,0.5,0.7,0.9")
    parser.add_argument(
        "--inits",
        default="signed_constant,kaiming_normal,signed_constant+scaled,kaiming_normal+scaled",
    )
    parser.add_argument("--seeds", default="0")
    parser.add_argument("--epochs", type=int, default=10)
    parser.add_argument("--lr", type=float, default=0.1, help="for the masks (SGD)")
    parser.add_argument("--dense-lrs", default="0.01,0.03,0.1", help="tried for the baseline")
    parser.add_argument("--train-limit", type=int, default=None)
    parser.add_argument("--workers", type=int, default=0)
    parser.add_argument("--output-dir", default="out/sweep")
    return parser.parse_args(argv)


def run_key(row: dict) -> tuple:
    return tuple(str(row[field]) for field in FIELDS[:7])


def planned_runs(args) -> list[dict]:
    runs = []
    for model in args.models.split(","):
        for seed in map(int, args.seeds.split(",")):
            for lr in map(float, args.dense_lrs.split(",")):
                runs.append(
                    {
                        "model": model,
                        "width": args.width,
                        "init": "dense",
                        "k": 1.0,
                        "seed": seed,
                        "lr": lr,
                        "epochs": args.epochs,
                    }
                )
            for init in args.inits.split(","):
                for k in map(float, args.ks.split(",")):
                    runs.append(
                        {
                            "model": model,
                            "width": args.width,
                            "init": init,
                            "k": k,
                            "seed": seed,
                            "lr": args.lr,
                            "epochs": args.epochs,
                        }
                    )
    return runs


def run_one(run: dict, args, train_set, test_set, folder: Path) -> float:
    model = create_conv_net(run["model"], width=run["width"])
    if run["init"] != "dense":
        init, _, scaled = run["init"].partition("+")
        model = get_popup_model(
            model, k=run["k"], init=init, scale_fan=bool(scaled), seed=run["seed"]
        )
    training = TrainingArguments(
        output_dir=str(folder),
        epochs=run["epochs"],
        lr=run["lr"],
        seed=run["seed"],
        workers=args.workers,
        eval_batch_size=1000,
        dataset_name="fashion_mnist",
        resume=latest_checkpoint(folder) is not None,
        keep_checkpoints=1,
    )
    return train(model, train_set, test_set, training)["metrics"]["top1"]


def best_dense(rows: list[dict]) -> tuple[float, list[float]] | None:
    """The dense baseline: its best learning rate (by mean accuracy) and that lr's accuracies."""
    dense = [row for row in rows if row["init"] == "dense"]
    if not dense:
        return None
    by_lr: dict[float, list[float]] = {}
    for row in dense:
        by_lr.setdefault(float(row["lr"]), []).append(float(row["top1"]))
    lr = max(by_lr, key=lambda key: statistics.mean(by_lr[key]))
    return lr, by_lr[lr]


def markdown_table(rows: list[dict]) -> str:
    """Test accuracy (%) per model and init (rows) and k (columns), mean over seeds, with the
    dense baseline at its best learning rate."""
    ks = sorted({float(row["k"]) for row in rows if row["init"] != "dense"})
    lines = [
        "| model | init | " + " | ".join(f"k={k:g}" for k in ks) + " |",
        "|---|---|" + "---|" * len(ks),
    ]
    for model in sorted({row["model"] for row in rows}):
        mine = [row for row in rows if row["model"] == model]
        for init in sorted({row["init"] for row in mine} - {"dense"}):
            cells = []
            for k in ks:
                accs = [float(r["top1"]) for r in mine if r["init"] == init and float(r["k"]) == k]
                cells.append(f"{100 * statistics.mean(accs):.1f}" if accs else "")
            lines.append(f"| {model} | {init} | " + " | ".join(cells) + " |")
        baseline = best_dense(mine)
        if baseline:
            lr, accs = baseline
            mean = f"{100 * statistics.mean(accs):.1f}"
            lines.append(f"| {model} | dense (lr {lr:g}) | " + " | ".join([mean] * len(ks)) + " |")
    return "\n".join(lines)


def plot(rows: list[dict], output_dir: Path) -> list[Path]:
    """One figure per model in the style of the paper's; returns the files written."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ModuleNotFoundError:
        print("matplotlib is not installed: no figure (pip install matplotlib)")
        return []
    written = []
    for model in sorted({row["model"] for row in rows}):
        mine = [row for row in rows if row["model"] == model]
        figure, axes = plt.subplots(figsize=(5, 3.5))
        baseline = best_dense(mine)
        if baseline:
            lr, accs = baseline
            accs = [100 * acc for acc in accs]
            axes.axhspan(min(accs) - 0.05, max(accs) + 0.05, color="gray", alpha=0.3)
            axes.axhline(statistics.mean(accs), color="gray", label=f"dense (lr {lr:g})")
        for init in sorted({row["init"] for row in mine} - {"dense"}):
            ks = sorted({float(row["k"]) for row in mine if row["init"] == init})
            means = [
                statistics.mean(
                    100 * float(r["top1"]) for r in mine if r["init"] == init and float(r["k"]) == k
                )
                for k in ks
            ]
            axes.plot([100 * k for k in ks], means, marker="o", label=init)
        axes.set_xlabel("% of weights kept")
        axes.set_ylabel("test accuracy (%)")
        axes.set_title(f"{model}, Fashion-MNIST")
        axes.legend(fontsize=7)
        figure.tight_layout()
        path = output_dir / f"{model}.png"
        figure.savefig(path, dpi=150)
        plt.close(figure)
        written.append(path)
    return written


def main(argv: list[str] | None = None) -> list[dict]:
    args = parse_args(argv)
    output_dir = Path(args.output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    table = output_dir / "results.csv"
    rows = list(csv.DictReader(table.open())) if table.is_file() else []
    done = {run_key(row) for row in rows}
    train_set = load_fashion_mnist("train", args.train_limit)
    test_set = load_fashion_mnist("test")
    for run in planned_runs(args):
        if run_key(run) in done:
            continue
        name = "-".join(f"{run[f]}" for f in FIELDS[:7]).replace("+", "_")
        start = time.perf_counter()
        top1 = run_one(run, args, train_set, test_set, output_dir / "runs" / name)
        row = {**run, "top1": f"{top1:.4f}", "seconds": f"{time.perf_counter() - start:.0f}"}
        with table.open("a", newline="") as handle:
            writer = csv.DictWriter(handle, FIELDS)
            if handle.tell() == 0:
                writer.writeheader()
            writer.writerow(row)
        rows.append({key: str(value) for key, value in row.items()})
        print(f"{name}: top1 {top1:.4f}")
    print(markdown_table(rows))
    for path in plot(rows, output_dir):
        print(f"figure: {path}")
    return rows


if __name__ == "__main__":
    main()
