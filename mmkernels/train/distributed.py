"""Data-parallel training under torchrun: DDP, or FSDP2 (`fully_shard`) over the frozen base and the
trainable adapters. On CPU the gloo backend runs the same code (the tests use it).

Every process reads a disjoint slice of each global batch (train/data.py Loader), gradients are averaged by
DDP / reduce-scattered by FSDP2, and the trainer scales each loss so the average equals the gradient of the
token-level mean over the global batch: N processes give the update of one process with N times the batch.
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
import sys
from typing import Any, Dict, List

import torch
from torch import nn


@dataclasses.dataclass(frozen=True)
class DistInfo:
    rank: int = 0
    world_size: int = 1
    mode: str = "none"  # none | ddp | fsdp
    device: torch.device = torch.device("cpu")


def world_size() -> int:
    """The number of processes torchrun launched (WORLD_SIZE; 1 without torchrun)."""
    return int(os.environ.get("WORLD_SIZE", "1"))


def resolve_mode(mode: str, world: int, source: str = "WORLD_SIZE") -> str:
    """`distributed` (auto | none | ddp | fsdp) for `world` processes (named `source` in errors): auto is ddp
    for several, none for one."""
    if mode == "auto":
        return "ddp" if world > 1 else "none"
    if mode == "none" and world > 1:
        raise ValueError(f"distributed: 'none' but {source}={world}; use ddp or fsdp under torchrun")
    if mode != "none" and world < 2:
        raise ValueError(f"distributed: {mode!r} needs several processes (launch with torchrun --nproc_per_node N); "
                         f"{source}={world}")
    return mode


def init(mode: str) -> DistInfo:
    """Join the process group torchrun describes (WORLD_SIZE, RANK, LOCAL_RANK, MASTER_ADDR/PORT)."""
    mode = resolve_mode(mode, world_size())
    if mode == "none":
        return DistInfo()
    import torch.distributed as dist

    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if torch.cuda.is_available():
        device = torch.device("cuda", local_rank)
        torch.cuda.set_device(device)
        backend = "nccl"
    else:
        device, backend = torch.device("cpu"), "gloo"
    if not dist.is_initialized():
        dist.init_process_group(backend)
    return DistInfo(dist.get_rank(), dist.get_world_size(), mode, device)


def shutdown() -> None:
    """Leave the process group: the processes wait for each other, then the group is destroyed."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()


def finish() -> None:
    """End a torchrun process whose command is done: leave the process group, flush the output, and exit at
    once (os._exit(0)), without the interpreter's teardown. A 2-process gloo run that had finished and
    written everything was seen to abort there ("terminate called without an active exception", about once
    per full test run, on a loaded CPU), with the group destroyed and without; nothing is left to run or
    write."""
    shutdown()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


def wrap(module: nn.Module, info: DistInfo, some_unused: bool = False) -> nn.Module:
    """The module the trainer calls: `module` itself, its DDP wrapper, or `module` sharded in place.

    some_unused: a step may leave some trainable parameters without a gradient on every process (a multimodal
    method's visual path when no sample of the global batch has an image); DDP then looks for them each step.

    FSDP2: each block of module.model is a group, then the root. A method must run each block once per
    forward, inside the block's own forward (LaVIN trains in one pass for this), or a block could be
    resharded before its backward. Every block stays in the root group instead (the parameters sharded between
    steps, whole for all of the forward and backward) when a parameter is held both inside a block and
    elsewhere: FSDP2 keeps each parameter in one group. No method of this project does that (Compacter's
    shared rule is held by the model alone)."""
    if info.mode == "none":
        return module
    if info.mode == "ddp":
        from torch.nn.parallel import DistributedDataParallel

        ids = [info.device.index] if info.device.type == "cuda" else None
        return DistributedDataParallel(module, device_ids=ids, find_unused_parameters=some_unused)
    fsdp_shard(module, list(module.model.layers), say=info.rank == 0)
    return module


