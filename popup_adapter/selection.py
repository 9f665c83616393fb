"""Which weights are kept: exact per-layer top-k by |score|, and the straight-through gradient.

This is the hot path of training. Exactness is the contract (every layer keeps exactly
``kept`` weights, the largest |score|, ties to the lowest index); speed comes from two things:

- no sort: ``kthvalue`` finds the threshold in linear time;
- **threshold reuse**: scores move little between optimizer steps, so each layer remembers its
  last threshold (:class:`SelectionState`) and first counts the scores above a narrow band
  around it. When the new threshold lies in the band (the usual case), only the few scores inside
  it go through ``kthvalue``; otherwise the band widens and the full ``kthvalue`` runs. Either
  way the result is the exact top-k.

Under ``torch.compile`` a branch-free version runs instead (no host synchronisation, no graph
break): full ``kthvalue``, ties broken with a cumulative sum.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


def num_kept(k: float, numel: int) -> int:
    """How many of ``numel`` weights a layer keeps: ``round(k * numel)``, and at least one."""
    return max(1, min(numel, round(k * numel)))


@dataclass
class SelectionState:
    """What a layer remembers between steps to select faster: its last threshold and the band
    half-width to search around it."""

    threshold: float | None = None
    band: float = 0.0


def _break_ties(magnitude: torch.Tensor, threshold: torch.Tensor, kept: int) -> torch.Tensor:
    """Exactly ``kept`` entries: all above ``threshold``, then the lowest-index ties at it."""
    above = magnitude > threshold
    at_threshold = magnitude == threshold
    still_needed = kept - above.sum()
    return above | (at_threshold & (at_threshold.cumsum(0) <= still_needed))


#: band searches tried (each moving and widening the band toward the threshold) before the
#: full kthvalue
_BAND_TRIES = 4


def _threshold_in_band(
    magnitude: torch.Tensor, kept: int, state: SelectionState
) -> tuple[torch.Tensor, bool] | None:
    """The kept-th largest value, searched in a band around the last threshold, and whether
    exactly ``kept`` values reach it (no ties), known from the band alone.

    Each try costs two counting passes. When the threshold is not inside the band, the counts
    say on which side it lies, and the band moves and widens that way. None after
    ``_BAND_TRIES`` misses.
    """
    low, high = state.threshold - state.band, state.threshold + state.band
    for _ in range(_BAND_TRIES):
        above_high = int((magnitude > high).sum())
        if above_high >= kept:  # the threshold is above the band
            low, high = high, high + 4 * (high - low)
            continue
        in_band = magnitude[(magnitude >= low) & (magnitude <= high)]
        if above_high + in_band.numel() < kept:  # below the band
            low, high = max(0.0, low - 4 * (high - low)), low
            continue
        state.band = max(state.band, (high - low) / 2)
        needed = kept - above_high
        threshold = in_band.kthvalue(in_band.numel() - needed + 1).values
        return threshold, int((in_band >= threshold).sum()) == needed
    return None


def topk_mask(scores: torch.Tensor, kept: int, state: SelectionState | None = None) -> torch.Tensor:
    """Boolean mask of the ``kept`` entries of ``scores`` with the largest absolute value.

    Exactly ``kept`` entries are True. Among entries tied at the threshold, those with the lowest
    flat index win, so the mask is the same on every device and run. ``state`` (optional) is
    read and updated to reuse the last threshold; the result does not depend on it.
    """
    magnitude = scores.detach().abs().flatten()
    numel = magnitude.numel()
    if kept >= numel:
        return torch.ones_like(scores, dtype=torch.bool)
    if state is None or torch.compiler.is_compiling():
        threshold = magnitude.kthvalue(numel - kept + 1).values
        return _break_ties(magnitude, threshold, kept).view_as(scores)

    found = _threshold_in_band(magnitude, kept, state) if state.threshold is not None else None
    if found is None:
        threshold = magnitude.kthvalue(numel - kept + 1).values
        no_ties = None  # unknown: counted below
        state.band = max(state.band * 4, 1e-6 * float(threshold) + 1e-12)
    else:
        threshold, no_ties = found
        state.band = max(state.band * 0.75, 1e-12)
    moved = abs(float(threshold) - state.threshold) if state.threshold is not None else 0.0
    state.band = max(state.band, 2 * moved)
    state.threshold = float(threshold)
    mask = magnitude >= threshold
    if no_ties is None:
        no_ties = int(mask.sum()) == kept
    if not no_ties:  # ties at the threshold: rare with float scores
        mask = _break_ties(magnitude, threshold, kept)
    return mask.view_as(scores)


class StraightThroughMask(torch.autograd.Function):
    """``W * M`` forward, with M the top-k of |S|; straight-through backward to the scores.

    The mask is a step function of the scores, so it has no useful gradient. Edge-popup passes
    the gradient through as if the mask were the identity in |S|:
    ``dL/dS = dL/d(W*M) * W * sign(S)``. The ``sign(S)`` matters: selection is by |S|, so a
    negative score must move down to become more important. Every score gets a gradient, also
    those of weights that are currently masked out, which is how weights re-enter the mask.
    """

    @staticmethod
    def forward(
        ctx,
        weight: torch.Tensor,
        scores: torch.Tensor,
        kept: int,
        state: SelectionState | None = None,
    ) -> torch.Tensor:
        """``weight * mask``, the mask the top ``kept`` of ``|scores|``."""
        mask = topk_mask(scores, kept, state)
        # the mask is only needed for a weight gradient (weights are frozen in edge-popup)
        ctx.save_for_backward(weight, scores, mask if weight.requires_grad else None)
        return weight * mask

    @staticmethod
    def backward(ctx, grad_output: torch.Tensor):
        """Straight-through: every score gets ``grad * W * sign(S)``."""
        weight, scores, mask = ctx.saved_tensors
        grad_weight = grad_output * mask if ctx.needs_input_grad[0] else None
        grad_scores = None
        if ctx.needs_input_grad[1]:
            grad_scores = (grad_output * weight * scores.sign()).to(scores.dtype)
        return grad_weight, grad_scores, None, None


def masked_weight(
    weight: torch.Tensor, scores: torch.Tensor, kept: int, state: SelectionState | None = None
) -> torch.Tensor:
    """``weight * topk_mask(scores, kept)`` with the straight-through gradient to ``scores``."""
    return StraightThroughMask.apply(weight, scores, kept, state)
