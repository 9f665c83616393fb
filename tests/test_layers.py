import warnings
import weakref

import pytest
import torch
from torch import nn

from popup_adapter import PopupConv, PopupConv1D, PopupEmbedding, PopupLinear, topk_mask
from popup_adapter.layer_kinds import create_popup_layer


def _with_scores(base, k=0.4):
    layer = create_popup_layer(base)
    layer.update_layer("default", k, torch.randn(base.weight.shape))
    layer.set_adapter("default")
    return layer


def _conv1d_gpt2():
    from transformers.pytorch_utils import Conv1D

    return Conv1D(12, 8)


CASES = [
    (lambda: nn.Linear(8, 6), lambda: torch.randn(3, 8), PopupLinear),
    (lambda: nn.Conv1d(4, 6, 3, padding=1), lambda: torch.randn(2, 4, 10), PopupConv),
    (
        lambda: nn.Conv2d(4, 8, 3, groups=2, padding_mode="reflect", padding=1),
        lambda: torch.randn(2, 4, 6, 6),
        PopupConv,
    ),
    (lambda: nn.Conv2d(8, 8, 3, groups=8), lambda: torch.randn(2, 8, 6, 6), PopupConv),  # depthwise
    (lambda: nn.Conv3d(2, 4, 2), lambda: torch.randn(1, 2, 4, 4, 4), PopupConv),
    (_conv1d_gpt2, lambda: torch.randn(2, 5, 8), PopupConv1D),
    (
        lambda: nn.Embedding(20, 6, padding_idx=0),
        lambda: torch.randint(0, 20, (2, 7)),
        PopupEmbedding,
    ),
]


@pytest.mark.parametrize(("make", "make_input", "cls"), CASES)
def test_forward_is_the_base_layer_with_masked_weight(make, make_input, cls, device):
    base = make().to(device)
    layer = _with_scores(base)
    assert isinstance(layer, cls) and layer.base_layer is base
    x = make_input().to(device)
    mask = topk_mask(layer.popup_scores["default"], layer.popup_kept["default"])
    assert int(mask.sum()) == round(0.4 * base.weight.numel())
    expected_layer = _copy_with_weight(base, base.weight.detach() * mask)
    assert torch.equal(layer(x), expected_layer(x))
    layer(x).float().sum().backward()
    assert layer.popup_scores["default"].grad is not None


def _copy_with_weight(base, weight):
    import copy

    clone = copy.deepcopy(base)
    clone.weight = nn.Parameter(weight)
    return clone


def test_fan_in_per_layer_kind():
    assert _with_scores(nn.Linear(8, 6)).fan_in == 8
    assert _with_scores(nn.Conv2d(4, 8, 3, groups=2)).fan_in == 2 * 9
    assert _with_scores(_conv1d_gpt2()).fan_in == 8  # Conv1D(nf=12, nx=8): weight (8, 12)
    assert _with_scores(nn.Embedding(20, 6)).fan_in == 6


def test_unsupported_module_is_refused():
    with pytest.raises(TypeError, match="cannot mask weight of a LayerNorm: normalisation layers"):
        create_popup_layer(nn.LayerNorm(4))


def test_eval_holds_no_second_copy_of_the_weight_and_sees_new_scores_at_once():
    """Inference keeps nothing beyond the weight and the scores (main cached W * M per layer,
    keyed on Tensor._version), and a change to the scores shows in the very next forward."""
    layer = _with_scores(nn.Linear(8, 6)).eval()
    x = torch.randn(2, 8)
    with torch.inference_mode():
        first = layer(x)
        held = [v for v in vars(layer).values() if isinstance(v, (torch.Tensor, tuple))]
        assert held == []
        effective = weakref.ref(layer.effective_weight())
        assert effective() is None  # freed once the caller drops it
    with torch.no_grad():
        layer.popup_scores["default"].mul_(-1).add_(torch.randn(6, 8))
        mask = topk_mask(layer.popup_scores["default"], layer.popup_kept["default"])
        second = layer(x)
    assert not torch.equal(first, second)
    assert torch.equal(second, nn.functional.linear(x, layer.base_weight * mask, layer.bias))


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_autocast_and_bf16_weights(dtype):
    layer = _with_scores(nn.Linear(16, 8))
    with torch.autocast("cpu", dtype=dtype):
        out = layer(torch.randn(4, 16))
    assert out.dtype == dtype
    out.float().sum().backward()
    grad = layer.popup_scores["default"].grad
    assert grad.dtype == torch.float32 and torch.isfinite(grad).all() and grad.abs().sum() > 0

    half = _with_scores(nn.Linear(16, 8).to(torch.bfloat16))
    half(torch.randn(4, 16, dtype=torch.bfloat16)).float().sum().backward()
    assert half.popup_scores["default"].grad.dtype == torch.float32


