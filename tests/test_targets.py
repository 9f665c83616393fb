import json
import warnings

import pytest
import torch
from torch import nn

from popup_adapter import PopupLayer, PopupModel, TargetModulesError, get_popup_model, zoo


class SharedLayer(nn.Module):
    """One nn.Linear object reachable under two names, used twice."""

    def __init__(self):
        super().__init__()
        self.first = nn.Linear(8, 8)
        self.again = self.first
        self.head = nn.Linear(8, 3)

    def forward(self, x):
        return self.head(self.again(torch.relu(self.first(x))))


def test_a_module_used_under_two_names_is_masked_everywhere(tmp_path):
    model = get_popup_model(SharedLayer(), k=0.5)
    plain = model.base_model
    assert isinstance(plain.again, PopupLayer) and plain.again is plain.first  # one wrapper
    assert set(model.get_masks()) == {"first", "head"}  # one set of scores
    x = torch.randn(4, 8)
    model(x).sum().backward()
    mask = model.get_masks()["first"]
    weight = plain.first.base_layer.weight
    expected = plain.head(
        torch.nn.functional.linear(
            torch.relu(torch.nn.functional.linear(x, weight * mask, plain.first.bias)),
            weight * mask,
            plain.first.bias,
        )
    )
    assert torch.equal(model(x), expected)
    model.eval()
    with torch.no_grad():
        out = model(x)
        model.save_pretrained(tmp_path / "shared")
        assert torch.equal(
            PopupModel.from_pretrained(tmp_path / "shared", model=SharedLayer())(x), out
        )
        merged = model.merge_and_unload()
        assert merged.again is merged.first and torch.equal(merged(x), out)


def test_targets_match_any_name_of_a_shared_module():
    model = get_popup_model(SharedLayer(), target_modules=["again"])
    assert set(model.get_masks()) == {"first"}


@pytest.mark.parametrize("kind", ["mixtral", "olmoe", "qwen2-moe"])
def test_fused_experts_are_masked_per_expert(kind, tmp_path):
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # nothing is left unmasked, so nothing is warned
        model = get_popup_model(zoo.transformers_case(kind).build(), k=0.3)
    assert model.coverage.share >= 0.99 and not model.coverage.unmasked
    banks = {n: layer for n, layer in model.popup_layers() if layer.per_expert}
    assert {n.rsplit(".", 1)[-1] for n in banks} == {"gate_up_proj", "down_proj"}
    masks = model.get_masks()
    for name, layer in banks.items():
        per_expert = layer.base_weight[0].numel()
        assert [int(m.sum()) for m in masks[name]] == [round(0.3 * per_expert)] * 4, name
    ids = torch.randint(0, 99, (2, 9), generator=torch.Generator().manual_seed(0))
    model(ids).logits.square().mean().backward()
    for name, layer in model.popup_layers():
        grad = layer.popup_scores["default"].grad
        assert grad is not None and torch.isfinite(grad).all() and grad.abs().sum() > 0, name
    model.eval()
    with torch.no_grad():
        out = model(ids).logits
    model.save_pretrained(tmp_path / kind)
    meta = json.loads((tmp_path / kind / "popup_config.json").read_text())
    bank = meta["layers"]["model.layers.0.mlp.experts.gate_up_proj"]
    assert bank["module"] == "model.layers.0.mlp.experts" and bank["experts"] == 4
    loaded = PopupModel.from_pretrained(tmp_path / kind)
    with torch.no_grad():
        assert torch.equal(loaded(ids).logits, out)
        assert torch.equal(model.merge_and_unload()(ids).logits, out)


class Unusual(nn.Module):
    """A module holding its own projection matrix and a layer-scale vector."""

    def __init__(self):
        super().__init__()
        self.proj = nn.Parameter(torch.randn(8, 8))
        self.gamma = nn.Parameter(torch.ones(8))
        self.out = nn.Linear(8, 2)

    def forward(self, x):
        return self.out(x @ self.proj * self.gamma)


def test_unmasked_matrix_weights_are_reported_and_can_be_targeted(capsys):
    with pytest.warns(UserWarning, match=r"1 matrix weights \(64 weights, 80.0% of .*: 0\.proj\."):
        model = get_popup_model(nn.Sequential(Unusual()), k=0.5)
    assert set(dict(model.popup_layers())) == {"0.out"}
    assert model.coverage.share == pytest.approx(16 / 80)
    model.print_trainable_parameters()
    assert capsys.readouterr().out.strip().endswith("masked matrix weights%: 20.00")
    # a module named in target_modules has its own matrix parameters masked (not its gamma)
    whole = get_popup_model(nn.Sequential(Unusual()), k=0.5, target_modules=["0", "out"])
    assert set(dict(whole.popup_layers())) == {"0.proj", "0.out"}
    assert whole.coverage.share == 1.0
    x = torch.randn(3, 8)
    whole.eval()
    with torch.no_grad():
        masked = whole(x)
        assert torch.equal(whole.merge_and_unload()(x), masked)
    with pytest.raises(TargetModulesError, match="has no weight of its own"):
        get_popup_model(nn.Sequential(nn.ReLU(), nn.Linear(2, 2)), target_modules=["0"])


def test_recurrent_layers_are_masked_through_their_own_forward():
    """nn.LSTM computes from a flat list of its weights; swapping W * M in reaches it."""

    class Tagger(nn.Module):
        def __init__(self):
            super().__init__()
            self.rnn = nn.LSTM(4, 6, num_layers=2, bidirectional=True, batch_first=True)
            self.out = nn.Linear(12, 3)

        def forward(self, x):
            return self.out(self.rnn(x)[0])

    model = get_popup_model(Tagger(), k=0.5)
    assert model.coverage.share == 1.0
    assert {n for n in model.get_masks() if n.startswith("rnn.")} == {
        f"rnn.weight_{kind}_l{layer}{direction}"
        for kind in ("ih", "hh")
        for layer in (0, 1)
        for direction in ("", "_reverse")
    }
    x = torch.randn(2, 5, 4)
    model(x).square().sum().backward()
    for name, layer in model.popup_layers():
        assert layer.popup_scores["default"].grad.abs().sum() > 0, name
    model.eval()
    with torch.no_grad():
        masked = model(x)
        with model.disable_adapter():
            assert not torch.allclose(model(x), masked)
        assert torch.equal(model.merge_and_unload()(x), masked)
