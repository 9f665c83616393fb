"""An artifact being saved: what it records, encoded and checked in memory, then written.

A [`PopupModel`][popup_adapter.PopupModel] gathers `ArtifactContents` (plain data: this module
never sees a model); `encode_artifact` turns it into the files' bytes, checking every
value on the way (metrics included), so that nothing is left to fail once writing starts but
the disk; `ArtifactFiles.write` writes them all or nothing (`popup_adapter.storage`)
and a push sends them as one commit. Several adapters' artifacts over one base make a
collection (`encode_collection`): one tensor file each, the base recorded once. The format
itself: `popup_adapter.artifact`.
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors.torch import save

from . import __version__
from .artifact_schema import (
    CARD_NAME,
    COLLECTION_FORMAT_VERSION,
    COLLECTION_NAME,
    CONFIG_NAME,
    FORMAT_VERSION,
    MASK_PREFIX,
    REDRAW_PREFIX,
    SHARED_FIELDS,
    STATE_PREFIX,
    checked_metrics,
    is_artifact_file,
    weights_name,
)
from .card import collection_card, model_card
from .codec import encode_counts, encode_mask, encode_mask_given_base
from .config import PopupConfig
from .errors import ArtifactError
from .storage import commit_files
from .structure import library_versions, structure_fingerprint
from .targets import MaskTarget


class CommittedFiles:
    """Files in memory that a folder takes all or nothing (`popup_adapter.storage`): the
    tensor files, named by their content, first; then the commit file that names them, which
    switches versions; then the card. The previous save's files go after the commit."""

    #: the file whose replacement switches versions
    commit_name: str

    def contents(self) -> dict[str, bytes]:
        """Every file by name."""
        raise NotImplementedError

    def write(self, save_directory: str | os.PathLike) -> Path:
        """Write the files into ``save_directory``, all or nothing, replacing the artifact or
        collection saved there before.

        Args:
            save_directory: the folder (created if needed).

        Returns:
            The folder.
        """
        folder, data = Path(save_directory), self.contents()
        commit, card = data.pop(self.commit_name), data.pop(CARD_NAME)
        commit_files(
            folder,
            data=data,
            commit=(self.commit_name, commit),
            after={CARD_NAME: card},
            owned=is_artifact_file,
        )
        return folder


@dataclass
class ArtifactFiles(CommittedFiles):
    """An artifact's files in memory, encoded and checked: nothing is left to fail once writing
    starts but the disk."""

    commit_name = CONFIG_NAME

    blob: bytes
    meta: dict[str, Any]
    #: ``popup_config.json``'s bytes (strict JSON)
    config_json: bytes
    card: str

    @property
    def weights_name(self) -> str:
        """The tensor file's name (see `weights_name`)."""
        return next(iter(self.meta["files"]))

    @property
    def commit_message(self) -> str:
        """What a push says by default."""
        return f"Upload popup_adapter mask (k={self.meta['config']['k']})"

    def contents(self) -> dict[str, bytes]:
        """Every file by name.

        Returns:
            ``{file name: bytes}`` of the tensor file, the config and the card.
        """
        return {
            self.weights_name: self.blob,
            CONFIG_NAME: self.config_json,
            CARD_NAME: self.card.encode(),
        }


@dataclass
class CollectionFiles(CommittedFiles):
    """Several artifacts over one base, encoded as a collection in memory: one tensor file per
    mask, and one manifest (``popup_collection.json``) holding the base's spec, fingerprint and
    structure once and every member's config; one card lists them."""

    commit_name = COLLECTION_NAME

    members: dict[str, ArtifactFiles]
    manifest: dict[str, Any]
    manifest_json: bytes
    card: str

    @property
    def commit_message(self) -> str:
        """What a push says by default."""
        return f"Upload popup_adapter collection ({len(self.members)} masks)"

    def contents(self) -> dict[str, bytes]:
        """Every file by name.

        Returns:
            ``{file name: bytes}`` of the tensor files, the manifest and the card.
        """
        tensors = {files.weights_name: files.blob for files in self.members.values()}
        return {**tensors, COLLECTION_NAME: self.manifest_json, CARD_NAME: self.card.encode()}


def encode_collection(members: dict[str, ArtifactFiles]) -> CollectionFiles:
    """Encode several adapters' artifacts over one base as one collection.

    Args:
        members: each adapter's encoded artifact, by the name it is stored under.

    Returns:
        The `CollectionFiles`.

    Raises:
        ArtifactError: no members, or members over different bases (spec, fingerprint or
            structure).
    """
    if not members:
        raise ArtifactError("a collection needs at least one adapter")
    (first, reference), *rest = members.items()
    shared = {key: reference.meta[key] for key in SHARED_FIELDS}
    for name, files in rest:
        differs = [key for key in SHARED_FIELDS if files.meta[key] != shared[key]]
        if differs:
            raise ArtifactError(
                f"adapter {name!r} has another {differs[0]} than {first!r}: a collection "
                "holds masks over one base; save them as separate artifacts"
            )
    manifest = {
        "format_version": COLLECTION_FORMAT_VERSION,
        "library": "popup_adapter",
        "library_version": __version__,
        **shared,
        "adapters": {
            name: {k: v for k, v in files.meta.items() if k not in SHARED_FIELDS}
            for name, files in members.items()
        },
    }
    manifest_json = (json.dumps(manifest, indent=2, allow_nan=False) + "\n").encode()
    return CollectionFiles(members, manifest, manifest_json, collection_card(manifest))


