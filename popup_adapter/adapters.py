"""What belongs to one adapter besides its scores, and how adapters share one backbone.

Each adapter of a [`PopupModel`][popup_adapter.PopupModel] has its own scores (in the masked
layers), its own copies of ``modules_to_save`` (`ModulesToSaveWrapper`, as in PEFT) and its own
values of the tensors the backbone holds once: BatchNorm running statistics, and with
``train_norms`` the norm layers' weights and biases. Those live in the modules for the active
adapter; `AdapterBank` keeps every other adapter's values and swaps them in when the active adapter
changes or is deleted.
"""

from __future__ import annotations

import copy
from typing import Any

import torch
from torch import nn

from .errors import AdapterError
from .routing import BASE_ADAPTER, Route, Superposition

#: the buffers of a BatchNorm that training changes
BATCHNORM_STATS = ("running_mean", "running_var", "num_batches_tracked")


class ModulesToSaveWrapper(nn.Module):
    """A module trained densely, one copy per adapter (PEFT's ``modules_to_save``)."""

    def __init__(self, module: nn.Module) -> None:
        """Wrap ``module``; it stays the forward's module until an adapter gets a copy.

        Args:
            module: the module to train densely per adapter (e.g. a new classifier head).
        """
        super().__init__()
        self.original_module = module
        self.modules_to_save = nn.ModuleDict()
        self.active_adapter: str | None = None
        self.disable_adapters = False
        #: the adapter of each sample, during a mixed-batch forward (`popup_adapter.routing`)
        self.popup_route: Route | Superposition | None = None

    def update(self, adapter_name: str) -> None:
        """Add a trainable copy of the original module for ``adapter_name``.

        Args:
            adapter_name: the new adapter.
        """
        copy_ = copy.deepcopy(self.original_module)
        copy_.requires_grad_(True)
        self.modules_to_save[adapter_name] = copy_

    def set_adapter(self, adapter_name: str | None) -> None:
        """Route the forward to ``adapter_name``'s copy; only it trains.

        Args:
            adapter_name: the adapter whose copy computes, or None for the original module.
        """
        for name, module in self.modules_to_save.items():
            module.requires_grad_(name == adapter_name)
        self.active_adapter = adapter_name

    def delete_adapter(self, adapter_name: str) -> None:
        """Drop ``adapter_name``'s copy.

        Args:
            adapter_name: the adapter whose copy goes.
        """
        del self.modules_to_save[adapter_name]

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        """The active adapter's copy (the original when adapters are disabled; each sample's
        adapter's in a mixed batch).

        Args:
            *args: the wrapped module's own inputs.
            **kwargs: the wrapped module's own inputs.

        Returns:
            What that copy returns.
        """
        if self.popup_route is not None:
            return self.popup_route(args, kwargs, self._forward_as)
        adapter = None if self.disable_adapters else self.active_adapter
        return self._forward_as(adapter, args, kwargs)

    def _forward_as(self, adapter: str | None, args: tuple, kwargs: dict) -> Any:
        """``adapter``'s copy (None or `BASE_ADAPTER`: the original module)."""
        if adapter is None or adapter == BASE_ADAPTER:
            return self.original_module(*args, **kwargs)
        return self.modules_to_save[adapter](*args, **kwargs)


def initial_batchnorm_stats(bn: nn.Module, prefix: str) -> dict[str, torch.Tensor]:
    """The statistics of a BatchNorm that has seen no batch: what a new adapter starts from.

    Args:
        bn: a BatchNorm module.
        prefix: its name, prepended to the statistics' names.

    Returns:
        ``{prefix.running_mean: zeros, prefix.running_var: ones, prefix.num_batches_tracked: 0}``
        (those the module tracks).
    """
    return {
        f"{prefix}.running_mean": torch.zeros_like(bn.running_mean),
        f"{prefix}.running_var": torch.ones_like(bn.running_var),
        f"{prefix}.num_batches_tracked": torch.zeros_like(bn.num_batches_tracked),
    }


