"""The one training loop every recipe uses, on Accelerate.

Accelerate gives devices, DDP, mixed precision, gradient accumulation and checkpoints; this
module adds what a mask search needs around them, in three short parts
([`train`][popup_adapter.training.train] calls
them in order):

- **set-up** ([`prepare_run`][popup_adapter.training.prepare_run]): the checks that a multi-process
  launch is sound (`popup_adapter.distributed`), the seeded data order and augmentations that make a
  resume exact (`popup_adapter.sampling`), the paper's optimisation of the scores (SGD with momentum
  or AdamW, linear warm-up then cosine, weight decay on the scores, label smoothing, the learning
  rate scaled linearly with the global batch);
- **the loop** ([`run_loop`][popup_adapter.training.run_loop]): steps, evaluation every epoch
  (top-1/top-5 gathered across processes, `popup_adapter.evaluation`), atomic checkpoints
  (`popup_adapter.checkpoints`), a progress bar on the main process, metrics through Accelerate's
  trackers (TensorBoard when installed); the loss is read back from the device only every
  ``log_every`` steps;
- **the save hook** ([`save_result`][popup_adapter.training.save_result]): ``save_pretrained`` of
  the mask (and a Hub push from the main process), or the dense weights of a model that is not a
  PopupModel.
"""

from __future__ import annotations

import importlib.util
import math
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from accelerate import Accelerator
from accelerate.utils import DistributedType, ProjectConfiguration
from huggingface_hub import save_torch_state_dict
from torch import nn
from torch.utils.data import DataLoader, Dataset
from tqdm.auto import tqdm

from .checkpoints import TrainingProgress, latest_checkpoint, save_checkpoint
from .distributed import (
    check_fsdp_plugin,
    check_fsdp_units,
    check_launch,
    check_masks_agree,
    full_parameters,
)
from .errors import ConfigError
from .evaluation import default_forward, evaluate
from .hub import push_artifact_files
from .model import PopupModel
from .optim import SGD
from .sampling import EpochShuffleSampler, SeededDataset, derived_seed, seeded_rngs
from .training_args import TrainingArguments, add_training_arguments

__all__ = [
    "SGD",
    "Run",
    "TrainingArguments",
    "add_training_arguments",
    "default_forward",
    "evaluate",
    "latest_checkpoint",
    "prepare_run",
    "run_loop",
    "save_result",
    "train",
]


def _lr_lambda(warmup_steps: int, total_steps: int) -> Callable[[int], float]:
    def factor(step: int) -> float:
        if step < warmup_steps:
            return (step + 1) / warmup_steps
        progress = (step - warmup_steps) / max(1, total_steps - warmup_steps)
        return 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))

    return factor


@dataclass
class Run:
    """Everything the loop needs, as [`prepare_run`][popup_adapter.training.prepare_run] set it
    up.

    Args:
        accelerator: the run's ``Accelerator`` (processes, mixed precision, checkpoints).
        model: the prepared (possibly DDP-wrapped) model.
        optimizer: the prepared optimizer over what trains.
        scheduler: warmup then cosine, stepped per optimizer step.
        train_loader: the prepared training loader, its order from ``(seed, epoch)``.
        eval_loader: the prepared evaluation loader, or None without an eval dataset.
        seeded: the training dataset, wrapped so each sample's augmentation is seeded.
        steps_per_epoch: optimizer steps in one epoch.
        stop_at: the optimizer step the run ends at.
        log: prints on the main process only.
        progress: the step reached and the metrics per epoch, restored when resuming.
    """

    accelerator: Accelerator
    model: nn.Module
    optimizer: torch.optim.Optimizer
    scheduler: Any
    train_loader: DataLoader
    eval_loader: DataLoader | None
    seeded: SeededDataset
    steps_per_epoch: int
    stop_at: int
    log: Callable[[str], None]
    progress: TrainingProgress = field(default_factory=TrainingProgress)


