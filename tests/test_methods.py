"""Beyond edge-popup: biprop's binarized weights and global top-k with a density ramp."""

import sys
import textwrap

import pytest
import torch
from conftest import tiny_bert

from popup_adapter import PopupConfig, PopupModel, get_popup_model, zoo
from popup_adapter.budget import global_kept_counts, ramped_density
from popup_adapter.convnets import create_conv_net
from popup_adapter.errors import AdapterError, ArtifactError, ConfigError
from popup_adapter.selection import SelectionState, masked_weight, topk_mask


def _trained(model: PopupModel, x: torch.Tensor, steps: int = 3) -> PopupModel:
    optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.5)
    for step in range(steps):
        model.update_search(step)
        model(x).logsumexp(-1).mean().backward()
        optimizer.step()
        optimizer.zero_grad()
    model.update_search(None)
    return model


@pytest.mark.parametrize("fused", [False, True])
def test_biprop_alpha_and_gradients_by_hand(fused):
    torch.manual_seed(0)
    weight = torch.randn(6, 5)
    scores = torch.randn(6, 5, requires_grad=True)
    kept = 9
    out = masked_weight(weight, scores, kept, SelectionState(), fused=fused, binary=True)
    # by hand: the 9 largest |scores|, alpha = mean |W| over them, alpha * sign(W) there
    order = scores.detach().abs().flatten().argsort(descending=True)[:kept]
    mask = torch.zeros(30, dtype=torch.bool)
    mask[order] = True
    mask = mask.view(6, 5)
    alpha = weight.abs()[mask].sum() / kept
    assert torch.allclose(out, alpha * weight.sign() * mask)
    assert torch.equal(out != 0, mask) and len(set(out[mask].abs().tolist())) == 1
    # straight-through as biprop's reference code: grad * |W| to the mask, alpha held
    # constant, through |S|: grad * W * sign(S) for every score, kept or not
    upstream = torch.randn(6, 5)
    out.backward(upstream)
    assert torch.allclose(scores.grad, upstream * weight * scores.detach().sign())


def test_biprop_coincides_with_edge_popup_on_a_signed_constant_base():
    x = torch.randn(4, 1, 28, 28)
    outputs = []
    for method in ("edge_popup", "biprop"):
        model = get_popup_model(create_conv_net("conv2", width=0.25), k=0.2, method=method)
        with torch.no_grad():
            outputs.append(model(x))
    torch.testing.assert_close(outputs[0], outputs[1])  # every |W| of a layer is one constant


def test_biprop_layer_merges_unmerges_and_unloads_exactly():
    torch.manual_seed(0)
    x = torch.randn(4, 1, 28, 28)
    model = get_popup_model(
        create_conv_net("conv4", width=0.25), k=0.1, method="biprop", init="kaiming_normal"
    )
    _trained(model, x)
    model.eval()
    fingerprint = model.base_fingerprint
    with torch.no_grad():
        masked = model(x)
        layer = model.base_model.features[0]
        weight = layer.base_weight
        mask = layer.get_mask()
        alpha = weight.abs()[mask].mean()
        assert torch.allclose(layer.effective_weight(), alpha * weight.sign() * mask)
        model.merge_adapter()
        assert torch.equal(model(x), masked)
        assert len(set(layer.base_weight[mask].abs().tolist())) == 1  # binary in place
        model.unmerge_adapter()
        assert model.base_fingerprint == fingerprint and torch.equal(model(x), masked)
        assert torch.equal(model.merge_and_unload()(x), masked)


def test_biprop_trains_the_scores_and_leaves_the_base():
    x = torch.randn(8, 1, 28, 28)
    model = get_popup_model(create_conv_net("conv2", width=0.25), method="biprop")
    before = model.base_fingerprint
    start = {name: mask.clone() for name, mask in model.get_masks().items()}
    _trained(model, x, steps=5)
    assert model.base_fingerprint == before
    assert any(not torch.equal(start[n], m) for n, m in model.get_masks().items())


def _global_by_sorting(scores, total, floors):
    """The reference: each layer's floor first, then the largest remaining |scores| overall."""
    counts = list(floors)
    rest = []
    for index, s in enumerate(scores):
        magnitude = s.abs().flatten()
        kept_first = topk_mask(magnitude, floors[index])
        rest += [(-float(v), index, i) for i, v in enumerate(magnitude) if not kept_first[i]]
    for _, index, _ in sorted(rest)[: total - sum(floors)]:
        counts[index] += 1
    return counts


