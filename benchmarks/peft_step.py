"""Training-step time, peak training memory and merged inference speed of masks against PEFT's
methods and dense training, on the pretrained all-MiniLM-L6-v2 (the models
``recipes/text_classification.py`` trains).

    python benchmarks/peft_step.py [--rounds 5]

Step times: every method's model built in this process, steps interleaved round by round (one
AdamW step on a batch of 32 x 64 tokens), medians. Peak memory: each method in a fresh process
(its peak RSS over building the model and 3 steps, minus the same process's RSS after imports),
so the figures do not mix. Merged inference: the model after ``merge_and_unload()`` (a plain
BERT for every method), eval forward of 128 x 64 tokens.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "recipes"))
from text_classification import build_model, parse_args

METHODS = {
    "mask k=0.9": ["--mode", "mask", "--k", "0.9"],
    "LoRA r=8, attention": ["--mode", "lora", "--lora-r", "8"],
    "LoRA r=8, all linear": ["--mode", "lora", "--lora-r", "8", "--peft-targets", "all-linear"],
    "IA3": ["--mode", "ia3"],
    "VeRA": ["--mode", "vera"],
    "full fine-tuning": ["--mode", "finetune"],
    "head only": ["--mode", "head"],
}


def make(flags: list[str]):
    model = build_model(parse_args(flags), num_labels=2)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)
    return model.train(), optimizer


def batch(size: int) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    return {
        "input_ids": torch.randint(1000, 20000, (size, 64), generator=g),
        "attention_mask": torch.ones(size, 64, dtype=torch.long),
        "labels": torch.randint(0, 2, (size,), generator=g),
    }


def step(model, optimizer, inputs) -> None:
    model(**inputs).loss.backward()
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)


def status_mib(field: str) -> float:
    """``VmRSS`` (now) or ``VmHWM`` (peak) of this process, in MiB. (``ru_maxrss`` would not do:
    a child started by fork and exec inherits its parent's.)"""
    with open("/proc/self/status") as status:
        return next(int(line.split()[1]) for line in status if line.startswith(field)) / 1024


def peak_memory(name: str) -> float:
    """In this (fresh) process: peak RSS over building and 3 steps, above imports, in MiB."""
    imported = status_mib("VmRSS")
    model, optimizer = make(METHODS[name])
    inputs = batch(32)
    for _ in range(3):
        step(model, optimizer, inputs)
    return status_mib("VmHWM") - imported


def merged(model):
    plain = model.merge_and_unload()
    return plain.eval()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--peak-of", default=None, help=argparse.SUPPRESS)  # the child's role
    args = parser.parse_args()
    if args.peak_of:
        print(json.dumps(peak_memory(args.peak_of)))
        return
    peaks = {}
    for name in METHODS:
        done = subprocess.run(
            [sys.executable, __file__, "--peak-of", name], capture_output=True, text=True
        )
        peaks[name] = json.loads(done.stdout.strip().splitlines()[-1])
    models = {name: make(flags) for name, flags in METHODS.items()}
    inputs = batch(32)
    times = {name: [] for name in METHODS}
    for model, optimizer in models.values():
        step(model, optimizer, inputs)  # warm-up (and the kernels' first use)
    for _ in range(args.rounds):
        for name, (model, optimizer) in models.items():
            start = time.perf_counter()
            step(model, optimizer, inputs)
            times[name].append(time.perf_counter() - start)
    eval_inputs = {k: v for k, v in batch(128).items() if k != "labels"}
    inference = {}
    with torch.no_grad():
        plains = {
            name: merged(model) if hasattr(model, "merge_and_unload") else model.eval()
            for name, (model, _) in models.items()
        }
        runs = {name: [] for name in plains}
        for _ in range(args.rounds):
            for name, plain in plains.items():
                start = time.perf_counter()
                plain(**eval_inputs)
                runs[name].append(time.perf_counter() - start)
        inference = {name: statistics.median(values) for name, values in runs.items()}
    dense = statistics.median(times["full fine-tuning"])
    print(f"\nmedian of {args.rounds} interleaved rounds, {torch.get_num_threads()} threads")
    print(f"{'method':<24} {'step (s)':>9} {'/ dense':>8} {'peak MiB':>9} {'merged eval (s)':>16}")
    for name in METHODS:
        median = statistics.median(times[name])
        print(
            f"{name:<24} {median:9.3f} {median / dense:8.2f} {peaks[name]:9.0f} "
            f"{inference[name]:16.3f}"
        )


if __name__ == "__main__":
    main()
