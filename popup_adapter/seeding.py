"""Where the random base comes from: one counter-based stream per ``(seed, tensor name)``.

A published mask is only useful if everyone can rebuild the exact weights it was trained over,
from the seed alone, on any machine. torch's global RNG cannot promise that (its streams depend
on the device, the version and the order in which modules were built), so every tensor here is
drawn from its own Philox-4x64 stream, keyed by a hash of the seed and the tensor's name, and
turned into numbers with explicit transforms that use only correctly rounded IEEE-754
operations (+, -, *, /, sqrt, frexp). No libm transcendental is called: their last bit differs
between platforms. The result is the same bits everywhere numpy runs.
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Iterable

import numpy as np
import torch

#: Bump when the derivation below changes: it is part of every stream's key.
STREAM_VERSION = "popup-adapter/stream/v1"

_LN2 = 0.6931471805599453
_HALF_PI = math.pi / 2
#: Gain of the ReLU family, the paper's choice for every init (sqrt(2)).
RELU_GAIN = math.sqrt(2.0)


def _stream(seed: int, name: str) -> np.random.Philox:
    digest = hashlib.sha256(f"{STREAM_VERSION}\0{seed}\0{name}".encode()).digest()
    key = np.frombuffer(digest[:16], dtype="<u8")
    return np.random.Philox(key=key)


def _raw(seed: int, name: str, count: int) -> np.ndarray:
    """``count`` raw 64-bit words of the stream for ``(seed, name)``."""
    return _stream(seed, name).random_raw(count).astype("<u8", copy=False)


def random_signs(seed: int, name: str, numel: int) -> np.ndarray:
    """``numel`` values in {-1.0, +1.0} (float32), one bit of the stream each."""
    words = _raw(seed, name, (numel + 63) // 64)
    bits = np.unpackbits(words.view(np.uint8), bitorder="little")[:numel]
    return bits.astype(np.float32) * 2.0 - 1.0


def random_uniform(seed: int, name: str, numel: int) -> np.ndarray:
    """``numel`` float64 values uniform in [0, 1), 53 bits of the stream each."""
    return (_raw(seed, name, numel) >> np.uint64(11)).astype(np.float64) * 2.0**-53


def _log(x: np.ndarray) -> np.ndarray:
    """Natural log of positive float64 values, from exact operations only (error < 1 ulp-ish)."""
    mantissa, exponent = np.frexp(x)  # x = mantissa * 2**exponent, mantissa in [0.5, 1)
    small = mantissa < math.sqrt(0.5)
    mantissa = np.where(small, mantissa * 2.0, mantissa)
    exponent = exponent - small
    s = (mantissa - 1.0) / (mantissa + 1.0)  # |s| <= 0.172
    s2 = s * s
    series = np.full_like(s, 1.0 / 25.0)
    for i in range(11, -1, -1):  # log(m) = 2 s sum s^(2i) / (2i + 1)
        series = series * s2 + 1.0 / (2 * i + 1)
    return 2.0 * s * series + exponent * _LN2


def _sin_cos_turns(u: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """sin and cos of ``2 pi u`` for u in [0, 1), by quadrant reduction and Taylor series."""
    quadrant = np.rint(4.0 * u)
    theta = (4.0 * u - quadrant) * _HALF_PI  # |theta| <= pi / 4
    t2 = theta * theta
    sin = np.zeros_like(theta)
    cos = np.zeros_like(theta)
    for n in range(9, -1, -1):  # Horner over the Taylor coefficients
        sin = sin * t2 + (-1.0) ** n / math.factorial(2 * n + 1)
        cos = cos * t2 + (-1.0) ** n / math.factorial(2 * n)
    sin = sin * theta
    q = quadrant.astype(np.int64) % 4
    rotated_sin = np.choose(q, [sin, cos, -sin, -cos])
    rotated_cos = np.choose(q, [cos, -sin, -cos, sin])
    return rotated_sin, rotated_cos


def random_normal(seed: int, name: str, numel: int) -> np.ndarray:
    """``numel`` float64 standard normal values (Box-Muller over the stream)."""
    pairs = (numel + 1) // 2
    words = _raw(seed, name, 2 * pairs)
    u1 = ((words[0::2] >> np.uint64(11)).astype(np.float64) + 1.0) * 2.0**-53  # (0, 1]
    u2 = (words[1::2] >> np.uint64(11)).astype(np.float64) * 2.0**-53  # [0, 1)
    radius = np.sqrt(-2.0 * _log(u1))
    sin, cos = _sin_cos_turns(u2)
    return np.concatenate([radius * cos, radius * sin])[:numel]


def init_values(init: str, seed: int, name: str, shape: torch.Size, fan_in: float) -> torch.Tensor:
    """A float32 tensor of ``shape`` drawn by ``init`` (a :data:`~popup_adapter.config.INITS`
    name other than ``keep``), for a layer with the given ``fan_in``."""
    numel = math.prod(shape)
    std = RELU_GAIN / math.sqrt(fan_in)
    if init == "signed_constant":
        values = random_signs(seed, name, numel) * np.float32(std)
    elif init == "kaiming_normal":
        values = random_normal(seed, name, numel) * std
    elif init == "kaiming_uniform":
        values = (random_uniform(seed, name, numel) * 2.0 - 1.0) * (std * math.sqrt(3.0))
    else:
        raise ValueError(f"init {init!r} draws no values")
    return torch.from_numpy(values.astype(np.float32)).reshape(shape)


def normal_values(seed: int, name: str, shape: torch.Size, std: float) -> torch.Tensor:
    """A float32 tensor of ``shape`` from N(0, std^2), for embeddings, positions, tokens."""
    values = random_normal(seed, name, math.prod(shape)) * std
    return torch.from_numpy(values.astype(np.float32)).reshape(shape)


def score_values(seed: int, name: str, shape: torch.Size, fan_in: float) -> torch.Tensor:
    """Initial scores: uniform(-1/sqrt(fan_in), 1/sqrt(fan_in)), the reference code's
    ``kaiming_uniform_(a=sqrt(5))``; drawn from their own ``scores/`` stream."""
    bound = 1.0 / math.sqrt(fan_in)
    values = (random_uniform(seed, f"scores/{name}", math.prod(shape)) * 2.0 - 1.0) * bound
    return torch.from_numpy(values.astype(np.float32)).reshape(shape)


def fingerprint(named_tensors: Iterable[tuple[str, torch.Tensor]]) -> str:
    """sha256 over names, dtypes, shapes and bytes, in sorted name order: the identity of a base."""
    digest = hashlib.sha256(STREAM_VERSION.encode())
    for name, tensor in sorted(named_tensors, key=lambda item: item[0]):
        flat = tensor.detach().to("cpu").contiguous().reshape(-1)
        header = f"\0{name}\0{str(flat.dtype).removeprefix('torch.')}\0{tuple(tensor.shape)}\0"
        digest.update(header.encode())
        digest.update(flat.view(torch.uint8).numpy())
    return digest.hexdigest()
