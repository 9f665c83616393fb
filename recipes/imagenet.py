"""Search a subnetwork of a random timm model on ImageNet, as in the paper.

    accelerate launch recipes/imagenet.py --data-dir /data/imagenet          # train/ and val/
    accelerate launch recipes/imagenet.py --dataset imagenet-1k --mixed-precision bf16

The defaults reproduce the paper's ImageNet setting for ``--model resnet50 --k 0.3``: SGD with
momentum 0.875, lr 0.256 for a global batch of 256 (scaled linearly), weight decay
3.0517578125e-5 on the scores, 5 warm-up epochs then cosine, 100 epochs, label smoothing 0.1,
signed Kaiming constant init, frozen identity norms.
"""

from __future__ import annotations

import argparse
import os

from torch.utils.data import Dataset

from popup_adapter import INITS, get_popup_model
from popup_adapter.training import TrainingArguments, add_training_arguments, train


class HFImageDataset(Dataset):
    """A ``datasets`` split with ``image`` and ``label`` columns, through a transform."""

    def __init__(self, split, transform) -> None:
        self.split, self.transform = split, transform

    def __len__(self) -> int:
        return len(self.split)

    def __getitem__(self, index: int):
        example = self.split[index]
        return self.transform(example["image"].convert("RGB")), example["label"]


def load_data(args: argparse.Namespace, train_transform, eval_transform):
    """``(train, eval, num_classes)`` from an ImageFolder directory or a ``datasets`` name."""
    if args.data_dir:
        from torchvision.datasets import ImageFolder

        train_set = ImageFolder(os.path.join(args.data_dir, "train"), train_transform)
        eval_set = ImageFolder(os.path.join(args.data_dir, "val"), eval_transform)
        return train_set, eval_set, len(train_set.classes)
    from datasets import load_dataset

    data = load_dataset(args.dataset)
    eval_split = "validation" if "validation" in data else "test"
    num_classes = data["train"].features["label"].num_classes
    return (
        HFImageDataset(data["train"], train_transform),
        HFImageDataset(data[eval_split], eval_transform),
        num_classes,
    )


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--data-dir", help="ImageFolder root with train/ and val/")
    source.add_argument("--dataset", help="a datasets name with image/label columns")
    parser.add_argument("--model", default="resnet50", help="any timm architecture")
    parser.add_argument("--k", type=float, default=0.3, help="fraction of weights KEPT per layer")
    parser.add_argument("--init", default="signed_constant", choices=INITS[:-1])
    parser.add_argument("--scale-fan", action="store_true")
    parser.add_argument("--momentum", type=float, default=0.875)
    parser.add_argument("--warmup-epochs", type=float, default=5)
    parser.add_argument("--label-smoothing", type=float, default=0.1)
    parser.add_argument("--img-size", type=int, default=None, help="default: the model's")
    add_training_arguments(
        parser,
        epochs=100,
        batch_size=256,
        lr=0.256,
        weight_decay=3.0517578125e-5,
        workers=min(8, os.cpu_count() or 1),
        output_dir="out/imagenet-popup",
    )
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> dict:
    import timm
    from timm.data import create_transform, resolve_data_config

    args = parse_args(argv)
    probe = timm.create_model(args.model, pretrained=False)
    overrides = {"input_size": (3, args.img_size, args.img_size)} if args.img_size else {}
    data_config = resolve_data_config(overrides, model=probe)
    train_set, eval_set, num_classes = load_data(
        args, create_transform(**data_config, is_training=True), create_transform(**data_config)
    )
    model = get_popup_model(
        timm.create_model(args.model, pretrained=False, num_classes=num_classes),
        k=args.k,
        init=args.init,
        scale_fan=args.scale_fan,
        seed=args.seed,
    )
    training = TrainingArguments.from_args(
        args,
        lr_reference_batch=256,
        dataset_name=args.dataset or os.path.basename(os.path.normpath(args.data_dir)),
    )
    return train(model, train_set, eval_set, training)


if __name__ == "__main__":
    main()
