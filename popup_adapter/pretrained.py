"""How a [`PopupModel`][popup_adapter.PopupModel] becomes an artifact and comes back from one.

Saving gathers what the artifact records (`PretrainedMixin.artifact_contents`), encodes
and checks it in memory, then writes or pushes it whole. Loading trusts nothing in the artifact
before it is checked: the files are read and validated (`open_artifact`),
the base is built on the meta device first, so that its structure, the masked tensors' shapes
and the memory it needs are known before it is allocated (`check_fits`; the masks, which need
only the artifact, are checked and decoding by then), and only then built, regenerated from the
seed, fingerprinted and masked.
"""

from __future__ import annotations

import math
import os
from collections.abc import Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import TYPE_CHECKING, Any

import psutil
import torch
from huggingface_hub import CommitInfo
from torch import nn

from .adapters import BATCHNORM_STATS
from .artifact import Artifact
from .artifact_files import (
    ArtifactContents,
    ArtifactFiles,
    CollectionFiles,
    encode_artifact,
    encode_collection,
)
from .base import is_inside, seeds_without_reading
from .config import PopupConfig
from .errors import AdapterError, ArtifactError, BaseMismatchError
from .hub import open_masks, push_artifact_files
from .redraws import load_redraw_counts, redraw_counts
from .seeding import FingerprintAsSet, fingerprint, signs_on_this_thread
from .sharding import whole_tensor
from .specs import build_base, describe
from .structure import describe_structure
from .targets import check_stored_targets

if TYPE_CHECKING:
    from .model import PopupModel


def check_fits(artifact: Artifact, check_structure: bool = True) -> nn.Module:
    """Build an artifact's base on the meta device and refuse it before the base is allocated
    if it is not what the artifact masks, or if it would not fit in memory (`check_memory`).

    Args:
        artifact: as read.
        check_structure: also compare the structure (as ``from_pretrained``'s argument).

    Returns:
        The base built on the meta device (shapes only).

    Raises:
        BaseMismatchError: the architecture the spec builds has another structure, or other
            masked tensors or shapes than the artifact lists.
        ArtifactError: the adapted model would need more memory than is available.
    """
    planned = build_base(artifact.base_spec, meta=True)
    if check_structure:
        artifact.check_structure(describe_structure(planned))
    check_stored_targets(
        planned,
        artifact.targets,
        artifact.config.modules_to_save or [],
        artifact.config_path,
    )
    artifact.check_shapes(
        {
            target.key: list(planned.get_parameter(target.parameter_path).shape)
            for target in artifact.targets
        }
    )
    check_memory(artifact, [*planned.parameters(), *planned.buffers()])
    return planned


def check_memory(artifact: Artifact, tensors: Sequence[torch.Tensor] = ()) -> None:
    """Refuse an artifact whose adapted model would not fit in memory: about its weights and
    buffers (``tensors``, on the meta device), one float score per masked weight and the
    largest masked tensor's float64 draw.

    Without ``tensors`` (the base not built yet) only what the masked layers need is counted,
    a lower bound that the artifact alone gives: cheap enough to check before the masks'
    decoding starts, ahead of `check_fits`.

    Raises:
        ArtifactError: more is needed than is available.
    """
    masked = [math.prod(layer["shape"]) for layer in artifact.layers.values()]
    weights = sum(t.numel() for t in tensors) or sum(masked)
    needed = sum(t.numel() * t.element_size() for t in tensors) + 5 * sum(masked) + 8 * max(masked)
    available = psutil.virtual_memory().available
    if needed > available:
        raise ArtifactError(
            f"{artifact.config_path}: {describe(artifact.base_spec)} as its spec builds "
            f"it has {weights:,d} weights and needs about "
            f"{needed / 2**30:.1f} GiB to load, more than the {available / 2**30:.1f} GiB "
            "available; refused before allocating. Check the spec's arguments (a huge "
            "num_classes or vocab_size), or load it on a machine with more memory"
        )


def _fingerprint_beside_seeding(model: nn.Module, config: PopupConfig) -> FingerprintAsSet:
    """A fingerprint of ``model``'s base to hash while `seed_base` sets it: the names
    ``base_state`` will have (every tensor but BatchNorm statistics and ``modules_to_save``),
    the buffers announced now (seeding leaves them), the parameters as they are set. A name it
    gets wrong (trained norms, which the artifact stores) only sends the load to the
    whole-base fingerprint."""
    stored = list(config.modules_to_save or [])
    state = {
        name: tensor
        for name, tensor in model.state_dict(keep_vars=True).items()
        if name.rpartition(".")[2] not in BATCHNORM_STATS
        and not is_inside(name.rpartition(".")[0], stored)
    }
    hasher = FingerprintAsSet(state)
    parameters = {id(param) for param in model.parameters()}
    for name, tensor in state.items():
        if id(tensor) not in parameters:  # a buffer: as built
            hasher.add(name, tensor)
    return hasher


