"""torch.distributed set up from the environment torchrun provides (RANK, LOCAL_RANK, WORLD_SIZE).

One code path for every layout: without those variables the process runs alone; under
``torchrun`` (one node or many) each process joins the group, NCCL on CUDA and gloo on CPU.

    dist = init_distributed("auto")
    model = DDP(model, device_ids=[dist.local_rank]) if dist.world_size > 1 else model
    ...
    cleanup_distributed()
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass

from codemae_cli.device import env_int, rank_from_env, resolve_device


@dataclass
class DistInfo:
    """Where this process sits in the job and which device it drives."""

    rank: int
    local_rank: int
    world_size: int
    device: object  # torch.device (kept untyped so this module imports torch lazily)
    is_main: bool

    @property
    def distributed(self) -> bool:
        return self.world_size > 1


def init_distributed(device: str = "auto") -> DistInfo:
    """Join the process group described by the torchrun environment (or run alone)."""
    import torch
    import torch.distributed as dist

    world_size = env_int("WORLD_SIZE", 1)
    rank = rank_from_env()
    local_rank = env_int("LOCAL_RANK", 0)
    dev = resolve_device(device, local_rank)
    if world_size > 1:
        if dev.type == "cuda":
            # Bind before creating the group so NCCL picks the right GPU for this rank.
            torch.cuda.set_device(dev)
        if not dist.is_initialized():
            backend = "nccl" if dev.type == "cuda" else "gloo"
            kwargs = {"backend": backend}
            if dev.type == "cuda":
                kwargs["device_id"] = dev
            try:
                dist.init_process_group(**kwargs)
            except TypeError:  # older torch without device_id
                dist.init_process_group(backend=backend)
    elif dev.type == "cuda":
        torch.cuda.set_device(dev)
    return DistInfo(rank=rank, local_rank=local_rank, world_size=world_size, device=dev, is_main=rank == 0)


def is_dist() -> bool:
    import torch.distributed as dist

    return dist.is_available() and dist.is_initialized()


def cleanup_distributed() -> None:
    """Leave the process group (no-op when running alone)."""
    import torch.distributed as dist

    if is_dist():
        dist.destroy_process_group()


@contextlib.contextmanager
def process_group(device: str = "auto"):
    """``with process_group(device) as dist:`` joins the torchrun group, and leaves it at the end
    only if this call created it (a caller that set up its own group keeps it)."""
    owns = not is_dist()
    info = init_distributed(device)
    try:
        yield info
    finally:
        if owns:
            cleanup_distributed()
        if info.device.type == "cuda":
            import torch

            torch.cuda.empty_cache()


def barrier() -> None:
    import torch.distributed as dist

    if is_dist():
        dist.barrier()


def all_reduce_mean(tensor):
    """Mean of ``tensor`` over all ranks (returned; the input is not modified)."""
    import torch.distributed as dist

    if not is_dist():
        return tensor
    out = tensor.detach().clone()
    dist.all_reduce(out, op=dist.ReduceOp.SUM)
    return out / dist.get_world_size()


def broadcast_object(obj, src: int = 0):
    """Send a picklable Python object (small: paths, flags) from ``src`` to every rank."""
    import torch.distributed as dist

    if not is_dist():
        return obj
    holder = [obj]
    dist.broadcast_object_list(holder, src=src)
    return holder[0]


__all__ = [
    "DistInfo",
    "all_reduce_mean",
    "barrier",
    "broadcast_object",
    "cleanup_distributed",
    "init_distributed",
    "is_dist",
    "process_group",
]
