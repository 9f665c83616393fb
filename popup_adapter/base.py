"""The frozen base: which tensor gets which value, and what identifies a base (two fingerprints).

- :func:`seed_base` sets every parameter from ``(seed, its name)``: layer weights by the init with
  their fan-in (:func:`masked_fan_in`), norms to identity, biases to zero, the rest small
  normals; with ``init="keep"`` it leaves a pretrained base alone.
- The *weight* fingerprint (``PopupModel.base_fingerprint``) hashes those values.
- The *structure* (:func:`describe_structure`) describes what computes with them: the module
  tree, each module's class and the settings that change its outputs in eval mode, parameter
  shapes and tying. Two networks can hold the same parameters and compute different functions
  (timm's ``act_layer="gelu"``, ``output_stride=16``); the structure tells them apart, and says
  where they first differ.
"""

from __future__ import annotations

import hashlib
import json
import math
import numbers
import re
import sys
from collections import defaultdict
from collections.abc import Callable, Iterable
from enum import Enum

import torch
from torch import nn
from torch.nn.utils import parametrize

from .config import PopupConfig
from .seeding import init_values, normal_values

_NORM_CLASS_NAME = re.compile(r"(Batch|Layer|Group|Instance|RMS)Norm")
_NORM_TYPES = (
    nn.modules.batchnorm._NormBase,
    nn.LayerNorm,
    nn.GroupNorm,
    nn.RMSNorm,
    nn.LocalResponseNorm,
)
_DEFAULT_EMBEDDING_STD = 0.02


def is_norm_module(module: nn.Module) -> bool:
    """Normalisation layers: torch's, and any class named like one (timm, transformers)."""
    return isinstance(module, _NORM_TYPES) or bool(_NORM_CLASS_NAME.search(type(module).__name__))


def transformers_conv1d() -> type | None:
    """transformers' ``Conv1D`` if transformers is loaded; never imports it ourselves."""
    module = sys.modules.get("transformers.pytorch_utils")
    return getattr(module, "Conv1D", None)


def unmaskable_reason(module: nn.Module, parameter_name: str) -> str | None:
    """Why ``parameter_name`` of ``module`` cannot be masked, or None when it can."""
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
    ``weight`` the init draws with the layer's fan-in even where it is not masked."""
    conv1d = transformers_conv1d()
    return isinstance(module, (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d)) or (
        conv1d is not None and isinstance(module, conv1d)
    )


def is_expert_bank(module: nn.Module, tensor: torch.Tensor) -> bool:
    """A fused mixture-of-experts parameter: one matrix per expert stacked along dim 0
    (transformers' ``*Experts`` modules, ``num_experts`` of them)."""
    experts = getattr(module, "num_experts", None)
    return isinstance(experts, int) and tensor.ndim >= 3 and tensor.shape[0] == experts


def masked_fan_in(module: nn.Module, tensor: torch.Tensor) -> int:
    """Inputs feeding one output unit, as Kaiming's init counts them: torch's convention
    ``prod(shape[1:])``; per expert for an expert bank (whose matrices are stored ``(out, in)``,
    or ``(in, out)`` where the module says ``is_transposed``); the first dimension for
    transformers' ``Conv1D``, which stores ``(in, out)``."""
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
    """Whether ``name`` is one of the module names ``roots`` or inside one of them."""
    return any(name == root or name.startswith(root + ".") for root in roots)


