"""Building a base without the random init that seeding overwrites.

Rebuilding an artifact's base runs the architecture's constructor, and with it torch's and the
library's own weight init (``reset_parameters``, timm's ``init_weights``, transformers'
``_init_weights``): for ResNet-50 that is 25M random draws, more time than regenerating the
same weights from the seed, and every one of them is overwritten by `seed_base`, which
draws the weight of each Linear/Conv/``Conv1D`` whatever it held. `build_skipping_layer_init`
runs the constructor with the in-place writes into exactly those tensors skipped, and the
random fills of embedding weights (24M draws for BERT-base's), which seeding also draws unless
the constructor made them a constant: an embedding it fills with a constant keeps that, and the
others are marked unset for `seed_base`. Nothing else changes: buffers, constants and every
other parameter get their constructor values.

Skipping is only sound when nothing reads a skipped tensor before it is drawn (a
``weight_norm`` computing its norm from the weight, a copy into a buffer) and when each one
the model keeps ends up as a layer weight that seeding draws. The build watches for both,
every torch call passing through a function mode, and when either happens it builds the
model again the plain way: a slower load, never another base.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterator
from typing import Any, TypeVar

import torch
from torch import nn
from torch.nn.modules.module import register_module_parameter_registration_hook
from torch.overrides import TorchFunctionMode

from .base import UNSET_ATTRIBUTE, is_weight_layer

_logger = logging.getLogger(__name__)
Model = TypeVar("Model", bound=nn.Module)

#: in-place methods that change what a tensor is rather than its values: never skipped
_NOT_FILLS = {"requires_grad_", "share_memory_", "retain_grad", "detach_", "rename_"}
#: in-place methods that change a tensor's storage: the weight cannot be followed after them
_RESTORAGE = {"set_", "resize_", "resize_as_", "as_strided_", "swap_"}
#: the random fills (torch's and ``torch.nn.init``'s): what an embedding's init skips
_RANDOM_FILLS = {
    "normal_",
    "uniform_",
    "trunc_normal_",
    "kaiming_uniform_",
    "kaiming_normal_",
    "xavier_uniform_",
    "xavier_normal_",
    "orthogonal_",
    "sparse_",
    "random_",
    "bernoulli_",
    "exponential_",
    "geometric_",
    "log_normal_",
    "cauchy_",
}
#: writes that give a whole tensor values of its own (an embedding a constructor zeroes keeps
#: its zeros: seeding keeps a constant it finds there)
_SETTING_WRITES = {"fill_", "zero_", "copy_", "constant_", "zeros_", "ones_", "eye_", "dirac_"}
#: calls that read a tensor's metadata, never its values
_METADATA = {
    "size",
    "dim",
    "ndimension",
    "numel",
    "nelement",
    "stride",
    "storage_offset",
    "is_contiguous",
    "element_size",
    "__len__",
    "is_floating_point",
    "is_complex",
    "get_device",
    "data_ptr",
    "untyped_storage",
    "_is_view",
    "__get__",
    "__set__",
}


def _is_drawn_weight(module: nn.Module) -> bool:
    """A module whose ``weight`` seeding draws from the seed: a Linear/Conv/``Conv1D`` layer
    (always), an embedding (as any tensor that is not a constant: marked unset here)."""
    return is_weight_layer(module) or isinstance(module, nn.Embedding)


def _storage(tensor: torch.Tensor) -> int:
    return tensor.untyped_storage().data_ptr() if tensor.numel() else 0


def _tensors(values: Any) -> Iterator[torch.Tensor]:
    """The tensors among a call's arguments, inside lists, tuples and dicts too."""
    if isinstance(values, torch.Tensor):
        yield values
    elif isinstance(values, (list, tuple)):
        for value in values:
            yield from _tensors(value)
    elif isinstance(values, dict):
        for value in values.values():
            yield from _tensors(value)


def _call(func, args: tuple, kwargs: dict) -> tuple[str, Any, bool]:
    """A torch call's name, the tensor it acts on (``self``, or ``nn.init``'s ``tensor``), and
    whether it writes into that tensor in place (a trailing ``_``, or item assignment)."""
    name = getattr(func, "__name__", "")
    target = args[0] if args else kwargs.get("tensor", kwargs.get("self"))
    writes = (name.endswith("_") and not name.startswith("__")) or name == "__setitem__"
    return name, target, writes


class _MetaFillSkipper(TorchFunctionMode):
    """On the meta device an in-place fill computes nothing but costs a decomposition in
    Python (torch's reference ``normal_`` and friends): skipped, shapes are unchanged."""

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        name, target, writes = _call(func, args, kwargs)
        if writes and name not in _NOT_FILLS | _RESTORAGE and getattr(target, "is_meta", False):
            return target
        return func(*args, **kwargs)


