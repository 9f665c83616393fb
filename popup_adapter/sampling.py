"""Which sample comes when, drawn with which randomness: what makes a resumed run exact.

The data order comes from ``(seed, epoch)`` alone (`EpochShuffleSampler`), every
sample's augmentation from ``(seed, epoch, index)`` (`SeededDataset`) and a step's
in-model randomness (dropout) from ``(seed, step, rank)``, each drawn inside
`seeded_rngs`: a run that stops anywhere and resumes sees what the uninterrupted one saw,
whatever the number of loader workers, and the caller's global generators are never reseeded.
"""

from __future__ import annotations

import random
from collections.abc import Iterator
from contextlib import contextmanager

import numpy as np
import torch
from torch.utils.data import Dataset, Sampler


def derived_seed(*parts: int) -> int:
    """A seed from integers, the same in every process (unlike ``hash`` of a tuple of str).

    Args:
        *parts: non-negative integers (a base seed, an epoch, an index...).

    Returns:
        A seed below ``2**61 - 1``.
    """
    value = 0
    for part in parts:
        value = (value * 1_000_003 + part) % (2**61 - 1)
    return value


@contextmanager
def seeded_rngs(seed: int, device: torch.device | None = None) -> Iterator[None]:
    """torch's, Python's and numpy's global generators seeded from ``seed`` inside the block
    and restored after it.

    Augmentations (torchvision's transforms, ``random``, numpy) and dropout draw from the global
    generators and take no generator argument; forking them gives those draws a seed of their
    own without changing what any code outside the block draws.

    Args:
        seed: any non-negative integer (see `derived_seed`).
        device: also fork this CUDA device's generator (CPU's always is).

    Yields:
        Nothing; the block draws from the seeded generators.
    """
    devices = [device] if device is not None and device.type == "cuda" else []
    python_state, numpy_state = random.getstate(), np.random.get_state()
    with torch.random.fork_rng(devices=devices):
        torch.manual_seed(seed)
        random.seed(seed)
        np.random.seed(seed % 2**32)
        try:
            yield
        finally:
            random.setstate(python_state)
            np.random.set_state(numpy_state)


class SeededDataset(Dataset):
    """Wraps a dataset so that sample ``i`` of epoch ``e`` is drawn with RNGs seeded from
    ``(seed, e, i)``: random augmentations then repeat exactly, in any worker, after a resume."""

    def __init__(self, dataset: Dataset, seed: int) -> None:
        """Wrap ``dataset`` so that sample ``i`` of epoch ``e`` draws from ``(seed, e, i)``.

        Args:
            dataset: a map-style dataset.
            seed: the run's seed.
        """
        self.dataset, self.seed, self.epoch = dataset, seed, 0

    def set_epoch(self, epoch: int) -> None:
        """Choose the epoch whose augmentations the next samples get.

        Args:
            epoch: the epoch (0-based).
        """
        self.epoch = epoch

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, index: int):
        with seeded_rngs(derived_seed(self.seed, self.epoch, index)):
            return self.dataset[index]


class EpochShuffleSampler(Sampler[int]):
    """A random permutation per epoch, from ``(seed, epoch)`` alone."""

    def __init__(self, length: int, seed: int) -> None:
        """A sampler of ``range(length)``, reshuffled per epoch from ``(seed, epoch)``.

        Args:
            length: the dataset's length.
            seed: the run's seed.
        """
        self.length, self.seed, self.epoch = length, seed, 0

    def set_epoch(self, epoch: int) -> None:
        """Choose the epoch whose permutation the next iteration yields.

        Args:
            epoch: the epoch (0-based).
        """
        self.epoch = epoch

    def __len__(self) -> int:
        return self.length

    def __iter__(self) -> Iterator[int]:
        generator = torch.Generator().manual_seed(derived_seed(self.seed, self.epoch))
        return iter(torch.randperm(self.length, generator=generator).tolist())
