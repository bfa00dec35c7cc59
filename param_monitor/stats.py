"""The maths: per-tensor weight/gradient statistics and shared-use statistics, fused, one transfer.

Everything is computed as *additive partial sums* on the tensors' device (sums of squares, sums,
dot products), packed into one float64 vector, and only then moved to the host in one transfer.
Additive sums are what make the distributed case one collective: a sharded run all-reduces the
packed vector (SUM) before :func:`finalize`, and the norms/means/cosines come out global.

The packed vector's layout is declared once, by :class:`StatsLayout`: its segments, in order,
each with the reduction a multi-process run applies to it. :func:`finalize` reads the segments in
that order and the distributed path weighs them from the same declaration.

Exactness: every sum is accumulated in float64 (:mod:`param_monitor.reduce`), whatever the input
dtype (fp32, bf16, fp16, fp64): every logged norm, mean, share, cosine and error is within ~1e-14 of
a float64 reference up to 2^27 values (torch's fp32 CPU norms were 2e-3 off at 2^25 values, 1.5e-2 at
2^27), no finite fp32 input overflows or underflows (a 1e20 gradient has a finite, right norm; squares
of 1e-30 do not vanish), the shards of a tensor add up to the whole (1e-9 and better), and the
residual ``||sum c - g||`` sees the ~1e-8 rounding of an fp32 gradient. Complex values count as
``|z|`` (norms, and the real part of dot products; complex parameters get no ``weight_mean``: a mean
of complex values is not one number); sparse gradients are coalesced.

Cost: one pass over each weight and gradient (sum of squares and sum together), and one more pass
per shared parameter over its uses and its gradient (giving the gradient's sum of squares too): on
CPU one call of a compiled kernel for the whole step, elsewhere float64 torch ops. On the benchmark
model (2026-12-06, 2-core CI-class VM shared with other jobs, ``benchmarks/monitor_overhead.py``),
the statistics alone take 0.94-1.13x one ``torch._foreach_norm`` of every weight and gradient (the
bandwidth floor); see the benchmark's SUMMARY for the monitor's whole time per logged step.

The toy from the textbook: a bias-free ``Linear(1, 1)`` with weight 3 used twice on input 1.

>>> import torch
>>> w = torch.tensor([[3.0]], requires_grad=True)
>>> x = torch.ones(1, 1)
>>> first = w.view_as(w); second = w.view_as(w)   # one view per use, as the tracker makes
>>> uses = []
>>> _ = first.register_hook(uses.append); _ = second.register_hook(uses.append)
>>> (x @ first.T @ second.T).sum().backward()
>>> w.grad.item(), [u.item() for u in uses]
(6.0, [3.0, 3.0])
>>> metrics = parameter_statistics([("w", w)], {"w": {"use0": uses[0].clone(), "use1": uses[1].clone()}})
>>> {k: round(v, 6) for k, v in metrics.items()}  # doctest: +NORMALIZE_WHITESPACE
{'weight_mean/w': 3.0, 'weight_norm/w': 3.0, 'grad_norm/w': 6.0, 'grad_norm_total': 6.0,
 'shared_grad/w/use0': 3.0, 'shared_grad/w/use1': 3.0, 'shared_grad_share/w/use0': 0.5,
 'shared_grad_share/w/use1': 0.5, 'shared_grad_error/w': 0.0, 'shared_grad_cosine/w': 1.0}
"""

from __future__ import annotations

import functools
import math
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from enum import Enum

import torch
from torch import Tensor

from param_monitor import reduce
from param_monitor.distributed import replica_weights
from param_monitor.dtensor import local_tensor
from param_monitor.tags import (  # noqa: F401  (re-exported: the schema lives in tags.py)
    DEAD_UNITS,
    GRAD_NORM,
    GRAD_NORM_TOTAL,
    SHARED_GRAD,
    SHARED_GRAD_COSINE,
    SHARED_GRAD_ERROR,
    SHARED_GRAD_SHARE,
    WEIGHT_MEAN,
    WEIGHT_NORM,
)


