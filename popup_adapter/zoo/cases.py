"""Which models the table checks: the smallest variant of every timm family and the
transformers architectures of `TRANSFORMERS`,
each with the smallest input its plain version accepts."""

from __future__ import annotations

import json
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch

from .transformers_configs import TRANSFORMERS, transformers_inputs

#: the square input sizes tried, smallest first, until the plain timm model accepts one
_TIMM_SIZES = (32, 64, 96, 128, 160, 192, 224, 256, 288, 320, 384, 448, 512)


class NotRun(Exception):
    """The plain model does not run here: not a popup_adapter result."""


def first_line(error: BaseException | None) -> str:
    """``"Type: message"`` of ``error``, its first line, at most 300 characters.

    Args:
        error: an exception, or None.

    Returns:
        The line ("" for None).
    """
    text = f"{type(error).__name__}: {error}" if error is not None else ""
    return text.strip().splitlines()[0][:300] if text.strip() else ""


def timm_families(cache: Path | None = None) -> dict[str, str]:
    """``{timm family (its module): smallest variant by parameter count}``, variants counted on
    the meta device (no memory, no weights); ``test_*`` models are left out. Cached in
    ``cache`` (JSON) when given, keyed by timm's version.

    Args:
        cache: a JSON file to read and write the result (None: always count).

    Returns:
        ``{family: model name}``.
    """
    import timm

    if cache is not None and cache.is_file():
        stored = json.loads(cache.read_text())
        if stored.get("timm") == timm.__version__:
            return stored["families"]
    families = {}
    for family in timm.list_modules():
        counts = {}
        for name in timm.list_models(module=family):
            if name.startswith("test_"):
                continue
            try:
                with torch.device("meta"), warnings.catch_warnings():
                    warnings.simplefilter("ignore")
                    model = timm.create_model(name, pretrained=False)
                counts[name] = sum(p.numel() for p in model.parameters())
            except Exception:  # a variant that cannot be built from its config alone
                continue
        if counts:
            families[family] = min(counts, key=lambda name: (counts[name], name))
    if cache is not None:
        cache.write_text(json.dumps({"timm": timm.__version__, "families": families}, indent=1))
    return families


@dataclass
class Case:
    """A model to check: how to build it and an input for it."""

    family: str
    model: str
    library: str
    build: Callable[[], torch.nn.Module]
    inputs: Callable[[torch.nn.Module], dict[str, torch.Tensor]]


def timm_case(family: str, name: str) -> Case:
    """The timm model ``name``, fed the smallest square input its plain version accepts.

    Args:
        family: the timm module the model belongs to (the row's family).
        name: the model.

    Returns:
        The `Case`; its ``inputs`` raise `NotRun` when the plain model accepts no
        tried size.
    """
    import timm

    def build():
        return timm.create_model(name, pretrained=False)

    def inputs(model):
        channels, *_ = model.pretrained_cfg.get("input_size", (3, 224, 224))
        configured = model.pretrained_cfg.get("input_size", (3, 224, 224))[-1]
        sizes = sorted({*(s for s in _TIMM_SIZES if s <= configured), configured})
        generator = torch.Generator().manual_seed(0)
        error = None
        for size in sizes:
            x = torch.randn(2, channels, size, size, generator=generator)
            try:
                with torch.no_grad():
                    model.eval()(x)
                return {"x": x}
            except Exception as failure:  # too small for this architecture: try the next
                error = failure
        raise NotRun(f"the plain model runs on no input of {sizes}: {first_line(error)}")

    return Case(family, name, "timm", build, inputs)


def transformers_case(name: str) -> Case:
    """The transformers architecture ``name`` of `TRANSFORMERS`, from its tiny config.

    Args:
        name: a key of `TRANSFORMERS`.

    Returns:
        The `Case`; its ``inputs`` raise `NotRun` when the plain model does not
        run on them.
    """
    import transformers

    model_class, config_class, kwargs, kind = TRANSFORMERS[name]

    def build():
        config = getattr(transformers, config_class)(**kwargs)
        return getattr(transformers, model_class)(config)

    def inputs(model):
        inputs = transformers_inputs(kind, torch.Generator().manual_seed(0))
        try:
            with torch.no_grad():
                model.eval()(**inputs)
        except Exception as error:
            raise NotRun(f"the plain model does not run: {first_line(error)}") from error
        return inputs

    return Case(name, model_class, "transformers", build, inputs)


def case_by_id(case_id: str) -> Case:
    """``timm:<family>:<model>`` or ``transformers:<name>``.

    Args:
        case_id: the case's id.

    Returns:
        The `Case`.
    """
    library, name, *model = case_id.split(":")
    return timm_case(name, model[0]) if library == "timm" else transformers_case(name)
