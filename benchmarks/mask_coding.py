"""Mask bytes against the i.i.d. bound, for every init and search method: what coding each bit
given the base's |W| (``rans_magnitude``) saves, once the mask has been trained.

    python benchmarks/mask_coding.py                       # train each, then measure
    python benchmarks/mask_coding.py --artifacts out/sweep15/runs/*   # measure saved artifacts

Each init x method trains a mask on Fashion-MNIST (Conv4 at ``--width``, SGD lr 0.1 momentum
0.9, batch 128, ``--steps`` steps, k = ``--k``), saves it, and prints: the masks' bytes as
saved (each layer in its smallest encoding), the plain coder's bytes (``encode_mask``: packed
or i.i.d. rANS), the i.i.d. bound ``sum n H(kept/n) / 8``, and IteRand's redraw-count bytes.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "recipes"))
from data import load_fashion_mnist

from popup_adapter import PopupModel, get_popup_model
from popup_adapter.artifact import artifact_summary, read_artifact
from popup_adapter.artifact_schema import REDRAW_PREFIX
from popup_adapter.codec import encode_mask
from popup_adapter.convnets import create_conv_net

#: (label, PopupConfig fields): every init, and each method over a Kaiming base
CASES = [
    ("signed_constant", {"init": "signed_constant"}),
    ("kaiming_normal", {"init": "kaiming_normal"}),
    ("kaiming_uniform", {"init": "kaiming_uniform"}),
    ("keep (magnitude scores)", {"init": "keep", "score_init": "magnitude"}),
    ("keep (uniform scores)", {"init": "keep"}),
    ("kaiming_normal, biprop", {"init": "kaiming_normal", "method": "biprop"}),
    ("kaiming_normal, global", {"init": "kaiming_normal", "selection": "global"}),
    ("kaiming_normal, IteRand", {"init": "kaiming_normal", "redraw_every": 50}),
]


def measure(folder: Path, masks: dict[str, torch.Tensor]) -> dict:
    """Bytes of a saved artifact's masks (``masks``: the same, decoded): as saved, under the
    plain coder, and the i.i.d. bound; and IteRand's redraw counts."""
    artifact = read_artifact(folder)
    summary = artifact_summary(artifact)
    redraws = sum(v.nbytes for k, v in artifact.tensors.items() if k.startswith(REDRAW_PREFIX))
    return {
        "saved": summary["mask_bytes"],
        "plain": sum(encode_mask(mask)[1].nbytes for mask in masks.values()),
        "bound": summary["entropy_bytes"],
        "redraws": redraws,
        "weights": summary["weights"],
    }


def train_case(fields: dict, args, train_set, folder: Path) -> dict[str, torch.Tensor]:
    """Train one mask for ``args.steps`` steps, save it, and return its masks."""
    torch.manual_seed(0)
    model = get_popup_model(create_conv_net("conv4", width=args.width), k=args.k, **fields)
    optimizer = torch.optim.SGD(
        [p for p in model.parameters() if p.requires_grad], lr=0.1, momentum=0.9
    )
    loader = torch.utils.data.DataLoader(train_set, batch_size=128, shuffle=True)
    step = 0
    while step < args.steps:
        for x, y in loader:
            model.update_search(step)
            torch.nn.functional.cross_entropy(model(x), y).backward()
            optimizer.step()
            optimizer.zero_grad()
            step += 1
            if step == args.steps:
                break
    model.update_search(None)
    model.save_pretrained(folder)
    return model.get_masks()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--k", type=float, default=0.1)
    parser.add_argument("--width", type=float, default=0.5)
    parser.add_argument("--steps", type=int, default=200)
    parser.add_argument("--artifacts", nargs="*", help="measure these folders instead")
    args = parser.parse_args()
    torch.set_num_threads(2)
    if args.artifacts:
        rows = [
            (
                Path(folder).name,
                measure(Path(folder), PopupModel.from_pretrained(folder).get_masks()),
            )
            for folder in args.artifacts
        ]
    else:
        train_set = load_fashion_mnist("train")
        tmp = Path(tempfile.mkdtemp())
        rows = []
        for label, fields in CASES:
            folder = tmp / label.replace(" ", "_").replace(",", "")
            rows.append((label, measure(folder, train_case(fields, args, train_set, folder))))
        print(f"Conv4 x{args.width}, k={args.k}, {args.steps} steps on Fashion-MNIST\n")
    print("| mask | weights | saved bytes | plain coder | i.i.d. bound | saved / bound | redraws |")
    print("|---|---|---|---|---|---|---|")
    for label, row in rows:
        print(
            f"| {label} | {row['weights']:,d} | {row['saved']:,d} | {row['plain']:,d} | "
            f"{row['bound']:,.0f} | {row['saved'] / row['bound']:.3f} | {row['redraws']:,d} |"
        )


if __name__ == "__main__":
    main()
