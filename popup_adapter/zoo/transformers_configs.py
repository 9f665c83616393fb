"""Tiny configs of the transformers architectures the conformance table checks, and an input
of each kind (text, seq2seq, image, text-image, audio)."""

from __future__ import annotations

from typing import Any

import torch


def _text(**kwargs) -> dict[str, Any]:
    base = dict(
        vocab_size=99,
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=4,
        intermediate_size=37,
        max_position_embeddings=64,
    )
    return {**base, **kwargs}


def _decoder(**kwargs) -> dict[str, Any]:
    return _text(num_key_value_heads=2, bos_token_id=0, eos_token_id=0, pad_token_id=0, **kwargs)


def _seq2seq(**kwargs) -> dict[str, Any]:
    base = dict(
        vocab_size=99,
        d_model=32,
        encoder_layers=2,
        decoder_layers=2,
        encoder_attention_heads=4,
        decoder_attention_heads=4,
        encoder_ffn_dim=37,
        decoder_ffn_dim=37,
        max_position_embeddings=64,
        pad_token_id=1,
        bos_token_id=0,
        eos_token_id=2,
        decoder_start_token_id=2,
    )
    return {**base, **kwargs}


def _vit(**kwargs) -> dict[str, Any]:
    base = dict(
        image_size=32,
        patch_size=8,
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=4,
        intermediate_size=37,
    )
    return {**base, **kwargs}


def _speech(**kwargs) -> dict[str, Any]:
    return _text(
        vocab_size=32,
        conv_dim=(8, 8),
        conv_stride=(4, 4),
        conv_kernel=(8, 8),
        num_conv_pos_embeddings=16,
        num_conv_pos_embedding_groups=2,
        mask_time_prob=0.0,
        layerdrop=0.0,
        **kwargs,
    )


#: expert sizes whose strides the grouped matrix products accept (multiples of 16 bytes)
_MOE = dict(num_experts_per_tok=2, intermediate_size=32)

