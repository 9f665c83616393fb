"""Many masks over one backbone: what a served adapter holds, what switching costs, and what a
mixed batch (one adapter per sample) costs against a single-adapter batch.

    python benchmarks/adapters.py [--models resnet50,bert-base] [--adapters 4] [--rounds 5]

resnet50 (224x224, ImageNet head, batch 8) and BERT-base (transformers' default config,
sequences of 128, batch 8), k=0.3, with ``--adapters`` adapters of distinct random masks, each
served (`PopupModel.serve_adapter`: its masks bit-packed, no scores).

- memory per adapter (`PopupModel.adapter_nbytes`): what a served adapter holds (packed
  masks, its BatchNorm statistics) against the same adapter given scores to train;
- ``set_adapter``: between served adapters (unmerged: nothing is written), and with the active
  one merged (``merge_adapter`` after the switch: the previous unmerged, W regenerated from
  the seed, then the new ``W * M`` written);
- a mixed batch: ``model(x, adapter_names=...)`` over the adapters, the samples spread evenly,
  against ``model(x)`` with one served adapter active (the same per-forward ``W * M``) and
  with it merged (the plain model's cost), timed interleaved in one process under
  ``torch.inference_mode`` (medians of ``--rounds``).
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from popup_adapter import PopupConfig, get_popup_model


def build(name: str):
    """``(model, batch)`` for a benchmark name."""
    if name == "resnet50":
        import timm

        return timm.create_model("resnet50", pretrained=False), torch.randn(8, 3, 224, 224)
    from transformers import BertConfig, BertForSequenceClassification

    model = BertForSequenceClassification(BertConfig(num_labels=2))
    return model, torch.randint(0, 30522, (8, 128))


def adapted(name: str, adapters: int):
    """The model with ``adapters`` served adapters of distinct random masks."""
    plain, batch = build(name)
    model = get_popup_model(plain, k=0.3, adapter_name="task0")
    generator = torch.Generator().manual_seed(0)
    for index in range(1, adapters):
        model.add_adapter(f"task{index}", PopupConfig(k=0.3))
    with torch.no_grad():
        for adapter in model.peft_config:
            for _, layer in model.popup_layers():
                scores = layer.popup_scores[adapter]
                scores.copy_(torch.randn(scores.shape, generator=generator))
            model.serve_adapter(adapter)
    return model.eval(), batch


def seconds(call) -> float:
    start = time.perf_counter()
    call()
    return time.perf_counter() - start


def report(name: str, adapters: int, rounds: int) -> None:
    """Print one model's figures."""
    model, x = adapted(name, adapters)
    names = [f"task{i % adapters}" for i in range(x.shape[0])]
    served = model.adapter_nbytes("task1")
    model.set_trainable(True, "task1")  # the same adapter, given scores to train
    training = model.adapter_nbytes("task1")
    model.serve_adapter("task1")
    model.eval()
    print(
        f"{name}: served adapter {served / 2**20:.2f} MiB, the same adapter training "
        f"{training / 2**20:.1f} MiB ({training / served:.0f}x)"
    )
    switch = [
        seconds(lambda i=i: model.set_adapter(f"task{i % adapters}"))
        for i in range(1, 2 * rounds + 1)
    ]

    def merged_switch(i: int) -> None:
        model.set_adapter(f"task{i % adapters}")
        model.merge_adapter()

    switch_merged = [seconds(lambda i=i: merged_switch(i)) for i in range(1, rounds + 1)]
    model.unmerge_adapter()
    model.set_adapter("task0")
    print(
        f"  set_adapter: served {statistics.median(switch) * 1e3:.2f} ms, "
        f"served and merged {statistics.median(switch_merged):.3f} s"
    )
    times = {"mixed": [], "one adapter": [], "one merged": []}
    with torch.inference_mode():
        model(x)  # warm-up
        for _ in range(rounds):
            times["mixed"].append(seconds(lambda: model(x, adapter_names=names)))
            times["one adapter"].append(seconds(lambda: model(x)))
            model.merge_adapter()
            times["one merged"].append(seconds(lambda: model(x)))
            model.unmerge_adapter()
    medians = {key: statistics.median(value) for key, value in times.items()}
    print(
        f"  batch of {x.shape[0]}: mixed over {adapters} adapters "
        f"{medians['mixed']:.3f} s, one served adapter {medians['one adapter']:.3f} s "
        f"(mixed/one {medians['mixed'] / medians['one adapter']:.2f}x), one merged "
        f"{medians['one merged']:.3f} s (mixed/merged "
        f"{medians['mixed'] / medians['one merged']:.2f}x)"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--models", default="resnet50,bert-base")
    parser.add_argument("--adapters", type=int, default=4)
    parser.add_argument("--rounds", type=int, default=5)
    args = parser.parse_args()
    torch.manual_seed(0)
    print(f"{torch.get_num_threads()} threads, {args.adapters} adapters, k=0.3")
    for name in args.models.split(","):
        report(name, args.adapters, args.rounds)


if __name__ == "__main__":
    main()
