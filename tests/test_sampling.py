"""Seeded sampling draws the same augmentations every time without touching the caller's
global generators (main reseeded torch and random per sample and left numpy unseeded)."""

import random

import numpy as np
import torch
from torch.utils.data import Dataset

from popup_adapter.sampling import SeededDataset, seeded_rngs


class _Augmented(Dataset):
    """Each sample draws from all three global generators, as augmentations do."""

    def __len__(self):
        return 4

    def __getitem__(self, index):
        return (torch.rand(2), random.random(), float(np.random.rand()))


def _global_states():
    return torch.random.get_rng_state(), random.getstate(), np.random.get_state()[1].copy()


def test_samples_repeat_exactly_and_leave_the_global_generators_alone():
    data = SeededDataset(_Augmented(), seed=3)
    torch.manual_seed(0)
    random.seed(0)
    np.random.seed(0)
    before = _global_states()
    first, again = data[1], data[1]
    after = _global_states()
    assert torch.equal(before[0], after[0]) and before[1] == after[1]
    assert np.array_equal(before[2], after[2])
    assert torch.equal(first[0], again[0]) and first[1:] == again[1:]
    other = data[2]
    assert not torch.equal(first[0], other[0]) and first[2] != other[2]  # numpy seeded too
    data.set_epoch(1)
    assert not torch.equal(data[1][0], first[0])


def test_seeded_rngs_restores_on_error():
    before = _global_states()
    try:
        with seeded_rngs(7):
            torch.rand(3)
            raise RuntimeError("inside")
    except RuntimeError:
        pass
    after = _global_states()
    assert torch.equal(before[0], after[0]) and before[1] == after[1]
