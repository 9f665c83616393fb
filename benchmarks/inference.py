"""Eval-mode inference of a masked model, the same mask served (loaded for inference) and
merged, against dense.

    python benchmarks/inference.py [--models resnet18,resnet50,vit,bert,gpt2] [--rounds 7]
    python benchmarks/inference.py --memory [--models resnet50]  # each variant in its own process

In eval mode a masked layer selects its mask and writes ``W * M`` in one fused pass per
forward, freed after the layer ran (nothing is cached). "served" is the mask saved and loaded
back with ``PopupModel.from_pretrained`` (``is_trainable=False``: merged in place, the mask
bit-packed, no scores), still a PopupModel; "merged" is ``merge_and_unload()``, the plain
model. They and the dense model are timed interleaved in one process under
``torch.inference_mode`` (medians, min-max spread).

With ``--memory``, each variant runs in a fresh process: the resident
memory the built model holds (RSS after building, freed memory returned with ``malloc_trim``,
minus RSS after imports) and what three eval
forwards add on top of it (peak RSS during them, the peak counter reset after building, minus
RSS after building).
"""

from __future__ import annotations

import argparse
import copy
import ctypes
import gc
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
from _models import build

from popup_adapter import PopupModel, get_popup_model


def _status_mb(field: str) -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) / 1024
    raise RuntimeError(f"no {field} in /proc/self/status")


def served(model: PopupModel) -> PopupModel:
    """``model``'s mask as a user serves it: saved, and loaded for inference."""
    with tempfile.TemporaryDirectory() as folder:
        model.save_pretrained(folder)
        return PopupModel.from_pretrained(folder)


def memory_child(name: str, variant: str) -> None:
    after_imports = _status_mb("VmRSS")
    model = get_popup_model(build(name)[0], k=0.5).eval()
    if variant == "merged":
        model = model.merge_and_unload().eval()
    elif variant == "served":
        model = served(model)
    inputs = build(name)[1]()[0]
    gc.collect()
    ctypes.CDLL("libc.so.6").malloc_trim(0)  # give freed memory (the draws, merged scores) back
    built = _status_mb("VmRSS")
    Path("/proc/self/clear_refs").write_text("5")  # resets the peak (VmHWM) to the current RSS
    with torch.inference_mode():
        for _ in range(3):
            model(inputs)
    peak = _status_mb("VmHWM")
    gc.collect()
    ctypes.CDLL("libc.so.6").malloc_trim(0)
    after = _status_mb("VmRSS")
    print(
        json.dumps(
            {
                "model_mb": built - after_imports,
                "resident_mb": after - after_imports,
                "peak_mb": peak - after_imports,
            }
        )
    )


def memory(models: list[str], threads: int) -> None:
    print("resident model memory and what 3 eval forwards add, each variant in its own process")
    for name in models:
        row = {}
        for variant in ("masked", "served", "merged"):
            command = [sys.executable, __file__, "--child", name, variant]
            command += ["--threads", str(threads)]
            done = subprocess.run(command, capture_output=True, text=True, check=True)
            row[variant] = json.loads(done.stdout.strip().splitlines()[-1])
        g = row["merged"]
        for variant in ("masked", "served"):
            m = row[variant]
            print(
                f"{name:<9} {variant}/merged built: {m['model_mb']:.0f}/{g['model_mb']:.0f} MB | "
                f"after 3 eval forwards: {m['resident_mb']:.0f}/{g['resident_mb']:.0f} MB "
                f"({m['resident_mb'] / g['resident_mb']:.2f}x) | peak: "
                f"{m['peak_mb']:.0f}/{g['peak_mb']:.0f} MB ({m['peak_mb'] / g['peak_mb']:.2f}x)"
            )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", default="resnet18,resnet50,vit,bert,gpt2")
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--steps", type=int, default=3, help="forward passes timed per round")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--memory", action="store_true")
    parser.add_argument("--child", nargs=2, help=argparse.SUPPRESS)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    if args.child:
        memory_child(*args.child)
        return
    if args.memory:
        memory(args.models.split(","), args.threads)
        return
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, k=0.5, eval mode")
    for name in args.models.split(","):
        dense, make_batch = build(name)
        masked = get_popup_model(build(name)[0], k=0.5).eval()
        merged = copy.deepcopy(masked).merge_and_unload().eval()
        inputs = make_batch()[0]
        dense.eval()
        models = {"masked": masked, "served": served(masked), "merged": merged, "dense": dense}
        times: dict[str, list[float]] = {key: [] for key in models}
        with torch.inference_mode():
            for model in models.values():  # warm-up
                model(inputs)
            for _ in range(args.rounds):
                for key, model in models.items():
                    start = time.perf_counter()
                    for _ in range(args.steps):
                        model(inputs)
                    times[key].append((time.perf_counter() - start) / args.steps)
        med = {key: statistics.median(values) for key, values in times.items()}
        spread = {key: f"{min(v) * 1e3:.0f}-{max(v) * 1e3:.0f}" for key, v in times.items()}
        timings = ", ".join(f"{k} {med[k] * 1e3:.1f} ms ({spread[k]})" for k in models)
        print(
            f"{name:<9} {timings} | masked/merged {med['masked'] / med['merged']:.3f}x, "
            f"served/merged {med['served'] / med['merged']:.3f}x, "
            f"masked/dense {med['masked'] / med['dense']:.3f}x"
        )


if __name__ == "__main__":
    main()
