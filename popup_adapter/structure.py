"""What identifies a base's architecture: its structure, a second fingerprint beside the weights'.

The structure (`describe_structure`) describes what computes with the base's values: the
module tree, each module's class and the settings that change its outputs in eval mode,
parameter shapes and tying. Two networks can hold the same parameters and compute different
functions (timm's ``act_layer="gelu"``, ``output_stride=16``); the structure tells them apart,
and `first_difference` says where they first differ.
"""

from __future__ import annotations

import hashlib
import json
import numbers
import sys
from enum import Enum

import torch
from torch import nn

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
    module reachable under several names.

    Args:
        model: the plain model (on any device, the meta device included).

    Returns:
        The description, JSON-serialisable.
    """
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
    """sha256 of a structure description (names, order and descriptions).

    Args:
        structure: as `describe_structure` returns it.

    Returns:
        64 hex digits.
    """
    return hashlib.sha256(json.dumps(list(structure.items())).encode()).hexdigest()


def first_difference(here: dict[str, dict], there: dict[str, dict]) -> str | None:
    """Where two structures first differ, in words: the module, its class, and each entry that
    differs with both values; None when they are the same.

    Args:
        here: the structure of the base built here.
        there: the structure the artifact records.

    Returns:
        A description of the first difference, or None.
    """
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
    """The versions of the libraries that shape a base, of those loaded (for messages).

    Returns:
        ``{"torch": version, "timm": ..., "transformers": ...}`` of those imported.
    """
    versions = {"torch": torch.__version__}
    for name in ("timm", "transformers"):
        if name in sys.modules:
            versions[name] = sys.modules[name].__version__
    return versions
