"""The models and inputs the benchmarks share (small enough for 2 CPU cores)."""

from __future__ import annotations

import torch


def build(name: str):
    """``(model, make_batch)`` for a benchmark model name; the batch is ``(inputs, labels)``."""
    if name in ("resnet18", "resnet50", "vit"):
        import timm

        arch = {"vit": "vit_small_patch16_224"}.get(name, name)
        kwargs = {"img_size": 64} if name == "vit" else {}
        model = timm.create_model(arch, pretrained=False, num_classes=100, **kwargs)
        return model, lambda: (torch.randn(32, 3, 64, 64), torch.randint(0, 100, (32,)))
    from transformers import (
        BertConfig,
        BertForSequenceClassification,
        GPT2Config,
        GPT2ForSequenceClassification,
    )

    if name == "bert":
        config = BertConfig(
            hidden_size=256,
            num_hidden_layers=4,
            num_attention_heads=4,
            intermediate_size=1024,
            num_labels=2,
        )
        model = BertForSequenceClassification(config)
    elif name == "gpt2":
        config = GPT2Config(n_embd=256, n_layer=4, n_head=4, num_labels=2, pad_token_id=0)
        model = GPT2ForSequenceClassification(config)
    else:
        raise ValueError(f"unknown benchmark model {name!r}")
    return model, lambda: (torch.randint(0, 1000, (8, 128)), torch.randint(0, 2, (8,)))


def logits_of(output) -> torch.Tensor:
    return output if isinstance(output, torch.Tensor) else output.logits
