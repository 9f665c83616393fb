"""How a whole model is adapted: walk it, match targets, draw the base from the seed, inject.

``PopupModel`` wraps any ``nn.Module`` (timm, transformers or plain) the way PEFT's
``PeftModel`` does: attributes it does not have read through to the wrapped model, so
``.config``, ``.pretrained_cfg`` and ``generate`` keep working.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from typing import Any

import torch
from torch import nn

from .adapters import AdapterBank
from .base import seed_base
from .budget import KeptBudget
from .config import PopupConfig
from .errors import AdapterError, AlreadyAdaptedError
from .injection import base_name, inject_wrappers, is_wrapper, tied_parameter_ids
from .layers import PopupLayer
from .merging import MergeMixin
from .multi_adapter import MultiAdapterMixin
from .pretrained import PretrainedMixin
from .seeding import fingerprint
from .sharding import whole_tensor
from .sign_bits import pack_parameter, unpack_parameter
from .specs import build_base, describe_base
from .structure import describe_structure
from .targets import (
    Coverage,
    MaskTarget,
    check_stored_targets,
    matrix_coverage,
    resolve_targets,
    warn_unmasked,
)
from .task_inference import AdapterInference, infer_adapter


def get_popup_model(
    model: nn.Module,
    config: PopupConfig | None = None,
    adapter_name: str = "default",
    *,
    base_kwargs: dict[str, Any] | None = None,
    **overrides: Any,
) -> PopupModel:
    """Adapt ``model`` for edge-popup: wrap its layers with scores and reset its base from the seed.

    ``get_popup_model(timm.create_model("resnet50"), k=0.3)`` is the whole call.

    Args:
        model: any timm, transformers or plain ``nn.Module``; changed in place (its weights
            are redrawn from the seed, its layers wrapped).
        config: a [`PopupConfig`][popup_adapter.PopupConfig] (default: one from ``overrides``).
        adapter_name: the name of this first mask.
        base_kwargs: constructor arguments of a timm model that cannot be read back from the
            built model (e.g. ``{"act_layer": "gelu", "output_stride": 16}``): stored in the
            artifact, they rebuild the same network at load time.
        **overrides: fields of [`PopupConfig`][popup_adapter.PopupConfig] (``k=0.3``, ``init=...``),
            on top of ``config``.

    Returns:
        The [`PopupModel`][popup_adapter.PopupModel], its first adapter active and trainable.

    Raises:
        ConfigError: a config field has an impossible value.
        TargetModulesError: ``target_modules`` / ``exclude_modules`` match nothing or a
            module that cannot be masked.
        AlreadyAdaptedError: ``model`` already carries popup layers.
        AdapterError: ``model`` carries PEFT adapters (merge them first, or add them on top
            of the merged mask).
    """
    if config is None:
        config = PopupConfig(**overrides)
    elif overrides:
        config = PopupConfig(**{**config.to_dict(), **overrides})
    return PopupModel(model, config, adapter_name, base_kwargs=base_kwargs)


class PopupModel(MultiAdapterMixin, MergeMixin, PretrainedMixin, nn.Module):
    """A model whose Linear/Conv layers use ``W * M``, M chosen by learned scores.

    The random base is drawn from ``config.seed`` when the model is built (see
    `popup_adapter.seeding`); only the scores (and ``modules_to_save``, and the norms with
    ``train_norms``) train. Several adapters can share one backbone: each has its own scores,
    its own BatchNorm running statistics and its own ``modules_to_save``.
    """

    def __init__(
        self,
        model: nn.Module,
        config: PopupConfig,
        adapter_name: str = "default",
        *,
        draw_scores: bool = True,
        base_kwargs: dict[str, Any] | None = None,
        targets: list[MaskTarget] | None = None,
        on_seeded: Callable[[str, torch.Tensor], None] | None = None,
    ):
        """``draw_scores=False`` leaves the scores at zero instead of drawing them from the seed,
        for a caller that sets them right away (loading a saved mask); ``targets`` masks exactly
        these tensors instead of resolving ``config``'s selectors (an artifact's own list, so
        that it loads the same under later default rules); ``base_kwargs`` as in
        [`get_popup_model`][popup_adapter.get_popup_model].

        Args:
            model: the plain model, changed in place.
            config: the first adapter's config.
            adapter_name: the first adapter's name.
            draw_scores: False to leave the scores at zero (a broadcast view, holding no
                memory, until a mask is loaded).
            base_kwargs: timm constructor arguments to record.
            targets: the tensors to mask, instead of resolving ``config``'s selectors.
            on_seeded: told each base parameter once the seed set it (`seed_base`'s
                ``on_set``: a load fingerprints the base beside its seeding).

        Raises:
            AlreadyAdaptedError: ``model`` already carries popup layers.
            AdapterError: ``model`` carries PEFT adapters (merge them first).
            TargetModulesError: the selectors match nothing, or something that cannot be masked.
            BaseMismatchError: ``targets`` names tensors the model lacks.
        """
        super().__init__()
        if isinstance(model, PopupModel) or any(is_wrapper(m) for m in model.modules()):
            raise AlreadyAdaptedError(
                "this model already carries popup layers; add a further mask with "
                "model.add_adapter(name, config) instead of adapting it again"
            )
        if any(type(m).__module__.startswith("peft.") for m in model.modules()):
            raise AdapterError(
                "this model carries PEFT adapters (LoRA, IA3, ...): a mask over them would "
                "mask their small matrices and a base that changes with them. Merge them "
                "first (model.merge_and_unload()), or mask the base and add PEFT on top of the "
                "merged mask: get_peft_model(get_popup_model(base, ...).merge_and_unload(), ...)"
            )
        self.base_model = model
        #: how to rebuild this architecture from an artifact (see popup_adapter.specs)
        self.base_spec = describe_base(model, base_kwargs)
        #: what computes with the base weights (see popup_adapter.structure.describe_structure)
        self.base_structure = describe_structure(model)
        self.peft_config: dict[str, PopupConfig] = {}
        self.active_adapter = adapter_name
        #: every inactive adapter's BatchNorm statistics (and trained norms)
        self._bank = AdapterBank()
        #: the base's fingerprint while an adapter is merged into its weights (merge_adapter)
        self._merged_fingerprint: str | None = None
        #: per adapter with global top-k or a density ramp, its kept counts (popup_adapter.budget)
        self._budgets: dict[str, KeptBudget] = {}
        #: the last step IteRand redrew at (update_search)
        self._redrawn_at: int | None = None

        if targets is not None:
            check_stored_targets(model, targets, config.modules_to_save or [], "the artifact")
        #: the masked tensors, in the plain model's module order
        self.targets: list[MaskTarget] = targets or resolve_targets(model, config)
        #: the share of the model's matrix weights that the masks cover
        self.coverage: Coverage = matrix_coverage(model, self.targets, config.modules_to_save or [])
        if targets is None and config.target_modules is None and config.exclude_modules is None:
            warn_unmasked(self.coverage)
        rebuildable = self.base_spec["library"] != "custom"
        seed_base(
            model,
            config,
            (target.parameter_path for target in self.targets),
            reference=(lambda: build_base(self.base_spec)) if rebuildable else None,
            on_set=on_seeded,
        )
        inject_wrappers(model, self.targets, config.modules_to_save or [])
        self._add_scores(adapter_name, config, draw_scores)
        #: the trained norms' values before any training: where a new adapter's start
        self._initial_norms = {k: v.detach().clone() for k, v in self._norm_parameters().items()}
        self.set_adapter(adapter_name)

    # -- pass-through, as PeftModel does
    def __getattr__(self, name: str):
        try:
            return super().__getattr__(name)
        except AttributeError:
            if name == "base_model":
                raise
            return getattr(self.base_model, name)

    def forward(self, *args: Any, adapter_names: Sequence[str] | None = None, **kwargs: Any) -> Any:
        """The wrapped model's forward, with every masked layer using ``W * M``.

        Args:
            *args: the wrapped model's own inputs.
            adapter_names: one adapter per sample, for a mixed batch (inference only; see
                [`mixed_batch`][popup_adapter.PopupModel.mixed_batch]); default: the active
                adapter for every sample.
            **kwargs: the wrapped model's own inputs.

        Returns:
            What the wrapped model returns.
        """
        if adapter_names is None:
            return self.base_model(*args, **kwargs)
        with self.mixed_batch(adapter_names):
            return self.base_model(*args, **kwargs)

    def generate(
        self, *args: Any, adapter_names: Sequence[str] | None = None, **kwargs: Any
    ) -> Any:
        """The wrapped model's ``generate`` (transformers), each sequence through its own
        adapter with ``adapter_names`` (one per sequence; beams and sampled copies multiply the
        batch, so a mixed batch takes ``num_beams=1``, ``num_return_sequences=1``).

        Args:
            *args: ``generate``'s own inputs.
            adapter_names: one adapter per sequence, as in
                [`forward`][popup_adapter.PopupModel.forward].
            **kwargs: ``generate``'s own inputs.

        Returns:
            What ``generate`` returns.
        """
        if adapter_names is None:
            return self.base_model.generate(*args, **kwargs)
        with self.mixed_batch(adapter_names):
            return self.base_model.generate(*args, **kwargs)

    def infer_adapter(
        self, x: Any, candidates: Sequence[str] | None = None, rule: str = "one_shot"
    ) -> AdapterInference:
        """The adapter an unlabelled batch most likely belongs to, by SupSup's rules
        (`popup_adapter.task_inference`): ``"one_shot"`` (the output entropy's gradient with
        respect to the superposed masks' mixing weights: 1 forward + 1 backward pass),
        ``"binary"`` (its halving refinement: ``ceil(log2 n)`` of those) or ``"entropy"``
        (each candidate run alone, the lowest entropy: ``n`` forward passes).

        Args:
            x: the batch, as the model takes it (a tensor, or a mapping of keyword inputs).
            candidates: the adapters to choose from (default: all).
            rule: ``"one_shot"``, ``"binary"`` or ``"entropy"``.

        Returns:
            The `AdapterInference`: the adapter, a confidence, every candidate's score and
            the passes run.

        Raises:
            AdapterError: an unknown rule or candidate, or training mode.
        """
        return infer_adapter(self, x, candidates, rule)

    # -- how the base is held
    def pack_base(self) -> PopupModel:
        """Hold every masked base weight as one sign bit per weight and one constant per
        layer (`popup_adapter.sign_bits`): 1/32 of its float32 memory, so that a search
        holds less than dense training (scores, their gradient and the optimizer's state
        against the weight, its gradient and that state). Outputs, gradients, masks,
        ``state_dict`` (float weights), fingerprints and artifacts are unchanged, bit for
        bit: the fused kernels read the bits, every other operation their floats. A weight
        tied to another module keeps its floats.

        Returns:
            This model.

        Raises:
            AdapterError: the base is not ``init="signed_constant"`` (other inits are not one
                magnitude per layer), IteRand redraws into it, an adapter is merged, or the
                weights are sharded (FSDP).
        """
        config = self._backbone_config
        if config.init != "signed_constant":
            raise AdapterError(
                f"pack_base holds a signed-constant base (+-c per layer) as sign bits; this "
                f"base is init={config.init!r}, whose weights need their floats"
            )
        if any(c.redraw_every for c in self.peft_config.values()):
            raise AdapterError("IteRand (redraw_every) writes into the base; it cannot be packed")
        if self.merged:
            raise AdapterError("an adapter is merged into the base; unmerge_adapter() first")
        tied = tied_parameter_ids(self.base_model)
        for _, layer in self._masked_layers():
            weight = layer.base_weight
            if whole_tensor(weight) is not weight:
                raise AdapterError("a sharded (FSDP) base is not packed; pack before sharding")
            if id(weight) not in tied:
                pack_parameter(layer.owner, layer.parameter_name)
        return self

    def unpack_base(self) -> PopupModel:
        """Undo [`pack_base`][popup_adapter.PopupModel.pack_base]: float weights again (for
        code that writes into the base, or reads its storage directly).

        Returns:
            This model.
        """
        for _, layer in self._masked_layers():
            unpack_parameter(layer.owner, layer.parameter_name)
        return self

    # -- inspection
    def popup_layers(self) -> Iterator[tuple[str, PopupLayer]]:
        """Every masked tensor's layer.

        Yields:
            ``(name, layer)``, named as `MaskTarget.key`: the plain model's module name
            for a layer's ``weight``, ``module.parameter`` otherwise (an expert bank). A module
            reachable under several names appears once.
        """
        for target, layer in self._masked_layers():
            yield target.key, layer

    def _masked_layers(self) -> Iterator[tuple[MaskTarget, PopupLayer]]:
        for name, module in self.base_model.named_modules():
            if isinstance(module, PopupLayer):
                yield MaskTarget(base_name(name), module.parameter_name), module

    def get_masks(self, adapter_name: str | None = None) -> dict[str, torch.Tensor]:
        """The current masks of an adapter.

        Args:
            adapter_name: whose (default: the active adapter).

        Returns:
            ``{tensor name: bool mask shaped like it}``, named as
            [`popup_layers`][popup_adapter.PopupModel.popup_layers] names them.
        """
        adapter_name = adapter_name or self.active_adapter
        self._check_adapter(adapter_name)
        with torch.no_grad():
            return {name: layer.get_mask(adapter_name) for name, layer in self.popup_layers()}

    def get_nb_trainable_parameters(self) -> tuple[int, int]:
        """The parameter counts PEFT's summary prints.

        Returns:
            ``(trainable, total)``, shared parameters counted once.
        """
        params = list(self.parameters())
        return sum(p.numel() for p in params if p.requires_grad), sum(p.numel() for p in params)

    def print_trainable_parameters(self) -> None:
        """Print PEFT's one-line summary of trainable and total parameters, and the share of
        the model's matrix weights that the masks cover."""
        trainable, total = self.get_nb_trainable_parameters()
        print(
            f"trainable params: {trainable:,d} || all params: {total:,d} || "
            f"trainable%: {100 * trainable / total:.4f} || "
            f"masked matrix weights%: {100 * self.coverage.share:.2f}"
        )

    @property
    def base_fingerprint(self) -> str:
        """sha256 of [`base_state`][popup_adapter.PopupModel.base_state]: what a mask must be loaded
        back onto (sharded tensors are gathered whole: under FSDP every process must ask).

        Returns:
            64 hex digits.
        """
        if self._merged_fingerprint is not None:  # the weights hold W * M now
            return self._merged_fingerprint
        return fingerprint((name, whole_tensor(t)) for name, t in self.base_state().items())
