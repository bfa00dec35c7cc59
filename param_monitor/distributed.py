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
optimizer steps on. Both cases issue ONE collective of the statistics per logging step (the
average, or the sum of the shards' partial sums), plus the agreement below; none on other steps.

Ranks that diverge (a data-dependent branch, ``find_unused_parameters=True``) make different uses
of a parameter. Before anything per-use is combined, the ranks agree on it: :func:`agree_on_uses`
all-gathers, per monitored parameter, its number of uses and a digest of their site names (16 bytes
a parameter a rank). A parameter whose uses differ on some rank is left out on EVERY rank (all
ranks see the same gathered table, so they decide alike): the buffers combined then have the same
size and meaning everywhere, so a mismatch can neither crash gloo, nor hang a rank that has nothing
to send, nor mix one rank's use into another's.

FSDP2 (``fully_shard``): the uses are gradients of the full (unsharded) parameter. Each is
reduce-scattered into FSDP's own dim-0 chunks (``torch.chunk``, the last ones shorter or empty) and
divided by the world size INSIDE its backward hook (:meth:`UseCombiner.reduce_use`), so a rank holds
N/W values per use instead of N through the rest of the backward; the statistics are then taken on
the shards and their partial sums ride in the one all-reduce the sharded statistics make anyway.
The ranks agree on each backward's uses before its hooks fire.

Without an initialized process group (or with one process) every helper is a no-op.
"""

from __future__ import annotations

import functools
import hashlib
import warnings
from collections.abc import Collection, Mapping, Sequence
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import Tensor

from param_monitor._internals import fsdp_params
from param_monitor.dtensor import fsdp_shard_group, is_dtensor, is_sharded, local_tensor, replication_factor

__all__ = [
    "UseCombiner",
    "agree_on_uses",
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


def _reduce_scatter(output: Tensor, inp: Tensor, group: ProcessGroup) -> None:
    """A SUM reduce-scatter of ``inp`` into ``output``; looked up at each call (so that tests can count it).

    torch 2.14 renamed ``reduce_scatter_tensor`` (deprecated, warns) to ``reduce_scatter_single``.
    """
    fn = getattr(dist, "reduce_scatter_single", None) or dist.reduce_scatter_tensor
    fn(output, inp, op=dist.ReduceOp.SUM, group=group)


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


# -- ranks agree on what they combine --------------------------------------------------------
@functools.lru_cache(maxsize=1 << 16)  # the same site lists every logging step
def site_digest(sites: tuple[str, ...]) -> int:
    """A process-independent 62-bit digest of a parameter's site names in order (``hash()`` is salted per process)."""
    digest = hashlib.blake2b("\x1f".join(sites).encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") >> 2  # a non-negative int64


def _collective_device(group: ProcessGroup) -> torch.device:
    """Where a small tensor for a collective on ``group`` must live: the current GPU for NCCL, else the CPU."""
    if dist.get_backend(group) == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


@dataclass(frozen=True)
class Agreement:
    """The outcome of :func:`agree_on_uses`, the same on every rank."""

    agreed: frozenset[str]  # parameters with uses, the same on every rank
    differ: dict[str, list[int]]  # parameters whose uses differ: each rank's use count
    listed: frozenset[str] = frozenset()  # parameters with sites on some rank


def agree_on_uses(
    names: Sequence[str],
    uses: Mapping[str, Sequence[str]],
    group: ProcessGroup | None,
    counts: Mapping[str, int] | None = None,
) -> Agreement:
    """Whether every rank has the same uses (by site name, in order) of each of ``names``.

    ONE ``all_gather`` of ``[use count, site digest]`` per parameter (16 bytes each); every rank
    must call it with the same ``names`` (the monitored parameters: the same model everywhere).
    ``counts``: the use counts to report (default: the number of sites in ``uses``). Without
    ``group`` every parameter with uses is agreed.
    """
    if group is None:
        return Agreement(frozenset(n for n in names if uses.get(n)), {})
    site_lists = [uses.get(name) or () for name in names]
    numbers = [len(sites) for sites in site_lists] if counts is None else [counts.get(name, 0) for name in names]
    digests = [site_digest(tuple(sites)) if sites else 0 for sites in site_lists]
    header = torch.tensor([numbers, digests], dtype=torch.int64, device=_collective_device(group))
    gathered = [torch.empty_like(header) for _ in range(dist.get_world_size(group))]
    dist.all_gather(gathered, header, group=group)
    table = torch.stack(gathered).cpu()  # [rank, (count, digest), parameter]
    same = (table == table[:1]).all(dim=1).all(dim=0)
    agreed = frozenset(n for n, ok in zip(names, same.tolist(), strict=True) if ok and uses.get(n))
    differ = {names[i]: table[:, 0, i].tolist() for i in (~same).nonzero().flatten().tolist()}
    listed = frozenset(names[i] for i in (table[:, 1] != 0).any(dim=0).nonzero().flatten().tolist())
    return Agreement(agreed, differ, listed)


# -- combining per-use contributions -------------------------------------------------------------
def shard_rows(rows: int, world: int, rank: int) -> tuple[int, int, int]:
    """FSDP2's dim-0 chunk of ``rows`` for ``rank`` (``torch.chunk``, padded to equal chunks): (chunk, start, stop)."""
    chunk = -(-rows // world)
    return chunk, min(rank * chunk, rows), min((rank + 1) * chunk, rows)


# At most this many bytes of send buffer at a time when a use must be copied (uneven rows, or a
# bf16/fp16 use reduced in fp32): a 128k x 4096 bf16 embedding's use (1 GiB) would need 2 GiB at once.
SEND_BUFFER_BYTES = 64 << 20


def shard_of_mean(use: Tensor, group: ProcessGroup) -> Tensor:
    """This rank's dim-0 chunk (as FSDP2 shards) of the mean of ``use`` over ``group`` (new memory).

    ``use`` is read, never written. Reduced in fp32 (fp64 stays fp64). An fp32 use whose rows divide
    evenly goes out as it is (one reduce-scatter, no copy); otherwise it is copied into a padded
    fp32 send buffer in column slices of at most :data:`SEND_BUFFER_BYTES` (one reduce-scatter
    each; the same number on every rank, since every rank has the same shapes). Held afterwards:
    ceil(rows/W) rows of fp32, about N/W values.
    """
    world, rank = dist.get_world_size(group), dist.get_rank(group)
    dtype = torch.float64 if use.dtype == torch.float64 else torch.float32
    rows = use.shape[0]
    chunk, start, stop = shard_rows(rows, world, rank)
    flat = use.reshape(rows, -1)
    inner = flat.shape[1]
    out = torch.empty(chunk, inner, dtype=dtype, device=use.device)
    if rows == chunk * world and flat.dtype == dtype and flat.is_contiguous():
        _reduce_scatter(out.view(-1), flat.view(-1), group)  # rank r: the r-th rows
    else:
        width = max(1, SEND_BUFFER_BYTES // max(1, world * chunk * out.element_size()))
        for col in range(0, inner, width):
            cols = slice(col, min(col + width, inner))
            send = flat.new_zeros(world * chunk, cols.stop - col, dtype=dtype)
            send[:rows] = flat[:, cols]
            received = torch.empty(chunk, cols.stop - col, dtype=dtype, device=use.device)
            _reduce_scatter(received.view(-1), send.view(-1), group)
            out[:, cols] = received
    return out.div_(world)[: stop - start].view(stop - start, *use.shape[1:])


class UseCombiner:
    """Turns the rank-local per-use contributions of shared parameters into the global ones (several processes).

    - Replicated parameters (DDP): the uses are kept whole; at :meth:`combine` the ranks agree,
      then the agreed ones are averaged in one all-reduce (:func:`average_contributions`).
    - FSDP2 parameters (a DTensor ``Shard(0)`` over a 1-D mesh): before each backward the ranks
      agree on its uses (:meth:`before_backward`); each agreed use is reduce-scattered in its hook
      (:meth:`reduce_use`). Other sharded layouts (tensor parallel, HSDP, ``Shard(1)``) are listed
      in :attr:`unsupported`: their uses are not kept.

    A parameter whose uses differ between ranks on any backward of the step is dropped for the
    step; :attr:`differ` says each rank's use count (the caller warns, with the step).
    """

    def __init__(self, named_params: Sequence[tuple[str, Tensor]], root: torch.nn.Module) -> None:
        self._groups: dict[str, ProcessGroup] = {}
        self.unsupported: list[str] = []
        managed = {id(fsdp_param.sharded_param) for fsdp_param in fsdp_params(root)}
        for name, param in named_params:
            if not is_sharded(param):
                continue
            group = fsdp_shard_group(param) if id(param) in managed else None
            if group is None:
                self.unsupported.append(name)
            else:
                self._groups[name] = group
        self._shapes = {name: param.shape for name, param in named_params if name in self._groups}
        self.reset()

    @property
    def sharded(self) -> bool:
        """Whether some uses are reduce-scattered in backward (FSDP2)."""
        return bool(self._groups)

    def reset(self) -> None:
        """A new step: nothing agreed, nothing dropped (but the unsupported layouts)."""
        self._allowed: frozenset[str] = frozenset()
        self.dropped: set[str] = set(self.unsupported)
        self.differ: dict[str, list[int]] = {}

    def before_backward(self, uses: Mapping[str, Sequence[str]]) -> None:
        """Agree on this backward's uses of the sharded parameters (every rank, before the backward runs)."""
        if not self._groups:
            return
        agreement = agree_on_uses(list(self._groups), uses, reduction_group())
        self._note(agreement, {n for n, counts in agreement.differ.items() if max(counts) > 1})
        self._allowed = agreement.agreed - self.dropped

    def reduce_use(self, name: str, grad: Tensor | None) -> Tensor | None:
        """What to keep of one use (the tracker's ``use_hook``): see the class docstring."""
        group = self._groups.get(name)
        if group is None:
            return None if name in self.dropped else grad  # replicated: kept whole, averaged in `combine`
        if name not in self._allowed:
            return None
        if grad is None:  # a use without gradient still takes part: the other ranks reduce-scatter theirs
            grad = torch.zeros(self._shapes[name], device=_collective_device(group))
        return shard_of_mean(grad.to_dense() if grad.is_sparse else grad, group)

    def combine(
        self,
        contributions: Mapping[str, Mapping[str, Tensor]],
        names: Sequence[str],
        group: ProcessGroup | None,
        counts: Mapping[str, int] | None = None,
    ) -> dict[str, dict[str, Tensor]]:
        """The global contributions of the parameters whose uses every rank agrees on (new tensors for replicated ones).

        Sharded parameters' contributions are this rank's shard of the global one already (a
        DTensor ``<earlier>`` gradient is read as its local shard). One all-gather (the agreement)
        and at most one all-reduce. ``counts``: each parameter's uses in the step (for the warning).
        """
        kept = {n: sites for n, sites in contributions.items() if n not in self.dropped}
        agreement = agree_on_uses(names, {n: list(sites) for n, sites in kept.items()}, group, counts)
        self._note(agreement, agreement.listed)
        kept = {n: sites for n, sites in kept.items() if n in agreement.agreed and n not in self.dropped}
        out: dict[str, dict[str, Tensor]] = {}
        keys = []
        for name, sites in kept.items():
            if name in self._groups:
                out[name] = {site: local_tensor(t) for site, t in sites.items()}
            else:
                keys += [(name, site) for site in sites]
        averaged = average_contributions([kept[n][s] for n, s in keys], group)
        for (name, site), buf in zip(keys, averaged, strict=True):
            out.setdefault(name, {})[site] = buf
        return {n: out[n] for n in kept}  # the callers' order

    def _note(self, agreement: Agreement, shared: Collection[str]) -> None:
        """Drop what differs; remember it for the warning if it is a shared parameter (split on some rank)."""
        for name, counts in agreement.differ.items():
            if name in shared:
                self.differ.setdefault(name, counts)
        self.dropped |= set(agreement.differ)


def divergence_message(differ: Mapping[str, list[int]], step: int | None) -> str:
    """The one warning for a step whose ranks made different uses of shared parameters."""
    at = f"at step {step}" if step is not None else "in this step"
    parts = []
    for name, counts in differ.items():
        same = len(set(counts)) == 1
        parts.append(f"`{name}`: uses per rank {counts}" + (" (as many, at different sites)" if same else ""))
    return (
        f"`param_monitor`: {at} the ranks made different uses of shared parameters ({'; '.join(parts)}): "
        "their per-use contributions cannot be combined, so no `shared_grad*` is written for them at this step "
        "(a data-dependent branch, or `find_unused_parameters=True`)."
    )
