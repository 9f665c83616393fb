"""Which weights are kept: exact per-layer top-k by |score|, and the straight-through gradient.

This is the hot path of training. Exactness is the contract (every layer keeps exactly
``kept`` weights, the largest |score|, ties to the lowest index); speed comes from:

- no sort: ``kthvalue`` finds the threshold in linear time;
- **threshold reuse**: scores move little between optimizer steps, so each layer remembers its
  last threshold and last move (`SelectionState`) and looks in a narrow band around the
  predicted threshold. When the threshold lies in the band (the usual case), only the few scores
  inside it are selected among; otherwise the counts say on which side it lies and the band
  moves there, and after a few misses the full ``kthvalue`` runs. Either way the result is the
  exact top-k;
- **fused CPU kernels** (`.kernels`): on CPU the band search and ``W * M`` are one pass
  over scores and weights, and the backward one pass; elsewhere the same search runs in torch
  operations. A base held as sign bits (`popup_adapter.sign_bits`) is read as bits by the
  kernels, expanded to ``+-c`` in their pass.

Under ``torch.compile`` a branch-free version runs instead (no host synchronisation, no graph
break): full ``kthvalue``, ties broken with a cumulative sum.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import torch
from torch.autograd.function import FunctionCtx

from . import kernels
from .sign_bits import SignBitWeight


def num_kept(k: float, numel: int) -> int:
    """How many of ``numel`` weights a layer keeps.

    Args:
        k: the fraction kept, in (0, 1].
        numel: the layer's (or one expert's) number of weights.

    Returns:
        ``round(k * numel)``, at least one and at most ``numel``.
    """
    return max(1, min(numel, round(k * numel)))


@dataclass
class SelectionState:
    """What a layer remembers between steps to select faster: its last threshold, how far it
    moved last step (with momentum it keeps moving that way), and the band half-width to search
    around the predicted threshold."""

    threshold: float | None = None
    drift: float = 0.0
    band: float = 0.0

    def predicted_interval(self) -> tuple[float, float]:
        """Where this step's threshold is expected: last threshold plus last move, +- band.

        Returns:
            ``(low, high)``.
        """
        center = self.threshold + self.drift
        return max(0.0, center - self.band), center + self.band

    @staticmethod
    def next_interval(low: float, high: float, threshold_above: bool) -> tuple[float, float]:
        """After a miss: the interval next to ``[low, high]`` on the threshold's side, 4x wider.

        Args:
            low: the interval that missed, its lower end.
            high: its upper end.
            threshold_above: whether the threshold lies above it.

        Returns:
            The next ``(low, high)``.
        """
        width = 4 * (high - low) + 1e-12
        return (high, high + width) if threshold_above else (max(0.0, low - width), low)

    def record(self, threshold: float, first_try: bool) -> None:
        """Remember this step's threshold. The band narrows after a first-try hit and widens
        after a miss, and stays at least twice the prediction's error.

        Args:
            threshold: this step's exact threshold.
            first_try: whether the predicted interval held it.
        """
        if self.threshold is None:
            error, self.drift = 0.0, 0.0
        else:
            error = abs(threshold - (self.threshold + self.drift))
            self.drift = threshold - self.threshold
        if first_try:
            self.band = max(self.band * 0.75, 2 * error, 1e-12)
        else:
            self.band = max(self.band * 4, 2 * error, 1e-6 * threshold + 1e-12)
        self.threshold = threshold


def kth_largest(values: torch.Tensor, k: int) -> torch.Tensor:
    """The ``k``-th largest of a 1-D tensor, by selection (``kthvalue``), not a sort.

    Args:
        values: 1-D.
        k: from 1 (the largest) to ``values.numel()``.

    Returns:
        A 0-d tensor.
    """
    return values.kthvalue(values.numel() - k + 1).values


def _break_ties(magnitude: torch.Tensor, threshold: torch.Tensor, kept: int) -> torch.Tensor:
    """Exactly ``kept`` entries: all above ``threshold``, then the lowest-index ties at it."""
    above = magnitude > threshold
    at_threshold = magnitude == threshold
    still_needed = kept - above.sum()
    return above | (at_threshold & (at_threshold.cumsum(0) <= still_needed))


#: band searches tried (each moving and widening the band toward the threshold) before the
#: full kthvalue
_BAND_TRIES = 4


def search_bands(state: SelectionState, try_band: Callable) -> tuple[Any, bool] | None:
    """``try_band(low, high)`` on the predicted interval, then on intervals moved toward the
    threshold: ``(its result, whether the first interval held the threshold)``, or None after
    ``_BAND_TRIES`` misses. ``try_band`` returns ``(result, None)`` when the threshold is in
    the interval, else ``(None, whether it lies above)``.

    Args:
        state: the threshold's prediction (a layer's, or a global one).
        try_band: ``(low, high) -> (result or None, whether the threshold lies above)``.

    Returns:
        ``(result, first_try)``, or None.
    """
    low, high = state.predicted_interval()
    for attempt in range(_BAND_TRIES):
        found, threshold_above = try_band(low, high)
        if found is not None:
            return found, attempt == 0
        low, high = state.next_interval(low, high, threshold_above)
    return None


def _eager_band(magnitude: torch.Tensor, kept: int) -> Callable:
    """A ``try_band`` in torch operations (two counting passes): its result is the kept-th
    largest value and whether exactly ``kept`` values reach it (no ties), known from the band."""

    def try_band(low: float, high: float):
        above_high = int(torch.count_nonzero(magnitude > high))
        if above_high >= kept:
            return None, True
        in_band = magnitude[(magnitude >= low) & (magnitude <= high)]
        if above_high + in_band.numel() < kept:
            return None, False
        needed = kept - above_high
        threshold = kth_largest(in_band, needed)
        return (threshold, int(torch.count_nonzero(in_band >= threshold)) == needed), None

    return try_band


def topk_mask(scores: torch.Tensor, kept: int, state: SelectionState | None = None) -> torch.Tensor:
    """Boolean mask of the ``kept`` entries of ``scores`` with the largest absolute value.

    Exactly ``kept`` entries are True. Among entries tied at the threshold, those with the lowest
    flat index win, so the mask is the same on every device and run.

    Args:
        scores: any shape.
        kept: how many entries to keep (see [`num_kept`][popup_adapter.num_kept]).
        state: read and updated to reuse the last threshold; the result does not depend on it.

    Returns:
        A bool tensor shaped like ``scores``.
    """
    magnitude = scores.detach().abs().flatten()
    numel = magnitude.numel()
    if kept >= numel:
        return torch.ones_like(scores, dtype=torch.bool)
    if state is None or torch.compiler.is_compiling():
        threshold = kth_largest(magnitude, kept)
        return _break_ties(magnitude, threshold, kept).view_as(scores)

    found = None
    if state.threshold is not None:
        found = search_bands(state, _eager_band(magnitude, kept))
    if found is None:
        threshold = kth_largest(magnitude, kept)
        no_ties, first_try = None, False  # ties unknown: counted below
    else:
        (threshold, no_ties), first_try = found
    state.record(float(threshold), first_try)
    return mask_at_threshold(magnitude, threshold, kept, no_ties).view_as(scores)


def mask_at_threshold(
    magnitude: torch.Tensor, threshold: float | torch.Tensor, kept: int, no_ties: bool | None = None
) -> torch.Tensor:
    """The top ``kept`` of a flat ``magnitude``, given the ``kept``-th largest value: all at
    or above it, or, where values tie at it, those above and the lowest-index ties.

    Args:
        magnitude: 1-D.
        threshold: its ``kept``-th largest value.
        kept: how many to keep.
        no_ties: whether exactly ``kept`` values reach the threshold, where known.

    Returns:
        A 1-D bool tensor.
    """
    mask = magnitude >= threshold
    if no_ties is None:
        no_ties = int(torch.count_nonzero(mask)) == kept
    if not no_ties:  # ties at the threshold: rare with float scores
        mask = _break_ties(magnitude, threshold, kept)
    return mask


def binarize_(masked: torch.Tensor, kept: int) -> torch.Tensor:
    """biprop's weights from ``W * M``, in place: ``alpha * sign(W) * M``, ``alpha`` the mean
    |W| over the ``kept`` weights (Diffenderfer & Kailkhura 2021). A fixed random sign and one
    learned-by-selection scale per layer: what a binary network stores.

    Args:
        masked: ``W * M`` of one mask (a layer, or one expert).
        kept: how many weights ``M`` keeps.

    Returns:
        ``masked``, overwritten.
    """
    alpha = masked.detach().abs().sum(dtype=torch.float64) / kept
    return masked.sign_().mul_(alpha.to(masked.dtype))


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
        ctx: FunctionCtx,
        weight: torch.Tensor,
        scores: torch.Tensor,
        kept: int,
        state: SelectionState | None = None,
        binary: bool = False,
    ) -> torch.Tensor:
        """``weight * mask``, the mask the top ``kept`` of ``|scores|``.

        Args:
            ctx: autograd's context.
            weight: the frozen base weight.
            scores: the scores.
            kept: how many weights to keep.
            state: the layer's threshold prediction, or None.
            binary: biprop's `binarize_` of the result.

        Returns:
            ``weight * mask`` (or its binarized form).
        """
        mask = topk_mask(scores, kept, state)
        # the mask is only needed for a weight gradient (weights are frozen in edge-popup)
        ctx.save_for_backward(weight, scores, mask if weight.requires_grad else None)
        if state is not None and kept < scores.numel() and not torch.compiler.is_compiling():
            ctx.recipe = (kept, state.threshold, binary)  # this call's threshold
        return binarize_(weight * mask, kept) if binary else weight * mask

    @staticmethod
    def backward(ctx: FunctionCtx, grad_output: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
        """Straight-through: every score gets ``grad * W * sign(S)``. With ``binary`` too, as
        biprop's reference code does (``grad * |W|`` to the mask, alpha held constant).

        Args:
            ctx: autograd's context.
            grad_output: the gradient with respect to the forward's output.

        Returns:
            ``(grad for the weight where it requires one, grad for the scores, None...)``.
        """
        weight, scores, mask = ctx.saved_tensors
        grad_weight = grad_output * mask if ctx.needs_input_grad[0] else None
        grad_scores = None
        if ctx.needs_input_grad[1]:
            grad_scores = (grad_output * weight * scores.sign()).to(scores.dtype)
        return grad_weight, grad_scores, None, None, None


class FusedStraightThroughMask(torch.autograd.Function):
    """`StraightThroughMask` computed by the fused CPU kernels (`.kernels`): the
    forward is one pass over scores and weights around the last threshold, the backward one
    pass. Same masks and gradients; used for frozen CPU weights when the kernels are built."""

    @staticmethod
    def forward(
        ctx: FunctionCtx,
        weight: torch.Tensor,
        scores: torch.Tensor,
        kept: int,
        state: SelectionState,
        single_use: bool = False,
        binary: bool = False,
    ) -> torch.Tensor:
        """``weight * mask``: tries the band around the last threshold, else the exact
        threshold from ``kthvalue`` (first step, or the threshold moved out of the band).

        Args:
            ctx: autograd's context.
            weight: the frozen base weight.
            scores: the scores.
            kept: how many weights to keep.
            state: the layer's threshold prediction.
            single_use: the output feeds one consumer only (its gradient may be reused in place).
            binary: biprop's `binarize_` of the result.

        Returns:
            ``weight * mask`` (or its binarized form).
        """
        scores_c = scores.detach().contiguous()
        if not isinstance(weight, SignBitWeight):
            weight = weight.contiguous()
        forward_kernel = _forward_kernel(weight, scores_c, kept)

        def try_band(low: float, high: float):
            out, threshold, status = forward_kernel(low, high)
            if status == kernels.FOUND:
                return (out, threshold), None
            return None, status == kernels.ABOVE_BAND

        found = search_bands(state, try_band) if state.threshold is not None else None
        if found is None:
            magnitude = scores_c.abs().flatten()
            threshold = float(kth_largest(magnitude, kept))
            out, threshold, _ = forward_kernel(threshold, threshold)
            first_try = False
        else:
            (out, threshold), first_try = found
        state.record(threshold, first_try)
        ctx.save_for_backward(weight, scores_c)
        ctx.single_use = single_use
        ctx.recipe = (kept, threshold, binary)  # to write the output again (masked_weight_recipe)
        return binarize_(out, kept) if binary else out

    @staticmethod
    def backward(ctx: FunctionCtx, grad_output: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
        """``grad * W * sign(S)`` in one pass; in place in the incoming gradient when nothing
        else can see that buffer (``single_use``, or a contiguous copy made here).

        Args:
            ctx: autograd's context.
            grad_output: the gradient with respect to ``weight * mask``.

        Returns:
            ``(None, grad for the scores, None...)``.
        """
        weight, scores = ctx.saved_tensors
        grad = grad_output.contiguous()
        in_place = (ctx.single_use or grad is not grad_output) and not grad.requires_grad
        ops = torch.ops.popup_adapter
        if isinstance(weight, SignBitWeight):  # +-scale expanded in the same pass
            backward = (
                ops.straight_through_backward_signs_
                if in_place
                else ops.straight_through_backward_signs
            )
            grad_scores = backward(grad, weight.bits, weight.scale, scores)
        else:
            backward = ops.straight_through_backward_ if in_place else ops.straight_through_backward
            grad_scores = backward(grad, weight, scores)
        return None, grad_scores, None, None, None, None


def _forward_kernel(
    weight: torch.Tensor, scores: torch.Tensor, kept: int
) -> Callable[[float, float], tuple[torch.Tensor, float, int]]:
    """The fused forward for one layer, as ``(low, high) -> (W * M, threshold, status)``:
    over the float weights, or over a `SignBitWeight`'s bits (never written as floats)."""
    if isinstance(weight, SignBitWeight):
        bits, scale = weight.bits, weight.scale
        return lambda low, high: torch.ops.popup_adapter.masked_weight_forward_signs(
            bits, scale, scores, kept, low, high
        )
    return lambda low, high: torch.ops.popup_adapter.masked_weight_forward(
        weight, scores, kept, low, high
    )


