"""Cross-rank gathering for contrastive negatives: with the gradient path (exact) or without
(the reference code's form)."""

from __future__ import annotations

import torch
import torch.distributed as dist


def _world() -> tuple[int, int]:
    if dist.is_available() and dist.is_initialized():
        return dist.get_world_size(), dist.get_rank()
    return 1, 0


def world_size_and_rank() -> tuple[int, int]:
    """(world_size, rank); (1, 0) when torch.distributed is not initialised."""
    return _world()


class _GatherWithGrad(torch.autograd.Function):
    """all_gather in forward; in backward every rank's gradient w.r.t. the gathered tensor is
    summed across ranks (every rank's loss used every rank's features) and each rank keeps the
    slice of its own inputs."""

    @staticmethod
    def forward(ctx, x: torch.Tensor) -> torch.Tensor:
        world, rank = _world()
        ctx.rank, ctx.batch = rank, x.shape[0]
        parts = [torch.empty_like(x) for _ in range(world)]
        dist.all_gather(parts, x.contiguous())
        return torch.cat(parts, dim=0)

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> torch.Tensor:
        grad = grad.contiguous()
        dist.all_reduce(grad, op=dist.ReduceOp.SUM)
        start = ctx.rank * ctx.batch
        return grad[start : start + ctx.batch]


def gather_with_grad(x: torch.Tensor) -> torch.Tensor:
    """Concatenate ``x`` (B, ...) from all ranks along dim 0 -> (world * B, ...), rank order.

    Gradients flow back to the local ``x`` from the losses of all ranks. Every rank must pass
    the same batch size. Identity when not distributed (or a single process).
    """
    world, _ = _world()
    if world == 1:
        return x
    return _GatherWithGrad.apply(x)


def gather_no_grad(x: torch.Tensor) -> torch.Tensor:
    """Concatenate ``x`` (B, ...) from all ranks along dim 0 -> (world * B, ...), without
    gradient (not even to the local rows): the reference code's plain ``all_gather``. Local
    features then learn only through their own rows of the logits. Identity (with gradient)
    when not distributed, as in the reference, which skips the gather on one process.
    """
    world, _ = _world()
    if world == 1:
        return x
    parts = [torch.empty_like(x) for _ in range(world)]
    dist.all_gather(parts, x.detach().contiguous())
    return torch.cat(parts, dim=0)
