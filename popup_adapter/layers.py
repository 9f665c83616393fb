"""How one wrapped layer computes: ``base_layer`` keeps its frozen weight, scores pick ``W * M``.

Follows PEFT's layer contract: the original module stays as ``base_layer``, adapter parameters
are prefixed (``popup_scores``) and keyed by adapter name, one adapter is active at a time, and
``weight`` / ``bias`` read through to the base layer so code that inspects them keeps working.
Each subclass only says how its base layer computes with a given weight; the same computation
runs in the merged model, which is why merged and masked outputs are bit-identical.
"""

from __future__ import annotations

import math
import sys

import torch
import torch.nn.functional as F
from torch import nn

from .selection import SelectionState, masked_weight, num_kept, topk_mask


def whole_tensor(tensor: torch.Tensor) -> torch.Tensor:
    """``tensor`` itself, or all of it when it is a shard (an FSDP2 DTensor). Gathering is a
    collective: under FSDP every process must make the same calls in the same order."""
    return tensor.full_tensor() if hasattr(tensor, "full_tensor") else tensor


class PopupLayer(nn.Module):
    """A supported layer wrapped with one learnable score per weight and adapter."""

    #: the names PEFT-style code uses to find adapter parameters
    adapter_layer_names = ("popup_scores",)

    def __init__(self, base_layer: nn.Module) -> None:
        super().__init__()
        self.base_layer = base_layer
        self.popup_scores = nn.ParameterDict()
        self.popup_kept: dict[str, int] = {}
        #: per adapter, the last threshold, so the next selection is cheap (see selection.py)
        self.popup_selection: dict[str, SelectionState] = {}
        self.active_adapter: str | None = None
        self.disable_adapters = False
        self._eval_cache: tuple[tuple, torch.Tensor] | None = None

    # -- read-through to the base layer, so e.g. tied-weight code and `.weight.shape` still work
    @property
    def weight(self) -> torch.Tensor:
        """The frozen base weight (read-through to ``base_layer``)."""
        return self.base_layer.weight

    @property
    def bias(self) -> torch.Tensor | None:
        """The base layer's bias, or None."""
        return getattr(self.base_layer, "bias", None)

    @staticmethod
    def weight_fan_in(weight: torch.Tensor) -> int:
        """Inputs feeding one output unit: the fan of Kaiming's init for such a weight."""
        return math.prod(weight.shape[1:])

    @property
    def fan_in(self) -> int:
        """This layer's fan-in, as Kaiming's init counts it."""
        return self.weight_fan_in(self.weight)

    def update_layer(self, adapter_name: str, k: float, scores: torch.Tensor) -> None:
        """Add (or replace) the scores of ``adapter_name``, keeping ``round(k * n)`` weights."""
        if scores.shape != self.weight.shape:
            raise ValueError(
                f"scores of shape {tuple(scores.shape)} do not fit a weight of "
                f"shape {tuple(self.weight.shape)}"
            )
        param = nn.Parameter(scores.to(self.weight.device), requires_grad=True)
        self.popup_scores[adapter_name] = param
        self.popup_kept[adapter_name] = num_kept(k, self.weight.numel())
        self.popup_selection[adapter_name] = SelectionState()

    def delete_adapter(self, adapter_name: str) -> None:
        """Remove ``adapter_name``'s scores from this layer."""
        del self.popup_scores[adapter_name]
        del self.popup_kept[adapter_name]
        del self.popup_selection[adapter_name]
        if self.active_adapter == adapter_name:
            self.active_adapter = None
        self._eval_cache = None

    def set_adapter(self, adapter_name: str | None) -> None:
        """Make ``adapter_name`` the active mask; only its scores require grad (as in PEFT)."""
        for name, scores in self.popup_scores.items():
            scores.requires_grad_(name == adapter_name)
        self.active_adapter = adapter_name

    def load_mask(self, adapter_name: str, mask: torch.Tensor) -> None:
        """Set ``adapter_name``'s scores so that its top-k is exactly ``mask`` (a loaded mask):
        kept weights score 1/sqrt(fan_in), the initial scores' scale, the others 0."""
        scores = self.popup_scores[adapter_name]
        if int(mask.sum()) != self.popup_kept[adapter_name] or mask.shape != scores.shape:
            raise ValueError(
                f"a mask of shape {tuple(mask.shape)} keeping {int(mask.sum())} "
                f"does not fit this layer ({tuple(scores.shape)}, keeping "
                f"{self.popup_kept[adapter_name]})"
            )
        with torch.no_grad():
            scores.copy_(mask.to(scores.device, scores.dtype) / math.sqrt(self.fan_in))

    def get_mask(self, adapter_name: str | None = None) -> torch.Tensor:
        """The boolean mask of ``adapter_name`` (default: active), shaped like the weight."""
        adapter_name = adapter_name or self.active_adapter
        scores = whole_tensor(self.popup_scores[adapter_name])  # the mask is per whole layer
        return topk_mask(scores, self.popup_kept[adapter_name])

    def effective_weight(self) -> torch.Tensor:
        """The weight the forward pass uses: ``W * M`` of the active adapter, or ``W`` when off.

        When no gradient is being recorded (eval, inference) the masked weight is cached until
        the scores or the weight change, so masked inference costs what merged inference costs.
        """
        return self._effective_weight(single_use=False)

    def _effective_weight(self, single_use: bool) -> torch.Tensor:
        adapter = self.active_adapter
        if self.disable_adapters or adapter is None:
            return self.weight
        scores, kept = self.popup_scores[adapter], self.popup_kept[adapter]
        if torch.is_grad_enabled() or torch.compiler.is_compiling():
            if not torch.compiler.is_compiling():
                self._eval_cache = None  # training: do not hold a stale copy of the weight
            return masked_weight(
                self.weight, scores, kept, self.popup_selection[adapter], single_use
            )
        key = (adapter, scores._version, id(scores), self.weight._version, id(self.weight))
        if self._eval_cache is None or self._eval_cache[0] != key:
            self._eval_cache = (key, self.weight * topk_mask(scores, kept))
        return self._eval_cache[1]

    def forward(self, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        """The base layer's computation with the active adapter's ``W * M``."""
        # W * M feeds exactly one operation here: its gradient buffer may be reused in place
        return self.forward_with_weight(x, self._effective_weight(single_use=True))

    def forward_with_weight(self, x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
        """What ``base_layer`` computes, with ``weight`` in place of its own."""
        raise NotImplementedError

    def merged_base_layer(self, adapter_name: str | None = None) -> nn.Module:
        """``base_layer`` with ``W * M`` baked in, as a new parameter (tied weights stay intact)."""
        merged_weight = self.weight.detach() * self.get_mask(adapter_name)
        self.base_layer.weight = nn.Parameter(merged_weight, requires_grad=False)
        return self.base_layer

    def extra_repr(self) -> str:
        """Kept counts per adapter and the active one, for ``print(model)``."""
        kept = ", ".join(f"{a}: {n}/{self.weight.numel()}" for a, n in self.popup_kept.items())
        return f"kept=({kept}), active={self.active_adapter!r}"


class PopupLinear(PopupLayer):
    """Masked ``nn.Linear``."""

    def forward_with_weight(self, x, weight):
        """``F.linear`` with ``weight``, the base layer's bias."""
        return F.linear(x, weight, self.base_layer.bias)


class PopupConv(PopupLayer):
    """Masked ``nn.Conv1d`` / ``Conv2d`` / ``Conv3d``, any groups (depthwise included), any padding
    mode: the base layer's own ``_conv_forward`` does the work."""

    def forward_with_weight(self, x, weight):
        """The base conv's own ``_conv_forward`` with ``weight``."""
        return self.base_layer._conv_forward(x, weight, self.base_layer.bias)


class PopupConv1D(PopupLayer):
    """Masked transformers ``Conv1D`` (GPT-2): a linear layer whose weight is stored transposed,
    ``(in_features, out_features)``, so its fan-in is the first dimension."""

    @staticmethod
    def weight_fan_in(weight: torch.Tensor) -> int:
        """The first dimension: Conv1D stores ``(in_features, out_features)``."""
        return weight.shape[0]

    def forward_with_weight(self, x, weight):
        """``x @ weight + bias``, as transformers' Conv1D computes it."""
        size_out = (*x.size()[:-1], self.base_layer.nf)
        out = torch.addmm(self.base_layer.bias, x.view(-1, x.size(-1)), weight)
        return out.view(size_out)


class PopupEmbedding(PopupLayer):
    """Masked ``nn.Embedding`` (off by default: set ``mask_embeddings=True``)."""

    @staticmethod
    def weight_fan_in(weight: torch.Tensor) -> int:
        """The embedding dimension, as torch's Kaiming init counts it."""
        return weight.shape[1]

    def forward_with_weight(self, x, weight):
        """``F.embedding`` with ``weight`` and the base layer's options."""
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


def _transformers_conv1d() -> type | None:
    """transformers' ``Conv1D`` if transformers is loaded; never imports it ourselves."""
    module = sys.modules.get("transformers.pytorch_utils")
    return getattr(module, "Conv1D", None)


def popup_layer_class(
    module: nn.Module, include_embeddings: bool = True
) -> type[PopupLayer] | None:
    """The wrapper class for ``module``, or None when edge-popup cannot mask it."""
    if isinstance(module, nn.Linear):
        return PopupLinear
    if isinstance(module, (nn.Conv1d, nn.Conv2d, nn.Conv3d)):
        return PopupConv
    conv1d = _transformers_conv1d()
    if conv1d is not None and isinstance(module, conv1d):
        return PopupConv1D
    if include_embeddings and isinstance(module, nn.Embedding):
        return PopupEmbedding
    return None


def create_popup_layer(module: nn.Module) -> PopupLayer:
    """Wrap a supported module; raise ``TypeError`` naming the supported types otherwise."""
    cls = popup_layer_class(module)
    if cls is None:
        raise TypeError(
            f"cannot mask a {type(module).__name__}: supported are nn.Linear, "
            "nn.Conv1d/2d/3d, transformers Conv1D and nn.Embedding"
        )
    return cls(module)
