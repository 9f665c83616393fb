"""A signed-constant base weight held as one sign bit per weight and one constant per layer.

With ``init="signed_constant"`` every weight of a layer is ``+c`` or ``-c``: its float32 form
spends 32 bits on one bit of information. During a search that float copy is the largest
tensor a masked layer holds besides its scores, their gradient and the optimizer's state, and
it is what puts popup training above dense training's memory (dense holds the weight, its
gradient and the optimizer's state: three floats; popup four and a base). `SignBitWeight` holds
the base in 1/32 of that.

It is a tensor subclass standing in for the frozen parameter, so that every reader still sees
the exact float weights: the fused kernels (`popup_adapter.selection`) read the bits directly
and expand ``+-c`` in their own pass (forward, backward and the backward's recompute of
``W * M``), and every other operation (the eager path, ``state_dict``, fingerprints, a base
forward with adapters disabled, ``torch.equal``) gets the float tensor, written when asked for
and freed after. Writing into it is refused, except ``copy_`` of values it can hold exactly
(``load_state_dict`` of the same base, DDP's broadcast of identical weights): a silently
dropped write would be a wrong model.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn
from torch.utils._pytree import tree_map

from .codec import pack_bits, unpack_bits_tensor
from .errors import AdapterError

_aten = torch.ops.aten
#: operations that give back the same packed base (moved, cast or aliased), never its floats
_ALIASES = (_aten.detach.default, _aten.alias.default)


class SignBitWeight(torch.Tensor):
    """A float tensor whose every entry is ``+scale`` or ``-scale``, held as packed sign bits.

    ``bits`` is flat uint8 in `popup_adapter.codec.pack_bits`' little bit order, a set bit a
    negative weight; ``scale`` is exact in the tensor's dtype. Any operation other than the
    fused kernels' reads it as `dense`.
    """

    bits: torch.Tensor
    scale: float

    @staticmethod
    def __new__(
        cls, bits: torch.Tensor, scale: float, shape: torch.Size, dtype: torch.dtype
    ) -> SignBitWeight:
        return torch.Tensor._make_wrapper_subclass(
            cls, shape, dtype=dtype, device=bits.device, requires_grad=False
        )

    def __init__(
        self, bits: torch.Tensor, scale: float, shape: torch.Size, dtype: torch.dtype
    ) -> None:
        """Wrap packed signs.

        Args:
            bits: ``ceil(numel / 8)`` uint8 bytes, a set bit a negative weight.
            scale: every weight's magnitude.
            shape: the weight's shape.
            dtype: the weight's floating dtype.
        """
        self.bits, self.scale = bits, float(scale)

    @classmethod
    def from_dense(cls, weight: torch.Tensor) -> SignBitWeight:
        """The packed form of ``weight``, which must be ``+-c`` for one ``c > 0``.

        Args:
            weight: a float tensor (any device).

        Returns:
            A `SignBitWeight` equal to ``weight`` entry for entry.

        Raises:
            AdapterError: ``weight`` is not one magnitude with a sign (then it needs its floats).
        """
        flat = weight.detach().reshape(-1)
        scale = flat[:1].abs()
        if flat.numel() == 0 or not (
            bool(scale > 0) and torch.equal(flat.abs(), scale.expand_as(flat))
        ):
            raise AdapterError(
                "this weight is not one magnitude with a random sign (init='signed_constant' "
                "draws that); it cannot be held as sign bits"
            )
        bits = torch.from_numpy(pack_bits((flat < 0).cpu().numpy())).to(weight.device)
        return cls(bits, float(scale), weight.shape, weight.dtype)

    def dense(self) -> torch.Tensor:
        """The float weights, written now (the caller holds them as long as it needs them).

        Returns:
            A plain contiguous tensor of this shape and dtype.
        """
        negative = unpack_bits_tensor(self.bits, self.numel()).view(self.shape)
        positive = torch.full((), self.scale, dtype=self.dtype, device=self.device)
        return torch.where(negative, -positive, positive)

    def __repr__(self) -> str:
        return (
            f"SignBitWeight(+-{self.scale:.6g}, shape={tuple(self.shape)}, dtype={self.dtype}, "
            f"device={self.device}, {self.bits.numel()} bytes)"
        )

    # -- torch.compile and Module._apply (swap_tensors) see the inner tensor
    def __tensor_flatten__(self) -> tuple[list[str], tuple]:
        return ["bits"], (self.scale, self.shape, self.dtype)

    @staticmethod
    def __tensor_unflatten__(inner: dict, meta: tuple, outer_size: Any, outer_stride: Any):
        scale, shape, dtype = meta
        return SignBitWeight(inner["bits"], scale, shape, dtype)

    __torch_function__ = torch._C._disabled_torch_function_impl

    @classmethod
    def __torch_dispatch__(cls, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func in _ALIASES:
            return args[0]._with_bits(args[0].bits)
        if func is _aten.clone.default:
            return args[0]._with_bits(args[0].bits.clone())
        if func is _aten._to_copy.default and isinstance(args[0], SignBitWeight):
            moved = args[0]._moved(**kwargs)
            if moved is not None:
                return moved
        if func is _aten.copy_.default and isinstance(args[0], SignBitWeight):
            return args[0]._copy_from(args[1])
        if func._schema.is_mutable and _writes_into_sign_bits(func, args, kwargs):
            raise AdapterError(
                f"{func.__name__} would write into a base held as sign bits (read-only); call "
                "model.unpack_base() first to hold its floats"
            )
        return func(*tree_map(dense_value, args), **tree_map(dense_value, kwargs))

    def _with_bits(self, bits: torch.Tensor) -> SignBitWeight:
        return SignBitWeight(bits, self.scale, self.shape, self.dtype)

    def _moved(self, dtype=None, device=None, **_: Any) -> SignBitWeight | None:
        """``.to(device, dtype)`` kept packed where the sign bits still say it all (a floating
        dtype that holds ``scale`` exactly), else None (the floats are written)."""
        dtype = dtype or self.dtype
        if not dtype.is_floating_point:
            return None
        scale = torch.tensor(self.scale, dtype=torch.float64).to(dtype)
        if float(scale) != self.scale:
            return None
        bits = self.bits.to(device or self.device, copy=True)  # a copy: never the same bits
        return SignBitWeight(bits, self.scale, self.shape, dtype)

    def _copy_from(self, source: torch.Tensor) -> SignBitWeight:
        if isinstance(source, SignBitWeight) and source.scale == self.scale:
            self.bits.copy_(source.bits)
            return self
        packed = SignBitWeight.from_dense(source.to(self.device, self.dtype))
        if packed.scale != self.scale:
            raise AdapterError(
                f"a base held as sign bits (+-{self.scale:.6g}) cannot take values of another "
                f"magnitude ({packed.scale:.6g}); call model.unpack_base() first"
            )
        self.bits.copy_(packed.bits)
        return self


def _writes_into_sign_bits(func, args: tuple, kwargs: dict) -> bool:
    """Whether the operation writes into one of its `SignBitWeight` arguments."""
    for position, argument in enumerate(func._schema.arguments):
        value = args[position] if position < len(args) else kwargs.get(argument.name)
        written = argument.alias_info is not None and argument.alias_info.is_write
        if written and isinstance(value, SignBitWeight):
            return True
    return False


def dense_value(tensor: torch.Tensor) -> torch.Tensor:
    """``tensor``'s floats: written for a `SignBitWeight`, the tensor itself otherwise.

    Args:
        tensor: any tensor.

    Returns:
        A tensor with storage, equal to ``tensor``.
    """
    return tensor.dense() if isinstance(tensor, SignBitWeight) else tensor


def _state_dict_floats(module: nn.Module, state: dict, prefix: str, _metadata: Any) -> None:
    """``state_dict`` gives a packed base as its float weights (what timm or transformers code
    loading that state expects); ``keep_vars=True`` still gives the parameter itself."""
    for name, param in module._parameters.items():
        value = state.get(prefix + name)
        if isinstance(param, SignBitWeight) and value is not None and value is not param:
            state[prefix + name] = param.dense()


def pack_parameter(module: nn.Module, name: str) -> bool:
    """Hold ``module``'s parameter ``name`` as sign bits, if it is not already.

    Args:
        module: the parameter's owner.
        name: the parameter's name there.

    Returns:
        Whether it was packed now (False: it already was).

    Raises:
        AdapterError: the parameter is not one magnitude with a random sign.
    """
    weight = module._parameters[name]
    if isinstance(weight, SignBitWeight):
        return False
    packed = SignBitWeight.from_dense(weight)
    module._parameters[name] = nn.Parameter(packed, requires_grad=False)
    if _state_dict_floats not in module._state_dict_hooks.values():  # (harmless once unpacked)
        module.register_state_dict_post_hook(_state_dict_floats)
    return True


def unpack_parameter(module: nn.Module, name: str) -> bool:
    """Give ``module``'s parameter ``name`` its floats back, if it is held as sign bits.

    Args:
        module: the parameter's owner.
        name: the parameter's name there.

    Returns:
        Whether it was unpacked now.
    """
    weight = module._parameters[name]
    if not isinstance(weight, SignBitWeight):
        return False
    module._parameters[name] = nn.Parameter(weight.dense(), requires_grad=False)
    return True
