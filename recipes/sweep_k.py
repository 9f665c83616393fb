"""Accuracy against the fraction of weights kept: the paper's central figure, for your model,
with the search methods side by side.

    python recipes/sweep_k.py                                   # Conv2/4/6 on Fashion-MNIST
    python recipes/sweep_k.py --models conv4 --ks 0.1,0.3,0.5 --inits signed_constant --epochs 2
    python recipes/sweep_k.py --models conv6 --ks 0.05,0.1 --seeds 0,1,2 \\
        --methods edge_popup,biprop,edge_popup+global --inits kaiming_normal

For each model, method (``edge_popup``, ``biprop``, either with ``+global``: one top-k across
the network, its density ramped from 1 to k over ``--ramp-epochs``, each layer keeping at least
``--min-layer-k``, and then with ``+iterand``: pruned weights redrawn every ``--redraw-every``
steps with probability ``--redraw-prob``), init (``signed_constant``, ``kaiming_normal``, and
their ``+scaled`` variants with ``scale_fan``), k and seed, a mask is searched with the shared
training loop; the same architecture is trained densely for each learning rate of ``--dense-
lrs`` and each budget of ``--dense-epochs`` (the best lr per budget is the baseline). Every
finished run is a row of ``results.csv``, with its test accuracy and published bytes; an
interrupted sweep started again skips the finished rows and resumes the unfinished run from its
last checkpoint. At the end a figure per model is written when matplotlib is installed: the
paper's (x: % of weights kept, y: test accuracy, a line per method and init, dense as bands
over seeds) beside accuracy against published bytes (log scale).
"""

from __future__ import annotations

import argparse
import csv
import math
import statistics
import time
from pathlib import Path

from data import load_fashion_mnist

from popup_adapter import PopupConfig, get_popup_model
from popup_adapter.artifact import artifact_summary, read_artifact
from popup_adapter.convnets import create_conv_net
from popup_adapter.training import TrainingArguments, latest_checkpoint, train

FIELDS = [
    "model",
    "width",
    "method",
    "init",
    "k",
    "seed",
    "lr",
    "epochs",
    "top1",
    "seconds",
    "bytes",
]
#: the fields that name a run (the rest are its results)
KEY_FIELDS = FIELDS[:8]
#: the search methods (``--methods``): PopupConfig's ``method``, then ``+global`` for global
#: top-k and ``+iterand`` for IteRand's redraws, in that order
METHODS = tuple(
    method + scope + redraws
    for method in ("edge_popup", "biprop")
    for scope in ("", "+global")
    for redraws in ("", "+iterand")
)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", default="conv2,conv4,conv6")
    parser.add_argument("--width", type=float, default=1.0)
    parser.add_argument("--ks", default="0.1,0.3,0.5,0.7,0.9")
    parser.add_argument("--methods", default="edge_popup", help=f"of {', '.join(METHODS)}")
    parser.add_argument(
        "--inits",
        default="signed_constant,kaiming_normal,signed_constant+scaled,kaiming_normal+scaled",
    )
    parser.add_argument("--seeds", default="0")
    parser.add_argument("--epochs", type=int, default=10)
    parser.add_argument("--lr", type=float, default=0.1, help="for the masks (SGD)")
    parser.add_argument(
        "--dense-lrs", default="0.01,0.03,0.1", help="tried for the baseline ('': none)"
    )
    parser.add_argument(
        "--dense-epochs",
        default=None,
        help="epoch budgets of the dense baseline (default: --epochs)",
    )
    parser.add_argument(
        "--ramp-epochs", type=float, default=1.0, help="global top-k: density 1 -> k over these"
    )
    parser.add_argument("--min-layer-k", type=float, default=0.01, help="global top-k's floor")
    parser.add_argument("--redraw-every", type=int, default=300, help="IteRand's period (steps)")
    parser.add_argument("--redraw-prob", type=float, default=0.1, help="IteRand's probability")
    parser.add_argument("--train-limit", type=int, default=None)
    parser.add_argument("--workers", type=int, default=0)
    parser.add_argument("--output-dir", default="out/sweep")
    return parser.parse_args(argv)


def run_key(row: dict) -> tuple:
    """A run's identity; rows written before methods existed are edge-popup's (or dense)."""
    method = row.get("method") or ("dense" if row["init"] == "dense" else "edge_popup")
    return tuple(str(method if f == "method" else row[f]) for f in KEY_FIELDS)


