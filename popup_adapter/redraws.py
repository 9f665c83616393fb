"""IteRand with a seed-only artifact: pruned weights redrawn from the seed's own streams.

IteRand (Chijiwa et al., NeurIPS 2021) redraws, every ``redraw_every`` optimizer steps, each
currently pruned weight with probability ``redraw_prob``, so the search reaches more random
weights than the base holds. Done with torch's RNG, the trained network could only be
published as dense weights. Here both choices come from the counter-based streams of
`popup_adapter.seeding`:

- which weights: those pruned at event ``e`` (step ``e * redraw_every``) whose uniform draw in
  the stream ``iterand/<e>/<tensor>`` is below ``redraw_prob``;
- their values: weight ``i`` after ``c`` redraws is element ``i`` of the tensor's ``c``-th
  redraw stream (`popup_adapter.base.layer_weight` with ``redraw=c``).

So a weight is its seed and its redraw count. A layer keeps the counts (a ``uint8`` buffer,
``popup_redraws``, saved in checkpoints with the weights, so a resumed run redraws what the
uninterrupted one did); an artifact stores the counts of the kept weights, entropy coded
(`popup_adapter.codec.encode_counts`; most are 0), since pruned weights do not change the
outputs; a load regenerates the kept weights from them. The base fingerprint stays the seed
base's (`seed_weight_values`): redraws belong to the mask, not to the base.
"""

from __future__ import annotations

from collections.abc import Iterable

import numpy as np
import torch

from .base import layer_weight
from .codec import MAX_COUNT
from .config import PopupConfig
from .errors import AdapterError
from .seeding import random_uniform

#: the layer buffer holding each weight's redraw count
REDRAWS = "popup_redraws"


def add_redraw_counts(layer: torch.nn.Module) -> None:
    """Give ``layer`` (a `PopupLayer`) its count buffer, all zero (no redraw yet).

    Args:
        layer: the masked layer.
    """
    layer.register_buffer(REDRAWS, torch.zeros(layer.base_weight.shape, dtype=torch.uint8))


def redraw_counts(layer: torch.nn.Module) -> torch.Tensor | None:
    """The layer's redraw counts, or None when its adapter does not redraw.

    Args:
        layer: the masked layer.

    Returns:
        The ``uint8`` buffer shaped like the weight.
    """
    return layer._buffers.get(REDRAWS)


def write_redrawn(
    value: torch.Tensor,
    layer: torch.nn.Module,
    config: PopupConfig,
    name: str,
    where: torch.Tensor | None = None,
) -> torch.Tensor:
    """Set ``value`` (the layer's weight, or one regenerated from the seed) at ``where`` to
    the weights' values after their redraw counts.

    Args:
        value: shaped like the weight, changed in place.
        layer: the masked layer (its counts).
        config: the adapter's config.
        name: the masked tensor's name.
        where: which entries (default: every redrawn one).

    Returns:
        ``value``.
    """
    counts = redraw_counts(layer)
    where = counts > 0 if where is None else where
    with torch.no_grad():
        for count in torch.unique(counts[where]).tolist():
            chosen = where & (counts == count)
            drawn = layer_weight(config, name, layer.owner, value, True, redraw=count)
            value[chosen] = drawn.to(value.device, value.dtype)[chosen]
    return value


def redraw_pruned(layer: torch.nn.Module, config: PopupConfig, name: str, event: int) -> int:
    """IteRand's event ``event`` in one layer: each weight pruned by the active mask now is
    redrawn with probability ``config.redraw_prob`` (choices and values from the seed).

    Args:
        layer: the masked layer (its active adapter's mask decides what is pruned).
        config: the adapter's config.
        name: the masked tensor's name in the plain model (its streams).
        event: the event's number, from 1.

    Returns:
        How many weights were redrawn.

    Raises:
        AdapterError: a weight would pass `popup_adapter.codec.MAX_COUNT` redraws.
    """
    counts, weight = redraw_counts(layer), layer.base_weight
    draws = random_uniform(config.seed, f"iterand/{event}/{name}", weight.numel())
    picked = torch.from_numpy(draws < config.redraw_prob).reshape(weight.shape)
    chosen = picked.to(counts.device) & ~layer.get_mask(layer.active_adapter).to(counts.device)
    if bool((counts[chosen] == MAX_COUNT).any()):
        raise AdapterError(
            f"{name}: a weight would be redrawn more than {MAX_COUNT} times; use a larger "
            "redraw_every"
        )
    counts[chosen] += 1
    write_redrawn(layer.base_weight, layer, config, name, chosen)
    return int(torch.count_nonzero(chosen))


def load_redraw_counts(
    layer: torch.nn.Module,
    config: PopupConfig,
    name: str,
    kept_counts: np.ndarray,
    mask: torch.Tensor | None = None,
) -> None:
    """Set a loaded mask's redraw counts (those of its kept weights, in flat order) and
    regenerate those weights.

    Args:
        layer: the masked layer, its mask loaded.
        config: the adapter's config.
        name: the masked tensor's name.
        kept_counts: one count per kept weight.
        mask: the loaded mask (default: the active adapter's, from its scores).
    """
    counts = redraw_counts(layer)
    mask = layer.get_mask(layer.active_adapter) if mask is None else mask
    mask = mask.to(counts.device)
    counts.zero_()
    counts[mask] = torch.from_numpy(kept_counts).to(counts.device)
    write_redrawn(layer.base_weight, layer, config, name)


def seed_weight_values(
    layers: Iterable[tuple[str, torch.nn.Module]], config: PopupConfig
) -> dict[str, torch.Tensor]:
    """The seed base's values of the layers whose weights were redrawn (what
    ``base_state`` reports for them, so the fingerprint is the seed base's).

    Args:
        layers: ``(masked tensor name, layer)`` pairs.
        config: the backbone's config.

    Returns:
        ``{tensor name: the weight with every redrawn entry back at its seed value}``.
    """
    values = {}
    for name, layer in layers:
        counts = redraw_counts(layer)
        if counts is not None and bool(counts.any()):
            weight = layer.base_weight.detach().clone()
            seed = layer_weight(config, name, layer.owner, weight, True)
            redrawn = counts > 0
            weight[redrawn] = seed.to(weight.device, weight.dtype)[redrawn]
            values[name] = weight
    return values
