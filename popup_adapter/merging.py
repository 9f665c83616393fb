"""Serving a mask at the plain model's speed and memory: the active adapter merged in place,
and back (PEFT's ``merge_adapter`` / ``unmerge_adapter``).

A masked layer normally writes ``W * M`` on every forward (selecting the mask from its
scores, or unpacking a served adapter's bits): a pass over the weights per layer call.
Merged, the layer holds ``W * M`` as its weight and runs the plain layer's forward; the mask
is kept bit-packed (1 bit per weight), and the scores are dropped when the mask alone gives
them back (a loaded mask's scores are ``mask / sqrt(fan_in)``), so a mask loaded for
inference costs what the merged model costs.

Writing ``W * M`` over W loses the pruned weights. It is done only where the seed gives them
back exactly (the base's point: `popup_adapter.base.layer_weight` regenerates them, and
unmerging checks the kept weights against the regenerated ones); a pretrained base's weight
(``init="keep"``), one shared with another module, or one held as sign bits
(`PopupModel.pack_base`) keeps W and holds ``W * M`` beside it. Nothing is lost either way:
unmerging restores W, and the scores or their mask form.
"""

from __future__ import annotations

import torch
from torch import nn

from .base import is_drawn, layer_weight
from .errors import AdapterError, BaseMismatchError
from .injection import replace_wrappers, tied_parameter_ids, wrapped_module
from .layers import PopupLayer
from .redraws import redraw_counts, write_redrawn
from .sharding import whole_tensor
from .sign_bits import SignBitWeight


def merge_layer(layer: PopupLayer, in_place: bool, loaded_mask: torch.Tensor | None = None) -> None:
    """Make the active adapter's ``W * M`` the layer's weight, its mask bit-packed; scores
    that the mask alone restores (a loaded mask's) are dropped, as a served adapter's.

    Args:
        layer: a layer with an active, unmerged adapter.
        in_place: write ``W * M`` over W (the pruned weights come back from the seed); False
            keeps W and holds ``W * M`` beside it.
        loaded_mask: the adapter's mask as just loaded (checked by ``load_mask`` or
            ``serve_mask``): used as it is, without unpacking it or selecting over scores.

    Raises:
        AdapterError: a sharded (FSDP) weight.
    """
    adapter, weight = layer.active_adapter, layer.base_weight
    if whole_tensor(weight) is not weight:
        raise AdapterError("a sharded (FSDP) weight is not merged; gather the model first")
    with torch.no_grad():
        mask = layer.get_mask(adapter) if loaded_mask is None else loaded_mask.to(weight.device)
        if adapter not in layer.popup_masks:  # what the weight holds, bit-packed
            layer.popup_masks.set(adapter, mask)
        if in_place and not layer.popup_binary[adapter]:
            weight.mul_(mask)  # W * M, without a second copy of the weight
        elif in_place:
            weight.copy_(layer.masked_value(weight, mask, adapter))
        else:
            layer.merged_weight = layer.masked_value(weight, mask, adapter)
        scores = layer.popup_scores.get(adapter)
        if scores is not None and torch.equal(
            scores, layer.scores_for_mask(mask).to(scores.device, scores.dtype)
        ):
            del layer.popup_scores[adapter]  # the mask restores them: served from here
    layer.merged_adapter = adapter


def unmerge_layer(layer: PopupLayer, base_value: torch.Tensor | None) -> None:
    """Undo `merge_layer`: W back; an adapter with scores selects from them again, a served
    one keeps its packed mask.

    Args:
        layer: a merged layer.
        base_value: the full weight, regenerated from the seed, when it was merged in place.

    Raises:
        BaseMismatchError: ``base_value``'s kept weights differ from the merged ones.
    """
    adapter, weight = layer.merged_adapter, layer.base_weight
    mask = layer.get_mask(adapter)
    with torch.no_grad():
        if layer.merged_weight is None:
            base_value = base_value.to(weight.device, weight.dtype)
            if not torch.equal(layer.masked_value(base_value, mask, adapter), weight):
                raise BaseMismatchError(
                    "the base regenerated from the seed differs from the merged weights; "
                    "unmerging would change the model (was a base weight changed while merged?)"
                )
            weight.copy_(base_value)
    if not layer.is_served(adapter):
        layer.popup_masks.pop(adapter)  # its scores give the mask again
    layer.merged_adapter, layer.merged_weight = None, None


def merged_module(layer: PopupLayer, adapter_name: str) -> nn.Module:
    """The owner module of ``layer`` with its adapter's masked weight baked in, for every
    nested wrapper, each as a new parameter (a tied weight stays intact in the other modules
    that share it).

    Args:
        layer: the outermost wrapper of a module.
        adapter_name: whose mask.

    Returns:
        The plain module, computing exactly what the wrapper computed.
    """
    value = layer.masked_value(layer.base_weight, layer.get_mask(adapter_name), adapter_name)
    setattr(layer.owner, layer.parameter_name, nn.Parameter(value, requires_grad=False))
    inner = layer.base_layer
    return merged_module(inner, adapter_name) if isinstance(inner, PopupLayer) else inner


