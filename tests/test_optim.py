"""SGD with its momentum in bfloat16: torch's update, the state rounded as it is stored."""

import pytest
import torch

from popup_adapter.errors import ConfigError
from popup_adapter.optim import SGD
from popup_adapter.training import TrainingArguments


def _params(seed: int = 0) -> list[torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    return [torch.randn(shape, generator=generator) for shape in ((300,), (20, 30))]


def _step(optimizer, params, grads) -> None:
    for param, grad in zip(params, grads, strict=True):
        param.grad = grad.clone()
    optimizer.step()


@pytest.mark.parametrize("weight_decay", [0.0, 5e-4])
@pytest.mark.parametrize("momentum", [0.0, 0.9])
def test_float32_state_steps_exactly_as_torch_sgd(momentum, weight_decay):
    ours = [p.requires_grad_() for p in _params()]
    torchs = [p.requires_grad_() for p in _params()]
    kwargs = {"lr": 0.1, "momentum": momentum, "weight_decay": weight_decay}
    optimizers = SGD(ours, state_dtype="float32", **kwargs), torch.optim.SGD(torchs, **kwargs)
    for step in range(4):
        grads = _params(seed=10 + step)
        _step(optimizers[0], ours, grads)
        _step(optimizers[1], torchs, grads)
        assert all(torch.equal(a, b) for a, b in zip(ours, torchs, strict=True)), step


def test_bfloat16_state_is_the_float32_update_rounded_as_stored():
    params = [p.requires_grad_() for p in _params()]
    start = [p.detach().clone() for p in params]
    optimizer = SGD(params, lr=0.1, momentum=0.9, weight_decay=5e-4)
    first, second = _params(seed=1), _params(seed=2)
    _step(optimizer, params, first)
    buffers = [optimizer.state[p]["momentum_buffer"] for p in params]
    expected = [
        g.add(p0, alpha=5e-4).to(torch.bfloat16) for g, p0 in zip(first, start, strict=True)
    ]
    assert all(
        b.dtype == torch.bfloat16 and torch.equal(b, e)
        for b, e in zip(buffers, expected, strict=True)
    )
    assert all(b.nbytes * 2 == p.nbytes for b, p in zip(buffers, params, strict=True))
    for p, p0, b in zip(params, start, buffers, strict=True):
        assert torch.equal(p.detach(), p0.add(b, alpha=-0.1))  # the stored, rounded momentum
    after_one = [p.detach().clone() for p in params]
    _step(optimizer, params, second)
    for p, p1, g, b0 in zip(params, after_one, second, expected, strict=True):
        momentum = (b0 * 0.9).add_(g.add(p1, alpha=5e-4))  # in bfloat16, as stored
        assert torch.equal(p.detach(), p1.add(momentum, alpha=-0.1))


def test_a_resumed_optimizer_continues_as_if_never_stopped():
    run, resumed = [p.requires_grad_() for p in _params()], None
    optimizer = SGD(run, lr=0.1)
    _step(optimizer, run, _params(seed=1))
    saved_state = optimizer.state_dict()
    resumed = [p.detach().clone().requires_grad_() for p in run]
    again = SGD(resumed, lr=0.1)
    again.load_state_dict(saved_state)
    for step in range(3):
        grads = _params(seed=5 + step)
        _step(optimizer, run, grads)
        _step(again, resumed, grads)
    assert all(torch.equal(a, b) for a, b in zip(run, resumed, strict=True))
    assert again.state[resumed[0]]["momentum_buffer"].dtype == torch.bfloat16


def test_bad_settings_are_refused():
    with pytest.raises(ConfigError, match="state_dtype"):
        SGD(_params(), lr=0.1, state_dtype="float16")
    with pytest.raises(ConfigError, match="momentum"):
        SGD(_params(), lr=0.1, momentum=1.0)
    with pytest.raises(ConfigError, match="adamw"):
        TrainingArguments(optimizer="adamw", momentum_dtype="bfloat16")
