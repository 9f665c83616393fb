"""What a training run does: [`TrainingArguments`][popup_adapter.training.TrainingArguments], and
the command-line flags every recipe shares (transformers keeps its ``TrainingArguments`` in a module
of its own too)."""

from __future__ import annotations

import argparse
import dataclasses
from dataclasses import asdict, dataclass
from typing import Any

from .errors import ConfigError


@dataclass
class TrainingArguments:
    """What a training run does; every recipe fills it from its command line.

    The names follow transformers' ``TrainingArguments`` where the two share a meaning
    (``output_dir``, ``seed``, ``push_to_hub``, ``gradient_accumulation_steps``, ...). The
    defaults are the paper's optimisation of the scores: SGD, momentum 0.9, weight decay 5e-4.

    Args:
        output_dir: where the artifact (or, for a plain model, its weights), the checkpoints and
            the logs are written.
        epochs: passes over the training data.
        batch_size: samples per process and optimizer step (before gradient accumulation).
        lr: peak learning rate, reached after the warmup and followed by a cosine decay to 0.
        lr_reference_batch: scale ``lr`` linearly by global batch / this (the paper: lr 0.256 for
            a batch of 256); None uses ``lr`` as given.
        optimizer: ``"sgd"`` (with ``momentum``) or ``"adamw"``.
        momentum: SGD's momentum.
        momentum_dtype: what SGD holds its momentum in: ``"float32"`` (``torch.optim.SGD``) or
            ``"bfloat16"`` ([`SGD`][popup_adapter.training.SGD], half the
            memory of that state).
        weight_decay: applied to what trains (the scores, and any ``modules_to_save``).
        warmup_epochs: linear warmup from 0, in epochs (fractions allowed).
        label_smoothing: of the cross-entropy loss.
        gradient_accumulation_steps: batches per optimizer step.
        mixed_precision: ``"no"``, ``"bf16"`` or ``"fp16"`` autocast (the scores stay float32);
            None takes the Accelerate config's.
        max_train_steps: stop (and checkpoint) after this many optimizer steps; None trains
            every epoch.
        seed: the data order, augmentations and any dropout derive from it, so a resumed run
            equals one that never stopped (the random base has its own seed, in the config).
        resume: continue from the latest checkpoint under ``output_dir``.
        workers: ``DataLoader`` worker processes (0 loads in the main process).
        eval_batch_size: batch size of evaluation; None uses ``batch_size``.
        dataset_name: recorded in the model card and the artifact.
        push_to_hub: a Hub repo id to push the saved artifact to; None saves locally only.
        keep_checkpoints: how many of the latest checkpoints to keep.
        log_every: read the loss back from the device (a host sync) every this many steps, for
            the progress bar.
        pack_base: hold the signed-constant base as sign bits while training
            ([`PopupModel.pack_base`][popup_adapter.PopupModel.pack_base]): the same masks in
            less memory than dense training.
    """

    output_dir: str = "out/popup"
    epochs: int = 10
    batch_size: int = 128
    lr: float = 0.1
    lr_reference_batch: int | None = None
    optimizer: str = "sgd"
    momentum: float = 0.9
    momentum_dtype: str = "float32"
    weight_decay: float = 5e-4
    warmup_epochs: float = 0.0
    label_smoothing: float = 0.0
    gradient_accumulation_steps: int = 1
    mixed_precision: str | None = None
    max_train_steps: int | None = None
    seed: int = 0
    resume: bool = False
    workers: int = 2
    eval_batch_size: int | None = None
    dataset_name: str | None = None
    push_to_hub: str | None = None
    keep_checkpoints: int = 2
    log_every: int = 50
    pack_base: bool = False

    @classmethod
    def from_args(cls, args: argparse.Namespace, **fields: Any) -> TrainingArguments:
        """From a recipe's parsed command line (see
        [`add_training_arguments`][popup_adapter.training.add_training_arguments]): every attribute
        named like a field, then ``fields`` on top.

        Args:
            args: the parsed command line.
            **fields: fields set on top.

        Returns:
            The arguments.
        """
        known = {field.name for field in dataclasses.fields(cls)}
        values = {key: value for key, value in vars(args).items() if key in known}
        return cls(**{**values, **fields})

    def __post_init__(self) -> None:
        if self.optimizer not in ("sgd", "adamw"):
            raise ConfigError(f"optimizer must be 'sgd' or 'adamw', got {self.optimizer!r}")
        if self.momentum_dtype not in ("float32", "bfloat16"):
            raise ConfigError(
                f"momentum_dtype must be float32 or bfloat16, got {self.momentum_dtype!r}"
            )
        if self.momentum_dtype != "float32" and self.optimizer != "sgd":
            raise ConfigError("momentum_dtype is SGD's; adamw keeps its moments in float32")
        if self.mixed_precision not in (None, "no", "bf16", "fp16"):
            raise ConfigError(
                f"mixed_precision must be no, bf16 or fp16, got {self.mixed_precision!r}"
            )


def add_training_arguments(parser: argparse.ArgumentParser, **defaults: Any) -> None:
    """Add the command-line flags every recipe shares, with the recipe's own ``defaults``
    (keyword names are the fields of
    [`TrainingArguments`][popup_adapter.training.TrainingArguments]).

    Args:
        parser: the recipe's parser.
        **defaults: the recipe's defaults, by field name.
    """
    base = {**asdict(TrainingArguments()), **defaults}
    parser.add_argument("--epochs", type=int, default=base["epochs"])
    parser.add_argument("--batch-size", type=int, default=base["batch_size"], help="per process")
    parser.add_argument("--lr", type=float, default=base["lr"])
    parser.add_argument("--weight-decay", type=float, default=base["weight_decay"])
    parser.add_argument(
        "--gradient-accumulation-steps", type=int, default=base["gradient_accumulation_steps"]
    )
    parser.add_argument(
        "--mixed-precision", default=base["mixed_precision"], choices=["no", "bf16", "fp16"]
    )
    parser.add_argument(
        "--max-train-steps",
        type=int,
        default=base["max_train_steps"],
        help="stop (and checkpoint) after this many optimizer steps",
    )
    parser.add_argument("--resume", action="store_true", help="continue from the last checkpoint")
    parser.add_argument("--seed", type=int, default=base["seed"])
    parser.add_argument("--workers", type=int, default=base["workers"])
    parser.add_argument("--output-dir", default=base["output_dir"])
    parser.add_argument("--push-to-hub", default=base["push_to_hub"], metavar="REPO")
    parser.add_argument(
        "--momentum-dtype",
        default=base["momentum_dtype"],
        choices=["float32", "bfloat16"],
        help="what SGD holds its momentum in (bfloat16: half that memory)",
    )
    parser.add_argument(
        "--pack-base",
        action="store_true",
        default=base["pack_base"],
        help="hold the signed-constant base as sign bits (the same masks, less memory)",
    )
