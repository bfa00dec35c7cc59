"""Sharded (DTensor) parameters, as FSDP2's ``fully_shard`` makes them: a leaf module.

``stats`` reads local shards through :func:`local_tensor`; ``distributed`` weighs the partial sums
with :func:`replication_factor`. Without a distributed build every helper sees plain tensors.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

try:  # DTensor lives in torch.distributed.tensor since torch 2.4
    from torch.distributed.tensor import DTensor, Shard
except ImportError:  # pragma: no cover - builds without distributed support
    DTensor = Shard = None  # type: ignore[assignment,misc]


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


def fsdp_shard_group(t: Tensor) -> object | None:
    """The process group ``t`` is split over in FSDP2's default layout (``Shard(0)`` over a 1-D mesh), else ``None``.

    Its uses' gradients can then be reduce-scattered into the very rows this rank holds
    (``distributed.shard_of_mean``). Other layouts (``Shard(1)``, HSDP's 2-D mesh, tensor parallel) cannot.
    """
    if not is_dtensor(t):
        return None
    mesh, placements = t.device_mesh, t.placements  # type: ignore[union-attr]
    if mesh.ndim != 1 or placements != (Shard(0),):
        return None
    return mesh.get_group(0)
