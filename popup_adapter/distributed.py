"""Is this multi-process run sound? The checks that turn silent distributed failures into errors.

On CPU machines two launches look right and are not (one process, or two unsynchronised
ones); FSDP can shard a masked layer apart from its scores; and a run whose processes drift
apart ends with different masks. Each has a check here, and `full_parameters` gathers
what saving must read whole.
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Callable, Iterator
from contextlib import contextmanager

from accelerate import Accelerator
from accelerate.utils import DistributedType, gather_object
from torch import nn

from .layers import PopupLayer


def check_launch(accelerator: Accelerator) -> None:
    """Refuse the two silent ways a multi-process launch goes wrong on CPU machines.

    Args:
        accelerator: the run's ``Accelerator``.

    Raises:
        RuntimeError: the launched processes do not form Accelerate's group (``--multi_gpu`` on
            CPU without ``ACCELERATE_USE_CPU=1``), or FSDP was asked for where Accelerate cannot
            give it.
    """
    launched = int(os.environ.get("WORLD_SIZE", "1"))
    if launched != accelerator.num_processes:
        raise RuntimeError(
            f"{launched} processes were launched but Accelerate runs {accelerator.num_processes} "
            "in its group: they would train unsynchronised. On CPU launch with "
            "ACCELERATE_USE_CPU=1 accelerate launch --multi_gpu --num_processes N"
        )
    fsdp_asked = os.environ.get("ACCELERATE_USE_FSDP", "false").lower() == "true"
    if fsdp_asked and accelerator.distributed_type != DistributedType.FSDP:
        raise RuntimeError(
            f"FSDP was asked for but Accelerate chose {accelerator.distributed_type}: its FSDP "
            "plugin only applies on accelerators (GPU, XPU, ...), never with ACCELERATE_USE_CPU"
        )


def check_fsdp_plugin(accelerator: Accelerator) -> None:
    """FSDP1 flattens each unit's parameters into one tensor, which must share requires_grad;
    frozen base weights beside trained scores need ``use_orig_params`` (FSDP2 always has it).

    Args:
        accelerator: the run's ``Accelerator``.

    Raises:
        RuntimeError: FSDP1 without ``use_orig_params``.
    """
    if accelerator.distributed_type != DistributedType.FSDP:
        return
    plugin = accelerator.state.fsdp_plugin
    if plugin.fsdp_version == 1 and not plugin.use_orig_params:
        raise RuntimeError(
            "FSDP1 without use_orig_params cannot shard frozen base weights beside trained "
            "scores: set fsdp_version: 2 (recommended) or fsdp_use_orig_params: true in the "
            "accelerate config"
        )


def check_fsdp_units(model: nn.Module) -> None:
    """Refuse a sharding that splits a masked layer from its base layer.

    A [`PopupLayer`][popup_adapter.PopupLayer] reads its base layer's weight to compute
    ``W * M`` before the base layer runs (or without calling it, for the plain layers it
    computes itself), so FSDP's hooks on a base layer wrapped as its own unit would gather that
    weight too late, or never. Whole masked layers, or blocks of them, must be the units.

    Args:
        model: the model as FSDP wrapped it.

    Raises:
        RuntimeError: a base layer is a unit of its own.
    """
    try:
        from torch.distributed.fsdp import FSDPModule, FullyShardedDataParallel
    except ImportError:
        return
    for name, module in model.named_modules():
        if isinstance(module, PopupLayer) and isinstance(
            module.base_layer, (FSDPModule, FullyShardedDataParallel)
        ):
            raise RuntimeError(
                f"FSDP wrapped {name}.base_layer as a unit of its own, apart from its scores: "
                "wrap whole masked layers or the model's blocks instead, e.g. "
                "fsdp_auto_wrap_policy: TRANSFORMER_BASED_WRAP with the model's block class "
                "(BertLayer, Bottleneck, ...) or PopupLinear/PopupConv in "
                "fsdp_transformer_layer_cls_to_wrap, not SIZE_BASED_WRAP"
            )


@contextmanager
def full_parameters(model: nn.Module) -> Iterator[None]:
    """Every parameter whole on every process for the duration under FSDP1, whose flat
    parameters no layer can read; nothing to do otherwise.

    A sharded layer's mask is chosen over its whole score tensor, and saving reads every mask:
    all processes must take part in gathering the shards, so they all enter this context and
    then the main process alone saves. FSDP2 needs nothing here: its parameters are DTensors,
    which `whole_tensor` gathers where they are read.

    Args:
        model: the prepared model.

    Returns:
        A context manager.
    """
    try:
        from torch.distributed.fsdp import FullyShardedDataParallel
    except ImportError:  # torch without distributed support
        yield
        return
    if isinstance(model, FullyShardedDataParallel):
        with FullyShardedDataParallel.summon_full_params(model, writeback=False):
            yield
    else:
        yield


def mask_digest(model: nn.Module) -> str:
    """sha256 of a PopupModel's active masks: equal on every process of a healthy DDP run.

    Args:
        model: a [`PopupModel`][popup_adapter.PopupModel].

    Returns:
        64 hex digits.
    """
    digest = hashlib.sha256()
    for name, mask in sorted(model.get_masks().items()):
        digest.update(name.encode())
        digest.update(mask.to("cpu").numpy().tobytes())
    return digest.hexdigest()


def check_masks_agree(
    accelerator: Accelerator, model: nn.Module, log: Callable[[str], None]
) -> None:
    """Refuse to save when the processes' masks differ (they did not train in sync).

    Args:
        accelerator: the run's ``Accelerator``.
        model: the unwrapped [`PopupModel`][popup_adapter.PopupModel].
        log: receives the main process's message.

    Raises:
        RuntimeError: the processes' masks differ.
    """
    digests = gather_object([mask_digest(model)])
    if len(set(digests)) != 1:
        raise RuntimeError(
            f"the {len(digests)} processes ended with different masks "
            f"({digests}): the processes did not train in sync"
        )
    log(f"masks identical on all {len(digests)} processes: {digests[0][:16]}")
