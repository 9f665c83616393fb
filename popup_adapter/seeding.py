"""Where the random base comes from: one counter-based stream per ``(seed, tensor name)``.

A published mask is only useful if everyone can rebuild the exact weights it was trained over,
from the seed alone, on any machine. torch's global RNG cannot promise that (its streams depend
on the device, the version and the order in which modules were built), so every tensor here is
drawn from its own Philox-4x64 stream, keyed by a hash of the seed and the tensor's name, and
turned into numbers with explicit transforms that use only correctly rounded IEEE-754
operations (+, -, *, /, sqrt, frexp). No libm transcendental is called: their last bit differs
between platforms. The result is the same bits everywhere numpy runs.

The numpy functions here are the reference. Where the compiled kernels are loaded
(`popup_adapter.kernels`), `fill_from_stream` computes the same words and the same
operations in C++ (``csrc/philox.cpp``), on every thread, straight into the float32 tensor
that keeps them: a base is drawn at memory speed, with the same bits (tests compare the two
paths for every init).
"""

from __future__ import annotations

import hashlib
import math
import threading
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from typing import Any

import numpy as np
import torch
from torch.utils._python_dispatch import is_traceable_wrapper_subclass

from . import kernels

#: Bump when the derivation below changes: it is part of every stream's key.
STREAM_VERSION = "popup-adapter/stream/v1"

_LN2 = 0.6931471805599453
_HALF_PI = math.pi / 2

#: an elementwise float64 map applied to drawn values before they are stored
Transform = Callable[[np.ndarray], np.ndarray]

#: Gain of the ReLU family, the paper's choice for every init (sqrt(2)).
RELU_GAIN = math.sqrt(2.0)


def _stream_key(seed: int, name: str) -> np.ndarray:
    digest = hashlib.sha256(f"{STREAM_VERSION}\0{seed}\0{name}".encode()).digest()
    return np.frombuffer(digest[:16], dtype="<u8")


def _stream(seed: int, name: str) -> np.random.Philox:
    return np.random.Philox(key=_stream_key(seed, name))


#: values drawn at a time: the float64 intermediates of a transform stay a few MB even for a
#: large embedding (drawing it whole peaked at several times the model's own size)
_BLOCK = 1 << 20


def _words(stream: np.random.Philox, count: int) -> np.ndarray:
    """The next ``count`` raw 64-bit words of ``stream`` (consecutive calls continue it)."""
    return stream.random_raw(count).astype("<u8", copy=False)


def _unit(words: np.ndarray) -> np.ndarray:
    """Words to float64 values uniform in [0, 1), their top 53 bits each."""
    return (words >> np.uint64(11)).astype(np.float64) * 2.0**-53


def _identity(values: np.ndarray) -> np.ndarray:
    return values


