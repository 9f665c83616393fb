import dataclasses
import math

import numpy as np
import pytest
import torch
from conftest import needs_kernels

from popup_adapter import ArtifactError
from popup_adapter.codec import (
    MAGNITUDE_BUCKETS,
    StoredMask,
    bucket_counts,
    decode_masks,
    encode_mask,
    encode_mask_given_base,
    entropy_bits,
    magnitude_buckets,
)
from popup_adapter.selection import num_kept, topk_mask


def decode_mask(encoding, payload, shape, kept, where, weight=None, bucket_kept=None, out=None):
    """One mask, through `decode_masks`."""
    stored = StoredMask(encoding, payload, shape, kept, where, bucket_kept, weight, out)
    return decode_masks([stored])[0]


def _mask(shape, k, seed=0):
    scores = torch.randn(shape, generator=torch.Generator().manual_seed(seed))
    return topk_mask(scores, num_kept(k, scores.numel()))


@pytest.mark.parametrize("k", [0.001, 0.05, 0.1, 0.3, 0.5, 0.7, 0.95, 1.0])
@pytest.mark.parametrize("shape", [(1,), (13,), (64, 27), (32, 16, 3, 3)])
def test_round_trip(k, shape):
    mask = _mask(shape, k)
    encoding, payload = encode_mask(mask)
    assert payload.dtype == np.uint8
    decoded = decode_mask(encoding, payload, shape, int(mask.sum()), where="test")
    assert torch.equal(decoded, mask)
    # into memory the caller allocated (from_pretrained's, for its decoder threads)
    out = torch.full((mask.numel(),), 7, dtype=torch.uint8)
    into = decode_mask(encoding, payload, shape, int(mask.sum()), "test", out=out)
    assert torch.equal(into, mask) and into.data_ptr() == out.data_ptr()
    with pytest.raises(ValueError, match="uint8 vector"):
        decode_mask(encoding, payload, shape, int(mask.sum()), "test", out=out[:-1])


@pytest.mark.parametrize(
    ("k", "expected"), [(0.1, "rans"), (0.3, "rans"), (0.5, "packed"), (1.0, "all")]
)
def test_chooses_the_smaller_encoding_near_the_entropy_bound(k, expected):
    mask = _mask((256, 1024), k)
    encoding, payload = encode_mask(mask)
    assert encoding == expected
    bound = entropy_bits(mask.numel(), int(mask.sum())) / 8
    assert payload.size <= min(math.ceil(mask.numel() / 8), bound * 1.002 + 8)


