"""What is on disk: the mask artifact, a folder of three files.

- ``popup_config.json``: format and library versions, the :class:`PopupConfig`, the base's spec,
  weight fingerprint and structure (format 2), every masked tensor's module, parameter, shape,
  kept count and encoding, and the sha256 of the tensor file;
- ``popup_model.safetensors``: each layer's encoded mask (``mask.<layer>``, uint8) and the other
  tensors training changed (``state.<name>``: BatchNorm statistics, ``modules_to_save``,
  trained norms);
- ``README.md``: a Hub model card.

Nothing is pickled. Every file is written atomically (temporary file, then rename), so an
interrupted save never leaves a half-written file under the final name, and the recorded sha256
catches a tensor file that does not belong to its config.

Format 1 (the first release) had no structure and named each masked layer's ``weight`` by its
module; it stays readable: its masks load onto the tensors it lists, whatever later versions
mask by default.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import secrets
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors import SafetensorError
from safetensors.numpy import load
from safetensors.torch import save

from . import __version__
from .base import first_difference, structure_fingerprint
from .card import model_card
from .codec import decode_mask, encode_mask, entropy_bits
from .config import PopupConfig
from .errors import ArtifactError, BaseMismatchError
from .specs import describe
from .targets import MaskTarget

FORMAT_VERSION = 2
#: the formats this version reads (every one a release wrote)
READABLE_FORMATS = (1, 2)
CONFIG_NAME = "popup_config.json"
WEIGHTS_NAME = "popup_model.safetensors"
CARD_NAME = "README.md"
ARTIFACT_FILES = (CONFIG_NAME, WEIGHTS_NAME, CARD_NAME)
_MASK_PREFIX, _STATE_PREFIX = "mask.", "state."


def atomic_write(path: Path, data: bytes) -> None:
    """Write ``data`` to ``path`` so that readers see the old file or the new one, never half.

    The temporary file is created with mode 0666 and the process umask applies, as for any
    file the user writes (``tempfile.mkstemp`` would make it 0600, and reading the umask to
    undo that means setting it: a process-wide side effect).
    """
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.parent / f".{path.name}.{os.getpid()}.{secrets.token_hex(8)}.tmp"
    try:
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)
        with os.fdopen(fd, "wb") as handle:
            handle.write(data)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


@dataclass
class ArtifactFiles:
    """An artifact's files in memory: the tensor file's bytes and the config they belong to."""

    blob: bytes
    meta: dict[str, Any]

    def write(self, save_directory: str | os.PathLike) -> Path:
        """Write the three files (each atomically) into ``save_directory``."""
        folder = Path(save_directory)
        atomic_write(folder / WEIGHTS_NAME, self.blob)
        atomic_write(folder / CONFIG_NAME, (json.dumps(self.meta, indent=2) + "\n").encode())
        atomic_write(folder / CARD_NAME, model_card(self.meta, len(self.blob)).encode())
        return folder


@dataclass
class ArtifactContents:
    """What an artifact records, as plain data (a :class:`~popup_adapter.PopupModel` gathers
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


def encode_artifact(
    contents: ArtifactContents,
    dataset: str | None = None,
    metrics: dict[str, float] | None = None,
) -> ArtifactFiles:
    """Encode ``contents`` as the artifact's files, in memory.

    Args:
        contents: the masks and everything else the artifact records.
        dataset: recorded in the model card.
        metrics: recorded in the config and the card.

    Returns:
        The files, to write (:meth:`ArtifactFiles.write`) or push.
    """
    tensors: dict[str, torch.Tensor] = {}
    layers: dict[str, dict[str, Any]] = {}
    for target, mask, experts in contents.masks:
        encoding, payload = encode_mask(mask)
        tensors[_MASK_PREFIX + target.key] = torch.from_numpy(payload)
        layers[target.key] = {
            "module": target.module,
            "parameter": target.parameter,
            "shape": list(mask.shape),
            "kept": int(mask.sum()),
            "encoding": encoding,
            **({"experts": experts} if experts is not None else {}),
        }
    for name, value in contents.state.items():
        tensors[_STATE_PREFIX + name] = value.to("cpu").contiguous()
    blob = save(
        # one metadata key: safetensors writes several in no fixed order, and identical saves
        # should be identical bytes (the same sha256, so the Hub and its cache deduplicate them)
        tensors,
        metadata={"format": f"popup_adapter/{FORMAT_VERSION}"},
    )
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
            "library_versions": _library_versions(),
            "modules": contents.base_structure,
        },
        "layers": layers,
        "files": {WEIGHTS_NAME: {"sha256": hashlib.sha256(blob).hexdigest(), "size": len(blob)}},
        "dataset": dataset,
        "metrics": metrics or {},
    }
    return ArtifactFiles(blob, meta)


def _library_versions() -> dict[str, str]:
    """The versions of the libraries that shape a base, of those loaded (for messages)."""
    versions = {"torch": torch.__version__}
    for name in ("timm", "transformers"):
        if name in sys.modules:
            versions[name] = sys.modules[name].__version__
    return versions


