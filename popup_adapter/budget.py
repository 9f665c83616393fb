"""How many weights each masked layer keeps: ``round(k * n)`` per layer (the paper), or one
threshold across the network (global top-k), with a density that ramps from dense to ``k``.

Per layer, the count is fixed and every layer selects its own exact top-k (`.selection`).
Global top-k keeps the ``round(k * total)`` largest |scores| of the whole adapter, at least
``min_layer_k`` of each layer (the floor that keeps every layer alive): layers that matter
keep more, others less. It is computed here as per-layer counts; each layer then selects its
exact top-count with the fast per-layer selection, so the global mask is exact too. The
global threshold itself is found the way a layer finds its own: in a narrow band around the
last one (`SelectionState`), never by sorting all scores.

Counts change only when scores change (an optimizer step, a loaded mask) or the ramp moves,
so the budget recomputes lazily: the first layer call after a change does it for all layers.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch

from .selection import SelectionState, kth_largest, num_kept, search_bands, topk_mask


def ramped_density(k: float, step: int | None, ramp_steps: int) -> float:
    """The fraction kept at optimizer step ``step``: from 1 down to ``k`` over ``ramp_steps``
    steps along Zhu & Gupta's cubic (fast at first, gentle near ``k``), then ``k``.

    Args:
        k: the final fraction kept.
        step: optimizer steps done; None outside training (the ramp is over).
        ramp_steps: the ramp's length (0: no ramp).

    Returns:
        The fraction kept, in [k, 1].
    """
    if step is None or step >= ramp_steps:
        return k
    return k + (1.0 - k) * (1.0 - step / ramp_steps) ** 3


def floored_magnitudes(magnitude: torch.Tensor, floor: int) -> torch.Tensor:
    """``magnitude`` with its ``floor`` largest entries (ties to the lowest index) raised to
    +inf: the weights a layer keeps whatever the global threshold."""
    return magnitude.masked_fill(topk_mask(magnitude, floor), float("inf"))


def _union_band(values: Sequence[torch.Tensor], total: int) -> Callable:
    """A ``try_band`` (see `.selection`) over the union of several layers' values: the
    ``total``-th largest value when it lies in ``[low, high]``."""

    def try_band(low: float, high: float):
        above = sum(int(torch.count_nonzero(v > high)) for v in values)
        if above >= total:
            return None, True
        in_band = torch.cat([v[(v >= low) & (v <= high)] for v in values])
        if above + in_band.numel() < total:
            return None, False
        return float(kth_largest(in_band, total - above)), None

    return try_band


def global_kept_counts(
    scores: Sequence[torch.Tensor],
    total: int,
    floors: Sequence[int],
    state: SelectionState | None = None,
) -> list[int]:
    """Per-layer counts of a global top-``total`` by |score|, each layer keeping at least its
    floor. Ties at the threshold go to the earlier layer (within a layer, the layer's own
    selection breaks them by index, as always).

    Args:
        scores: each layer's scores.
        total: how many weights to keep in all, at least ``sum(floors)``.
        floors: each layer's minimum, at least 1.
        state: the global threshold's prediction, read and updated (None: exact from scratch).

    Returns:
        The count of each layer, summing to ``total``.
    """
    values = [
        floored_magnitudes(s.detach().abs().flatten(), f)
        for s, f in zip(scores, floors, strict=True)
    ]
    found = None
    if state is not None and state.threshold is not None:
        found = search_bands(state, _union_band(values, total))
    if found is None:
        threshold, first_try = float(kth_largest(torch.cat(values), total)), False
    else:
        threshold, first_try = found
    if state is not None and threshold != float("inf"):
        state.record(threshold, first_try)
    counts = [int(torch.count_nonzero(v > threshold)) for v in values]
    missing = total - sum(counts)
    for index, v in enumerate(values):  # the ties at the threshold, earlier layers first
        tied = min(missing, int(torch.count_nonzero(v == threshold)))
        counts[index] += tied
        missing -= tied
    return counts


class KeptBudget:
    """One adapter's kept counts across its masked layers: the ramp's density, per layer or
    global. It holds the layers themselves (not callbacks), so a deep copy of the model
    copies a budget that sets the copy's layers."""

    def __init__(self, adapter_name: str, config: Any, layers: Sequence[Any]) -> None:
        """A budget over ``layers`` (`PopupLayer` s, in model order), given to each of them
        (they refresh it before selecting), with the counts of the current density set.

        Args:
            adapter_name: the adapter.
            config: its [`PopupConfig`][popup_adapter.PopupConfig] (``k``, ``selection``,
                ``ramp_steps``, ``min_layer_k``).
            layers: its masked layers.
        """
        self.adapter_name, self.layers = adapter_name, list(layers)
        self.k, self.selection = config.k, config.selection
        self.ramp_steps, self.min_layer_k = config.ramp_steps, config.min_layer_k
        self.sizes = [layer.base_weight.numel() // layer.num_masks for layer in self.layers]
        #: optimizer steps done, from `PopupModel.update_search`; None: not training (ramp over)
        self.step: int | None = None
        self._state = SelectionState()
        self._seen: tuple | None = None
        for layer in self.layers:
            layer.popup_budget[adapter_name] = self
        self.refresh()

    @property
    def density(self) -> float:
        """The fraction kept now (see `ramped_density`)."""
        return ramped_density(self.k, self.step, self.ramp_steps)

    def counts(self, scores: Sequence[torch.Tensor]) -> list[int]:
        """Each layer's count at the current density (exact; see the module).

        Args:
            scores: each layer's current scores.

        Returns:
            The counts, in the order of the layers.
        """
        density = self.density
        if self.selection == "per_layer":
            return [num_kept(density, n) for n in self.sizes]
        floors = [num_kept(self.min_layer_k, n) for n in self.sizes]
        total = max(round(density * sum(self.sizes)), sum(floors))
        return global_kept_counts(scores, total, floors, self._state)

    def refresh(self) -> None:
        """Recompute the counts if the scores or the density changed since the last time
        (never while the adapter is merged: its scores cannot move then, and some are gone)."""
        if any(layer.merged_adapter == self.adapter_name for layer in self.layers):
            return
        scores = [layer.popup_scores[self.adapter_name] for layer in self.layers]
        seen = (self.density, tuple((id(s), s._version) for s in scores))
        if seen != self._seen:
            for layer, count in zip(self.layers, self.counts(scores), strict=True):
                layer.popup_kept[self.adapter_name] = count
            self._seen = seen
