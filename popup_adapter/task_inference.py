"""Which adapter does an unlabelled batch belong to? Supermasks in Superposition's rules
(SupSup, Wortsman et al., NeurIPS 2020), over the adapters of one backbone.

- ``"one_shot"``: superpose the candidates' masks with equal mixing weights
  (``W * sum_i alpha_i M_i``, alpha_i = 1/n), run the batch once, and take the candidate whose
  weight lowers the mean output entropy fastest: the most negative ``dH/dalpha_i``. One
  forward and one backward pass, whatever the number of candidates.
- ``"binary"``: SupSup's refinement: the same gradient, keeping the better half of the
  candidates each round until one is left: ``ceil(log2 n)`` forward-backward passes.
- ``"entropy"``: run each candidate alone and take the lowest mean entropy: ``n`` forward
  passes, the plain rule to compare against.

The rules assume what SupSup assumes: the right mask makes the model confident (low entropy)
on its task's inputs. A batch is one task; the answer is for the batch.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch

from .errors import AdapterError

if TYPE_CHECKING:
    from .model import PopupModel

#: the rules `infer_adapter` knows
RULES = ("one_shot", "binary", "entropy")


@dataclass(frozen=True)
class AdapterInference:
    """What `infer_adapter` found.

    Args:
        adapter: the adapter the batch most likely belongs to.
        confidence: ``(s2 - s1) / (|s1| + |s2|)`` over the two best scores of the deciding
            round: 0 for a tie, towards 1 as the best stands out (1 with a single candidate).
        scores: per candidate of the first round, lower is better: ``dH/dalpha_i``
            (one_shot, binary) or the mean output entropy H (entropy).
        forward_passes: forward passes run (each one_shot or binary round adds as many
            backward passes).
    """

    adapter: str
    confidence: float
    scores: dict[str, float]
    forward_passes: int


def output_entropy(output: Any) -> torch.Tensor:
    """The mean entropy of the model's predicted distributions over a batch.

    Args:
        output: logits (classes last), or a transformers output with ``logits``.

    Returns:
        A scalar, in nats, differentiable.
    """
    logits = output if isinstance(output, torch.Tensor) else output.logits
    log_p = torch.log_softmax(logits.float(), dim=-1)
    return -(log_p.exp() * log_p).sum(-1).mean()


def _run(model: PopupModel, x: Any) -> Any:
    return model(**x) if isinstance(x, Mapping) else model(x)


def _entropy_gradient(model: PopupModel, x: Any, candidates: Sequence[str]) -> list[float]:
    alphas = torch.full((len(candidates),), 1 / len(candidates), requires_grad=True)
    with torch.enable_grad(), model.superposed(candidates, alphas):
        entropy = output_entropy(_run(model, x))
    (gradient,) = torch.autograd.grad(entropy, alphas)
    return gradient.tolist()


def _entropy(model: PopupModel, x: Any, adapter: str) -> float:
    with torch.no_grad(), model.superposed([adapter], torch.ones(1)):  # exactly the adapter
        return float(output_entropy(_run(model, x)))


def _margin(scores: Sequence[float]) -> float:
    if len(scores) < 2:
        return 1.0
    best, second = sorted(scores)[:2]
    spread = abs(best) + abs(second)
    return 0.0 if spread == 0 else (second - best) / spread


def infer_adapter(
    model: PopupModel,
    x: Any,
    candidates: Sequence[str] | None = None,
    rule: str = "one_shot",
) -> AdapterInference:
    """The adapter that the batch ``x`` most likely belongs to, by ``rule`` (see the module).

    Args:
        model: a model with several adapters (eval mode).
        x: the batch, as the model takes it (a tensor, or a mapping of its keyword inputs).
        candidates: the adapters to choose from (default: all of them).
        rule: ``"one_shot"`` (1 forward + 1 backward), ``"binary"`` (``ceil(log2 n)`` of
            those) or ``"entropy"`` (``n`` forwards).

    Returns:
        The `AdapterInference`.

    Raises:
        AdapterError: an unknown rule or candidate, no candidates, or training mode.
    """
    if rule not in RULES:
        raise AdapterError(f"unknown rule {rule!r} for infer_adapter; use one of {RULES}")
    candidates = list(model.peft_config if candidates is None else candidates)
    if not candidates:
        raise AdapterError("infer_adapter needs at least one candidate adapter")
    if rule == "entropy":
        scores = [_entropy(model, x, adapter) for adapter in candidates]
        best = candidates[min(range(len(scores)), key=scores.__getitem__)]
        by_name = dict(zip(candidates, scores, strict=True))
        return AdapterInference(best, _margin(scores), by_name, len(scores))
    remaining, first, passes = candidates, None, 0
    while True:
        gradient = _entropy_gradient(model, x, remaining) if len(remaining) > 1 else [0.0]
        passes += len(remaining) > 1
        first = first or dict(zip(remaining, gradient, strict=True))
        order = sorted(range(len(remaining)), key=gradient.__getitem__)
        if rule == "one_shot" or len(remaining) <= 2:
            return AdapterInference(remaining[order[0]], _margin(gradient), first, passes)
        remaining = [remaining[i] for i in sorted(order[: math.ceil(len(remaining) / 2)])]
