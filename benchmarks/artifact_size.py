"""Artifact size against the entropy bound and packed bits, and load time against dense weights.

    python benchmarks/artifact_size.py [--model resnet50] [--rounds 5]

For each k: the whole tensor file against sum(n H(k))/8 + stored statistics, and against one bit
per weight. Then, interleaved over several rounds (medians and spread): the time to decode all
masks, to load the artifact into a fresh model (rebuild, regenerate the seed base, check the
fingerprint, apply), and to load the same model's dense safetensors into a fresh model.
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

import timm
import torch
from safetensors.torch import load_file, save_file

from popup_adapter import PopupModel, get_popup_model
from popup_adapter.artifact import artifact_summary, read_artifact


def timed(fn) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="resnet50")
    parser.add_argument("--ks", default="0.05,0.1,0.3,0.5")
    parser.add_argument("--rounds", type=int, default=5)
    args = parser.parse_args()
    torch.set_num_threads(2)
    tmp = Path(tempfile.mkdtemp())
    print(f"{args.model}, torch {torch.__version__}, {torch.get_num_threads()} threads\n")
    print(
        f"{'k':>5} {'file bytes':>11} {'entropy+stats':>14} {'vs bound':>9} "
        f"{'packed bits':>12} {'vs packed':>9} {'bits/weight':>11}"
    )
    for k in map(float, args.ks.split(",")):
        model = get_popup_model(timm.create_model(args.model, pretrained=False), k=k)
        folder = model.save_pretrained(tmp / f"k{k}")
        s = artifact_summary(read_artifact(folder))
        floor = s["entropy_bytes"] + s["state_bytes"]
        print(
            f"{k:>5} {s['file_bytes']:>11,d} {floor:>14,.0f} {s['file_bytes'] / floor:>9.4f} "
            f"{s['packed_bytes'] + s['state_bytes']:>12,d} "
            f"{s['file_bytes'] / (s['packed_bytes'] + s['state_bytes']):>9.4f} "
            f"{8 * s['mask_bytes'] / s['weights']:>11.4f}"
        )

    folder = tmp / "k0.3"
    dense = tmp / "dense.safetensors"
    save_file(timm.create_model(args.model, pretrained=False).state_dict(), dense)
    artifact = read_artifact(folder)

    def decode_all():
        for name in artifact.layers:
            artifact.mask(name)

    def load_dense():
        model = timm.create_model(args.model, pretrained=False)
        model.load_state_dict(load_file(dense))

    runs: dict[str, list[float]] = {"decode masks": [], "artifact load": [], "dense load": []}
    for _ in range(args.rounds):
        runs["decode masks"].append(timed(decode_all))
        runs["artifact load"].append(timed(lambda: PopupModel.from_pretrained(folder)))
        runs["dense load"].append(timed(load_dense))
    print(f"\nload, k=0.3, median of {args.rounds} interleaved rounds (min-max):")
    for name, values in runs.items():
        print(
            f"  {name:<14} {statistics.median(values):7.3f} s ({min(values):.3f}-{max(values):.3f})"
        )
    ratio = statistics.median(runs["artifact load"]) / statistics.median(runs["dense load"])
    artifact_bytes = read_artifact(folder).weights_path.stat().st_size
    print(
        f"  artifact load / dense load: {ratio:.2f}x; artifact {artifact_bytes:,d} bytes vs "
        f"dense {dense.stat().st_size:,d} bytes"
    )


if __name__ == "__main__":
    main()
