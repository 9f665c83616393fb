"""Which weights are kept: exact per-layer top-k by |score|, and the straight-through gradient.

This is the hot path of training, so it avoids a full sort: ``kthvalue`` finds the threshold in
linear time, and ties at the threshold are broken deterministically (lowest flat index first)
without any host synchronisation, which keeps the function traceable by ``torch.compile``.
"""

from __future__ import annotations

import torch


def num_kept(k: float, numel: int) -> int:
    """How many of ``numel`` weights a layer keeps: ``round(k * numel)``, and at least one."""
    return max(1, min(numel, round(k * numel)))


def topk_mask(scores: torch.Tensor, kept: int) -> torch.Tensor:
    """Boolean mask of the ``kept`` entries of ``scores`` with the largest absolute value.

    Exactly ``kept`` entries are True. Among entries tied at the threshold, those with the lowest
    flat index win, so the mask is the same on every device and run.
    """
    magnitude = scores.detach().abs().flatten()
    numel = magnitude.numel()
    if kept >= numel:
        return torch.ones_like(scores, dtype=torch.bool)
    # the kept-th largest value is the (numel - kept + 1)-th smallest
    threshold = magnitude.kthvalue(numel - kept + 1).values
    above = magnitude > threshold
    at_threshold = magnitude == threshold
    still_needed = kept - above.sum()
    mask = above | (at_threshold & (at_threshold.cumsum(0) <= still_needed))
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
    def forward(ctx, weight: torch.Tensor, scores: torch.Tensor, kept: int) -> torch.Tensor:
        """``weight * mask``, the mask the top ``kept`` of ``|scores|``."""
        mask = topk_mask(scores, kept)
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
        return grad_weight, grad_scores, None


def masked_weight(weight: torch.Tensor, scores: torch.Tensor, kept: int) -> torch.Tensor:
    """``weight * topk_mask(scores, kept)`` with the straight-through gradient to ``scores``."""
    return StraightThroughMask.apply(weight, scores, kept)
