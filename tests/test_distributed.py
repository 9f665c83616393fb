"""Edge-popup under real DistributedDataParallel (gloo, two CPU processes)."""

import os
import tempfile

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from popup_adapter import get_popup_model
from popup_adapter.models import create_conv_net


def _train_one_step(rank: int, world_size: int, init_file: str, out_dir: str) -> None:
    torch.set_num_threads(1)
    dist.init_process_group(
        "gloo", init_method=f"file://{init_file}", rank=rank, world_size=world_size
    )
    model = get_popup_model(create_conv_net("conv2", width=0.25), k=0.3)
    ddp = torch.nn.parallel.DistributedDataParallel(model)
    optimizer = torch.optim.SGD([p for p in ddp.parameters() if p.requires_grad], lr=0.5)
    x = torch.randn(4, 1, 28, 28, generator=torch.Generator().manual_seed(rank))
    ddp(x).square().mean().backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    optimizer.step()
    torch.save({"masks": model.get_masks(), "grads": grads}, os.path.join(out_dir, f"{rank}.pt"))
    dist.destroy_process_group()


def test_ddp_averages_score_gradients_and_keeps_masks_identical():
    with tempfile.TemporaryDirectory() as tmp:
        mp.spawn(_train_one_step, args=(2, os.path.join(tmp, "init"), tmp), nprocs=2)
        ranks = [torch.load(os.path.join(tmp, f"{r}.pt")) for r in range(2)]
    assert ranks[0]["grads"].keys() == ranks[1]["grads"].keys() != set()
    for name, grad in ranks[0]["grads"].items():
        assert torch.allclose(grad, ranks[1]["grads"][name]), name  # all-reduced
    for name, mask in ranks[0]["masks"].items():
        assert torch.equal(mask, ranks[1]["masks"][name]), name

    # the averaged gradient is the mean of what each rank alone would compute
    single = get_popup_model(create_conv_net("conv2", width=0.25), k=0.3)
    for rank in range(2):
        x = torch.randn(4, 1, 28, 28, generator=torch.Generator().manual_seed(rank))
        (single(x).square().mean() / 2).backward()
    for name, param in single.named_parameters():
        if param.grad is not None:
            assert torch.allclose(param.grad, ranks[0]["grads"][name], atol=1e-6), name


def _fsdp2_step(rank: int, world_size: int, init_file: str, out_dir: str) -> None:
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    torch.set_num_threads(1)
    dist.init_process_group(
        "gloo", init_method=f"file://{init_file}", rank=rank, world_size=world_size
    )
    model = get_popup_model(create_conv_net("conv2", width=0.25), k=0.3)
    mesh = init_device_mesh("cpu", (world_size,))
    for layer in [*model.base_model.features, *model.base_model.classifier]:
        if any(True for _ in layer.parameters()):
            fully_shard(layer, mesh=mesh)
    fully_shard(model, mesh=mesh)
    sharded = type(model.base_model.features[0].popup_scores["default"]).__name__
    optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.5)
    x = torch.randn(4, 1, 28, 28, generator=torch.Generator().manual_seed(0))
    model(x).square().mean().backward()
    optimizer.step()
    torch.save(
        {"masks": model.get_masks(), "sharded": sharded}, os.path.join(out_dir, f"{rank}.pt")
    )
    dist.destroy_process_group()


def test_fsdp2_sharded_scores_give_the_unsharded_masks():
    """torch's FSDP2 on CPU: each rank holds half of every score tensor, yet forward, backward
    and the optimizer step give exactly the masks of the same step unsharded."""
    with tempfile.TemporaryDirectory() as tmp:
        mp.spawn(_fsdp2_step, args=(2, os.path.join(tmp, "init"), tmp), nprocs=2)
        ranks = [torch.load(os.path.join(tmp, f"{r}.pt")) for r in range(2)]
    assert ranks[0]["sharded"] == "DTensor"
    reference = get_popup_model(create_conv_net("conv2", width=0.25), k=0.3)
    optimizer = torch.optim.SGD([p for p in reference.parameters() if p.requires_grad], lr=0.5)
    x = torch.randn(4, 1, 28, 28, generator=torch.Generator().manual_seed(0))
    reference(x).square().mean().backward()
    optimizer.step()
    for name, mask in reference.get_masks().items():
        for rank in ranks:
            assert torch.equal(rank["masks"][name], mask), name
