"""Fused CPU kernels for the training step, compiled on first use.

In eager PyTorch, selecting the mask and applying it costs a chain of elementwise passes over
every weight (``abs``, band comparisons, the mask, ``W * M``; in the backward ``sign(S)`` and two
products), each reading and writing whole tensors and allocating new ones.
``csrc/masked_weight.cpp`` does the forward in one vectorized pass over the scores and weights
(given the layer's predicted threshold) and the backward in one, in the incoming gradient's
buffer when the caller allows it; they are registered as the torch operators
``torch.ops.popup_adapter.*``.

The extension is built with ``torch.utils.cpp_extension`` the first time a CPU training step
needs it (a C++ compiler is required; the build is cached under ``TORCH_EXTENSIONS_DIR``).
When it cannot be built, a warning says why and the eager path (same masks, slower) is used.
``POPUP_ADAPTER_KERNELS=0`` turns the kernels off.
"""

from __future__ import annotations

import logging
import os
import warnings
from functools import cache
from pathlib import Path

SOURCE = Path(__file__).parent / "csrc" / "masked_weight.cpp"

#: what the forward kernel reports besides the masked weight
FOUND, ABOVE_BAND, BELOW_BAND = 0, 1, 2


def kernels_enabled() -> bool:
    """Whether the fused kernels may be used (``POPUP_ADAPTER_KERNELS`` is not ``0``)."""
    return os.environ.get("POPUP_ADAPTER_KERNELS", "1") != "0"


@cache
def load_kernels() -> bool:
    """Build (once per source version, cached on disk) and load the CPU kernels; False, with a
    warning naming the cause, when that is not possible here."""
    import torch

    # importing cpp_extension on a machine without CUDA logs a warning about CUDA_HOME that
    # does not concern a CPU build
    extension_logger = logging.getLogger("torch.utils.cpp_extension")
    level = extension_logger.level
    extension_logger.setLevel(logging.ERROR)
    try:
        from torch.utils import cpp_extension
    finally:
        extension_logger.setLevel(level)

    try:
        cpp_extension.load(
            name="popup_adapter_kernels",
            sources=[str(SOURCE)],
            # OpenMP: ATen's parallel_for is inline and runs serially without it
            extra_cflags=["-O3", "-fopenmp"],
            extra_ldflags=["-fopenmp"],
            is_python_module=False,
            verbose=False,
        )
    except Exception as error:  # no compiler, no ninja, read-only cache, ...
        last_line = (str(error).strip().splitlines() or [""])[-1]
        warnings.warn(
            f"popup_adapter's fused CPU kernels could not be built ({type(error).__name__}: "
            f"{last_line}); training "
            "uses the eager path (same masks, slower). Install a C++ compiler and ninja, or set "
            "POPUP_ADAPTER_KERNELS=0 to silence this.",
            RuntimeWarning,
            stacklevel=3,
        )
        return False
    return hasattr(torch.ops.popup_adapter, "masked_weight_forward")