# -- the layer contract: the base layer's own forward, W * M wherever the model reads it


def _trained_layer(base, k=0.5):
    """``base`` wrapped with random scores, and a copy of ``base`` with ``W * M`` baked in."""
    layer = _with_scores(base, k)
    mask = layer.get_mask()
    return layer, _copy_with_weight(base, base.weight.detach() * mask)


def _timm_conv_subclasses():
    from timm.layers import Conv2dSame, ScaledStdConv2d, StdConv2d

    return [
        (lambda: StdConv2d(4, 8, 3, padding=1), lambda: torch.randn(2, 4, 9, 9)),
        (lambda: ScaledStdConv2d(4, 8, 3, padding=1), lambda: torch.randn(2, 4, 9, 9)),
        (lambda: Conv2dSame(4, 8, 5, stride=2), lambda: torch.randn(2, 4, 3, 3)),  # dynamic pad
    ]


@pytest.mark.parametrize("case", range(3))
def test_a_subclass_computes_with_its_own_forward(case):
    """Weight standardisation and dynamic SAME padding happen to W * M, as in the merged layer."""
    make, make_input = _timm_conv_subclasses()[case]
    layer, merged = _trained_layer(make())
    x = make_input()
    assert torch.equal(layer(x), merged(x))
    layer(x).square().sum().backward()
    grad = layer.popup_scores["default"].grad
    assert torch.isfinite(grad).all() and grad.abs().sum() > 0


@pytest.mark.slow
@pytest.mark.parametrize(
    ("name", "size"), [("resnetv2_50x1_bit", 224), ("nfnet_f0", 224), ("tf_efficientnet_b0", 64)]
)
def test_timm_models_with_conv_subclasses_merge_exactly_and_train(name, size):
    import timm

    from popup_adapter import get_popup_model

    model = get_popup_model(timm.create_model(name, pretrained=False), k=0.5)
    x = torch.randn(2, 3, size, size, generator=torch.Generator().manual_seed(0))
    optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=10.0)
    before = model.get_masks()
    for _ in range(2):
        loss = model(x).log_softmax(-1)[:, 0].mean()
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    assert torch.isfinite(loss)
    assert any(not torch.equal(m, before[n]) for n, m in model.get_masks().items())
    model.eval()
    with torch.no_grad():
        masked = model(x)
        assert (model.merge_and_unload()(x) - masked).abs().max() <= 1e-5


def test_code_reading_weight_gets_w_times_m():
    """timm's BEiT computes F.linear(x, self.qkv.weight, bias): that read is masked, and every
    score gets a gradient."""
    import timm

    from popup_adapter import get_popup_model

    beit = timm.create_model(
        "beit_base_patch16_224", pretrained=False, img_size=32, embed_dim=32, depth=2, num_heads=2
    )
    model = get_popup_model(beit, k=0.5)
    x = torch.randn(2, 3, 32, 32)
    model(x).square().sum().backward()
    for name, layer in model.popup_layers():
        grad = layer.popup_scores["default"].grad
        assert grad is not None and grad.abs().sum() > 0, name
    qkv = model.base_model.blocks[0].attn.qkv
    assert torch.equal(qkv.weight, qkv.base_layer.weight * qkv.get_mask())
    model.eval()
    with torch.no_grad():
        assert torch.equal(model.merge_and_unload()(x), model(x))


