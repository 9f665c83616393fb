"""Task inference (SupSup's rules): the superposition computes each adapter exactly at a
one-hot mixing, its entropy gradient is the true derivative, and every rule finds the adapter
that makes the model confident."""

import pytest
import torch
from torch import nn

from popup_adapter import AdapterError, AdapterInference, PopupConfig, get_popup_model
from popup_adapter.task_inference import output_entropy

ADAPTERS = ["t0", "t1", "t2"]


def _three_tasks():
    """Three adapters with their own masks, BatchNorm statistics and heads; t1's head is
    sharp (confident outputs), the others' flat."""
    torch.manual_seed(0)
    net = nn.Sequential(
        nn.Conv2d(3, 8, 3), nn.BatchNorm2d(8), nn.ReLU(), nn.Flatten(),
        nn.Linear(8 * 6 * 6, 16), nn.ReLU(), nn.Linear(16, 4),
    )  # fmt: skip
    model = get_popup_model(net, k=0.5, adapter_name="t0", modules_to_save=["6"])
    for name in ADAPTERS[1:]:
        model.add_adapter(name, PopupConfig(k=0.5, modules_to_save=["6"]))
    x = torch.randn(5, 3, 8, 8)
    with torch.no_grad():
        for index, name in enumerate(ADAPTERS):
            for _, layer in model.popup_layers():
                layer.popup_scores[name].normal_()
            model.set_adapter(name)
            model.train()
            model(x * (index + 1))  # statistics of its own
            model.base_model[6].modules_to_save[name].weight.mul_(20.0 if name == "t1" else 0.05)
    model.set_adapter("t0")
    model.serve_adapter("t2")  # a served adapter superposes as well as a training one
    return model.eval(), x


def test_a_one_hot_superposition_is_each_adapter_exactly():
    model, x = _three_tasks()
    for index, name in enumerate(ADAPTERS):
        alphas = torch.nn.functional.one_hot(torch.tensor(index), len(ADAPTERS)).float()
        with torch.no_grad():
            with model.superposed(ADAPTERS, alphas):
                superposed = model(x)
            model.set_adapter(name)
            assert torch.equal(superposed, model(x)), name


def test_the_entropy_gradient_is_the_derivative_of_the_superposed_entropy():
    model, x = _three_tasks()

    def entropy(alphas):
        with model.superposed(ADAPTERS, alphas):
            return output_entropy(model(x))

    alphas = torch.full((3,), 1 / 3, dtype=torch.float32, requires_grad=True)
    (gradient,) = torch.autograd.grad(entropy(alphas), alphas)
    eps = 1e-3
    for index in range(3):
        step = torch.zeros(3)
        step[index] = eps
        with torch.no_grad():
            numeric = (entropy(alphas + step) - entropy(alphas - step)) / (2 * eps)
        assert float(gradient[index]) == pytest.approx(float(numeric), rel=2e-2, abs=1e-3)


@pytest.mark.parametrize(("rule", "passes"), [("one_shot", 1), ("binary", 2), ("entropy", 3)])
def test_every_rule_finds_the_adapter_that_makes_the_model_confident(rule, passes):
    model, x = _three_tasks()
    found = model.infer_adapter(x, rule=rule)
    assert isinstance(found, AdapterInference)
    assert found.adapter == "t1"
    assert 0 < found.confidence <= 1
    assert found.forward_passes == passes
    assert min(found.scores, key=found.scores.get) == "t1"
    assert model.active_adapter == "t0"  # inference leaves the model as it was
    only = model.infer_adapter(x, candidates=["t0", "t2"], rule=rule)
    assert only.adapter in ("t0", "t2")
    assert set(only.scores) == {"t0", "t2"}


def test_task_inference_refuses_bad_requests():
    model, x = _three_tasks()
    with pytest.raises(AdapterError, match="unknown rule"):
        model.infer_adapter(x, rule="vote")
    with pytest.raises(AdapterError, match=r"unknown adapter\(s\) \['t9'\]"):
        model.infer_adapter(x, candidates=["t0", "t9"])
    with pytest.raises(AdapterError, match="at least one"):
        model.infer_adapter(x, candidates=[])
    with (
        pytest.raises(AdapterError, match="one mixing weight per adapter"),
        model.superposed(ADAPTERS, torch.ones(2)),
    ):
        pass
    model.train()
    with pytest.raises(AdapterError, match="eval"):
        model.infer_adapter(x)