def test_global_counts_equal_a_full_sort_with_floors_and_the_band_reuse():
    generator = torch.Generator().manual_seed(0)
    shapes = [(40, 9), (8, 40), (30,), (3, 3, 3)]
    scales = [1.0, 0.3, 3.0, 0.1]  # layers whose scores differ in scale: the floor matters
    scores = [torch.randn(s, generator=generator) * c for s, c in zip(shapes, scales, strict=True)]
    sizes = [s.numel() for s in scores]
    state = SelectionState()
    for step in range(6):
        total = round(0.1 * sum(sizes))
        floors = [max(1, round(0.02 * n)) for n in sizes]
        counts = global_kept_counts(scores, total, floors, state)
        assert counts == _global_by_sorting(scores, total, floors), step
        assert sum(counts) == total and all(c >= f for c, f in zip(counts, floors, strict=True))
        # the next step's scores move a little: the band around the last threshold is used
        scores = [s + 0.01 * torch.randn(s.shape, generator=generator) for s in scores]
    assert state.threshold is not None


def test_global_ties_at_the_threshold_go_to_the_earlier_layer():
    scores = [torch.tensor([3.0, 1.0, 1.0]), torch.tensor([1.0, 1.0, 2.0])]
    assert global_kept_counts(scores, 4, [1, 1]) == [3, 1]
    assert global_kept_counts(scores, 2, [1, 1]) == [1, 1]  # the floors alone


def test_global_model_keeps_exactly_k_of_all_weights_and_every_layer_its_floor():
    x = torch.randn(8, 1, 28, 28)
    model = get_popup_model(
        create_conv_net("conv4", width=0.25), k=0.05, selection="global", min_layer_k=0.01
    )
    _trained(model, x)
    masks = model.get_masks()
    total = sum(m.numel() for m in masks.values())
    assert sum(int(m.sum()) for m in masks.values()) == round(0.05 * total)
    assert all(int(m.sum()) >= max(1, round(0.01 * m.numel())) for m in masks.values())
    counts = {int(m.sum()) / m.numel() for m in masks.values()}
    assert len(counts) > 1  # layers keep different fractions: the threshold is global
    # each layer's mask is its own top-count by |score|
    for name, layer in model.popup_layers():
        assert torch.equal(
            masks[name], topk_mask(layer.popup_scores["default"], int(masks[name].sum()))
        )


def test_density_ramps_from_dense_to_k():
    assert ramped_density(0.1, 0, 100) == 1.0
    assert ramped_density(0.1, 100, 100) == ramped_density(0.1, None, 100) == 0.1
    assert 0.1 < ramped_density(0.1, 50, 100) < 0.55  # the cubic falls fast at first
    x = torch.randn(4, 1, 28, 28)
    model = get_popup_model(create_conv_net("conv2", width=0.25), k=0.1, ramp_steps=4)
    kept = []
    for step in range(6):
        model.update_search(step)
        kept.append(sum(int(m.sum()) for m in model.get_masks().values()))
        model(x)
    total = sum(m.numel() for m in model.get_masks().values())
    assert kept[0] == total and kept == sorted(kept, reverse=True)
    assert kept[4] == kept[5] == sum(round(0.1 * m.numel()) for m in model.get_masks().values())
    model.update_search(2)
    with pytest.raises(AdapterError, match="mid-ramp"):
        model.artifact_contents()


def test_global_with_several_adapters_each_exact(tmp_path):
    x = torch.randn(4, 1, 28, 28)
    model = get_popup_model(create_conv_net("conv2", width=0.25), k=0.1, selection="global")
    model.add_adapter("dense_er", PopupConfig(k=0.4, selection="global", min_layer_k=0.1))
    model.add_adapter("plain", PopupConfig(k=0.2))
    for name, k in (("default", 0.1), ("dense_er", 0.4), ("plain", 0.2)):
        model.set_adapter(name)
        _trained(model, x, steps=2)
        masks = model.get_masks(name)
        total = sum(m.numel() for m in masks.values())
        if name == "plain":
            assert all(int(m.sum()) == round(k * m.numel()) for m in masks.values())
        else:
            assert sum(int(m.sum()) for m in masks.values()) == round(k * total)
    with torch.no_grad():
        model.set_adapter("dense_er")
        expected = model.eval()(x)
    model.save_pretrained(tmp_path, adapter_name="dense_er")
    loaded = PopupModel.from_pretrained(tmp_path)
    with torch.no_grad():
        assert torch.equal(loaded(x), expected)
    model.delete_adapter("default")
    assert "default" not in model._budgets


