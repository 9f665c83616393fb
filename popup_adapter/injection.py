"""How wrappers go into a module tree and come back out.

A masked module is replaced by its [`PopupLayer`][popup_adapter.PopupLayer] (a module with
several masked parameters by nested ones), a saved module by its
`ModulesToSaveWrapper`, under every name the module is reachable
by, so that a shared module stays one module. Merging and unloading put a replacement wherever
a wrapper is; matching a further adapter's targets runs on a view of the plain tree.
"""

from __future__ import annotations

import copy
import re
from collections import defaultdict
from collections.abc import Callable

from torch import nn

from .adapters import ModulesToSaveWrapper
from .layer_kinds import create_popup_layer
from .layers import PopupLayer
from .targets import MaskTarget, module_aliases

#: path segments that wrappers insert; removed to recover the base model's own names
_WRAPPER_SEGMENTS = re.compile(r"\.(base_layer|original_module)(?=\.|$)")


def base_name(name: str) -> str:
    """A name in the adapted model mapped back to the name it had in the plain model.

    Args:
        name: a dotted module or parameter name in the adapted model.

    Returns:
        The name without the wrappers' own levels (``base_layer``, ``modules_to_save.<adapter>``).
    """
    return _WRAPPER_SEGMENTS.sub("", name)


def inject_wrappers(model: nn.Module, targets: list[MaskTarget], saved: list[str]) -> None:
    """Wrap every target's module (one wrapper per module, nesting a wrapper per masked
    parameter) and every saved module, under every name the module has. The wrappers are made
    on the plain tree first, then put in place the deepest first, so that each parent is still
    the plain module when its child is replaced.

    Args:
        model: the plain model, changed in place.
        targets: the tensors to mask.
        saved: the ``modules_to_save`` roots.
    """
    parameters: dict[str, list[str]] = defaultdict(list)
    for target in targets:
        parameters[target.module].append(target.parameter)
    wrappers = {
        name: create_popup_layer(model.get_submodule(name), names)
        for name, names in parameters.items()
    }
    wrappers.update({name: ModulesToSaveWrapper(model.get_submodule(name)) for name in saved})
    aliases = module_aliases(model)
    uses = [(alias, wrapper) for name, wrapper in wrappers.items() for alias in aliases[name]]
    for alias, wrapper in sorted(uses, key=lambda use: -use[0].count(".")):
        replace_module(model, alias, wrapper)


def replace_module(root: nn.Module, name: str, new: nn.Module) -> None:
    """Put ``new`` at the dotted path ``name`` under ``root``.

    Args:
        root: the model.
        name: the dotted path of the module to replace.
        new: what goes there.
    """
    parent_name, _, child = name.rpartition(".")
    setattr(root.get_submodule(parent_name) if parent_name else root, child, new)


def tied_parameter_ids(model: nn.Module) -> set[int]:
    """Parameters held by more than one module (a module used under several names counts
    once).

    Args:
        model: any module tree.

    Returns:
        The ``id()`` of every shared parameter.
    """
    seen: dict[int, int] = defaultdict(int)
    for _, module in model.named_modules():
        for _, param in module.named_parameters(recurse=False):
            seen[id(param)] += 1
    return {pid for pid, count in seen.items() if count > 1}


def unwrapped_view(module: nn.Module, copies: dict[int, nn.Module] | None = None) -> nn.Module:
    """A shallow copy of the module tree with every wrapper replaced by what it wraps
    (parameters shared; a module used under several names stays one module).

    Args:
        module: the (adapted) module tree.
        copies: shallow copies made so far, by the original's ``id()`` (for the recursion).

    Returns:
        The plain-looking tree.
    """
    copies = {} if copies is None else copies
    if is_wrapper(module):
        module = wrapped_module(module)
    if id(module) not in copies:
        view = copies[id(module)] = copy.copy(module)
        view._modules = {
            name: None if child is None else unwrapped_view(child, copies)
            for name, child in module._modules.items()
        }
    return copies[id(module)]


def is_wrapper(module: nn.Module) -> bool:
    """Whether ``module`` is one this package put in (a masked layer or a saved module).

    Args:
        module: any module.

    Returns:
        True for a [`PopupLayer`][popup_adapter.PopupLayer] or a ``ModulesToSaveWrapper``.
    """
    return isinstance(module, (PopupLayer, ModulesToSaveWrapper))


def wrapped_module(wrapper: nn.Module) -> nn.Module:
    """What ``wrapper`` wraps: the original module, masks and trained copies left out.

    Args:
        wrapper: a module for which `is_wrapper` holds.

    Returns:
        The innermost original module.
    """
    if isinstance(wrapper, PopupLayer):
        return wrapper.unloaded_base_layer()
    return wrapper.original_module


def replace_wrappers(root: nn.Module, replacement: Callable[[nn.Module], nn.Module]) -> None:
    """Put ``replacement(wrapper)`` wherever a wrapper is used (under every name of a shared
    one, computed once), the deepest first, so that nested wrappers are gone before their
    parents' turn.

    Args:
        root: the adapted model, changed in place.
        replacement: maps a wrapper to the module that takes its place.
    """
    uses = [
        (name, module)
        for name, module in root.named_modules(remove_duplicate=False)
        if is_wrapper(module)
    ]
    done: dict[int, nn.Module] = {}
    for name, module in sorted(uses, key=lambda use: -use[0].count(".")):
        if id(module) not in done:
            done[id(module)] = replacement(module)
        replace_module(root, name, done[id(module)])