def random_signs(seed: int, name: str, numel: int) -> np.ndarray:
    """``numel`` values in {-1.0, +1.0} (float32), one bit of the stream each.

    Args:
        seed: the base's seed.
        name: the tensor's name (its stream).
        numel: how many values.

    Returns:
        A float32 array.
    """
    words = _words(_stream(seed, name), (numel + 63) // 64)
    bits = np.unpackbits(words.view(np.uint8), bitorder="little")[:numel]
    return bits.astype(np.float32) * 2.0 - 1.0


def random_uniform(
    seed: int, name: str, numel: int, transform: Transform = _identity, dtype: type = np.float64
) -> np.ndarray:
    """``numel`` values uniform in [0, 1), 53 bits of the stream each, mapped by ``transform``
    (elementwise, in float64) and stored as ``dtype``, block by block.

    Args:
        seed: the base's seed.
        name: the tensor's name (its stream).
        numel: how many values.
        transform: applied to each block of uniforms.
        dtype: of the result.

    Returns:
        A flat array.
    """
    stream, out = _stream(seed, name), np.empty(numel, dtype)
    for start in range(0, numel, _BLOCK):
        count = min(_BLOCK, numel - start)
        out[start : start + count] = transform(_unit(_words(stream, count)))
    return out


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


def random_normal(
    seed: int, name: str, numel: int, transform: Transform = _identity, dtype: type = np.float64
) -> np.ndarray:
    """``numel`` standard normal values (Box-Muller over the stream: the cosines of all pairs,
    then their sines), mapped by ``transform`` (elementwise, in float64) and stored as
    ``dtype``, block by block.

    Args:
        seed: the base's seed.
        name: the tensor's name (its stream).
        numel: how many values.
        transform: applied to each block of normals.
        dtype: of the result.

    Returns:
        A flat array.
    """
    pairs = (numel + 1) // 2
    stream, out = _stream(seed, name), np.empty(2 * pairs, dtype)
    for start in range(0, pairs, _BLOCK):
        count = min(_BLOCK, pairs - start)
        words = _words(stream, 2 * count)
        u1 = _unit(words[0::2]) + 2.0**-53  # (0, 1]
        radius = np.sqrt(-2.0 * _log(u1))
        sin, cos = _sin_cos_turns(_unit(words[1::2]))
        out[start : start + count] = transform(radius * cos)
        out[pairs + start : pairs + start + count] = transform(radius * sin)
    return out[:numel]


#: what `fill_from_stream` makes of a stream (the values of ``csrc/philox.cpp``'s kinds)
SIGNS, SYMMETRIC_UNIFORM, NORMAL = 0, 1, 2


def reference_values(kind: int, seed: int, name: str, numel: int, scale: float) -> np.ndarray:
    """What `fill_from_stream` writes, computed by the numpy reference.

    Args:
        kind: `SIGNS` (``+-scale``, the scale rounded to float32 first), `SYMMETRIC_UNIFORM`
            (uniform in ``[-scale, scale)``) or `NORMAL` (``N(0, scale^2)``).
        seed: the base's seed.
        name: the tensor's name (its stream).
        numel: how many values.
        scale: as ``kind`` says.

    Returns:
        A flat float32 array.

    Raises:
        ValueError: an unknown ``kind``.
    """
    if kind == SIGNS:
        return random_signs(seed, name, numel) * np.float32(scale)
    if kind == SYMMETRIC_UNIFORM:
        return random_uniform(seed, name, numel, lambda u: (u * 2.0 - 1.0) * scale, np.float32)
    if kind == NORMAL:
        return random_normal(seed, name, numel, lambda v: v * scale, np.float32)
    raise ValueError(f"unknown kind {kind!r}")


def fill_from_stream(
    out: torch.Tensor,
    kind: int,
    seed: int,
    name: str,
    scale: float,
    compiled: bool | None = None,
) -> torch.Tensor:
    """Write the stream ``(seed, name)``'s values of ``kind`` into ``out``, in place.

    Args:
        out: a float32 tensor (any shape); CPU and contiguous for the compiled path.
        kind: as in `reference_values`.
        seed: the base's seed.
        name: the tensor's name (its stream).
        scale: as in `reference_values`.
        compiled: True for the compiled kernel, False for the numpy reference; default:
            the kernel where it is loaded and applies (the kernels setting, a contiguous CPU
            float32 ``out``), else the reference. Both give the same bits.

    Returns:
        ``out``.

    Raises:
        RuntimeError: ``compiled=True`` where the kernels cannot be built.
    """
    if compiled is None:
        compiled = fills_in_place(out) and kernels.use_kernels() and kernels.load_kernels()
    elif compiled and not kernels.load_kernels():
        raise RuntimeError("the compiled kernels are not available here (see the warning)")
    if compiled:
        key0, key1 = _stream_key(seed, name).view("<i8").tolist()
        with torch.no_grad():
            parallel = kind not in getattr(_serial_kinds, "kinds", ())
            torch.ops.popup_adapter.philox_fill_(out, key0, key1, kind, scale, parallel)
        return out
    values = reference_values(kind, seed, name, out.numel(), scale)
    with torch.no_grad():
        out.copy_(torch.from_numpy(values).reshape(out.shape))
    return out


#: the draw kinds that `signs_on_this_thread` keeps on the calling thread, per thread
_serial_kinds = threading.local()


@contextmanager
def signs_on_this_thread() -> Iterator[None]:
    """Draw signs (the signed-constant base) on the calling thread alone, not on every core,
    within the block and on this thread only.

    A sign costs a sixty-fourth of a Philox word: filling a signed-constant base is bound by
    memory and page faults, which more threads barely speed up. Where the caller's own threads
    already hold the cores (`PopupModel.from_pretrained`: the mask decoders and the
    fingerprint's hasher), the parallel fill's OpenMP workers only competed with them (a
    ResNet-50 load 10-15% slower, see docs/results.md). The arithmetic-bound draws (uniform,
    Box-Muller) stay parallel. The values are the same either way.
    """
    before = getattr(_serial_kinds, "kinds", frozenset())
    _serial_kinds.kinds = before | {SIGNS}
    try:
        yield
    finally:
        _serial_kinds.kinds = before


def fills_in_place(tensor: torch.Tensor) -> bool:
    """Whether the compiled draws can write into ``tensor`` as it is: float32, CPU, contiguous
    (any other tensor is filled through a copy).

    Args:
        tensor: the destination of a draw.

    Returns:
        True when no conversion stands between the stream and the tensor.
    """
    return tensor.dtype == torch.float32 and tensor.device.type == "cpu" and tensor.is_contiguous()


def _into(out: torch.Tensor | None, shape: torch.Size) -> torch.Tensor:
    if out is None:
        return torch.empty(shape, dtype=torch.float32)
    if out.shape != shape:
        raise ValueError(f"out has shape {tuple(out.shape)}, the draw {tuple(shape)}")
    return out


def init_values(
    init: str,
    seed: int,
    name: str,
    shape: torch.Size,
    fan_in: float,
    out: torch.Tensor | None = None,
) -> torch.Tensor:
    """Layer weights drawn by an init, from their own stream.

    Args:
        init: a [`INITS`][popup_adapter.INITS] name other than ``keep``.
        seed: the base's seed.
        name: the tensor's name (its stream).
        shape: the tensor's shape.
        fan_in: the layer's fan-in (the inits' scale).
        out: written in place when given (a parameter of ``shape``), else a new tensor.

    Returns:
        A float32 tensor of ``shape`` (``out`` when given).

    Raises:
        ValueError: ``init`` draws no values (``keep``).
    """
    std = RELU_GAIN / math.sqrt(fan_in)
    if init == "signed_constant":
        kind, scale = SIGNS, std
    elif init == "kaiming_normal":
        kind, scale = NORMAL, std
    elif init == "kaiming_uniform":
        kind, scale = SYMMETRIC_UNIFORM, std * math.sqrt(3.0)
    else:
        raise ValueError(f"init {init!r} draws no values")
    return fill_from_stream(_into(out, torch.Size(shape)), kind, seed, name, scale)


def normal_values(
    seed: int, name: str, shape: torch.Size, std: float, out: torch.Tensor | None = None
) -> torch.Tensor:
    """A float32 tensor of ``shape`` from N(0, std^2), for embeddings, positions, tokens.

    Args:
        seed: the base's seed.
        name: the tensor's name (its stream).
        shape: the tensor's shape.
        std: the standard deviation.
        out: written in place when given, else a new tensor.

    Returns:
        The tensor (``out`` when given).
    """
    return fill_from_stream(_into(out, torch.Size(shape)), NORMAL, seed, name, std)


def score_values(seed: int, name: str, shape: torch.Size, fan_in: float) -> torch.Tensor:
    """Initial scores: uniform(-1/sqrt(fan_in), 1/sqrt(fan_in)), the reference code's
    ``kaiming_uniform_(a=sqrt(5))``, drawn from their own ``scores/`` stream.

    Args:
        seed: the adapter's seed.
        name: the masked tensor's name.
        shape: its shape.
        fan_in: its layer's fan-in.

    Returns:
        A float32 tensor of ``shape``.
    """
    out = _into(None, torch.Size(shape))
    return fill_from_stream(out, SYMMETRIC_UNIFORM, seed, f"scores/{name}", 1.0 / math.sqrt(fan_in))


def fingerprint(named_tensors: Iterable[tuple[str, torch.Tensor]]) -> str:
    """The identity of a base.

    Args:
        named_tensors: ``(name, tensor)`` pairs, in any order.

    Returns:
        sha256 (hex) over names, dtypes, shapes and bytes, in sorted name order.
    """
    digest = hashlib.sha256(STREAM_VERSION.encode())
    for name, tensor in sorted(named_tensors, key=lambda item: item[0]):
        _hash_tensor(digest, name, tensor)
    return digest.hexdigest()


def _hash_tensor(digest: Any, name: str, tensor: torch.Tensor) -> None:
    flat = tensor.detach().to("cpu").contiguous().reshape(-1)
    header = f"\0{name}\0{str(flat.dtype).removeprefix('torch.')}\0{tuple(tensor.shape)}\0"
    digest.update(header.encode())
    digest.update(flat.view(torch.uint8).numpy())


class FingerprintAsSet:
    """`fingerprint` of a base hashed while the base is being set, so that the hash (a
    sequential pass over every byte) does not wait for the last tensor: tensors are announced
    in any order as they become final (`add`), and `result` (on a thread of its own) hashes
    them in sorted name order as soon as the next one is there.

    `finish` hands over the base as it finally is: the result is its fingerprint, or None
    when the tensors announced were not exactly those (the caller then fingerprints it
    whole), so a wrong announcement costs time, never a wrong fingerprint.
    """

    def __init__(self, names: Iterable[str]) -> None:
        """Expect these tensor names.

        Args:
            names: the names the base is expected to have.
        """
        self._names = sorted(set(names))
        self._ready: dict[str, torch.Tensor] = {}
        self._final: dict[str, torch.Tensor] | None = None
        self._condition = threading.Condition()

    def add(self, name: str, tensor: torch.Tensor) -> None:
        """Announce ``tensor`` as final.

        Args:
            name: its name in the base.
            tensor: the tensor (not copied: it must not change any more).
        """
        with self._condition:
            self._ready[name] = tensor
            self._condition.notify()

    def finish(self, base: dict[str, torch.Tensor]) -> None:
        """Hand over the base as it is now: every tensor is final.

        Args:
            base: ``{name: tensor}``, what `fingerprint` would be given.
        """
        with self._condition:
            self._final = base
            self._condition.notify()

    def result(self) -> str | None:
        """Hash the base as its tensors arrive (blocks until `finish`).

        Returns:
            `fingerprint` of the finished base, or None where it is not what was announced.
        """
        digest = hashlib.sha256(STREAM_VERSION.encode())
        hashed: dict[str, torch.Tensor] = {}
        for name in self._names:
            with self._condition:
                self._condition.wait_for(
                    lambda name=name: name in self._ready or self._final is not None
                )
                tensor = self._ready.get(name)
            if tensor is None:  # finished without it
                return None
            _hash_tensor(digest, name, tensor)
            hashed[name] = tensor
        with self._condition:
            self._condition.wait_for(lambda: self._final is not None)
        final = self._final
        if final.keys() != hashed.keys() or any(
            not _same_tensor(tensor, hashed[name]) for name, tensor in final.items()
        ):
            return None
        return digest.hexdigest()


def _same_tensor(a: torch.Tensor, b: torch.Tensor) -> bool:
    """The same values by construction: one storage, offset, shape, strides and dtype."""
    if is_traceable_wrapper_subclass(a) or is_traceable_wrapper_subclass(b):  # (sign bits)
        return False
    return (
        a.dtype == b.dtype
        and a.shape == b.shape
        and a.stride() == b.stride()
        and a.untyped_storage().data_ptr() == b.untyped_storage().data_ptr()
        and a.storage_offset() == b.storage_offset()
    )