class Reduction(Enum):
    """How a segment of the packed vector is summed over the ranks of a sharded run."""

    #: per-tensor sums over local shards: each element counted once, so a sum over the ranks is
    #: weighted by 1/(how many ranks hold that element); 1 for a fully sharded tensor.
    PER_TENSOR = "per_tensor"
    #: the same value on every rank (per-use sums: their buffers are averaged over the ranks first).
    REPLICATED = "replicated"


@dataclass(frozen=True)
class Segment:
    """A run of the packed vector: ``names`` are the tensors its positions describe, one each for PER_TENSOR."""

    kind: str
    length: int
    reduction: Reduction
    names: tuple[str, ...] = ()


@dataclass
class StatsLayout:
    """Where each partial sum sits in the packed vector, so the host side can name them."""

    weight_names: list[str]
    weight_numels: list[int]
    grad_names: list[str]
    # per shared parameter: (name, site names); the vector holds, for each: the sites' sums of
    # squares, the pairwise dot products (i < j), and the sum of squares of (Σ sites − grad).
    shared: list[tuple[str, list[str]]] = field(default_factory=list)
    # weights without a mean (complex values)
    no_mean: frozenset[str] = frozenset()
    # dead units: (name, number of output units) of Linear/Conv weights whose gradient rows are counted
    dead_units: list[tuple[str, int]] = field(default_factory=list)

    def segments(self) -> list[Segment]:
        """The packed vector, in order: THE declaration that :func:`finalize` and the distributed path read."""
        w, g = tuple(self.weight_names), tuple(self.grad_names)
        segs = [
            Segment("weight_sq", len(w), Reduction.PER_TENSOR, w),
            Segment("weight_sum", len(w), Reduction.PER_TENSOR, w),
            Segment("grad_sq", len(g), Reduction.PER_TENSOR, g),
            Segment("dead_rows", len(self.dead_units), Reduction.PER_TENSOR, tuple(n for n, _ in self.dead_units)),
        ]
        for name, sites in self.shared:  # [‖c_i‖², <c_i, c_j>, ‖Σc − g‖²]
            m = len(sites)
            segs.append(Segment(f"shared:{name}", m + _pair_count(m) + 1, Reduction.REPLICATED))
        return segs

    @property
    def length(self) -> int:
        return sum(seg.length for seg in self.segments())

    def replica_weights(self, factors: Mapping[str, float], world_size: int, length: int) -> Tensor | None:
        """Per-position weights for a SUM over ``world_size`` ranks (``None`` when all are 1).

        ``factors`` maps a tensor name to how many ranks hold each of its elements; positions past
        the declared segments (flags appended by the caller) are summed as they are. The weighting
        itself is ``distributed.replica_weights``'s.
        """
        replicas: list[float] = []
        for seg in self.segments():
            if seg.reduction is Reduction.PER_TENSOR:
                replicas += [factors[n] for n in seg.names]
            else:  # the same value on every rank
                replicas += [world_size] * seg.length
        return replica_weights(replicas, length)


