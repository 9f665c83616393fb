"""Edge-popup under real DistributedDataParallel (gloo, two CPU processes)."""

import os
import tempfile

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from popup_adapter import PopupModel, get_popup_model
from popup_adapter.convnets import create_conv_net
from popup_adapter.distributed import check_fsdp_units, full_parameters


def _train_one_step(
    rank: int, world_size: int, init_file: str, out_dir: str, config: dict | None = None
) -> None:
    torch.set_num_threads(1)
    dist.init_process_group(
        "gloo", init_method=f"file://{init_file}", rank=rank, world_size=world_size
    )
    config = dict(config or {"k": 0.3})
    pack = config.pop("pack_base", False)
    model = get_popup_model(create_conv_net("conv2", width=0.25), **config)
    if pack:
        model.pack_base()
    ddp = torch.nn.parallel.DistributedDataParallel(model)
    optimizer = torch.optim.SGD([p for p in ddp.parameters() if p.requires_grad], lr=0.5)
    for step in range(2):
        x = torch.randn(4, 1, 28, 28, generator=torch.Generator().manual_seed(rank + 10 * step))
        ddp(x).square().mean().backward()
        grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
        if step == 0:
            optimizer.step()
            optimizer.zero_grad()
    torch.save({"masks": model.get_masks(), "grads": grads}, os.path.join(out_dir, f"{rank}.pt"))
    dist.destroy_process_group()


def test_ddp_global_top_k_keeps_one_exact_count_on_every_rank():
    config = {"k": 0.1, "selection": "global", "min_layer_k": 0.02}
    with tempfile.TemporaryDirectory() as tmp:
        mp.spawn(_train_one_step, args=(2, os.path.join(tmp, "init"), tmp, config), nprocs=2)
        ranks = [torch.load(os.path.join(tmp, f"{r}.pt")) for r in range(2)]
    masks = ranks[0]["masks"]
    assert all(torch.equal(mask, ranks[1]["masks"][name]) for name, mask in masks.items())
    total = sum(mask.numel() for mask in masks.values())
    assert sum(int(mask.sum()) for mask in masks.values()) == round(0.1 * total)
    assert all(int(mask.sum()) >= round(0.02 * mask.numel()) for mask in masks.values())


def test_ddp_over_a_base_held_as_sign_bits_trains_as_over_its_floats():
    runs = []
    for config in ({"k": 0.3}, {"k": 0.3, "pack_base": True}):
        with tempfile.TemporaryDirectory() as tmp:
            mp.spawn(_train_one_step, args=(2, os.path.join(tmp, "init"), tmp, config), nprocs=2)
            runs.append([torch.load(os.path.join(tmp, f"{r}.pt")) for r in range(2)])
    for plain, packed in zip(*runs, strict=True):  # rank by rank
        for kind in ("masks", "grads"):
            assert plain[kind].keys() == packed[kind].keys() != set()
            for name, value in plain[kind].items():
                assert torch.equal(value, packed[kind][name]), (kind, name)


def test_ddp_averages_score_gradients_and_keeps_masks_identical():
    with tempfile.TemporaryDirectory() as tmp:
        mp.spawn(_train_one_step, args=(2, os.path.join(tmp, "init"), tmp), nprocs=2)
        ranks = [torch.load(os.path.join(tmp, f"{r}.pt")) for r in range(2)]
    assert ranks[0]["grads"].keys() == ranks[1]["grads"].keys() != set()
    for name, grad in ranks[0]["grads"].items():
        assert torch.allclose(grad, ranks[1]["grads"][name]), name  # all-reduced
    for name, mask in ranks[0]["masks"].items():
        assert torch.equal(mask, ranks[1]["masks"][name]), name

    # the averaged gradient (of the second step) is the mean of what each rank alone computes
    single = get_popup_model(create_conv_net("conv2", width=0.25), k=0.3)
    optimizer = torch.optim.SGD([p for p in single.parameters() if p.requires_grad], lr=0.5)
    for step in range(2):
        for rank in range(2):
            x = torch.randn(4, 1, 28, 28, generator=torch.Generator().manual_seed(rank + 10 * step))
            (single(x).square().mean() / 2).backward()
        if step == 0:
            optimizer.step()
            optimizer.zero_grad()
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
    masks = model.get_masks()  # DTensor scores: each rank gathers the whole layer
    with full_parameters(model):  # how the training loop saves: all gather, rank 0 writes
        files = model.artifact_files()
        if rank == 0:
            files.write(os.path.join(out_dir, "artifact"))
        dist.barrier()
    torch.save({"masks": masks, "sharded": sharded}, os.path.join(out_dir, f"{rank}.pt"))
    dist.destroy_process_group()


