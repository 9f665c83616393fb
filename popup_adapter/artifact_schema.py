"""What a valid ``popup_config.json`` is: every field the loader reads, checked before it is used.

An artifact may come from anyone, so `read_artifact` parses its
config under bounds (file size, nesting depth; Python caps integers at 4300 digits) and checks
each field it will use: its type, its range and its agreement with the others (each layer's kept
count against k, the tensor file's name against its hash, the base spec against what
popup_adapter can rebuild without running anything the artifact chose). A failure is an
[`ArtifactError`][popup_adapter.ArtifactError] that names the file, the field and the fix, never a
``KeyError`` from deep inside the loader.
"""

from __future__ import annotations

import json
import math
import numbers
import re
from pathlib import Path
from typing import Any

import numpy as np
import torch

from .codec import ENCODINGS, MAGNITUDE_BUCKETS, MAX_COUNT
from .config import PopupConfig
from .errors import ArtifactError, ConfigError
from .selection import num_kept
from .specs import check_spec

FORMAT_VERSION = 4
#: the formats this version reads (every one a release wrote)
READABLE_FORMATS = (1, 2, 3, 4)
CONFIG_NAME = "popup_config.json"
CARD_NAME = "README.md"
#: the files of an artifact, as Hub download patterns
ARTIFACT_PATTERNS = (CONFIG_NAME, CARD_NAME, "popup_model*.safetensors")
#: a collection's manifest: several masks over one base, one tensor file each
COLLECTION_NAME = "popup_collection.json"
#: the manifest's format (each member inside it is an artifact of its own format version)
COLLECTION_FORMAT_VERSION = 1
#: the manifest formats this version reads
READABLE_COLLECTION_FORMATS = (1,)
#: what every member of a collection shares, stored once in its manifest
SHARED_FIELDS = ("base", "base_fingerprint", "structure")
#: an adapter's name as a collection stores it (a PyTorch module name part, no dots)
_ADAPTER_NAME = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_\-]{0,63}")


def is_artifact_file(name: str) -> bool:
    """Whether a file name in a folder belongs to what is saved there, an artifact or a
    collection (an earlier save's tensor files, and the other kind's commit file, are removed
    by the next save: a folder holds one or the other).

    Args:
        name: a file name (no folder).

    Returns:
        True for ``popup_config.json``, ``popup_collection.json``, ``README.md`` and a
        tensor file of any format.
    """
    return name in (CONFIG_NAME, COLLECTION_NAME, CARD_NAME) or is_weights_name(name)


#: the largest ``popup_config.json`` read (a large transformers config with its structure is a
#: few MB)
MAX_CONFIG_BYTES = 64 * 2**20
#: the deepest nesting of lists and objects read (real configs nest about 5 deep)
MAX_DEPTH = 32
#: bounds of one masked tensor's declared shape
MAX_DIMS, MAX_NUMEL = 8, 2**40
#: the tensor file's name in formats 1 and 2; format 3 names it by its content (see
#: `weights_name`), so that a save never replaces the file an older config names
LEGACY_WEIGHTS_NAME = "popup_model.safetensors"
#: the tensor file's keys: a layer's encoded mask, and the other tensors training changed
MASK_PREFIX, STATE_PREFIX = "mask.", "state."
#: format 4: a layer's entropy-coded IteRand redraw counts (`popup_adapter.codec.encode_counts`)
REDRAW_PREFIX = "redraws."


def _has_payload(layer: dict) -> bool:
    """Whether a layer's redraw counts take a payload (they are not all one value)."""
    return sum(1 for n in layer.get("redraws", []) if n) > 1


_HEX64 = re.compile(r"[0-9a-f]{64}")
_WEIGHTS_FILE = re.compile(r"popup_model(-[0-9a-f]{16})?\.safetensors")
_CORRUPTED = (
    "the file is corrupted or was not written by popup_adapter (download it again, or ask "
    "whoever published it to save it again)"
)


