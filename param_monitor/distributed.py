"""Helpers for more than one process: data parallel (DDP) and sharded parameters (FSDP2/DTensor).

The maths does not change; only *where* the additive partial sums of ``stats.py`` are summed.
A norm is not additive, its square is: ``‖g‖² = Σ_ranks ‖g_r‖²`` when the ranks hold disjoint
pieces (shards) of ``g``. So each rank squares (and sums, and dots) its local shard, the packed
vector of those partial sums is all-reduced with SUM once, and only then does ``finalize`` take
square roots and divide sums by the GLOBAL numel. Under DDP nothing is sharded: weights are
replicated and DDP has already averaged ``.grad`` (``g = (1/W) Σ_r g_r``). The per-use
contributions of shared parameters, however, are captured by autograd hooks on each rank BEFORE
DDP's all-reduce, so they are rank-local; their global counterparts are averaged the same way as
``.grad`` (SUM over ranks, divided by the world size W), in one flat buffer, so that
``Σ_uses contribution = grad`` still holds and the cosines/norms describe the gradient the
optimizer steps on. Both cases issue at most ONE collective per logging step, none otherwise.

Without an initialized process group (or with one process) every helper is a no-op.
"""

from __future__ import annotations

import warnings
from collections.abc import Sequence

import torch
import torch.distributed as dist
from torch import Tensor

from param_monitor.dtensor import is_dtensor, is_sharded, local_tensor, replication_factor

__all__ = [
    "all_reduce_sum",
    "average_contributions",
    "is_dtensor",
    "is_rank_zero",
    "is_sharded",
    "local_tensor",
    "reduction_group",
    "replica_weights",
    "replication_factor",
    "warn_rank_zero",
]

ProcessGroup = dist.ProcessGroup if dist.is_available() else object


def reduction_group() -> ProcessGroup | None:
    """The default (world) group when several processes run, else ``None`` (nothing to reduce)."""
    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        return dist.group.WORLD
    return None


def is_rank_zero() -> bool:
    return not (dist.is_available() and dist.is_initialized()) or dist.get_rank() == 0


def warn_rank_zero(message: str) -> None:
    """One warning per job, not one per rank."""
    if is_rank_zero():
        warnings.warn(message, stacklevel=3)


def all_reduce_sum(packed: Tensor, group: ProcessGroup | None) -> Tensor:
    """The one collective of a sharded logging step: SUM of the packed partial sums, in place."""
    if group is not None:
        dist.all_reduce(packed, op=dist.ReduceOp.SUM, group=group)
    return packed


def replica_weights(replicas: Sequence[float], length: int | None = None) -> Tensor | None:
    """Weights that make a SUM over ranks count every value once: ``1/r`` for a value ``r`` ranks hold.

    THE replica weighting of the package (the statistics' layout and the update ratio both use it):
    a partial sum of a tensor replicated on ``r`` ranks is summed ``r`` times by the all-reduce.
    Positions past ``replicas`` (up to ``length``: flags appended by a caller) weigh 1. ``None``
    when every weight is 1 (nothing to multiply). A float64 vector on the CPU.

    >>> replica_weights([1, 2, 4], length=4)
    tensor([1.0000, 0.5000, 0.2500, 1.0000], dtype=torch.float64)
    >>> replica_weights([1, 1], length=3) is None
    True
    """
    weights = [1.0 / r for r in replicas]
    weights += [1.0] * ((length or len(weights)) - len(weights))
    if all(w == 1.0 for w in weights):
        return None
    return torch.tensor(weights, dtype=torch.float64)


def average_contributions(buffers: Sequence[Tensor], group: ProcessGroup | None) -> list[Tensor]:
    """Per-use contributions averaged over the ranks, as DDP averages ``.grad`` (new tensors).

    All buffers go through one flat tensor and ONE all-reduce (SUM, then divide by the world
    size). Every rank must pass the same buffers in the same order (the tracker names sites by
    module path and call order, identical on every rank for a model without data-dependent
    control flow). The inputs are not written: they may be autograd's own gradient tensors.
    """
    if group is None or not buffers:
        return list(buffers)
    flat = torch.cat([b.reshape(-1) for b in buffers])
    dist.all_reduce(flat, op=dist.ReduceOp.SUM, group=group)
    flat.div_(dist.get_world_size(group))
    out, offset = [], 0
    for buf in buffers:
        out.append(flat[offset : offset + buf.numel()].view_as(buf))
        offset += buf.numel()
    return out
