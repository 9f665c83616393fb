"""A mask per sample in one batch (``adapter_names=``), and served adapters: every sample gets
exactly what its adapter gives alone, each adapter's BatchNorm statistics, norms and saved
modules included; a served adapter holds its mask in bits, not scores."""

import pytest
import torch
from conftest import MODELS, logits, tiny_gpt2

from popup_adapter import AdapterError, PopupConfig, PopupModel, get_popup_model

#: model -> (its classifier head, saved per adapter)
HEADS = {"resnet50": "fc", "vit_tiny_patch16_224": "head", "bert": "classifier"}
NAMES = ["a", "b", "b", "__base__", "a", "c", "b"]


def _trained(name, tmp_path, **config):
    """Adapters a, b (trained a step each: their own BatchNorm statistics and heads) and c,
    saved by one model and loaded by another for inference (served: packed bits)."""
    make, make_input = MODELS[name]
    torch.manual_seed(0)
    model = get_popup_model(
        make(), k=0.3, adapter_name="a", modules_to_save=[HEADS[name]], **config
    )
    model.add_adapter("b", PopupConfig(k=0.5, modules_to_save=[HEADS[name]], **config))
    for adapter, scale in (("a", 1.0), ("b", 3.0)):
        model.set_adapter(adapter)
        model.train()
        x = make_input()
        logits(model(x * scale if x.is_floating_point() else x)).sum().backward()
        with torch.no_grad():
            for p in model.parameters():
                if p.grad is not None:
                    p.sub_(0.1 * p.grad.sign())  # every trained tensor moves
    model.set_adapter("b")
    model.save_pretrained(tmp_path / "b")
    model.load_adapter(tmp_path / "b", "c")  # served: a third mask, b's, as bits
    return model.eval(), make_input


def _alone(model, x, names):
    """Each adapter's samples run as a batch of their own, after set_adapter ("__base__":
    under disable_adapter, with the statistics of the adapter active for the mixed batch)."""
    results, active = {}, model.active_adapter
    with torch.no_grad():
        for adapter in sorted(set(names), key=lambda a: a == "__base__"):
            rows = [i for i, n in enumerate(names) if n == adapter]
            if adapter == "__base__":
                model.set_adapter(active)
                with model.disable_adapter():
                    results[adapter] = rows, logits(model(x[rows]))
            else:
                model.set_adapter(adapter)
                results[adapter] = rows, logits(model(x[rows]))
    return results


@pytest.mark.parametrize("name", list(HEADS))
def test_a_mixed_batch_gives_each_sample_what_its_adapter_gives_alone(name, tmp_path):
    model, make_input = _trained(name, tmp_path)
    x = torch.cat([make_input() for _ in range(4)])[: len(NAMES)]
    model.set_adapter("a")
    with torch.no_grad():
        mixed = logits(model(x, adapter_names=NAMES))
    assert mixed.shape[0] == len(NAMES)
    assert model.active_adapter == "a"  # the block leaves the active adapter as it was
    base_stats = {k: v.clone() for k, v in model.batchnorm_stats().items()}
    for adapter, (rows, alone) in _alone(model, x, NAMES).items():
        assert torch.equal(mixed[rows], alone), adapter  # bit for bit
    # the adapters differ, so equality above is not trivial
    per_adapter = _alone(model, x[:1].expand(3, *x.shape[1:]).contiguous(), ["a", "b", "c"])
    assert not torch.equal(per_adapter["a"][1], per_adapter["b"][1])
    assert torch.equal(per_adapter["b"][1], per_adapter["c"][1])  # c is b's mask, served
    if base_stats:  # the BatchNorm statistics are per adapter (and were not changed by mixing)
        model.set_adapter("a")
        assert all(torch.equal(v, base_stats[k]) for k, v in model.batchnorm_stats().items())
        assert any(not torch.equal(v, model.batchnorm_stats("b")[k]) for k, v in base_stats.items())


def test_a_mixed_batch_uses_each_adapters_trained_norms(tmp_path):
    model, make_input = _trained("vit_tiny_patch16_224", tmp_path, train_norms=True)
    x = torch.cat([make_input() for _ in range(4)])[: len(NAMES)]
    norms = {a: model.trained_state(a)["norm.weight"] for a in "abc"}
    assert not torch.equal(norms["a"], norms["b"])
    with torch.no_grad():
        mixed = logits(model(x, adapter_names=NAMES))
    for adapter, (rows, alone) in _alone(model, x, NAMES).items():
        assert torch.equal(mixed[rows], alone), adapter


