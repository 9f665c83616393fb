"""A popup mask and PEFT's adapters on one base: what works (mask, merge, then PEFT on top; or
PEFT merged, then a mask) gives outputs equal to the adapted models', and what cannot work is
refused with the reason."""

import pytest
import torch
from conftest import tiny_bert

from popup_adapter import AdapterError, get_popup_model

peft = pytest.importorskip("peft")
X = torch.randint(0, 100, (2, 12), generator=torch.Generator().manual_seed(0))


def logits(model):
    with torch.no_grad():
        return model.eval()(input_ids=X).logits


def lora(model):
    config = peft.LoraConfig(task_type="SEQ_CLS", r=4, target_modules=["query", "value"])
    return peft.get_peft_model(model, config)


def train_step(model):
    optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.5)
    model.train()(input_ids=X).logits.square().mean().backward()
    optimizer.step()


def test_lora_on_top_of_a_merged_mask_and_both_merges_are_exact():
    masked = get_popup_model(tiny_bert(), k=0.5, modules_to_save=["classifier"])
    train_step(masked)
    expected = logits(masked)
    merged = masked.merge_and_unload()
    assert torch.equal(logits(merged), expected)
    adapted = lora(merged)
    assert torch.equal(logits(adapted), expected)  # LoRA starts as the identity (B = 0)
    train_step(adapted)
    with_lora = logits(adapted)
    assert not torch.allclose(with_lora, expected)
    # LoRA's merge adds B @ A into the weight: equal up to float rounding, as PEFT promises
    torch.testing.assert_close(logits(adapted.merge_and_unload()), with_lora)


def test_a_mask_over_a_merged_lora_model():
    adapted = lora(tiny_bert())
    train_step(adapted)
    masked = get_popup_model(adapted.merge_and_unload(), k=0.5, init="keep")
    train_step(masked)
    expected = logits(masked)
    assert torch.equal(logits(masked.merge_and_unload()), expected)


def test_a_mask_over_unmerged_peft_adapters_is_refused():
    with pytest.raises(AdapterError, match=r"carries PEFT adapters.*merge_and_unload"):
        get_popup_model(lora(tiny_bert()), k=0.5)


def test_peft_over_popup_layers_is_refused_by_peft():
    """PEFT does not know the masked layers' type: it refuses them by name, it does not wrap
    something it cannot compute."""
    masked = get_popup_model(tiny_bert(), k=0.5)
    with pytest.raises(ValueError, match="not supported"):
        lora(masked)
