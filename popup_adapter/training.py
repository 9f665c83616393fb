"""The one training loop every recipe uses, on Accelerate.

Accelerate gives devices, DDP, mixed precision, gradient accumulation and checkpoints; this
module adds what a mask search needs around them:

- **exact resume**: the data order comes from a sampler seeded by ``(seed, epoch)`` and every
  sample's augmentation from ``(seed, epoch, index)`` (:class:`SeededDataset`), so a run that
  stops anywhere and resumes (``resume=True``) sees the same batches and augmentations and
  ends with the same masks as one that never stopped, whatever the number of loader workers;
- **atomic checkpoints**: ``accelerator.save_state`` writes into a temporary folder that is
  renamed into place, every epoch and when ``max_train_steps`` stops the run;
- the paper's optimisation of the scores: SGD with momentum (or AdamW), linear warm-up then
  cosine, weight decay on the scores, label smoothing, the learning rate scaled linearly with
  the global batch;
- evaluation every epoch, top-1/top-5 gathered across processes, a progress bar on the main
  process, metrics through Accelerate's trackers (TensorBoard when installed);
- at the end, ``save_pretrained`` of the mask (and a Hub push from the main process).
"""

from __future__ import annotations

import argparse
import dataclasses
import hashlib
import importlib.util
import json
import math
import os
import random
import shutil
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, Dataset, Sampler

_CHECKPOINT_PREFIX = "step_"


def derived_seed(*parts: int) -> int:
    """A seed from integers, the same in every process (unlike ``hash`` of a tuple of str)."""
    value = 0
    for part in parts:
        value = (value * 1_000_003 + part) % (2**61 - 1)
    return value


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

    @classmethod
    def from_args(cls, args: argparse.Namespace, **fields: Any) -> TrainingArguments:
        """From a recipe's parsed command line (see :func:`add_training_arguments`): every
        attribute named like a field, then ``fields`` on top."""
        known = {field.name for field in dataclasses.fields(cls)}
        values = {key: value for key, value in vars(args).items() if key in known}
        return cls(**{**values, **fields})

    def __post_init__(self) -> None:
        if self.optimizer not in ("sgd", "adamw"):
            raise ValueError(f"optimizer must be 'sgd' or 'adamw', got {self.optimizer!r}")
        if self.mixed_precision not in (None, "no", "bf16", "fp16"):
            raise ValueError(
                f"mixed_precision must be no, bf16 or fp16, got {self.mixed_precision!r}"
            )


def add_training_arguments(parser: argparse.ArgumentParser, **defaults: Any) -> None:
    """Add the command-line flags every recipe shares, with the recipe's own ``defaults``
    (keyword names are the fields of :class:`TrainingArguments`)."""
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


class SeededDataset(Dataset):
    """Wraps a dataset so that sample ``i`` of epoch ``e`` is drawn with RNGs seeded from
    ``(seed, e, i)``: random augmentations then repeat exactly, in any worker, after a resume."""

    def __init__(self, dataset: Dataset, seed: int) -> None:
        self.dataset, self.seed, self.epoch = dataset, seed, 0

    def set_epoch(self, epoch: int) -> None:
        """Choose the epoch whose augmentations the next samples get."""
        self.epoch = epoch

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, index: int):
        sample_seed = derived_seed(self.seed, self.epoch, index)
        torch.manual_seed(sample_seed)
        random.seed(sample_seed)
        return self.dataset[index]


class EpochShuffleSampler(Sampler[int]):
    """A random permutation per epoch, from ``(seed, epoch)`` alone."""

    def __init__(self, length: int, seed: int) -> None:
        self.length, self.seed, self.epoch = length, seed, 0

    def set_epoch(self, epoch: int) -> None:
        """Choose the epoch whose permutation the next iteration yields."""
        self.epoch = epoch

    def __len__(self) -> int:
        return self.length

    def __iter__(self) -> Iterator[int]:
        generator = torch.Generator().manual_seed(derived_seed(self.seed, self.epoch))
        return iter(torch.randperm(self.length, generator=generator).tolist())


