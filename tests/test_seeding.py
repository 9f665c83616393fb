from concurrent.futures import ThreadPoolExecutor
from contextlib import nullcontext

import numpy as np
import pytest
import torch
from conftest import needs_kernels

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


def test_a_fingerprint_hashed_as_the_base_is_set_is_the_fingerprint_or_none():
    t = torch.arange(6, dtype=torch.float32)
    base = {"b": t.view(2, 3), "a": t, "c": t[:2]}

    def hashed(expected, announced, final):
        hasher = seeding.FingerprintAsSet(expected)
        with ThreadPoolExecutor(1) as pool:
            result = pool.submit(hasher.result)
            for name in announced:  # any order
                hasher.add(name, base[name])
            hasher.finish(final)
            return result.result(timeout=10)

    assert hashed(base, ["c", "a", "b"], base) == seeding.fingerprint(base.items())
    assert hashed(base, ["a"], base) is None  # finished before "b" came: no wait forever
    assert hashed(["a", "b"], ["a", "b"], base) is None  # the base has a tensor more
    assert hashed(base, ["a", "b", "c"], {**base, "c": t[:2].clone()}) is None  # another one
    assert hashed(base, [], {}) is None  # a failed build stops it


@needs_kernels
@pytest.mark.parametrize("kind", [seeding.SIGNS, seeding.SYMMETRIC_UNIFORM, seeding.NORMAL])
@pytest.mark.parametrize("on_this_thread", [False, True])
def test_compiled_draws_have_the_reference_bits(kind, on_this_thread):
    # sizes around the kernel's words (64 signs, 4 words a block), pairs (odd sizes) and tasks;
    # on every thread, or the signs on this one (`from_pretrained`'s)
    with seeding.signs_on_this_thread() if on_this_thread else nullcontext():
        for numel in (1, 2, 3, 63, 64, 65, 255, 1_000, (1 << 15) + 3, 1_000_003):
            for seed, name in ((0, "w"), (7, "layer1.0.conv1.weight")):
                compiled = torch.empty(numel)
                seeding.fill_from_stream(compiled, kind, seed, name, 0.0371, compiled=True)
                reference = seeding.reference_values(kind, seed, name, numel, 0.0371)
                assert np.array_equal(compiled.numpy().view(np.uint32), reference.view(np.uint32))


@needs_kernels
def test_signs_on_this_thread_keeps_only_signs_and_only_this_thread_serial(monkeypatch):
    calls = []
    fill = torch.ops.popup_adapter.philox_fill_

    def spy(out, key0, key1, kind, scale, parallel):
        calls.append((kind, parallel))
        return fill(out, key0, key1, kind, scale, parallel)

    monkeypatch.setattr(torch.ops.popup_adapter, "philox_fill_", spy)

    def draw(kind):
        seeding.fill_from_stream(torch.empty(100), kind, 0, "w", 1.0, compiled=True)

    with seeding.signs_on_this_thread():
        with seeding.signs_on_this_thread():  # nested: the outer setting holds after it
            draw(seeding.SIGNS)
        draw(seeding.SIGNS)
        draw(seeding.NORMAL)
        with ThreadPoolExecutor(1) as other:  # another thread draws on every core
            other.submit(draw, seeding.SIGNS).result()
    draw(seeding.SIGNS)
    assert calls == [
        (seeding.SIGNS, False),
        (seeding.SIGNS, False),
        (seeding.NORMAL, True),
        (seeding.SIGNS, True),
        (seeding.SIGNS, True),
    ]


@needs_kernels
@pytest.mark.parametrize("init", ["signed_constant", "kaiming_normal", "kaiming_uniform"])
def test_every_init_draws_the_same_bits_compiled_or_in_numpy(init, monkeypatch):
    shape = torch.Size([96, 33, 3])
    compiled = seeding.init_values(init, 3, "conv.weight", shape, fan_in=99)
    monkeypatch.setattr(seeding.kernels, "_USE_KERNELS", False)  # the numpy reference
    reference = seeding.init_values(init, 3, "conv.weight", shape, fan_in=99)
    assert torch.equal(compiled.view(torch.int32), reference.view(torch.int32))
    into = torch.full(shape, float("nan"))
    assert seeding.init_values(init, 3, "conv.weight", shape, 99, out=into) is into
    assert torch.equal(into, reference)


def test_a_draw_is_written_into_a_strided_or_other_dtype_tensor_by_the_reference():
    out = torch.empty(8, 6).t()  # not contiguous: the kernel does not apply
    seeding.fill_from_stream(out, seeding.NORMAL, 1, "t", 0.5)
    expected = seeding.reference_values(seeding.NORMAL, 1, "t", 48, 0.5)
    assert np.array_equal(out.numpy(), expected.reshape(6, 8))
    with pytest.raises(ValueError, match="shape"):
        seeding.init_values("kaiming_normal", 0, "w", torch.Size([4]), 4, out=torch.empty(5))


def test_a_base_drawn_into_a_tensor_on_any_device_has_the_cpu_bits(device):
    shape = torch.Size([64, 9])
    cpu = seeding.init_values("kaiming_normal", 5, "w", shape, fan_in=9)
    there = seeding.init_values(
        "kaiming_normal", 5, "w", shape, 9, out=torch.empty(shape, device=device)
    )
    assert there.device == device
    assert seeding.fingerprint([("w", there)]) == seeding.fingerprint([("w", cpu)])