def test_a_merged_model_serves_a_mixed_batch_from_the_seeds_base(tmp_path):
    """from_pretrained merges the mask into W; a mixed batch needs W: it unmerges (the seed
    gives the pruned weights back) and gives the same outputs."""
    _, make_input = _trained("resnet50", tmp_path)
    served = PopupModel.from_pretrained(tmp_path / "b", adapter_name="b")
    served.load_adapter(tmp_path / "b", "c")  # adding an adapter unmerges: merge again
    served.merge_adapter()
    assert served.merged
    x = torch.cat([make_input() for _ in range(2)])
    names = ["b", "__base__", "c", "b"]
    with torch.no_grad():
        mixed = logits(served(x, adapter_names=names))
    for adapter, (rows, alone) in _alone(served, x, names).items():
        assert torch.equal(mixed[rows], alone), adapter


def test_generate_takes_one_adapter_per_sequence():
    torch.manual_seed(0)
    model = get_popup_model(tiny_gpt2(), k=0.5, adapter_name="a")
    model.add_adapter("b", PopupConfig(k=0.5, seed=0))
    model.eval()
    prompt = torch.randint(1, 100, (3, 5))
    kwargs = {"max_new_tokens": 4, "do_sample": False, "pad_token_id": 0}
    names = ["b", "a", "b"]
    mixed = model.generate(prompt, adapter_names=names, **kwargs)
    for adapter in ("a", "b"):
        rows = [i for i, n in enumerate(names) if n == adapter]
        model.set_adapter(adapter)
        assert torch.equal(mixed[rows], model.generate(prompt[rows], **kwargs)), adapter


def test_mixed_batches_refuse_what_they_cannot_route(tmp_path):
    model, make_input = _trained("resnet50", tmp_path)
    x = make_input()
    with pytest.raises(AdapterError, match=r"unknown adapter\(s\) \['nope'\]"):
        model(x, adapter_names=["a", "nope"])
    with pytest.raises(AdapterError, match="2 rows for a batch of 3"):
        model(x, adapter_names=["a", "b", "a"])
    with pytest.raises(AdapterError, match="is empty"):
        model(x, adapter_names=[])
    model.train()
    with pytest.raises(AdapterError, match=r"model\.eval"):
        model(x, adapter_names=["a", "b"])
    model.eval()
    layer = dict(model.popup_layers())["conv1"]
    with model.mixed_batch(["a", "b"]), pytest.raises(AdapterError, match="outside the layer"):
        layer.weight  # model code reading W * M itself cannot be routed  # noqa: B018
    assert layer.popup_route is None  # the block cleaned up after the error
    model.set_adapter("a")
    with torch.no_grad():
        assert torch.equal(logits(model(x)), logits(model(x, adapter_names=["a", "a"])))


def test_a_served_adapter_holds_bits_and_trains_again_from_its_mask(tmp_path):
    model, make_input = _trained("resnet50", tmp_path)
    x = make_input()
    layers = dict(model.popup_layers())
    masked = sum(layer.base_weight.numel() for layer in layers.values())
    scores = {
        a: sum(p.numel() for n, p in model.named_parameters() if f"popup_scores.{a}" in n)
        for a in "abc"
    }
    assert scores == {"a": masked, "b": masked, "c": 0}  # c (loaded for inference): bits only
    packed = sum(layer.popup_masks.c.nbytes for layer in layers.values())
    assert packed == sum((layer.base_weight.numel() + 7) // 8 for layer in layers.values())
    assert "popup_masks" not in "".join(model.state_dict())  # bits are not a trained tensor

    model.set_adapter("b")
    with torch.no_grad():
        before = logits(model(x))
    masks = model.get_masks("b")
    model.serve_adapter("b")  # a finished task: its scores go, its outputs stay
    assert all(layer.is_served("b") for layer in layers.values())
    assert all(torch.equal(model.get_masks("b")[k], v) for k, v in masks.items())
    with torch.no_grad():
        assert torch.equal(logits(model(x)), before)

    model.set_trainable(True, "b")  # trains again, from the scores a loaded mask gets
    assert not any(layer.is_served("b") for layer in layers.values())
    assert all(layers[k].popup_scores["b"].requires_grad for k in masks)
    assert all(torch.equal(model.get_masks("b")[k], v) for k, v in masks.items())
    model.eval()
    with torch.no_grad():
        assert torch.equal(logits(model(x)), before)
