"""Several adapters over one backbone: each keeps its own BatchNorm statistics, trained norms and
trainable parameters, through switching, deleting and loading."""

import gc
import weakref

import pytest
import torch
from conftest import MODELS
from torch import nn

from popup_adapter import AdapterError, PopupConfig, PopupModel, get_popup_model
from popup_adapter.adapters import adapter_parameter_owner


def _bn_net():
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv2d(3, 8, 3), nn.BatchNorm2d(8), nn.ReLU(), nn.Flatten(), nn.Linear(8 * 6 * 6, 4)
    )


def _forward(model, x):
    model.eval()
    with torch.no_grad():
        return model(x)


def test_deleting_the_active_adapter_brings_in_the_survivors_batchnorm_stats():
    """main left the deleted adapter's statistics in the BatchNorm: the survivor ran (and
    saved) them."""
    model = get_popup_model(_bn_net(), k=0.5)
    model.add_adapter("other", PopupConfig(k=0.5))
    x = torch.randn(4, 3, 8, 8)
    model.set_adapter("other")
    model.train()
    model(x * 2 + 1)  # "other" sees its own batches
    other_out = _forward(model, x)
    other_stats = {k: v.clone() for k, v in model.batchnorm_stats().items()}
    model.set_adapter("default")
    model.train()
    model(x * 5 - 3)
    model.delete_adapter("default")
    assert model.active_adapter == "other"
    for key, value in model.batchnorm_stats().items():
        assert torch.equal(value, other_stats[key]), key
    assert torch.equal(model.base_model[1].running_mean, other_stats["1.running_mean"])
    assert torch.equal(_forward(model, x), other_out)


def test_an_adapter_name_does_not_match_a_longer_one():
    """set_trainable("default") must not unfreeze "default2" (main matched by substring)."""
    model = get_popup_model(_bn_net(), k=0.5)
    model.add_adapter("default2", PopupConfig(k=0.5))
    model.set_trainable(True)
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and all(adapter_parameter_owner(n) == "default" for n in trainable)
    assert adapter_parameter_owner("base_model.0.popup_scores.default2") == "default2"
    assert adapter_parameter_owner("base_model.4.modules_to_save.a.weight") == "a"
    assert adapter_parameter_owner("base_model.0.base_layer.weight") is None


def test_trained_norms_belong_to_each_adapter(tmp_path):
    """With train_norms every adapter has its own norm weights: a new adapter starts from the
    base values, switching swaps them, and load_adapter leaves the active adapter's alone
    (main shared them and overwrote the active adapter's on load)."""
    model = get_popup_model(_bn_net(), k=0.5, train_norms=True)
    norm = model.base_model[1]
    base_weight = norm.weight.detach().clone()
    with torch.no_grad():
        norm.weight.add_(0.5)  # "default" trained its norm
    trained = norm.weight.detach().clone()
    model.add_adapter("other", PopupConfig(k=0.5, train_norms=True))
    model.set_adapter("other")
    assert torch.equal(norm.weight, base_weight)
    with torch.no_grad():
        norm.weight.mul_(-1)
    other_weight = norm.weight.detach().clone()
    model.save_pretrained(tmp_path / "other", adapter_name="other")
    model.set_adapter("default")
    assert torch.equal(norm.weight, trained)

    model.load_adapter(tmp_path / "other", adapter_name="loaded")
    assert model.active_adapter == "default" and torch.equal(norm.weight, trained)
    model.set_adapter("loaded")
    assert torch.equal(norm.weight, other_weight)
    assert torch.equal(model.trained_state("default")["1.weight"], trained)


def test_adapter_misuse_raises_adapter_errors():
    model = get_popup_model(_bn_net(), k=0.5)
    with pytest.raises(AdapterError, match="unknown adapter 'nope'"):
        model.set_adapter("nope")
    with pytest.raises(AdapterError, match="exists already"):
        model.add_adapter("default", PopupConfig(k=0.5))
    with pytest.raises(AdapterError, match="needs another base"):
        model.add_adapter("seed1", PopupConfig(k=0.5, seed=1))
    with pytest.raises(AdapterError, match="only adapter"):
        model.delete_adapter("default")
    assert isinstance(model, PopupModel)


def test_a_model_is_freed_as_soon_as_it_is_dropped(tmp_path):
    """No reference cycle (the adapter bank once held a bound method of its model): a dropped
    model's weights are freed at once, not at the cyclic collector's next pass."""
    model = get_popup_model(MODELS["resnet50"][0](), k=0.3)
    model.add_adapter("other", PopupConfig(k=0.5))
    model.save_pretrained(tmp_path)
    gc.disable()
    try:
        refs = [weakref.ref(model)]
        del model
        for trainable in (False, True):
            refs.append(weakref.ref(PopupModel.from_pretrained(tmp_path, is_trainable=trainable)))
        assert all(ref() is None for ref in refs)
    finally:
        gc.enable()