class TrainingProgress:
    """The loop's position, saved with every checkpoint (Accelerate's custom-object protocol)."""

    def __init__(self) -> None:
        self.step = 0
        self.history: list[dict[str, float]] = []

    def state_dict(self) -> dict[str, Any]:
        """The position, as Accelerate's checkpoint stores it."""
        return {"step": self.step, "history": json.dumps(self.history)}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore the position from a checkpoint."""
        self.step, self.history = int(state["step"]), json.loads(state["history"])


def default_forward(model: nn.Module, batch) -> tuple[torch.Tensor, torch.Tensor]:
    """``(logits, labels)`` of a batch: ``(inputs, labels)`` pairs, or a dict with ``labels``
    (transformers style, the rest passed as keyword arguments)."""
    if isinstance(batch, dict):
        inputs = {key: value for key, value in batch.items() if key != "labels"}
        output = model(**inputs)
        return getattr(output, "logits", output), batch["labels"]
    inputs, labels = batch
    return model(inputs), labels


def latest_checkpoint(output_dir: str | Path) -> Path | None:
    """The newest complete checkpoint under ``output_dir/checkpoints`` (temporary ones skipped)."""
    root = Path(output_dir) / "checkpoints"
    done = [
        p
        for p in root.glob(f"{_CHECKPOINT_PREFIX}*")
        if p.name[len(_CHECKPOINT_PREFIX) :].isdigit()
    ]
    return max(done, key=lambda p: int(p.name[len(_CHECKPOINT_PREFIX) :]), default=None)


def _save_checkpoint(accelerator, args: TrainingArguments, step: int) -> None:
    """``save_state`` into a temporary folder, renamed into place when complete."""
    root = Path(args.output_dir) / "checkpoints"
    final = root / f"{_CHECKPOINT_PREFIX}{step}"
    partial = root / f".{final.name}.partial"
    if accelerator.is_main_process:
        shutil.rmtree(partial, ignore_errors=True)
    accelerator.wait_for_everyone()
    accelerator.save_state(str(partial))
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        shutil.rmtree(final, ignore_errors=True)
        partial.rename(final)
        stale = sorted(
            root.glob(f"{_CHECKPOINT_PREFIX}*"),
            key=lambda p: int(p.name[len(_CHECKPOINT_PREFIX) :]),
        )
        for old in stale[: -args.keep_checkpoints]:
            shutil.rmtree(old, ignore_errors=True)
    accelerator.wait_for_everyone()


def _check_launch(accelerator) -> None:
    """Refuse the two silent ways a multi-process launch goes wrong on CPU machines."""
    from accelerate.utils import DistributedType

    launched = int(os.environ.get("WORLD_SIZE", "1"))
    if launched != accelerator.num_processes:
        raise RuntimeError(
            f"{launched} processes were launched but Accelerate runs {accelerator.num_processes} "
            "in its group: they would train unsynchronised. On CPU launch with "
            "ACCELERATE_USE_CPU=1 accelerate launch --multi_gpu --num_processes N"
        )
    fsdp_asked = os.environ.get("ACCELERATE_USE_FSDP", "false").lower() == "true"
    if fsdp_asked and accelerator.distributed_type != DistributedType.FSDP:
        raise RuntimeError(
            f"FSDP was asked for but Accelerate chose {accelerator.distributed_type}: its FSDP "
            "plugin only applies on accelerators (GPU, XPU, ...), never with ACCELERATE_USE_CPU"
        )


def _check_fsdp_plugin(accelerator) -> None:
    """FSDP1 flattens each unit's parameters into one tensor, which must share requires_grad;
    frozen base weights beside trained scores need ``use_orig_params`` (FSDP2 always has it)."""
    from accelerate.utils import DistributedType

    if accelerator.distributed_type != DistributedType.FSDP:
        return
    plugin = accelerator.state.fsdp_plugin
    if plugin.fsdp_version == 1 and not plugin.use_orig_params:
        raise RuntimeError(
            "FSDP1 without use_orig_params cannot shard frozen base weights beside trained "
            "scores: set fsdp_version: 2 (recommended) or fsdp_use_orig_params: true in the "
            "accelerate config"
        )


def check_fsdp_units(model: nn.Module) -> None:
    """Refuse a sharding that splits a masked layer from its base layer.

    A :class:`~popup_adapter.layers.PopupLayer` reads its base layer's weight to compute
    ``W * M`` before the base layer runs (or without calling it, for the plain layers it
    computes itself), so FSDP's hooks on a base layer wrapped as its own unit would gather that
    weight too late, or never. Whole masked layers, or blocks of them, must be the units.
    """
    from .layers import PopupLayer

    try:
        from torch.distributed.fsdp import FSDPModule, FullyShardedDataParallel
    except ImportError:
        return
    for name, module in model.named_modules():
        if isinstance(module, PopupLayer) and isinstance(
            module.base_layer, (FSDPModule, FullyShardedDataParallel)
        ):
            raise RuntimeError(
                f"FSDP wrapped {name}.base_layer as a unit of its own, apart from its scores: "
                "wrap whole masked layers or the model's blocks instead, e.g. "
                "fsdp_auto_wrap_policy: TRANSFORMER_BASED_WRAP with the model's block class "
                "(BertLayer, Bottleneck, ...) or PopupLinear/PopupConv in "
                "fsdp_transformer_layer_cls_to_wrap, not SIZE_BASED_WRAP"
            )


@contextmanager
def full_parameters(model: nn.Module) -> Iterator[None]:
    """Every parameter whole on every process for the duration under FSDP1, whose flat
    parameters no layer can read; nothing to do otherwise.

    A sharded layer's mask is chosen over its whole score tensor, and saving reads every mask:
    all processes must take part in gathering the shards, so they all enter this context and
    then the main process alone saves. FSDP2 needs nothing here: its parameters are DTensors,
    which :func:`~popup_adapter.layers.whole_tensor` gathers where they are read.
    """
    try:
        from torch.distributed.fsdp import FullyShardedDataParallel
    except ImportError:  # torch without distributed support
        yield
        return
    if isinstance(model, FullyShardedDataParallel):
        with FullyShardedDataParallel.summon_full_params(model, writeback=False):
            yield
    else:
        yield


def mask_digest(model) -> str:
    """sha256 of a PopupModel's active masks: equal on every process of a healthy DDP run."""
    digest = hashlib.sha256()
    for name, mask in sorted(model.get_masks().items()):
        digest.update(name.encode())
        digest.update(mask.to("cpu").numpy().tobytes())
    return digest.hexdigest()