@dataclass
class Artifact:
    """A mask artifact read back from a folder, checked against its own config."""

    folder: Path
    meta: dict[str, Any]
    config: PopupConfig
    tensors: dict[str, np.ndarray]

    @property
    def base_spec(self) -> dict[str, Any]:
        """How to rebuild the base architecture (see :mod:`popup_adapter.specs`)."""
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
        """Refuse a base whose structure (:func:`~popup_adapter.base.describe_structure`) is not
        the one this mask was trained on, naming the first module that differs and the fix.
        Format-1 artifacts record no structure: only their weight fingerprint is checked."""
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
        here_with = _library_versions()
        versions = ""
        if any(saved_with.get(lib) != here_with.get(lib) for lib in saved_with):
            versions = (
                f" It was saved with {saved_with}, this is {here_with}: if only the versions "
                "differ and you have checked the outputs, check_structure=False skips this check."
            )
        raise BaseMismatchError(
            f"{self.folder / CONFIG_NAME}: the base built here is not the network the mask was "
            f"trained on; their structures first differ at {difference}\n{fix}{versions}"
        )

    def mask(self, name: str) -> torch.Tensor:
        """The decoded boolean mask of layer ``name``."""
        layer = self.layers[name]
        return decode_mask(
            layer["encoding"],
            self.tensors[_MASK_PREFIX + name],
            tuple(layer["shape"]),
            layer["kept"],
            where=f"{self.folder / WEIGHTS_NAME}, layer {name!r}",
        )

    def stored_state(self) -> dict[str, torch.Tensor]:
        """The stored tensors besides the masks (BatchNorm statistics, saved modules)."""
        return {
            key[len(_STATE_PREFIX) :]: torch.from_numpy(value.copy())
            for key, value in self.tensors.items()
            if key.startswith(_STATE_PREFIX)
        }

    def check_base(self, shapes: dict[str, list[int]], fingerprint: str) -> None:
        """Refuse a base that is not this mask's weights (its structure is
        :meth:`check_structure`'s, checked before adapting).

        Args:
            shapes: every masked tensor of the base, by name, with its shape.
            fingerprint: the base's weight fingerprint.

        Raises:
            BaseMismatchError: naming the first difference (masked tensors, a shape, the
                weights) and the likely cause.
        """
        where = self.folder / CONFIG_NAME
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
    """Read and check an artifact folder.

    Args:
        folder: holds ``popup_config.json`` and ``popup_model.safetensors``.

    Returns:
        The :class:`Artifact`, its tensor file checked against the size and sha256 its config
        records.

    Raises:
        ArtifactError: a file is missing, malformed, corrupted, or of an unknown format.
    """
    folder = Path(folder)
    config_path, weights_path = folder / CONFIG_NAME, folder / WEIGHTS_NAME
    for path in (config_path, weights_path):
        if not path.is_file():
            raise ArtifactError(
                f"{path} does not exist: {folder} is not a popup_adapter "
                "artifact (save one with model.save_pretrained)"
            )
    try:
        meta = json.loads(config_path.read_text())
        version = meta["format_version"]
    except (json.JSONDecodeError, UnicodeDecodeError, KeyError, TypeError) as error:
        raise ArtifactError(f"{config_path} is corrupted or truncated ({error})") from error
    if version not in READABLE_FORMATS:
        raise ArtifactError(
            f"{config_path} has format version {version!r}; this popup_adapter "
            f"({__version__}) reads versions {list(READABLE_FORMATS)}. Upgrade popup_adapter."
        )
    blob = weights_path.read_bytes()
    expected = meta["files"][WEIGHTS_NAME]
    if len(blob) != expected["size"] or hashlib.sha256(blob).hexdigest() != expected["sha256"]:
        raise ArtifactError(
            f"{weights_path} is corrupted or truncated: {len(blob)} bytes with "
            f"sha256 {hashlib.sha256(blob).hexdigest()[:16]}..., the config "
            f"expects {expected['size']} bytes, {expected['sha256'][:16]}..."
        )
    try:
        tensors = load(blob)
        config = PopupConfig.from_dict(meta["config"])
    except (SafetensorError, ValueError, TypeError) as error:
        raise ArtifactError(f"{folder}: cannot read the artifact ({error})") from error
    return Artifact(folder=folder, meta=meta, config=config, tensors=tensors)


def artifact_summary(artifact: Artifact) -> dict[str, Any]:
    """Sizes of an artifact against the entropy bound and packed bits, per layer and in total."""
    rows = []
    for name, layer in artifact.layers.items():
        numel = math.prod(layer["shape"])
        nbytes = artifact.tensors[_MASK_PREFIX + name].size
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
    state_bytes = sum(v.nbytes for k, v in artifact.tensors.items() if k.startswith(_STATE_PREFIX))
    return {
        "layers": rows,
        "weights": numel,
        "mask_bytes": sum(r["bytes"] for r in rows),
        "entropy_bytes": sum(r["entropy_bytes"] for r in rows),
        "packed_bytes": sum((math.prod(r["shape"]) + 7) // 8 for r in rows),
        "state_bytes": state_bytes,
        "file_bytes": (artifact.folder / WEIGHTS_NAME).stat().st_size,
    }