class MergeMixin:
    """``merge_adapter`` / ``unmerge_adapter`` for [`PopupModel`][popup_adapter.PopupModel]
    (host: ``active_adapter``, ``_backbone_config``, ``_masked_layers``, ``base_model``,
    ``unpack_base``)."""

    @property
    def merged(self) -> bool:
        """Whether the active adapter is merged into the weights (PEFT's name).

        Returns:
            True after [`merge_adapter`][popup_adapter.PopupModel.merge_adapter].
        """
        return any(layer.merged_adapter is not None for _, layer in self._masked_layers())

    def merge_adapter(self) -> None:
        """Serve the active mask at the plain model's cost: every masked layer holds
        ``W * M`` as its weight and runs the plain forward, the mask bit-packed.

        Outputs are unchanged (bit for bit: the same operation on the same ``W * M``). A
        loaded mask's scores are dropped (its mask restores them); trained scores are kept,
        so nothing is lost, but they cannot train while merged. Adding, switching, deleting
        or disabling adapters, ``unload()``, ``base_state()`` and ``set_trainable(True)``
        unmerge first. [`from_pretrained`][popup_adapter.PopupModel.from_pretrained] merges
        an adapter loaded for inference (``is_trainable=False``).

        Raises:
            AdapterError: already merged, or a sharded (FSDP) model.
        """
        if self.merged:
            raise AdapterError("the active adapter is merged already; unmerge_adapter() first")
        self._merge(self.base_fingerprint)

    def _merge(self, fingerprint: str, loaded_masks: dict[str, torch.Tensor] | None = None) -> None:
        """Merge, ``fingerprint`` being the base's (what `base_fingerprint` answers while the
        weights hold ``W * M``); ``loaded_masks`` (by layer name) are the active adapter's
        masks as just loaded, merged as they are (see `merge_layer`)."""
        self._merged_fingerprint = fingerprint
        config, tied = self._backbone_config, tied_parameter_ids(self.base_model)
        loaded_masks = loaded_masks or {}
        for target, layer in self._masked_layers():
            in_place = (
                id(layer.base_weight) not in tied
                and is_drawn(config, target.parameter_path)
                and not isinstance(layer.base_weight, SignBitWeight)  # its bits: read-only
            )
            merge_layer(layer, in_place, loaded_masks.get(target.key))

    def unmerge_adapter(self) -> None:
        """Undo [`merge_adapter`][popup_adapter.PopupModel.merge_adapter]: the base weights
        back (regenerated from the seed, checked against the kept ones) and the scores
        trainable again where they were. Does nothing when nothing is merged.

        Raises:
            BaseMismatchError: a regenerated weight differs from the merged one.
        """
        config = self._backbone_config
        for target, layer in self._masked_layers():
            if layer.merged_adapter is None:
                continue
            weight = layer.base_weight
            base_value = None
            if layer.merged_weight is None:
                path = target.parameter_path
                base_value = layer_weight(config, path, layer.owner, weight, True)
                if redraw_counts(layer) is not None:  # IteRand's redrawn weights
                    base_value = write_redrawn(base_value, layer, config, path)
            unmerge_layer(layer, base_value)
        self._merged_fingerprint = None

    # -- back to a plain model
    def merge_and_unload(self) -> nn.Module:
        """The plain model with the active mask baked in (``W * M``), giving identical outputs.

        A masked weight that was tied to another module (GPT-2's ``lm_head`` and ``wte``) gets a
        parameter of its own, since only one of the two users was masked; the model's config is
        told (``tie_word_embeddings = False``) so that saving and reloading it keeps them apart.

        Returns:
            The plain model (this PopupModel's ``base_model``, unwrapped in place).
        """
        tied = tied_parameter_ids(self.base_model)
        untied = any(id(layer.base_weight) in tied for _, layer in self._masked_layers())
        adapter = self.active_adapter
        replace_wrappers(
            self.base_model,
            lambda module: (
                merged_module(module, adapter)
                if isinstance(module, PopupLayer)
                else module.modules_to_save[adapter]
            ),
        )
        config = getattr(self.base_model, "config", None)
        if untied and getattr(config, "tie_word_embeddings", False):
            config.tie_word_embeddings = False
        return self.base_model

    def unload(self) -> nn.Module:
        """The plain model with the original layers back, masks dropped.

        Returns:
            The dense base (this PopupModel's ``base_model``, unwrapped in place).
        """
        self.unmerge_adapter()
        self.unpack_base()  # a plain model holds its floats
        replace_wrappers(self.base_model, wrapped_module)
        return self.base_model
