"""What a training run does: :class:`TrainingArguments`, and the command-line flags every recipe
shares (transformers keeps its ``TrainingArguments`` in a module of its own too)."""

from __future__ import annotations

import argparse
import dataclasses
from dataclasses import asdict, dataclass
from typing import Any

from .errors import ConfigError


@dataclass
class TrainingArguments:
    """What a training run does; every recipe fills it from its command line."""

    output_dir: str = "out/popup"
    epochs: int = 10
    batch_size: int = 128
    """per process, per step"""
    lr: float = 0.1
    lr_reference_batch: int | None = None
    """scale ``lr`` by global batch / this (the paper: 0.256 for 256); None keeps ``lr``"""
    optimizer: str = "sgd"
    momentum: float = 0.9
    weight_decay: float = 5e-4
    warmup_epochs: float = 0.0
    label_smoothing: float = 0.0
    gradient_accumulation_steps: int = 1
    mixed_precision: str | None = None
    """``"no"``, ``"bf16"`` or ``"fp16"``; None takes the accelerate config's"""
    max_train_steps: int | None = None
    """stop (and checkpoint) after this many optimizer steps"""
    seed: int = 0
    resume: bool = False
    workers: int = 2
    eval_batch_size: int | None = None
    dataset_name: str | None = None
    """recorded in the model card"""
    push_to_hub: str | None = None
    keep_checkpoints: int = 2
    log_every: int = 50
    """read the loss back from the device (a host sync) every this many steps, for the bar"""

    @classmethod
    def from_args(cls, args: argparse.Namespace, **fields: Any) -> TrainingArguments:
        """From a recipe's parsed command line (see :func:`add_training_arguments`): every
        attribute named like a field, then ``fields`` on top.

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
        if self.mixed_precision not in (None, "no", "bf16", "fp16"):
            raise ConfigError(
                f"mixed_precision must be no, bf16 or fp16, got {self.mixed_precision!r}"
            )


def add_training_arguments(parser: argparse.ArgumentParser, **defaults: Any) -> None:
    """Add the command-line flags every recipe shares, with the recipe's own ``defaults``
    (keyword names are the fields of :class:`TrainingArguments`).

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
