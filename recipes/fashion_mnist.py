"""Search a subnetwork of a random Conv network on Fashion-MNIST: the README's main job.

    python recipes/fashion_mnist.py                       # defaults: minutes on 2 CPU cores
    accelerate launch recipes/fashion_mnist.py --model conv6 --width 1 --epochs 20
    python recipes/fashion_mnist.py --model resnet18      # a timm model with in_chans=1

Prints the test accuracy every epoch and ends with the mask artifact saved to --output-dir.
"""

from __future__ import annotations

import argparse
import time

from data import load_fashion_mnist

from popup_adapter import INITS, get_popup_model
from popup_adapter.convnets import create_conv_net
from popup_adapter.training import TrainingArguments, add_training_arguments, train


def build_model(name: str, width: float):
    """The paper's ConvX (conv2/conv4/conv6) adapted to 28x28, or any timm model."""
    if name.startswith("conv"):
        return create_conv_net(name, width=width)
    import timm

    return timm.create_model(name, pretrained=False, in_chans=1, num_classes=10)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="conv4", help="conv2, conv4, conv6 or a timm model")
    parser.add_argument("--width", type=float, default=0.5, help="channel multiplier of ConvX")
    parser.add_argument("--k", type=float, default=0.5, help="fraction of weights KEPT per layer")
    parser.add_argument("--init", default="signed_constant", choices=INITS[:-1])
    parser.add_argument("--scale-fan", action="store_true")
    parser.add_argument(
        "--train-limit", type=int, default=None, help="use only the first N training images"
    )
    parser.add_argument(
        "--dense", action="store_true", help="train the same network densely instead (baseline)"
    )
    add_training_arguments(
        parser,
        epochs=3,
        batch_size=128,
        lr=0.1,
        weight_decay=5e-4,
        workers=0,
        output_dir="out/fashion-mnist-popup",
    )
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    model = build_model(args.model, args.width)
    if not args.dense:
        model = get_popup_model(
            model, k=args.k, init=args.init, scale_fan=args.scale_fan, seed=args.seed
        )
        model.print_trainable_parameters()
    training = TrainingArguments.from_args(args, eval_batch_size=1000, dataset_name="fashion_mnist")
    start = time.perf_counter()
    result = train(
        model, load_fashion_mnist("train", args.train_limit), load_fashion_mnist("test"), training
    )
    if result["is_main_process"]:
        print(
            f"test accuracy {result['metrics']['top1']:.4f} after {result['steps']} steps "
            f"({args.epochs} epochs, k={args.k}) in {time.perf_counter() - start:.0f} s"
        )
    return result


if __name__ == "__main__":
    main()
