"""Eval-mode inference of a masked model against the same model merged, and against dense.

    python benchmarks/inference.py [--models resnet18,resnet50,vit,bert,gpt2] [--rounds 7]

In eval mode a PopupModel computes each layer's mask once and caches ``W * M`` until the scores
change, so it should cost what the merged model (``merge_and_unload``) costs. The three are
timed interleaved in one process under ``torch.inference_mode`` (medians, min-max spread).
"""

from __future__ import annotations

import argparse
import copy
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
from _models import build

from popup_adapter import get_popup_model


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", default="resnet18,resnet50,vit,bert,gpt2")
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--steps", type=int, default=3, help="forward passes timed per round")
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, k=0.5, eval mode")
    for name in args.models.split(","):
        dense, make_batch = build(name)
        masked = get_popup_model(build(name)[0], k=0.5).eval()
        merged = copy.deepcopy(masked).merge_and_unload().eval()
        inputs = make_batch()[0]
        models = {"masked": masked, "merged": merged, "dense": dense.eval()}
        times: dict[str, list[float]] = {key: [] for key in models}
        with torch.inference_mode():
            for model in models.values():  # warm-up (and the masked model's mask cache)
                model(inputs)
            for _ in range(args.rounds):
                for key, model in models.items():
                    start = time.perf_counter()
                    for _ in range(args.steps):
                        model(inputs)
                    times[key].append((time.perf_counter() - start) / args.steps)
        med = {key: statistics.median(values) for key, values in times.items()}
        spread = {key: f"{min(v) * 1e3:.0f}-{max(v) * 1e3:.0f}" for key, v in times.items()}
        print(
            f"{name:<9} masked {med['masked'] * 1e3:7.1f} ms ({spread['masked']}), merged "
            f"{med['merged'] * 1e3:7.1f} ms ({spread['merged']}), dense "
            f"{med['dense'] * 1e3:7.1f} ms ({spread['dense']}) | masked/merged "
            f"{med['masked'] / med['merged']:.3f}x, "
            f"masked/dense {med['masked'] / med['dense']:.3f}x"
        )


if __name__ == "__main__":
    main()
