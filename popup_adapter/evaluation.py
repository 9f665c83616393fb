"""How a trained model is scored: a batch's logits and labels, and top-1/top-5 accuracy with the
mean loss over a loader, gathered across processes (each sample counted once, as Accelerate's
``gather_for_metrics`` drops the padding of the last batch)."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F
from accelerate import Accelerator
from torch import nn
from torch.utils.data import DataLoader


def default_forward(model: nn.Module, batch: Any) -> tuple[torch.Tensor, torch.Tensor]:
    """``(logits, labels)`` of a batch: ``(inputs, labels)`` pairs, or a dict with ``labels``
    (transformers style, the rest passed as keyword arguments).

    Args:
        model: the model.
        batch: ``(inputs, labels)`` or a dict with ``labels``.

    Returns:
        ``(logits, labels)``.
    """
    if isinstance(batch, dict):
        inputs = {key: value for key, value in batch.items() if key != "labels"}
        output = model(**inputs)
        return getattr(output, "logits", output), batch["labels"]
    inputs, labels = batch
    return model(inputs), labels


def _topk_correct(logits: torch.Tensor, labels: torch.Tensor, k: int) -> torch.Tensor:
    k = min(k, logits.shape[-1])
    return (logits.topk(k, dim=-1).indices == labels[:, None]).any(dim=-1)


def evaluate(
    accelerator: Accelerator,
    model: nn.Module,
    loader: DataLoader,
    forward: Callable = default_forward,
) -> dict[str, float]:
    """Top-1 and top-5 accuracy and mean loss over ``loader``, gathered across processes.

    Args:
        accelerator: the run's Accelerator.
        model: the (prepared) model; put back in training mode after.
        loader: the (prepared) eval loader.
        forward: ``forward(model, batch) -> (logits, labels)``.

    Returns:
        ``{"top1", "top5", "eval_loss"}``.
    """
    model.eval()
    top1, top5, losses = [], [], []
    with torch.no_grad():
        for batch in loader:
            logits, labels = forward(model, batch)
            loss = F.cross_entropy(logits.float(), labels, reduction="none")
            logits, labels, loss = accelerator.gather_for_metrics((logits, labels, loss))
            top1.append(_topk_correct(logits, labels, 1))
            top5.append(_topk_correct(logits, labels, 5))
            losses.append(loss)
    model.train()
    return {
        "top1": torch.cat(top1).float().mean().item(),
        "top5": torch.cat(top5).float().mean().item(),
        "eval_loss": torch.cat(losses).mean().item(),
    }