def _check_masks_agree(accelerator, model, log: Callable[[str], None]) -> None:
    from accelerate.utils import gather_object

    digests = gather_object([mask_digest(model)])
    if len(set(digests)) != 1:
        raise RuntimeError(
            f"the {len(digests)} processes ended with different masks "
            f"({digests}): the processes did not train in sync"
        )
    log(f"masks identical on all {len(digests)} processes: {digests[0][:16]}")


def _lr_lambda(warmup_steps: int, total_steps: int) -> Callable[[int], float]:
    def factor(step: int) -> float:
        if step < warmup_steps:
            return (step + 1) / warmup_steps
        progress = (step - warmup_steps) / max(1, total_steps - warmup_steps)
        return 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))

    return factor


def _topk_correct(logits: torch.Tensor, labels: torch.Tensor, k: int) -> torch.Tensor:
    k = min(k, logits.shape[-1])
    return (logits.topk(k, dim=-1).indices == labels[:, None]).any(dim=-1)


def evaluate(
    accelerator, model: nn.Module, loader: DataLoader, forward: Callable = default_forward
) -> dict[str, float]:
    """Top-1 and top-5 accuracy and mean loss over ``loader``, gathered across processes."""
    model.eval()
    top1, top5, losses = [], [], []
    with torch.no_grad():
        for batch in loader:
            logits, labels = forward(model, batch)
            loss = F.cross_entropy(logits.float(), labels, reduction="none")
            logits, labels, loss = accelerator.gather_for_metrics((logits, labels, loss))
            top1.append(_topk_correct(logits, labels, 1))
            top5.append(_topk_correct(logits, labels, 5))
            losses.append(loss)
    model.train()
    return {
        "top1": torch.cat(top1).float().mean().item(),
        "top5": torch.cat(top5).float().mean().item(),
        "eval_loss": torch.cat(losses).mean().item(),
    }


