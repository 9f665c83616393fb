"""Draws docs/img/architecture.png: the two flows of docs/architecture.md.

python docs/img/architecture.py
"""

from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
from matplotlib.patches import FancyArrowPatch, FancyBboxPatch

TRAIN = [
    ("batch", "training.py\nsampling.py"),
    ("PopupModel.forward", "model.py"),
    ("PopupLayer.forward", "layers.py"),
    ("mask and W*M\nin one pass", "selection.py\nkernels.py"),
    ("the base layer's\nown forward", "torch / timm /\ntransformers"),
    ("loss, backward", "straight-through:\ndL/dS = dL/dW' * W"),
    ("the optimizer\nmoves the scores", "training.py"),
]
LOAD = [
    ("open_artifact", "hub.py"),
    ("read and check\nevery field", "artifact.py\nartifact_schema.py"),
    ("build on meta:\nshapes, memory", "pretrained.py\nspecs.py"),
    ("rebuild the\narchitecture", "specs.py"),
    ("draw the base\nfrom the seed", "base.py\nseeding.py"),
    ("wrap the\ntargets", "targets.py\ninjection.py"),
    ("check the base,\nset the masks", "artifact.py\nlayers.py"),
    ("PopupModel", "model.py\npretrained.py"),
]


def draw_column(ax, steps, x, colour, title):
    """One flow, top to bottom: a box per step (what happens, and the files where)."""
    width, height, gap = 4.2, 0.95, 0.42
    top = len(steps) * (height + gap)
    ax.text(x, top + 0.25, title, fontsize=13, fontweight="bold", va="bottom")
    for i, (what, where) in enumerate(steps):
        y = top - (i + 1) * (height + gap) + gap
        ax.add_patch(
            FancyBboxPatch(
                (x, y),
                width,
                height,
                boxstyle="round,pad=0.03",
                fc=colour,
                ec="#37474f",
                lw=1.2,
            )
        )
        ax.text(x + 0.15, y + height / 2, what, va="center", fontsize=10.5)
        ax.text(
            x + width - 0.15,
            y + height / 2,
            where,
            ha="right",
            va="center",
            fontsize=9.5,
            color="#37474f",
            family="monospace",
        )
        if i:
            ax.add_patch(
                FancyArrowPatch(
                    (x + width / 2, y + height + gap - 0.03),
                    (x + width / 2, y + height + 0.03),
                    arrowstyle="-|>",
                    mutation_scale=14,
                    color="#37474f",
                )
            )
    return top


def main() -> None:
    fig, ax = plt.subplots(figsize=(10, 8.2))
    top = max(len(TRAIN), len(LOAD)) * (0.95 + 0.42)
    ax.set_xlim(0, 9.3)
    ax.set_ylim(0, top + 0.7)
    ax.axis("off")
    draw_column(ax, TRAIN, 0.05, "#e3f2fd", "A training step")
    draw_column(ax, LOAD, 4.95, "#fff3e0", "Loading an artifact")
    out = Path(__file__).with_suffix(".png")
    fig.savefig(out, dpi=110, bbox_inches="tight")
    print(out)


if __name__ == "__main__":
    main()