def partial_sums(
    weights: Sequence[Tensor],
    grads: Sequence[Tensor],
    shared: Sequence[tuple[Tensor, Sequence[Tensor]]] = (),
    grad_scale: Tensor | None = None,
    dead_unit_grads: Sequence[Tensor] = (),
) -> Tensor:
    """Pack every additive partial sum into one float64 vector on the tensors' device.

    ``shared`` holds, per shared parameter, its gradient and its uses' contributions (read only).
    ``grad_scale`` (a device scalar) multiplies every
    gradient-derived sum of squares, e.g. ``1/scale**2`` when gradients are still scaled by AMP.
    ``dead_unit_grads``: gradients whose rows (output units) that are all zero are counted.
    """
    # a shared parameter's gradient is read once, by its shared pass, which gives its |g|^2 too
    in_shared = {id(g) for g, _ in shared}
    own = [g for g in grads if id(g) not in in_shared]
    moments, grams = reduce.reduce([*weights, *own], [(uses, g) for g, uses in shared])
    pieces: list[Tensor] = []
    if weights or grads:
        n_w = len(weights)
        w_sum = moments[:n_w, 1]
        if any(w.is_complex() for w in weights):  # no mean for complex values (StatsLayout.no_mean)
            real = torch.tensor([0.0 if w.is_complex() else 1.0 for w in weights], dtype=torch.float64)
            w_sum = w_sum * real.to(w_sum.device, non_blocking=True)
        g_sq = _grad_squares(grads, moments[n_w:, 0], shared, grams)
        if grad_scale is not None:
            g_sq = g_sq * grad_scale
        pieces += [moments[:n_w, 0], w_sum, g_sq]
    if dead_unit_grads:
        pieces.append(torch.stack([_dead_rows(g) for g in dead_unit_grads]).double())
    for gram in grams:  # [|c_i|^2, <c_i, c_j>, |sum c - g|^2] (|g|^2 went to grad_sq)
        pieces.append(gram[:-1] * grad_scale if grad_scale is not None else gram[:-1])
    if not pieces:
        return torch.zeros(0, dtype=torch.float64)
    device = pieces[0].device
    return torch.cat([p.to(device) for p in pieces])


def _grad_squares(
    grads: Sequence[Tensor], own_sq: Tensor, shared: Sequence[tuple[Tensor, Sequence[Tensor]]], grams: list[Tensor]
) -> Tensor:
    """|g|^2 in ``grads``' order: from the per-tensor pass, and for shared parameters from their shared pass."""
    if not grams:
        return own_sq
    from_shared = {id(g): k for k, (g, _) in enumerate(shared)}
    n_own, order, k_own = own_sq.numel(), [], 0
    for g in grads:
        k = from_shared.get(id(g))
        order.append(k_own if k is None else n_own + k)
        k_own += k is None
    shared_sq = torch.stack([gram[-1] for gram in grams]).to(own_sq.device)
    index = torch.tensor(order, dtype=torch.long).to(own_sq.device, non_blocking=True)
    return torch.cat([own_sq, shared_sq]).index_select(0, index)


def _dead_rows(grad: Tensor) -> Tensor:
    """How many output units (rows of a Linear/Conv weight) have an all-zero gradient."""
    return (grad.reshape(grad.shape[0], -1) == 0).all(dim=1).sum()


def _pair_count(m: int) -> int:
    """Pairwise dot products stored for ``m`` uses.

    Always direct dots: deriving <a, b> from ‖a+b‖² − ‖a‖² − ‖b‖² saves a pass but cancels, and
    cosines near 0 came out 1e-4 wrong (relative) in fp32.
    """
    return m * (m - 1) // 2