@dataclass
class ArtifactContents:
    """What an artifact records, as plain data (a [`PopupModel`][popup_adapter.PopupModel] gathers
    it, see ``PopupModel.artifact_contents``): this module never sees a model."""

    adapter_name: str
    config: PopupConfig
    base_spec: dict[str, Any]
    base_fingerprint: str
    base_structure: dict[str, str]
    #: every masked tensor: its target, its boolean mask, and its number of experts (an expert
    #: bank, one mask each) or None
    masks: list[tuple[MaskTarget, torch.Tensor, int | None]]
    #: what training changed besides the masks, by plain names (whole, on any device)
    state: dict[str, torch.Tensor]
    #: IteRand: each masked tensor's redraw counts of its kept weights, in flat order
    redraws: dict[str, np.ndarray] = field(default_factory=dict)
    #: each masked tensor's base weight, as a load regenerates it before decoding (the masks
    #: are then coded given |W|, where that is smaller; see popup_adapter.codec)
    base_weights: dict[str, torch.Tensor] = field(default_factory=dict)


def encode_artifact(
    contents: ArtifactContents,
    dataset: str | None = None,
    metrics: dict[str, float] | None = None,
) -> ArtifactFiles:
    """Encode ``contents`` as the artifact's files, in memory.

    Args:
        contents: the masks and everything else the artifact records.
        dataset: recorded in the model card.
        metrics: recorded in the config and the card: numbers (numpy scalars and one-element
            tensors too) or strings; NaN and infinities are stored as strings.

    Returns:
        The files, to write (`ArtifactFiles.write`) or push.

    Raises:
        ArtifactError: a metric or dataset that the config cannot store; raised before
            anything is written.
    """
    metrics = checked_metrics(metrics)
    if not isinstance(dataset, (str, type(None))):
        raise ArtifactError(f"dataset must be a string (a dataset name), got {dataset!r}")
    tensors: dict[str, torch.Tensor] = {}
    layers: dict[str, dict[str, Any]] = {}
    for target, mask, experts in contents.masks:
        weight = contents.base_weights.get(target.key)
        bucket_kept = None
        if weight is None:
            encoding, payload = encode_mask(mask)
        else:
            encoding, payload, bucket_kept = encode_mask_given_base(mask, weight)
        tensors[MASK_PREFIX + target.key] = torch.from_numpy(payload)
        layers[target.key] = {
            "module": target.module,
            "parameter": target.parameter,
            "shape": list(mask.shape),
            "kept": int(torch.count_nonzero(mask)),
            "encoding": encoding,
            **({"experts": experts} if experts is not None else {}),
            **({"bucket_kept": bucket_kept} if bucket_kept is not None else {}),
        }
        if target.key in contents.redraws:
            histogram, counts = encode_counts(contents.redraws[target.key])
            layers[target.key]["redraws"] = histogram
            if counts.size:
                tensors[REDRAW_PREFIX + target.key] = torch.from_numpy(counts)
    for name, value in contents.state.items():
        tensors[STATE_PREFIX + name] = value.to("cpu").contiguous()
    blob = save(
        # one metadata key: safetensors writes several in no fixed order, and identical saves
        # should be identical bytes (the same sha256, so the Hub and its cache deduplicate them)
        tensors,
        metadata={"format": f"popup_adapter/{FORMAT_VERSION}"},
    )
    sha256 = hashlib.sha256(blob).hexdigest()
    meta = {
        "format_version": FORMAT_VERSION,
        "library": "popup_adapter",
        "library_version": __version__,
        "adapter_name": contents.adapter_name,
        "config": contents.config.to_dict(),
        "base": contents.base_spec,
        "base_fingerprint": contents.base_fingerprint,
        "structure": {
            "fingerprint": structure_fingerprint(contents.base_structure),
            "library_versions": library_versions(),
            "modules": contents.base_structure,
        },
        "layers": layers,
        "files": {weights_name(FORMAT_VERSION, sha256): {"sha256": sha256, "size": len(blob)}},
        "dataset": dataset,
        "metrics": metrics,
    }
    try:
        config_json = (json.dumps(meta, indent=2, allow_nan=False) + "\n").encode()
    except (TypeError, ValueError) as error:
        raise ArtifactError(f"the artifact's config cannot be stored as JSON ({error})") from error
    return ArtifactFiles(blob, meta, config_json, model_card(meta, len(blob)))