def test_an_artifact_whose_global_count_disagrees_is_refused(tmp_path):
    import json

    model = get_popup_model(create_conv_net("conv2", width=0.25), k=0.1, selection="global")
    model.save_pretrained(tmp_path)
    config_path = tmp_path / "popup_config.json"
    meta = json.loads(config_path.read_text())
    first = next(iter(meta["layers"]))
    meta["layers"][first]["kept"] += 1
    config_path.write_text(json.dumps(meta))
    with pytest.raises(ArtifactError, match=r"global k=0\.1"):
        PopupModel.from_pretrained(tmp_path)


@pytest.mark.parametrize(
    "fields, message",
    [
        ({"method": "binary"}, "unknown method"),
        ({"selection": "network"}, "unknown selection"),
        ({"ramp_steps": -1}, "ramp_steps must be an int >= 0"),
        ({"ramp_steps": 1.5}, "ramp_steps must be an int"),
        ({"selection": "global", "k": 0.1, "min_layer_k": 0.2}, r"min_layer_k=0.2 must lie"),
        ({"min_layer_k": 0.01}, "per-layer floor of selection='global'"),
    ],
)
def test_method_fields_are_validated(fields, message):
    with pytest.raises(ConfigError, match=message):
        PopupConfig(**fields)


def test_methods_round_trip_in_a_fresh_process(tmp_path):
    """biprop with global top-k on a transformers encoder: saved here, loaded in a new process
    (nothing shared but the folder), identical outputs and fingerprint."""
    import subprocess

    ids = torch.randint(0, 100, (2, 12), generator=torch.Generator().manual_seed(0))
    model = get_popup_model(
        tiny_bert(), k=0.1, method="biprop", init="kaiming_normal", selection="global"
    )
    optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.5)
    for _ in range(3):
        model(input_ids=ids).logits.logsumexp(-1).mean().backward()
        optimizer.step()
        optimizer.zero_grad()
    model.eval()
    with torch.no_grad():
        expected = model(input_ids=ids).logits
    model.save_pretrained(tmp_path / "art")
    torch.save({"ids": ids, "logits": expected}, tmp_path / "expected.pt")
    code = f"""
        import torch
        from popup_adapter import PopupModel
        expected = torch.load({str(tmp_path / "expected.pt")!r})
        model = PopupModel.from_pretrained({str(tmp_path / "art")!r})
        with torch.no_grad():
            logits = model(input_ids=expected["ids"]).logits
        print(torch.equal(logits, expected["logits"]), model.base_fingerprint)
    """
    out = subprocess.run(
        [sys.executable, "-c", textwrap.dedent(code)], capture_output=True, text=True, timeout=600
    )
    assert out.returncode == 0, out.stderr[-3000:]
    assert out.stdout.split() == ["True", model.base_fingerprint]


def test_global_refuses_expert_banks():
    with pytest.raises(ConfigError, match="does not cover expert banks"):
        get_popup_model(zoo.transformers_case("mixtral").build(), selection="global")


# -- IteRand


def _iterand(**fields) -> PopupModel:
    config = {"k": 0.2, "init": "kaiming_normal", "redraw_every": 2, "redraw_prob": 0.3}
    return get_popup_model(create_conv_net("conv2", width=0.25), **(config | fields))


def _steps(model: PopupModel, optimizer, steps: range) -> None:
    for step in steps:
        model.update_search(step)
        x = torch.randn(4, 1, 28, 28, generator=torch.Generator().manual_seed(step))
        model(x).logsumexp(-1).mean().backward()
        optimizer.step()
        optimizer.zero_grad()


def _optimizer(model: PopupModel):
    return torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.5, momentum=0.9)