class _Recipe:
    """What autograd keeps instead of a masked weight (or a view of it, as a matmul saves
    ``W.T``): how to write it again, and the view."""

    __slots__ = ("offset", "recompute", "shape", "stride")

    def __init__(self, recompute: Callable[[], torch.Tensor], view: torch.Tensor) -> None:
        self.recompute = recompute
        self.shape, self.stride, self.offset = view.shape, view.stride(), view.storage_offset()

    def unpack(self) -> torch.Tensor:
        return self.recompute().as_strided(self.shape, self.stride, self.offset)


def masked_weight_recipe(masked: torch.Tensor) -> Callable[[], torch.Tensor] | None:
    """How to write again, in the backward, a ``W * M`` that `masked_weight` returned, without
    keeping it, given the threshold that very call found: the fused forward kernel with a band
    of width zero, or, on the eager path (GPUs, kernels off), the mask at that threshold in
    torch operations. The same mask, ties included, in one pass.

    Args:
        masked: `masked_weight`'s result (its scores must not change before the backward: the
            optimizer steps after it).

    Returns:
        A function returning a tensor equal to ``masked``, or None where no threshold was
        recorded (no selection state, k = 1, ``torch.compile``) or autograd recorded nothing
        (the tensor is then kept as autograd keeps it).
    """
    if torch.compiler.is_compiling():  # compiled graphs keep their own saved tensors
        return None
    node = masked.grad_fn
    if getattr(node, "recipe", None) is None:
        return None
    fused = isinstance(node, FusedStraightThroughMask._backward_cls)
    if not (fused or isinstance(node, StraightThroughMask._backward_cls)):
        return None
    weight, scores = node.saved_tensors[:2]  # (the eager node also saves a mask, or None)
    kept, threshold, binary = node.recipe

    def recompute() -> torch.Tensor:
        if fused:
            out, _, status = _forward_kernel(weight, scores, kept)(threshold, threshold)
            exact = status == kernels.FOUND
        else:
            magnitude = scores.detach().abs().flatten()
            mask = mask_at_threshold(magnitude, threshold, kept).view_as(scores)
            out, exact = weight * mask, int(torch.count_nonzero(mask)) == kept
        if not exact:  # the scores changed between the forward and the backward
            raise RuntimeError(
                "the scores changed between the forward and the backward; step the optimizer "
                "after backward()"
            )
        return binarize_(out, kept) if binary else out

    return recompute


