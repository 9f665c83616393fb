"""The masked layers that compute their kind directly, and the factory that picks one.

An exact ``nn.Linear``, ``nn.Conv1d/2d/3d``, transformers ``Conv1D`` or ``nn.Embedding`` is
computed here as the same operation with ``W * M`` (so the fused kernels' in-place backward
applies); any other module, subclasses of these included, runs its own forward through the
generic [`PopupLayer`][popup_adapter.PopupLayer]. `create_popup_layer` wraps a module's
masked parameters, one wrapper each.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from .base import is_expert_bank, transformers_conv1d, unmaskable_reason
from .layers import PopupLayer


class PopupLinear(PopupLayer):
    """Masked ``nn.Linear`` (and, through the base layer's own forward, any subclass)."""

    computed_types = (nn.Linear,)

    def forward_with_weight(self, x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
        """``F.linear`` with ``weight``, the base layer's bias.

        Args:
            x: the input.
            weight: ``W * M``.

        Returns:
            ``x @ weight.T + bias``.
        """
        return F.linear(x, weight, self.base_layer.bias)


class PopupConv(PopupLayer):
    """Masked ``nn.Conv1d`` / ``Conv2d`` / ``Conv3d`` (any groups, depthwise included, any
    padding mode) and their subclasses (timm's ``StdConv2d``, ``Conv2dSame``...)."""

    computed_types = (nn.Conv1d, nn.Conv2d, nn.Conv3d)

    def forward_with_weight(self, x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
        """The base conv's own ``_conv_forward`` with ``weight``.

        Args:
            x: the input.
            weight: ``W * M``.

        Returns:
            The convolution's output.
        """
        return self.base_layer._conv_forward(x, weight, self.base_layer.bias)


class PopupConv1D(PopupLayer):
    """Masked transformers ``Conv1D`` (GPT-2): a linear layer whose weight is stored transposed,
    ``(in_features, out_features)``, so its fan-in is the first dimension."""

    @property
    def computed_types(self) -> tuple[type, ...]:
        """transformers' ``Conv1D``, once transformers is loaded."""
        conv1d = transformers_conv1d()
        return (conv1d,) if conv1d is not None else ()

    def forward_with_weight(self, x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
        """``x @ weight + bias``, as transformers' Conv1D computes it.

        Args:
            x: the input.
            weight: ``W * M``, stored ``(in, out)``.

        Returns:
            The layer's output.
        """
        size_out = (*x.size()[:-1], self.base_layer.nf)
        out = torch.addmm(self.base_layer.bias, x.view(-1, x.size(-1)), weight)
        return out.view(size_out)


class PopupEmbedding(PopupLayer):
    """Masked ``nn.Embedding`` (off by default: set ``mask_embeddings=True``)."""

    computed_types = (nn.Embedding,)

    def forward_with_weight(self, x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
        """``F.embedding`` with ``weight`` and the base layer's options.

        Args:
            x: token indices.
            weight: ``W * M``.

        Returns:
            The embeddings.
        """
        base = self.base_layer
        return F.embedding(
            x,
            weight,
            base.padding_idx,
            base.max_norm,
            base.norm_type,
            base.scale_grad_by_freq,
            base.sparse,
        )


def popup_layer_class(module: nn.Module) -> type[PopupLayer]:
    """The wrapper class for ``module``'s ``weight``: the one that computes its kind directly
    where there is one (its exact class only), else the generic
    [`PopupLayer`][popup_adapter.PopupLayer].

    Args:
        module: the module that owns the masked ``weight``.

    Returns:
        ``PopupLinear``, ``PopupConv``, ``PopupConv1D``, ``PopupEmbedding`` or ``PopupLayer``.
    """
    if isinstance(module, nn.Linear):
        return PopupLinear
    if isinstance(module, (nn.Conv1d, nn.Conv2d, nn.Conv3d)):
        return PopupConv
    conv1d = transformers_conv1d()
    if conv1d is not None and isinstance(module, conv1d):
        return PopupConv1D
    if isinstance(module, nn.Embedding):
        return PopupEmbedding
    return PopupLayer


def create_popup_layer(
    module: nn.Module, parameter_names: Sequence[str] = ("weight",)
) -> PopupLayer:
    """Wrap the named parameters of ``module``, one wrapper each, nested (``weight`` innermost).

    Args:
        module: the module whose parameters are masked.
        parameter_names: which of its parameters.

    Returns:
        The outermost wrapper (a
        [`PopupLinear`][popup_adapter.PopupLinear]/[`PopupConv`][popup_adapter.PopupConv]/... for an
        exact plain layer's ``weight``, a [`PopupLayer`][popup_adapter.PopupLayer] otherwise).

    Raises:
        TypeError: a parameter cannot be masked, with the reason (see
            `unmaskable_reason`).
    """
    names = sorted(parameter_names, key=lambda name: name != "weight")
    for name in names:
        reason = unmaskable_reason(module, name)
        if reason is not None:
            raise TypeError(f"cannot mask {name} of a {type(module).__name__}: {reason}")
    layer = module
    for name in names:
        if name == "weight":
            layer = popup_layer_class(module)(module)
        else:
            per_expert = is_expert_bank(module, module._parameters[name])
            layer = PopupLayer(layer, name, per_expert=per_expert)
    return layer