def test_iterand_redraws_pruned_weights_from_the_seed_streams():
    from popup_adapter.base import layer_weight
    from popup_adapter.redraws import redraw_counts

    model = _iterand()
    layer = model.base_model.features[2]
    seed_weight = layer.base_weight.clone()
    mask = layer.get_mask()
    model.update_search(1)
    assert not redraw_counts(layer).any()  # not a multiple of redraw_every
    model.update_search(2)
    model.update_search(2)  # reported again (gradient accumulation): redrawn once
    counts = redraw_counts(layer)
    assert counts.max() == 1 and not counts[mask].any()  # pruned weights only
    assert 0.25 < counts.sum() / (~mask).sum() < 0.35  # about redraw_prob of them
    config = model.peft_config["default"]
    redrawn = layer_weight(config, "features.2.weight", layer.owner, seed_weight, True, redraw=1)
    weight = layer.base_weight
    assert torch.equal(weight[counts == 1], redrawn[counts == 1])
    assert torch.equal(weight[counts == 0], seed_weight[counts == 0])
    # the base is still the seed's: redraws belong to the mask
    assert model.base_fingerprint == _iterand().base_fingerprint


def test_iterand_resumed_run_equals_the_uninterrupted_one():
    whole = _iterand()
    _steps(whole, _optimizer(whole), range(7))
    first = _iterand()
    first_optimizer = _optimizer(first)
    _steps(first, first_optimizer, range(3))
    resumed = _iterand()  # a new process: the checkpoint's model and optimizer state
    resumed.load_state_dict(first.state_dict())
    optimizer = _optimizer(resumed)
    optimizer.load_state_dict(first_optimizer.state_dict())
    _steps(resumed, optimizer, range(3, 7))
    expected = whole.state_dict()
    assert any(key.endswith("popup_redraws") for key in expected)
    for key, value in resumed.state_dict().items():
        assert torch.equal(value, expected[key]), key
    assert int(sum(c.sum() for k, c in expected.items() if k.endswith("popup_redraws"))) > 0


def test_iterand_artifact_regenerates_the_network_in_a_fresh_process(tmp_path):
    import json
    import subprocess

    model = _iterand(method="biprop")
    _steps(model, _optimizer(model), range(7))
    model.update_search(None)
    model.eval()
    x = torch.randn(3, 1, 28, 28)
    with torch.no_grad():
        expected = model(x)
    model.save_pretrained(tmp_path / "art")
    meta = json.loads((tmp_path / "art" / "popup_config.json").read_text())
    assert meta["format_version"] == 4
    histograms = [layer["redraws"] for layer in meta["layers"].values()]
    assert any(len(h) > 1 and h[1] > 0 for h in histograms)  # some kept weights were redrawn
    torch.save({"x": x, "y": expected}, tmp_path / "io.pt")
    code = f"""
        import torch
        from popup_adapter import PopupModel
        io = torch.load({str(tmp_path / "io.pt")!r})
        model = PopupModel.from_pretrained({str(tmp_path / "art")!r})
        with torch.no_grad():
            served = model(io["x"])
            model.unmerge_adapter()
            print(torch.equal(served, io["y"]), torch.equal(model(io["x"]), io["y"]))
        print(model.base_fingerprint)
    """
    out = subprocess.run(
        [sys.executable, "-c", textwrap.dedent(code)], capture_output=True, text=True, timeout=600
    )
    assert out.returncode == 0, out.stderr[-3000:]
    assert out.stdout.split() == ["True", "True", model.base_fingerprint]


def test_iterand_merges_and_unmerges_its_redrawn_weights_exactly():
    model = _iterand()
    _steps(model, _optimizer(model), range(5))
    model.eval()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    x = torch.randn(2, 1, 28, 28)
    with torch.no_grad():
        expected = model(x)
        model.merge_adapter()
        assert torch.equal(model(x), expected)
        model.unmerge_adapter()
    for key, value in model.state_dict().items():
        assert torch.equal(value, before[key]), key


def test_iterand_takes_the_backbone_alone_and_is_validated():
    model = _iterand()
    with pytest.raises(AdapterError, match="IteRand"):
        model.add_adapter("other", PopupConfig(k=0.2, init="kaiming_normal"))
    plain = get_popup_model(create_conv_net("conv2", width=0.25))
    with pytest.raises(AdapterError, match="IteRand"):
        plain.add_adapter("iterand", PopupConfig(redraw_every=10))
    with pytest.raises(ConfigError, match="init='keep'"):
        PopupConfig(init="keep", redraw_every=10)
    with pytest.raises(ConfigError, match="redraw_prob"):
        PopupConfig(redraw_every=10, redraw_prob=0.0)


