"""The frozen base: which tensor gets which value, and the rules that classify its modules.

- `seed_base` sets every parameter from ``(seed, its name)``: layer weights by the init with
  their fan-in (`masked_fan_in`), norms to identity, biases to zero, the rest small
  normals; with ``init="keep"`` it leaves a pretrained base alone. The *weight* fingerprint
  (``PopupModel.base_fingerprint``) hashes those values.
- What can be masked (`unmaskable_reason`) and what a module is (a norm, a weight layer,
  an expert bank), for the targets and the init alike.

What computes with the values, the other half of a base's identity, is
`popup_adapter.structure`'s.
"""

from __future__ import annotations

import math
import re
import sys
from collections import defaultdict
from collections.abc import Callable, Iterable

import torch
from torch import nn
from torch.nn.utils import parametrize

from .config import PopupConfig
from .seeding import fills_in_place, init_values, normal_values

_NORM_CLASS_NAME = re.compile(r"(Batch|Layer|Group|Instance|RMS)Norm")
_NORM_TYPES = (
    nn.modules.batchnorm._NormBase,
    nn.LayerNorm,
    nn.GroupNorm,
    nn.RMSNorm,
    nn.LocalResponseNorm,
)
_DEFAULT_EMBEDDING_STD = 0.02
#: set by `popup_adapter.init_skip` on an embedding weight whose init it skipped: the tensor
#: holds no values yet, so `seed_base` draws it without asking whether its constructor made it
#: a constant
UNSET_ATTRIBUTE = "_popup_unset"


def is_norm_module(module: nn.Module) -> bool:
    """Normalisation layers: torch's, and any class named like one (timm, transformers).

    Args:
        module: any module.

    Returns:
        Whether it normalises (BatchNorm, LayerNorm, GroupNorm, RMSNorm...).
    """
    return isinstance(module, _NORM_TYPES) or bool(_NORM_CLASS_NAME.search(type(module).__name__))


def transformers_conv1d() -> type | None:
    """transformers' ``Conv1D`` if transformers is loaded; never imports it ourselves.

    Returns:
        The class, or None when transformers is not imported.
    """
    module = sys.modules.get("transformers.pytorch_utils")
    return getattr(module, "Conv1D", None)


def unmaskable_reason(module: nn.Module, parameter_name: str) -> str | None:
    """Why ``parameter_name`` of ``module`` cannot be masked, or None when it can.

    Args:
        module: the module that owns the parameter.
        parameter_name: the parameter's name in it.

    Returns:
        The reason in words (e.g. the weight is computed by a parametrization), or None.
    """
    if is_norm_module(module):
        return "normalisation layers are not masked (identity, or trained with train_norms)"
    if parametrize.is_parametrized(module, parameter_name):
        return (
            f"its {parameter_name} is computed by a parametrization (e.g. weight normalisation) "
            "from other tensors, which masking cannot stand in for"
        )
    if not isinstance(module._parameters.get(parameter_name), nn.Parameter):
        return (
            f"its {parameter_name} is not a parameter of its own (a hook recomputes it, as "
            "torch.nn.utils.weight_norm does)"
        )
    return None


def is_weight_layer(module: nn.Module) -> bool:
    """A Linear, Conv1d/2d/3d or transformers ``Conv1D`` (subclasses included): the layers whose
    ``weight`` the init draws with the layer's fan-in even where it is not masked.

    Args:
        module: any module.

    Returns:
        Whether it is one of those layers.
    """
    conv1d = transformers_conv1d()
    return isinstance(module, (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d)) or (
        conv1d is not None and isinstance(module, conv1d)
    )


def is_expert_bank(module: nn.Module, tensor: torch.Tensor) -> bool:
    """A fused mixture-of-experts parameter: one matrix per expert stacked along dim 0
    (transformers' ``*Experts`` modules, ``num_experts`` of them).

    Args:
        module: the module that owns ``tensor``.
        tensor: one of its parameters.

    Returns:
        Whether ``tensor`` holds one matrix per expert.
    """
    experts = getattr(module, "num_experts", None)
    return isinstance(experts, int) and tensor.ndim >= 3 and tensor.shape[0] == experts


def masked_fan_in(module: nn.Module, tensor: torch.Tensor) -> int:
    """Inputs feeding one output unit, as Kaiming's init counts them: torch's convention
    ``prod(shape[1:])``; per expert for an expert bank (whose matrices are stored ``(out, in)``,
    or ``(in, out)`` where the module says ``is_transposed``); the first dimension for
    transformers' ``Conv1D``, which stores ``(in, out)``.

    Args:
        module: the module that owns ``tensor``.
        tensor: its weight.

    Returns:
        The fan-in.
    """
    shape = tuple(tensor.shape)
    conv1d = transformers_conv1d()
    if conv1d is not None and isinstance(module, conv1d):
        return shape[0]
    if is_expert_bank(module, tensor):
        shape = shape[1:]
        if getattr(module, "is_transposed", False):
            return shape[0]
    return math.prod(shape[1:])


