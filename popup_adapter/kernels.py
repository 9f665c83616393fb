"""Fused CPU kernels for the training step, compiled once per source and torch version.

In eager PyTorch, selecting the mask and applying it costs a chain of elementwise passes over
every weight (``abs``, band comparisons, the mask, ``W * M``; in the backward ``sign(S)`` and two
products), each reading and writing whole tensors and allocating new ones.
``csrc/masked_weight.cpp`` does the forward in one vectorized pass over the scores and weights
(given the layer's predicted threshold) and the backward in one, in the incoming gradient's
buffer when the caller allows it; they are registered as the torch operators
``torch.ops.popup_adapter.*``. ``csrc/philox.cpp`` draws the seeded base (the same bits as
`popup_adapter.seeding`'s numpy reference) in one multi-threaded pass, and ``csrc/rans.cpp``
decodes masks (the same bits as `popup_adapter.codec`'s reference, constriction).

The setting is read once, timm-style: ``POPUP_ADAPTER_KERNELS=0`` in the environment at import,
or `set_use_kernels`; a masked layer captures `use_kernels` when it is built. The
extension is compiled by ``python -m popup_adapter build-kernels`` or, with a message, when the
first model that uses the kernels is adapted (a C++ compiler is required), never inside a
training step; later processes load the built library. When it cannot be built, a warning says
why and the eager path (same masks, slower) is used.
"""

from __future__ import annotations

import hashlib
import logging
import os
import warnings
from functools import cache
from pathlib import Path

import torch

SOURCES = tuple(
    Path(__file__).parent / "csrc" / name
    for name in ("masked_weight.cpp", "philox.cpp", "rans.cpp")
)
_NAME = "popup_adapter_kernels"
_logger = logging.getLogger(__name__)

#: what the forward kernel reports besides the masked weight
FOUND, ABOVE_BAND, BELOW_BAND = 0, 1, 2

_USE_KERNELS = os.environ.get("POPUP_ADAPTER_KERNELS", "1") != "0"


def use_kernels() -> bool:
    """The fused-kernels setting that layers built from now on capture.

    Returns:
        Whether they use the fused CPU kernels (where they apply).
    """
    return _USE_KERNELS


def set_use_kernels(enable: bool) -> None:
    """Turn the fused kernels on or off for the layers built from now on.

    Args:
        enable: the setting; layers built before keep theirs (their ``use_kernels``). The
            default comes from ``POPUP_ADAPTER_KERNELS`` at import.
    """
    global _USE_KERNELS
    _USE_KERNELS = bool(enable)


def build_directory() -> Path:
    """Where the compiled library lives.

    Returns:
        One folder per version of the sources and of torch, under ``TORCH_EXTENSIONS_DIR`` (default
        ``~/.cache/torch_extensions``, as torch's own).
    """
    root = os.environ.get("TORCH_EXTENSIONS_DIR") or Path(
        os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache", "torch_extensions"
    )
    digest = hashlib.sha256(torch.__version__.encode())
    for source in SOURCES:
        digest.update(source.read_bytes())
    tag = digest.hexdigest()[:16]
    return Path(root, f"{_NAME}_{tag}")


@cache
def load_kernels() -> bool:
    """Load the CPU kernels, compiling them first if this source and torch version never were.

    Returns:
        Whether they are loaded; False, with a warning naming the cause, when they cannot be
        built here (the eager path then serves).
    """
    library = build_directory() / f"{_NAME}.so"
    try:
        if library.is_file():
            torch.ops.load_library(str(library))
        else:
            _build(library.parent)  # cpp_extension.load also loads what it built
    except Exception as error:  # no compiler, no ninja, read-only cache, ...
        last_line = (str(error).strip().splitlines() or [""])[-1]
        warnings.warn(
            f"popup_adapter's fused CPU kernels could not be built ({type(error).__name__}: "
            f"{last_line}); training uses the eager path (same masks, slower). Install a C++ "
            "compiler and ninja, or set POPUP_ADAPTER_KERNELS=0 to silence this.",
            RuntimeWarning,
            stacklevel=3,
        )
        return False
    ops = ("masked_weight_forward_signs", "philox_fill_", "rans_decode_bernoulli_")
    return all(hasattr(torch.ops.popup_adapter, op) for op in ops)


def empty_cache() -> None:
    """Return the kernels' cached ``W * M`` block to malloc, as `torch.cuda.empty_cache` does.

    The forward kernels keep the last freed masked weight (at most the largest layer's, 256 MiB)
    for the next layer to write into, so that training's peak memory does not grow with the holes
    freed blocks leave in glibc's heap. Call this when a training loop is done and that block is
    better spent elsewhere; nothing happens when the kernels are not loaded.
    """
    if hasattr(torch.ops.popup_adapter, "empty_cache"):
        torch.ops.popup_adapter.empty_cache()


def _build(folder: Path) -> None:
    from torch.utils import cpp_extension  # only to compile: importing it logs about CUDA

    _logger.warning("popup_adapter: compiling the fused CPU kernels into %s (once)", folder)
    folder.mkdir(parents=True, exist_ok=True)
    cpp_extension.load(
        name=_NAME,
        sources=[str(source) for source in SOURCES],
        # OpenMP: ATen's parallel_for is inline and runs serially without it; no fused
        # multiply-add, so that the seeded draws round as numpy's separate operations do
        extra_cflags=["-O3", "-fopenmp", "-ffp-contract=off"],
        extra_ldflags=["-fopenmp"],
        build_directory=str(folder),
        is_python_module=False,
        verbose=False,
    )