def _decode_masks(
    pool: ThreadPoolExecutor,
    artifact: Artifact,
    names: Sequence[str],
    jobs: int,
    weights: dict[str, torch.Tensor] | None = None,
) -> dict[str, Future]:
    """Submit the masks of layers ``names`` to ``pool`` as up to ``jobs`` jobs of about equal
    size, each decoding its layers together (the compiled decoder runs their streams side by
    side), into memory allocated on this thread: glibc keeps what a thread allocated in that
    thread's heap, where it stays resident once freed (a served resnet50 held its 25 MB of
    masks again there).

    Returns:
        Each name's job, whose result is the job's masks by name.
    """
    sizes = {name: math.prod(artifact.layers[name]["shape"]) for name in names}
    groups: list[list[str]] = [[] for _ in range(min(jobs, len(names)))]
    totals = [0] * len(groups)
    for name in sorted(names, key=sizes.__getitem__, reverse=True):  # the largest first
        lightest = totals.index(min(totals))
        groups[lightest].append(name)
        totals[lightest] += sizes[name]
    submitted = {}
    for group in groups:
        out = {name: torch.empty(sizes[name], dtype=torch.uint8) for name in group}
        job = pool.submit(artifact.masks, group, weights, out)
        submitted.update(dict.fromkeys(group, job))
    return submitted


