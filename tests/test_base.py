"""The structure of a base: what computes with the weights, checked next to their fingerprint."""

import subprocess
import sys

import pytest
import torch
from conftest import tiny_bert, tiny_llama

from popup_adapter import BaseMismatchError, PopupModel, get_popup_model
from popup_adapter.structure import describe_structure, first_difference, structure_fingerprint


def _timm(**kwargs):
    import timm

    return timm.create_model("test_resnet", pretrained=False, num_classes=10, **kwargs)


@pytest.fixture(scope="module")
def resnet_artifact(tmp_path_factory):
    folder = tmp_path_factory.mktemp("structure") / "resnet"
    get_popup_model(_timm(), k=0.5).save_pretrained(folder)
    return folder


@pytest.mark.parametrize(
    ("kwargs", "where"),
    [
        ({"act_layer": "gelu"}, r"module 'conv1.2': here GELU, in the artifact ReLU"),
        (
            {"output_stride": 16},
            r"module '<root>' \(ResNet\):\n  feature_info: here .* reduction: 16}\), in the "
            r"artifact .* reduction: 32}\)",
        ),
    ],
)
def test_same_weights_another_network_is_refused_with_the_difference(
    resnet_artifact, kwargs, where
):
    """act_layer and output_stride change no parameter, so the weight fingerprint matches:
    the structure names the first module that differs, and how to fix it."""
    other = _timm(**kwargs)
    with pytest.raises(BaseMismatchError, match=where) as error:
        PopupModel.from_pretrained(resnet_artifact, model=other)
    assert "base_kwargs" in str(error.value)
    loaded = PopupModel.from_pretrained(resnet_artifact, model=other, check_structure=False)
    assert loaded.base_fingerprint == PopupModel.from_pretrained(resnet_artifact).base_fingerprint


def test_base_kwargs_rebuild_the_same_network(tmp_path):
    model = get_popup_model(_timm(act_layer="gelu"), k=0.5, base_kwargs={"act_layer": "gelu"})
    model.eval().save_pretrained(tmp_path / "gelu")
    loaded = PopupModel.from_pretrained(tmp_path / "gelu")  # no model=: rebuilt with GELU
    assert loaded.base_spec["base_kwargs"] == {"act_layer": "gelu"}
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        assert torch.equal(loaded(x), model(x))


def test_base_kwargs_are_checked():
    with pytest.raises(TypeError, match="JSON values"):
        get_popup_model(_timm(), base_kwargs={"act_layer": torch.nn.GELU})
    with pytest.raises(ValueError, match="constructor arguments of a timm model"):
        get_popup_model(tiny_bert(), base_kwargs={"num_labels": 3})


def test_what_does_not_change_eval_outputs_is_not_structure():
    """Dropout rates, gradient checkpointing and in-place activations leave the network the
    same; other settings (a norm's eps, rotary frequencies) do not."""
    from transformers import LlamaConfig, LlamaForCausalLM

    assert describe_structure(_timm(drop_rate=0.3)) == describe_structure(_timm())
    plain = tiny_llama()
    checkpointed = tiny_llama()
    checkpointed.activation_checkpointing_enable()
    assert describe_structure(checkpointed) == describe_structure(plain)
    config = plain.config.to_dict()
    for change, where in [
        ({"rms_norm_eps": 1e-3}, "rms_norm_eps: 0.001"),
        ({"rope_parameters": {"rope_type": "default", "rope_theta": 500.0}}, "rope_theta: 500.0"),
        ({"hidden_act": "gelu"}, "hidden_act: 'gelu'"),
    ]:
        other = LlamaForCausalLM(LlamaConfig.from_dict({**config, **change}))
        difference = first_difference(describe_structure(other), describe_structure(plain))
        assert difference.startswith("module '<root>' (LlamaForCausalLM):\n  config: here"), change
        assert where in difference
    # a cache filled by a forward is not structure (convit's relative indices, efficientvit's
    # attention biases)
    import timm

    for name, size in [("convit_tiny", 224), ("efficientvit_m0", 224)]:
        used = timm.create_model(name, pretrained=False).eval()
        with torch.no_grad():
            used(torch.randn(1, 3, size, size))
        assert describe_structure(used) == describe_structure(timm.create_model(name))


def test_structure_is_the_same_in_another_process():
    code = (
        "import sys; sys.path.insert(0, 'tests'); from conftest import tiny_llama; "
        "from popup_adapter.structure import describe_structure, structure_fingerprint; "
        "print(structure_fingerprint(describe_structure(tiny_llama())))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == structure_fingerprint(describe_structure(tiny_llama()))


def test_tied_and_shared_are_part_of_the_structure():
    from conftest import tiny_gpt2

    structure = describe_structure(tiny_gpt2())
    assert structure["lm_head"]["tensors"]["weight"].endswith("tied to transformer.wte.weight")
    shared = torch.nn.Sequential(torch.nn.Linear(2, 2))
    shared.add_module("again", shared[0])
    assert describe_structure(shared)["again"] == {"alias of": "0"}


def test_the_base_depends_on_the_seed_and_architecture_not_the_weights_passed_in(tmp_path):
    """A "pretrained" ConvNeXt (trained layer scales) adapted with a random init gets the layer
    scales a fresh build has, so the artifact rebuilt from its spec alone loads (main kept the
    trained values: BaseMismatchError on load). Building the reference leaves the caller's
    global RNG alone."""
    import timm

    def trained_convnext():
        model = timm.create_model("convnext_atto", pretrained=False)
        with torch.no_grad():
            for name, param in model.named_parameters():
                if name.endswith("gamma"):
                    param.uniform_(0.1, 0.5)
        return model

    fresh = get_popup_model(timm.create_model("convnext_atto", pretrained=False), k=0.5)
    trained = trained_convnext()
    state = torch.random.get_rng_state()
    adapted = get_popup_model(trained, k=0.5)
    assert torch.equal(torch.random.get_rng_state(), state)
    gamma = adapted.base_model.stages[0].blocks[0].gamma
    assert torch.equal(gamma, torch.full_like(gamma, 1e-6))
    assert adapted.base_fingerprint == fresh.base_fingerprint
    adapted.save_pretrained(tmp_path / "art")
    loaded = PopupModel.from_pretrained(tmp_path / "art")
    x = torch.randn(1, 3, 64, 64)
    adapted.eval()
    with torch.no_grad():
        assert torch.equal(loaded(x), adapted(x))