@contextmanager
def saved_as_recipe(
    tensor: torch.Tensor, recompute: Callable[[], torch.Tensor] | None
) -> Iterator[None]:
    """While the block runs, autograd keeps ``recompute`` instead of ``tensor`` wherever an
    operation saves ``tensor`` for its backward (a layer's weight, for its input gradient), and
    calls it when the backward needs the tensor: one pass over the scores then, one tensor the
    size of the weight less to hold between the forward and the backward.

    Args:
        tensor: the masked weight the block computes with.
        recompute: from `masked_weight_recipe`; None leaves saving as it is.

    Yields:
        Nothing.
    """
    if recompute is None:
        yield
        return
    # autograd keeps the hooks with what they saved: they must not hold the tensor itself
    storage, dtype, version = tensor.untyped_storage().data_ptr(), tensor.dtype, tensor._version

    def pack(saved: torch.Tensor) -> torch.Tensor | _Recipe:
        # the weight itself or a view of it, as it was made (a forward that wrote into it in
        # place saves what it wrote: kept as it is, the recipe would give the value before)
        same = (
            saved.dtype == dtype
            and saved.untyped_storage().data_ptr() == storage
            and saved._version == version
        )
        return _Recipe(recompute, saved) if same else saved

    def unpack(packed: torch.Tensor | _Recipe) -> torch.Tensor:
        return packed.unpack() if isinstance(packed, _Recipe) else packed

    with torch.autograd.graph.saved_tensors_hooks(pack, unpack):
        yield