def seed_base(
    model: nn.Module,
    config: PopupConfig,
    masked: Iterable[str],
    reference: Callable[[], nn.Module] | None = None,
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
    """
    masked = set(masked)
    fresh = _FreshValues(reference)
    std = getattr(getattr(model, "config", None), "initializer_range", _DEFAULT_EMBEDDING_STD)
    layer_init = "signed_constant" if config.init == "keep" else config.init
    owners: dict[int, list[tuple[str, nn.Module, str]]] = defaultdict(list)
    params: dict[int, nn.Parameter] = {}
    for module_name, module in model.named_modules():
        for leaf, param in module.named_parameters(recurse=False):
            full = f"{module_name}.{leaf}" if module_name else leaf
            owners[id(param)].append((full, module, leaf))
            params[id(param)] = param
    reseeded = config.reseed_modules or []
    with torch.no_grad():
        for pid, users in owners.items():
            param = params[pid]
            param.requires_grad_(False)
            name, module, leaf = min(users, key=lambda user: user[0])
            if config.init == "keep" and not is_inside(name, reseeded):
                continue
            layer_users = [
                (full, mod)
                for full, mod, lf in users
                if full in masked or (lf == "weight" and is_weight_layer(mod))
            ]
            if layer_users:
                layer_name, layer_module = min(layer_users, key=lambda user: user[0])
                fan_in = masked_fan_in(layer_module, param)
                if config.scale_fan and layer_name in masked:
                    fan_in *= config.k
                value = init_values(layer_init, config.seed, name, param.shape, fan_in)
            elif is_norm_module(module):
                value = torch.ones(param.shape) if leaf == "weight" else torch.zeros(param.shape)
            elif leaf == "bias":
                value = torch.zeros(param.shape)
            elif _is_constant(param):  # what its constructor set (e.g. from ls_init_value)
                continue
            elif param.ndim <= 1 and (constant := fresh.constant(name, param)) is not None:
                value = constant  # a trained layer scale goes back to its init
            else:
                value = normal_values(config.seed, name, param.shape, std)
            param.copy_(value.to(param.dtype))
        if config.init != "keep":
            for module in model.modules():
                if isinstance(module, nn.modules.batchnorm._BatchNorm):
                    module.reset_running_stats()


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


# -- the structure of a base

#: module attributes that do not change what a module computes in eval mode (the structure
#: leaves them out, so that e.g. turning on gradient checkpointing does not make a base
#: "another one"); besides these, private names, dropout rates (``*drop*``), caches
#: (``*cache*``, and any tensor held as a plain attribute) are left out
_NOT_STRUCTURE = frozenset(
    {
        "training",
        "inplace",
        "momentum",
        "grad_checkpointing",
        "gradient_checkpointing",
        "fused_attn",
        "pretrained_cfg",
        "default_cfg",
        "pretrained_cfg_overlay",
        "config",
        "name_or_path",
    }
)


def _tensor_text(tensor: torch.Tensor) -> str:
    return f"{list(tensor.shape)}:{str(tensor.dtype).removeprefix('torch.')}"


def _value_text(value) -> str | None:
    """A setting's value as text, or None for what is not a setting (objects, modules)."""
    if value is None or isinstance(value, (bool, str)):
        return repr(value)
    if isinstance(value, Enum):
        return f"{type(value).__name__}.{value.name}"
    if isinstance(value, numbers.Number):
        return repr(value)
    if isinstance(value, torch.dtype):
        return str(value)
    if isinstance(value, torch.Tensor):  # a cache or a copy of a buffer, not a setting
        return None
    if isinstance(value, (list, tuple)):
        items = [_value_text(item) for item in value]
        return None if None in items else "(" + ", ".join(items) + ")"
    if isinstance(value, dict) and all(isinstance(key, str) for key in value):
        items = {key: _value_text(item) for key, item in sorted(value.items())}
        if None in items.values():
            return None
        return "{" + ", ".join(f"{key}: {text}" for key, text in items.items()) + "}"
    if callable(value) and hasattr(value, "__qualname__"):  # an activation function, a class
        return value.__qualname__
    return None


def _module_entry(module: nn.Module, tensor_names: dict[int, str], name: str) -> dict:
    settings = {}
    for key, value in sorted(vars(module).items()):
        if key.startswith("_") or key in _NOT_STRUCTURE or "drop" in key or "cache" in key:
            continue
        if isinstance(value, (nn.Module, nn.Parameter)):
            continue
        text = _value_text(value)
        if text is not None:
            settings[key] = text
    tensors = {}
    for key, param in module._parameters.items():
        if param is not None:
            full = f"{name}.{key}" if name else key
            tied = tensor_names.setdefault(id(param), full)
            tensors[key] = _tensor_text(param) + ("" if tied == full else f" tied to {tied}")
    for key, buffer in module._buffers.items():
        if buffer is None:
            continue
        if key in module._non_persistent_buffers_set:
            # computed from settings (rotary frequencies, position ids), or a cache that a
            # forward fills in with the input's shape: its name and dtype only
            tensors[key] = f"computed:{str(buffer.dtype).removeprefix('torch.')}"
        else:  # values are weights (fingerprinted) or trained (stored)
            tensors[key] = _tensor_text(buffer)
    return {"class": type(module).__qualname__, "settings": settings, "tensors": tensors}


#: configuration keys that change no output: outputs requested, caching, initialisation (the
#: weights are fingerprinted) and auxiliary losses
_NOT_CONFIG_STRUCTURE = frozenset(
    {"use_cache", "initializer_range", "output_router_logits", "router_aux_loss_coef"}
)


def _config_settings(config) -> dict:
    """A transformers config's model-specific keys (those its base class does not have), the
    ones that shape the network, recursively for sub-configs."""
    base_class = next(c for c in reversed(type(config).__mro__) if hasattr(c, "to_dict"))
    generic = set(base_class().to_dict())

    def keep(data: dict) -> dict:
        return {
            key: keep(value) if isinstance(value, dict) else value
            for key, value in sorted(data.items())
            if key not in generic
            and key not in _NOT_CONFIG_STRUCTURE
            and not key.startswith("_")
            and "drop" not in key
        }

    return keep(config.to_dict())


def describe_structure(model: nn.Module) -> dict[str, dict]:
    """``{module name: {class, settings, tensors}}`` of a plain model, in module order (the
    root is ``""``): each module's class, its settings (what changes its eval-mode outputs; for
    a transformers model also its config's model-specific keys), its parameters' and buffers'
    shapes and dtypes (and what a tied parameter is tied to); ``{"alias of": name}`` for a
    module reachable under several names."""
    descriptions: dict[str, dict] = {}
    module_names: dict[int, str] = {}
    tensor_names: dict[int, str] = {}

    def visit(name: str, module: nn.Module) -> None:
        if id(module) in module_names:
            descriptions[name] = {"alias of": module_names[id(module)]}
            return
        module_names[id(module)] = name
        descriptions[name] = _module_entry(module, tensor_names, name)
        for child_name, child in module._modules.items():
            if child is not None:
                visit(f"{name}.{child_name}" if name else child_name, child)

    visit("", model)
    config = getattr(model, "config", None)
    if hasattr(config, "to_dict") and hasattr(config, "model_type"):  # transformers: its config
        settings = _config_settings(config)
        descriptions[""]["settings"]["config"] = _value_text(settings) or repr(settings)
    return descriptions


def structure_fingerprint(structure: dict[str, str]) -> str:
    """sha256 of a structure description (names, order and descriptions)."""
    return hashlib.sha256(json.dumps(list(structure.items())).encode()).hexdigest()


def first_difference(here: dict[str, dict], there: dict[str, dict]) -> str | None:
    """Where two structures first differ, in words: the module, its class, and each entry that
    differs with both values; None when they are the same."""
    for name in list(here) + [name for name in there if name not in here]:
        a, b = here.get(name), there.get(name)
        if a == b:
            continue
        where = f"module {name or '<root>'!r}"
        if a is None or b is None:
            return f"{where} exists {'only in the artifact' if a is None else 'only here'}"
        if a.get("class") != b.get("class") or "alias of" in a or "alias of" in b:
            return f"{where}: here {_brief(a)}, in the artifact {_brief(b)}"
        lines = [f"{where} ({a['class']}):"]
        for part in ("settings", "tensors"):
            for key in list(a[part]) + [key for key in b[part] if key not in a[part]]:
                mine, theirs = a[part].get(key, "(none)"), b[part].get(key, "(none)")
                if mine != theirs:
                    mine, theirs = _from_first_difference(mine, theirs)
                    lines.append(f"  {key}: here {mine}, in the artifact {theirs}")
        return "\n".join(lines)
    return None


def _brief(entry: dict) -> str:
    return f"alias of {entry['alias of']!r}" if "alias of" in entry else entry["class"]


def _from_first_difference(a: str, b: str, context: int = 60) -> tuple[str, str]:
    """Two long values cut to where they start to differ (with some context before)."""
    start = next(
        (i for i, (x, y) in enumerate(zip(a, b, strict=False)) if x != y), min(len(a), len(b))
    )
    start = max(0, start - context)

    def cut(text: str) -> str:
        text = ("..." if start else "") + text[start:]
        return text if len(text) <= 3 * context else text[: 3 * context - 3] + "..."

    return cut(a), cut(b)


def library_versions() -> dict[str, str]:
    """The versions of the libraries that shape a base, of those loaded (for messages)."""
    versions = {"torch": torch.__version__}
    for name in ("timm", "transformers"):
        if name in sys.modules:
            versions[name] = sys.modules[name].__version__
    return versions