# FSDP2 before torch 2.13 (2.11 is the GPU machines') makes every shard an nn.Parameter that requires grad,
# which an integer tensor cannot be (pytorch/pytorch#177844): it cannot shard QPaCA's packed codes. 2.12 is
# not known to have the fix, so it counts as before.
FSDP_SHARDS_INTEGERS = tuple(int(v) for v in torch.__version__.split("+")[0].split(".")[:2]) >= (2, 13)


def fsdp_shardable(p: torch.Tensor) -> bool:
    """Whether FSDP2 shards p on this torch (floating point always; integers from torch 2.13)."""
    return p.is_floating_point() or FSDP_SHARDS_INTEGERS


def fsdp_shard(root: nn.Module, blocks: List[nn.Module], mesh=None, say: bool = False) -> None:
    """fully_shard each block, then the root (every block in the root group when a parameter is shared across
    blocks, see wrap). Parameters this torch's FSDP2 cannot shard (fsdp_shardable) are left to it as ignored:
    whole on every process, as buffers are; with say, a line tells how many and their size."""
    from torch.distributed.fsdp import fully_shard

    whole = {p for p in root.parameters() if not fsdp_shardable(p)}
    if whole and say:
        mib = sum(p.numel() * p.element_size() for p in whole) / 2**20
        print(f"fsdp: torch {torch.__version__} cannot shard integer parameters; {len(whole)} of them "
              f"({mib:,.1f} MiB, e.g. QPaCA's packed codes) stay whole on every process", flush=True)
    if not shares_parameters_across_blocks(root, blocks):
        for block in blocks:
            fully_shard(block, mesh=mesh, ignored_params=whole or None)
    fully_shard(root, mesh=mesh, ignored_params=whole or None)


def _is_fsdp_group(module: nn.Module) -> bool:
    """Whether fully_shard made `module` an FSDP2 group (it gains unshard() / reshard())."""
    return hasattr(module, "unshard") and hasattr(module, "reshard")


def sharded_blocks(model: nn.Module) -> int:
    """How many of model.layers are FSDP2 groups of their own (0 without FSDP2, or with every block in the root
    group)."""
    return sum(_is_fsdp_group(block) for block in model.layers)


def shares_parameters_across_blocks(root: nn.Module, blocks: List[nn.Module]) -> bool:
    """Whether some parameter is held by two blocks, or by a block and a module outside the blocks."""
    where: Dict[int, set] = {}
    in_block = set()
    for b, block in enumerate(blocks):
        for m in block.modules():
            in_block.add(id(m))
            for p in m._parameters.values():
                if p is not None:
                    where.setdefault(id(p), set()).add(b)
    for m in root.modules():
        if id(m) not in in_block:
            for p in m._parameters.values():
                if p is not None and id(p) in where:
                    return True
    return any(len(blocks_of) > 1 for blocks_of in where.values())


def all_reduce_sum(value, info: DistInfo):
    if info.world_size == 1:
        return value
    import torch.distributed as dist

    t = torch.tensor(float(value), dtype=torch.float64, device=info.device)
    dist.all_reduce(t)
    return type(value)(t.item()) if isinstance(value, int) else t.item()


def barrier(info: DistInfo) -> None:
    if info.world_size > 1:
        import torch.distributed as dist

        dist.barrier()


def no_sync_unless_last(module: nn.Module, last: bool):
    """Skip the gradient all-reduce on all but the last micro-batch of an accumulated step."""
    if hasattr(module, "no_sync") and not last:
        return module.no_sync()
    if hasattr(module, "set_requires_gradient_sync"):  # FSDP2
        module.set_requires_gradient_sync(last)
    return contextlib.nullcontext()


def _full(t: torch.Tensor) -> torch.Tensor:
    return t.full_tensor() if hasattr(t, "full_tensor") else t


def full_tensors(params: Dict[str, nn.Parameter]) -> Dict[str, torch.Tensor]:
    """The whole (unsharded) value of each parameter, on CPU; a collective under FSDP."""
    return {name: _full(p.detach()).cpu() for name, p in params.items()}


