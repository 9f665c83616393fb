"""A popup training step against a dense training step, and against the reference full sort.

    python benchmarks/train_step.py [--models resnet18,resnet50,vit,bert,gpt2] [--rounds 7]
    python benchmarks/train_step.py --memory          # peak RSS of each variant, own process
    python benchmarks/train_step.py --device cuda --bf16   # on a GPU, under bf16 autocast

A step is forward + backward + SGD (momentum) step. The three variants of each model are timed
interleaved, round after round, in one process (medians and min-max spread):

- ``dense``: the plain model, every weight trained (the floor: the same gradients are computed);
- ``popup``: ``get_popup_model(model, k=0.5)``, only scores train, popup_adapter's selection
  (the fused CPU kernels when they are built);
- ``packed``: the same popup model after ``pack_base()``: the base held as sign bits (one bit
  per weight, the kernels expand ``+-c``);
- ``lean``: ``packed`` with the scores' momentum in bfloat16 (`popup_adapter.optim.SGD`,
  ``--pack-base --momentum-dtype bfloat16`` in the recipes);
- ``kept``: the same popup step with ``W * M`` kept for the backward (autograd's default), as
  before it was written again there: what that saves in memory costs this in time;
- ``eager``: the same popup model with each layer's ``use_kernels`` off (as
  ``POPUP_ADAPTER_KERNELS=0`` builds them): the same selection in plain torch operations, to
  show what the kernels bring;
- ``sort``: the same popup model with the reference implementation's selection (a full sort of
  every layer's scores on every forward), carried here as the baseline.

With ``--memory`` each variant runs in a fresh process and reports its peak RSS minus its RSS
right after imports (so the model, its gradients and optimizer state all count); on CUDA, the
peak its allocator reports.
"""

from __future__ import annotations

import argparse
import json
import resource
import statistics
import subprocess
import sys
import time
from contextlib import contextmanager, nullcontext
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).parent))
from _models import build, logits_of

from popup_adapter import get_popup_model
from popup_adapter import layers as popup_layers
from popup_adapter.optim import SGD


class ReferenceSortMask(torch.autograd.Function):
    """The reference implementation's GetSubnet: sort all |scores|, keep the top ``kept``."""

    @staticmethod
    def forward(ctx, weight, scores, kept, state=None, single_use=False, fused=None, binary=False):
        out = scores.detach().abs().clone()
        _, idx = out.flatten().sort()
        flat = out.flatten()
        flat[idx[: flat.numel() - kept]] = 0
        flat[idx[flat.numel() - kept :]] = 1
        ctx.save_for_backward(weight, scores)
        return weight * out

    @staticmethod
    def backward(ctx, grad):
        weight, scores = ctx.saved_tensors
        return None, grad * weight * scores.sign(), None, None, None, None, None


@contextmanager
def reference_selection():
    original = popup_layers.masked_weight
    popup_layers.masked_weight = ReferenceSortMask.apply
    try:
        yield
    finally:
        popup_layers.masked_weight = original


@contextmanager
def masked_weight_kept():
    """The popup step as before ``W * M`` was written again in the backward: autograd keeps it."""
    original = popup_layers.masked_weight_recipe
    popup_layers.masked_weight_recipe = lambda *args, **kwargs: None
    try:
        yield
    finally:
        popup_layers.masked_weight_recipe = original


@contextmanager
def kernels_off(model):
    """The same layers with their captured kernels setting turned off."""
    layers = [layer for _, layer in model.popup_layers()]
    previous = [layer.use_kernels for layer in layers]
    for layer in layers:
        layer.use_kernels = False
    try:
        yield
    finally:
        for layer, setting in zip(layers, previous, strict=True):
            layer.use_kernels = setting


def make_step(model, make_batch, device="cpu", bf16=False, momentum_dtype="float32"):
    params = [p for p in model.parameters() if p.requires_grad]
    if momentum_dtype == "float32":
        optimizer = torch.optim.SGD(params, lr=0.01, momentum=0.9)
    else:
        optimizer = SGD(params, lr=0.01, momentum=0.9, state_dtype=momentum_dtype)
    inputs, labels = (t.to(device) for t in make_batch())
    autocast = (lambda: torch.autocast(device, torch.bfloat16)) if bf16 else nullcontext

    def step():
        with autocast():
            loss = F.cross_entropy(logits_of(model(inputs)), labels)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    return step


