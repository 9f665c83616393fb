"""How a whole model is adapted: walk it, match targets, draw the base from the seed, inject.

``PopupModel`` wraps any ``nn.Module`` (timm, transformers or plain) the way PEFT's
``PeftModel`` does: attributes it does not have read through to the wrapped model, so
``.config``, ``.pretrained_cfg`` and ``generate`` keep working.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
from torch import nn

from .adapters import AdapterBank
from .artifact import WEIGHTS_NAME, Artifact, ArtifactContents, ArtifactFiles, encode_artifact
from .base import describe_structure, seed_base
from .config import PopupConfig
from .errors import AlreadyAdaptedError, BaseMismatchError
from .hub import open_artifact, push_artifact_files
from .injection import base_name, inject_wrappers, is_wrapper
from .layers import PopupLayer
from .multi_adapter import MultiAdapterMixin
from .seeding import fingerprint
from .sharding import whole_tensor
from .specs import build_base, describe_base
from .targets import (
    Coverage,
    MaskTarget,
    check_stored_targets,
    matrix_coverage,
    resolve_targets,
    warn_unmasked,
)


def get_popup_model(
    model: nn.Module,
    config: PopupConfig | None = None,
    adapter_name: str = "default",
    *,
    base_kwargs: dict[str, Any] | None = None,
    **overrides,
) -> PopupModel:
    """Adapt ``model`` for edge-popup: wrap its layers with scores and reset its base from the seed.

    ``get_popup_model(timm.create_model("resnet50"), k=0.3)`` is the whole call.

    Args:
        model: any timm, transformers or plain ``nn.Module``; changed in place (its weights
            are redrawn from the seed, its layers wrapped).
        config: a :class:`PopupConfig` (default: one from ``overrides``).
        adapter_name: the name of this first mask.
        base_kwargs: constructor arguments of a timm model that cannot be read back from the
            built model (e.g. ``{"act_layer": "gelu", "output_stride": 16}``): stored in the
            artifact, they rebuild the same network at load time.
        **overrides: fields of :class:`PopupConfig` (``k=0.3``, ``init=...``), on top of
            ``config``.

    Returns:
        The :class:`PopupModel`, its first adapter active and trainable.

    Raises:
        ConfigError: a config field has an impossible value.
        TargetModulesError: ``target_modules`` / ``exclude_modules`` match nothing or a
            module that cannot be masked.
        AlreadyAdaptedError: ``model`` already carries popup layers.
    """
    if config is None:
        config = PopupConfig(**overrides)
    elif overrides:
        config = PopupConfig(**{**config.to_dict(), **overrides})
    return PopupModel(model, config, adapter_name, base_kwargs=base_kwargs)


class PopupModel(MultiAdapterMixin, nn.Module):
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
        if isinstance(model, PopupModel) or any(is_wrapper(m) for m in model.modules()):
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

    def forward(self, *args, **kwargs):
        """The wrapped model's forward, with every masked layer using ``W * M``."""
        return self.base_model(*args, **kwargs)

    # -- inspection
    def popup_layers(self) -> Iterator[tuple[str, PopupLayer]]:
        """Every masked tensor's layer.

        Yields:
            ``(name, layer)``, named as :attr:`MaskTarget.key`: the plain model's module name
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
            ``{tensor name: bool mask shaped like it}``, named as :meth:`popup_layers` names
            them.
        """
        adapter_name = adapter_name or self.active_adapter
        self._check_adapter(adapter_name)
        with torch.no_grad():
            return {name: layer.get_mask(adapter_name) for name, layer in self.popup_layers()}

    @property
    def base_fingerprint(self) -> str:
        """sha256 of :meth:`base_state`: what a mask must be loaded back onto (sharded tensors
        are gathered whole: under FSDP every process must ask).

        Returns:
            64 hex digits.
        """
        return fingerprint((name, whole_tensor(t)) for name, t in self.base_state().items())

    # -- artifacts and the Hub
    def artifact_contents(self, adapter_name: str | None = None) -> ArtifactContents:
        """What an artifact of an adapter records, gathered whole.

        Under FSDP this gathers sharded tensors, which every process must do together (then
        one process writes): that is why it is separate from writing.

        Args:
            adapter_name: whose (default: the active adapter).

        Returns:
            The :class:`~popup_adapter.artifact.ArtifactContents`.
        """
        adapter_name = adapter_name or self.active_adapter
        masks = self.get_masks(adapter_name)
        return ArtifactContents(
            adapter_name=adapter_name,
            config=self.peft_config[adapter_name],
            base_spec=self.base_spec,
            base_fingerprint=self.base_fingerprint,
            base_structure=self.base_structure,
            masks=[
                (target, masks[target.key], layer.num_masks if layer.per_expert else None)
                for target, layer in self._masked_layers()
            ],
            state={k: whole_tensor(v) for k, v in self.trained_state(adapter_name).items()},
        )

    def artifact_files(
        self,
        adapter_name: str | None = None,
        dataset: str | None = None,
        metrics: dict[str, float] | None = None,
    ) -> ArtifactFiles:
        """An adapter's artifact encoded in memory, to write or push.

        Args:
            adapter_name, dataset, metrics: as in :meth:`save_pretrained`.

        Returns:
            The :class:`~popup_adapter.artifact.ArtifactFiles`.
        """
        return encode_artifact(self.artifact_contents(adapter_name), dataset, metrics)

    def save_pretrained(
        self,
        save_directory: str | os.PathLike,
        adapter_name: str | None = None,
        dataset: str | None = None,
        metrics: dict[str, float] | None = None,
    ) -> Path:
        """Save a mask as a tiny artifact folder: the base is not stored, it comes back from
        the seed.

        Args:
            save_directory: the folder (created if needed); each file is written atomically.
            adapter_name: the adapter to save (default: the active one).
            dataset: recorded in the model card.
            metrics: recorded in the config and the model card.

        Returns:
            The folder.
        """
        return self.artifact_files(adapter_name, dataset, metrics).write(save_directory)

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
        """Publish a mask to the Hugging Face Hub as one commit.

        Args:
            repo_id: the model repo; it and the branch ``revision`` are created if needed.
            private: visibility of a newly created repo.
            revision: the branch (default ``main``).
            commit_message: default ``"Upload popup_adapter mask (k=...)"``.
            token: a Hub token (default: the logged-in one).
            adapter_name, dataset, metrics: as in :meth:`save_pretrained`.

        Returns:
            huggingface_hub's ``CommitInfo``.
        """
        files = self.artifact_files(adapter_name, dataset, metrics)
        return push_artifact_files(files, repo_id, private, revision, commit_message, token)

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

        The base is regenerated from the seed, its structure and its weight fingerprint are
        checked, then the mask is applied.

        Args:
            path_or_repo_id: an artifact folder or a Hub repo id.
            model: the base architecture (default: rebuilt from the artifact's spec; an
                ``init="keep"`` transformers base is loaded from the pretrained source it
                records, or from ``base_model_name_or_path``).
            revision: a branch, tag or commit of the Hub repo.
            adapter_name: the name the mask gets.
            is_trainable: keep the scores trainable (default: frozen, eval mode).
            base_model_name_or_path: where the pretrained weights of an ``init="keep"``
                artifact are (a folder or a Hub id), when the recorded source is not at hand.
            check_structure: False skips the structure check alone (for an artifact saved
                with another timm/transformers version, once you have checked the outputs).
            **hub_kwargs: ``token``, ``cache_dir``, ``local_files_only`` for the download.

        Returns:
            The adapted model, with the mask as ``adapter_name``.

        Raises:
            ArtifactError: the artifact is missing, malformed or its pretrained base cannot
                be found.
            BaseMismatchError: the base is not the one the mask was trained on (names what
                differs and the fix).
        """
        artifact = open_artifact(path_or_repo_id, revision, **hub_kwargs)
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
        popup._load_artifact(artifact, adapter_name)
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
        """Load a further mask over this backbone as ``adapter_name`` (not made active).

        Args:
            path_or_repo_id: an artifact folder or a Hub repo id.
            adapter_name: a new adapter name.
            revision: a branch, tag or commit of the Hub repo.
            is_trainable: leave its scores trainable once it is active.
            **hub_kwargs: as in :meth:`from_pretrained`.

        Raises:
            BaseMismatchError: the mask was trained over another base, or masks other tensors.
            AdapterError: ``adapter_name`` exists, or the artifact's config cannot share this
                backbone.
        """
        artifact = open_artifact(path_or_repo_id, revision, **hub_kwargs)
        if artifact.targets != self.targets:
            raise BaseMismatchError(
                f"{path_or_repo_id} masks other tensors than the adapters on this backbone "
                f"({len(artifact.targets)} against {len(self.targets)}); load it with "
                "PopupModel.from_pretrained instead"
            )
        self.add_adapter(adapter_name, artifact.config, draw_scores=False)
        try:
            artifact.check_structure(self.base_structure)
            self._load_artifact(artifact, adapter_name)
        except Exception:
            self.delete_adapter(adapter_name)
            raise
        self.set_trainable(is_trainable, adapter_name)

    def _load_artifact(self, artifact: Artifact, adapter_name: str) -> None:
        """Check that this base is the artifact's, then set ``adapter_name``'s masks and state
        (its structure is checked by the caller, before adapting)."""
        masked = dict(self.popup_layers())
        shapes = {name: list(layer.base_weight.shape) for name, layer in masked.items()}
        artifact.check_base(shapes, self.base_fingerprint)
        with torch.no_grad():
            for name, layer in masked.items():
                layer.load_mask(adapter_name, artifact.mask(name))
        where = artifact.folder / WEIGHTS_NAME
        self.load_trained_state(adapter_name, artifact.stored_state(), where=where)

    # -- internals
