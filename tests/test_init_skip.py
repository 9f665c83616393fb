"""Building a seeded base without its layer weights' init gives the base a plain build gives."""

import logging
import threading

import pytest
import torch
from conftest import MODELS
from torch import nn

from popup_adapter import PopupModel, get_popup_model, specs
from popup_adapter.base import seeds_without_reading
from popup_adapter.init_skip import build_skipping_layer_init


def _same_base(build) -> None:
    torch.manual_seed(0)
    skipped = get_popup_model(build_skipping_layer_init(build), k=0.3)
    torch.manual_seed(1)  # another global RNG state: the base must not depend on it
    plain = get_popup_model(build(), k=0.3)
    assert skipped.base_fingerprint == plain.base_fingerprint
    buffers = dict(plain.base_model.named_buffers())
    for name, buffer in skipped.base_model.named_buffers():
        assert torch.equal(buffer, buffers[name]), name


@pytest.mark.parametrize("name", ["resnet50", "vit_tiny_patch16_224", "bert", "gpt2", "llama"])
def test_skipping_the_layer_init_changes_no_value(name, caplog):
    with caplog.at_level(logging.DEBUG, logger="popup_adapter.init_skip"):
        _same_base(MODELS[name][0])
    assert "building again" not in caplog.text  # these models skip soundly


class _ReadsItsWeight(nn.Module):
    """A constructor that computes a buffer from a layer weight after its init."""

    def __init__(self) -> None:
        super().__init__()
        self.linear = nn.Linear(8, 8)
        self.register_buffer("norm", self.linear.weight.detach().norm(dim=1))


class _NormalisedWeight(nn.Module):
    """torch's legacy weight_norm: its g is computed from the weight at construction."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.utils.weight_norm(nn.Conv1d(4, 4, 3))
        self.head = nn.Linear(4, 2)


@pytest.mark.parametrize("module", [_ReadsItsWeight, _NormalisedWeight])
def test_a_constructor_that_reads_a_layer_weight_is_built_the_plain_way(module, caplog):
    with caplog.at_level(logging.DEBUG, logger="popup_adapter.init_skip"):
        torch.manual_seed(0)
        built = build_skipping_layer_init(module)
    assert "building again" in caplog.text
    torch.manual_seed(0)
    reference = module()
    for (name, value), expected in zip(
        built.state_dict().items(), reference.state_dict().values(), strict=True
    ):
        assert torch.equal(value, expected), name  # the plain build, same RNG: same values


def test_a_layer_weight_shared_with_another_tensor_is_built_the_plain_way(caplog):
    class SharesStorage(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.linear = nn.Linear(4, 4)
            self.register_buffer("alias", self.linear.weight.data)  # the same storage

    with caplog.at_level(logging.DEBUG, logger="popup_adapter.init_skip"):
        built = build_skipping_layer_init(SharesStorage)
    assert "building again" in caplog.text
    assert torch.isfinite(built.alias).all() and built.alias.abs().sum() > 0


def test_an_embedding_its_constructor_zeroes_keeps_its_zeros():
    class ZeroEmbedding(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.table = nn.Embedding(10, 4)  # normal_ (skipped)
            nn.init.zeros_(self.table.weight)  # then a constant: seeding keeps it
            self.other = nn.Embedding(10, 4, padding_idx=0)  # normal_, a zero row: drawn
            self.head = nn.Linear(4, 2)

        def forward(self, x):
            return self.head(self.table(x) + self.other(x))

    _same_base(ZeroEmbedding)
    model = get_popup_model(build_skipping_layer_init(ZeroEmbedding), k=0.5)
    assert torch.equal(model.base_model.table.weight, torch.zeros(10, 4))
    assert model.base_model.other.weight.std() > 0


def test_a_base_the_seed_sets_alone_is_loaded_from_its_meta_build(tmp_path, monkeypatch):
    """ResNet-50 (layers, biases, norms, BatchNorm statistics): its meta build is given memory,
    not built again; a ViT (a class token its constructor sets) is built again."""
    built = []
    monkeypatch.setattr(
        "popup_adapter.pretrained.build_base",
        lambda spec, **kwargs: (
            built.append(kwargs.get("meta", False)) or specs.build_base(spec, **kwargs)
        ),
    )
    for name, alone in (("resnet50", True), ("vit_tiny_patch16_224", False)):
        make, batch = MODELS[name]
        model = get_popup_model(make(), k=0.3).eval()
        masked = [target.parameter_path for target in model.targets]
        assert seeds_without_reading(model.unload_view(), masked) is alone
        model.save_pretrained(tmp_path / name)
        built.clear()
        loaded = PopupModel.from_pretrained(tmp_path / name)
        assert built == ([True] if alone else [True, False])
        assert loaded.base_fingerprint == model.base_fingerprint
        x = batch()
        assert torch.equal(loaded(x), model(x))


def test_a_load_that_fails_while_the_fingerprint_hashes_raises_and_does_not_hang(
    tmp_path, monkeypatch
):
    get_popup_model(MODELS["resnet50"][0](), k=0.3).save_pretrained(tmp_path)

    def broken(self, *args, **kwargs):
        raise RuntimeError("a layer failed to take its mask")

    monkeypatch.setattr(PopupModel, "_add_scores", broken)  # inside the model's build
    raised = []

    def load() -> None:
        try:
            PopupModel.from_pretrained(tmp_path)
        except RuntimeError as error:
            raised.append(str(error))

    worker = threading.Thread(target=load, daemon=True)
    worker.start()
    worker.join(timeout=120)
    assert not worker.is_alive() and raised == ["a layer failed to take its mask"]