def weights_name(format_version: int, sha256: str) -> str:
    """The tensor file's name in an artifact of ``format_version`` whose bytes hash to
    ``sha256``.

    Args:
        format_version: the artifact's format.
        sha256: the tensor file's hash (hex).

    Returns:
        ``popup_model.safetensors`` (formats 1 and 2), else ``popup_model-<16 hex>.safetensors``.
    """
    if format_version < 3:
        return LEGACY_WEIGHTS_NAME
    return f"popup_model-{sha256[:16]}.safetensors"


def is_weights_name(name: str) -> bool:
    """Whether ``name`` is a tensor file's name in some format.

    Args:
        name: a file name.

    Returns:
        Whether it is ``popup_model.safetensors`` or ``popup_model-<16 hex>.safetensors``.
    """
    return _WEIGHTS_FILE.fullmatch(name) is not None


def parse_json(data: bytes, where: object) -> Any:
    """``json.loads`` of an untrusted file, bounded in size and nesting.

    Args:
        data: the file's bytes.
        where: the file, named in errors.

    Returns:
        The parsed value.

    Raises:
        ArtifactError: too large, not UTF-8 JSON, or nested deeper than `MAX_DEPTH`.
    """
    if len(data) > MAX_CONFIG_BYTES:
        raise ArtifactError(
            f"{where} has {len(data):,d} bytes, more than the {MAX_CONFIG_BYTES:,d} a "
            f"popup_adapter config can have; {_CORRUPTED}"
        )
    try:
        value = json.loads(data.decode("utf-8"))
    except (UnicodeDecodeError, ValueError, RecursionError) as error:
        # ValueError covers JSONDecodeError and integers of more than 4300 digits
        raise ArtifactError(f"{where} is corrupted or truncated ({error})") from error
    stack = [(value, 1)]
    while stack:
        item, depth = stack.pop()
        if depth > MAX_DEPTH:
            raise ArtifactError(f"{where} nests deeper than {MAX_DEPTH} levels; {_CORRUPTED}")
        if isinstance(item, (dict, list)):
            children = item.values() if isinstance(item, dict) else item
            stack.extend((child, depth + 1) for child in children)
    return value


def _field(container: dict, key: str, kinds: type | tuple, where: object, path: str) -> Any:
    """``container[key]``, which must exist and be of ``kinds`` (bool is never an int here)."""
    if not isinstance(container, dict) or key not in container:
        raise ArtifactError(f"{where}: field {path!r} is missing; {_CORRUPTED}")
    value, allowed = container[key], kinds if isinstance(kinds, tuple) else (kinds,)
    if not isinstance(value, allowed) or (isinstance(value, bool) and bool not in allowed):
        raise ArtifactError(
            f"{where}: field {path!r} must be {' or '.join(k.__name__ for k in allowed)}, got "
            f"{str(value)[:80]!r}; {_CORRUPTED}"
        )
    return value


def validate_meta(meta: Any, where: object) -> PopupConfig:
    """Check every field of a parsed ``popup_config.json`` that the loader reads.

    Args:
        meta: the parsed file.
        where: the file, named in errors.

    Returns:
        The artifact's [`PopupConfig`][popup_adapter.PopupConfig].

    Raises:
        ArtifactError: naming the first field that is missing, of the wrong type, out of range
            or in contradiction with another.
    """
    if not isinstance(meta, dict):
        raise ArtifactError(f"{where} must hold a JSON object; {_CORRUPTED}")
    version = _field(meta, "format_version", int, where, "format_version")
    try:
        config = PopupConfig.from_dict(_field(meta, "config", dict, where, "config"))
    except (ConfigError, TypeError) as error:
        raise ArtifactError(f"{where}: field 'config' is not a PopupConfig: {error}") from error
    check_spec(_field(meta, "base", dict, where, "base"), where)
    fingerprint = _field(meta, "base_fingerprint", str, where, "base_fingerprint")
    if not _HEX64.fullmatch(fingerprint):
        raise ArtifactError(f"{where}: field 'base_fingerprint' is not a sha256; {_CORRUPTED}")
    if version >= 2:
        structure = _field(meta, "structure", dict, where, "structure")
        _field(structure, "fingerprint", str, where, "structure.fingerprint")
        modules = _field(structure, "modules", dict, where, "structure.modules")
        if not all(_is_structure_entry(entry) for entry in modules.values()):
            raise ArtifactError(
                f"{where}: field 'structure.modules' must map module names to their "
                f"descriptions (class, settings, tensors); {_CORRUPTED}"
            )
        _field(structure, "library_versions", dict, where, "structure.library_versions")
    layers = _field(meta, "layers", dict, where, "layers")
    if not layers:
        raise ArtifactError(
            f"{where}: field 'layers' is empty: the artifact masks nothing (was it saved after "
            "merge_and_unload?); save the adapted model before merging"
        )
    kept = {
        name: _check_layer(name, layer, version, config, where) for name, layer in layers.items()
    }
    if config.selection == "global":
        _check_global_kept(
            kept, {name: math.prod(layer["shape"]) for name, layer in layers.items()}, config, where
        )
    _check_files(meta, version, where)
    metrics = meta.get("metrics", {})
    if not isinstance(metrics, dict) or not all(
        isinstance(v, (int, float, str)) or v is None for v in metrics.values()
    ):
        raise ArtifactError(f"{where}: field 'metrics' must map names to numbers; {_CORRUPTED}")
    if not isinstance(meta.get("dataset"), (str, type(None))):
        raise ArtifactError(f"{where}: field 'dataset' must be a string or null; {_CORRUPTED}")
    return config


