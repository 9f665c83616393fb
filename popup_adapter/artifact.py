"""An artifact read back: the mask artifact is a folder of three files (how they are written:
`popup_adapter.artifact_files`).

- ``popup_config.json``: format and library versions, the
  [`PopupConfig`][popup_adapter.PopupConfig], the base's spec, weight fingerprint and structure,
  every masked tensor's module, parameter, shape, kept count and encoding, and the name, size and
  sha256 of the tensor file;
- ``popup_model-<first 16 hex digits of its sha256>.safetensors``: each layer's encoded mask
  (``mask.<layer>``, uint8) and the other tensors training changed (``state.<name>``:
  BatchNorm statistics, ``modules_to_save``, trained norms);
- ``README.md``: a Hub model card.

Nothing is pickled. A save is all or nothing (`popup_adapter.storage`): the tensor file,
named by its content, is written first, then ``popup_config.json``, which names it, replaces the
previous config (the commit), then the card; savers of one folder take turns. A reader sees the
previous artifact or the new one, whole, and the recorded sha256 catches a tensor file that does
not belong to its config. What a reader checks before it trusts a field:
`popup_adapter.artifact_schema`.

Format 4 adds the search methods: the config's ``method``, ``selection``, ``ramp_steps``,
``min_layer_k``, ``redraw_every`` and ``redraw_prob``, a global top-k's per-layer counts (their
total checked against k), and with IteRand each layer's redraw counts of its kept weights
(``redraws``: their histogram in the config, an rANS stream ``redraws.<layer>`` in the tensor
file). Formats 1 (the first release: no structure, each masked layer's ``weight`` named by its
module), 2 (a fixed tensor file name, ``popup_model.safetensors``) and 3 stay readable: their
masks load onto the tensors they list, whatever later versions mask by default.

A collection (`read_collection`) holds several masks over one base in one folder:
``popup_collection.json`` (collection format 1) records the base's spec, fingerprint and
structure once, and each member's config as its ``popup_config.json`` would hold it without
those fields; each member has its tensor file, named by its content as above, and the card
lists them. The manifest is the commit point, written after the tensor files, so a reader sees
one collection whole; each member is checked as an artifact is, and only the members asked
for are read.
"""

from __future__ import annotations

import hashlib
import math
import os
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors import SafetensorError
from safetensors.numpy import load

from . import __version__
from .artifact_schema import (
    COLLECTION_NAME,
    CONFIG_NAME,
    MASK_PREFIX,
    READABLE_FORMATS,
    REDRAW_PREFIX,
    STATE_PREFIX,
    check_tensors,
    parse_json,
    validate_collection,
    validate_meta,
)
from .codec import StoredMask, decode_counts, decode_masks, entropy_bits
from .config import PopupConfig
from .errors import ArtifactError, BaseMismatchError
from .specs import describe
from .structure import first_difference, library_versions, structure_fingerprint
from .targets import MaskTarget

#: how often a reader re-reads a config that a concurrent save replaced under it
_READ_ATTEMPTS = 5


