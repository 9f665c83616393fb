"""Artifact size against the entropy bound and packed bits.

    python benchmarks/artifact_size.py [--model resnet50]

For each k: the whole tensor file against sum(n H(k))/8 + stored statistics, and against one bit
per weight. Load time against dense weights is `load.py`'s.
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

import timm
import torch

from popup_adapter import get_popup_model
from popup_adapter.artifact import artifact_summary, read_artifact


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="resnet50")
    parser.add_argument("--ks", default="0.05,0.1,0.3,0.5")
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


if __name__ == "__main__":
    main()