def is_inside(name: str, roots: Iterable[str]) -> bool:
    """Whether ``name`` is one of the module names ``roots`` or inside one of them.

    Args:
        name: a dotted module name.
        roots: module names.

    Returns:
        True when ``name`` equals a root or starts with ``root + "."``.
    """
    return any(name == root or name.startswith(root + ".") for root in roots)


def seed_base(
    model: nn.Module,
    config: PopupConfig,
    masked: Iterable[str],
    reference: Callable[[], nn.Module] | None = None,
    on_set: Callable[[str, torch.Tensor], None] | None = None,
) -> None:
    """Set every parameter of ``model`` from ``(config.seed, its name)`` and freeze the base.

    Rules, per tensor (a tied tensor is set once, under the first of its names in sorted
    order): a masked tensor, and the weight of a Linear/Conv/Conv1D layer, is drawn by
    ``config.init`` with its fan-in (times k for a masked tensor with ``scale_fan``); norms
    become identity (weight 1, bias 0); other biases become 0; a tensor the architecture's
    constructor sets to a constant (layer-scale ``gamma``) gets that constant (see
    ``reference``); every other tensor (embeddings, position embeddings, class tokens) is drawn from
    N(0, s^2), s the model config's ``initializer_range`` or 0.02. BatchNorm running statistics
    are reset. With ``init="keep"`` only ``reseed_modules`` are drawn (their layer weights
    signed-constant).

    Args:
        model: the plain model, changed in place.
        config: its adapter's config (``init``, ``seed``, ``scale_fan``, ``k``,
            ``reseed_modules``).
        masked: the masked parameters' names (``"layer1.0.conv1.weight"``).
        reference: builds the same architecture afresh (from the stored spec). A vector
            outside layers, norms and biases that is not constant in ``model`` (a pretrained
            model's trained layer scales) takes the constant it has there, so that the base
            depends on the seed and the architecture, not on the weights passed in; built at
            most once, and only when needed. A constant scalar or vector keeps its value (a
            constructor argument such as ``ls_init_value``: the structure and fingerprint
            checks catch a rebuild without it).
        on_set: called with ``(name, parameter)`` under each of its names once it is set
            (a `popup_adapter.seeding.FingerprintAsSet` hashing beside the seeding).
    """
    masked = set(masked)
    fresh = _FreshValues(reference)
    std = getattr(getattr(model, "config", None), "initializer_range", _DEFAULT_EMBEDDING_STD)
    owners: dict[int, list[tuple[str, nn.Module, str]]] = defaultdict(list)
    params: dict[int, nn.Parameter] = {}
    for module_name, module in model.named_modules():
        for leaf, param in module.named_parameters(recurse=False):
            full = f"{module_name}.{leaf}" if module_name else leaf
            owners[id(param)].append((full, module, leaf))
            params[id(param)] = param
    with torch.no_grad():
        # in name order, so that a fingerprint hashing beside the seeding finds them in turn
        for pid, users in sorted(owners.items(), key=lambda item: min(u[0] for u in item[1])):
            _seed_parameter(params[pid], users, config, masked, fresh, std)
            if on_set is not None:
                for full, _, _ in users:
                    on_set(full, params[pid])
        if config.init != "keep":
            for module in model.modules():
                if isinstance(module, nn.modules.batchnorm._BatchNorm):
                    module.reset_running_stats()


def _seed_parameter(
    param: nn.Parameter,
    users: list[tuple[str, nn.Module, str]],
    config: PopupConfig,
    masked: set[str],
    fresh: _FreshValues,
    std: float,
) -> None:
    """`seed_base`'s rules for one parameter, ``users`` its ``(name, module, leaf)``s."""
    param.requires_grad_(False)
    unset = getattr(param, UNSET_ATTRIBUTE, False)
    if unset:
        delattr(param, UNSET_ATTRIBUTE)
    name, module, leaf = min(users, key=lambda user: user[0])
    if not is_drawn(config, name):
        return
    layer_users = [
        (full, mod) for full, mod, lf in users if _is_layer_weight(full, mod, lf, masked)
    ]
    out = param if fills_in_place(param) else None  # drawn straight into the parameter
    if layer_users:
        layer_name, layer_module = min(layer_users, key=lambda user: user[0])
        value = layer_weight(config, name, layer_module, param, layer_name in masked, out=out)
    elif is_norm_module(module):
        value = torch.ones(param.shape) if leaf == "weight" else torch.zeros(param.shape)
    elif leaf == "bias":
        value = torch.zeros(param.shape)
    elif unset:  # no constructor value to keep: drawn like any non-constant tensor
        value = normal_values(config.seed, name, param.shape, std, out=out)
    elif _is_constant(param):  # what its constructor set (e.g. from ls_init_value)
        return
    elif param.ndim <= 1 and (constant := fresh.constant(name, param)) is not None:
        value = constant  # a trained layer scale goes back to its init
    else:
        value = normal_values(config.seed, name, param.shape, std, out=out)
    if value is not param:
        param.copy_(value.to(param.dtype))