@dataclass
class Artifact:
    """A mask artifact read back from a folder, checked against its own config."""

    folder: Path
    meta: dict[str, Any]
    config: PopupConfig
    tensors: dict[str, np.ndarray]
    #: its adapter's name when it is a member of a collection (`read_collection`)
    member: str | None = None

    @property
    def config_path(self) -> str:
        """Where its config is, as messages name it: ``popup_config.json``, or its entry in a
        collection's ``popup_collection.json``."""
        if self.member is None:
            return str(self.folder / CONFIG_NAME)
        return f"{self.folder / COLLECTION_NAME} (adapter {self.member!r})"

    @property
    def weights_path(self) -> Path:
        """The tensor file."""
        return self.folder / next(iter(self.meta["files"]))

    @property
    def base_spec(self) -> dict[str, Any]:
        """How to rebuild the base architecture (see `popup_adapter.specs`)."""
        return self.meta["base"]

    @property
    def base_fingerprint(self) -> str:
        """sha256 of the base the mask was trained over."""
        return self.meta["base_fingerprint"]

    @property
    def layers(self) -> dict[str, dict[str, Any]]:
        """``{tensor name: {module, parameter, shape, kept, encoding}}`` of every masked tensor
        (format 1: ``{module name: {shape, kept, encoding}}``, the module's ``weight``)."""
        return self.meta["layers"]

    @property
    def targets(self) -> list[MaskTarget]:
        """The tensors this artifact masks."""
        return [
            MaskTarget(layer.get("module", name), layer.get("parameter", "weight"))
            for name, layer in self.layers.items()
        ]

    def check_structure(self, structure: dict[str, str]) -> None:
        """Refuse a base whose structure
        (`describe_structure`) is not the one this mask was
        trained on, naming the first module that differs and the fix.
        Format-1 artifacts record no structure: only their weight fingerprint is checked.

        Args:
            structure: the base's structure, as described here.

        Raises:
            BaseMismatchError: the structures differ (the message names the first difference, the
                fix, and the library versions when they differ).
        """
        stored = self.meta.get("structure")
        if stored is None or structure_fingerprint(structure) == stored["fingerprint"]:
            return
        difference = first_difference(structure, stored["modules"])
        spec = self.base_spec
        if spec.get("library") == "timm":
            fix = (
                "A timm model built with constructor arguments that cannot be read back from it "
                "(act_layer, output_stride, ...) must be built the same way: pass model="
                "timm.create_model(...) with those arguments, and adapt with "
                "get_popup_model(..., base_kwargs={...}) so that its artifacts record them."
            )
        else:
            fix = f"Pass model= built exactly as the base was ({describe(spec)})."
        saved_with = stored.get("library_versions", {})
        here_with = library_versions()
        versions = ""
        if any(saved_with.get(lib) != here_with.get(lib) for lib in saved_with):
            versions = (
                f" It was saved with {saved_with}, this is {here_with}: if only the versions "
                "differ and you have checked the outputs, check_structure=False skips this check."
            )
        raise BaseMismatchError(
            f"{self.config_path}: the base built here is not the network the mask was "
            f"trained on; their structures first differ at {difference}\n{fix}{versions}"
        )

    def masks(
        self,
        names: Sequence[str],
        weights: Mapping[str, torch.Tensor] | None = None,
        out: Mapping[str, torch.Tensor] | None = None,
    ) -> dict[str, torch.Tensor]:
        """The decoded boolean masks of layers ``names``, decoded together (faster than one
        at a time: see `popup_adapter.codec.decode_masks`).

        Args:
            names: layers of `layers`.
            weights: the regenerated base weights they mask, by name (a mask coded given |W|
                needs its own).
            out: by name, a flat uint8 tensor of one byte per weight to decode into (see
                `popup_adapter.codec.StoredMask`: for a decoder thread).

        Returns:
            The bool masks by name, shaped as their layers (``out``'s memory, when given).

        Raises:
            ArtifactError: a payload does not decode to its recorded kept count.
        """
        weights, out = weights or {}, out or {}
        decoded = decode_masks(
            [
                StoredMask(
                    encoding=self.layers[name]["encoding"],
                    payload=self.tensors[MASK_PREFIX + name],
                    shape=tuple(self.layers[name]["shape"]),
                    kept=self.layers[name]["kept"],
                    where=f"{self.weights_path}, layer {name!r}",
                    bucket_kept=self.layers[name].get("bucket_kept"),
                    weight=weights.get(name),
                    out=out.get(name),
                )
                for name in names
            ]
        )
        return dict(zip(names, decoded, strict=True))

    def mask_needs_base(self, name: str) -> bool:
        """Whether layer ``name``'s mask decodes only given its base weight (coded given |W|).

        Args:
            name: a layer of `layers`.

        Returns:
            True for the ``rans_magnitude`` encoding.
        """
        return self.layers[name]["encoding"] == "rans_magnitude"

    def redraw_counts(self, name: str) -> np.ndarray:
        """Layer ``name``'s IteRand redraw counts of its kept weights (format 4).

        Args:
            name: a layer of `layers`, in an artifact whose config redraws.

        Returns:
            One uint8 count per kept weight, in flat order.

        Raises:
            ArtifactError: the counts do not decode to their recorded histogram.
        """
        return decode_counts(
            self.layers[name]["redraws"],
            self.tensors.get(REDRAW_PREFIX + name, np.zeros(0, np.uint8)),
            where=f"{self.weights_path}, layer {name!r}",
        )

    def stored_state(self) -> dict[str, torch.Tensor]:
        """The stored tensors besides the masks (BatchNorm statistics, saved modules).

        Returns:
            ``{name: tensor}``, as ``PopupModel.trained_state`` names them.
        """
        return {
            key[len(STATE_PREFIX) :]: torch.from_numpy(value.copy())
            for key, value in self.tensors.items()
            if key.startswith(STATE_PREFIX)
        }

    def check_shapes(self, shapes: dict[str, list[int]]) -> None:
        """Refuse a base whose masked tensors are not the artifact's, by name and shape (what a
        load checks on the meta device, before allocating the base).

        Args:
            shapes: every masked tensor of the base, by name, with its shape.

        Raises:
            BaseMismatchError: naming the first tensor that is missing, extra or shaped
                otherwise.
        """
        where = self.config_path
        if set(shapes) != set(self.layers):
            missing = sorted(set(self.layers) - set(shapes))[:5]
            extra = sorted(set(shapes) - set(self.layers))[:5]
            raise BaseMismatchError(
                f"{where} masks other layers than this model has (in the artifact only: "
                f"{missing}; in the model only: {extra}); the base is not "
                f"{describe(self.base_spec)} as the mask expects"
            )
        for name, shape in shapes.items():
            if shape != self.layers[name]["shape"]:
                raise BaseMismatchError(
                    f"{where}: the mask of layer {name!r} has shape "
                    f"{self.layers[name]['shape']}, the model's weight {shape}"
                )

    def check_base(self, shapes: dict[str, list[int]], fingerprint: str) -> None:
        """Refuse a base that is not this mask's weights (its structure is
        `check_structure`'s, checked before adapting).

        Args:
            shapes: as in `check_shapes`.
            fingerprint: the base's weight fingerprint.

        Raises:
            BaseMismatchError: naming the first difference (masked tensors, a shape, the
                weights) and the likely cause.
        """
        self.check_shapes(shapes)
        where = self.config_path
        if fingerprint != self.base_fingerprint:
            raise BaseMismatchError(
                f"the regenerated base does not match the mask in {where}: fingerprint "
                f"{fingerprint} here, {self.base_fingerprint} in the artifact. Likely cause: "
                f"another architecture or constructor arguments than {describe(self.base_spec)}, "
                "a model= whose weights were changed (or, with init='keep', other pretrained "
                "weights), or a timm/transformers version that names or shapes the parameters "
                "differently from the one that saved it "
                f"(saved with popup_adapter {self.meta.get('library_version')})"
            )