def test_iterand_counts_corrupted_in_the_file_are_refused(tmp_path):
    import json

    from safetensors.numpy import load_file, save_file

    from popup_adapter.artifact_schema import CONFIG_NAME

    model = _iterand(k=0.5, redraw_prob=1.0)
    _steps(model, _optimizer(model), range(5))
    model.update_search(None)
    model.save_pretrained(tmp_path)
    meta = json.loads((tmp_path / CONFIG_NAME).read_text())
    name = next(n for n, layer in meta["layers"].items() if len(layer["redraws"]) > 1)
    # a histogram that does not add up to the kept count
    broken = json.loads(json.dumps(meta))
    broken["layers"][name]["redraws"][0] += 1
    (tmp_path / CONFIG_NAME).write_text(json.dumps(broken))
    with pytest.raises(ArtifactError, match="redraws"):
        PopupModel.from_pretrained(tmp_path)
    # a payload that decodes to other counts (the file's hash rewritten to match)
    (tmp_path / CONFIG_NAME).write_text(json.dumps(meta))
    weights = tmp_path / next(iter(meta["files"]))
    tensors = load_file(weights)
    tensors[f"redraws.{name}"] = tensors[f"redraws.{name}"][::-1].copy()
    save_file(tensors, weights)
    import hashlib

    blob = weights.read_bytes()
    meta["files"] = {weights.name: {"sha256": hashlib.sha256(blob).hexdigest(), "size": len(blob)}}
    (tmp_path / CONFIG_NAME).write_text(json.dumps(meta))
    with pytest.raises(ArtifactError):
        PopupModel.from_pretrained(tmp_path)


def test_redraw_counts_code_near_their_entropy():
    import numpy as np

    from popup_adapter.codec import decode_counts, encode_counts

    rng = np.random.default_rng(0)
    counts = rng.choice(4, size=20_000, p=[0.85, 0.1, 0.04, 0.01]).astype(np.uint8)
    histogram, payload = encode_counts(counts)
    assert np.array_equal(decode_counts(histogram, payload, "here"), counts)
    p = np.asarray(histogram) / counts.size
    entropy_bytes = -(p[p > 0] * np.log2(p[p > 0])).sum() * counts.size / 8
    assert payload.size < entropy_bytes * 1.02 + 16
    zeros = np.zeros(100, np.uint8)
    assert encode_counts(zeros)[1].size == 0
    assert np.array_equal(decode_counts(*encode_counts(zeros), "here"), zeros)


# -- masks coded given the base


def test_a_pretrained_base_mask_is_coded_below_its_iid_bound_and_loads_exactly(tmp_path):
    import copy
    import json

    from popup_adapter.artifact import artifact_summary, read_artifact

    pretrained = create_conv_net("conv4", width=0.25)  # "pretrained": any fixed weights
    model = get_popup_model(copy.deepcopy(pretrained), k=0.1, init="keep", score_init="magnitude")
    model.eval()
    x = torch.randn(2, 1, 28, 28)
    with torch.no_grad():
        expected = model(x)
    model.save_pretrained(tmp_path)
    meta = json.loads((tmp_path / "popup_config.json").read_text())
    assert "rans_magnitude" in {layer["encoding"] for layer in meta["layers"].values()}
    summary = artifact_summary(read_artifact(tmp_path))
    assert summary["mask_bytes"] < 0.5 * summary["entropy_bytes"]  # magnitude pruning's mask
    loaded = PopupModel.from_pretrained(tmp_path, model=copy.deepcopy(pretrained))
    with torch.no_grad():
        assert torch.equal(loaded(x), expected)
    name = next(n for n, layer in meta["layers"].items() if layer["encoding"] == "rans_magnitude")
    meta["layers"][name]["bucket_kept"] = meta["layers"][name]["bucket_kept"][:-1]
    (tmp_path / "popup_config.json").write_text(json.dumps(meta))
    with pytest.raises(ArtifactError, match="bucket_kept"):
        PopupModel.from_pretrained(tmp_path, model=copy.deepcopy(pretrained))
