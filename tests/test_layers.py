import pytest
import torch
from torch import nn

from popup_adapter import PopupConv, PopupConv1D, PopupEmbedding, PopupLinear, topk_mask
from popup_adapter.layers import create_popup_layer


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
def test_forward_is_the_base_layer_with_masked_weight(make, make_input, cls):
    base = make()
    layer = _with_scores(base)
    assert isinstance(layer, cls) and layer.base_layer is base
    x = make_input()
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


def test_eval_mask_is_cached_until_scores_change():
    layer = _with_scores(nn.Linear(8, 6))
    x = torch.randn(2, 8)
    with torch.no_grad():
        first = layer.effective_weight()
        assert layer.effective_weight() is first
        layer.popup_scores["default"].mul_(-1).add_(torch.randn(6, 8))
        second = layer.effective_weight()
    assert second is not first
    mask = topk_mask(layer.popup_scores["default"], layer.popup_kept["default"])
    assert torch.equal(second, layer.weight * mask)
    with torch.no_grad():
        assert torch.equal(layer(x), nn.functional.linear(x, second, layer.bias))


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
