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

import math
import warnings
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING

import torch
import torch.distributed as dist
from torch import Tensor

try:  # DTensor lives in torch.distributed.tensor since torch 2.4
    from torch.distributed.tensor import DTensor
except ImportError:  # pragma: no cover - builds without distributed support
    DTensor = None  # type: ignore[assignment,misc]

if TYPE_CHECKING:  # stats.py imports this module (local_tensor)
    from param_monitor.stats import StatsLayout

ProcessGroup = dist.ProcessGroup if dist.is_available() else object


def is_dtensor(t: object) -> bool:
    return DTensor is not None and isinstance(t, DTensor)


def is_sharded(t: object) -> bool:
    """Whether ``t`` is a DTensor split across ranks (FSDP2 ``fully_shard`` params and grads are)."""
    return is_dtensor(t) and any(p.is_shard() for p in t.placements)  # type: ignore[union-attr]


def local_tensor(t: Tensor) -> Tensor:
    """This rank's piece of ``t`` (a DTensor's unpadded local shard, read-only use), ``t`` itself otherwise."""
    if not is_dtensor(t):
        return t
    # no_grad: `to_local` is then a plain attribute read (~0.3 us), not an autograd op (~10 us);
    # take it before any `.detach()`, which costs ~25 us on a DTensor (1,000 tensors: 25 ms).
    with torch.no_grad():
        return t.to_local()  # type: ignore[union-attr]


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


def replication_factor(t: Tensor, world_size: int) -> float:
    """How many ranks of the world hold each element of ``t``: summing over the world counts it that often.

    1 for a parameter sharded over the whole world (FSDP2), the replicate size for HSDP-style meshes,
    ``world_size`` for a plain (replicated) tensor.
    """
    if not is_dtensor(t):
        return float(world_size)
    mesh = t.device_mesh  # type: ignore[union-attr]
    shards = math.prod(mesh.size(i) for i, p in enumerate(t.placements) if p.is_shard())  # type: ignore[union-attr]
    return world_size / shards


def replica_weights(layout: StatsLayout, factors: Mapping[str, float], length: int) -> Tensor | None:
    """Per-position weights (1/replication) of a packed vector, ``None`` when all are 1.

    Positions past the per-tensor sums (shared-use sums, flags) get weight 1; ``length`` is the
    packed vector's size, which may include such trailing entries.
    """
    per_tensor = [
        *(factors[n] for n in layout.weight_names),
        *(factors[n] for n in layout.weight_names),
        *(factors[n] for n in layout.grad_names),
    ]
    if all(f == 1.0 for f in per_tensor):
        return None
    weights = [1.0 / f for f in per_tensor] + [1.0] * (length - len(per_tensor))
    return torch.tensor(weights, dtype=torch.float64)


def all_reduce_sum(packed: Tensor, group: ProcessGroup | None) -> Tensor:
    """The one collective of a sharded logging step: SUM of the packed partial sums, in place."""
    if group is not None:
        dist.all_reduce(packed, op=dist.ReduceOp.SUM, group=group)
    return packed


def average_contributions(buffers: Sequence[Tensor], group: ProcessGroup | None) -> None:
    """Average per-use contribution buffers over the ranks IN PLACE, as DDP averages ``.grad``.

    All buffers go through one flat tensor and ONE all-reduce (SUM, then divide by the world
    size). Every rank must pass the same buffers in the same order (the tracker names sites by
    module path and call order, identical on every rank for a model without data-dependent
    control flow).
    """
    if group is None or not buffers:
        return
    flat = torch.cat([b.reshape(-1) for b in buffers])
    dist.all_reduce(flat, op=dist.ReduceOp.SUM, group=group)
    flat.div_(dist.get_world_size(group))
    offset = 0
    for buf in buffers:
        buf.copy_(flat[offset : offset + buf.numel()].view_as(buf))
        offset += buf.numel()