def _make_accelerator(args: TrainingArguments) -> Accelerator:
    accelerator = Accelerator(
        mixed_precision=args.mixed_precision,
        gradient_accumulation_steps=args.gradient_accumulation_steps,
        log_with="tensorboard" if importlib.util.find_spec("tensorboard") else None,
        project_config=ProjectConfiguration(
            project_dir=args.output_dir, logging_dir=args.output_dir
        ),
    )
    check_launch(accelerator)
    check_fsdp_plugin(accelerator)
    return accelerator


def _make_optimizer(params: list[nn.Parameter], args: TrainingArguments, lr: float):
    if args.optimizer == "sgd" and args.momentum_dtype != "float32":
        return SGD(params, lr, args.momentum, args.weight_decay, state_dtype=args.momentum_dtype)
    if args.optimizer == "sgd":
        return torch.optim.SGD(
            params, lr=lr, momentum=args.momentum, weight_decay=args.weight_decay
        )
    return torch.optim.AdamW(params, lr=lr, weight_decay=args.weight_decay)


def _make_loaders(
    seeded: SeededDataset, eval_dataset: Dataset | None, args: TrainingArguments, collate_fn
) -> tuple[DataLoader, DataLoader | None]:
    """The training loader (seeded order, whole batches) and the evaluation one."""
    loader_kwargs = {"num_workers": args.workers, "collate_fn": collate_fn}
    train_loader = DataLoader(
        seeded,
        batch_size=args.batch_size,
        sampler=EpochShuffleSampler(len(seeded), args.seed),
        drop_last=True,
        **loader_kwargs,
    )
    if eval_dataset is None:
        return train_loader, None
    eval_batch = args.eval_batch_size or args.batch_size
    return train_loader, DataLoader(eval_dataset, batch_size=eval_batch, **loader_kwargs)


def _pack_base(model: nn.Module, accelerator: Accelerator) -> None:
    """``args.pack_base``: the base as sign bits, before Accelerate wraps (or shards) it."""
    if not isinstance(model, PopupModel):
        raise ConfigError("pack_base holds a PopupModel's base as sign bits; this is no PopupModel")
    if accelerator.distributed_type == DistributedType.FSDP:
        raise ConfigError(
            "pack_base keeps a whole base on every process; FSDP shards the base instead. "
            "Drop one of the two"
        )
    model.pack_base()


def prepare_run(
    model: nn.Module,
    train_dataset: Dataset,
    eval_dataset: Dataset | None,
    args: TrainingArguments,
    collate_fn: Callable | None = None,
    log: Callable[[str], None] | None = None,
) -> Run:
    """Set up a run: Accelerate (launch checks included), seeded loaders, the optimizer and the
    schedule, then ``accelerator.prepare`` and, with ``args.resume``, the last checkpoint.

    Args:
        model: as in [`train`][popup_adapter.training.train].
        train_dataset: as in [`train`][popup_adapter.training.train].
        eval_dataset: as in [`train`][popup_adapter.training.train].
        args: as in [`train`][popup_adapter.training.train].
        collate_fn: as in [`train`][popup_adapter.training.train].
        log: as in [`train`][popup_adapter.training.train].

    Returns:
        The [`Run`][popup_adapter.training.Run], its progress restored from the checkpoint when
        resuming.

    Raises:
        RuntimeError: the launch, the FSDP plugin or its units cannot train correctly.
        FileNotFoundError: ``args.resume`` without a checkpoint under ``args.output_dir``.
    """
    accelerator = _make_accelerator(args)
    log_main = (log or tqdm.write) if accelerator.is_main_process else (lambda _: None)
    if args.pack_base:
        _pack_base(model, accelerator)
    log_main(
        f"world size {accelerator.num_processes} ({accelerator.distributed_type}), device "
        f"{accelerator.device}, mixed precision {accelerator.mixed_precision}"
    )
    seeded = SeededDataset(train_dataset, args.seed)
    train_loader, eval_loader = _make_loaders(seeded, eval_dataset, args, collate_fn)

    global_batch = args.batch_size * accelerator.num_processes * args.gradient_accumulation_steps
    lr = args.lr * (global_batch / args.lr_reference_batch if args.lr_reference_batch else 1.0)
    optimizer = _make_optimizer([p for p in model.parameters() if p.requires_grad], args, lr)
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
    run = Run(
        accelerator,
        model,
        optimizer,
        scheduler,
        train_loader,
        eval_loader,
        seeded,
        steps_per_epoch,
        min(total_steps, args.max_train_steps or total_steps),
        log_main,
    )
    accelerator.register_for_checkpointing(run.progress)
    if args.resume:
        checkpoint = latest_checkpoint(args.output_dir)
        if checkpoint is None:
            raise FileNotFoundError(f"resume: no checkpoint under {args.output_dir}/checkpoints")
        accelerator.load_state(str(checkpoint))
        log_main(f"resumed from {checkpoint} at step {run.progress.step}")
    if accelerator.log_with:
        tracked = {k: v for k, v in asdict(args).items() if isinstance(v, (int, float, str, bool))}
        accelerator.init_trackers("popup", config=tracked)
    log_main(
        f"{steps_per_epoch} steps an epoch, {total_steps} in all, global batch "
        f"{global_batch}, lr {lr:g}"
    )
    return run