def build_on_meta(build: Callable[[], Model]) -> Model:
    """``build()`` on the meta device, its in-place fills skipped (nothing to fill there).

    Args:
        build: builds the model under ``torch.device("meta")``.

    Returns:
        The model, shapes only.
    """
    with _MetaFillSkipper():
        return build()


class _LayerInitSkipper(TorchFunctionMode):
    """Skips in-place writes into registered layer weights; notes any read of one."""

    def __init__(self) -> None:
        super().__init__()
        #: storage of every layer weight registered during the build (the tensors kept alive,
        #: so that no other tensor reuses an address while the build runs): every write skipped
        self.layer_weights: dict[int, torch.Tensor] = {}
        #: the same for embedding weights: only their random fills are skipped
        self.embeddings: dict[int, torch.Tensor] = {}
        #: storages whose writes were skipped: they hold no values yet
        self.skipped: set[int] = set()
        #: why skipping was unsound, or None
        self.unsound: str | None = None

    def register(self, module: nn.Module, name: str, param: Any) -> None:
        if not (name == "weight" and isinstance(param, torch.Tensor)):
            return
        if not (param.is_floating_point() and (address := _storage(param))):
            return
        if is_weight_layer(module):
            self.layer_weights[address] = param
        elif isinstance(module, nn.Embedding):
            self.embeddings[address] = param

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        name, target, writes = _call(func, args, kwargs)
        address = _storage(target) if isinstance(target, torch.Tensor) else 0
        registered = self.layer_weights.get(address, self.embeddings.get(address))
        watched = registered is not None
        if watched and writes and name not in _NOT_FILLS:
            if name in _RESTORAGE:
                self.unsound = self.unsound or f"{name} on a layer weight"
            elif address in self.layer_weights or name in _RANDOM_FILLS:
                self.skipped.add(address)
                return target
        result = func(*args, **kwargs)
        if self.skipped and name not in _METADATA and not self.unsound:
            self._check_reads(name, (args, kwargs), result)
        if watched and name in _SETTING_WRITES and target.numel() == registered.numel():
            self.skipped.discard(address)  # an embedding given values of its own
        return result

    def _check_reads(self, name: str, inputs: Any, result: Any) -> None:
        if not any(_storage(t) in self.skipped for t in _tensors(inputs)):
            return
        outputs = result if isinstance(result, (tuple, list)) else (result,)
        views = all(isinstance(o, torch.Tensor) and _storage(o) in self.skipped for o in outputs)
        if not views:  # a value computed from a weight that holds none yet
            self.unsound = f"{name} read a layer weight during the build"

    def check(self, model: nn.Module) -> None:
        """Note, in ``unsound``, a skipped storage that a tensor of the built model holds
        other than as a layer weight that seeding draws (one the model dropped, as a weight
        replaced by a tied one, is harmless)."""
        if self.unsound:
            return
        drawn = {
            id(weight): weight
            for module in model.modules()
            if isinstance(weight := module._parameters.get("weight"), nn.Parameter)
            and _is_drawn_weight(module)
        }
        named = [*model.named_parameters(remove_duplicate=False), *model.named_buffers()]
        for name, tensor in named:
            if id(tensor) not in drawn and _storage(tensor) in self.skipped:
                self.unsound = f"{name} shares its storage with a layer weight left unset"
                return
        # seeding draws a layer weight whatever it holds; an embedding when told it holds nothing
        for weight in drawn.values():
            if _storage(weight) in self.skipped and _storage(weight) not in self.layer_weights:
                setattr(weight, UNSET_ATTRIBUTE, True)


def build_skipping_layer_init(build: Callable[[], Model]) -> Model:
    """``build()``, with the init of every Linear/Conv/``Conv1D`` weight skipped where that
    is sound (see the module docstring); otherwise ``build()`` run again without skipping.

    Only for a model whose layer weights `popup_adapter.base.seed_base` draws next (a
    seeded init): their values are garbage until then.

    Args:
        build: builds the model (on the CPU).

    Returns:
        The model: its buffers and constants as ``build()`` makes them, its other random
        tensors still drawn (from a fork of the global RNG, which is left as it was; a build
        again draws from it as a plain build does).
    """
    skipper = _LayerInitSkipper()
    handle = register_module_parameter_registration_hook(skipper.register)
    try:  # the global RNG as it was, so that a build again is the plain build, value for value
        with torch.random.fork_rng(devices=[]), skipper:
            model = build()
    finally:
        handle.remove()
    skipper.check(model)
    if skipper.unsound is None:
        return model
    _logger.debug("building again with the layer init: %s", skipper.unsound)
    return build()
