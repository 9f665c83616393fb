import numpy as np
import pytest
import torch

from popup_adapter import seeding


def test_streams_are_golden():
    """The first values of a stream never change: published masks depend on them."""
    assert seeding.random_signs(0, "x", 10).tolist() == [-1, -1, 1, -1, -1, -1, -1, 1, -1, 1]
    assert seeding.random_uniform(0, "x", 2).tolist() == [0.569475295745437, 0.021260335422539467]
    assert seeding.random_normal(3, "layer.weight", 3).tolist() == [
        -0.28980554061338576,
        -0.6839037549537513,
        1.249608471356852,
    ]


def test_streams_ignore_global_rng_and_differ_by_seed_and_name():
    torch.manual_seed(1)
    np.random.seed(1)
    a = seeding.random_normal(0, "w", 100)
    torch.manual_seed(2)
    np.random.seed(2)
    assert np.array_equal(a, seeding.random_normal(0, "w", 100))
    assert not np.array_equal(a, seeding.random_normal(1, "w", 100))
    assert not np.array_equal(a, seeding.random_normal(0, "v", 100))


def test_transforms_are_accurate():
    u = seeding.random_uniform(0, "u", 200_000) * 0.999 + 0.001
    assert np.allclose(seeding._log(u), np.log(u), rtol=1e-14, atol=1e-15)
    sin, cos = seeding._sin_cos_turns(u)
    assert np.allclose(sin, np.sin(2 * np.pi * u), atol=1e-14)
    assert np.allclose(cos, np.cos(2 * np.pi * u), atol=1e-14)
    z = seeding.random_normal(0, "z", 400_000)
    assert abs(z.mean()) < 0.01 and abs(z.std() - 1) < 0.01
    assert abs(np.mean(np.abs(z) > 1.96) - 0.05) < 0.003


@pytest.mark.parametrize("init", ["signed_constant", "kaiming_normal", "kaiming_uniform"])
def test_init_scales(init):
    values = seeding.init_values(init, 0, "w", torch.Size([256, 128]), fan_in=128)
    assert values.dtype == torch.float32 and values.shape == (256, 128)
    assert values.std().item() == pytest.approx((2 / 128) ** 0.5, rel=0.02)
    if init == "signed_constant":
        assert torch.equal(values.abs(), torch.full_like(values, (2 / 128) ** 0.5))


def test_fingerprint_covers_names_dtypes_shapes_and_bytes():
    t = torch.arange(6, dtype=torch.float32)
    base = seeding.fingerprint([("a", t), ("b", t.view(2, 3))])
    assert base == seeding.fingerprint([("b", t.view(2, 3)), ("a", t)])  # order-free
    assert base != seeding.fingerprint([("a", t), ("c", t.view(2, 3))])
    assert base != seeding.fingerprint([("a", t), ("b", t.view(3, 2))])
    assert base != seeding.fingerprint([("a", t), ("b", t.view(2, 3).double())])
    assert base != seeding.fingerprint([("a", t), ("b", t.view(2, 3) + 1)])