def test_corruption_is_detected_and_named():
    mask = _mask((64, 64), 0.2)
    encoding, payload = encode_mask(mask)
    kept = int(mask.sum())
    with pytest.raises(ArtifactError, match=r"layer fc.*corrupted"):
        decode_mask(encoding, payload[:-4], (64, 64), kept, where="layer fc")
    flipped = payload.copy()
    flipped[len(flipped) // 2] ^= 0xFF
    with pytest.raises(ArtifactError, match="corrupted"):
        decode_mask(encoding, flipped, (64, 64), kept, where="layer fc")
    with pytest.raises(ArtifactError, match="packed mask has 3 bytes"):
        decode_mask("packed", payload[:3], (64, 64), kept, where="layer fc")
    with pytest.raises(ArtifactError, match="unknown mask encoding 'zip'"):
        decode_mask("zip", payload, (64, 64), kept, where="layer fc")


def test_masks_that_follow_the_base_are_coded_given_its_magnitudes():
    """A mask that keeps large |W| more often (a pretrained base's, a trained Kaiming one's)
    carries less than its i.i.d. bound once the loader's base is known."""
    generator = torch.Generator().manual_seed(0)
    weight = torch.randn(256, 128, generator=generator)
    # kept with a probability that grows with |W|: 10% overall
    p = (weight.abs() / weight.abs().max()) ** 2
    mask = torch.rand(weight.shape, generator=generator) < p * (0.1 / p.mean())
    kept = int(mask.sum())
    encoding, payload, bucket_kept = encode_mask_given_base(mask, weight)
    assert encoding == "rans_magnitude" and len(bucket_kept) == MAGNITUDE_BUCKETS
    plain_bytes = encode_mask(mask)[1].nbytes
    assert payload.nbytes < 0.8 * plain_bytes < entropy_bits(mask.numel(), kept) / 8
    decoded = decode_mask(encoding, payload, (256, 128), kept, "here", weight, bucket_kept)
    assert torch.equal(decoded, mask)
    # decoded over another base, the counts per bucket disagree: refused, never a wrong mask
    with pytest.raises(ArtifactError, match="corrupted"):
        decode_mask(encoding, payload, (256, 128), kept, "here", weight.flip(0), bucket_kept)


def test_magnitude_buckets_are_the_quantiles_of_abs_w_a_byte_each():
    """Written a slice at a time (a byte per weight, not int64): the same buckets as one
    search over the whole layer, equal-sized up to ties, across the slices' seams."""
    weight = torch.randn(700_001, generator=torch.Generator().manual_seed(3))
    weight[::97] = weight[5]  # ties fall in one bucket
    buckets = magnitude_buckets(weight)
    magnitude = weight.abs().numpy()
    ranks = [magnitude.size * b // MAGNITUDE_BUCKETS for b in range(1, MAGNITUDE_BUCKETS)]
    edges = np.sort(magnitude)[ranks]
    assert buckets.dtype == np.uint8
    assert np.array_equal(buckets, np.searchsorted(edges, magnitude, side="right"))
    counts = bucket_counts(buckets)
    assert counts == np.bincount(buckets, minlength=MAGNITUDE_BUCKETS).tolist()
    assert sum(counts) == weight.numel() and max(counts) - min(counts) < weight.numel() // 90


def test_the_plain_coder_is_kept_where_the_base_says_nothing():
    generator = torch.Generator().manual_seed(1)
    signed_constant = torch.randint(0, 2, (128, 64), generator=generator).float() * 2 - 1
    mask = torch.rand(signed_constant.shape, generator=generator) < 0.3
    encoding, payload, bucket_kept = encode_mask_given_base(mask, signed_constant)
    assert (encoding, bucket_kept) == (encode_mask(mask)[0], None)
    assert payload.nbytes == encode_mask(mask)[1].nbytes


@needs_kernels
def test_the_compiled_decoder_gives_constrictions_bits(monkeypatch):
    """Both rANS encodings decode to the same bits compiled or by constriction, for masks
    and for arbitrary words (what a corrupted payload holds), and a stream constriction
    refuses is refused too."""
    from popup_adapter import codec

    rng = np.random.default_rng(0)
    cases = []
    for numel in (2, 37, 1000, 65_536, 300_001):
        bits = rng.random(numel) < rng.uniform(0.01, 0.6)
        bits[0] = not bits[1]  # neither empty nor full
        weight = torch.from_numpy(rng.standard_normal(numel).astype(np.float32))
        lean = torch.from_numpy(bits | (np.abs(weight.numpy()) > 2.5))  # leans on |W|
        for mask in (torch.from_numpy(bits), lean):
            encoding, payload, bucket_kept = codec.encode_mask_given_base(mask, weight)
            garbage = rng.integers(1, 2**32, payload.size // 4 + 2, dtype=np.uint64)
            garbage = garbage.astype("<u4").view(np.uint8)
            cases += [(encoding, p, mask, weight, bucket_kept) for p in (payload, garbage)]
    assert {case[0] for case in cases} >= {"rans", "rans_magnitude"}

    def decoded(cases):  # every stream at once: the compiled decoder runs them side by side
        streams = []
        for encoding, payload, mask, weight, bucket_kept in cases:
            words = np.frombuffer(payload.tobytes(), "<u4").astype(np.uint32)
            if encoding == "rans":
                table, index = np.array([int(mask.sum()) / mask.numel()]), None
            else:
                index = codec.magnitude_buckets(weight)
                table = codec._bucket_table(index, bucket_kept)
            bits = np.empty(mask.numel(), bool)
            streams.append(codec._RansStream(words, bits, table, index, "test"))
        codec._decode_bernoulli(streams)
        return [stream.bits for stream in streams]

    rans = [case for case in cases if case[0] != "packed"]
    compiled = decoded(rans)
    monkeypatch.setattr(codec.kernels, "_USE_KERNELS", False)
    reference = decoded(rans)  # constriction, a stream at a time
    for (encoding, *_), ours, theirs in zip(rans, compiled, reference, strict=True):
        assert np.array_equal(ours, theirs), encoding
    for compiled_setting in (True, False):
        monkeypatch.setattr(codec.kernels, "_USE_KERNELS", compiled_setting)
        trailing_zero = np.array([7, 0], "<u4").view(np.uint8)
        with pytest.raises(ArtifactError, match="does not decode"):
            decode_mask("rans", trailing_zero, (100,), 30, "layer x")


@pytest.mark.parametrize("compiled", [pytest.param(True, marks=needs_kernels), False])
def test_masks_decoded_together_are_each_decoded_alone(monkeypatch, compiled):
    """Every encoding in one call, more masks coded given |W| than decode at once, of unlike
    sizes (the compiled decoder's lanes finish and take the next stream): each mask as stored,
    and a corrupted one among them refused by its own name."""
    from popup_adapter import codec

    monkeypatch.setattr(codec.kernels, "_USE_KERNELS", compiled)
    generator = torch.Generator().manual_seed(4)
    stored, masks = [], []
    for i, (numel, k) in enumerate(
        [(9, 0.3), (70_001, 0.1), (4096, 0.5), (33, 1.0), (150_000, 0.3), (1, 0.3)]
        + [(n, 0.2) for n in (5000, 20_011, 7777, 640, 3000, 12_345, 9001)]
    ):
        weight = torch.randn(numel, generator=generator)
        # the second half keep large |W| more often: coded given the base
        p = k * (weight.abs() / weight.abs().mean()) ** 2 if i >= 6 else torch.full_like(weight, k)
        mask = torch.rand(numel, generator=generator) < p.clamp(max=1)
        if k == 1.0:
            mask[:] = True
        encoding, payload, bucket_kept = encode_mask_given_base(mask, weight)
        kept, where = int(mask.sum()), f"layer {i}"
        stored.append(StoredMask(encoding, payload, (numel,), kept, where, bucket_kept, weight))
        masks.append(mask)
    encodings = [mask.encoding for mask in stored]
    assert {"all", "packed", "rans"} <= set(encodings)
    assert encodings.count("rans_magnitude") > codec._BUCKETED_AT_ONCE
    together = decode_masks(stored)
    for mask, decoded, alone in zip(masks, together, stored, strict=True):
        assert torch.equal(decoded, mask)
        assert torch.equal(decode_masks([alone])[0], mask)
    for victim in (1, 8):  # a plain and a bucketed stream
        payload = stored[victim].payload.copy()
        payload[len(payload) // 2] ^= 0xFF
        corrupted = list(stored)
        corrupted[victim] = dataclasses.replace(stored[victim], payload=payload)
        with pytest.raises(ArtifactError, match=rf"^layer {victim}: .*corrupted"):
            decode_masks(corrupted)
