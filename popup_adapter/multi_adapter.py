"""How adapters live on one backbone: what each owns, switching, adding, deleting (merging
and unloading are `popup_adapter.merging`'s).

`MultiAdapterMixin` is the tuner half of [`PopupModel`][popup_adapter.PopupModel] (PEFT's
tuners have the same methods): the masks are in the masked layers, the ``modules_to_save``
copies in their wrappers, and every inactive adapter's BatchNorm statistics and trained norms
in an `AdapterBank`. It relies on the host model for
``base_model``, ``peft_config``, ``active_adapter``, ``targets``, ``coverage``, ``_bank``,
``_initial_norms`` and ``_masked_layers``, and on `MergeMixin`'s ``unmerge_adapter``: every
change of adapters, and reading the base, unmerges first.
"""

from __future__ import annotations

import contextlib
import warnings
from collections.abc import Iterator, Sequence
from typing import Any

import torch
from torch import nn

from .adapters import (
    BATCHNORM_STATS,
    ModulesToSaveWrapper,
    adapter_parameter_owner,
    initial_batchnorm_stats,
    stored_state_problem,
)
from .base import is_inside, is_norm_module
from .budget import KeptBudget
from .config import PopupConfig
from .errors import AdapterError, ArtifactError, ConfigError
from .injection import (
    base_name,
    is_wrapper,
    unwrapped_view,
)
from .layers import PopupLayer
from .redraws import REDRAWS, add_redraw_counts, redraw_pruned, seed_weight_values
from .routing import BASE_ADAPTER, Route, SampleRouting, Superposition, routed_tensors
from .seeding import score_values
from .targets import MaskTarget, resolve_targets


