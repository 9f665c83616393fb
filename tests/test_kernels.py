"""The fused CPU kernels against the eager implementation and a full sort."""

import os
import subprocess
import sys

import pytest
import torch
from conftest import full_sort_mask, needs_kernels, score_updates

from popup_adapter import kernels
from popup_adapter.selection import (
    SelectionState,
    StraightThroughMask,
    _fused_kernels_apply,
    masked_weight,
    num_kept,
)


@needs_kernels
def test_kernels_build_where_a_compiler_is():
    assert kernels.load_kernels()
    assert _fused_kernels_apply(torch.ones(3), torch.ones(3), SelectionState())


@needs_kernels
def test_forward_kernel_reports_which_side_a_missed_threshold_is_on():
    scores = torch.arange(1, 101, dtype=torch.float32)  # the 30th largest |s| is 71
    weight = torch.ones(100)
    forward = torch.ops.popup_adapter.masked_weight_forward
    out, threshold, status = forward(weight, scores, 30, 60.5, 80.5)
    assert (status, threshold) == (kernels.FOUND, 71.0)
    assert torch.equal(out, (scores >= 71).float())
    assert forward(weight, scores, 30, 75.5, 80.5)[2] == kernels.BELOW_BAND
    assert forward(weight, scores, 30, 10.5, 20.5)[2] == kernels.ABOVE_BAND


@needs_kernels
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16])
def test_fused_path_equals_full_sort_and_eager_gradient_at_every_step(dtype):
    """A training-like sequence of score updates (small drifts, a jump far out of the band, a
    rescale, exact ties) over a layer larger than one kernel chunk: the fused forward keeps
    exactly the full sort's top-k, and its gradient is the eager straight-through one."""
    generator = torch.Generator().manual_seed(0)
    weight = torch.randn(128, 64, 3, 3, generator=generator).to(dtype)  # 73,728: two chunks
    start = torch.randn(weight.shape, generator=generator).to(dtype)
    kept = num_kept(0.3, weight.numel())
    state = SelectionState()
    for update, scores in score_updates(start, generator):
        leaf = scores.clone().requires_grad_(True)
        assert _fused_kernels_apply(weight, leaf, state)
        out = masked_weight(weight, leaf, kept, state)
        assert torch.equal(out != 0, full_sort_mask(scores, kept)), update
        assert torch.equal(out, weight * full_sort_mask(scores, kept))
        grad = torch.randn(weight.shape, generator=generator).to(dtype)
        (fused_grad,) = torch.autograd.grad(out, leaf, grad)
        eager_leaf = scores.clone().requires_grad_(True)
        eager = StraightThroughMask.apply(weight, eager_leaf, kept, None)
        (eager_grad,) = torch.autograd.grad(eager, eager_leaf, grad)
        assert fused_grad.dtype == dtype
        assert torch.equal(fused_grad, eager_grad)


def test_eager_path_when_kernels_are_off_or_weights_train(monkeypatch):
    weight, scores = torch.ones(4), torch.ones(4, requires_grad=True)
    assert not _fused_kernels_apply(weight, scores, None)  # no state: the stateless path
    assert not _fused_kernels_apply(weight.requires_grad_(True), scores, SelectionState())
    assert not _fused_kernels_apply(torch.ones(4), scores, SelectionState(), fused=False)


@needs_kernels
def test_layer_backward_in_place_gives_the_eager_gradients(monkeypatch):
    """A masked layer's forward lets the backward overwrite its weight-gradient buffer: the
    score gradients equal those with the kernels off."""
    from popup_adapter import get_popup_model
    from popup_adapter.convnets import create_conv_net

    x = torch.randn(8, 1, 28, 28, generator=torch.Generator().manual_seed(0))
    grads = []
    for enabled in (True, False):
        monkeypatch.setattr(kernels, "_USE_KERNELS", enabled)
        model = get_popup_model(create_conv_net("conv2", width=0.25), k=0.3)
        assert all(layer.use_kernels is enabled for _, layer in model.popup_layers())
        model(x).square().mean().backward()
        grads.append({n: p.grad for n, p in model.named_parameters() if p.grad is not None})
    assert grads[0].keys() == grads[1].keys() != set()
    for name, grad in grads[0].items():
        assert torch.equal(grad, grads[1][name]), name