def _unsharded_step():
    """The model the sharded runs train, after the same step in one process."""
    reference = get_popup_model(create_conv_net("conv2", width=0.25), k=0.3)
    optimizer = torch.optim.SGD([p for p in reference.parameters() if p.requires_grad], lr=0.5)
    x = torch.randn(4, 1, 28, 28, generator=torch.Generator().manual_seed(0))
    reference(x).square().mean().backward()
    optimizer.step()
    return reference


def test_fsdp2_sharded_scores_give_the_unsharded_masks():
    """torch's FSDP2 on CPU: each rank holds half of every score tensor, yet forward, backward
    and the optimizer step give exactly the masks of the same step unsharded, and the artifact
    collected by both ranks and written by rank 0 (as the training loop saves) holds them."""
    with tempfile.TemporaryDirectory() as tmp:
        mp.spawn(_fsdp2_step, args=(2, os.path.join(tmp, "init"), tmp), nprocs=2)
        ranks = [torch.load(os.path.join(tmp, f"{r}.pt")) for r in range(2)]
        saved = PopupModel.from_pretrained(os.path.join(tmp, "artifact"))
    assert ranks[0]["sharded"] == "DTensor"
    reference = _unsharded_step()
    for name, mask in reference.get_masks().items():
        for rank in ranks:
            assert torch.equal(rank["masks"][name], mask), name
    assert saved.get_masks().keys() == reference.get_masks().keys()
    for name, mask in reference.get_masks().items():
        assert torch.equal(saved.get_masks()[name], mask), name


def _accelerate_fsdp2_step(rank: int, world_size: int, port: int, out_dir: str) -> None:
    os.environ.update(
        RANK=str(rank),
        LOCAL_RANK=str(rank),
        WORLD_SIZE=str(world_size),
        MASTER_ADDR="127.0.0.1",
        MASTER_PORT=str(port),
        ACCELERATE_USE_CPU="1",
    )
    torch.set_num_threads(1)
    from accelerate import Accelerator
    from accelerate.utils import FullyShardedDataParallelPlugin
    from accelerate.utils.fsdp_utils import fsdp2_prepare_model

    accelerator = Accelerator()
    assert accelerator.num_processes == world_size
    result = {}
    for policy in ("transformer_based_wrap", "size_based_wrap"):
        accelerator.state.fsdp_plugin = FullyShardedDataParallelPlugin(
            fsdp_version=2,
            auto_wrap_policy=policy,
            transformer_cls_names_to_wrap=["PopupConv", "PopupLinear"],
            min_num_params=100,
        )
        model = fsdp2_prepare_model(
            accelerator, get_popup_model(create_conv_net("conv2", width=0.25), k=0.3)
        )
        try:
            check_fsdp_units(model)
        except RuntimeError as error:
            result[policy] = str(error)
            continue
        result[policy] = type(model.base_model.features[0].popup_scores["default"]).__name__
        optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.5)
        x = torch.randn(4, 1, 28, 28, generator=torch.Generator().manual_seed(0))
        model(x).square().mean().backward()
        optimizer.step()
        with full_parameters(model):
            files = model.artifact_files()
            if rank == 0:
                files.write(os.path.join(out_dir, "artifact"))
            accelerator.wait_for_everyone()
    torch.save(result, os.path.join(out_dir, f"{rank}.pt"))
    accelerator.end_training()


def test_accelerate_fsdp2_preparation_on_cpu():
    """Accelerate's own FSDP2 preparation (``fsdp2_prepare_model``, what its FSDP plugin runs)
    on two CPU processes. Accelerate applies the plugin by itself only on accelerators, so the
    test sets it on the state directly. Whole masked layers as units: the step gives the
    unsharded masks and the artifact saves them; a size-based policy that shards base layers
    on their own is refused by the loop's check, naming the fix."""
    import socket

    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    with tempfile.TemporaryDirectory() as tmp:
        mp.spawn(_accelerate_fsdp2_step, args=(2, port, tmp), nprocs=2)
        results = [torch.load(os.path.join(tmp, f"{r}.pt")) for r in range(2)]
        saved = PopupModel.from_pretrained(os.path.join(tmp, "artifact"))
    for result in results:
        assert result["transformer_based_wrap"] == "DTensor"
        assert "base_layer as a unit of its own" in result["size_based_wrap"]
        assert "TRANSFORMER_BASED_WRAP" in result["size_based_wrap"]
    reference = _unsharded_step()
    for name, mask in reference.get_masks().items():
        assert torch.equal(saved.get_masks()[name], mask), name