def finalize(values: Sequence[float], layout: StatsLayout, aggregate_depth: int | None = None) -> dict[str, float]:
    """Turn the (possibly all-reduced) partial sums into the documented metrics.

    With ``aggregate_depth`` the per-tensor sums are first added up per :func:`module_group`, so
    ``weight_*/``/``grad_norm/``/``dead_units/`` name modules, not tensors (shared-use metrics stay
    per parameter).
    """
    it = iter(values)
    per_tensor = [seg for seg in layout.segments() if seg.reduction is Reduction.PER_TENSOR]
    columns = {seg.kind: [next(it) for _ in range(seg.length)] for seg in per_tensor}  # shared: read below
    w_sq, w_sum, g_sq, dead = columns["weight_sq"], columns["weight_sum"], columns["grad_sq"], columns["dead_rows"]
    metrics: dict[str, float] = {}
    w_names, numels, g_names = layout.weight_names, layout.weight_numels, layout.grad_names
    no_mean = [1.0 if n in layout.no_mean else 0.0 for n in w_names]
    d_names, d_units = [n for n, _ in layout.dead_units], [float(u) for _, u in layout.dead_units]
    grad_norms = dict(zip(g_names, map(math.sqrt, g_sq), strict=True))  # per tensor: shared errors need them
    if aggregate_depth:
        w_names, (numels, w_sq, w_sum, no_mean) = _group_sums(w_names, aggregate_depth, numels, w_sq, w_sum, no_mean)
        g_names, (g_sq_groups,) = _group_sums(g_names, aggregate_depth, g_sq)
        d_names, (dead, d_units) = _group_sums(d_names, aggregate_depth, dead, d_units)
        reported = dict(zip(g_names, map(math.sqrt, g_sq_groups), strict=True))
    else:
        reported = grad_norms
    for name, numel, sq, total, complex_count in zip(w_names, numels, w_sq, w_sum, no_mean, strict=True):
        if not complex_count:
            metrics[f"{WEIGHT_MEAN}/{name}"] = total / numel if numel else math.nan
        metrics[f"{WEIGHT_NORM}/{name}"] = math.sqrt(sq)
    for name, norm in reported.items():
        metrics[f"{GRAD_NORM}/{name}"] = norm
    if layout.grad_names:
        metrics[GRAD_NORM_TOTAL] = math.sqrt(math.fsum(g_sq))
    for name, rows, units in zip(d_names, dead, d_units, strict=True):
        metrics[f"{DEAD_UNITS}/{name}"] = rows / units if units else math.nan
    for name, sites in layout.shared:
        metrics.update(_finalize_shared(name, sites, it, grad_norms.get(name, math.nan)))
    return metrics
@functools.lru_cache(maxsize=1 << 16)
def _cached_group(name: str, depth: int) -> str:  # the same names every logging step
    return module_group(name, depth)


def module_group(name: str, depth: int) -> str:
    """The module a parameter is reported under at ``depth``: the first ``depth`` components of its module path.

    A module path shorter than ``depth`` is used whole; a parameter of the root module is its own group.

    >>> [module_group(n, 3) for n in ("model.blocks.3.attn.weight", "model.blocks.3.bias", "model.head.weight")]
    ['model.blocks.3', 'model.blocks.3', 'model.head']
    >>> module_group("model.blocks.3.attn.weight", 1), module_group("scale", 2)
    ('model', 'scale')
    """
    parts = name.split(".")
    return ".".join(parts[: min(depth, len(parts) - 1)]) or name


def _group_sums(names: Sequence[str], depth: int, *columns: Sequence[float]) -> tuple[list[str], list[list[float]]]:
    """Add up each column's per-tensor values per module group (first-seen order): sums stay sums."""
    keys = [_cached_group(name, depth) for name in names]
    index = {key: i for i, key in enumerate(dict.fromkeys(keys))}
    positions = [index[key] for key in keys]
    totals = [[0.0] * len(index) for _ in columns]
    for total, column in zip(totals, columns, strict=True):
        for i, value in zip(positions, column, strict=True):
            total[i] += value
    return list(index), totals


def _finalize_shared(name: str, sites: list[str], it: Iterator[float], grad_norm: float) -> dict[str, float]:
    m = len(sites)
    sq = [next(it) for _ in range(m)]
    pairs = [(i, j) for i in range(m) for j in range(i + 1, m)]
    dots = [next(it) for _ in range(_pair_count(m))]
    err = math.sqrt(max(next(it), 0.0))
    norms = [math.sqrt(v) for v in sq]
    out = {f"{SHARED_GRAD}/{name}/{site}": norm for site, norm in zip(sites, norms, strict=True)}
    # share_i = <c_i, S> / ||S||^2 with S = sum of the seen uses: <c_i, S> = ||c_i||^2 + sum_j dot_ij,
    # so the shares add up to exactly 1 (negative: a use pulling against the others).
    along = list(sq)
    for (i, j), dot in zip(pairs, dots, strict=True):
        along[i] += dot
        along[j] += dot
    total = math.fsum(along)
    # no gradient at all through the uses (an expert whose tokens are all zero): no shares rather than 0/0;
    # a non-finite gradient keeps its NaN shares (the non-finite report covers it)
    if total > 0 or not math.isfinite(total):
        for site, value in zip(sites, along, strict=True):
            out[f"{SHARED_GRAD_SHARE}/{name}/{site}"] = value / total
    out[f"{SHARED_GRAD_ERROR}/{name}"] = err / grad_norm if grad_norm > 0 else (0.0 if err == 0 else math.inf)
    cosines = [
        dot / (norms[i] * norms[j]) for (i, j), dot in zip(pairs, dots, strict=True) if norms[i] > 0 and norms[j] > 0
    ]
    if cosines:  # fewer than two uses with a gradient (a tied alias used once): no cosine, not NaN
        out[f"{SHARED_GRAD_COSINE}/{name}"] = sum(cosines) / len(cosines)
    return out


