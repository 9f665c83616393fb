"""Shared fixtures: offline Hub, small deterministic models of every supported family."""

import os
import shutil

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")

import pytest
import torch

torch.set_num_threads(min(2, torch.get_num_threads()))

from popup_adapter import kernels  # noqa: E402  (after the environment is set)

has_compiler = shutil.which("c++") is not None and shutil.which("ninja") is not None
#: tests of the compiled kernels themselves (they build where a compiler is)
needs_kernels = pytest.mark.skipif(
    not (has_compiler and kernels.use_kernels()), reason="no C++ compiler or kernels off"
)


#: the devices the device-parametrized tests run on: the CPU, and CUDA where there is one
DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])


@pytest.fixture(params=DEVICES)
def device(request) -> torch.device:
    """Each device of `DEVICES` in turn (layer, selection, seeding and training tests)."""
    return torch.device(request.param)


def tiny_bert():
    from transformers import AutoModelForSequenceClassification, BertConfig

    config = BertConfig(
        vocab_size=100,
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=64,
        max_position_embeddings=64,
        num_labels=3,
    )
    return AutoModelForSequenceClassification.from_config(config)


def tiny_gpt2():
    from transformers import GPT2Config, GPT2LMHeadModel

    return GPT2LMHeadModel(
        GPT2Config(
            vocab_size=100,
            n_positions=64,
            n_embd=32,
            n_layer=2,
            n_head=2,
            bos_token_id=0,
            eos_token_id=0,
        )
    )


def tiny_llama():
    from transformers import LlamaConfig, LlamaForCausalLM

    return LlamaForCausalLM(
        LlamaConfig(
            vocab_size=100,
            hidden_size=32,
            intermediate_size=64,
            num_hidden_layers=2,
            num_attention_heads=4,
            num_key_value_heads=2,
            max_position_embeddings=64,
            bos_token_id=0,
            eos_token_id=0,
            pad_token_id=0,
        )
    )


def timm_model(name):
    import timm

    kwargs = {"img_size": 32} if name.startswith("vit") else {}
    return timm.create_model(name, pretrained=False, **kwargs)


#: name -> (constructor, example input factory)
MODELS = {
    "resnet50": (lambda: timm_model("resnet50"), lambda: torch.randn(2, 3, 32, 32)),
    "efficientnet_b0": (lambda: timm_model("efficientnet_b0"), lambda: torch.randn(2, 3, 32, 32)),
    "convnext_atto": (lambda: timm_model("convnext_atto"), lambda: torch.randn(2, 3, 32, 32)),
    "vit_tiny_patch16_224": (
        lambda: timm_model("vit_tiny_patch16_224"),
        lambda: torch.randn(2, 3, 32, 32),
    ),
    "bert": (tiny_bert, lambda: torch.randint(0, 100, (2, 12))),
    "gpt2": (tiny_gpt2, lambda: torch.randint(0, 100, (2, 12))),
    "llama": (tiny_llama, lambda: torch.randint(0, 100, (2, 12))),
}


def logits(output):
    """The tensor a model returned, whether plain or a transformers ModelOutput."""
    return output if isinstance(output, torch.Tensor) else output.logits


@pytest.fixture
def small_convnet():
    from popup_adapter.convnets import create_conv_net

    return create_conv_net("conv2", width=0.25)


def full_sort_mask(scores: torch.Tensor, kept: int) -> torch.Tensor:
    """The reference top-k: a stable full sort of |scores| (in float64, exact for every
    dtype), ties to the lowest index."""
    order = scores.double().abs().flatten().sort(descending=True, stable=True).indices
    mask = torch.zeros(scores.numel(), dtype=torch.bool)
    mask[order[:kept]] = True
    return mask.view_as(scores)


def score_updates(scores: torch.Tensor, generator: torch.Generator):
    """A training-like sequence of score tensors, as ``(update, scores)``: small drifts, a jump
    far out of any band, drifts, a rescale, exact ties, tiny drifts."""
    updates = [0.001] * 8 + [1.0] + [0.01] * 5 + ["rescale", "ties"] + [0.0001] * 5
    for update in updates:
        if update == "rescale":
            scores = scores * 100
        elif update == "ties":
            scores = scores.round()
        else:
            noise = torch.randn(scores.shape, generator=generator)
            scores = scores + (update * noise).to(scores.dtype)
        yield update, scores