def test_attributes_read_through_to_the_base_layer():
    conv = _with_scores(nn.Conv2d(4, 8, 3, stride=2, padding=1))
    assert (conv.kernel_size, conv.stride, conv.padding, conv.in_channels) == (
        (3, 3),
        (2, 2),
        (1, 1),
        4,
    )
    assert _with_scores(nn.Linear(8, 6)).in_features == 8
    assert _with_scores(_conv1d_gpt2()).nf == 12
    with pytest.raises(AttributeError):
        _ = conv.no_such_attribute

    class ReadsStride(nn.Module):  # model code reading a conv's settings in its forward
        def __init__(self):
            super().__init__()
            self.conv = nn.Conv2d(3, 4, 3, stride=2)

        def forward(self, x):
            return self.conv(x).flatten(1) * self.conv.stride[0]

    from popup_adapter import get_popup_model

    model = get_popup_model(ReadsStride(), k=0.5)
    assert model(torch.randn(1, 3, 9, 9)).shape == (1, 4 * 16)


def test_assigning_the_weight_replaces_the_base_layers():
    layer = _with_scores(nn.Linear(8, 6))
    new = nn.Parameter(torch.ones(6, 8))
    layer.weight = new  # e.g. transformers re-tying weights
    assert layer.base_layer.weight is new and "weight" not in layer._parameters
    assert torch.equal(layer.weight, layer.get_mask().float())


def test_hooks_on_the_base_layer_still_run():
    base = nn.Linear(8, 6)
    calls = []
    base.register_forward_hook(lambda module, args, out: calls.append(out))
    layer, merged = _trained_layer(base)
    x = torch.randn(3, 8)
    out = layer(x)
    assert len(calls) == 1 and torch.equal(calls[0], out) and torch.equal(out, merged(x))


def test_parametrized_weights_are_refused_not_silently_wrong():
    from torch.nn.utils.parametrizations import weight_norm

    from popup_adapter import TargetModulesError, get_popup_model

    def model():
        return nn.Sequential(nn.Linear(4, 4), weight_norm(nn.Conv1d(4, 4, 3, padding=1)))

    with pytest.raises(TypeError, match="computed by a parametrization"):
        create_popup_layer(model()[1])
    with pytest.raises(TargetModulesError, match=r"'1' .* cannot be masked: its weight is"):
        get_popup_model(model(), target_modules=["1"])
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        adapted = get_popup_model(model())
    said = [str(w.message) for w in caught]
    assert said[0].startswith("1 is not masked: its weight is computed by a parametrization")
    assert "matrix weights (48 weights, 75.0% of the model's) are not masked" in said[1]
    assert set(dict(adapted.popup_layers())) == {"0"}


def test_an_adapted_model_deep_copies():
    """copy.deepcopy (EMA copies, DataParallel replicas) goes through the read-through."""
    import copy

    from popup_adapter import get_popup_model
    from popup_adapter.convnets import create_conv_net

    model = get_popup_model(create_conv_net("conv2", width=0.25), k=0.5).eval()
    twin = copy.deepcopy(model)
    x = torch.randn(2, 1, 28, 28)
    with torch.no_grad():
        assert torch.equal(twin(x), model(x))
    assert twin.base_model.features[0].base_weight is not model.base_model.features[0].base_weight


def test_training_steps_on_every_device_select_what_the_cpu_selects(device):
    """The same model trained for a few steps on ``device`` and on the CPU: the same base
    (regenerated on the CPU, moved), the same masks, scores within float tolerance (the
    convolutions' sums run in another order on an accelerator)."""
    from popup_adapter import get_popup_model
    from popup_adapter.convnets import create_conv_net

    generator = torch.Generator().manual_seed(0)
    batches = [(torch.randn(8, 1, 28, 28, generator=generator), torch.arange(8) % 10)] * 3
    models = []
    for where in (torch.device("cpu"), device):
        model = get_popup_model(create_conv_net("conv2", width=0.25), k=0.3).to(where)
        optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.1)
        for x, y in batches:
            loss = nn.functional.cross_entropy(model(x.to(where)), y.to(where))
            loss.backward()
            optimizer.step()
            optimizer.zero_grad()
        models.append(model)
    cpu, other = models
    assert other.base_fingerprint == cpu.base_fingerprint
    for name, mask in cpu.get_masks().items():
        assert torch.equal(other.get_masks()[name].cpu(), mask), name
    for (name, ours), theirs in zip(cpu.named_parameters(), other.parameters(), strict=True):
        torch.testing.assert_close(theirs.cpu(), ours, rtol=1e-4, atol=1e-6, msg=name)