def planned_runs(args) -> list[dict]:
    runs = []
    dense_epochs = args.dense_epochs or str(args.epochs)
    for model in args.models.split(","):
        for seed in map(int, args.seeds.split(",")):
            for epochs in map(int, dense_epochs.split(",")):
                for lr in map(float, filter(None, args.dense_lrs.split(","))):
                    runs.append(
                        {
                            "model": model,
                            "width": args.width,
                            "method": "dense",
                            "init": "dense",
                            "k": 1.0,
                            "seed": seed,
                            "lr": lr,
                            "epochs": epochs,
                        }
                    )
            for method in args.methods.split(","):
                if method not in METHODS:
                    raise SystemExit(f"unknown method {method!r}; choose from {', '.join(METHODS)}")
                for init in args.inits.split(","):
                    for k in map(float, args.ks.split(",")):
                        runs.append(
                            {
                                "model": model,
                                "width": args.width,
                                "method": method,
                                "init": init,
                                "k": k,
                                "seed": seed,
                                "lr": args.lr,
                                "epochs": args.epochs,
                            }
                        )
    return runs


def popup_config(run: dict, args, steps_per_epoch: int) -> PopupConfig:
    """The mask's config of a run: its init (``+scaled``: scale_fan), method, selection and
    redraws."""
    init, _, scaled = run["init"].partition("+")
    method, *options = run["method"].split("+")
    fields = {"k": run["k"], "init": init, "scale_fan": bool(scaled), "seed": run["seed"]}
    fields["method"] = method
    if "iterand" in options:
        fields["redraw_every"], fields["redraw_prob"] = args.redraw_every, args.redraw_prob
    if "global" in options:
        fields["selection"] = "global"
        fields["ramp_steps"] = round(args.ramp_epochs * steps_per_epoch)
        fields["min_layer_k"] = min(args.min_layer_k, run["k"])
    return PopupConfig(**fields)


def run_one(run: dict, args, train_set, test_set, folder: Path) -> tuple[float, int]:
    """Train one run; its test accuracy and published bytes (the artifact's tensor file, or
    the dense weights in fp32)."""
    model = create_conv_net(run["model"], width=run["width"])
    dense_bytes = 4 * sum(p.numel() for p in model.parameters())
    if run["method"] != "dense":
        model = get_popup_model(model, popup_config(run, args, math.ceil(len(train_set) / 128)))
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
    top1 = train(model, train_set, test_set, training)["metrics"]["top1"]
    if run["method"] == "dense":
        return top1, dense_bytes
    return top1, artifact_summary(read_artifact(folder))["file_bytes"]


def network(row: dict) -> str:
    """A run's network: the model at its width (``conv6 x0.5``)."""
    return f"{row['model']} x{float(row['width']):g}"


def label(row: dict) -> str:
    """How a run's kind reads in tables and legends: ``method, init`` (dense: ``dense``)."""
    method = run_key(row)[2]
    return "dense" if method == "dense" else f"{method}, {row['init']}"


def mean_spread(values: list[float]) -> str:
    """``mean`` of one value, ``mean ± sample std (n)`` of several, in %."""
    values = [100 * v for v in values]
    if len(values) == 1:
        return f"{values[0]:.1f}"
    return f"{statistics.mean(values):.1f} ± {statistics.stdev(values):.1f} ({len(values)})"


def dense_baselines(rows: list[dict]) -> dict[int, tuple[float, list[float]]]:
    """Per epoch budget, the dense baseline's best learning rate (by mean accuracy) and that
    lr's accuracies."""
    by_budget: dict[int, dict[float, list[float]]] = {}
    for row in rows:
        if run_key(row)[2] == "dense":
            by_lr = by_budget.setdefault(int(row["epochs"]), {})
            by_lr.setdefault(float(row["lr"]), []).append(float(row["top1"]))
    return {
        epochs: (lr := max(by_lr, key=lambda key: statistics.mean(by_lr[key])), by_lr[lr])
        for epochs, by_lr in sorted(by_budget.items())
    }


def markdown_table(rows: list[dict]) -> str:
    """Test accuracy (%) per model and method/init (rows) and k (columns), mean ± std over
    seeds, with the dense baselines at their best learning rate."""
    ks = sorted({float(row["k"]) for row in rows if run_key(row)[2] != "dense"})
    lines = [
        "| model | method, init | " + " | ".join(f"k={k:g}" for k in ks) + " |",
        "|---|---|" + "---|" * len(ks),
    ]
    for model in sorted({network(row) for row in rows}):
        mine = [row for row in rows if network(row) == model]
        for kind in dict.fromkeys(label(row) for row in mine if run_key(row)[2] != "dense"):
            cells = []
            for k in ks:
                accs = [float(r["top1"]) for r in mine if label(r) == kind and float(r["k"]) == k]
                cells.append(mean_spread(accs) if accs else "")
            lines.append(f"| {model} | {kind} | " + " | ".join(cells) + " |")
        for epochs, (lr, accs) in dense_baselines(mine).items():
            cell = mean_spread(accs)
            lines.append(
                f"| {model} | dense ({epochs} epochs, lr {lr:g}) | "
                + " | ".join([cell] * len(ks))
                + " |"
            )
    return "\n".join(lines)


