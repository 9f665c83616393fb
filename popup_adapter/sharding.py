"""A sharded tensor, whole: what reading a mask or a fingerprint needs under FSDP2."""

from __future__ import annotations

import torch


def whole_tensor(tensor: torch.Tensor) -> torch.Tensor:
    """``tensor`` itself, or all of it when it is a shard (an FSDP2 DTensor). Gathering is a
    collective: under FSDP every process must make the same calls in the same order.

    Args:
        tensor: a tensor or a DTensor shard.

    Returns:
        The whole tensor.
    """
    return tensor.full_tensor() if hasattr(tensor, "full_tensor") else tensor