class AdapterBank:
    """Per inactive adapter, its values of the tensors the backbone holds once.

    The live tensors (the modules' own buffers and parameters, which the forward reads, by
    their plain-model names) hold the active adapter's values; the caller passes them in, so
    that the bank, which lives inside its model, holds no reference back to it (a model would
    otherwise be a reference cycle, freed only by Python's cyclic collector). Swapping copies
    values in place, so optimizers and hooks keep pointing at the same tensors.
    """

    def __init__(self) -> None:
        """An empty bank."""
        self._stored: dict[str, dict[str, torch.Tensor]] = {}

    def add(
        self, adapter_name: str, initial: dict[str, torch.Tensor], live: dict[str, torch.Tensor]
    ) -> None:
        """Give a new, inactive adapter its starting values (one for every live tensor).

        Args:
            adapter_name: the new adapter.
            initial: its starting value for every live tensor, by name.
            live: the live tensors, by name.

        Raises:
            AdapterError: ``initial`` does not name exactly the live tensors.
        """
        if set(initial) != set(live):
            raise AdapterError(f"adapter {adapter_name!r} needs a value for every shared tensor")
        self._stored[adapter_name] = {k: v.detach().clone() for k, v in initial.items()}

    def switch(self, previous: str | None, incoming: str, live: dict[str, torch.Tensor]) -> None:
        """Store the live values as ``previous``'s (None: discard them, the adapter was
        deleted) and put ``incoming``'s in their place.

        Args:
            previous: the adapter that was active, or None.
            incoming: the adapter that becomes active.
            live: the live tensors, by name.
        """
        if previous is not None:
            self._stored[previous] = {k: v.detach().clone() for k, v in live.items()}
        values = self._stored.pop(incoming)
        with torch.no_grad():
            for name, tensor in live.items():
                tensor.copy_(values[name])

    def remove(self, adapter_name: str) -> None:
        """Forget an inactive adapter's values.

        Args:
            adapter_name: an inactive adapter.
        """
        self._stored.pop(adapter_name, None)

    def stored(self, adapter_name: str) -> dict[str, torch.Tensor]:
        """An inactive adapter's values by name; copying into them sets that adapter's values.

        Args:
            adapter_name: an inactive adapter.

        Returns:
            ``{name: tensor}``.
        """
        return dict(self._stored[adapter_name])


def adapter_parameter_owner(name: str) -> str | None:
    """The adapter a parameter name belongs to (``...popup_scores.<adapter>`` or
    ``...modules_to_save.<adapter>...``), matched by whole name segments so that ``default``
    never matches ``default2``; None for a backbone parameter.

    Args:
        name: a parameter's name in the adapted model.

    Returns:
        The adapter's name, or None.
    """
    parts = name.split(".")
    for index, part in enumerate(parts[:-1]):
        if part in ("popup_scores", "modules_to_save"):
            return parts[index + 1]
    return None


def stored_state_problem(key: str, value: torch.Tensor, target: torch.Tensor) -> str | None:
    """What is wrong with a stored tensor that is to be copied into ``target``, or None.

    A shape, a dtype of another kind or one that changes the values when cast (a silent cast is
    a silently other model), non-finite BatchNorm statistics or a negative running variance.

    Args:
        key: the tensor's name (its last part says whether it is a BatchNorm statistic).
        value: the stored tensor.
        target: the model's tensor.

    Returns:
        The problem, worded to follow the tensor's name, or None.
    """
    if value.shape != target.shape:
        return f"has shape {tuple(value.shape)}, the model's is {tuple(target.shape)}"
    if value.dtype.is_floating_point != target.dtype.is_floating_point or (
        value.dtype != target.dtype
        and not torch.equal(value.to(target.dtype).to(value.dtype), value)
    ):
        return f"is {value.dtype}, which does not hold the model's {target.dtype} values exactly"
    leaf = key.rsplit(".", 1)[-1]
    if leaf in BATCHNORM_STATS and value.dtype.is_floating_point:
        if not bool(torch.isfinite(value).all()):
            return "holds NaN or infinite BatchNorm statistics"
        if leaf == "running_var" and bool((value < 0).any()):
            return "holds a negative BatchNorm variance"
    return None