def read_artifact(folder: str | os.PathLike) -> Artifact:
    """Read and check an artifact folder: every field its config holds and every tensor its
    tensor file holds, before anything is built from them.

    Args:
        folder: holds ``popup_config.json`` and the tensor file it names.

    Returns:
        The `Artifact`, its tensor file checked against the size and sha256 its config
        records.

    Raises:
        ArtifactError: a file is missing, malformed, corrupted, too large or of an unknown
            format (the message names the file and the field).
    """
    folder = Path(folder)

    def parse(data: bytes, path: Path) -> tuple[dict, PopupConfig]:
        meta = parse_json(data, path)
        version = meta.get("format_version") if isinstance(meta, dict) else None
        if version not in READABLE_FORMATS:
            raise ArtifactError(
                f"{path} has format version {repr(version)[:40]}; this popup_adapter "
                f"({__version__}) reads versions {list(READABLE_FORMATS)}. Upgrade popup_adapter."
            )
        return meta, validate_meta(meta, path)

    (meta, config), blobs = _read_committed(folder, CONFIG_NAME, parse, lambda p: [p[0]])
    return Artifact(folder, meta, config, _checked_tensors(folder, meta, blobs))


def is_collection(folder: str | os.PathLike) -> bool:
    """Whether ``folder`` holds a collection (several masks over one base) rather than one
    artifact.

    Args:
        folder: a local folder.

    Returns:
        True where ``popup_collection.json`` is.
    """
    return (Path(folder) / COLLECTION_NAME).is_file()


def collection_members(
    manifest: dict[str, tuple[dict, PopupConfig]], adapters: list[str] | None, where: object
) -> list[str]:
    """The members to read: ``adapters`` in their order (default: all, in the manifest's).

    Args:
        manifest: as `validate_collection` returns it.
        adapters: the adapters asked for, or None.
        where: the manifest, named in errors.

    Returns:
        Adapter names.

    Raises:
        ArtifactError: an adapter the collection does not hold, or none asked for.
    """
    if adapters is None:
        return list(manifest)
    missing = [name for name in adapters if name not in manifest]
    if missing or not adapters:
        raise ArtifactError(
            f"{where} holds adapters {list(manifest)}; asked for {list(adapters)}"
            + (f", which it lacks ({missing})" if missing else "")
        )
    return list(dict.fromkeys(adapters))


def collection_files(folder: str | os.PathLike, adapters: list[str] | None = None) -> list[str]:
    """The tensor files of ``adapters`` in a collection folder's manifest: what to download
    of a Hub repo before reading them.

    Args:
        folder: holds ``popup_collection.json``.
        adapters: the members wanted (default: all).

    Returns:
        File names.

    Raises:
        ArtifactError: a malformed manifest, or an adapter it does not hold.
    """
    path = Path(folder) / COLLECTION_NAME
    manifest = _parse_collection(_read(path, Path(folder)), path)
    return [
        name
        for member in collection_members(manifest, adapters, path)
        for name in manifest[member][0]["files"]
    ]