def variants(name: str, device: str = "cpu", bf16: bool = False):
    dense, make_batch = build(name)
    popup = get_popup_model(build(name)[0], k=0.5)
    packed = get_popup_model(build(name)[0], k=0.5).pack_base().to(device).train()
    lean = get_popup_model(build(name)[0], k=0.5).pack_base().to(device).train()
    dense, popup = dense.to(device).train(), popup.to(device).train()
    return {
        "dense": (make_step(dense, make_batch, device, bf16), nullcontext),
        "popup": (make_step(popup, make_batch, device, bf16), nullcontext),
        "packed": (make_step(packed, make_batch, device, bf16), nullcontext),
        "lean": (make_step(lean, make_batch, device, bf16, "bfloat16"), nullcontext),
        "kept": (make_step(popup, make_batch, device, bf16), masked_weight_kept),
        "eager": (make_step(popup, make_batch, device, bf16), lambda: kernels_off(popup)),
        "sort": (make_step(popup, make_batch, device, bf16), reference_selection),
    }


def synchronize(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def time_model(
    name: str, rounds: int, steps: int, device: str = "cpu", bf16: bool = False
) -> dict[str, list[float]]:
    runs = variants(name, device, bf16)
    times: dict[str, list[float]] = {key: [] for key in runs}
    for step, context in runs.values():  # warm-up
        with context():
            step()
    for _ in range(rounds):
        for key, (step, context) in runs.items():
            with context():
                synchronize(device)
                start = time.perf_counter()
                for _ in range(steps):
                    step()
                synchronize(device)
                times[key].append((time.perf_counter() - start) / steps)
    return times


def rss_mb() -> float:
    return int(Path("/proc/self/statm").read_text().split()[1]) * 4096 / 2**20


def memory_child(name: str, variant: str, device: str = "cpu", bf16: bool = False) -> None:
    after_imports = rss_mb()
    model, make_batch = build(name)
    if variant != "dense":
        model = get_popup_model(model, k=0.5)
    if variant in ("packed", "lean"):
        model.pack_base()
    momentum_dtype = "bfloat16" if variant == "lean" else "float32"
    step = make_step(model.to(device).train(), make_batch, device, bf16, momentum_dtype)
    with masked_weight_kept() if variant == "kept" else nullcontext():
        for _ in range(3):
            step()
    if device.startswith("cuda"):  # the accelerator's peak: its allocator's statistics
        peak = torch.cuda.max_memory_allocated() / 2**20
        print(json.dumps({"peak_minus_imports_mb": peak}))
        return
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print(json.dumps({"peak_minus_imports_mb": peak - after_imports}))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", default="resnet18,resnet50,vit,bert,gpt2")
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--steps", type=int, default=2, help="steps timed per round")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--memory", action="store_true")
    parser.add_argument("--device", default="cpu", help="cpu, or cuda where there is one")
    parser.add_argument("--bf16", action="store_true", help="the forward under bf16 autocast")
    parser.add_argument("--child", nargs=2, help=argparse.SUPPRESS)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    if args.child:
        memory_child(*args.child, args.device, args.bf16)
        return
    print(
        f"torch {torch.__version__}, {torch.get_num_threads()} threads, {args.device}"
        f"{', bf16 autocast' if args.bf16 else ''}, k=0.5, timm models at 64x64 batch 32, "
        "BERT/GPT-2 (4 layers, hidden 256) batch 8 x 128"
    )
    for name in args.models.split(","):
        if args.memory:
            peaks = {}
            for variant in ("dense", "lean", "packed", "popup", "kept"):
                out = subprocess.run(
                    [
                        sys.executable,
                        __file__,
                        "--child",
                        name,
                        variant,
                        "--threads",
                        str(args.threads),
                        "--device",
                        args.device,
                        *(["--bf16"] if args.bf16 else []),
                    ],
                    capture_output=True,
                    text=True,
                    check=True,
                ).stdout
                peaks[variant] = json.loads(out.splitlines()[-1])["peak_minus_imports_mb"]
            print(
                f"{name:<9} memory: "
                + ", ".join(f"{key} {peak:5.0f} MB" for key, peak in peaks.items())
                + " | "
                + ", ".join(
                    f"{key}/dense {peak / peaks['dense']:.2f}x"
                    for key, peak in peaks.items()
                    if key != "dense"
                )
            )
            continue
        times = time_model(name, args.rounds, args.steps, args.device, args.bf16)
        med = {key: statistics.median(values) for key, values in times.items()}
        spread = {key: f"{min(v) * 1e3:.0f}-{max(v) * 1e3:.0f}" for key, v in times.items()}
        print(
            f"{name:<9} "
            + ", ".join(f"{key} {med[key] * 1e3:.1f} ms ({spread[key]})" for key in med)
            + f" | popup/dense {med['popup'] / med['dense']:.3f}x, packed/dense "
            f"{med['packed'] / med['dense']:.3f}x, lean/dense {med['lean'] / med['dense']:.3f}x, "
            f"packed/popup {med['packed'] / med['popup']:.3f}x, popup/kept "
            f"{med['popup'] / med['kept']:.3f}x, eager/dense "
            f"{med['eager'] / med['dense']:.3f}x, sort/popup {med['sort'] / med['popup']:.2f}x"
        )


if __name__ == "__main__":
    main()
