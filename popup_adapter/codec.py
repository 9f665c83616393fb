"""How a mask is written in as few bits as possible.

A layer mask of ``n`` weights with ``kept`` ones carries at most ``n * H(kept / n)`` bits
(H the binary entropy): 0.88 bits a weight at k=0.3, 0.47 at k=0.1, 1 at k=0.5. Each layer is
stored with whichever encoding is smaller:

- ``packed``: one bit a weight (numpy ``packbits``, little bit order), the best at k near 0.5;
- ``rans``: an rANS stream (the maintained ``constriction`` library, Rust) under a Bernoulli
  model of probability ``kept / n``: within a few bytes of the entropy bound, and it decodes
  ResNet-50's 25M weights in a fraction of a second;
- ``all``: no payload, every weight kept (k = 1);
- ``rans_magnitude`` (format 4): rANS with a probability per |W| quantile bucket of the
  layer. The i.i.d. bound above assumes every weight is kept with the same probability, but
  the loader regenerates the base before it decodes, and a trained mask leans on it (a
  pretrained base's kept weights follow |W|; over a Kaiming base they lean to large |W|). The
  counts kept per bucket are stored beside the payload (`MAGNITUDE_BUCKETS` numbers); the
  encoding is used only where it is smaller, so it never loses (a signed-constant base, whose
  |W| are all equal, gets the plain coder).

The payload is a flat ``uint8`` array so it can live in a safetensors file.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import NamedTuple

import constriction
import numpy as np
import torch

from . import kernels
from .errors import ArtifactError

ENCODINGS = ("packed", "rans", "all", "rans_magnitude")
#: |W| quantile buckets of the ``rans_magnitude`` coder
MAGNITUDE_BUCKETS = 16
_BUCKET_SLICE = 1 << 18  # weights bucketed at a time (a 2 MiB int64 temporary)


def entropy_bits(numel: int, kept: int) -> float:
    """``numel * H(kept / numel)``: the information in a mask, the floor of any encoding.

    Args:
        numel: the mask's size.
        kept: how many entries are True.

    Returns:
        The bound in bits (0 for an empty or full mask).
    """
    if kept in (0, numel):
        return 0.0
    p = kept / numel
    return -numel * (p * math.log2(p) + (1 - p) * math.log2(1 - p))


def _bernoulli(numel: int, kept: int):
    return constriction.stream.model.Bernoulli(kept / numel, perfect=False)


def pack_bits(bits: np.ndarray) -> np.ndarray:
    """One bit a weight, little bit order: the ``packed`` encoding's payload, and the form a
    merged layer keeps its mask in (`popup_adapter.merging`).

    Args:
        bits: bool, flat.

    Returns:
        ``ceil(len(bits) / 8)`` uint8 bytes.
    """
    return np.packbits(bits, bitorder="little")


def unpack_bits(payload: np.ndarray, numel: int) -> np.ndarray:
    """`pack_bits`' input back.

    Args:
        payload: the uint8 bytes.
        numel: how many bits they hold.

    Returns:
        A flat bool array of ``numel`` entries.
    """
    return np.unpackbits(payload, count=numel, bitorder="little").view(bool)  # 0/1: no copy


def unpack_bits_tensor(packed: torch.Tensor, numel: int) -> torch.Tensor:
    """`pack_bits`' input back from a uint8 tensor, on the tensor's device (a served mask,
    unpacked for each forward where it lives: no trip through the host).

    Args:
        packed: the uint8 bytes, flat.
        numel: how many bits they hold.

    Returns:
        A flat bool tensor of ``numel`` entries.
    """
    shifts = torch.arange(8, dtype=torch.uint8, device=packed.device)
    return ((packed.unsqueeze(-1) >> shifts) & 1).view(-1)[:numel].bool()


def encode_mask(mask: torch.Tensor) -> tuple[str, np.ndarray]:
    """A boolean mask in as few bytes as possible.

    Args:
        mask: bool, any shape.

    Returns:
        ``(encoding, uint8 payload)``, the smallest of `ENCODINGS`.
    """
    bits = mask.detach().to("cpu").reshape(-1).numpy().astype(bool)
    numel, kept = bits.size, int(np.count_nonzero(bits))
    if kept == numel:
        return "all", np.zeros(0, dtype=np.uint8)
    packed = pack_bits(bits)
    if kept == 0:
        return "packed", packed
    coder = constriction.stream.stack.AnsCoder()
    coder.encode_reverse(bits.astype(np.int32), _bernoulli(numel, kept))
    words = coder.get_compressed().astype("<u4")
    if words.nbytes < packed.nbytes:
        return "rans", words.view(np.uint8)
    return "packed", packed


def magnitude_buckets(weight: torch.Tensor) -> np.ndarray:
    """Each weight's |W| quantile bucket in its layer, from exact order statistics (the same on
    every machine: comparisons of the regenerated float32 values only).

    Args:
        weight: the base weight (any shape).

    Returns:
        A flat uint8 array of buckets in ``[0, MAGNITUDE_BUCKETS)``: a byte per weight, written
        a slice at a time, since masks decode on worker threads whose freed temporaries stay
        resident in their glibc arenas (an int64 bucket per weight cost a loaded resnet50
        tens of MB).
    """
    magnitude = weight.detach().to("cpu", torch.float32).reshape(-1).abs().numpy()
    ranks = [magnitude.size * b // MAGNITUDE_BUCKETS for b in range(1, MAGNITUDE_BUCKETS)]
    edges = np.partition(magnitude, ranks)[ranks]
    buckets = np.empty(magnitude.size, np.uint8)
    for start in range(0, magnitude.size, _BUCKET_SLICE):
        part = slice(start, start + _BUCKET_SLICE)
        buckets[part] = np.searchsorted(edges, magnitude[part], side="right")
    return buckets


def bucket_counts(buckets: np.ndarray) -> list[int]:
    """How many entries each |W| bucket has (torch's bincount counts the bytes as they are,
    where numpy's would copy them to int64 first).

    Args:
        buckets: `magnitude_buckets`' output, or a selection of it.

    Returns:
        ``MAGNITUDE_BUCKETS`` counts.
    """
    counts = torch.bincount(torch.from_numpy(buckets), minlength=MAGNITUDE_BUCKETS)
    return counts.tolist()


def _bucket_table(buckets: np.ndarray, bucket_kept: list[int]) -> np.ndarray:
    """The kept fraction of each |W| bucket: each bit's probability, indexed by its bucket."""
    sizes = np.asarray(bucket_counts(buckets))
    return np.asarray(bucket_kept, np.float64) / np.maximum(sizes, 1)


def encode_mask_given_base(
    mask: torch.Tensor, weight: torch.Tensor
) -> tuple[str, np.ndarray, list[int] | None]:
    """The smaller of `encode_mask`'s encodings and ``rans_magnitude``, which codes each bit
    with the kept fraction of its weight's |W| bucket (the loader knows the base).

    Args:
        mask: bool, shaped like ``weight``.
        weight: the base weight the loader regenerates before decoding.

    Returns:
        ``(encoding, uint8 payload, kept count per bucket or None)``.
    """
    encoding, payload = encode_mask(mask)
    bits = mask.detach().to("cpu").reshape(-1).numpy().astype(bool)
    if encoding == "all" or not bits.any():
        return encoding, payload, None
    buckets = magnitude_buckets(weight)
    bucket_kept = bucket_counts(buckets[bits])
    coder = constriction.stream.stack.AnsCoder()
    family = constriction.stream.model.Bernoulli(perfect=False)
    probabilities = _bucket_table(buckets, bucket_kept)[buckets]
    coder.encode_reverse(bits.astype(np.int32), family, probabilities)
    words = coder.get_compressed().astype("<u4")
    if words.nbytes + 4 * MAGNITUDE_BUCKETS < payload.nbytes:  # the counts cost a few bytes
        return "rans_magnitude", words.view(np.uint8), bucket_kept
    return encoding, payload, None


@dataclass(frozen=True)
class StoredMask:
    """One layer's mask as an artifact stores it, with what decoding it needs.

    Attributes:
        encoding: as stored (one of `ENCODINGS`).
        payload: the uint8 bytes.
        shape: the mask's shape.
        kept: how many entries are True.
        where: names the layer and file in an error.
        bucket_kept: the kept count per |W| bucket (``rans_magnitude`` only).
        weight: the regenerated base weight (``rans_magnitude`` only).
        out: a flat uint8 tensor of one byte per entry that the mask is written into, for a
            decoder thread: what a thread allocates stays in its own glibc heap, resident
            after it is freed, so a caller that decodes on worker threads allocates the masks
            on its own (default: a new array).
    """

    encoding: str
    payload: np.ndarray
    shape: tuple[int, ...]
    kept: int
    where: str
    bucket_kept: list[int] | None = None
    weight: torch.Tensor | None = None
    out: torch.Tensor | None = None


class _RansStream(NamedTuple):
    """An rANS stream to decode into ``bits``: bit ``i`` under Bernoulli(``table[index[i]]``)
    (``table[0]`` for all when ``index`` is None)."""

    words: np.ndarray
    bits: np.ndarray
    table: np.ndarray
    index: np.ndarray | None
    where: str


#: masks coded given |W| decoded together: their buckets (a byte per weight) live that long
_BUCKETED_AT_ONCE = 4


def decode_masks(masks: Sequence[StoredMask]) -> list[torch.Tensor]:
    """The boolean masks back from `encode_mask`'s (or `encode_mask_given_base`'s) output.

    Decoding them together is faster than one at a time: the compiled decoder runs several rANS
    streams side by side, a symbol of each per step (one stream's symbols are a dependency
    chain that leaves most of a core idle).

    Args:
        masks: the stored masks.

    Returns:
        Each bool mask, of its ``shape`` (its ``out``'s memory, when given), in order.

    Raises:
        ArtifactError: an unknown encoding, or a payload that does not decode to exactly
            ``kept`` ones (a corrupted or mismatched artifact); the message names the layer.
    """
    outs = [_output_bytes(mask) for mask in masks]
    plain, bucketed = [], []
    for mask, out in zip(masks, outs, strict=True):
        bits = out.numpy().view(bool)
        if mask.encoding == "all":
            bits.fill(True)
        elif mask.encoding == "packed":
            if mask.payload.size != (bits.size + 7) // 8:
                raise ArtifactError(
                    f"{mask.where}: packed mask has {mask.payload.size} bytes, a mask of "
                    f"shape {mask.shape} needs {(bits.size + 7) // 8}; the file is corrupted"
                )
            np.copyto(bits, unpack_bits(mask.payload, bits.size))
        elif mask.encoding in ("rans", "rans_magnitude"):
            if mask.payload.size % 4 or not 0 < mask.kept < bits.size:
                raise ArtifactError(f"{mask.where}: malformed rANS payload; the file is corrupted")
            (plain if mask.encoding == "rans" else bucketed).append((mask, bits))
        else:
            raise ArtifactError(
                f"{mask.where}: unknown mask encoding {mask.encoding!r}; known: {ENCODINGS}. "
                "Upgrade popup_adapter?"
            )
    _decode_rans(
        [
            _RansStream(_words(mask), bits, np.array([mask.kept / bits.size]), None, mask.where)
            for mask, bits in plain
        ]
    )
    bucketed.sort(key=lambda pair: pair[1].size, reverse=True)  # like sizes decode together
    for first in range(0, len(bucketed), _BUCKETED_AT_ONCE):
        group = bucketed[first : first + _BUCKETED_AT_ONCE]
        buckets = [magnitude_buckets(mask.weight) for mask, _ in group]
        _decode_rans(
            [
                _RansStream(_words(m), bits, _bucket_table(b, m.bucket_kept), b, m.where)
                for (m, bits), b in zip(group, buckets, strict=True)
            ]
        )
        for (mask, bits), b in zip(group, buckets, strict=True):
            if bucket_counts(b[bits]) != list(mask.bucket_kept):
                raise ArtifactError(
                    f"{mask.where}: the rANS stream does not decode (the kept counts per |W| "
                    "bucket differ); the file is corrupted"
                )
    for mask, out in zip(masks, outs, strict=True):
        if (decoded := int(np.count_nonzero(out.numpy().view(bool)))) != mask.kept:
            raise ArtifactError(
                f"{mask.where}: the mask decodes to {decoded} kept weights, the "
                f"config says {mask.kept}; the file is corrupted or not this layer's"
            )
    return [out.view(torch.bool).reshape(mask.shape) for mask, out in zip(masks, outs, strict=True)]


def _output_bytes(mask: StoredMask) -> torch.Tensor:
    """The byte per entry that ``mask`` decodes into: its ``out``, checked, or new memory."""
    numel = math.prod(mask.shape)
    if mask.out is None:
        return torch.empty(numel, dtype=torch.uint8)
    if mask.out.dtype != torch.uint8 or mask.out.shape != (numel,) or not mask.out.is_contiguous():
        raise ValueError(f"out must be a contiguous uint8 vector of {numel} entries")
    return mask.out


def _words(mask: StoredMask) -> np.ndarray:
    """An rANS payload's 32-bit words, little-endian as stored."""
    return np.frombuffer(mask.payload.tobytes(), dtype="<u4").astype(np.uint32)


def _decode_rans(streams: list[_RansStream]) -> None:
    """Decode every stream into its ``bits``, together; where that fails, one at a time, so
    that the error names the layer whose stream does not decode."""
    if not streams:
        return
    try:
        _decode_bernoulli(streams)
    except Exception:
        for stream in streams:
            try:
                _decode_bernoulli([stream])
            except Exception as error:  # constriction raises its own types on a bad stream
                raise ArtifactError(
                    f"{stream.where}: the rANS stream does not decode ({error}); the file is "
                    "corrupted"
                ) from error
        raise


def _decode_bernoulli(streams: list[_RansStream]) -> None:
    """The bits of rANS streams, written into their ``bits``: by the compiled decoder where the
    kernels are loaded (the same bits as constriction's, several times faster, streams side by
    side, without the GIL, so that groups of layers decode in parallel); else by constriction,
    a stream at a time."""
    if kernels.use_kernels() and kernels.load_kernels():
        torch.ops.popup_adapter.rans_decode_bernoulli_(
            [torch.from_numpy(stream.bits.view(np.uint8)) for stream in streams],
            [torch.from_numpy(stream.words.view(np.int32)) for stream in streams],
            [torch.from_numpy(np.ascontiguousarray(s.table, np.float64)) for s in streams],
            [
                torch.empty(0, dtype=torch.uint8) if s.index is None else torch.from_numpy(s.index)
                for s in streams
            ],
        )
        return
    for stream in streams:
        coder = constriction.stream.stack.AnsCoder(stream.words)
        if stream.index is None:
            model = constriction.stream.model.Bernoulli(stream.table[0], perfect=False)
            decoded = coder.decode(model, stream.bits.size)
        else:
            family = constriction.stream.model.Bernoulli(perfect=False)
            decoded = coder.decode(family, stream.table[stream.index])
        np.copyto(stream.bits, decoded.astype(bool))


#: the largest redraw count a weight can carry (counts are stored as uint8)
MAX_COUNT = 255


def _categorical(histogram: list[int]):
    probabilities = np.asarray(histogram, dtype=np.float64) / sum(histogram)
    return constriction.stream.model.Categorical(probabilities, perfect=False)


def encode_counts(counts: np.ndarray) -> tuple[list[int], np.ndarray]:
    """Small non-negative integers (IteRand's redraw counts of the kept weights, most of them
    0) in about their entropy: an rANS stream under their own histogram, which is stored beside
    it (a few numbers).

    Args:
        counts: flat, each in [0, `MAX_COUNT`].

    Returns:
        ``(histogram, uint8 payload)``: ``histogram[c]`` is how many entries are ``c``; the
        payload is empty when every entry is the same.
    """
    histogram = np.bincount(counts.astype(np.int64), minlength=1).tolist()
    if max(histogram) == counts.size:
        return histogram, np.zeros(0, dtype=np.uint8)
    coder = constriction.stream.stack.AnsCoder()
    coder.encode_reverse(counts.astype(np.int32), _categorical(histogram))
    return histogram, coder.get_compressed().astype("<u4").view(np.uint8)


def decode_counts(histogram: list[int], payload: np.ndarray, where: str) -> np.ndarray:
    """`encode_counts`' input back.

    Args:
        histogram: as stored.
        payload: the uint8 bytes.
        where: names the layer and file in an error.

    Returns:
        A flat uint8 array of ``sum(histogram)`` entries with exactly that histogram.

    Raises:
        ArtifactError: a payload that does not decode to the histogram (a corrupted file).
    """
    total = sum(histogram)
    nonzero = [c for c, n in enumerate(histogram) if n]
    if len(nonzero) == 1:
        if payload.size:
            raise ArtifactError(
                f"{where}: redraw counts payload not expected; the file is corrupted"
            )
        return np.full(total, nonzero[0], dtype=np.uint8)
    if payload.size % 4 == 0:
        words = np.frombuffer(payload.tobytes(), dtype="<u4").astype(np.uint32)
        try:
            counts = constriction.stream.stack.AnsCoder(words).decode(
                _categorical(histogram), total
            )
        except Exception:  # constriction raises its own types on a bad stream
            counts = None
        if (
            counts is not None
            and np.bincount(counts, minlength=len(histogram)).tolist() == histogram
        ):
            return counts.astype(np.uint8)
    raise ArtifactError(
        f"{where}: the redraw counts do not decode to their recorded histogram; the file is "
        "corrupted"
    )