#: ``name: (model class, config class, config kwargs, input kind)``: tiny configs of
#: encoders, decoders (mixtures of experts among them), encoder-decoders, vision and speech
TRANSFORMERS: dict[str, tuple[str, str, dict[str, Any], str]] = {
    "bert": ("BertForSequenceClassification", "BertConfig", _text(num_labels=3), "text"),
    "roberta": ("RobertaForSequenceClassification", "RobertaConfig", _text(), "text"),
    "xlm-roberta": ("XLMRobertaForSequenceClassification", "XLMRobertaConfig", _text(), "text"),
    "albert": (
        "AlbertForSequenceClassification",
        "AlbertConfig",
        _text(embedding_size=16),
        "text",
    ),
    "deberta-v2": (
        "DebertaV2ForSequenceClassification",
        "DebertaV2Config",
        _text(relative_attention=True, pos_att_type=["p2c", "c2p"]),
        "text",
    ),
    "electra": (
        "ElectraForSequenceClassification",
        "ElectraConfig",
        _text(embedding_size=16),
        "text",
    ),
    "distilbert": (
        "DistilBertForSequenceClassification",
        "DistilBertConfig",
        dict(vocab_size=99, dim=32, n_layers=2, n_heads=4, hidden_dim=37),
        "text",
    ),
    "mpnet": ("MPNetForSequenceClassification", "MPNetConfig", _text(), "text"),
    "gpt2": (
        "GPT2LMHeadModel",
        "GPT2Config",
        dict(vocab_size=99, n_positions=64, n_embd=32, n_layer=2, n_head=4),
        "text",
    ),
    "gpt-neo": (
        "GPTNeoForCausalLM",
        "GPTNeoConfig",
        dict(
            vocab_size=99,
            max_position_embeddings=64,
            hidden_size=32,
            num_layers=2,
            num_heads=4,
            intermediate_size=37,
            attention_types=[[["global", "local"], 1]],
            window_size=8,
        ),
        "text",
    ),
    "gpt-neox": ("GPTNeoXForCausalLM", "GPTNeoXConfig", _text(), "text"),
    "opt": (
        "OPTForCausalLM",
        "OPTConfig",
        dict(
            vocab_size=99,
            hidden_size=32,
            num_hidden_layers=2,
            num_attention_heads=4,
            ffn_dim=37,
            max_position_embeddings=64,
            word_embed_proj_dim=32,
        ),
        "text",
    ),
    "bloom": (
        "BloomForCausalLM",
        "BloomConfig",
        dict(vocab_size=99, hidden_size=32, n_layer=2, n_head=4),
        "text",
    ),
    "falcon": (
        "FalconForCausalLM",
        "FalconConfig",
        dict(vocab_size=99, hidden_size=32, num_hidden_layers=2, num_attention_heads=4),
        "text",
    ),
    "llama": ("LlamaForCausalLM", "LlamaConfig", _decoder(), "text"),
    "mistral": ("MistralForCausalLM", "MistralConfig", _decoder(sliding_window=8), "text"),
    "qwen2": ("Qwen2ForCausalLM", "Qwen2Config", _decoder(), "text"),
    "phi": ("PhiForCausalLM", "PhiConfig", _decoder(), "text"),
    "gemma": ("GemmaForCausalLM", "GemmaConfig", _decoder(head_dim=8), "text"),
    "gemma2": (
        "Gemma2ForCausalLM",
        "Gemma2Config",
        _decoder(head_dim=8, sliding_window=8),
        "text",
    ),
    "mixtral": (
        "MixtralForCausalLM",
        "MixtralConfig",
        _decoder(num_local_experts=4, **_MOE),
        "text",
    ),
    "olmoe": ("OlmoeForCausalLM", "OlmoeConfig", _decoder(num_experts=4, **_MOE), "text"),
    "qwen2-moe": (
        "Qwen2MoeForCausalLM",
        "Qwen2MoeConfig",
        _decoder(
            num_experts=4, moe_intermediate_size=16, shared_expert_intermediate_size=32, **_MOE
        ),
        "text",
    ),
    "t5": (
        "T5ForConditionalGeneration",
        "T5Config",
        dict(
            vocab_size=99,
            d_model=32,
            d_kv=8,
            d_ff=37,
            num_layers=2,
            num_decoder_layers=2,
            num_heads=4,
            decoder_start_token_id=0,
        ),
        "seq2seq",
    ),
    "bart": ("BartForConditionalGeneration", "BartConfig", _seq2seq(), "seq2seq"),
    "pegasus": ("PegasusForConditionalGeneration", "PegasusConfig", _seq2seq(), "seq2seq"),
    "vit": ("ViTForImageClassification", "ViTConfig", _vit(num_labels=3), "image"),
    "dinov2": ("Dinov2ForImageClassification", "Dinov2Config", _vit(mlp_ratio=2), "image"),
    "swin": (
        "SwinForImageClassification",
        "SwinConfig",
        dict(
            image_size=32,
            patch_size=4,
            embed_dim=16,
            depths=[1, 1],
            num_heads=[2, 2],
            window_size=4,
        ),
        "image",
    ),
    "convnext": (
        "ConvNextForImageClassification",
        "ConvNextConfig",
        dict(image_size=32, num_stages=2, hidden_sizes=[8, 16], depths=[1, 1]),
        "image",
    ),
    "resnet": (
        "ResNetForImageClassification",
        "ResNetConfig",
        dict(embedding_size=8, hidden_sizes=[8, 16], depths=[1, 1], layer_type="basic"),
        "image",
    ),
    "whisper": (
        "WhisperForConditionalGeneration",
        "WhisperConfig",
        _seq2seq(
            num_mel_bins=8,
            encoder_layers=1,
            decoder_layers=1,
            max_source_positions=16,
            max_target_positions=32,
            pad_token_id=0,
            bos_token_id=1,
            decoder_start_token_id=1,
        ),
        "audio-features",
    ),
    "wav2vec2": ("Wav2Vec2ForCTC", "Wav2Vec2Config", _speech(), "audio-values"),
    "hubert": ("HubertForCTC", "HubertConfig", _speech(), "audio-values"),
    "clip": (
        "CLIPModel",
        "CLIPConfig",
        dict(text_config=_text(), vision_config=_vit(), projection_dim=16),
        "text-image",
    ),
    "siglip": (
        "SiglipModel",
        "SiglipConfig",
        dict(text_config=_text(), vision_config=_vit()),
        "text-image",
    ),
}


def transformers_inputs(kind: str, generator: torch.Generator) -> dict[str, torch.Tensor]:
    """A batch of two for a model of input ``kind``, drawn from ``generator``.

    Args:
        kind: ``"text"``, ``"seq2seq"``, ``"image"``... (see `TRANSFORMERS`).
        generator: the random source.

    Returns:
        The keyword inputs.

    Raises:
        ValueError: an unknown kind.
    """

    def ids(length: int) -> torch.Tensor:
        return torch.randint(3, 99, (2, length), generator=generator)

    def pixels() -> torch.Tensor:
        return torch.randn(2, 3, 32, 32, generator=generator)

    if kind == "text":
        return {"input_ids": ids(12), "attention_mask": torch.ones(2, 12, dtype=torch.long)}
    if kind == "seq2seq":
        return {"input_ids": ids(12), "decoder_input_ids": ids(5)}
    if kind == "image":
        return {"pixel_values": pixels()}
    if kind == "text-image":
        return {"input_ids": ids(7), "pixel_values": pixels()}
    if kind == "audio-features":
        return {
            "input_features": torch.randn(2, 8, 32, generator=generator),
            "decoder_input_ids": ids(5),
        }
    if kind == "audio-values":
        return {"input_values": torch.randn(2, 1000, generator=generator)}
    raise ValueError(f"unknown input kind {kind!r}")
