"""How a whole model is adapted: walk it, match targets, draw the base from the seed, inject.

``PopupModel`` wraps any ``nn.Module`` (timm, transformers or plain) the way PEFT's
``PeftModel`` does: attributes it does not have read through to the wrapped model, so
``.config``, ``.pretrained_cfg`` and ``generate`` keep working.
"""

from __future__ import annotations

import contextlib
import copy
import os
import re
import warnings
from collections import defaultdict
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
from torch import nn

from .adapters import (
    BATCHNORM_STATS,
    AdapterBank,
    ModulesToSaveWrapper,
    adapter_parameter_owner,
    initial_batchnorm_stats,
)
from .base import describe_structure, is_inside, is_norm_module, seed_base
from .config import PopupConfig
from .errors import AdapterError, AlreadyAdaptedError, ArtifactError, BaseMismatchError
from .layers import PopupLayer, create_popup_layer, whole_tensor
from .seeding import fingerprint, score_values
from .specs import build_base, describe_base
from .targets import (
    Coverage,
    MaskTarget,
    check_stored_targets,
    matrix_coverage,
    module_aliases,
    resolve_targets,
    warn_unmasked,
)

#: path segments that wrappers insert; removed to recover the base model's own names
_WRAPPER_SEGMENTS = re.compile(r"\.(base_layer|original_module)(?=\.|$)")


def base_name(name: str) -> str:
    """A name in the adapted model mapped back to the name it had in the plain model."""
    return _WRAPPER_SEGMENTS.sub("", name)


def get_popup_model(
    model: nn.Module,
    config: PopupConfig | None = None,
    adapter_name: str = "default",
    *,
    base_kwargs: dict[str, Any] | None = None,
    **overrides,
) -> PopupModel:
    """Adapt ``model`` for edge-popup: wrap its layers with scores and reset its base from the seed.

    ``get_popup_model(timm.create_model("resnet50"), k=0.3)`` is the whole call; keyword
    arguments override the fields of ``config`` (a :class:`PopupConfig`). ``base_kwargs`` are
    constructor arguments of a timm model that cannot be read back from the built model (e.g.
    ``{"act_layer": "gelu", "output_stride": 16}``): stored in the artifact, they rebuild the
    same network at load time.
    """
    if config is None:
        config = PopupConfig(**overrides)
    elif overrides:
        config = PopupConfig(**{**config.to_dict(), **overrides})
    return PopupModel(model, config, adapter_name, base_kwargs=base_kwargs)


