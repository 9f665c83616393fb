import pytest
import torch
from conftest import full_sort_mask, score_updates

from popup_adapter.selection import masked_weight, num_kept, topk_mask


@pytest.mark.parametrize(
    ("k", "n", "expected"),
    [(0.3, 10, 3), (0.5, 27, 14), (1.0, 5, 5), (0.001, 10, 1), (0.1, 1, 1), (0.25, 6, 2)],
)
def test_num_kept_is_round_k_n_at_least_one(k, n, expected):
    assert num_kept(k, n) == expected == max(1, round(k * n))


@pytest.mark.parametrize("shape", [(7,), (16, 9), (8, 3, 3, 3), (4, 2, 3, 3, 3)])
@pytest.mark.parametrize("k", [0.05, 0.3, 0.5, 0.99])
def test_topk_mask_equals_full_sort(shape, k, device):
    scores = torch.randn(shape, generator=torch.Generator().manual_seed(1))
    kept = num_kept(k, scores.numel())
    mask = topk_mask(scores.to(device), kept)
    reference = torch.zeros(scores.numel(), dtype=torch.bool)
    reference[scores.abs().flatten().sort(descending=True, stable=True).indices[:kept]] = True
    assert mask.dtype == torch.bool and mask.shape == scores.shape and mask.device == device
    assert int(mask.sum()) == kept
    assert torch.equal(mask.flatten().cpu(), reference)


def test_ties_are_broken_by_lowest_index():
    scores = torch.tensor([1.0, -2.0, 2.0, 0.5, 2.0, -2.0])
    # |s|: four entries tie at 2.0; keeping 3 takes indices 1, 2, 4 (lowest first)
    assert topk_mask(scores, 3).tolist() == [False, True, True, False, True, False]
    assert topk_mask(torch.zeros(10), 4).tolist() == [True] * 4 + [False] * 6


def test_straight_through_gradient_by_hand(device):
    generator = torch.Generator().manual_seed(0)
    weight = torch.randn(5, 4, generator=generator).to(device)
    scores = torch.randn(5, 4, generator=generator).to(device).requires_grad_(True)
    x = torch.randn(3, 4, generator=generator).to(device)
    upstream = torch.randn(3, 5, generator=generator).to(device)

    out = torch.nn.functional.linear(x, masked_weight(weight, scores, 8))
    (out * upstream).sum().backward()

    mask = topk_mask(scores, 8)
    effective = (weight * mask).requires_grad_(True)
    (torch.nn.functional.linear(x, effective) * upstream).sum().backward()
    expected = effective.grad * weight * scores.detach().sign()  # dL/dS = dL/d(W*M) * W * sgn S
    assert torch.allclose(scores.grad, expected)
    # every score gets a gradient, also the masked-out ones
    assert (scores.grad[~mask] != 0).all()
    assert torch.allclose(out, x @ (weight * mask).T)


def test_weight_gradient_is_masked_when_weights_train():
    weight = torch.randn(4, 4, requires_grad=True)
    scores = torch.randn(4, 4)
    masked_weight(weight, scores, 5).sum().backward()
    assert torch.equal(weight.grad, topk_mask(scores, 5).float())


def test_threshold_reuse_is_exact_at_every_step(device):
    """The stateful selection (last threshold reused) against a full sort, over a training-like
    sequence of score updates: small drifts, a large jump, a rescale, and exact ties."""
    from popup_adapter.selection import SelectionState

    generator = torch.Generator().manual_seed(0)
    start = torch.randn(64, 32, 3, 3, generator=generator)
    state = SelectionState()
    kept = num_kept(0.3, start.numel())
    for update, scores in score_updates(start, generator):
        mask = topk_mask(scores.to(device), kept, state)
        assert int(mask.sum()) == kept
        assert torch.equal(mask.cpu(), full_sort_mask(scores, kept)), update
    assert state.threshold is not None


def test_layer_masks_stay_exact_while_training():
    """The training path (threshold reused between steps) selects what a full sort selects."""
    from popup_adapter import get_popup_model
    from popup_adapter.convnets import create_conv_net

    model = get_popup_model(create_conv_net("conv2", width=0.25), k=0.3)
    optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.5)
    x = torch.randn(8, 1, 28, 28, generator=torch.Generator().manual_seed(0))
    for _ in range(6):
        model(x).square().mean().backward()
        optimizer.step()
        optimizer.zero_grad()
        for layer in (model.base_model.features[0], model.base_model.classifier[1]):
            trained_mask = layer.effective_weight() != 0  # grad enabled: the stateful path
            expected = full_sort_mask(layer.popup_scores["default"], layer.popup_kept["default"])
            assert torch.equal(trained_mask, expected)
            assert layer.popup_selection["default"][0].threshold is not None
