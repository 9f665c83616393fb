"""How a mask is written in as few bits as possible.

A layer mask of ``n`` weights with ``kept`` ones carries at most ``n * H(kept / n)`` bits
(H the binary entropy): 0.88 bits a weight at k=0.3, 0.47 at k=0.1, 1 at k=0.5. Each layer is
stored with whichever encoding is smaller:

- ``packed``: one bit a weight (numpy ``packbits``, little bit order), the best at k near 0.5;
- ``rans``: an rANS stream (the maintained ``constriction`` library, Rust) under a Bernoulli
  model of probability ``kept / n``: within a few bytes of the entropy bound, and it decodes
  ResNet-50's 25M weights in a fraction of a second;
- ``all``: no payload, every weight kept (k = 1).

The payload is a flat ``uint8`` array so it can live in a safetensors file.
"""

from __future__ import annotations

import math

import constriction
import numpy as np
import torch

from .errors import ArtifactError

ENCODINGS = ("packed", "rans", "all")


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
    return np.unpackbits(payload, count=numel, bitorder="little").astype(bool)


def encode_mask(mask: torch.Tensor) -> tuple[str, np.ndarray]:
    """A boolean mask in as few bytes as possible.

    Args:
        mask: bool, any shape.

    Returns:
        ``(encoding, uint8 payload)``, the smallest of `ENCODINGS`.
    """
    bits = mask.detach().to("cpu").reshape(-1).numpy().astype(bool)
    numel, kept = bits.size, int(bits.sum())
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


def decode_mask(
    encoding: str, payload: np.ndarray, shape: tuple[int, ...], kept: int, where: str
) -> torch.Tensor:
    """The boolean mask back from `encode_mask`'s output.

    Args:
        encoding: as stored.
        payload: the uint8 bytes.
        shape: the mask's shape.
        kept: how many entries are True.
        where: names the layer and file in an error.

    Returns:
        The bool mask of ``shape``.

    Raises:
        ArtifactError: an unknown encoding, or a payload that does not decode to exactly
            ``kept`` ones (a corrupted or mismatched artifact).
    """
    numel = math.prod(shape)
    if encoding == "all":
        bits = np.ones(numel, dtype=bool)
    elif encoding == "packed":
        if payload.size != (numel + 7) // 8:
            raise ArtifactError(
                f"{where}: packed mask has {payload.size} bytes, a mask of "
                f"shape {shape} needs {(numel + 7) // 8}; the file is corrupted"
            )
        bits = unpack_bits(payload, numel)
    elif encoding == "rans":
        if payload.size % 4 or not 0 < kept < numel:
            raise ArtifactError(f"{where}: malformed rANS payload; the file is corrupted")
        words = np.frombuffer(payload.tobytes(), dtype="<u4").astype(np.uint32)
        try:
            bits = (
                constriction.stream.stack.AnsCoder(words)
                .decode(_bernoulli(numel, kept), numel)
                .astype(bool)
            )
        except Exception as error:  # constriction raises its own types on a bad stream
            raise ArtifactError(
                f"{where}: the rANS stream does not decode ({error}); the file is corrupted"
            ) from error
    else:
        raise ArtifactError(
            f"{where}: unknown mask encoding {encoding!r}; known: {ENCODINGS}. "
            "Upgrade popup_adapter?"
        )
    if int(bits.sum()) != kept:
        raise ArtifactError(
            f"{where}: the mask decodes to {int(bits.sum())} kept weights, the "
            f"config says {kept}; the file is corrupted or not this layer's"
        )
    return torch.from_numpy(bits).reshape(shape)


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