def validate_collection(manifest: Any, where: object) -> dict[str, tuple[dict, PopupConfig]]:
    """Check a parsed ``popup_collection.json``: its format, and every member as a
    ``popup_config.json`` is checked (`validate_meta`), with the shared base put back in.

    Args:
        manifest: the parsed file.
        where: the file, named in errors.

    Returns:
        ``{adapter name: (its artifact config, its PopupConfig)}``, in the manifest's order.

    Raises:
        ArtifactError: an unknown format, no adapters, a bad adapter name, a member that
            repeats a shared field, or any member field `validate_meta` refuses.
    """
    if not isinstance(manifest, dict):
        raise ArtifactError(f"{where} must hold a JSON object; {_CORRUPTED}")
    version = _field(manifest, "format_version", int, where, "format_version")
    if version not in READABLE_COLLECTION_FORMATS:
        raise ArtifactError(
            f"{where} has collection format version {version}; this popup_adapter reads "
            f"versions {list(READABLE_COLLECTION_FORMATS)}. Upgrade popup_adapter."
        )
    adapters = _field(manifest, "adapters", dict, where, "adapters")
    if not adapters:
        raise ArtifactError(f"{where}: field 'adapters' is empty: the collection holds no mask")
    shared = {key: manifest[key] for key in SHARED_FIELDS if key in manifest}
    members = {}
    for name, member in adapters.items():
        if not _ADAPTER_NAME.fullmatch(name) or name == "__base__":
            raise ArtifactError(
                f"{where}: adapter name {name[:80]!r} is not one a model can hold (letters, "
                f"digits, '_' and '-', at most 64, not '__base__'); {_CORRUPTED}"
            )
        repeated = [key for key in SHARED_FIELDS if isinstance(member, dict) and key in member]
        if not isinstance(member, dict) or repeated:
            raise ArtifactError(
                f"{where}: adapter {name!r} must be an artifact config without the shared "
                f"fields {list(SHARED_FIELDS)}; {_CORRUPTED}"
            )
        meta = {**member, **shared}
        members[name] = meta, validate_meta(meta, f"{where} (adapter {name!r})")
    return members


def _is_structure_entry(entry: Any) -> bool:
    """A module's description as `describe_structure` writes it."""
    if not isinstance(entry, dict):
        return False
    if "alias of" in entry:
        return isinstance(entry["alias of"], str)
    return isinstance(entry.get("class"), str) and all(
        isinstance(entry.get(part), dict) and all(isinstance(v, str) for v in entry[part].values())
        for part in ("settings", "tensors")
    )