def _report_step(run: Run, step: int | None) -> None:
    """Tell a PopupModel how far training is (its density ramp; None: training is over)."""
    model = run.accelerator.unwrap_model(run.model)
    if isinstance(model, PopupModel):
        model.update_search(step)


def _train_epoch(run: Run, args: TrainingArguments, forward: Callable, bar) -> None:
    """Optimizer steps until the epoch ends or the run stops, resuming mid-epoch."""
    accelerator, progress = run.accelerator, run.progress
    epoch, done_in_epoch = divmod(progress.step, run.steps_per_epoch)
    run.train_loader.set_epoch(epoch)
    run.seeded.set_epoch(epoch)
    skip = done_in_epoch * args.gradient_accumulation_steps
    loader = accelerator.skip_first_batches(run.train_loader, skip) if skip else run.train_loader
    for batch_index, batch in enumerate(loader, start=skip):
        if batch_index >= run.steps_per_epoch * args.gradient_accumulation_steps:
            break
        # dropout and other in-model randomness: from (seed, step, rank), so a resumed run
        # draws what the uninterrupted one drew
        seed = derived_seed(args.seed, batch_index, epoch, accelerator.process_index)
        _report_step(run, progress.step)
        with seeded_rngs(seed, accelerator.device), accelerator.accumulate(run.model):
            logits, labels = forward(run.model, batch)
            loss = F.cross_entropy(logits.float(), labels, label_smoothing=args.label_smoothing)
            accelerator.backward(loss)
            run.optimizer.step()
            run.scheduler.step()
            run.optimizer.zero_grad()
        if accelerator.sync_gradients:
            progress.step += 1
            bar.update(1)
            if progress.step % args.log_every == 0:
                bar.set_postfix(loss=f"{loss.item():.3f}")
            if progress.step >= run.stop_at:
                return


