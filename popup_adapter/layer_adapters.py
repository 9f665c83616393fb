"""What one masked layer holds per adapter, and the masks it gives: scores, kept counts,
selection states and method (edge-popup's ``W * M`` or biprop's binarized form), added,
switched, deleted and loaded as PEFT's tuner layers do.

An adapter that trains holds float scores (its mask is their top-k). One that only serves
(loaded for inference, or `serve_mask`) holds its mask bit-packed instead, 1 bit per weight
against the scores' 32: a backbone can carry many tasks, and switching between them allocates
nothing beyond the ``W * M`` a forward writes anyway.

[`PopupLayer`][popup_adapter.PopupLayer] takes this mixin; its forward lives in `.layers`.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import nn

from .budget import KeptBudget
from .codec import pack_bits, unpack_bits_tensor
from .errors import AdapterError, ArtifactError
from .selection import SelectionState, binarize_, num_kept, topk_mask
from .sharding import whole_tensor


class PackedMasks(nn.Module):
    """Per served adapter, its mask bit-packed (`popup_adapter.codec.pack_bits`' little bit
    order, flat uint8), as non-persistent buffers: they move with the model (``.to``) and stay
    out of ``state_dict``, which holds what trains."""

    def set(self, adapter_name: str, mask: torch.Tensor) -> None:
        """Hold ``mask`` (bool, any shape) packed for ``adapter_name``.

        Args:
            adapter_name: whose mask.
            mask: the mask.
        """
        packed = torch.from_numpy(pack_bits(mask.detach().cpu().numpy().ravel()))
        self.register_buffer(adapter_name, packed.to(mask.device), persistent=False)

    def unpacked(self, adapter_name: str, shape: torch.Size) -> torch.Tensor:
        """``adapter_name``'s mask, unpacked on the device it is held on.

        Args:
            adapter_name: a held adapter.
            shape: the weight's shape.

        Returns:
            A bool tensor of ``shape``.
        """
        return unpack_bits_tensor(self._buffers[adapter_name], shape.numel()).view(shape)

    def nbytes(self, adapter_name: str) -> int:
        """The bytes ``adapter_name``'s packed mask holds (0 when none is held).

        Args:
            adapter_name: whose.

        Returns:
            ``ceil(numel / 8)``, or 0.
        """
        packed = self._buffers.get(adapter_name)
        return 0 if packed is None else packed.nbytes

    def __contains__(self, adapter_name: object) -> bool:
        return adapter_name in self._buffers

    def pop(self, adapter_name: str) -> None:
        """Drop ``adapter_name``'s packed mask, if held.

        Args:
            adapter_name: whose.
        """
        self._buffers.pop(adapter_name, None)


class AdapterMasksMixin:
    """Per-adapter state of a masked layer (host: `PopupLayer`, which owns the dicts:
    ``popup_scores``, ``popup_kept``, ``popup_selection``, ``popup_binary``,
    ``popup_budget``, the served masks ``popup_masks``, and the merged state).

    An adapter holds scores, or a packed mask, or both while it is merged with trained scores
    (`popup_adapter.merging`): the packed mask is then what the weight holds."""

    popup_masks: PackedMasks

    #: the adapters whose counts a model-wide budget sets (global top-k, a density ramp)
    popup_budget: dict[str, KeptBudget]

    def update_layer(
        self, adapter_name: str, k: float, scores: torch.Tensor, binary: bool = False
    ) -> None:
        """Add (or replace) the scores of an adapter.

        Args:
            adapter_name: the adapter.
            k: the fraction each mask keeps (``round(k * n)`` weights, per expert for a bank).
            scores: shaped like the weight; trainable only while ``adapter_name`` is active.
            binary: the kept weights are biprop's ``alpha * sign(W)``.

        Raises:
            AdapterError: ``scores`` has another shape than the weight.
        """
        weight = self.base_weight
        if scores.shape != weight.shape:
            raise AdapterError(
                f"scores of shape {tuple(scores.shape)} do not fit a weight of "
                f"shape {tuple(weight.shape)}"
            )
        # only the active adapter's scores train (set_adapter moves that), as in PEFT
        active = adapter_name == self.active_adapter
        self.popup_scores[adapter_name] = nn.Parameter(scores.to(weight.device), active)
        self.popup_masks.pop(adapter_name)
        self.popup_kept[adapter_name] = num_kept(k, weight.numel() // self.num_masks)
        self.popup_selection[adapter_name] = [SelectionState() for _ in range(self.num_masks)]
        self.popup_binary[adapter_name] = binary

    def delete_adapter(self, adapter_name: str) -> None:
        """Remove ``adapter_name``'s scores from this layer.

        Args:
            adapter_name: the adapter to remove.

        Raises:
            AdapterError: the layer holds a merged ``W * M`` (unmerge first).
        """
        self._refuse_while_merged(f"delete adapter {adapter_name!r}")
        if adapter_name in self.popup_scores:
            del self.popup_scores[adapter_name]
        self.popup_masks.pop(adapter_name)
        del self.popup_kept[adapter_name]
        del self.popup_selection[adapter_name]
        del self.popup_binary[adapter_name]
        self.popup_budget.pop(adapter_name, None)
        if self.active_adapter == adapter_name:
            self.active_adapter = None

    def set_adapter(self, adapter_name: str | None) -> None:
        """Make ``adapter_name`` the active mask; only its scores require grad (as in PEFT).

        Args:
            adapter_name: the adapter, or None for the unmasked base (adapters disabled).

        Raises:
            AdapterError: another adapter is merged into the weight (unmerge first).
        """
        if adapter_name != self.merged_adapter:
            self._refuse_while_merged(f"switch to adapter {adapter_name!r}")
        for name, scores in self.popup_scores.items():
            scores.requires_grad_(name == adapter_name)
        self.active_adapter = adapter_name

    def _per_mask(self, tensor: torch.Tensor) -> Sequence[torch.Tensor]:
        return tensor.unbind(0) if self.per_expert else (tensor,)

    def load_mask(self, adapter_name: str, mask: torch.Tensor) -> None:
        """Set an adapter's scores so that its top-k is exactly ``mask`` (a loaded mask, to
        train on): kept weights score 1/sqrt(fan_in), the initial scores' scale, the others 0.

        Args:
            adapter_name: the adapter.
            mask: bool, shaped like the weight, keeping exactly the adapter's count per mask.

        Raises:
            ArtifactError: another shape, or other kept counts.
        """
        self._check_mask(adapter_name, mask)
        current = self.popup_scores.get(adapter_name)  # only the active adapter's train
        trains = adapter_name == self.active_adapter if current is None else current.requires_grad
        loaded = self.scores_for_mask(mask).to(self.base_weight.device)
        self.popup_scores[adapter_name] = nn.Parameter(loaded, trains)
        self.popup_masks.pop(adapter_name)

    def serve_mask(self, adapter_name: str, mask: torch.Tensor) -> None:
        """Hold ``mask`` bit-packed as the adapter's, for inference: its scores (if any) are
        dropped, so it costs 1 bit per weight until it trains again (`load_mask`).

        Args:
            adapter_name: the adapter.
            mask: bool, shaped like the weight, keeping exactly the adapter's count per mask.

        Raises:
            ArtifactError: another shape, or other kept counts.
        """
        self._check_mask(adapter_name, mask)
        self.popup_masks.set(adapter_name, mask.to(self.base_weight.device))
        if adapter_name in self.popup_scores:
            del self.popup_scores[adapter_name]

    def is_served(self, adapter_name: str) -> bool:
        """Whether ``adapter_name`` holds only its packed mask (no scores: it cannot train).

        Args:
            adapter_name: an adapter of this layer.

        Returns:
            True for a served adapter.
        """
        return adapter_name not in self.popup_scores

    def _check_mask(self, adapter_name: str, mask: torch.Tensor) -> None:
        """Refuse a mask of another shape or other kept counts than the adapter's; a global
        mask's layers keep what they kept (the artifact checks), and that becomes the count."""
        weight, kept = self.base_weight, self.popup_kept[adapter_name]
        counts = (
            [int(torch.count_nonzero(part)) for part in self._per_mask(mask)] if mask.ndim else []
        )
        budget = self.popup_budget.get(adapter_name)
        if budget is not None and budget.selection == "global" and mask.shape == weight.shape:
            kept = counts[0]
        if mask.shape != weight.shape or any(count != kept for count in counts):
            raise ArtifactError(
                f"a mask of shape {tuple(mask.shape)} keeping {counts} does not fit this layer "
                f"({tuple(weight.shape)}, keeping {kept} in each of {self.num_masks} masks)"
            )
        self.popup_kept[adapter_name] = kept

    def scores_for_mask(self, mask: torch.Tensor) -> torch.Tensor:
        """The scores a loaded mask gets: kept weights 1/sqrt(fan_in), the others 0.

        Args:
            mask: bool, shaped like the weight.

        Returns:
            float32 scores whose top-k is ``mask``.
        """
        return mask.float() / math.sqrt(self.fan_in)

    def get_mask(self, adapter_name: str | None = None) -> torch.Tensor:
        """The current mask of an adapter.

        Args:
            adapter_name: whose (default: the active adapter).

        Returns:
            A bool tensor shaped like the weight (a sharded score is gathered whole first).
        """
        adapter_name = adapter_name or self.active_adapter
        if adapter_name in self.popup_masks:  # served, or merged: what the weight holds
            return self.popup_masks.unpacked(adapter_name, self.base_weight.shape)
        scores = whole_tensor(self.popup_scores[adapter_name])  # the mask is per whole layer
        kept = self._current_kept(adapter_name)
        masks = [topk_mask(part, kept) for part in self._per_mask(scores)]
        return torch.stack(masks) if self.per_expert else masks[0]

    def _current_kept(self, adapter_name: str) -> int:
        budget = self.popup_budget.get(adapter_name)
        if budget is not None:
            budget.refresh()  # the scores or the ramp may have moved since the last call
        return self.popup_kept[adapter_name]

    def masked_value(self, weight: torch.Tensor, mask: torch.Tensor, adapter_name: str):
        """What the forward computes with, from a weight and a mask: ``weight * mask``, or
        biprop's ``alpha * sign(W) * M`` for a binary adapter (what merging writes).

        Args:
            weight: the base weight (or one regenerated from the seed).
            mask: bool, shaped like it.
            adapter_name: whose method.

        Returns:
            A new tensor shaped like ``weight``.
        """
        value = weight.detach() * mask
        if self.popup_binary[adapter_name]:
            for part, part_mask in zip(self._per_mask(value), self._per_mask(mask), strict=True):
                binarize_(part, int(torch.count_nonzero(part_mask)))
        return value

    # -- merged (see popup_adapter.merging)
    def _refuse_while_merged(self, action: str) -> None:
        # a merged weight is one adapter's W * M: another mask (or none) from it is wrong
        if self.merged_adapter is not None:
            raise AdapterError(
                f"cannot {action}: adapter {self.merged_adapter!r} is merged into this "
                "layer's weight; call unmerge_adapter() on the model first"
            )