@needs_kernels
@pytest.mark.parametrize("family", ["conv", "linear", "gpt2"])
def test_masked_weights_are_written_again_in_the_backward_not_kept(family, monkeypatch):
    """Between the forward and the backward no layer keeps ``W * M``: autograd holds a recipe
    that the backward runs once per layer at most (where its input gradient needs the weight),
    on the fused path and on the eager one, and the gradients are those of the same step with
    ``W * M`` kept."""
    from conftest import tiny_gpt2

    from popup_adapter import get_popup_model, selection
    from popup_adapter.convnets import create_conv_net

    builds = {
        "conv": lambda: create_conv_net("conv2", width=0.25),
        "linear": lambda: torch.nn.Sequential(torch.nn.Linear(12, 32), torch.nn.Linear(32, 5)),
        "gpt2": tiny_gpt2,
    }
    inputs = {
        "conv": torch.randn(4, 1, 28, 28, generator=torch.Generator().manual_seed(0)),
        "linear": torch.randn(4, 12, requires_grad=True),
        "gpt2": torch.randint(0, 100, (2, 12), generator=torch.Generator().manual_seed(0)),
    }
    calls = []
    recipe = selection.masked_weight_recipe

    def counted(masked):
        recompute = recipe(masked)
        return None if recompute is None else lambda: calls.append(1) or recompute()

    grads = []
    for fused in (True, False):
        for write_again in (counted, lambda masked: None):
            monkeypatch.setattr(kernels, "_USE_KERNELS", fused)
            monkeypatch.setattr("popup_adapter.layers.masked_weight_recipe", write_again)
            torch.manual_seed(0)
            model = get_popup_model(builds[family](), k=0.3)
            output = model(inputs[family])
            output = output if isinstance(output, torch.Tensor) else output.logits
            assert calls == []  # nothing written again before the backward
            output.square().mean().backward()
            layers = len(list(model.popup_layers()))
            assert (0 < len(calls) <= layers) if write_again is counted else calls == []
            calls.clear()
            grads.append({n: p.grad for n, p in model.named_parameters() if p.grad is not None})
    assert grads[0].keys() != set()
    for other in grads[1:]:
        assert other.keys() == grads[0].keys()
        for name, grad in grads[0].items():
            assert torch.equal(grad, other[name]), name


@needs_kernels
def test_scores_changed_before_the_backward_are_refused():
    from popup_adapter import get_popup_model

    model = get_popup_model(torch.nn.Sequential(torch.nn.Linear(12, 32), torch.nn.Linear(32, 5)))
    loss = model(torch.randn(4, 12)).square().mean()
    with torch.no_grad():
        for _, layer in model.popup_layers():
            layer.popup_scores["default"].copy_(torch.randn_like(layer.popup_scores["default"]))
    with pytest.raises(RuntimeError, match="changed between the forward and the backward"):
        loss.backward()


@needs_kernels
def test_shared_gradient_is_not_overwritten():
    """``masked_weight`` used in a sum: autograd hands the same gradient tensor to both
    inputs, so the backward must not write into it."""
    weight = torch.randn(64, 64)
    scores = torch.randn(64, 64, requires_grad=True)
    other = torch.zeros(64, 64, requires_grad=True)
    upstream = torch.randn(64, 64)
    (masked_weight(weight, scores, 1000, SelectionState()) + other).backward(upstream)
    assert torch.equal(other.grad, upstream)
    assert torch.equal(scores.grad, upstream * weight * scores.detach().sign())


def test_a_failed_build_warns_and_falls_back(monkeypatch, tmp_path):
    from torch.utils import cpp_extension

    def no_compiler(**kwargs):
        raise RuntimeError("Error building extension: c++: command not found")

    monkeypatch.setattr(kernels, "build_directory", lambda: tmp_path / "never-built")
    monkeypatch.setattr(cpp_extension, "load", no_compiler)
    kernels.load_kernels.cache_clear()
    try:
        with pytest.warns(RuntimeWarning, match="c\\+\\+: command not found.*eager path"):
            assert not kernels.load_kernels()
        assert not _fused_kernels_apply(torch.ones(4), torch.ones(4), SelectionState())
    finally:
        kernels.load_kernels.cache_clear()


@needs_kernels
def test_a_built_library_loads_without_compiling_or_touching_loggers(tmp_path):
    """A second process loads the compiled library as it is: no compiler run, torch's
    cpp_extension (which logs about CUDA when imported) not even imported, no logger changed."""
    script = (
        "import logging, sys\n"
        "from popup_adapter import kernels\n"
        "levels = {n: logging.getLogger(n).level for n in logging.root.manager.loggerDict}\n"
        "assert kernels.load_kernels()\n"
        "assert 'torch.utils.cpp_extension' not in sys.modules\n"
        "after = {n: logging.getLogger(n).level for n in levels}\n"
        "assert after == levels, 'a logger level changed'\n"
        "print('ok')\n"
    )
    assert kernels.load_kernels()  # built here first, if this machine never did
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True)
    assert done.stdout.strip() == "ok", done.stderr