class PopupModel(nn.Module):
    """A model whose Linear/Conv layers use ``W * M``, M chosen by learned scores.

    The random base is drawn from ``config.seed`` when the model is built (see
    :mod:`popup_adapter.seeding`); only the scores (and ``modules_to_save``, and the norms with
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
    ):
        """``draw_scores=False`` leaves the scores at zero instead of drawing them from the seed,
        for a caller that sets them right away (loading a saved mask); ``targets`` masks exactly
        these tensors instead of resolving ``config``'s selectors (an artifact's own list, so
        that it loads the same under later default rules); ``base_kwargs`` as in
        :func:`get_popup_model`."""
        super().__init__()
        if isinstance(model, PopupModel) or any(
            isinstance(m, (PopupLayer, ModulesToSaveWrapper)) for m in model.modules()
        ):
            raise AlreadyAdaptedError(
                "this model already carries popup layers; add a further mask with "
                "model.add_adapter(name, config) instead of adapting it again"
            )
        self.base_model = model
        #: how to rebuild this architecture from an artifact (see popup_adapter.specs)
        self.base_spec = describe_base(model, base_kwargs)
        #: what computes with the base weights (see popup_adapter.base.describe_structure)
        self.base_structure = describe_structure(model)
        self.peft_config: dict[str, PopupConfig] = {}
        self.active_adapter = adapter_name
        #: every inactive adapter's BatchNorm statistics (and trained norms)
        self._bank = AdapterBank(self._shared_tensors)

        if targets is not None:
            check_stored_targets(model, targets, "the artifact")
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
        )
        _inject(model, self.targets, config.modules_to_save or [])
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

    def forward(self, *args, **kwargs):
        """The wrapped model's forward, with every masked layer using ``W * M``."""
        return self.base_model(*args, **kwargs)

    # -- inspection
    def popup_layers(self) -> Iterator[tuple[str, PopupLayer]]:
        """``(name, layer)`` for every masked tensor, named as :attr:`MaskTarget.key`: the
        plain model's module name for a layer's ``weight``, ``module.parameter`` otherwise (an
        expert bank). A module reachable under several names appears once."""
        for target, layer in self._masked_layers():
            yield target.key, layer

    def _masked_layers(self) -> Iterator[tuple[MaskTarget, PopupLayer]]:
        for name, module in self.base_model.named_modules():
            if isinstance(module, PopupLayer):
                yield MaskTarget(base_name(name), module.parameter_name), module

    def get_masks(self, adapter_name: str | None = None) -> dict[str, torch.Tensor]:
        """``{tensor name: bool mask like it}`` for ``adapter_name`` (default: active), named
        as :meth:`popup_layers` names them."""
        adapter_name = adapter_name or self.active_adapter
        self._check_adapter(adapter_name)
        with torch.no_grad():
            return {name: layer.get_mask(adapter_name) for name, layer in self.popup_layers()}

    def get_nb_trainable_parameters(self) -> tuple[int, int]:
        """``(trainable, total)`` parameter counts, shared parameters counted once."""
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

    def base_state(self) -> dict[str, torch.Tensor]:
        """The frozen random (or pretrained) base, by its plain-model names: every tensor an
        artifact does not store. BatchNorm statistics, ``modules_to_save`` and trainable norms
        are trained and stored, so they are left out."""
        stored = self._trained_roots()
        state = {}
        for name, tensor in self.base_model.state_dict(keep_vars=True).items():
            if ".popup_scores." in name or ".modules_to_save." in name:
                continue
            plain = base_name(name)
            if (
                not is_inside(plain.rsplit(".", 1)[0], stored)
                and plain.rsplit(".", 1)[-1] not in BATCHNORM_STATS
            ):
                state[plain] = tensor.detach()
        return state

    @property
    def base_fingerprint(self) -> str:
        """sha256 of :meth:`base_state`: what a mask must be loaded back onto (sharded tensors
        are gathered whole: under FSDP every process must ask)."""
        return fingerprint((name, whole_tensor(t)) for name, t in self.base_state().items())

    @property
    def _backbone_config(self) -> PopupConfig:
        """A config of this backbone: every adapter's agrees on the base, the targets, the
        saved modules and the norm policy (``add_adapter`` checks)."""
        return next(iter(self.peft_config.values()))

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
        """What training changed besides the mask, by plain names: BatchNorm statistics,
        ``modules_to_save`` and trained norms. The tensors are live views: copying into them
        sets the model's state (this is how an artifact is loaded)."""
        adapter_name = adapter_name or self.active_adapter
        self._check_adapter(adapter_name)
        state = self._bank.state(adapter_name, active=adapter_name == self.active_adapter)
        for name, module in self.base_model.named_modules():
            if isinstance(module, ModulesToSaveWrapper):
                copy_ = module.modules_to_save[adapter_name]
                for key, value in copy_.state_dict(keep_vars=True).items():
                    state[f"{base_name(name)}.{key}"] = value
        return {key: value.detach() for key, value in state.items()}

    def load_trained_state(
        self, adapter_name: str, state: dict[str, torch.Tensor], where: object = "the given state"
    ) -> None:
        """Inverse of :meth:`trained_state`; every tensor must be there, with its shape."""
        target = self.trained_state(adapter_name)
        if set(target) != set(state):
            missing, unexpected = sorted(set(target) - set(state)), sorted(set(state) - set(target))
            raise ArtifactError(
                f"{where}: stored tensors do not fit this model (missing "
                f"{missing[:5]}, unexpected {unexpected[:5]})"
            )
        with torch.no_grad():
            for key, value in state.items():
                if value.shape != target[key].shape:
                    raise ArtifactError(
                        f"{where}: {key} has shape {tuple(value.shape)}, the "
                        f"model's is {tuple(target[key].shape)}"
                    )
                target[key].copy_(value)

    # -- artifacts and the Hub
    def save_pretrained(
        self,
        save_directory: str | os.PathLike,
        adapter_name: str | None = None,
        dataset: str | None = None,
        metrics: dict[str, float] | None = None,
    ) -> Path:
        """Save ``adapter_name``'s mask (default: active) as a tiny artifact folder: the base is
        not stored, it comes back from the seed. ``dataset`` and ``metrics`` go into the card."""
        from .artifact import save_artifact

        return save_artifact(self, save_directory, adapter_name, dataset=dataset, metrics=metrics)

    def push_to_hub(
        self,
        repo_id: str,
        private: bool | None = None,
        revision: str | None = None,
        commit_message: str | None = None,
        token: str | None = None,
        adapter_name: str | None = None,
        dataset: str | None = None,
        metrics: dict[str, float] | None = None,
    ):
        """Publish the artifact to the Hugging Face Hub (creating the repo and branch if needed);
        returns huggingface_hub's ``CommitInfo``."""
        from .hub import push_artifact

        return push_artifact(
            self,
            repo_id,
            private=private,
            revision=revision,
            commit_message=commit_message,
            token=token,
            adapter_name=adapter_name,
            dataset=dataset,
            metrics=metrics,
        )

    @classmethod
    def from_pretrained(
        cls,
        path_or_repo_id: str | os.PathLike,
        model: nn.Module | None = None,
        revision: str | None = None,
        adapter_name: str = "default",
        is_trainable: bool = False,
        base_model_name_or_path: str | os.PathLike | None = None,
        check_structure: bool = True,
        **hub_kwargs,
    ) -> PopupModel:
        """Load a mask from a folder or a Hub repo onto its base.

        Without ``model`` the base architecture is rebuilt from the artifact's spec (an
        ``init="keep"`` transformers base is loaded from the pretrained source it records, or
        from ``base_model_name_or_path``). Either way the base is regenerated from the seed, its
        structure and its weight fingerprint are checked
        (:class:`~popup_adapter.BaseMismatchError` names what differs), then the mask is
        applied. ``check_structure=False`` skips the structure check alone (for an artifact
        saved with another timm/transformers version, once you have checked the outputs).
        ``hub_kwargs`` (``token``, ``cache_dir``, ``local_files_only``) go to the download.
        """
        from .artifact import read_artifact
        from .hub import artifact_folder

        artifact = read_artifact(artifact_folder(path_or_repo_id, revision=revision, **hub_kwargs))
        if model is None:
            model = build_base(
                artifact.base_spec,
                pretrained=artifact.config.init == "keep",
                pretrained_source=base_model_name_or_path,
            )
        if check_structure:  # before adapting: its message says more than a missing layer's
            artifact.check_structure(describe_structure(model))
        popup = cls(
            model,
            artifact.config,
            adapter_name,
            draw_scores=False,
            base_kwargs=artifact.base_spec.get("base_kwargs"),
            targets=artifact.targets,
        )
        artifact.load_into(popup, adapter_name, check_structure=False)
        popup.set_trainable(is_trainable)
        return popup

    def load_adapter(
        self,
        path_or_repo_id: str | os.PathLike,
        adapter_name: str,
        revision: str | None = None,
        is_trainable: bool = False,
        **hub_kwargs,
    ) -> None:
        """Load a further mask over this backbone as ``adapter_name`` (not made active)."""
        from .artifact import read_artifact
        from .hub import artifact_folder

        artifact = read_artifact(artifact_folder(path_or_repo_id, revision=revision, **hub_kwargs))
        if artifact.targets != self.targets:
            raise BaseMismatchError(
                f"{path_or_repo_id} masks other tensors than the adapters on this backbone "
                f"({len(artifact.targets)} against {len(self.targets)}); load it with "
                "PopupModel.from_pretrained instead"
            )
        self.add_adapter(adapter_name, artifact.config, draw_scores=False)
        try:
            artifact.load_into(self, adapter_name)
        except Exception:
            self.delete_adapter(adapter_name)
            raise
        self.set_trainable(is_trainable, adapter_name)

    def set_trainable(self, is_trainable: bool, adapter_name: str | None = None) -> None:
        """Freeze (inference: eval mode too) or unfreeze ``adapter_name``'s trainable tensors."""
        adapter_name = adapter_name or self.active_adapter
        if adapter_name == self.active_adapter:
            for key, value in self.named_parameters():
                if adapter_parameter_owner(key) == adapter_name:
                    value.requires_grad_(is_trainable)
            for _, module in self._trained_norms():
                module.requires_grad_(is_trainable)
        if not is_trainable:
            self.eval()

    # -- adapters
    def add_adapter(
        self, adapter_name: str, config: PopupConfig, *, draw_scores: bool = True
    ) -> None:
        """Add a further mask over the same backbone (it does not become active by itself);
        ``draw_scores`` as in the constructor."""
        if adapter_name in self.peft_config:
            raise AdapterError(f"adapter {adapter_name!r} exists already; delete_adapter it first")
        first = next(iter(self.peft_config.values()))
        if config.base_defining() != first.base_defining():
            raise AdapterError(
                f"adapter {adapter_name!r} needs another base ({config.base_defining()}) than "
                f"this backbone's ({first.base_defining()}); masks over one backbone must share "
                "init, seed, scale_fan and the norm policy"
            )
        with warnings.catch_warnings():  # the first adapter's resolution warned already
            warnings.simplefilter("ignore")
            wanted = resolve_targets(self.unload_view(), config)
        if wanted != self.targets or (config.modules_to_save or []) != (
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
        self._bank.add(adapter_name, initial)
        self._set_requires_grad()

    def set_adapter(self, adapter_name: str) -> None:
        """Make ``adapter_name`` the mask (and BatchNorm statistics) the forward pass uses."""
        self._check_adapter(adapter_name)
        previous = self.active_adapter
        if previous != adapter_name and previous in self.peft_config:
            self._bank.switch(previous, adapter_name)
        self.active_adapter = adapter_name
        for module in self.base_model.modules():
            if isinstance(module, (PopupLayer, ModulesToSaveWrapper)):
                module.set_adapter(adapter_name)
        self._set_requires_grad()

    def delete_adapter(self, adapter_name: str) -> None:
        """Remove a mask; deleting the active one activates the first remaining."""
        self._check_adapter(adapter_name)
        if len(self.peft_config) == 1:
            raise AdapterError(
                "cannot delete the only adapter; use unload() to get the plain model"
            )
        del self.peft_config[adapter_name]
        for module in self.base_model.modules():
            if isinstance(module, (PopupLayer, ModulesToSaveWrapper)):
                module.delete_adapter(adapter_name)
        if adapter_name == self.active_adapter:
            successor = next(iter(self.peft_config))
            self._bank.switch(None, successor)  # the deleted adapter's values go with it
            self.active_adapter = None
            self.set_adapter(successor)
        else:
            self._bank.remove(adapter_name)

    @contextlib.contextmanager
    def disable_adapter(self):
        """Run the dense random (or pretrained) base, every weight used, inside this block."""
        wrappers = [
            m
            for m in self.base_model.modules()
            if isinstance(m, (PopupLayer, ModulesToSaveWrapper))
        ]
        for module in wrappers:
            module.disable_adapters = True
        try:
            yield
        finally:
            for module in wrappers:
                module.disable_adapters = False

    def batchnorm_stats(self, adapter_name: str | None = None) -> dict[str, torch.Tensor]:
        """``{"<bn name>.running_mean": ..., ...}`` of ``adapter_name`` (default: active)."""
        adapter_name = adapter_name or self.active_adapter
        self._check_adapter(adapter_name)
        state = self._bank.state(adapter_name, active=adapter_name == self.active_adapter)
        return {k: v for k, v in state.items() if k.rsplit(".", 1)[-1] in BATCHNORM_STATS}

    # -- back to a plain model
    def merge_and_unload(self) -> nn.Module:
        """The plain model with the active mask baked in (``W * M``), giving identical outputs.

        A masked weight that was tied to another module (GPT-2's ``lm_head`` and ``wte``) gets a
        parameter of its own, since only one of the two users was masked; the model's config is
        told (``tie_word_embeddings = False``) so that saving and reloading it keeps them apart.
        """
        tied = _tied_parameter_ids(self.base_model)
        untied = any(id(layer.base_weight) in tied for _, layer in self._masked_layers())
        adapter = self.active_adapter
        self._replace_wrappers(
            lambda module: (
                module.merged_base_layer(adapter)
                if isinstance(module, PopupLayer)
                else module.modules_to_save[adapter]
            )
        )
        config = getattr(self.base_model, "config", None)
        if untied and getattr(config, "tie_word_embeddings", False):
            config.tie_word_embeddings = False
        return self.base_model

    def unload(self) -> nn.Module:
        """The plain model with the original layers back, masks dropped (the dense base)."""
        self._replace_wrappers(
            lambda module: (
                module.unloaded_base_layer()
                if isinstance(module, PopupLayer)
                else module.original_module
            )
        )
        return self.base_model

    def _replace_wrappers(self, replacement) -> None:
        """Put ``replacement(wrapper)`` wherever a wrapper is used (under every name of a shared
        one, computed once), the deepest first, so that nested wrappers are gone before their
        parents' turn."""
        uses = [
            (name, module)
            for name, module in self.base_model.named_modules(remove_duplicate=False)
            if isinstance(module, (PopupLayer, ModulesToSaveWrapper))
        ]
        done: dict[int, nn.Module] = {}
        for name, module in sorted(uses, key=lambda use: -use[0].count(".")):
            if id(module) not in done:
                done[id(module)] = replacement(module)
            _replace_module(self.base_model, name, done[id(module)])

    def unload_view(self) -> nn.Module:
        """A shallow view of the plain model's module tree (wrappers replaced), for matching."""
        return _unwrapped_tree(self.base_model, {})

    # -- internals
    def _add_scores(self, adapter_name: str, config: PopupConfig, draw_scores: bool) -> None:
        self.peft_config[adapter_name] = config
        for target, layer in self._masked_layers():
            weight = layer.base_weight
            if not draw_scores:
                scores = torch.zeros(weight.shape)
            elif config.score_init == "magnitude":
                scores = weight.detach().abs().float().clone()
            else:
                scores = score_values(
                    config.seed, target.parameter_path, weight.shape, layer.fan_in
                )
            layer.update_layer(adapter_name, config.k, scores)
        for module in self.base_model.modules():
            if isinstance(module, ModulesToSaveWrapper):
                module.update(adapter_name)

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
        """The live tensors every adapter has its own values of (see :class:`AdapterBank`)."""
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


def _inject(model: nn.Module, targets: list[MaskTarget], saved: list[str]) -> None:
    """Wrap every target's module (one wrapper per module, nesting a wrapper per masked
    parameter) and every saved module, under every name the module has. The wrappers are made
    on the plain tree first, then put in place the deepest first, so that each parent is still
    the plain module when its child is replaced."""
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
        _replace_module(model, alias, wrapper)


def _replace_module(root: nn.Module, name: str, new: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    setattr(root.get_submodule(parent_name) if parent_name else root, child, new)


def _tied_parameter_ids(model: nn.Module) -> set[int]:
    """Parameters held by more than one module (a module used under several names counts
    once)."""
    seen: dict[int, int] = defaultdict(int)
    for _, module in model.named_modules():
        for _, param in module.named_parameters(recurse=False):
            seen[id(param)] += 1
    return {pid for pid, count in seen.items() if count > 1}


def _unwrapped_tree(module: nn.Module, copies: dict[int, nn.Module]) -> nn.Module:
    """Replace wrappers by what they wrap, in a copied module tree (parameters shared; a module
    used under several names stays one module)."""
    if isinstance(module, PopupLayer):
        module = module.unloaded_base_layer()
    elif isinstance(module, ModulesToSaveWrapper):
        module = module.original_module
    if id(module) not in copies:
        view = copies[id(module)] = copy.copy(module)
        view._modules = {
            name: None if child is None else _unwrapped_tree(child, copies)
            for name, child in module._modules.items()
        }
    return copies[id(module)]