def train(
    model: nn.Module,
    train_dataset: Dataset,
    eval_dataset: Dataset | None,
    args: TrainingArguments,
    collate_fn: Callable | None = None,
    forward: Callable = default_forward,
    log: Callable[[str], None] | None = None,
) -> dict[str, Any]:
    """Train ``model``'s trainable parameters (a PopupModel's scores, or a dense model) and save.

    Returns the final metrics. A :class:`~popup_adapter.PopupModel` is saved as a mask artifact
    to ``args.output_dir``; any other model as ``model.safetensors`` there. ``log`` receives the
    main process's messages (default: printed above the progress bar).
    """
    from accelerate import Accelerator
    from accelerate.utils import ProjectConfiguration, set_seed
    from huggingface_hub import save_torch_state_dict
    from tqdm.auto import tqdm

    from .artifact import collect_artifact
    from .hub import push_artifact_files
    from .model import PopupModel

    log_with = "tensorboard" if importlib.util.find_spec("tensorboard") else None
    accelerator = Accelerator(
        mixed_precision=args.mixed_precision,
        gradient_accumulation_steps=args.gradient_accumulation_steps,
        log_with=log_with,
        project_config=ProjectConfiguration(
            project_dir=args.output_dir, logging_dir=args.output_dir
        ),
    )
    set_seed(args.seed)
    _check_launch(accelerator)
    _check_fsdp_plugin(accelerator)
    log_main = (log or tqdm.write) if accelerator.is_main_process else (lambda _: None)
    log_main(
        f"world size {accelerator.num_processes} ({accelerator.distributed_type}), device "
        f"{accelerator.device}, mixed precision {accelerator.mixed_precision}"
    )

    seeded = SeededDataset(train_dataset, args.seed)
    sampler = EpochShuffleSampler(len(seeded), args.seed)
    loader_kwargs = {
        "num_workers": args.workers,
        "collate_fn": collate_fn,
        "persistent_workers": False,
    }
    train_loader = DataLoader(
        seeded, batch_size=args.batch_size, sampler=sampler, drop_last=True, **loader_kwargs
    )
    eval_loader = None
    if eval_dataset is not None:
        eval_loader = DataLoader(
            eval_dataset, batch_size=args.eval_batch_size or args.batch_size, **loader_kwargs
        )

    global_batch = args.batch_size * accelerator.num_processes * args.gradient_accumulation_steps
    lr = args.lr * (global_batch / args.lr_reference_batch if args.lr_reference_batch else 1.0)
    params = [p for p in model.parameters() if p.requires_grad]
    if args.optimizer == "sgd":
        optimizer = torch.optim.SGD(
            params, lr=lr, momentum=args.momentum, weight_decay=args.weight_decay
        )
    else:
        optimizer = torch.optim.AdamW(params, lr=lr, weight_decay=args.weight_decay)
    # steps are optimizer steps; each process sees len(loader) / num_processes batches
    batches_per_epoch = len(train_loader) // accelerator.num_processes
    steps_per_epoch = max(1, batches_per_epoch // args.gradient_accumulation_steps)
    total_steps = args.epochs * steps_per_epoch
    warmup = round(args.warmup_epochs * steps_per_epoch)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, _lr_lambda(warmup, total_steps))

    model, optimizer, train_loader, scheduler = accelerator.prepare(
        model, optimizer, train_loader, scheduler
    )
    check_fsdp_units(model)
    if eval_loader is not None:
        eval_loader = accelerator.prepare(eval_loader)
    progress = TrainingProgress()
    accelerator.register_for_checkpointing(progress)
    if args.resume:
        checkpoint = latest_checkpoint(args.output_dir)
        if checkpoint is None:
            raise FileNotFoundError(f"resume: no checkpoint under {args.output_dir}/checkpoints")
        accelerator.load_state(str(checkpoint))
        log_main(f"resumed from {checkpoint} at step {progress.step}")
    if log_with:
        accelerator.init_trackers(
            "popup",
            config={
                k: v for k, v in asdict(args).items() if isinstance(v, (int, float, str, bool))
            },
        )
    log_main(
        f"{steps_per_epoch} steps an epoch, {total_steps} in all, global batch "
        f"{global_batch}, lr {lr:g}"
    )

    stop_at = min(total_steps, args.max_train_steps or total_steps)
    bar = tqdm(
        total=stop_at,
        initial=progress.step,
        disable=not accelerator.is_local_main_process,
        desc="train",
        mininterval=2.0,
    )
    metrics: dict[str, float] = {}
    model.train()
    while progress.step < stop_at:
        epoch, done_in_epoch = divmod(progress.step, steps_per_epoch)
        train_loader.set_epoch(epoch)
        seeded.set_epoch(epoch)
        skip = done_in_epoch * args.gradient_accumulation_steps
        epoch_loader = accelerator.skip_first_batches(train_loader, skip) if skip else train_loader
        for batch_index, batch in enumerate(epoch_loader, start=skip):
            if batch_index >= steps_per_epoch * args.gradient_accumulation_steps:
                break
            # dropout and other in-model randomness: from (seed, step, rank), so a resumed run
            # draws what the uninterrupted one drew
            torch.manual_seed(
                derived_seed(args.seed, batch_index, epoch, accelerator.process_index)
            )
            with accelerator.accumulate(model):
                logits, labels = forward(model, batch)
                loss = F.cross_entropy(logits.float(), labels, label_smoothing=args.label_smoothing)
                accelerator.backward(loss)
                optimizer.step()
                scheduler.step()
                optimizer.zero_grad()
            if accelerator.sync_gradients:
                progress.step += 1
                bar.update(1)
                bar.set_postfix(loss=f"{loss.item():.3f}")
                if progress.step >= stop_at:
                    break
        epoch_done = progress.step % steps_per_epoch == 0
        if epoch_done or progress.step >= stop_at:
            if eval_loader is not None and epoch_done:
                metrics = evaluate(accelerator, model, eval_loader, forward)
                metrics["epoch"] = progress.step // steps_per_epoch
                progress.history.append(metrics)
                log_main(
                    f"epoch {metrics['epoch']}: top1 {metrics['top1']:.4f} top5 "
                    f"{metrics['top5']:.4f} loss {metrics['eval_loss']:.4f}"
                )
                accelerator.log(metrics, step=progress.step)
            _save_checkpoint(accelerator, args, progress.step)
    bar.close()
    if eval_loader is not None and not metrics:  # stopped before the first epoch ended
        metrics = evaluate(accelerator, model, eval_loader, forward)

    unwrapped = accelerator.unwrap_model(model)
    final = {key: value for key, value in metrics.items() if key != "epoch"}
    # every process gathers (sharded tensors under FSDP), then the main one writes and pushes
    with full_parameters(model):
        if isinstance(unwrapped, PopupModel):
            _check_masks_agree(accelerator, unwrapped, log_main)
            files = collect_artifact(unwrapped, dataset=args.dataset_name, metrics=final)
            if accelerator.is_main_process:
                files.write(args.output_dir)
                if args.push_to_hub:
                    push_artifact_files(files, args.push_to_hub)
        else:
            state = accelerator.get_state_dict(model)
            if accelerator.is_main_process:
                save_torch_state_dict(state, args.output_dir)
        log_main(f"saved to {args.output_dir}")
        accelerator.wait_for_everyone()
    accelerator.end_training()  # last: it also ends the process group
    return {
        "metrics": final,
        "history": progress.history,
        "steps": progress.step,
        "world_size": accelerator.num_processes,
        "is_main_process": accelerator.is_main_process,
    }
