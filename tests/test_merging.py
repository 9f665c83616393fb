"""merge_adapter / unmerge_adapter: the mask served as the plain model's weights, and back,
with nothing changed and nothing lost."""

import pytest
import torch
from conftest import MODELS, logits

from popup_adapter import AdapterError, BaseMismatchError, PopupConfig, PopupModel, get_popup_model


def outputs(model, x):
    with torch.no_grad():
        return logits(model.eval()(x))


def score_count(model):
    return sum(p.numel() for name, p in model.named_parameters() if ".popup_scores." in name)


@pytest.mark.parametrize("name", ["resnet50", "bert", "gpt2", "vit_tiny_patch16_224"])
def test_merged_computes_exactly_what_the_mask_does_and_unmerges_to_the_same_base(name):
    make, make_input = MODELS[name]
    x = make_input()
    model = get_popup_model(make(), k=0.3)
    before, fingerprint, masks = outputs(model, x), model.base_fingerprint, model.get_masks()
    scores = {n: p.detach().clone() for n, p in model.named_parameters() if "popup_scores" in n}

    model.merge_adapter()
    assert model.merged
    assert torch.equal(outputs(model, x), before)  # the same operation on the same W * M
    assert model.base_fingerprint == fingerprint
    assert all(torch.equal(model.get_masks()[k], v) for k, v in masks.items())
    with pytest.raises(AdapterError, match="merged already"):
        model.merge_adapter()

    model.unmerge_adapter()
    assert not model.merged
    assert model.base_fingerprint == fingerprint  # hashed afresh from the weights
    after = {n: p for n, p in model.named_parameters() if "popup_scores" in n}
    assert after.keys() == scores.keys()  # trained scores are never dropped
    assert all(torch.equal(after[n], scores[n]) for n in scores)
    assert torch.equal(outputs(model, x), before)


def test_a_loaded_mask_is_served_merged_at_the_plain_models_memory(tmp_path):
    make, make_input = MODELS["resnet50"]
    x = make_input()
    model = get_popup_model(make(), k=0.3)
    before = outputs(model, x)
    model.save_pretrained(tmp_path)
    plain_params = sum(p.numel() for p in make().parameters())

    served = PopupModel.from_pretrained(tmp_path)
    assert served.merged
    assert score_count(served) == 0  # the mask restores them: nothing kept but its bits
    assert sum(p.numel() for p in served.parameters()) == plain_params
    layer = dict(served.popup_layers())["layer1.0.conv1"]
    assert layer.popup_masks.default.nbytes == (layer.base_weight.numel() + 7) // 8
    assert torch.equal(outputs(served, x), before)

    trainable = PopupModel.from_pretrained(tmp_path, is_trainable=True)
    assert not trainable.merged
    served.set_trainable(True)  # unmerges: the scores a loaded mask gets, trainable
    assert not served.merged
    assert served.base_fingerprint == trainable.base_fingerprint
    for (name, a), (_, b) in zip(
        served.named_parameters(), trainable.named_parameters(), strict=True
    ):
        assert torch.equal(a, b), name
        assert a.requires_grad == b.requires_grad, name


def test_training_a_merged_adapter_is_refused():
    make, make_input = MODELS["bert"]
    model = get_popup_model(make(), k=0.5)
    model.merge_adapter()
    model.train()
    with pytest.raises(AdapterError, match="unmerge_adapter"):
        model(make_input())
    with torch.no_grad():  # a forward that trains nothing is fine
        model(make_input())


def test_switching_adapters_unmerges_first():
    make, make_input = MODELS["resnet50"]
    x = make_input()
    model = get_popup_model(make(), k=0.3)
    model.add_adapter("other", PopupConfig(k=0.6))
    model.set_adapter("other")
    other = outputs(model, x)
    model.set_adapter("default")
    model.merge_adapter()
    model.set_adapter("other")
    assert not model.merged
    assert torch.equal(outputs(model, x), other)
    with model.disable_adapter():
        dense = outputs(model, x)
    model.merge_adapter()
    with model.disable_adapter():  # the dense base, not W * M
        assert torch.equal(outputs(model, x), dense)


def test_a_merged_layer_refuses_what_would_compute_from_the_wrong_weight():
    """Below the model's methods (which unmerge first), a layer holding W * M in place
    refuses another mask, deletion and the unmasked base instead of computing wrongly."""
    make, make_input = MODELS["resnet50"]
    model = get_popup_model(make(), k=0.3)
    model.add_adapter("other", PopupConfig(k=0.6))
    model.merge_adapter()
    layer = dict(model.popup_layers())["layer1.0.conv1"]
    layer.set_adapter("default")  # the merged one: allowed
    with pytest.raises(AdapterError, match="'default' is merged"):
        layer.set_adapter("other")
    with pytest.raises(AdapterError, match="unmerge_adapter"):
        layer.delete_adapter("other")
    layer.disable_adapters = True
    with pytest.raises(AdapterError, match="unmasked base"):
        outputs(model, make_input())


def test_a_pretrained_base_is_not_overwritten():
    """init="keep": the pruned weights are not the seed's, so W stays and W * M is held
    beside it; unmerging gives back the pretrained values themselves."""
    make, make_input = MODELS["bert"]
    x = make_input()
    pretrained = make()
    weights = {n: p.detach().clone() for n, p in pretrained.named_parameters()}
    model = get_popup_model(pretrained, k=0.5, init="keep")
    before = outputs(model, x)
    model.merge_adapter()
    assert torch.equal(outputs(model, x), before)
    model.unmerge_adapter()
    plain = model.unload()
    for name, param in plain.named_parameters():
        assert torch.equal(param, weights[name]), name


def test_a_base_changed_while_merged_is_not_silently_unmerged():
    make, _ = MODELS["resnet50"]
    model = get_popup_model(make(), k=0.3)
    model.merge_adapter()
    layer = dict(model.popup_layers())["layer1.0.conv1"]
    with torch.no_grad():
        layer.base_weight.add_(1.0)
    with pytest.raises(BaseMismatchError, match="regenerated"):
        model.unmerge_adapter()


def test_merge_and_unload_of_a_merged_model():
    make, make_input = MODELS["gpt2"]
    x = make_input()
    model = get_popup_model(make(), k=0.5)
    before = outputs(model, x)
    model.merge_adapter()  # the tied head keeps wte intact: W * M is held beside it
    plain = model.merge_and_unload()
    assert torch.equal(outputs(plain, x), before)
    assert not any("popup" in name for name, _ in plain.named_parameters())