def _pyplot():
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ModuleNotFoundError:
        print("matplotlib is not installed: no figure (pip install matplotlib)")
        return None
    return plt


def _byte_label(value: float, _position) -> str:
    """A log axis' tick as kB or MB, at 1, 2 and 5 of each decade only (no overlaps)."""
    mantissa = value / 10 ** math.floor(math.log10(value))
    if round(mantissa, 6) not in (1, 2, 5):
        return ""
    return f"{value / 1e6:g} MB" if value >= 1e6 else f"{value / 1e3:g} kB"


def plot(rows: list[dict], output_dir: Path) -> list[Path]:
    """Per model, the paper's figure (accuracy against % kept, a line per method and init,
    dense as bands) and accuracy against published bytes (log scale); the files written."""
    plt = _pyplot()
    if plt is None:
        return []
    from matplotlib import ticker

    written = []
    for model in sorted({network(row) for row in rows}):
        mine = [row for row in rows if network(row) == model]
        kinds = list(dict.fromkeys(label(row) for row in mine if run_key(row)[2] != "dense"))
        figure, (by_k, by_bytes) = plt.subplots(1, 2, figsize=(10, 4))
        for epochs, (lr, accs) in dense_baselines(mine).items():
            accs = [100 * acc for acc in accs]
            line = by_k.axhline(
                statistics.mean(accs), ls="--", lw=1, label=f"dense, {epochs} ep, lr {lr:g}"
            )
            by_k.axhspan(min(accs) - 0.05, max(accs) + 0.05, color=line.get_color(), alpha=0.2)
            dense_bytes = [
                int(r["bytes"]) for r in mine if run_key(r)[2] == "dense" and r.get("bytes")
            ]
            if dense_bytes:
                by_bytes.scatter(
                    [dense_bytes[0]],
                    [statistics.mean(accs)],
                    marker="s",
                    label=f"dense, {epochs} ep, lr {lr:g}",
                )
        for kind in kinds:
            runs = [r for r in mine if label(r) == kind]
            ks = sorted({float(r["k"]) for r in runs})
            means = [
                statistics.mean(100 * float(r["top1"]) for r in runs if float(r["k"]) == k)
                for k in ks
            ]
            by_k.plot([100 * k for k in ks], means, marker="o", label=kind)
            sized = [r for r in runs if r.get("bytes")]
            if sized:
                by_bytes.scatter(
                    [int(r["bytes"]) for r in sized],
                    [100 * float(r["top1"]) for r in sized],
                    label=kind,
                )
        by_k.set_xlabel("% of weights kept")
        by_k.set_ylabel("test accuracy (%)")
        by_k.set_title(f"{model}, Fashion-MNIST")
        by_k.legend(fontsize=7)
        by_bytes.set_xscale("log")
        for axis in (by_bytes.xaxis.set_major_formatter, by_bytes.xaxis.set_minor_formatter):
            axis(ticker.FuncFormatter(_byte_label))
        by_bytes.set_xlabel("published bytes (log scale)")
        by_bytes.set_ylabel("test accuracy (%)")
        by_bytes.set_title("accuracy per byte")
        by_bytes.legend(fontsize=7)
        figure.tight_layout()
        path = output_dir / f"{model.replace(' ', '_')}.png"
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
    if rows and list(rows[0]) != FIELDS:  # a table of an earlier version: the new columns added
        rows = [{f: row.get(f) or "" for f in FIELDS} | {"method": run_key(row)[2]} for row in rows]
        with table.open("w", newline="") as handle:
            writer = csv.DictWriter(handle, FIELDS)
            writer.writeheader()
            writer.writerows(rows)
    done = {run_key(row) for row in rows}
    train_set = load_fashion_mnist("train", args.train_limit)
    test_set = load_fashion_mnist("test")
    for run in planned_runs(args):
        if run_key(run) in done:
            continue
        name = "-".join(f"{run[f]}" for f in KEY_FIELDS).replace("+", "_")
        start = time.perf_counter()
        top1, nbytes = run_one(run, args, train_set, test_set, output_dir / "runs" / name)
        seconds = f"{time.perf_counter() - start:.0f}"
        row = {**run, "top1": f"{top1:.4f}", "seconds": seconds, "bytes": nbytes}
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
