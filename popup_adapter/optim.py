"""What steps the scores: SGD whose momentum is held in bfloat16.

A search holds, per masked weight, its score, the score's gradient and SGD's momentum. The
scores only decide a ranking (which |S| are in the top k), so the momentum, which only scales
and smooths their steps, does not need float32's 24 bits of mantissa: held in bfloat16 it costs
half, and with the base held as sign bits (`PopupModel.pack_base`) a search then holds less
than dense training per weight. The scores themselves and their gradients stay float32. How
much the masks move because of it is measured in docs/results.md (Training memory).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any

import torch

from .errors import ConfigError

#: the dtypes the momentum can be held in, by name (as configs and optimizer states store it)
STATE_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}


class SGD(torch.optim.Optimizer):
    """``torch.optim.SGD`` (momentum, weight decay; no dampening, no Nesterov) with the
    momentum buffer held in ``state_dtype``.

    The update is torch's: ``b = momentum * b + (g + weight_decay * p)`` (``b = g + ...`` on
    the first step), ``p -= lr * b``, with ``b`` rounded to ``state_dtype`` as it is stored
    (in place: no float32 copy of it is made). With ``state_dtype="float32"`` it steps exactly
    as ``torch.optim.SGD`` does.
    """

    def __init__(
        self,
        params: Iterable[torch.Tensor] | Iterable[dict[str, Any]],
        lr: float,
        momentum: float = 0.9,
        weight_decay: float = 0.0,
        state_dtype: str = "bfloat16",
    ) -> None:
        """Set up the parameter groups.

        Args:
            params: the parameters (or groups) to step.
            lr: the learning rate.
            momentum: the momentum factor, in [0, 1).
            weight_decay: L2 penalty added to each gradient.
            state_dtype: ``"bfloat16"`` or ``"float32"``: what the momentum is held in.

        Raises:
            ConfigError: a value out of range or an unknown ``state_dtype``.
        """
        if lr < 0 or not 0 <= momentum < 1 or weight_decay < 0:
            raise ConfigError(
                f"SGD needs lr >= 0, momentum in [0, 1) and weight_decay >= 0; got lr={lr}, "
                f"momentum={momentum}, weight_decay={weight_decay}"
            )
        if state_dtype not in STATE_DTYPES:
            raise ConfigError(
                f"unknown state_dtype {state_dtype!r}; choose one of {', '.join(STATE_DTYPES)}"
            )
        defaults = {
            "lr": lr,
            "momentum": momentum,
            "weight_decay": weight_decay,
            "state_dtype": state_dtype,
        }
        super().__init__(params, defaults)

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """torch's, with the momentum put back in ``state_dtype`` (torch casts every state
        tensor to its parameter's dtype; the values were ``state_dtype``'s, so none changes).

        Args:
            state_dict: as ``state_dict()`` returned it.
        """
        super().load_state_dict(state_dict)
        for group in self.param_groups:
            for param in group["params"]:
                state = self.state.get(param, {})
                if "momentum_buffer" in state:
                    state["momentum_buffer"] = state["momentum_buffer"].to(
                        STATE_DTYPES[group["state_dtype"]]
                    )

    @torch.no_grad()
    def step(self, closure: Callable[[], float] | None = None) -> float | None:
        """One update of every parameter that has a gradient.

        Args:
            closure: re-evaluates the model and returns the loss (optional).

        Returns:
            The closure's loss, or None.
        """
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            dtype = STATE_DTYPES[group["state_dtype"]]
            for param in group["params"]:
                if param.grad is None:
                    continue
                step = param.grad
                if group["weight_decay"]:
                    step = step.add(param, alpha=group["weight_decay"])
                state = self.state[param]
                momentum = state.get("momentum_buffer")
                if group["momentum"] == 0:
                    momentum = step
                elif momentum is None:
                    momentum = state["momentum_buffer"] = step.to(dtype, copy=True)
                else:
                    momentum.mul_(group["momentum"]).add_(step)
                param.add_(momentum, alpha=-group["lr"])
        return loss