def to_host(packed: Tensor) -> list[float]:
    """The one device-to-host transfer of a logging step."""
    return packed.cpu().tolist()


def parameter_statistics(
    named_params: Sequence[tuple[str, Tensor]],
    contributions: Mapping[str, Mapping[str, Tensor]] | None = None,
    grad_scale: Tensor | None = None,
) -> dict[str, float]:
    """All documented metrics for ``named_params`` (parameters, their ``.grad`` read if set).

    ``contributions`` maps a shared parameter's name to ``{site: contribution buffer}``
    (consumed, see :func:`partial_sums`).
    """
    packed, layout = pack(named_params, contributions or {}, grad_scale)
    return finalize(to_host(packed), layout)


# exact types, never a DTensor (an isinstance check on a Parameter costs ~1 us: its metaclass)
_PLAIN = frozenset({Tensor, torch.nn.Parameter})


def pack(
    named_params: Sequence[tuple[str, Tensor]],
    contributions: Mapping[str, Mapping[str, Tensor]],
    grad_scale: Tensor | None = None,
    dead_unit_names: frozenset[str] | set[str] = frozenset(),
) -> tuple[Tensor, StatsLayout]:
    """Partial sums of ``named_params`` and their layout (the first half of :func:`parameter_statistics`).

    ``dead_unit_names``: the weights (of Linear/Conv layers) whose all-zero gradient rows are counted.
    """
    # sharded (DTensor) parameters: partial sums of the local shards, numel of the whole tensor.
    # One loop, cheap checks first: 5,000 tensors make every microsecond per tensor 5 ms.
    w_names: list[str] = []
    weights: list[Tensor] = []
    numels: list[int] = []
    g_names: list[str] = []
    grads: list[Tensor] = []
    no_mean: list[str] = []
    for n, p in named_params:
        w_names.append(n)
        weights.append(p if type(p) in _PLAIN else local_tensor(p))  # read under no_grad: no detach
        numels.append(p.numel())
        if p.is_complex():
            no_mean.append(n)
        g = p.grad
        if g is not None:
            g_names.append(n)
            grads.append(g if type(g) in _PLAIN else local_tensor(g))
    grad_by_name = dict(zip(g_names, grads, strict=True))
    shared = [(n, uses) for n, uses in contributions.items() if n in grad_by_name and uses]
    dead = [(n, p) for n, p in named_params if n in dead_unit_names and n in grad_by_name and p.dim() >= 2]
    dead = [(n, p) for n, p in dead if not grad_by_name[n].is_sparse]
    layout = StatsLayout(
        weight_names=w_names,
        weight_numels=numels,
        grad_names=g_names,
        shared=[(n, list(uses)) for n, uses in shared],
        no_mean=frozenset(no_mean),
        dead_units=[(n, p.shape[0]) for n, p in dead],
    )
    packed = partial_sums(
        weights,
        grads,
        [(grad_by_name[n], list(uses.values())) for n, uses in shared],
        grad_scale,
        [grad_by_name[n] for n, _ in dead],
    )
    return packed, layout
