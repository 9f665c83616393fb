"""The model card an artifact carries (``README.md``): what a Hub visitor reads first."""

from __future__ import annotations

import math
from typing import Any

from huggingface_hub import ModelCard, ModelCardData

from .specs import describe

_CARD_TEMPLATE = """---
{{ card_data }}
---

# {{ title }}

An [edge-popup](https://arxiv.org/abs/1911.13299) supermask over {{ base }}, made with
[popup_adapter](https://github.com/popup-adapter/popup_adapter). The weights are not stored:
the base is regenerated from seed {{ seed }} ({{ init }} init) and verified by its fingerprint,
then the mask keeps {{ k_percent }} of each masked layer's weights.

| | |
|---|---|
| base | {{ base }} |
| fraction of weights kept (k) | {{ k }} |
| seed / init | {{ seed }} / {{ init }} |
| masked layers / weights | {{ n_layers }} / {{ n_weights }} |
| tensor file | {{ file_bytes }} bytes ({{ bits_per_weight }} bits per masked weight) |
| base fingerprint | `{{ fingerprint }}` |
{% if dataset %}| dataset | {{ dataset }} |
{% endif %}{% for name, value in metrics.items() %}| {{ name }} | {{ value }} |
{% endfor %}
## Usage

```python
from popup_adapter import PopupModel

model = PopupModel.from_pretrained("{{ repo_hint }}")  # rebuilds the base, applies the mask
```
"""


def model_card(meta: dict[str, Any], file_bytes: int) -> str:
    """The card of an artifact whose ``popup_config.json`` is ``meta`` and whose tensor file
    has ``file_bytes`` bytes: what the base is, k, the seed, the size, how to load it.

    Args:
        meta: the artifact's config, as `encode_artifact`
            builds it.
        file_bytes: the tensor file's size.

    Returns:
        The card's markdown, with its YAML header.
    """
    config = meta["config"]
    numel = sum(math.prod(layer["shape"]) for layer in meta["layers"].values())
    base = describe(meta["base"])
    tags = ["popup-adapter", "edge-popup", "supermask", meta["base"]["library"]]
    data = ModelCardData(
        library_name="popup-adapter",
        tags=tags,
        datasets=[meta["dataset"]] if meta["dataset"] else None,
        metrics=sorted(meta["metrics"]) or None,
        popup={
            "base": base,
            "k": config["k"],
            "seed": config["seed"],
            "init": config["init"],
            "base_fingerprint": meta["base_fingerprint"],
            "metrics": meta["metrics"],
        },
    )
    card = ModelCard.from_template(
        data,
        template_str=_CARD_TEMPLATE,
        title=f"{base} edge-popup mask (k={config['k']})",
        base=base,
        seed=config["seed"],
        init=config["init"],
        k=config["k"],
        k_percent=f"{100 * config['k']:g}%",
        n_layers=len(meta["layers"]),
        n_weights=f"{numel:,d}",
        file_bytes=f"{file_bytes:,d}",
        bits_per_weight=f"{8 * file_bytes / max(numel, 1):.3f}",
        fingerprint=meta["base_fingerprint"],
        dataset=meta["dataset"],
        metrics=meta["metrics"],
        repo_hint="path/or/repo-id",
    )
    return str(card)


_COLLECTION_TEMPLATE = """---
{{ card_data }}
---

# {{ title }}

{{ n_adapters }} [edge-popup](https://arxiv.org/abs/1911.13299) supermasks over one base,
{{ base }}, made with [popup_adapter](https://github.com/popup-adapter/popup_adapter). The
weights are not stored: the base is regenerated from seed {{ seed }} ({{ init }} init) and
verified by its fingerprint `{{ fingerprint }}`; each mask is one tensor file.

| adapter | k | method | tensor file | bits per masked weight | metrics |
|---|---|---|---|---|---|
{% for row in rows %}| {{ row.name }} | {{ row.k }} | {{ row.method }} | {{ row.bytes }} bytes | \
{{ row.bits }} | {{ row.metrics }} |
{% endfor %}
## Usage

```python
from popup_adapter import PopupModel

# every mask, or the ones named: the others are not downloaded
model = PopupModel.from_pretrained("{{ repo_hint }}", adapters={{ example }})
model.set_adapter({{ first }})
```
"""


def collection_card(manifest: dict[str, Any]) -> str:
    """The card of a collection whose ``popup_collection.json`` is ``manifest``: the base
    once, then a row per mask.

    Args:
        manifest: the collection's manifest, as `encode_collection` builds it.

    Returns:
        The card's markdown, with its YAML header.
    """
    adapters = manifest["adapters"]
    first = next(iter(adapters.values()))
    base = describe(manifest["base"])
    rows = []
    for name, meta in adapters.items():
        numel = sum(math.prod(layer["shape"]) for layer in meta["layers"].values())
        size = next(iter(meta["files"].values()))["size"]
        metrics = ", ".join(f"{key} {value}" for key, value in meta["metrics"].items())
        rows.append(
            {
                "name": name,
                "k": meta["config"]["k"],
                "method": meta["config"]["method"],
                "bytes": f"{size:,d}",
                "bits": f"{8 * size / max(numel, 1):.3f}",
                "metrics": metrics or "-",
            }
        )
    data = ModelCardData(
        library_name="popup-adapter",
        tags=["popup-adapter", "edge-popup", "supermask", "supsup", manifest["base"]["library"]],
        popup={
            "base": base,
            "seed": first["config"]["seed"],
            "init": first["config"]["init"],
            "base_fingerprint": manifest["base_fingerprint"],
            "adapters": list(adapters),
        },
    )
    card = ModelCard.from_template(
        data,
        template_str=_COLLECTION_TEMPLATE,
        title=f"{base}: {len(adapters)} edge-popup masks",
        n_adapters=len(adapters),
        base=base,
        seed=first["config"]["seed"],
        init=first["config"]["init"],
        fingerprint=manifest["base_fingerprint"],
        rows=rows,
        repo_hint="path/or/repo-id",
        example=repr(list(adapters)[:2]),
        first=repr(next(iter(adapters))),
    )
    return str(card)