def _fused_kernels_apply(
    weight: torch.Tensor, scores: torch.Tensor, state, fused: bool = True
) -> bool:
    """Whether `FusedStraightThroughMask` can serve this call: the caller allows it
    (``fused``), plain CPU tensors of one floating dtype (no tensor subclass such as DTensor or
    a compile-time fake), a frozen weight, a selection state, eager mode, and kernels that are
    built."""
    return (
        fused
        and state is not None
        and type(scores) in (torch.Tensor, torch.nn.Parameter)
        and type(weight) in (torch.Tensor, torch.nn.Parameter, SignBitWeight)
        and scores.device.type == "cpu"
        and weight.device.type == "cpu"
        and weight.dtype == scores.dtype
        and scores.dtype in (torch.float32, torch.float64, torch.bfloat16, torch.float16)
        and not weight.requires_grad
        and not torch.compiler.is_compiling()
        and kernels.load_kernels()
    )


def masked_weight(
    weight: torch.Tensor,
    scores: torch.Tensor,
    kept: int,
    state: SelectionState | None = None,
    single_use: bool = False,
    fused: bool | None = None,
    binary: bool = False,
) -> torch.Tensor:
    """``weight * topk_mask(scores, kept)`` with the straight-through gradient to ``scores``.

    Args:
        weight: the frozen base weight.
        scores: the scores, shaped like ``weight``.
        kept: how many weights the mask keeps (see [`num_kept`][popup_adapter.num_kept]).
        state: the layer's `SelectionState`, which lets the selection search a narrow
            band around the last threshold (``None``: an exact selection from scratch).
        single_use: promises that the result feeds exactly one operation whose gradient with
            respect to it is a buffer of its own (a convolution's or a matmul's weight
            gradient), so the backward may overwrite that buffer instead of allocating another:
            what a masked layer's forward does. Leave it False when the result is used any
            other way.
        fused: whether the fused CPU kernels may serve the call (default:
            `popup_adapter.kernels.use_kernels`); masked layers pass the setting they
            captured when built.
        binary: biprop: ``alpha * sign(W) * M`` instead (`binarize_`), with the same
            straight-through gradient.

    Returns:
        ``weight * M``, differentiable with respect to ``scores`` (straight-through).
    """
    if fused is None:
        fused = kernels.use_kernels()
    if _fused_kernels_apply(weight, scores, state, fused):
        return FusedStraightThroughMask.apply(weight, scores, kept, state, single_use, binary)
    return StraightThroughMask.apply(weight, scores, kept, state, binary)