def test_layers_capture_the_setting_when_built(monkeypatch):
    from popup_adapter import get_popup_model
    from popup_adapter.convnets import create_conv_net

    monkeypatch.setattr(kernels, "_USE_KERNELS", kernels.use_kernels())
    kernels.set_use_kernels(False)
    off = get_popup_model(create_conv_net("conv2", width=0.25), k=0.3)
    kernels.set_use_kernels(True)
    on = get_popup_model(create_conv_net("conv2", width=0.25), k=0.3)
    assert {layer.use_kernels for _, layer in off.popup_layers()} == {False}
    assert {layer.use_kernels for _, layer in on.popup_layers()} == {True}


def test_the_environment_default_is_read_at_import():
    script = "from popup_adapter import kernels; print(kernels.use_kernels())"
    env = {**os.environ, "POPUP_ADAPTER_KERNELS": "0"}
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=env)
    assert done.stdout.strip() == "False", done.stderr


@needs_kernels
def test_a_forward_that_writes_into_the_masked_weight_keeps_what_it_wrote():
    """A module whose forward changes its weight in place before using it: autograd saves the
    changed tensor, which no recipe could give back, so it is kept as it is."""
    from popup_adapter import get_popup_model

    class ScalesInPlace(torch.nn.Linear):
        def forward(self, x):
            return torch.nn.functional.linear(x, self.weight.mul_(2.0), self.bias)

    torch.manual_seed(0)
    model = get_popup_model(torch.nn.Sequential(ScalesInPlace(6, 4)), k=0.5)
    x = torch.randn(3, 6, requires_grad=True)
    model(x).square().sum().backward()
    layer = next(layer for _, layer in model.popup_layers())
    doubled = 2.0 * layer.base_weight * layer.get_mask()
    expected = torch.autograd.grad(
        torch.nn.functional.linear(x, doubled, layer.base_layer.bias).square().sum(), x
    )[0]
    torch.testing.assert_close(x.grad, expected)


@needs_kernels
@pytest.mark.parametrize("signs", [False, True], ids=["float weight", "sign bits"])
def test_a_freed_masked_weight_is_reused_and_a_held_one_never_is(signs):
    """The forward kernels' W * M come from a few kept blocks (no heap holes between the
    activations): a block serves the next W * M once every tensor of it, views included, is
    gone, and never while one is held."""
    assert kernels.load_kernels()
    kernels.empty_cache()  # a larger block kept from an earlier test would not serve these
    generator = torch.Generator().manual_seed(0)
    weight = torch.randn(300, 70, generator=generator)

    def threshold(scores):  # the exact one: the kernels' output holds where they find it
        value = float(scores.abs().flatten().kthvalue(scores.numel() - 5000 + 1).values)
        return value, value

    if signs:
        from popup_adapter.sign_bits import SignBitWeight

        packed = SignBitWeight.from_dense(torch.where(weight < 0, -0.25, 0.25))
        weight = packed.dense()

        def forward(scores):
            return torch.ops.popup_adapter.masked_weight_forward_signs(
                packed.bits, packed.scale, scores, 5000, *threshold(scores)
            )[0]
    else:

        def forward(scores):
            return torch.ops.popup_adapter.masked_weight_forward(
                weight, scores, 5000, *threshold(scores)
            )[0]

    def expected(scores):
        return weight * full_sort_mask(scores, 5000)

    first_scores, second_scores = (torch.randn(300, 70, generator=generator) for _ in range(2))
    first = forward(first_scores)
    held = first[10:].t()  # a view keeps the block, as autograd's saved W.T would
    del first
    second = forward(second_scores)
    assert second.data_ptr() != held.untyped_storage().data_ptr()
    assert torch.equal(held, expected(first_scores)[10:].t())
    assert torch.equal(second, expected(second_scores))
    del held, second
    blocks = set()
    for scores in (first_scores, second_scores) * 3:  # layer after layer, nothing held
        out = forward(scores)
        assert torch.equal(out, expected(scores))
        assert out.is_contiguous() and out.shape == (300, 70)
        blocks.add(out.data_ptr())
        del out
    assert len(blocks) <= 2  # the kept blocks serve them all
