"""A signed-constant base held as sign bits (`pack_base`): every reader sees the same floats,
training computes the same bits, writes are refused."""

import copy

import pytest
import torch
import torch.nn.functional as F
from conftest import MODELS, logits, needs_kernels, tiny_gpt2
from torch import nn

from popup_adapter import PopupModel, get_popup_model, kernels
from popup_adapter.errors import AdapterError
from popup_adapter.sign_bits import SignBitWeight


def signed(shape, scale=0.25, seed=0):
    generator = torch.Generator().manual_seed(seed)
    return torch.where(torch.rand(shape, generator=generator) < 0.5, -scale, scale)


def test_the_packed_weight_is_the_float_weight_to_every_operation():
    weight = signed((5, 3, 3, 3))  # 135 weights: the last byte is partly used
    packed = SignBitWeight.from_dense(weight)
    assert packed.bits.dtype == torch.uint8 and packed.bits.numel() == 17
    assert torch.equal(packed.dense(), weight) and torch.equal(packed, weight)
    assert torch.equal(packed.view(-1)[:7], weight.view(-1)[:7])
    x = torch.randn(2, 3, 8, 8)
    assert torch.equal(F.conv2d(x, packed), F.conv2d(x, weight))
    # moved or cast where the bits still say it all, written out otherwise
    as_double = packed.to(torch.float64)
    assert isinstance(as_double, SignBitWeight) and torch.equal(as_double, weight.double())
    as_double.copy_(-weight.double())  # a copy: the original keeps its bits
    assert torch.equal(packed, weight) and torch.equal(as_double, -weight.double())
    as_int = packed.to(torch.int64)
    assert type(as_int) is torch.Tensor and as_int.abs().max() == 0
    assert isinstance(copy.deepcopy(nn.Parameter(packed, requires_grad=False)), SignBitWeight)


def test_only_one_magnitude_with_a_sign_is_packed_and_writes_are_refused():
    with pytest.raises(AdapterError, match="one magnitude"):
        SignBitWeight.from_dense(torch.randn(10))
    with pytest.raises(AdapterError, match="one magnitude"):
        SignBitWeight.from_dense(torch.zeros(10))
    packed = SignBitWeight.from_dense(signed(20))
    with pytest.raises(AdapterError, match="read-only"):
        packed.mul_(2)
    with pytest.raises(AdapterError, match="another magnitude"):
        packed.copy_(signed(20, scale=0.5))
    flipped = -signed(20)
    packed.copy_(flipped)  # the same magnitude: the bits take it
    assert torch.equal(packed, flipped)


