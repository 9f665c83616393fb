import pytest
import torch

from popup_adapter.selection import masked_weight, num_kept, topk_mask


@pytest.mark.parametrize(
    ("k", "n", "expected"),
    [(0.3, 10, 3), (0.5, 27, 14), (1.0, 5, 5), (0.001, 10, 1), (0.1, 1, 1), (0.25, 6, 2)],
)
def test_num_kept_is_round_k_n_at_least_one(k, n, expected):
    assert num_kept(k, n) == expected == max(1, round(k * n))


@pytest.mark.parametrize("shape", [(7,), (16, 9), (8, 3, 3, 3), (4, 2, 3, 3, 3)])
@pytest.mark.parametrize("k", [0.05, 0.3, 0.5, 0.99])
def test_topk_mask_equals_full_sort(shape, k):
    scores = torch.randn(shape, generator=torch.Generator().manual_seed(1))
    kept = num_kept(k, scores.numel())
    mask = topk_mask(scores, kept)
    reference = torch.zeros(scores.numel(), dtype=torch.bool)
    reference[scores.abs().flatten().sort(descending=True, stable=True).indices[:kept]] = True
    assert mask.dtype == torch.bool and mask.shape == scores.shape
    assert int(mask.sum()) == kept
    assert torch.equal(mask.flatten(), reference)


def test_ties_are_broken_by_lowest_index():
    scores = torch.tensor([1.0, -2.0, 2.0, 0.5, 2.0, -2.0])
    # |s|: four entries tie at 2.0; keeping 3 takes indices 1, 2, 4 (lowest first)
    assert topk_mask(scores, 3).tolist() == [False, True, True, False, True, False]
    assert topk_mask(torch.zeros(10), 4).tolist() == [True] * 4 + [False] * 6


def test_straight_through_gradient_by_hand():
    generator = torch.Generator().manual_seed(0)
    weight = torch.randn(5, 4, generator=generator)
    scores = torch.randn(5, 4, generator=generator, requires_grad=True)
    x = torch.randn(3, 4, generator=generator)
    upstream = torch.randn(3, 5, generator=generator)

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