class MultiAdapterMixin:
    """Adapter management for [`PopupModel`][popup_adapter.PopupModel]."""

    @property
    def _backbone_config(self) -> PopupConfig:
        """A config of this backbone: every adapter's agrees on the base, the targets, the
        saved modules and the norm policy (``add_adapter`` checks)."""
        return next(iter(self.peft_config.values()))

    def _adapter_values(self, adapter_name: str) -> dict[str, torch.Tensor]:
        """An adapter's values of what the backbone holds once (BatchNorm statistics, trained
        norms): the live tensors for the active adapter, its stored ones for another."""
        if adapter_name == self.active_adapter:
            return self._shared_tensors()
        return self._bank.stored(adapter_name)

    def _trained_roots(self) -> list[str]:
        config = self._backbone_config
        return list(config.modules_to_save or []) + [name for name, _ in self._trained_norms()]

    def _trained_norms(self) -> list[tuple[str, nn.Module]]:
        if not self._backbone_config.train_norms:
            return []
        return [(name, module) for name, module in self._base_modules() if is_norm_module(module)]

    def _base_modules(self) -> list[tuple[str, nn.Module]]:
        """The plain model's modules by their plain names, outside ``modules_to_save``."""
        saved = list(self._backbone_config.modules_to_save or [])
        return [
            (base_name(n), m)
            for n, m in self.base_model.named_modules()
            if ".modules_to_save." not in n and not is_inside(base_name(n), saved)
        ]

    def trained_state(self, adapter_name: str | None = None) -> dict[str, torch.Tensor]:
        """What training changed besides the mask: BatchNorm statistics, ``modules_to_save``
        and trained norms.

        Args:
            adapter_name: whose (default: the active adapter).

        Returns:
            ``{plain-model name: tensor}``; the tensors are live views (the modules' own for
            the active adapter, the bank's for another), so copying into them sets that
            adapter's state: this is how an artifact is loaded.

        Raises:
            AdapterError: no such adapter.
        """
        adapter_name = adapter_name or self.active_adapter
        self._check_adapter(adapter_name)
        state = self._adapter_values(adapter_name)
        for name, module in self.base_model.named_modules():
            if isinstance(module, ModulesToSaveWrapper):
                copy_ = module.modules_to_save[adapter_name]
                for key, value in copy_.state_dict(keep_vars=True).items():
                    state[f"{base_name(name)}.{key}"] = value
        return {key: value.detach() for key, value in state.items()}

    def load_trained_state(
        self, adapter_name: str, state: dict[str, torch.Tensor], where: object = "the given state"
    ) -> None:
        """Set ``adapter_name``'s state from ``state``, the inverse of
        [`trained_state`][popup_adapter.PopupModel.trained_state].

        Args:
            adapter_name: whose state to set.
            state: every tensor [`trained_state`][popup_adapter.PopupModel.trained_state] names,
                each with its shape.
            where: named in the error messages (a file).

        Raises:
            ArtifactError: a tensor is missing or unexpected, of another shape, of a dtype it
                cannot be stored in exactly, or BatchNorm statistics that are not finite or a
                negative variance (checked for every tensor before any is set).
        """
        target = self.trained_state(adapter_name)
        if set(target) != set(state):
            missing, unexpected = sorted(set(target) - set(state)), sorted(set(state) - set(target))
            raise ArtifactError(
                f"{where}: stored tensors do not fit this model (missing "
                f"{missing[:5]}, unexpected {unexpected[:5]})"
            )
        for key, value in state.items():
            problem = stored_state_problem(key, value, target[key])
            if problem:
                raise ArtifactError(f"{where}: {key} {problem}; the file is corrupted")
        with torch.no_grad():
            for key, value in state.items():
                target[key].copy_(value)

    def set_trainable(self, is_trainable: bool, adapter_name: str | None = None) -> None:
        """Freeze or unfreeze an adapter's trainable tensors (scores, ``modules_to_save``
        copies, trained norms); freezing also puts the model in eval mode. A served adapter
        (its mask bit-packed) gets the scores a loaded mask trains from.

        Args:
            is_trainable: True to train, False for inference.
            adapter_name: whose (default: the active adapter; only the active one trains).
        """
        adapter_name = adapter_name or self.active_adapter
        if is_trainable:
            self.unmerge_adapter()
            with torch.no_grad():
                for _, layer in self._masked_layers():
                    if layer.is_served(adapter_name):
                        layer.load_mask(adapter_name, layer.get_mask(adapter_name))
        if adapter_name == self.active_adapter:
            for key, value in self.named_parameters():
                if adapter_parameter_owner(key) == adapter_name:
                    value.requires_grad_(is_trainable)
            for _, module in self._trained_norms():
                module.requires_grad_(is_trainable)
        if not is_trainable:
            self.eval()

    def add_adapter(
        self,
        adapter_name: str,
        config: PopupConfig,
        *,
        draw_scores: bool = True,
        targets: list[MaskTarget] | None = None,
    ) -> None:
        """Add a further mask over the same backbone; it does not become active by itself.

        Args:
            adapter_name: a new name.
            config: its config; the base-defining fields (init, seed, scale_fan, norm policy),
                the targets and ``modules_to_save`` must be the backbone's.
            draw_scores: False leaves the scores at zero (a broadcast view, holding no memory),
                for a mask loaded right after.
            targets: the tensors it masks, when known (an artifact's own list): then
                ``config``'s selectors are not matched again (an artifact's regexes never run).

        Raises:
            AdapterError: the name exists, or the config needs another base or other targets.
        """
        if adapter_name in self.peft_config:
            raise AdapterError(f"adapter {adapter_name!r} exists already; delete_adapter it first")
        self.unmerge_adapter()
        first = self._backbone_config
        if config.redraw_every or first.redraw_every:
            raise AdapterError(
                f"cannot add adapter {adapter_name!r}: IteRand (redraw_every) changes the base "
                "weights its adapter searches over, so its backbone carries no other adapter; "
                "build a separate model for each"
            )
        if config.base_defining() != first.base_defining():
            raise AdapterError(
                f"adapter {adapter_name!r} needs another base ({config.base_defining()}) than "
                f"this backbone's ({first.base_defining()}); masks over one backbone must share "
                "init, seed, scale_fan and the norm policy"
            )
        if targets is None:
            with warnings.catch_warnings():  # the first adapter's resolution warned already
                warnings.simplefilter("ignore")
                targets = resolve_targets(self.unload_view(), config)
        if targets != self.targets or (config.modules_to_save or []) != (
            first.modules_to_save or []
        ):
            raise AdapterError(
                f"adapter {adapter_name!r} must mask the same layers and save the "
                "same modules as the others on this backbone"
            )
        self._add_scores(adapter_name, config, draw_scores)
        initial = dict(self._initial_norms)
        for name, bn in self._batchnorms():
            initial.update(initial_batchnorm_stats(bn, name))
        self._bank.add(adapter_name, initial, self._shared_tensors())
        self._set_requires_grad()

    def set_adapter(self, adapter_name: str) -> None:
        """Make ``adapter_name`` the mask the forward pass uses, with its BatchNorm statistics,
        trained norms and ``modules_to_save``; only its scores train.

        Args:
            adapter_name: an existing adapter.

        Raises:
            AdapterError: no such adapter.
        """
        self._check_adapter(adapter_name)
        previous = self.active_adapter
        if previous != adapter_name:
            self.unmerge_adapter()
        if previous != adapter_name and previous in self.peft_config:
            self._bank.switch(previous, adapter_name, self._shared_tensors())
        self.active_adapter = adapter_name
        for module in self._wrappers():
            module.set_adapter(adapter_name)
        self._set_requires_grad()

    def delete_adapter(self, adapter_name: str) -> None:
        """Remove a mask and everything it owns; deleting the active one activates the first
        remaining adapter, with that adapter's statistics and norms.

        Args:
            adapter_name: an existing adapter.

        Raises:
            AdapterError: no such adapter, or it is the only one (``unload()`` gives the plain
                model).
        """
        self._check_adapter(adapter_name)
        if len(self.peft_config) == 1:
            raise AdapterError(
                "cannot delete the only adapter; use unload() to get the plain model"
            )
        self.unmerge_adapter()
        del self.peft_config[adapter_name]
        self._budgets.pop(adapter_name, None)
        for module in self._wrappers():
            module.delete_adapter(adapter_name)
        if adapter_name == self.active_adapter:
            successor = next(iter(self.peft_config))
            self._bank.switch(None, successor, self._shared_tensors())  # the deleted one's go
            self.active_adapter = None
            self.set_adapter(successor)
        else:
            self._bank.remove(adapter_name)

    def serve_adapter(self, adapter_name: str | None = None) -> None:
        """Hold an adapter's masks bit-packed and drop its scores: 1 bit per masked weight
        instead of a float score, for an adapter done training that stays on the backbone
        (a finished task). It computes exactly what it computed; training it again
        (``set_trainable(True, name)``) starts from its mask's loaded scores, not the trained
        ones, so save it first if those matter.

        Args:
            adapter_name: whose (default: the active adapter).

        Raises:
            AdapterError: no such adapter, or it is mid-ramp (its mask is not final).
        """
        adapter_name = adapter_name or self.active_adapter
        self._check_adapter(adapter_name)
        self._check_final(adapter_name)
        with torch.no_grad():
            for _, layer in self._masked_layers():
                if not layer.is_served(adapter_name):
                    layer.serve_mask(adapter_name, layer.get_mask(adapter_name))

    def adapter_nbytes(self, adapter_name: str | None = None) -> int:
        """The memory an adapter holds of its own: its scores (float, while it trains) or
        packed masks (served, or merged), its ``modules_to_save`` copies, BatchNorm
        statistics and trained norms. The shared backbone is not counted.

        Args:
            adapter_name: whose (default: the active adapter).

        Returns:
            Bytes.
        """
        adapter_name = adapter_name or self.active_adapter
        total = sum(t.nbytes for t in self.trained_state(adapter_name).values())
        for _, layer in self._masked_layers():
            scores = layer.popup_scores.get(adapter_name)
            total += layer.popup_masks.nbytes(adapter_name)
            total += 0 if scores is None else scores.numel() * scores.element_size()
        return total

    def _check_final(self, adapter_name: str) -> None:
        budget = self._budgets.get(adapter_name)
        if budget is not None and budget.density != budget.k:
            raise AdapterError(
                f"adapter {adapter_name!r} is mid-ramp (step {budget.step}, keeping "
                f"{budget.density:.3f} rather than k={budget.k}); its final mask comes at the "
                "ramp's end: train past ramp_steps, or call model.update_search(None) to end it"
            )

    @contextlib.contextmanager
    def mixed_batch(self, adapter_names: Sequence[str]) -> Iterator[None]:
        """Inside this block, the forward runs sample ``i`` of each batch through adapter
        ``adapter_names[i]``: its mask, BatchNorm statistics, trained norms and
        ``modules_to_save`` (``"__base__"``: the backbone as ``disable_adapter()`` runs it).

        Each adapter's samples go through every masked layer as one group, so the outputs are
        exactly what each group gives alone after ``set_adapter``, at one ``W * M`` per
        adapter and layer. ``model(x, adapter_names=...)`` and ``generate`` use it; so can any
        call that reaches the model's forward (a pipeline's). Inference only, as in PEFT.

        Args:
            adapter_names: one adapter name per sample.

        Yields:
            Nothing; the active adapter computes alone again after the block.

        Raises:
            AdapterError: training mode, an unknown name, or an expert bank (its inputs are
                tokens, not samples); inside the block, a module whose input is not one row
                per sample, or whose weight is read from outside it.
        """
        self._check_routable(adapter_names, "adapter_names")
        routing = SampleRouting(adapter_names)
        with self._routed(lambda name: Route(routing, name), [a for a, _ in routing.groups]):
            yield

    @contextlib.contextmanager
    def superposed(self, adapters: Sequence[str], alphas: torch.Tensor) -> Iterator[None]:
        """Inside this block, the forward runs every sample through SupSup's superposition of
        ``adapters``: each masked layer with ``W * sum_i alphas[i] M_i``, each module that
        holds something per adapter (BatchNorm statistics, norms, ``modules_to_save``) as
        ``sum_i alphas[i] f_i(x)``. Differentiable in ``alphas``: task inference
        (`popup_adapter.task_inference`) reads the output entropy's gradient there.

        Args:
            adapters: the adapters to superpose.
            alphas: one mixing weight per adapter (a tensor that may require grad).

        Yields:
            Nothing; the active adapter computes alone again after the block.

        Raises:
            AdapterError: training mode, an unknown adapter, an expert bank, or not one
                weight per adapter.
        """
        if alphas.shape != (len(adapters),):
            raise AdapterError(
                f"alphas of shape {tuple(alphas.shape)} for {len(adapters)} adapters; give "
                "one mixing weight per adapter"
            )
        self._check_routable(adapters, "a superposition")
        adapters = tuple(adapters)
        with self._routed(lambda name: Superposition(adapters, alphas, name), adapters):
            yield

    def _check_routable(self, adapter_names: Sequence[str], what: str) -> None:
        if self.training:
            raise AdapterError(
                f"{what} is for inference (as in PEFT): call model.eval() first; train "
                "each adapter on its own batches after set_adapter()"
            )
        unknown = sorted(set(adapter_names) - set(self.peft_config) - {BASE_ADAPTER})
        if unknown:
            raise AdapterError(
                f"unknown adapter(s) {unknown} in {what}; this model has "
                f"{sorted(self.peft_config)}, and {BASE_ADAPTER!r} runs the plain backbone"
            )
        if any(isinstance(layer.base_layer, PopupLayer) for _, layer in self._masked_layers()):
            raise AdapterError(
                f"{what} does not cover expert banks (their inputs are routed tokens, not "
                "samples); run each adapter's samples after set_adapter()"
            )

    @contextlib.contextmanager
    def _routed(self, route_for: Any, adapters: Sequence[str]) -> Iterator[None]:
        """Every module that holds something per adapter takes ``route_for(its name)`` for
        the block: the wrappers as their ``popup_route``, the modules holding the bank's
        values (`routed_tensors`) through their forward."""
        self.unmerge_adapter()  # every adapter's W * M is written from the base W
        with contextlib.ExitStack() as stack:
            for name, module in self.base_model.named_modules():
                if is_wrapper(module):
                    module.popup_route = route_for(base_name(name) or type(module).__name__)
                    stack.callback(setattr, module, "popup_route", None)
            for name, module, values in self._per_adapter_values(adapters):
                stack.enter_context(routed_tensors(module, route_for(name), values))
            yield

    def _per_adapter_values(self, adapters: Sequence[str]) -> list[tuple[str, nn.Module, Any]]:
        """For a routed batch: every module holding values of the `AdapterBank` (BatchNorm
        statistics, trained norms), and the values each routed adapter computes with."""
        stored = {
            adapter: self._bank.stored(adapter)
            for adapter in adapters
            if adapter not in (self.active_adapter, BASE_ADAPTER)
        }
        modules = dict(self._base_modules())
        leaves: dict[str, list[str]] = {}
        for key in self._shared_tensors():
            prefix, leaf = key.rsplit(".", 1)
            leaves.setdefault(prefix, []).append(leaf)

        def values_of(prefix: str) -> Any:
            def values(adapter: str) -> dict[str, torch.Tensor]:
                state = stored.get(adapter)  # the active adapter and the base: the live ones
                if state is None:
                    return {}
                return {leaf: state[f"{prefix}.{leaf}"] for leaf in leaves[prefix]}

            return values

        return [(prefix, modules[prefix], values_of(prefix)) for prefix in leaves]

    def update_search(self, step: int | None) -> None:
        """Tell the masks how far training is: ``step`` optimizer steps done. Moves the
        density ramp of adapters with ``ramp_steps`` (`popup_adapter.budget`), and runs
        IteRand's redraws when ``step`` is a multiple of ``redraw_every``
        (`popup_adapter.redraws`). The shared training loop calls it before every step
        (gradient accumulation: before every micro-batch, which is harmless); a loop of your
        own should too.

        Args:
            step: optimizer steps done, or None when training is over (the ramp ends).
        """
        for budget in self._budgets.values():
            budget.step = step
        config = self.peft_config[self.active_adapter]
        every = config.redraw_every
        if every and step and step % every == 0 and step != self._redrawn_at:
            self.unmerge_adapter()
            for target, layer in self._masked_layers():
                redraw_pruned(layer, config, target.parameter_path, step // every)
            self._redrawn_at = step  # once, however often this step is reported

    @contextlib.contextmanager
    def disable_adapter(self) -> Iterator[None]:
        """Run the dense random (or pretrained) base, every weight used, inside this block.

        Yields:
            Nothing; the block runs with every layer's full base weight, and the active
            adapter comes back after it.
        """
        self.unmerge_adapter()
        wrappers = self._wrappers()
        for module in wrappers:
            module.disable_adapters = True
        try:
            yield
        finally:
            for module in wrappers:
                module.disable_adapters = False

    def batchnorm_stats(self, adapter_name: str | None = None) -> dict[str, torch.Tensor]:
        """The BatchNorm running statistics of an adapter.

        Args:
            adapter_name: whose (default: the active adapter).

        Returns:
            ``{"<bn name>.running_mean": tensor, ...}`` (``running_var`` and
            ``num_batches_tracked`` too), live views as in
            [`trained_state`][popup_adapter.PopupModel.trained_state].
        """
        adapter_name = adapter_name or self.active_adapter
        self._check_adapter(adapter_name)
        state = self._adapter_values(adapter_name)
        return {k: v for k, v in state.items() if k.rsplit(".", 1)[-1] in BATCHNORM_STATS}

    def _wrappers(self) -> list[nn.Module]:
        """Every masked layer and saved module, each once."""
        return [module for module in self.base_model.modules() if is_wrapper(module)]

    def _set_requires_grad(self) -> None:
        config = self._backbone_config
        for module in self.base_model.modules():
            if is_norm_module(module) and config.train_norms:
                for param in module.parameters(recurse=False):
                    param.requires_grad_(True)

    def _norm_parameters(self) -> dict[str, torch.Tensor]:
        return {
            f"{name}.{leaf}": param
            for name, module in self._trained_norms()
            for leaf, param in module.named_parameters(recurse=False)
        }

    def _shared_tensors(self) -> dict[str, torch.Tensor]:
        """The live tensors every adapter has its own values of (see `AdapterBank`)."""
        shared = self._norm_parameters()
        for name, bn in self._batchnorms():
            shared.update({f"{name}.{stat}": getattr(bn, stat) for stat in BATCHNORM_STATS})
        return shared

    def _batchnorms(self) -> list[tuple[str, nn.Module]]:
        return [
            (name, module)
            for name, module in self._base_modules()
            if isinstance(module, nn.modules.batchnorm._BatchNorm) and module.track_running_stats
        ]

    def _check_adapter(self, adapter_name: str | None) -> None:
        if adapter_name not in self.peft_config:
            raise AdapterError(
                f"unknown adapter {adapter_name!r}; this model has {sorted(self.peft_config)}"
            )

    def base_state(self) -> dict[str, torch.Tensor]:
        """The frozen random (or pretrained) base: every tensor an artifact does not store.

        Returns:
            ``{plain-model name: tensor}``, without BatchNorm statistics, ``modules_to_save``
            and trained norms (trained, so stored).
        """
        self.unmerge_adapter()
        stored = self._trained_roots()
        state = {}
        # IteRand's redrawn weights are the mask's: the base is the seed's (see redraws.py)
        seed_values = seed_weight_values(
            ((t.parameter_path, layer) for t, layer in self._masked_layers()), self._backbone_config
        )
        for name, tensor in self.base_model.state_dict(keep_vars=True).items():
            if ".popup_scores." in name or ".modules_to_save." in name or name.endswith(REDRAWS):
                continue
            plain = base_name(name)
            if (
                not is_inside(plain.rsplit(".", 1)[0], stored)
                and plain.rsplit(".", 1)[-1] not in BATCHNORM_STATS
            ):
                state[plain] = seed_values.get(plain, tensor.detach())
        return state

    def unload_view(self) -> nn.Module:
        """A shallow view of the plain model's module tree, wrappers replaced by what they
        wrap (parameters shared), for matching targets.

        Returns:
            The view (its modules are the plain model's; do not train it).
        """
        return unwrapped_view(self.base_model)

    def _add_scores(self, adapter_name: str, config: PopupConfig, draw_scores: bool) -> None:
        if adapter_name == BASE_ADAPTER:
            raise AdapterError(
                f"{BASE_ADAPTER!r} names the plain backbone in mixed batches "
                "(adapter_names); give the adapter another name"
            )
        layers = [layer for _, layer in self._masked_layers()]
        if config.selection == "global" and any(layer.per_expert for layer in layers):
            raise ConfigError(
                "selection='global' does not cover expert banks (each expert keeps its own "
                "top-k); use selection='per_layer' for a mixture-of-experts model"
            )
        self.peft_config[adapter_name] = config
        for target, layer in self._masked_layers():
            weight = layer.base_weight
            if not draw_scores:  # zeros as a broadcast view: no memory until a mask is loaded
                scores = torch.zeros(()).expand(weight.shape)
            elif config.score_init == "magnitude":
                scores = weight.detach().abs().float().clone()
            else:
                scores = score_values(
                    config.seed, target.parameter_path, weight.shape, layer.fan_in
                )
            layer.update_layer(adapter_name, config.k, scores, config.method == "biprop")
            if config.redraw_every:
                add_redraw_counts(layer)
        if config.selection == "global" or config.ramp_steps:
            self._budgets[adapter_name] = KeptBudget(adapter_name, config, layers)
        for module in self.base_model.modules():
            if isinstance(module, ModulesToSaveWrapper):
                module.update(adapter_name)
