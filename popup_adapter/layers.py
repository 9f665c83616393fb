"""How one wrapped layer computes: its base layer's own forward, with ``W * M`` standing in for W.

The layer contract follows PEFT's: the original module stays as ``base_layer``, adapter
parameters are prefixed (``popup_scores``) and keyed by adapter name, one adapter is active at a
time. A wrapper masks one parameter of its base layer (``parameter_name``: ``weight`` for a
Linear or Conv). A module with several masked parameters (the fused expert banks of a
mixture-of-experts block) gets one wrapper per parameter, nested, as PEFT's ``ParamWrapper``.

"masked == merged" holds by construction: the forward calls the base layer itself with
``W * M`` swapped in for its parameter (``torch.func.functional_call``), so whatever a
subclass's forward does with its weight (weight standardisation, dynamic SAME padding, hooks)
happens to the masked weight, exactly as in the merged model. Code that reads the parameter
from outside the layer (``F.linear(x, self.qkv.weight)`` in BEiT's attention) reads ``W * M``
too, and every other attribute (``kernel_size``, ``in_features``, ``nf``...) reads through to
the base layer. Only the exact classes ``nn.Linear``, ``nn.Conv1d/2d/3d``, ``nn.Embedding`` and
transformers' ``Conv1D`` without hooks are computed here directly, as the one functional
operation their forward is: the same computation, and the fused straight-through backward may
then reuse the weight-gradient buffer (see [`masked_weight`][popup_adapter.masked_weight]).

Weights that a parametrization recomputes from other tensors (weight normalisation) cannot be
swapped this way (``functional_call`` would silently use the parametrization's value), so they
are refused (`unmaskable_reason`).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import nn
from torch.func import functional_call
from torch.nn.modules import module as _torch_module

from .base import masked_fan_in
from .budget import KeptBudget
from .errors import AdapterError
from .kernels import load_kernels, use_kernels
from .layer_adapters import AdapterMasksMixin, PackedMasks
from .routing import BASE_ADAPTER, Route, Superposition
from .selection import SelectionState, masked_weight, masked_weight_recipe, saved_as_recipe

#: torch's process-wide module hooks: when any is set, layers are called, never bypassed
_GLOBAL_HOOKS = (
    "_global_forward_hooks",
    "_global_forward_pre_hooks",
    "_global_backward_hooks",
    "_global_backward_pre_hooks",
)


class PopupLayer(AdapterMasksMixin, nn.Module):
    """One parameter of a module, masked: a learnable score per weight and adapter.

    Used as it is for any module (the forward calls the module with ``W * M`` swapped in), and
    through its subclasses for the layers it computes directly. ``per_expert`` masks each
    ``tensor[e]`` with its own exact top-k, so that ``k`` means for every expert's matrix what it
    means for a Linear.
    """

    #: the names PEFT-style code uses to find adapter parameters
    adapter_layer_names = ("popup_scores",)
    #: the exact classes whose forward
    #: [`forward_with_weight`][popup_adapter.PopupLayer.forward_with_weight] computes
    computed_types: tuple[type, ...] = ()

    def __init__(
        self, base_layer: nn.Module, parameter_name: str = "weight", per_expert: bool = False
    ) -> None:
        """Wrap ``base_layer``, masking its parameter ``parameter_name`` (no adapter yet).

        Args:
            base_layer: the module that owns the masked tensor (kept as ``base_layer``).
            parameter_name: which of its parameters is masked.
            per_expert: one top-k per expert (dim 0) of a fused expert bank.
        """
        super().__init__()
        self.base_layer = base_layer
        self.parameter_name = parameter_name
        self.per_expert = per_expert
        self.popup_scores = nn.ParameterDict()
        #: per adapter, how many weights each mask keeps (each expert's, with ``per_expert``)
        self.popup_kept: dict[str, int] = {}
        #: per adapter and mask, the last threshold, so the next selection is cheap
        self.popup_selection: dict[str, list[SelectionState]] = {}
        #: the adapters whose kept weights are biprop's ``alpha * sign(W)`` (`binarize_`)
        self.popup_binary: dict[str, bool] = {}
        #: the adapters whose counts a model-wide budget sets (global top-k, a density ramp)
        self.popup_budget: dict[str, KeptBudget] = {}
        self.active_adapter: str | None = None
        self.disable_adapters = False
        #: the adapter of each sample, during a mixed-batch forward (`popup_adapter.routing`)
        self.popup_route: Route | Superposition | None = None
        #: the served adapters' masks, and the merged one's, 1 bit per weight
        self.popup_masks = PackedMasks()
        #: the adapter whose ``W * M`` the layer holds since `merge` (PEFT's ``merged``)
        self.merged_adapter: str | None = None
        #: ``W * M`` when it could not be written over W (a shared or irreplaceable base)
        self.merged_weight: torch.Tensor | None = None
        #: the fused CPU kernels setting when this layer was built (see popup_adapter.kernels)
        self.use_kernels = use_kernels()
        if self.use_kernels:
            load_kernels()  # compiled now, if ever, not inside the first training step

    # -- the base layer, read through
    def __getattr__(self, name: str):
        try:
            return super().__getattr__(name)
        except AttributeError:
            base = self.__dict__.get("_modules", {}).get("base_layer")
            if base is None or name == "base_layer":
                raise
        if name == self.__dict__.get("parameter_name"):
            return self.effective_weight()  # model code reading `.weight` gets W * M
        return getattr(base, name)

    def __setattr__(self, name: str, value) -> None:
        # assigning the masked parameter (e.g. transformers re-tying weights) replaces the base
        # layer's: the wrapper must never hold a parameter of that name itself
        base = self.__dict__.get("_modules", {}).get("base_layer")
        if base is not None and name == self.__dict__.get("parameter_name"):
            setattr(base, name, value)
        else:
            super().__setattr__(name, value)

    @property
    def owner(self) -> nn.Module:
        """The module that holds the masked parameter (below any nested wrappers)."""
        module = self.base_layer
        while isinstance(module, PopupLayer):
            module = module.base_layer
        return module

    @property
    def base_weight(self) -> torch.Tensor:
        """The frozen tensor this layer masks."""
        return self.owner._parameters[self.parameter_name]

    @property
    def num_masks(self) -> int:
        """Separate top-k selections: one per expert with ``per_expert``, else one."""
        return self.base_weight.shape[0] if self.per_expert else 1

    @property
    def fan_in(self) -> int:
        """This layer's fan-in, as Kaiming's init counts it (per expert for an expert bank)."""
        return masked_fan_in(self.owner, self.base_weight)

    # -- the forward
    def effective_weight(self) -> torch.Tensor:
        """The weight the forward pass uses: ``W * M`` of the active adapter, or ``W`` when off.

        Unmerged, nothing is cached: each forward (eval too) selects the mask and writes
        ``W * M`` in one fused pass, freed after the layer ran; merged, it is held.

        Returns:
            A tensor shaped as the base weight (differentiable with respect to the active scores).

        Raises:
            AdapterError: during a mixed-batch forward, where the weight depends on the sample
                (model code reading it from outside the layer cannot be routed).
        """
        if self.popup_route is not None:
            raise AdapterError(
                f"{self.popup_route.module}'s {self.parameter_name} is read from outside the "
                "layer, which a mixed batch (adapter_names) cannot route per sample; run each "
                "adapter's samples as their own batch after set_adapter()"
            )
        return self._weight_and_recipe(self._computing_adapter(), single_use=False)[0]

    def _computing_adapter(self) -> str | None:
        """The adapter the forward computes with: None for the plain base."""
        return None if self.disable_adapters else self.active_adapter

    def _weight_and_recipe(
        self, adapter: str | None, single_use: bool
    ) -> tuple[torch.Tensor, Callable[[], torch.Tensor] | None]:
        """The weight ``adapter`` computes with, and how to write it again in the backward
        instead of keeping it (`masked_weight_recipe`; None where it is kept)."""
        weight = self.base_weight
        if adapter is None or adapter == BASE_ADAPTER:
            self._check_unmasked_base()
            return weight, None
        if adapter == self.merged_adapter:
            self._check_not_training()
            return (weight if self.merged_weight is None else self.merged_weight), None
        self._refuse_while_merged(f"compute with adapter {adapter!r}")
        if self.is_served(adapter):  # its mask as held: nothing to select or train
            return self.masked_value(weight, self.get_mask(adapter), adapter), None
        scores, kept = self.popup_scores[adapter], self._current_kept(adapter)
        states, binary = self.popup_selection[adapter], self.popup_binary[adapter]
        single_use = single_use and not self.per_expert
        parts = [
            masked_weight(w, s, kept, state, single_use, self.use_kernels, binary)
            for w, s, state in zip(
                self._per_mask(weight), self._per_mask(scores), states, strict=True
            )
        ]
        recipes = [masked_weight_recipe(part) for part in parts]
        if any(recipe is None for recipe in recipes):
            recipe = None
        elif self.per_expert:

            def recipe() -> torch.Tensor:
                return torch.stack([part() for part in recipes])

        else:
            recipe = recipes[0]
        return (torch.stack(parts) if self.per_expert else parts[0]), recipe

    def _computes_itself(self, args: tuple, kwargs: dict) -> bool:
        """Whether the base layer's forward is exactly
        [`forward_with_weight`][popup_adapter.PopupLayer.forward_with_weight] here: its class is one
        of ``computed_types`` exactly, called with one input, and no hook (its own, a global one, or
        a replaced ``forward`` such as accelerate's) would be skipped."""
        base = self.base_layer
        return (
            type(base) in self.computed_types
            and len(args) == 1
            and not kwargs
            and not (
                base._forward_hooks
                or base._forward_pre_hooks
                or base._backward_hooks
                or base._backward_pre_hooks
                or "forward" in base.__dict__
            )
            and not any(getattr(_torch_module, hooks) for hooks in _GLOBAL_HOOKS)
        )

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        """The base layer's computation with the active adapter's ``W * M`` (each sample's
        adapter's, in a mixed batch).

        Args:
            *args: the base layer's own inputs.
            **kwargs: the base layer's own inputs.

        Returns:
            What the base layer returns.
        """
        if isinstance(self.popup_route, Superposition):
            return self._forward_superposed(self.popup_route, args, kwargs)
        if self.popup_route is not None:
            return self.popup_route(args, kwargs, self._forward_as)
        return self._forward_as(self._computing_adapter(), args, kwargs)

    def _forward_as(self, adapter: str | None, args: tuple, kwargs: dict) -> Any:
        """The forward with ``adapter``'s weight (None or `BASE_ADAPTER`: the plain base)."""
        adapter = None if adapter == BASE_ADAPTER else adapter
        if adapter is None:
            self._check_unmasked_base()
            return self.base_layer(*args, **kwargs)
        if adapter == self.merged_adapter and self.merged_weight is None:
            self._check_not_training()
            return self.base_layer(*args, **kwargs)  # W * M is the weight: the plain forward
        # W * M feeds exactly one operation when computed here: its gradient buffer may be
        # reused in place
        direct = self._computes_itself(args, kwargs)
        weight, recipe = self._weight_and_recipe(adapter, single_use=direct)
        return self._forward_with(weight, recipe, args, kwargs, direct)

    def _forward_superposed(self, mixture: Superposition, args: tuple, kwargs: dict) -> Any:
        """The forward with SupSup's superposed weight ``W * sum_i alpha_i M_i``, differentiable
        in the mixing weights alone (the masks are taken as they are)."""
        with torch.no_grad():
            masked = [self._weight_and_recipe(a, False)[0].detach() for a in mixture.adapters]
        weight = sum(alpha * value for alpha, value in zip(mixture.alphas, masked, strict=True))
        return self._forward_with(weight, None, args, kwargs, self._computes_itself(args, kwargs))

    def _forward_with(
        self,
        weight: torch.Tensor,
        recipe: Callable[[], torch.Tensor] | None,
        args: tuple,
        kwargs: dict,
        direct: bool,
    ) -> Any:
        """The base layer's computation with ``weight`` as its masked parameter (``direct``:
        as `forward_with_weight`, see `_computes_itself`); W * M is not kept for the
        backward where ``recipe`` writes it again there."""
        with saved_as_recipe(weight, recipe):
            if direct:
                return self.forward_with_weight(args[0], weight)
            path, module = [self.parameter_name], self.base_layer
            while isinstance(module, PopupLayer):  # nested wrappers: swap in the owner's tensor
                path.insert(0, "base_layer")
                module = module.base_layer
            return functional_call(
                self.base_layer, {".".join(path): weight}, args, kwargs, strict=False
            )

    def _check_unmasked_base(self) -> None:
        if self.merged_adapter is not None and self.merged_weight is None:  # W holds W * M
            self._refuse_while_merged("run the unmasked base")

    def _check_not_training(self) -> None:
        trains = getattr(self.popup_scores.get(self.merged_adapter), "requires_grad", False)
        if self.training and torch.is_grad_enabled() and trains:
            raise AdapterError(
                f"adapter {self.merged_adapter!r} is merged (merge_adapter): its scores would "
                "get no gradient. Call unmerge_adapter() before training"
            )

    def forward_with_weight(self, x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
        """What a base layer of one of ``computed_types`` computes, with ``weight`` as its own.

        Args:
            x: the layer's input.
            weight: the weight to compute with.

        Returns:
            The layer's output.

        Raises:
            NotImplementedError: in the generic class, which runs the base layer's own forward.
        """
        raise NotImplementedError

    # -- back to a plain module
    def unloaded_base_layer(self) -> nn.Module:
        """The owner module as it was, every nested wrapper dropped.

        Returns:
            The base layer, with the original parameter back.
        """
        return self.owner

    def extra_repr(self) -> str:
        """The masked parameter, kept counts per adapter and the active one, for ``print``.

        Returns:
            One line.
        """
        per_mask = self.base_weight.numel() // self.num_masks
        kept = ", ".join(f"{a}: {n}/{per_mask}" for a, n in self.popup_kept.items())
        where = "" if self.parameter_name == "weight" else f"parameter={self.parameter_name}, "
        experts = f"experts={self.num_masks}, kept per expert" if self.per_expert else "kept"
        return f"{where}{experts}=({kept}), active={self.active_adapter!r}"