def _check_global_kept(kept: dict, sizes: dict, config: PopupConfig, where: object) -> None:
    """A global top-k's counts: ``round(k * total)`` in all, each layer at its floor or more."""
    floors = {name: num_kept(config.min_layer_k, n) for name, n in sizes.items()}
    expected = max(round(config.k * sum(sizes.values())), sum(floors.values()))
    low = [name for name in kept if kept[name] < floors[name]]
    if sum(kept.values()) != expected or low:
        raise ArtifactError(
            f"{where}: the masks keep {sum(kept.values())} weights in all"
            + (f", {low[0]!r} fewer than its floor {floors[low[0]]}" if low else "")
            + f", but a global k={config.k} keeps {expected} (min_layer_k="
            f"{config.min_layer_k}): the config and the masks disagree; {_CORRUPTED}"
        )


def _check_layer(name: str, layer: Any, version: int, config: PopupConfig, where: object) -> int:
    """One ``layers`` entry: its shape, kept count (as k gives it, per layer), encoding and
    target; returns the kept count."""
    path = f"layers.{name}"
    shape = _field(layer, "shape", list, where, f"{path}.shape")
    if not 1 <= len(shape) <= MAX_DIMS or not all(
        isinstance(d, int) and not isinstance(d, bool) and 1 <= d <= MAX_NUMEL for d in shape
    ):
        raise ArtifactError(
            f"{where}: field '{path}.shape' must be 1 to {MAX_DIMS} positive sizes, got "
            f"{str(shape)[:80]}; {_CORRUPTED}"
        )
    numel = math.prod(shape)
    if numel > MAX_NUMEL:
        raise ArtifactError(f"{where}: layer {name!r} declares {numel:,d} weights; {_CORRUPTED}")
    experts = layer.get("experts", 1)
    if (
        isinstance(experts, bool)
        or not isinstance(experts, int)
        or experts != (shape[0] if "experts" in layer else 1)
    ):
        raise ArtifactError(
            f"{where}: field '{path}.experts' must be the first size of its shape; {_CORRUPTED}"
        )
    kept = _field(layer, "kept", int, where, f"{path}.kept")
    expected = experts * num_kept(config.k, numel // experts)
    if config.selection == "global" and experts == 1:  # the total is checked (the caller)
        if not 1 <= kept <= numel:
            raise ArtifactError(f"{where}: layer {name!r} keeps {kept} of {numel}; {_CORRUPTED}")
    elif kept != expected:
        raise ArtifactError(
            f"{where}: layer {name!r} keeps {kept} of {numel} weights, but k={config.k} keeps "
            f"{expected}: the config and the masks disagree; {_CORRUPTED}"
        )
    if _field(layer, "encoding", str, where, f"{path}.encoding") not in ENCODINGS:
        raise ArtifactError(
            f"{where}: layer {name!r} has encoding {layer['encoding']!r}; this popup_adapter "
            f"knows {list(ENCODINGS)}. Upgrade popup_adapter?"
        )
    if layer["encoding"] == "rans_magnitude":  # the kept count of each |W| bucket
        counts = _field(layer, "bucket_kept", list, where, f"{path}.bucket_kept")
        if not (
            len(counts) == MAGNITUDE_BUCKETS
            and all(isinstance(n, int) and not isinstance(n, bool) and n >= 0 for n in counts)
            and sum(counts) == kept
        ):
            raise ArtifactError(
                f"{where}: field '{path}.bucket_kept' must split the {kept} kept weights over "
                f"{MAGNITUDE_BUCKETS} |W| buckets; {_CORRUPTED}"
            )
    if config.redraw_every:  # IteRand: the kept weights' redraw counts, as a histogram
        histogram = _field(layer, "redraws", list, where, f"{path}.redraws")
        if not (
            1 <= len(histogram) <= MAX_COUNT + 1
            and all(isinstance(n, int) and not isinstance(n, bool) and n >= 0 for n in histogram)
            and sum(histogram) == kept
        ):
            raise ArtifactError(
                f"{where}: field '{path}.redraws' must count the {kept} kept weights by "
                f"their number of redraws (0 to {MAX_COUNT}); {_CORRUPTED}"
            )
    if version >= 2:
        _field(layer, "module", str, where, f"{path}.module")
        parameter = _field(layer, "parameter", str, where, f"{path}.parameter")
        if not parameter.isidentifier():
            raise ArtifactError(f"{where}: field '{path}.parameter' is not a parameter name")
    return kept


def _check_files(meta: dict, version: int, where: object) -> None:
    """``files``: exactly the tensor file, named as its format names it, with size and hash."""
    files = _field(meta, "files", dict, where, "files")
    if len(files) != 1:
        raise ArtifactError(f"{where}: field 'files' must name one tensor file; {_CORRUPTED}")
    ((name, entry),) = files.items()
    sha256 = _field(entry, "sha256", str, where, f"files.{name}.sha256")
    size = _field(entry, "size", int, where, f"files.{name}.size")
    if not _HEX64.fullmatch(sha256) or size < 0 or name != weights_name(version, sha256):
        raise ArtifactError(
            f"{where}: field 'files' names {name!r}, not the tensor file of this format "
            f"({weights_name(version, sha256)!r}); {_CORRUPTED}"
        )


def checked_metrics(metrics: dict[str, Any] | None) -> dict[str, float | int | str]:
    """Metrics as strict JSON stores them, checked before a save writes anything.

    numpy scalars and one-element tensors become Python numbers; NaN and infinities become the
    strings ``"NaN"``, ``"Infinity"`` and ``"-Infinity"`` (strict JSON has no such numbers, and
    a diverged run's artifact should still save).

    Args:
        metrics: ``{name: number or string}``, or None.

    Returns:
        The metrics, plain.

    Raises:
        ArtifactError: a name that is not a string, or a value that is not a number or string.
    """
    plain: dict[str, float | int | str] = {}
    for name, value in (metrics or {}).items():
        if isinstance(value, torch.Tensor) and value.numel() == 1:
            value = value.item()
        if not isinstance(name, str) or not isinstance(value, (numbers.Real, str)):
            raise ArtifactError(
                f"metrics[{name!r}] is {type(value).__name__} {str(value)[:60]!r}: a metric "
                "must be a number or a string under a string name (pass float(value))"
            )
        if isinstance(value, numbers.Integral) and not isinstance(value, bool):
            value = int(value)
        elif isinstance(value, numbers.Real):
            value = float(value)
            if not math.isfinite(value):
                value = "NaN" if math.isnan(value) else ("Infinity" if value > 0 else "-Infinity")
        plain[name] = value
    return plain


def check_tensors(
    layers: dict[str, dict[str, Any]], tensors: dict[str, np.ndarray], where: Path
) -> None:
    """Check the tensor file against its config's layers: one uint8 payload per layer, sized
    as its encoding needs, and nothing but masks and state.

    Args:
        layers: the config's ``layers``, already validated.
        tensors: the tensor file's contents.
        where: the tensor file, named in errors.

    Raises:
        ArtifactError: naming the tensor.
    """
    masks = {MASK_PREFIX + name for name in layers}
    masks |= {REDRAW_PREFIX + name for name, layer in layers.items() if _has_payload(layer)}
    unexpected = [key for key in tensors if key not in masks and not key.startswith(STATE_PREFIX)]
    missing = sorted(masks - set(tensors))
    if unexpected or missing:
        raise ArtifactError(
            f"{where} does not hold the masks its config lists (missing {missing[:5]}, "
            f"unexpected {unexpected[:5]}); the file is corrupted or not this config's"
        )
    for name, layer in layers.items():
        counts = tensors.get(REDRAW_PREFIX + name)
        if counts is not None and (counts.dtype != np.uint8 or counts.ndim != 1 or counts.size % 4):
            raise ArtifactError(
                f"{where}: the redraw counts of layer {name!r} are not an rANS stream of "
                "uint8 bytes; the file is corrupted"
            )
        payload = tensors[MASK_PREFIX + name]
        packed = (math.prod(layer["shape"]) + 7) // 8
        size = {"packed": packed, "all": 0}.get(layer["encoding"])
        if (
            payload.dtype != np.uint8
            or payload.ndim != 1
            or (payload.size != size if size is not None else not 0 < payload.size < packed)
        ):
            raise ArtifactError(
                f"{where}: the mask of layer {name!r} is {payload.dtype} of shape "
                f"{list(payload.shape)}, not the uint8 bytes a {layer['encoding']} mask of shape "
                f"{layer['shape']} takes; the file is corrupted"
            )
