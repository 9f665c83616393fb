"""How a base model is rebuilt from an artifact: a spec written at save time, read at load time.

A spec records just what rebuilds the architecture: for timm its name and the constructor
arguments that shape it, for transformers the model class and its full config, for
popup_adapter's own networks their constructor arguments. The weights never travel: they come
back from the seed, and the fingerprint proves they did. timm and transformers are imported
only here, and only for a spec of their kind.
"""

from __future__ import annotations

import importlib
from typing import Any

from torch import nn

from .errors import ArtifactError


def describe_base(model: nn.Module) -> dict[str, Any]:
    """The spec of a model; ``{"library": "custom"}`` when popup_adapter cannot rebuild it."""
    module = type(model).__module__
    if module.startswith("transformers.") and hasattr(model, "config"):
        spec = {
            "library": "transformers",
            "class": type(model).__name__,
            "config": model.config.to_dict(),
        }
        name_or_path = getattr(model.config, "_name_or_path", "")
        if name_or_path:
            spec["name_or_path"] = name_or_path
        return spec
    if module.startswith("timm.") and getattr(model, "pretrained_cfg", None):
        kwargs: dict[str, Any] = {"num_classes": model.num_classes}
        first_conv = next((m for m in model.modules() if isinstance(m, nn.Conv2d)), None)
        if first_conv is not None:
            kwargs["in_chans"] = first_conv.in_channels
        patch_embed = getattr(model, "patch_embed", None)
        if getattr(patch_embed, "img_size", None) is not None:
            kwargs["img_size"] = list(patch_embed.img_size)
        return {
            "library": "timm",
            "architecture": model.pretrained_cfg["architecture"],
            "kwargs": kwargs,
        }
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


def build_base(spec: dict[str, Any], pretrained: bool = False) -> nn.Module:
    """Rebuild the architecture a spec describes (random weights; the seed sets them after).

    With ``pretrained`` (an ``init="keep"`` artifact) a transformers base is loaded from the
    ``name_or_path`` it was adapted from.
    """
    library = spec.get("library")
    if library == "timm":
        import timm

        return timm.create_model(spec["architecture"], pretrained=False, **spec["kwargs"])
    if library == "transformers":
        import transformers

        model_class = getattr(transformers, spec["class"], None)
        if model_class is None:
            raise ArtifactError(
                f"transformers {transformers.__version__} has no class "
                f"{spec['class']!r}; upgrade transformers or pass model="
            )
        if pretrained:
            source = spec.get("name_or_path")
            if not source:
                raise ArtifactError(
                    "this mask was trained over a pretrained base whose source "
                    "was not recorded; pass model= with that base"
                )
            try:
                return model_class.from_pretrained(source)
            except OSError as error:
                raise ArtifactError(
                    f"cannot load the pretrained base {source!r} this mask was "
                    f"trained over ({error}); pass model= with it"
                ) from error
        config = model_class.config_class.from_dict(spec["config"])
        return model_class(config)
    if library == "popup_adapter":
        models = importlib.import_module("popup_adapter.models")
        return getattr(models, spec["class"])(**spec["kwargs"])
    raise ArtifactError(
        f"the base of this mask is a {spec.get('class', 'custom model')}, which "
        "popup_adapter cannot rebuild by itself; pass model= with that "
        "architecture (its weights are regenerated from the seed)"
    )
