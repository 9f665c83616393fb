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

import importlib
import json
import os
from pathlib import Path
from typing import Any

from torch import nn

from .errors import ArtifactError, ConfigError


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
        kwargs: dict[str, Any] = {"num_classes": model.num_classes}
        first_conv = next((m for m in model.modules() if isinstance(m, nn.Conv2d)), None)
        if isinstance(getattr(model, "in_chans", None), int):  # the model says (a DCT stem...)
            kwargs["in_chans"] = model.in_chans
        elif first_conv is not None:
            kwargs["in_chans"] = first_conv.in_channels
        patch_embed = getattr(model, "patch_embed", None)
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
    """One line naming the base, for messages and model cards."""
    library = spec.get("library")
    if library == "timm":
        return f"timm {spec['architecture']}"
    if library == "transformers":
        return f"transformers {spec['class']} ({spec['config'].get('model_type', '?')})"
    return f"{library} {spec.get('class', '?')}"


def build_base(
    spec: dict[str, Any],
    pretrained: bool = False,
    pretrained_source: str | os.PathLike | None = None,
) -> nn.Module:
    """Rebuild the architecture a spec describes (random weights; the seed sets them after).

    Args:
        spec: as :func:`describe_base` wrote it (an artifact's ``base``).
        pretrained: an ``init="keep"`` artifact: a transformers base is loaded with the stored
            config (so a head is built as it was) rather than built at random.
        pretrained_source: where the pretrained weights are (a folder or Hub id); default the
            Hub repo the spec records (its local cache under ``HF_HUB_OFFLINE``).

    Returns:
        The plain model.

    Raises:
        ArtifactError: the spec names a class this library version lacks, a custom model, or a
            pretrained source that cannot be found (the message says what to pass).
    """
    library = spec.get("library")
    if library == "timm":
        import timm

        kwargs = {**spec["kwargs"], **spec.get("base_kwargs", {})}
        return timm.create_model(spec["architecture"], pretrained=False, **kwargs)
    if library == "transformers":
        import transformers

        model_class = getattr(transformers, spec["class"], None)
        if model_class is None:
            raise ArtifactError(
                f"transformers {transformers.__version__} has no class "
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
            model = model_class.from_pretrained(source, config=config)
        except OSError as error:
            raise ArtifactError(
                f"cannot load the pretrained base {str(source)!r} this mask was trained over "
                f"({error}); pass base_model_name_or_path= with a copy of it, or model="
            ) from error
        if spec.get("name_or_path"):  # a local copy of a Hub model still names the Hub repo
            model.config._name_or_path = spec["name_or_path"]
        return model
    if library == "popup_adapter":
        models = importlib.import_module("popup_adapter.convnets")
        return getattr(models, spec["class"])(**spec["kwargs"])
    raise ArtifactError(
        f"the base of this mask is a {spec.get('class', 'custom model')}, which "
        "popup_adapter cannot rebuild by itself; pass model= with that "
        "architecture (its weights are regenerated from the seed)"
    )
