"""Loading a mask against loading dense weights, side by side in one run.

    python benchmarks/load.py [--models resnet50,vit_b16,bert_base] [--rounds 7]

For each model: a k=0.3 mask of the seeded base is saved as an artifact, the same
architecture's dense weights as safetensors, and then, round after round, interleaved:

- ``popup``: ``PopupModel.from_pretrained(folder)``, the whole load a user calls: the base
  rebuilt from its spec, regenerated from the seed, fingerprinted, the masks decoded and
  merged for serving;
- ``dense``: the library's own load of the dense file, as a user calls it: timm's
  ``create_model(name, pretrained=True)`` from the local file (build, init, load), or
  transformers' ``from_pretrained(folder)``.

Each is timed with the files in the page cache (``warm``) and evicted from it first
(``cold``: ``posix_fadvise(DONTNEED)`` on every file; the libraries stay cached). Medians
and min-max of the rounds.
"""

from __future__ import annotations

import argparse
import os
import statistics
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import torch
from torch import nn

from popup_adapter import PopupModel, get_popup_model

TIMM = {"resnet50": "resnet50", "vit_b16": "vit_base_patch16_224"}


def evict(folder: Path) -> None:
    """Drop every file under ``folder`` from the page cache."""
    for path in folder.rglob("*"):
        if path.is_file():
            fd = os.open(path, os.O_RDONLY)
            try:
                os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
            finally:
                os.close(fd)


def prepare(name: str, root: Path) -> tuple[Callable[[], nn.Module], Callable[[], nn.Module]]:
    """Save the artifact and the dense weights of ``name``; return the two loads."""
    masks, dense = root / f"{name}-mask", root / f"{name}-dense"
    if name in TIMM:
        import timm
        from safetensors.torch import save_file

        get_popup_model(timm.create_model(TIMM[name]), k=0.3).save_pretrained(masks)
        dense.mkdir()
        save_file(timm.create_model(TIMM[name]).state_dict(), dense / "model.safetensors")

        def load_dense() -> nn.Module:
            overlay = {"file": str(dense / "model.safetensors")}
            return timm.create_model(TIMM[name], pretrained=True, pretrained_cfg_overlay=overlay)

    else:
        from transformers import BertConfig, BertModel

        get_popup_model(BertModel(BertConfig()), k=0.3).save_pretrained(masks)
        BertModel(BertConfig()).save_pretrained(dense)

        def load_dense() -> nn.Module:
            return BertModel.from_pretrained(dense)

    return (lambda: PopupModel.from_pretrained(masks)), load_dense


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", default="resnet50,vit_b16,bert_base")
    parser.add_argument("--rounds", type=int, default=7)
    args = parser.parse_args()
    root = Path(tempfile.mkdtemp())
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, k=0.3 masks\n")
    print(f"{'model':<10} {'cache':<5} {'popup s':>8} {'dense s':>8} {'popup/dense':>12}")
    for name in args.models.split(","):
        loads = dict(zip(("popup", "dense"), prepare(name, root), strict=True))
        times: dict[tuple[str, str], list[float]] = {}
        for variant in loads.values():
            variant()  # warm-up: imports, the compiled kernels, first-touch of the allocator
        for _ in range(args.rounds):
            for cache in ("warm", "cold"):
                for variant, load in loads.items():
                    if cache == "cold":
                        evict(root)
                    start = time.perf_counter()
                    load()
                    times.setdefault((cache, variant), []).append(time.perf_counter() - start)
        for cache in ("warm", "cold"):
            popup, dense = times[(cache, "popup")], times[(cache, "dense")]
            ratio = statistics.median(popup) / statistics.median(dense)
            spread = (
                f"popup {min(popup):.3f}-{max(popup):.3f}, dense {min(dense):.3f}-{max(dense):.3f}"
            )
            print(
                f"{name:<10} {cache:<5} {statistics.median(popup):8.3f} "
                f"{statistics.median(dense):8.3f} {ratio:11.2f}x   ({spread})"
            )
    sizes = {
        p.name: sum(f.stat().st_size for f in p.rglob("*") if f.is_file()) for p in root.iterdir()
    }
    print("\nbytes on disk: " + ", ".join(f"{k} {v:,d}" for k, v in sorted(sizes.items())))


if __name__ == "__main__":
    main()