def read_collection(
    folder: str | os.PathLike, adapters: list[str] | None = None
) -> dict[str, Artifact]:
    """Read and check a collection folder's manifest and the tensor files of ``adapters``
    alone (the others are not read): each member is checked as an artifact is.

    Args:
        folder: holds ``popup_collection.json`` and its members' tensor files.
        adapters: the members to read (default: all).

    Returns:
        ``{adapter name: Artifact}``, in the order asked for.

    Raises:
        ArtifactError: a missing, malformed or corrupted file, or an adapter the collection
            does not hold.
    """
    folder = Path(folder)
    chosen: list[str] = []

    def files(manifest: dict[str, tuple[dict, PopupConfig]]) -> list[dict]:
        chosen[:] = collection_members(manifest, adapters, folder / COLLECTION_NAME)
        return [manifest[name][0] for name in chosen]

    manifest, blobs = _read_committed(folder, COLLECTION_NAME, _parse_collection, files)
    artifacts = {}
    for name in chosen:
        meta, config = manifest[name]
        tensors = _checked_tensors(folder, meta, blobs)
        artifacts[name] = Artifact(folder, meta, config, tensors, member=name)
    return artifacts


def _parse_collection(data: bytes, path: Path) -> dict[str, tuple[dict, PopupConfig]]:
    return validate_collection(parse_json(data, path), path)


def _read_committed(
    folder: Path, commit: str, parse: Callable[[bytes, Path], Any], metas: Callable[[Any], list]
) -> tuple[Any, dict[str, bytes]]:
    """The commit file, parsed, and the tensor files its ``metas`` name, read as one version:
    a save that replaces them meanwhile makes it read again."""
    path = folder / commit
    for _ in range(_READ_ATTEMPTS):
        data = _read(path, folder)
        parsed = parse(data, path)
        names = [name for meta in metas(parsed) for name in meta["files"]]
        try:
            return parsed, {name: (folder / name).read_bytes() for name in names}
        except FileNotFoundError as error:
            if _read(path, folder) == data:  # not a save replacing it meanwhile
                raise ArtifactError(
                    f"{error.filename}, a tensor file {path} names, does not exist; the "
                    "artifact is incomplete: copy or download the whole folder"
                ) from None
    raise ArtifactError(f"{folder} is being saved to continually; retry once saves stop")


def _checked_tensors(folder: Path, meta: dict, blobs: dict[str, bytes]) -> dict[str, np.ndarray]:
    """The tensors of ``meta``'s tensor file, checked against its recorded size and sha256
    and against the layers it lists."""
    ((name, expected),) = meta["files"].items()
    blob = blobs[name]
    sha256 = hashlib.sha256(blob).hexdigest()
    if len(blob) != expected["size"] or sha256 != expected["sha256"]:
        raise ArtifactError(
            f"{folder / name} is corrupted or truncated: {len(blob)} bytes with "
            f"sha256 {sha256[:16]}..., the config expects {expected['size']} bytes, "
            f"{expected['sha256'][:16]}..."
        )
    try:
        tensors = load(blob)
    except SafetensorError as error:
        raise ArtifactError(f"{folder / name}: not a safetensors file ({error})") from error
    check_tensors(meta["layers"], tensors, folder / name)
    return tensors


def _read(path: Path, folder: Path) -> bytes:
    try:
        return path.read_bytes()
    except (FileNotFoundError, NotADirectoryError):
        raise ArtifactError(
            f"{path} does not exist: {folder} is not a popup_adapter "
            "artifact (save one with model.save_pretrained)"
        ) from None


def artifact_summary(artifact: Artifact) -> dict[str, Any]:
    """Sizes of an artifact against the entropy bound and packed bits, per layer and in total.

    Args:
        artifact: as read by `read_artifact`.

    Returns:
        ``{"layers": [per-layer rows], "weights", "mask_bytes", "entropy_bytes",
        "packed_bytes", "state_bytes", "file_bytes"}``.
    """
    rows = []
    for name, layer in artifact.layers.items():
        numel = math.prod(layer["shape"])
        nbytes = artifact.tensors[MASK_PREFIX + name].size
        rows.append(
            {
                "name": name,
                "shape": layer["shape"],
                "kept": layer["kept"],
                "k": layer["kept"] / numel,
                "encoding": layer["encoding"],
                "bytes": nbytes,
                "bits_per_weight": 8 * nbytes / numel,
                "entropy_bytes": entropy_bits(numel, layer["kept"]) / 8,
            }
        )
    numel = sum(math.prod(layer["shape"]) for layer in artifact.layers.values())
    state_bytes = sum(v.nbytes for k, v in artifact.tensors.items() if k.startswith(STATE_PREFIX))
    return {
        "layers": rows,
        "weights": numel,
        "mask_bytes": sum(r["bytes"] for r in rows),
        "entropy_bytes": sum(r["entropy_bytes"] for r in rows),
        "packed_bytes": sum((math.prod(r["shape"]) + 7) // 8 for r in rows),
        "state_bytes": state_bytes,
        "file_bytes": artifact.weights_path.stat().st_size,
    }
