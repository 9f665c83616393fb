"""Which adapter computes which sample: a batch routed per sample, PEFT's mixed-batch
inference (``model(x, adapter_names=[...])``), or every sample through a superposition of
adapters (SupSup's task inference).

Every module that holds something per adapter (a masked layer, a ``modules_to_save`` copy, a
BatchNorm's statistics, a trained norm) gets the routing for one forward. It splits its input
along dim 0 into one group per adapter, runs each group through that adapter's version as a
batch of its own, and puts the outputs back in the batch's order. A group therefore meets, in
every such module, exactly the computation it meets alone after ``set_adapter``, at one
``W * M`` per adapter and layer rather than one per sample. A module whose input is not
batch-first (token-flattened expert inputs), or that takes further tensors, cannot be split
that way and is refused by name rather than mixed.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from .errors import AdapterError

#: the name that routes a sample through the plain backbone (PEFT's), as
#: ``disable_adapter()`` runs it
BASE_ADAPTER = "__base__"


class SampleRouting:
    """The adapter of every sample of one batch, grouped: the groups in order of first
    appearance, each with its sample indices."""

    def __init__(self, adapter_names: Sequence[str]) -> None:
        """Group ``adapter_names``.

        Args:
            adapter_names: one adapter name per sample (or `BASE_ADAPTER`).

        Raises:
            AdapterError: no names.
        """
        if not adapter_names:
            raise AdapterError("adapter_names is empty; give one adapter name per sample")
        self.adapter_names = list(adapter_names)
        indices: dict[str, list[int]] = {}
        for index, name in enumerate(self.adapter_names):
            indices.setdefault(name, []).append(index)
        #: ``(adapter, sample indices)`` per group
        self.groups = [(name, torch.tensor(rows)) for name, rows in indices.items()]
        # the concatenated group outputs, back in the batch's order
        self._inverse = torch.argsort(torch.cat([rows for _, rows in self.groups]))

    @property
    def batch_size(self) -> int:
        """How many samples the routed batch has."""
        return len(self.adapter_names)

    def split(self, module: str, args: tuple, kwargs: dict) -> torch.Tensor:
        """The one routed input of a module's call, checked to be batch-first.

        Args:
            module: the module's name, for the error.
            args: its positional inputs.
            kwargs: its keyword inputs.

        Returns:
            The input to split.

        Raises:
            AdapterError: more than one tensor input, or not one row per sample.
        """
        x = args[0] if len(args) == 1 else None
        further = any(isinstance(v, torch.Tensor) for v in kwargs.values())
        if not isinstance(x, torch.Tensor) or further:
            raise AdapterError(
                f"{module} takes {len(args)} positional and {len(kwargs)} keyword inputs; a "
                "mixed batch (adapter_names) splits a module's one input by sample. Run each "
                "adapter's samples as their own batch after set_adapter()"
            )
        if x.ndim == 0 or x.shape[0] != self.batch_size:
            rows = x.shape[0] if x.ndim else 0
            raise AdapterError(
                f"{module} got an input of {rows} rows for a batch of {self.batch_size} "
                "samples: a mixed batch (adapter_names) needs one name per sample, and modules "
                "whose input is batch-first (not flattened tokens or beams)"
            )
        return x

    def combine(self, module: str, x: torch.Tensor, compute: Callable[..., Any]) -> Any:
        """Each group of ``x`` through ``compute(adapter, group)``, back in the batch's order.

        Args:
            module: the module's name, for the error.
            x: the module's input, one row per sample.
            compute: the module's computation for one adapter.

        Returns:
            The module's output for the whole batch.

        Raises:
            AdapterError: the module returns something other than one tensor.
        """
        if len(self.groups) == 1:  # one adapter: the plain call, on the input as it is
            return compute(self.groups[0][0], x)
        outputs = [compute(name, x.index_select(0, i.to(x.device))) for name, i in self.groups]
        if not all(isinstance(output, torch.Tensor) for output in outputs):
            raise AdapterError(
                f"{module} returns {type(outputs[0]).__name__}; a mixed batch (adapter_names) "
                "puts one output tensor per module back together"
            )
        return torch.cat(outputs).index_select(0, self._inverse.to(outputs[0].device))


@dataclass(frozen=True)
class Route:
    """A routing, as one module takes it: the routing and the module's name."""

    routing: SampleRouting
    module: str

    def __call__(
        self, args: tuple, kwargs: dict, compute: Callable[[str, tuple, dict], Any]
    ) -> Any:
        """The module's output for the routed batch.

        Args:
            args: the module's positional inputs.
            kwargs: its keyword inputs.
            compute: ``compute(adapter, args, kwargs)``, the module's call as that adapter's.

        Returns:
            The module's output, one row per sample.
        """
        x = self.routing.split(self.module, args, kwargs)
        return self.routing.combine(
            self.module, x, lambda adapter, group: compute(adapter, (group,), kwargs)
        )


@dataclass(frozen=True)
class Superposition:
    """SupSup's superposed adapters: a module computes ``sum_i alpha_i f_i(x)`` over the
    adapters' versions ``f_i`` of it; a masked layer computes with the superposed weight
    ``W * sum_i alpha_i M_i`` instead, in one pass, which is the same thing for a linear map.
    The mixing weights ``alphas`` are what task inference differentiates."""

    adapters: tuple[str, ...]
    alphas: torch.Tensor
    module: str

    def __call__(
        self, args: tuple, kwargs: dict, compute: Callable[[str, tuple, dict], Any]
    ) -> Any:
        """The module's superposed output.

        Args:
            args: the module's positional inputs.
            kwargs: its keyword inputs.
            compute: ``compute(adapter, args, kwargs)``, the module's call as that adapter's.

        Returns:
            ``sum_i alphas[i] * compute(adapters[i], args, kwargs)``.
        """
        outputs = [compute(adapter, args, kwargs) for adapter in self.adapters]
        return sum(alpha * out for alpha, out in zip(self.alphas, outputs, strict=True))


@contextlib.contextmanager
def routed_tensors(
    module: nn.Module,
    route: Route | Superposition,
    values: Callable[[str], dict[str, torch.Tensor]],
) -> Iterator[None]:
    """Inside the block, ``module`` computes each group of a routed batch with that adapter's
    values of its per-adapter tensors (BatchNorm statistics, trained norms) in place of the
    live ones, through its own forward: the module is not wrapped, so its names and
    ``state_dict`` stay the plain model's.

    Args:
        module: a module holding per-adapter tensors.
        route: the routing (or superposition), named for this module.
        values: ``values(adapter)``, that adapter's tensors by leaf name (empty: the live ones).

    Yields:
        Nothing; the module's own forward is back after the block.
    """
    own = module.__dict__.get("forward")  # an instance forward (e.g. accelerate's) stays
    original = module.forward

    def compute(adapter: str, args: tuple, kwargs: dict) -> Any:
        swapped = values(adapter)
        stores = {
            leaf: module._parameters if leaf in module._parameters else module._buffers
            for leaf in swapped
        }
        live = {leaf: stores[leaf][leaf] for leaf in swapped}
        try:
            for leaf, tensor in swapped.items():
                stores[leaf][leaf] = tensor
            return original(*args, **kwargs)
        finally:
            for leaf, tensor in live.items():
                stores[leaf][leaf] = tensor

    module.forward = lambda *args, **kwargs: route(args, kwargs, compute)
    try:
        yield
    finally:
        if own is None:
            del module.forward
        else:
            module.forward = own
