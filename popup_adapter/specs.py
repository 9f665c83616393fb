"""How a base model is rebuilt from an artifact: a spec written at save time, read at load time.

A spec records just what rebuilds the architecture: for timm its name, the constructor
arguments that can be read back from the built model and those the user gave
(``base_kwargs``), for transformers the model class and its full config (and, for a pretrained
base, where its weights come from), for popup_adapter's own networks their constructor
arguments. The weights never travel: they come back from the seed (or the pretrained source),
and the fingerprints prove they did. timm and transformers are imported only here, and only
for a spec of their kind.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
from pathlib import Path
from typing import Any

import torch
from huggingface_hub.errors import HFValidationError
from huggingface_hub.utils import validate_repo_id
from torch import nn

from .convnets import ConvNet
from .errors import ArtifactError, ConfigError
from .init_skip import build_on_meta, build_skipping_layer_init

LIBRARIES = ("timm", "transformers", "popup_adapter", "custom")
#: ``timm.create_model``'s own arguments: they load weights or configs from files and repos (a
#: spec passes constructor arguments only, whatever an artifact says)
TIMM_LOADING_ARGUMENTS = frozenset(
    {"pretrained", "pretrained_cfg", "pretrained_cfg_overlay", "checkpoint_path", "cache_dir"}
    | {"scriptable", "exportable", "no_jit"}
)
#: a registered model name: no ``hf-hub:`` / ``local-dir:`` prefix, no path
_MODEL_NAME = re.compile(r"[A-Za-z][A-Za-z0-9_.\-]{0,127}")


def _pretrained_source(model: nn.Module) -> dict[str, str]:
    """Where a transformers model's pretrained weights came from, portably: a Hub repo id, or
    the name of the local folder it was loaded from (a machine-local path is not recorded)."""
    name_or_path = str(getattr(model.config, "_name_or_path", "") or "")
    if not name_or_path:
        return {}
    if Path(name_or_path).exists():
        return {"pretrained_folder": Path(name_or_path).name}
    return {"name_or_path": name_or_path}


def _checked_base_kwargs(base_kwargs: dict[str, Any] | None, library: str) -> dict[str, Any]:
    if not base_kwargs:
        return {}
    if library != "timm":
        raise ConfigError(
            "base_kwargs records constructor arguments of a timm model; a transformers model is "
            "rebuilt from its config, popup_adapter's own networks from their spec"
        )
    if not isinstance(base_kwargs, dict) or not all(isinstance(k, str) for k in base_kwargs):
        raise TypeError(f"base_kwargs must be a dict with string keys, got {base_kwargs!r}")
    try:
        json.dumps(base_kwargs, allow_nan=False)
    except (TypeError, ValueError) as error:
        raise TypeError(
            f"base_kwargs must be JSON values (strings, numbers, lists...), as the artifact "
            f"stores them: {error}. Name a layer by its timm string, e.g. act_layer='gelu'"
        ) from error
    return {"base_kwargs": dict(base_kwargs)}


#: timm's ``features_only`` wrappers, by the ``feature_cls`` name that rebuilds each
_TIMM_FEATURE_CLASSES = {
    "FeatureListNet": "list",
    "FeatureDictNet": "dict",
    "FeatureHookNet": "hook",
    "FeatureGetterNet": "getter",
    "FeatureGraphNet": "fx",
}


def _timm_head_kwargs(model: nn.Module) -> dict[str, Any]:
    """What rebuilds a timm model's output: its classifier size, or for a ``features_only``
    model (which has no classifier) the wrapper class and the feature levels it returns."""
    feature_cls = _TIMM_FEATURE_CLASSES.get(type(model).__name__)
    if feature_cls is None:
        return {"num_classes": model.num_classes}
    return {
        "features_only": True,
        "feature_cls": feature_cls,
        "out_indices": [int(i) for i in model.feature_info.out_indices],
    }


def describe_base(model: nn.Module, base_kwargs: dict[str, Any] | None = None) -> dict[str, Any]:
    """The spec of a model: what rebuilds its architecture from an artifact alone.

    Args:
        model: the plain model.
        base_kwargs: timm only: constructor arguments stored and passed to
            ``timm.create_model`` on rebuild.

    Returns:
        A JSON-serialisable dict; ``{"library": "custom", ...}`` when popup_adapter cannot
        rebuild the model (then ``from_pretrained`` needs ``model=``).
    """
    module = type(model).__module__
    if module.startswith("transformers.") and hasattr(model, "config"):
        _checked_base_kwargs(base_kwargs, "transformers")
        return {
            "library": "transformers",
            "class": type(model).__name__,
            # without the machine-local path a pretrained model was loaded from
            "config": {k: v for k, v in model.config.to_dict().items() if k != "_name_or_path"},
            **_pretrained_source(model),
        }
    if module.startswith("timm.") and getattr(model, "pretrained_cfg", None):
        kwargs = _timm_head_kwargs(model)
        first_conv = next((m for m in model.modules() if isinstance(m, nn.Conv2d)), None)
        if isinstance(getattr(model, "in_chans", None), int):  # the model says (a DCT stem...)
            kwargs["in_chans"] = model.in_chans
        elif first_conv is not None:
            kwargs["in_chans"] = first_conv.in_channels
        # a features_only ViT (FeatureGetterNet) holds the model it wraps as .model
        wrapped = model.model if type(model).__name__ == "FeatureGetterNet" else model
        patch_embed = getattr(wrapped, "patch_embed", None)
        if getattr(patch_embed, "img_size", None) is not None:
            kwargs["img_size"] = list(patch_embed.img_size)
        return {
            "library": "timm",
            "architecture": model.pretrained_cfg["architecture"],
            "kwargs": kwargs,
            **_checked_base_kwargs(base_kwargs, "timm"),
        }
    _checked_base_kwargs(base_kwargs, "other")
    if module.startswith("popup_adapter.") and hasattr(model, "spec"):
        return {
            "library": "popup_adapter",
            "class": type(model).__name__,
            "kwargs": dict(model.spec),
        }
    return {"library": "custom", "class": f"{module}.{type(model).__qualname__}"}


def describe(spec: dict[str, Any]) -> str:
    """One line naming the base, for messages and model cards.

    Args:
        spec: a base spec.

    Returns:
        e.g. ``"timm resnet50"`` or ``"transformers BertModel (bert)"``.
    """
    library = spec.get("library")
    if library == "timm":
        return f"timm {spec['architecture']}"
    if library == "transformers":
        return f"transformers {spec['class']} ({spec['config'].get('model_type', '?')})"
    return f"{library} {spec.get('class', '?')}"


def check_spec(spec: dict[str, Any], where: object) -> None:
    """Refuse a spec that would not rebuild as written here, before anything is built.

    An artifact's spec is untrusted: its library must be one popup_adapter rebuilds, its fields
    of the types it writes, a timm name a registered model's (not ``hf-hub:...``,
    ``local-dir:...`` or a path, which would make timm fetch what the artifact chose), its
    constructor arguments free of ``timm.create_model``'s loading arguments
    (``checkpoint_path``, ``pretrained_cfg``...), a pretrained source a Hub repo id.

    Args:
        spec: an artifact's ``base``.
        where: the file, named in errors.

    Raises:
        ArtifactError: naming the field.
    """

    def refuse(field: str, problem: str) -> None:
        raise ArtifactError(
            f"{where}: field 'base.{field}' {problem}; the file is corrupted or was not written "
            "by popup_adapter (download it again, or ask whoever published it to save it again)"
        )

    library = spec.get("library")
    if library not in LIBRARIES:
        refuse("library", f"is {str(library)[:40]!r}, not one of {list(LIBRARIES)}")
    fields = {"timm": {"architecture": str, "kwargs": dict}, "custom": {"class": str}}.get(
        library, {"class": str, "config" if library == "transformers" else "kwargs": dict}
    )
    optional = {"base_kwargs": dict, "name_or_path": str, "pretrained_folder": str}
    for field, kind in fields.items():
        if not isinstance(spec.get(field), kind):
            refuse(field, f"must be a {kind.__name__}")
    for field, kind in optional.items():
        if field in spec and not isinstance(spec[field], kind):
            refuse(field, f"must be a {kind.__name__}")
    if library == "timm":
        if not _MODEL_NAME.fullmatch(spec["architecture"]):
            refuse(
                "architecture",
                f"is {spec['architecture'][:60]!r}, not a timm model name (names that point at "
                "a Hub repo or a file, hf-hub:... or local-dir:..., are refused)",
            )
        loading = TIMM_LOADING_ARGUMENTS & {*spec["kwargs"], *spec.get("base_kwargs", {})}
        if loading:
            refuse("kwargs", f"passes {sorted(loading)}: timm.create_model loads files with them")
    elif library == "popup_adapter" and spec["class"] != ConvNet.__name__:
        refuse("class", f"is {spec['class'][:60]!r}; popup_adapter builds {ConvNet.__name__}")
    if "name_or_path" in spec:
        try:
            validate_repo_id(spec["name_or_path"])
        except HFValidationError:
            refuse("name_or_path", f"is {spec['name_or_path'][:80]!r}, not a Hub repo id")


def build_base(
    spec: dict[str, Any],
    pretrained: bool = False,
    pretrained_source: str | os.PathLike | None = None,
    meta: bool = False,
    skip_layer_init: bool = False,
) -> nn.Module:
    """Rebuild the architecture a spec describes (random weights; the seed sets them after).

    Args:
        spec: as `describe_base` wrote it (an artifact's ``base``, checked by
            `check_spec`).
        pretrained: an ``init="keep"`` artifact: a transformers base is loaded with the stored
            config (so a head is built as it was) rather than built at random.
        pretrained_source: where the pretrained weights are (a folder or Hub id); default the
            Hub repo the spec records (its local cache under ``HF_HUB_OFFLINE``). Only
            safetensors weights are read, never a pickle, and no remote code runs.
        meta: build on the meta device (shapes only, nothing allocated, nothing downloaded):
            what a load checks before it builds for real.
        skip_layer_init: leave the Linear/Conv weights unset where that is sound
            (`popup_adapter.init_skip`), for a seeded base whose seeding draws them next.

    Returns:
        The plain model.

    Raises:
        ArtifactError: the spec names a model this library version lacks, a custom model,
            constructor arguments the model refuses, a pretrained source that cannot be
            found, or pretrained weights of a timm model, whose source it does not record
            (the message says what to pass).
    """
    library = spec.get("library")
    if library == "custom":
        raise ArtifactError(
            f"the base of this mask is a {spec.get('class', 'custom model')}, which "
            "popup_adapter cannot rebuild by itself; pass model= with that "
            "architecture (its weights are regenerated from the seed)"
        )
    if pretrained and library != "transformers":
        raise ArtifactError(
            f"this mask was learned over pretrained weights of {describe(spec)} (init='keep'), "
            "which the artifact does not carry and this spec records no source for; pass "
            "model= with those weights, e.g. model=timm.create_model(name, pretrained=True) "
            "(their fingerprint is checked against the artifact's)"
        )

    def build() -> nn.Module:
        with torch.device("meta") if meta else contextlib.nullcontext():
            if library == "timm":
                return _build_timm(spec)
            if library == "transformers":
                return _build_transformers(spec, pretrained and not meta, pretrained_source)
            return ConvNet(**spec["kwargs"])

    try:
        if meta:
            return build_on_meta(build)
        if skip_layer_init and not pretrained:
            return build_skipping_layer_init(build)
        return build()
    except ArtifactError:
        raise
    except Exception as error:  # the spec's arguments reach third-party constructors as they are
        raise ArtifactError(
            f"{describe(spec)} does not build from the artifact's spec ({type(error).__name__}: "
            f"{str(error)[:300]}); the artifact was saved with other library versions or is "
            "corrupted: pass model= with the base built as it was"
        ) from error


def _build_timm(spec: dict[str, Any]) -> nn.Module:
    import timm

    if not timm.is_model(spec["architecture"]):
        raise ArtifactError(
            f"timm {timm.__version__} has no model {spec['architecture']!r}; upgrade timm or "
            "pass model="
        )
    kwargs = {**spec["kwargs"], **spec.get("base_kwargs", {})}
    return timm.create_model(spec["architecture"], pretrained=False, **kwargs)


def _build_transformers(
    spec: dict[str, Any], pretrained: bool, pretrained_source: str | os.PathLike | None
) -> nn.Module:
    import transformers
    from transformers import PreTrainedModel

    model_class = getattr(transformers, spec["class"], None)
    if not (isinstance(model_class, type) and issubclass(model_class, PreTrainedModel)):
        raise ArtifactError(
            f"transformers {transformers.__version__} has no model class "
            f"{spec['class']!r}; upgrade transformers or pass model="
        )
    config = model_class.config_class.from_dict(spec["config"])
    if not pretrained:
        return model_class(config)
    source = pretrained_source or spec.get("name_or_path")
    if not source:
        folder = spec.get("pretrained_folder")
        where = f"a local folder named {folder!r}" if folder else "a source it did not record"
        raise ArtifactError(
            f"this mask was trained over a pretrained {spec['class']} loaded from {where} "
            "on the machine that saved it; pass base_model_name_or_path= with your copy of "
            "those weights (a folder or Hub repo id), or model= with the loaded base"
        )
    try:
        model = model_class.from_pretrained(
            source, config=config, use_safetensors=True, trust_remote_code=False
        )
    except OSError as error:
        raise ArtifactError(
            f"cannot load the pretrained base {str(source)!r} this mask was trained over "
            f"({error}); pass base_model_name_or_path= with a copy of it (safetensors weights), "
            "or model="
        ) from error
    if spec.get("name_or_path"):  # a local copy of a Hub model still names the Hub repo
        model.config._name_or_path = spec["name_or_path"]
    return model
