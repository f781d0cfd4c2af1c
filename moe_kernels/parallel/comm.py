"""Collectives for expert parallelism: the autograd-aware wrappers it needs.

Three kinds, all on a ``torch.distributed`` process group (NCCL on GPUs, gloo on CPUs):

* :func:`all_to_all` - ``all_to_all_single`` with variable splits, differentiable: its
  backward is the reverse all-to-all (the splits swapped), which is exact because the
  forward is a permutation of rows across ranks.
* :func:`all_reduce_sum` - a sum over ranks whose backward is the *identity*: each rank's
  copy of a global statistic back-propagates into that rank's own contribution only.
  Summing the replicated parameters' gradients over ranks then gives the gradient of the
  global quantity (see ``docs/PARALLEL.md``, "Gradients").
* :func:`all_gather_stack` - a non-differentiable gather of a fixed-shape tensor from
  every rank (routing decisions: per-expert counts, Expert Choice candidates).

None of them synchronises with the host: split sizes are host integers the caller
already has, and results stay on the device.
"""

from __future__ import annotations

import torch
import torch.distributed as dist

__all__ = ["group_rank_world", "all_to_all", "all_reduce_sum", "all_gather_stack"]


def group_rank_world(group) -> tuple[int, int]:
    """``(rank, world_size)`` of this process in ``group`` (``None`` = the default group);
    ``RuntimeError`` when ``torch.distributed`` is not initialised."""
    if not (dist.is_available() and dist.is_initialized()):
        raise RuntimeError("expert parallelism needs torch.distributed: call torch.distributed.init_process_group "
                           "(backend 'nccl' on GPUs, 'gloo' on CPUs) before building the layer")
    rank = dist.get_rank(group)
    if rank < 0:
        raise ValueError("group: this process is not a member of the given process group")
    return rank, dist.get_world_size(group)


def _a2a(x: torch.Tensor, out_splits: list[int], in_splits: list[int], group) -> torch.Tensor:
    x = x.contiguous()
    out = x.new_empty((sum(out_splits),) + tuple(x.shape[1:]))
    dist.all_to_all_single(out, x, output_split_sizes=out_splits, input_split_sizes=in_splits, group=group)
    return out


class _AllToAll(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, anchor, out_splits, in_splits, group):
        ctx.splits = (out_splits, in_splits)
        ctx.group = group
        return _a2a(x, out_splits, in_splits, group)

    @staticmethod
    def backward(ctx, grad):
        out_splits, in_splits = ctx.splits
        # Every rank must take part even when its own input needs no gradient: the peers'
        # gradients travel through this rank's half of the exchange.
        grad_x = _a2a(grad, in_splits, out_splits, ctx.group)
        return (grad_x if ctx.needs_input_grad[0] else None), None, None, None, None


def all_to_all(x: torch.Tensor, out_splits: list[int], in_splits: list[int], group=None,
               anchor: torch.Tensor | None = None) -> torch.Tensor:
    """Rows of ``x`` [sum(in_splits), ...]: the first ``in_splits[0]`` go to rank 0, the
    next ``in_splits[1]`` to rank 1, ...; returns [sum(out_splits), ...] with the rows
    received from rank 0 first. Differentiable (the backward is the reverse exchange).

    ``anchor``: a tensor that requires grad, passed so that the exchange is part of the
    autograd graph - and its backward runs - on every rank alike, even on a rank whose
    ``x`` does not require grad. Without it, ranks could disagree on whether the
    backward exchange happens, and the ones that do would wait forever."""
    if anchor is None:
        anchor = x.new_empty(0)
    return _AllToAll.apply(x, anchor, list(out_splits), list(in_splits), group)


class _AllReduceSum(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, group):
        out = x.clone()
        dist.all_reduce(out, op=dist.ReduceOp.SUM, group=group)
        return out

    @staticmethod
    def backward(ctx, grad):
        return grad, None


def all_reduce_sum(x: torch.Tensor, group=None) -> torch.Tensor:
    """The sum of ``x`` over the ranks of ``group``; backward is the identity (a rank's
    gradient reaches its own summand only, see the module docstring)."""
    return _AllReduceSum.apply(x, group)


def all_gather_stack(x: torch.Tensor, group=None) -> torch.Tensor:
    """``x`` (same shape and dtype on every rank) from every rank, stacked: [R, *x.shape].
    Not differentiable (used for routing decisions)."""
    _, world = group_rank_world(group)
    x = x.detach().contiguous()
    parts = [torch.empty_like(x) for _ in range(world)]
    dist.all_gather(parts, x, group=group)
    return torch.stack(parts)
