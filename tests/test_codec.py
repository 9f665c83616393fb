import math

import numpy as np
import pytest
import torch

from popup_adapter import ArtifactError
from popup_adapter.codec import decode_mask, encode_mask, entropy_bits
from popup_adapter.selection import num_kept, topk_mask


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
    from popup_adapter.codec import MAGNITUDE_BUCKETS, encode_mask_given_base

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


def test_the_plain_coder_is_kept_where_the_base_says_nothing():
    from popup_adapter.codec import encode_mask_given_base

    generator = torch.Generator().manual_seed(1)
    signed_constant = torch.randint(0, 2, (128, 64), generator=generator).float() * 2 - 1
    mask = torch.rand(signed_constant.shape, generator=generator) < 0.3
    encoding, payload, bucket_kept = encode_mask_given_base(mask, signed_constant)
    assert (encoding, bucket_kept) == (encode_mask(mask)[0], None)
    assert payload.nbytes == encode_mask(mask)[1].nbytes
