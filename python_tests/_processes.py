"""Two gloo processes on CPU for the multi-process tests: a free port, and a function run on both ranks."""

from __future__ import annotations

import socket


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _rank(rank, port, fn, args, result):
    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh

    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2)
    try:
        out = fn(init_device_mesh("cpu", (2,)), *args)
        if rank == 0:
            result["out"] = out
    finally:
        dist.destroy_process_group()


def on_two_processes(fn, *args):
    """fn(mesh, *args) on 2 spawned gloo processes sharing a 1-D CPU mesh; returns rank 0's return value. fn
    must be a module-level function (spawn pickles it by name)."""
    import torch.multiprocessing as mp

    with mp.Manager() as manager:
        result = manager.dict()
        mp.spawn(_rank, args=(free_port(), fn, args, result), nprocs=2, join=True)
        return result["out"]