class PretrainedMixin:
    """``save_pretrained`` / ``push_to_hub`` / ``from_pretrained`` / ``load_adapter`` of
    [`PopupModel`][popup_adapter.PopupModel], as transformers and PEFT name them."""

    def artifact_contents(self, adapter_name: str | None = None) -> ArtifactContents:
        """What an artifact of an adapter records, gathered whole.

        Under FSDP this gathers sharded tensors, which every process must do together (then
        one process writes): that is why it is separate from writing.

        Args:
            adapter_name: whose (default: the active adapter).

        Returns:
            The `ArtifactContents`.

        Raises:
            AdapterError: the model was merged or unloaded: it has no masks left.
        """
        adapter_name = adapter_name or self.active_adapter
        if not any(True for _ in self._masked_layers()):
            raise AdapterError(
                "this model has no masks left: merge_and_unload() or unload() turned it back "
                "into the plain model. Save the mask before merging (model.save_pretrained), "
                "or save the merged model with its own library's save_pretrained"
            )
        self._check_final(adapter_name)  # an artifact holds the final mask
        masks = self.get_masks(adapter_name)
        # the base as a load regenerates it, to code the masks given |W| (a served model's
        # weights hold W * M: it is not unmerged for this, its masks are coded plainly)
        base = {} if self.merged else {k: whole_tensor(v) for k, v in self.base_state().items()}
        return ArtifactContents(
            adapter_name=adapter_name,
            config=self.peft_config[adapter_name],
            base_spec=self.base_spec,
            base_fingerprint=fingerprint(base.items()) if base else self.base_fingerprint,
            base_structure=self.base_structure,
            masks=[
                (target, masks[target.key], layer.num_masks if layer.per_expert else None)
                for target, layer in self._masked_layers()
            ],
            state={k: whole_tensor(v) for k, v in self.trained_state(adapter_name).items()},
            base_weights={
                target.key: base[target.parameter_path]
                for target, _ in self._masked_layers()
                if target.parameter_path in base
            },
            redraws={
                target.key: counts[masks[target.key].to(counts.device)].cpu().numpy()
                for target, layer in self._masked_layers()
                if (counts := redraw_counts(layer)) is not None
            },
        )

    def artifact_files(
        self,
        adapter_name: str | None = None,
        dataset: str | None = None,
        metrics: dict[str, float] | None = None,
        selected_adapters: Sequence[str] | None = None,
    ) -> ArtifactFiles | CollectionFiles:
        """An adapter's artifact (or several adapters' collection) encoded in memory, to
        write or push.

        Args:
            adapter_name: as in [`save_pretrained`][popup_adapter.PopupModel.save_pretrained].
            dataset: as in [`save_pretrained`][popup_adapter.PopupModel.save_pretrained].
            metrics: as in [`save_pretrained`][popup_adapter.PopupModel.save_pretrained].
            selected_adapters: as in
                [`save_pretrained`][popup_adapter.PopupModel.save_pretrained].

        Returns:
            The `ArtifactFiles`, or the `CollectionFiles` with ``selected_adapters``.

        Raises:
            AdapterError: both ``adapter_name`` and ``selected_adapters``, an unknown or
                repeated adapter, or none selected.
        """
        if selected_adapters is None:
            return encode_artifact(self.artifact_contents(adapter_name), dataset, metrics)
        names = list(selected_adapters)
        if adapter_name is not None or not names or len(set(names)) != len(names):
            raise AdapterError(
                f"selected_adapters={names} with adapter_name={adapter_name!r}: a collection "
                "takes a list of distinct adapters, and no adapter_name"
            )
        for name in names:
            self._check_adapter(name)
        metrics = metrics or {}
        unknown = sorted(set(metrics) - set(names))
        if unknown:
            raise AdapterError(
                f"metrics for {unknown}, which are not selected; a collection's metrics map "
                "each adapter's name to its metrics"
            )
        return encode_collection(
            {
                name: encode_artifact(self.artifact_contents(name), dataset, metrics.get(name))
                for name in names
            }
        )

    def save_pretrained(
        self,
        save_directory: str | os.PathLike,
        adapter_name: str | None = None,
        dataset: str | None = None,
        metrics: dict[str, float] | None = None,
        selected_adapters: Sequence[str] | None = None,
    ) -> Path:
        """Save a mask as a tiny artifact folder: the base is not stored, it comes back from
        the seed. With ``selected_adapters``, save those masks as one collection: the base
        recorded once, a tensor file per mask, a card listing them
        (``from_pretrained(path, adapters=[...])`` loads any of them).

        Args:
            save_directory: the folder (created if needed). The save is all or nothing: an
                artifact saved there before stays whole until the new one is complete, and
                saves to one folder from several processes take turns.
            adapter_name: the adapter to save (default: the active one).
            dataset: recorded in the model card.
            metrics: recorded in the config and the model card (a collection's: a dict of
                them by adapter name).
            selected_adapters: the adapters of a collection (``list(model.peft_config)``
                for all), instead of one artifact.

        Returns:
            The folder.

        Raises:
            ArtifactError: a metric or the dataset cannot be stored (before anything is
                written).
            AdapterError: the model was merged or unloaded, or the selection is invalid.
        """
        files = self.artifact_files(adapter_name, dataset, metrics, selected_adapters)
        return files.write(save_directory)

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
        selected_adapters: Sequence[str] | None = None,
    ) -> CommitInfo:
        """Publish a mask (or a collection, with ``selected_adapters``) to the Hugging Face
        Hub as one commit.

        Args:
            repo_id: the model repo; it and the branch ``revision`` are created if needed.
            private: visibility of a newly created repo.
            revision: the branch (default ``main``).
            commit_message: default ``"Upload popup_adapter mask (k=...)"``.
            token: a Hub token (default: the logged-in one).
            adapter_name: as in [`save_pretrained`][popup_adapter.PopupModel.save_pretrained].
            dataset: as in [`save_pretrained`][popup_adapter.PopupModel.save_pretrained].
            metrics: as in [`save_pretrained`][popup_adapter.PopupModel.save_pretrained].
            selected_adapters: as in
                [`save_pretrained`][popup_adapter.PopupModel.save_pretrained].

        Returns:
            huggingface_hub's ``CommitInfo``.
        """
        files = self.artifact_files(adapter_name, dataset, metrics, selected_adapters)
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
        adapters: Sequence[str] | None = None,
        **hub_kwargs: Any,
    ) -> PopupModel:
        """Load a mask from a folder or a Hub repo onto its base, or several masks from a
        collection (saved with ``selected_adapters``).

        The base is regenerated from the seed, its structure and its weight fingerprint are
        checked, then the mask is applied. A collection's masks are loaded under their stored
        names, the first active; the ones not asked for are not downloaded or read.

        Args:
            path_or_repo_id: an artifact or collection folder, or a Hub repo id.
            model: the base architecture (default: rebuilt from the artifact's spec; an
                ``init="keep"`` transformers base is loaded from the pretrained source it
                records, or from ``base_model_name_or_path``).
            revision: a branch, tag or commit of the Hub repo.
            adapter_name: the name the mask gets (a collection's keep their own).
            is_trainable: give the mask scores to train from (default: served, eval mode,
                the mask bit-packed with no scores and merged into the weights: see
                [`merge_adapter`][popup_adapter.PopupModel.merge_adapter]).
            base_model_name_or_path: where the pretrained weights of an ``init="keep"``
                artifact are (a folder or a Hub id), when the recorded source is not at hand.
            check_structure: False skips the structure check alone (for an artifact saved
                with another timm/transformers version, once you have checked the outputs).
            adapters: a collection's masks to load, the first active (default: all, in the
                collection's order).
            **hub_kwargs: ``token``, ``cache_dir``, ``local_files_only`` for the download.

        Returns:
            The adapted model, with the mask as ``adapter_name`` (a collection's under their
            names).

        Raises:
            ArtifactError: the artifact is missing, malformed, its base would not fit in the
                memory available, or its pretrained base cannot be found; ``adapters`` names
                a mask the collection lacks, or is given for a single artifact.
            BaseMismatchError: the base is not the one the mask was trained on (names what
                differs and the fix).
        """
        names = None if adapters is None else list(adapters)
        found = open_masks(path_or_repo_id, revision, names, **hub_kwargs)
        artifact, further = found[0], found[1:]
        if artifact.member is not None and adapter_name != "default":
            raise AdapterError(
                f"{path_or_repo_id} is a collection: its masks keep their stored names "
                f"({[a.member for a in found]}); leave adapter_name out"
            )
        # masks that need no base decode while this thread builds (and checks) the base, seeds
        # it and another hashes it: one decoder fewer than the cores (more slowed the load);
        # the masks' own memory is checked before theirs is allocated
        check_memory(artifact)
        decoders = max(1, torch.get_num_threads() - 1)
        with ThreadPoolExecutor(max_workers=decoders) as pool:
            base_free = [name for name in artifact.layers if not artifact.mask_needs_base(name)]
            early = _decode_masks(pool, artifact, base_free, decoders)
            try:
                planned = None if model is not None else check_fits(artifact, check_structure)
                popup, masks = cls._load(
                    artifact,
                    early,
                    model=model,
                    planned=planned,
                    adapter_name=artifact.member or adapter_name,
                    is_trainable=is_trainable,
                    base_model_name_or_path=base_model_name_or_path,
                    check_structure=check_structure,
                )
            finally:
                for future in early.values():
                    future.cancel()
        for member in further:
            popup._load_further(member, member.member, is_trainable)
        popup.set_trainable(is_trainable)
        if not is_trainable:  # served at the plain model's speed and memory
            popup._merge(artifact.base_fingerprint, masks)
        return popup

    @classmethod
    def _load(
        cls,
        artifact: Artifact,
        early: dict[str, Future],
        *,
        model: nn.Module | None,
        planned: nn.Module | None,
        adapter_name: str,
        is_trainable: bool,
        base_model_name_or_path: str | os.PathLike | None,
        check_structure: bool,
    ) -> tuple[PopupModel, dict[str, torch.Tensor]]:
        """`from_pretrained` of one artifact once it is open and checked, ``early`` masks
        decoding: the model and the masks it loaded (the caller merges them).
        ``planned`` is `check_fits`' meta build: given its memory, it is the base where the
        seed sets every one of its tensors without reading them (no second construction)."""
        seeded = artifact.config.init != "keep"  # every layer weight is drawn next
        masked = [target.parameter_path for target in artifact.targets]
        if model is None and seeded and seeds_without_reading(planned, masked):
            model = planned.to_empty(device="cpu")
        elif model is None:
            model = build_base(
                artifact.base_spec,
                pretrained=not seeded,
                pretrained_source=base_model_name_or_path,
                skip_layer_init=seeded,
            )
        elif check_structure:  # before adapting: its message says more than a missing layer's
            artifact.check_structure(describe_structure(model))  # (check_fits did, on meta)
        hasher = _fingerprint_beside_seeding(model, artifact.config)
        with ThreadPoolExecutor(max_workers=1) as hashing:  # not queued behind the decoders
            fingerprinting = hasher, hashing.submit(hasher.result)
            try:
                with signs_on_this_thread():  # the decoders and the hasher hold the other cores
                    popup = cls(
                        model,
                        artifact.config,
                        adapter_name,
                        draw_scores=False,
                        base_kwargs=artifact.base_spec.get("base_kwargs"),
                        targets=artifact.targets,
                        on_seeded=hasher.add,
                    )
                masks = popup._load_artifact(
                    artifact, adapter_name, not is_trainable, early, fingerprinting
                )
            except BaseException:
                hasher.finish({})  # the hash stops (else this block would wait for it)
                raise
        return popup, masks

    def load_adapter(
        self,
        path_or_repo_id: str | os.PathLike,
        adapter_name: str,
        revision: str | None = None,
        is_trainable: bool = False,
        **hub_kwargs: Any,
    ) -> None:
        """Load a further mask over this backbone as ``adapter_name`` (not made active).

        Args:
            path_or_repo_id: an artifact folder or a Hub repo id, or a collection's (its
                mask stored as ``adapter_name`` is loaded, nothing else is read).
            adapter_name: a new adapter name.
            revision: a branch, tag or commit of the Hub repo.
            is_trainable: give it scores to train from once it is active (default: served,
                its mask bit-packed, 1 bit per weight).
            **hub_kwargs: as in [`from_pretrained`][popup_adapter.PopupModel.from_pretrained].

        Raises:
            BaseMismatchError: the mask was trained over another base, or masks other tensors.
            AdapterError: ``adapter_name`` exists, or the artifact's config cannot share this
                backbone.
        """
        (artifact,) = open_masks(
            path_or_repo_id, revision, [adapter_name], any_artifact=True, **hub_kwargs
        )
        self._load_further(artifact, adapter_name, is_trainable)

    def _load_further(self, artifact: Artifact, adapter_name: str, is_trainable: bool) -> None:
        """`load_adapter` of an open artifact."""
        if artifact.targets != self.targets:
            raise BaseMismatchError(
                f"{artifact.config_path} masks other tensors than the adapters on this "
                f"backbone ({len(artifact.targets)} against {len(self.targets)}); load it with "
                "PopupModel.from_pretrained instead"
            )
        self.add_adapter(adapter_name, artifact.config, draw_scores=False, targets=artifact.targets)
        try:
            artifact.check_structure(self.base_structure)
            self._load_artifact(artifact, adapter_name, serve=not is_trainable)
        except Exception:
            self.delete_adapter(adapter_name)
            raise
        self.set_trainable(is_trainable, adapter_name)

    def _load_artifact(
        self,
        artifact: Artifact,
        adapter_name: str,
        serve: bool = False,
        early: dict[str, Future] | None = None,
        fingerprinting: tuple[FingerprintAsSet, Future] | None = None,
    ) -> dict[str, torch.Tensor]:
        """Check that this base is the artifact's, then set ``adapter_name``'s masks and state
        (its structure is checked by the caller, before adapting).

        The base is fingerprinted on one thread while the masks decode on the others (hashing
        and the compiled decoder release the GIL); a mismatched base is reported before any
        decoding error, which it would explain.

        Args:
            artifact: as read.
            adapter_name: the adapter the masks go to.
            serve: hold the masks bit-packed, for inference (no scores); False gives the
                adapter the scores a loaded mask trains from.
            early: masks already decoding, by layer name (the others decode here).
            fingerprinting: the base's fingerprint hashing since its seeding began, and its
                result (None where it must be hashed whole after all).

        Returns:
            The masks, by layer name.
        """
        masked = dict(self.popup_layers())
        shapes = {name: list(layer.base_weight.shape) for name, layer in masked.items()}
        early = early or {}
        # the masks that needed the base decode now, on every core (the seeding is done)
        threads = torch.get_num_threads()
        with ThreadPoolExecutor(max_workers=1 + threads) as pool:
            if fingerprinting is None:
                base_fingerprint = pool.submit(lambda: self.base_fingerprint)
            else:
                hasher, base_fingerprint = fingerprinting
                hasher.finish(self.base_state())
            late = [name for name in masked if name not in early]
            weights = {name: masked[name].base_weight for name in late}
            decoding = {**early, **_decode_masks(pool, artifact, late, threads, weights)}
            artifact.check_base(shapes, base_fingerprint.result() or self.base_fingerprint)
            masks = {name: future.result()[name] for name, future in decoding.items()}
        with torch.no_grad():
            for name, layer in masked.items():
                if serve:
                    layer.serve_mask(adapter_name, masks[name])
                else:
                    layer.load_mask(adapter_name, masks[name])
            if artifact.config.redraw_every:  # IteRand: the kept weights' redraws, regenerated
                for target, layer in self._masked_layers():
                    counts = artifact.redraw_counts(target.key)
                    path, mask = target.parameter_path, masks[target.key]
                    load_redraw_counts(layer, artifact.config, path, counts, mask)
        self.load_trained_state(adapter_name, artifact.stored_state(), where=artifact.weights_path)
        return masks