def _is_layer_weight(name: str, module: nn.Module, leaf: str, masked: set[str]) -> bool:
    """Whether `seed_base` draws the tensor ``name`` (``module.leaf``) as a layer weight."""
    return name in masked or (leaf == "weight" and is_weight_layer(module))


def seeds_without_reading(model: nn.Module, masked: Iterable[str]) -> bool:
    """Whether `seed_base` (a seeded init) sets every tensor of ``model`` by its rules alone,
    never reading what the constructor put there: every parameter a layer weight, a bias or a
    norm's, every buffer a BatchNorm statistic (reset). Then a model built on the meta device
    only needs its memory (``to_empty``), not a second run of its constructor.

    Args:
        model: the plain model (any device: only names and module types are read).
        masked: the masked parameters' names.

    Returns:
        True when no value of ``model`` reaches the seeded base.
    """
    masked = set(masked)
    for module_name, module in model.named_modules():
        batchnorm = isinstance(module, nn.modules.batchnorm._BatchNorm)
        if any(buffer is not None and not batchnorm for buffer in module._buffers.values()):
            return False
        for leaf, _ in module.named_parameters(recurse=False):
            full = f"{module_name}.{leaf}" if module_name else leaf
            by_rule = _is_layer_weight(full, module, leaf, masked) or is_norm_module(module)
            if not (by_rule or leaf == "bias"):
                return False
    return True


def is_drawn(config: PopupConfig, name: str) -> bool:
    """Whether `seed_base` draws the tensor ``name`` from the seed (else it is the weight
    passed in: a pretrained base's, under ``init="keep"``).

    Args:
        config: the backbone's config.
        name: the tensor's name in the plain model.

    Returns:
        True when the seed alone decides its value.
    """
    return config.init != "keep" or is_inside(name, config.reseed_modules or [])


def layer_weight(
    config: PopupConfig,
    name: str,
    module: nn.Module,
    weight: torch.Tensor,
    masked: bool,
    redraw: int = 0,
    out: torch.Tensor | None = None,
) -> torch.Tensor:
    """The value `seed_base` draws for a layer's weight: ``config.init`` with its fan-in
    (times k for a masked tensor with ``scale_fan``); reseeded modules of an ``init="keep"``
    base are signed-constant. Also what an in-place merge regenerates its weight from.

    Args:
        config: the backbone's config.
        name: the tensor's name in the plain model.
        module: the layer that owns it.
        weight: the tensor (for its shape and fan-in).
        masked: whether it is masked.
        redraw: the values after this many IteRand redraws: the tensor's ``redraw``-th
            redraw stream (0: the base's own draw).
        out: written in place when given (``weight`` itself, in `seed_base`).

    Returns:
        A float32 tensor shaped like ``weight`` (``out`` when given).
    """
    layer_init = "signed_constant" if config.init == "keep" else config.init
    fan_in = masked_fan_in(module, weight)
    if config.scale_fan and masked:
        fan_in *= config.k
    stream = f"redraw/{redraw}/{name}" if redraw else name
    return init_values(layer_init, config.seed, stream, weight.shape, fan_in, out=out)


def _is_constant(tensor: torch.Tensor) -> bool:
    return tensor.numel() == 1 or bool((tensor == tensor.flatten()[0]).all())


class _FreshValues:
    """The constants a freshly built architecture gives its scalars and vectors."""

    def __init__(self, reference: Callable[[], nn.Module] | None) -> None:
        self._reference = reference
        self._params: dict[str, torch.Tensor] | None = None

    def constant(self, name: str, param: torch.Tensor) -> torch.Tensor | None:
        """``param``'s value in the fresh architecture when that is a constant, else None."""
        if self._reference is None:
            return None
        if self._params is None:
            with torch.random.fork_rng(devices=[]):  # the build draws from the global RNG
                built = self._reference()
            self._params = dict(built.named_parameters(remove_duplicate=False))
        value = self._params.get(name)
        if value is None or value.shape != param.shape or not _is_constant(value):
            return None
        return value.detach().clone()