@torch.no_grad()
def copy_full_into(p: nn.Parameter, full: torch.Tensor) -> None:
    if tuple(full.shape) != tuple(p.shape):
        raise ValueError(f"resume: a saved parameter has shape {tuple(full.shape)}, the model's {tuple(p.shape)}")
    if hasattr(p, "device_mesh"):  # a DTensor shard
        from torch.distributed.tensor import distribute_tensor

        p.copy_(distribute_tensor(full.to(p.dtype), p.device_mesh, p.placements))
    else:
        p.copy_(full.to(device=p.device, dtype=p.dtype))


def optimizer_state(model: nn.Module, optimizer: torch.optim.Optimizer, params: Dict[str, nn.Parameter]) -> Dict[str, Any]:
    """The optimizer's state keyed by parameter name (whole tensors on CPU), portable across world sizes."""
    index = {id(p): name for name, p in params.items()}
    order = [index[id(p)] for group in optimizer.param_groups for p in group["params"]]
    sd = optimizer.state_dict()
    state = {order[i]: {k: (_full(v).cpu() if torch.is_tensor(v) else v) for k, v in st.items()}
             for i, st in sd["state"].items()}
    groups = [{**g, "params": [order[i] for i in g["params"]]} for g in sd["param_groups"]]
    return {"state": state, "param_groups": groups}


def load_optimizer_state(model: nn.Module, optimizer: torch.optim.Optimizer, params: Dict[str, nn.Parameter],
                         saved: Dict[str, Any]) -> None:
    index = {id(p): name for name, p in params.items()}
    order = [index[id(p)] for group in optimizer.param_groups for p in group["params"]]
    position = {name: i for i, name in enumerate(order)}
    missing = sorted(set(order) - set(n for g in saved["param_groups"] for n in g["params"]))
    if missing:
        raise ValueError(f"resume: the saved optimizer state lacks parameters {missing[:5]}")
    state = {}
    for name, st in saved["state"].items():
        p = params[name]
        entry = {}
        for k, v in st.items():
            if torch.is_tensor(v) and v.dim() > 0 and hasattr(p, "device_mesh"):
                from torch.distributed.tensor import distribute_tensor

                v = distribute_tensor(v.to(p.dtype), p.device_mesh, p.placements)
            entry[k] = v
        state[position[name]] = entry
    groups = [{**g, "params": [position[n] for n in g["params"]]} for g in saved["param_groups"]]
    optimizer.load_state_dict({"state": state, "param_groups": groups})


@contextlib.contextmanager
def _unsharded(root: nn.Module):
    shards = [m for m in root.modules() if _is_fsdp_group(m)]
    for m in shards:
        m.unshard()
    try:
        yield root
    finally:
        for m in shards:
            m.reshard()


def save_adapter(spec, root: nn.Module, model: nn.Module, params: Dict[str, nn.Parameter], path: str,
                 info: DistInfo) -> None:
    """Write the adapter of `model` from rank 0; under FSDP every rank first gathers the parameters of every
    group under `root` (the module wrap() returned; a collective)."""
    if any(hasattr(p, "device_mesh") for p in params.values()):
        with _unsharded(root):
            if info.rank == 0:
                spec.save(model, path)
        barrier(info)
        return
    if info.rank == 0:
        spec.save(model, path)
    barrier(info)


@torch.no_grad()
def max_rank_difference(params: Dict[str, nn.Parameter], info: DistInfo) -> float:
    """The largest |p - p on rank 0| over every trainable parameter and rank (0.0: the ranks agree)."""
    if info.world_size == 1:
        return 0.0
    import torch.distributed as dist

    worst = torch.zeros((), dtype=torch.float64, device=info.device)
    for p in params.values():
        mine = _full(p.detach()).to(info.device)
        first = mine.clone()
        dist.broadcast(first, src=0)
        worst = torch.maximum(worst, (mine.double() - first.double()).abs().max())
    dist.all_reduce(worst, op=dist.ReduceOp.MAX)
    return float(worst)