@needs_kernels
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64])
@pytest.mark.parametrize("numel", [1, 7, 8, 9, 65_537, 200_003])
def test_the_kernels_read_the_bits_as_the_floats(dtype, numel):
    assert kernels.load_kernels()
    ops = torch.ops.popup_adapter
    weight = signed(numel, scale=0.0625, seed=numel).to(dtype)
    packed = SignBitWeight.from_dense(weight)
    scores = torch.randn(numel, generator=torch.Generator().manual_seed(1)).to(dtype)
    kept = max(1, numel // 3)
    threshold = float(scores.abs().double().sort(descending=True).values[kept - 1])
    dense = ops.masked_weight_forward(weight, scores, kept, threshold, threshold)
    signs = ops.masked_weight_forward_signs(
        packed.bits, packed.scale, scores, kept, threshold, threshold
    )
    assert torch.equal(dense[0], signs[0]) and dense[1:] == signs[1:]
    grad = torch.randn(numel).to(dtype)
    expected = ops.straight_through_backward(grad, weight, scores)
    assert torch.equal(
        ops.straight_through_backward_signs(grad, packed.bits, packed.scale, scores), expected
    )
    ops.straight_through_backward_signs_(grad, packed.bits, packed.scale, scores)
    assert torch.equal(grad, expected)


def _trained_side_by_side(make, batch, use_kernels=True, steps=3):
    """A model and its packed twin, each trained ``steps`` SGD steps on ``batch``."""
    plain, packed = get_popup_model(make(), k=0.3), get_popup_model(make(), k=0.3).pack_base()
    assert any(isinstance(layer.base_weight, SignBitWeight) for _, layer in packed.popup_layers())
    for model in (plain, packed):
        for _, layer in model.popup_layers():
            layer.use_kernels = use_kernels
        params = [p for p in model.parameters() if p.requires_grad]
        optimizer = torch.optim.SGD(params, lr=0.5, momentum=0.9)
        model.train()
        torch.manual_seed(0)  # the same dropout draws for both
        for _ in range(steps):
            logits(model(batch)).float().pow(2).mean().backward()
            optimizer.step()
            optimizer.zero_grad()
    return plain, packed


@pytest.mark.parametrize("use_kernels", [True, False], ids=["fused", "eager"])
@pytest.mark.parametrize("family", ["resnet50", "vit_tiny_patch16_224", "bert", "gpt2"])
def test_training_on_a_packed_base_gives_the_same_scores_bit_for_bit(family, use_kernels):
    make, batch = MODELS[family]
    torch.manual_seed(0)
    x = batch()
    plain, packed = _trained_side_by_side(make, x, use_kernels)
    trained = {n: p for n, p in plain.named_parameters() if p.requires_grad}
    for name, param in packed.named_parameters():
        if param.requires_grad:
            assert torch.equal(param, trained[name]), name
    plain.eval(), packed.eval()
    assert torch.equal(logits(plain(x)), logits(packed(x)))
    with plain.disable_adapter(), packed.disable_adapter():
        assert torch.equal(logits(plain(x)), logits(packed(x)))
    assert packed.base_fingerprint == plain.base_fingerprint


def test_a_packed_base_saves_loads_merges_and_unloads_as_the_floats(tmp_path):
    make, batch = MODELS["resnet50"]
    torch.manual_seed(0)
    x = batch()
    plain, packed = _trained_side_by_side(make, x, steps=1)
    plain.eval(), packed.eval()
    expected = plain(x)
    # state_dict: the float weights (keep_vars: the parameter itself), loadable back
    state, reference = packed.state_dict(), plain.state_dict()
    assert state.keys() == reference.keys()
    assert all(type(v) is torch.Tensor and torch.equal(v, reference[k]) for k, v in state.items())
    conv = packed.base_model.conv1.base_layer
    assert packed.state_dict(keep_vars=True)["base_model.conv1.base_layer.weight"] is conv.weight
    packed.load_state_dict(reference)
    assert isinstance(conv.weight, SignBitWeight) and torch.equal(packed(x), expected)
    # the same artifact, and it loads onto a packed base
    plain.save_pretrained(tmp_path / "plain")
    packed.save_pretrained(tmp_path / "packed")
    names = sorted(p.name for p in (tmp_path / "plain").iterdir())
    assert names == sorted(p.name for p in (tmp_path / "packed").iterdir())
    for name in names:
        if name.endswith((".safetensors", ".json")):
            assert (tmp_path / "plain" / name).read_bytes() == (
                tmp_path / "packed" / name
            ).read_bytes()
    trainable = PopupModel.from_pretrained(tmp_path / "packed", is_trainable=True).pack_base()
    assert torch.equal(trainable.eval()(x), expected)
    # merged beside the bits (they are read-only), and back
    packed.merge_adapter()
    assert torch.equal(packed(x), expected) and isinstance(conv.weight, SignBitWeight)
    with pytest.raises(AdapterError, match="unmerge_adapter"):
        packed.pack_base()
    packed.unmerge_adapter()
    assert torch.equal(packed(x), expected)
    merged = copy.deepcopy(packed).merge_and_unload()
    assert type(merged.conv1.weight) is nn.Parameter and torch.equal(merged(x), expected)
    base = copy.deepcopy(packed).unload()
    assert type(base.conv1.weight) is nn.Parameter
    assert torch.equal(base.conv1.weight, plain.base_model.conv1.base_layer.weight)
    packed.unpack_base()
    assert type(conv.weight) is nn.Parameter and torch.equal(packed(x), expected)


def test_a_packed_base_holds_a_bit_per_weight():
    model = get_popup_model(MODELS["resnet50"][0](), k=0.3)
    floats = sum(layer.base_weight.nbytes for _, layer in model.popup_layers())
    model.pack_base()
    bits = sum(layer.base_weight.bits.nbytes for _, layer in model.popup_layers())
    assert floats / 32 <= bits <= floats / 32 + len(list(model.popup_layers()))


def test_served_adapters_and_mixed_batches_compute_on_a_packed_base(tmp_path):
    make, batch = MODELS["bert"]
    torch.manual_seed(0)
    x = batch()
    model = get_popup_model(make(), k=0.3)
    model.add_adapter("other", model.peft_config["default"].__class__(k=0.5, seed=0))
    model.eval()
    # each group of a mixed batch computes as the same samples alone
    alone = {"default": logits(model(x[:1])), "other": None}
    model.set_adapter("other")
    alone["other"] = logits(model(x[1:]))
    model.serve_adapter("other")
    model.pack_base()
    mixed = logits(model(x, adapter_names=["default", "other"]))
    assert torch.equal(mixed[:1], alone["default"]) and torch.equal(mixed[1:], alone["other"])


def test_what_cannot_be_packed_is_refused_with_the_reason():
    with pytest.raises(AdapterError, match="kaiming_normal"):
        get_popup_model(MODELS["resnet50"][0](), k=0.3, init="kaiming_normal").pack_base()
    with pytest.raises(AdapterError, match="IteRand"):
        get_popup_model(MODELS["resnet50"][0](), k=0.3, redraw_every=2).pack_base()
    model = get_popup_model(MODELS["resnet50"][0](), k=0.3).pack_base()
    with pytest.raises(AdapterError, match="unpack_base"), torch.no_grad():
        model.base_model.conv1.base_layer.weight.mul_(2)


def test_a_tied_weight_keeps_its_floats():
    model = get_popup_model(tiny_gpt2(), k=0.3, mask_embeddings=True).pack_base()
    layers = dict(model.popup_layers())
    head, embedding = layers["lm_head"].base_weight, layers["transformer.wte"].base_weight
    assert head is embedding and type(head) is nn.Parameter
    assert isinstance(layers["transformer.h.0.attn.c_attn"].base_weight, SignBitWeight)