def run_loop(run: Run, args: TrainingArguments, forward: Callable = default_forward) -> dict:
    """Train until ``run.stop_at``, evaluating and checkpointing at every epoch's end (and a
    checkpoint where ``max_train_steps`` stops the run).

    Args:
        run: from [`prepare_run`][popup_adapter.training.prepare_run].
        args: the run's arguments.
        forward: ``forward(model, batch) -> (logits, labels)``.

    Returns:
        The last evaluation's metrics (``top1``, ``top5``, ``eval_loss``), empty without an
        eval dataset.
    """
    progress = run.progress
    bar = tqdm(
        total=run.stop_at,
        initial=progress.step,
        disable=not run.accelerator.is_local_main_process,
        desc="train",
        mininterval=2.0,
    )
    metrics: dict[str, float] = {}
    run.model.train()
    while progress.step < run.stop_at:
        _train_epoch(run, args, forward, bar)
        if progress.step >= run.stop_at:
            _report_step(run, None)  # the ramp ends with training: evaluate and save at k
        epoch_done = progress.step % run.steps_per_epoch == 0
        if run.eval_loader is not None and epoch_done:
            metrics = evaluate(run.accelerator, run.model, run.eval_loader, forward)
            metrics["epoch"] = progress.step // run.steps_per_epoch
            progress.history.append(metrics)
            run.log(
                f"epoch {metrics['epoch']}: top1 {metrics['top1']:.4f} top5 "
                f"{metrics['top5']:.4f} loss {metrics['eval_loss']:.4f}"
            )
            run.accelerator.log(metrics, step=progress.step)
        if epoch_done or progress.step >= run.stop_at:
            save_checkpoint(run.accelerator, args.output_dir, progress.step, args.keep_checkpoints)
    bar.close()
    if run.eval_loader is not None and not metrics:  # stopped before the first epoch ended
        metrics = evaluate(run.accelerator, run.model, run.eval_loader, forward)
    return {key: value for key, value in metrics.items() if key != "epoch"}


def save_result(run: Run, args: TrainingArguments, metrics: dict[str, float]) -> None:
    """The save hook: a PopupModel's mask artifact to ``args.output_dir`` (pushed to
    ``args.push_to_hub`` when set) once every process has the same masks; a transformers or
    PEFT model through its own ``save_pretrained`` (a PEFT adapter folder); any other model's
    dense weights. Every process takes part (FSDP gathers), the main one writes.

    Args:
        run: the prepared run.
        args: the run's arguments (``output_dir``, ``push_to_hub``, ``dataset_name``).
        metrics: the final evaluation, recorded in the artifact.
    """
    accelerator = run.accelerator
    unwrapped = accelerator.unwrap_model(run.model)
    with full_parameters(run.model):
        if isinstance(unwrapped, PopupModel):
            check_masks_agree(accelerator, unwrapped, run.log)
            files = unwrapped.artifact_files(dataset=args.dataset_name, metrics=metrics)
            if accelerator.is_main_process:
                files.write(args.output_dir)
                if args.push_to_hub:
                    push_artifact_files(files, args.push_to_hub)
        else:
            state = accelerator.get_state_dict(run.model)
            if accelerator.is_main_process and hasattr(unwrapped, "save_pretrained"):
                # transformers and PEFT models: their own format (a PEFT adapter folder)
                unwrapped.save_pretrained(args.output_dir, state_dict=state)
            elif accelerator.is_main_process:
                save_torch_state_dict(state, args.output_dir)
        run.log(f"saved to {args.output_dir}")
        accelerator.wait_for_everyone()


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

    Args:
        model: a [`PopupModel`][popup_adapter.PopupModel] (saved as a mask artifact), a model with
            ``save_pretrained`` (transformers, PEFT: saved with it) or any module (saved as
            ``model.safetensors``).
        train_dataset: map-style; sample ``i`` of epoch ``e`` is drawn under RNGs seeded from
            ``(args.seed, e, i)``.
        eval_dataset: evaluated at every epoch's end (None: never).
        args: what the run does.
        collate_fn: the loaders' collate function.
        forward: ``forward(model, batch) -> (logits, labels)``.
        log: receives the main process's messages (default: printed above the progress bar).

    Returns:
        ``{"metrics", "history", "steps", "world_size", "is_main_process"}``: the final
        evaluation, one per epoch, the optimizer steps taken, and this process's place.
    """
    run = prepare_run(model, train_dataset, eval_dataset, args, collate_fn, log)
    metrics = run_loop(run, args, forward)
    save_result(run, args, metrics)
    run.accelerator.end_training()  # last: it also ends the process group
    return {
        "metrics": metrics,
        "history": run.progress.history,
        "steps": run.progress.step,
        "world_size": run.accelerator.num_processes,
        "is_main_process": run.accelerator.is_main_process,
    }
