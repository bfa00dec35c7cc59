"""The maths: per-tensor weight/gradient statistics and shared-use statistics, fused, one transfer.

Everything is computed as *additive partial sums* on the tensors' device (sums of squares, sums,
dot products), packed into one float64 vector, and only then moved to the host in one transfer.
Additive sums are what make the distributed case one collective: a sharded run all-reduces the
packed vector (SUM) before :func:`finalize`, and the norms/means/cosines come out global.

Cost: one ``torch._foreach_norm`` pass over weights and gradients, plus one summation pass over
the weights for the means: 1.4-1.7x a bare ``_foreach_norm`` of weights and gradients (the bandwidth
floor) on its own, 2.0x inside a training step in ``benchmarks/monitor_overhead.py``. No CPU
kernel gives a signed sum and a sum of squares in one pass (``torch.var_mean`` does, 8x slower).

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
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field

import torch
from torch import Tensor

from param_monitor.distributed import local_tensor
from param_monitor.tags import (  # noqa: F401  (re-exported: the schema lives in tags.py)
    GRAD_NORM,
    GRAD_NORM_TOTAL,
    SHARED_GRAD,
    SHARED_GRAD_COSINE,
    SHARED_GRAD_ERROR,
    SHARED_GRAD_SHARE,
    WEIGHT_MEAN,
    WEIGHT_NORM,
)


@dataclass
class StatsLayout:
    """Where each partial sum sits in the packed vector, so the host side can name them."""

    weight_names: list[str]
    weight_numels: list[int]
    grad_names: list[str]
    # per shared parameter: (name, site names); the vector holds, for each: the sites' sums of
    # squares, the pairwise dot products (i < j), and the sum of squares of (Σ sites − grad).
    shared: list[tuple[str, list[str]]] = field(default_factory=list)


def _norms(tensors: Sequence[Tensor]) -> list[Tensor]:
    """L2 norms accumulated in fp32 whatever the tensors' dtype (bf16/fp16 lose digits otherwise)."""
    if not tensors:
        return []
    return list(torch._foreach_norm(list(tensors), 2, dtype=torch.float32))


def partial_sums(
    weights: Sequence[Tensor],
    grads: Sequence[Tensor],
    shared: Sequence[tuple[Tensor, Sequence[Tensor]]] = (),
    grad_scale: Tensor | None = None,
) -> Tensor:
    """Pack every additive partial sum into one float64 vector on the tensors' device.

    ``shared`` holds, per shared parameter, its gradient and the fp32 buffers of its uses'
    contributions. The buffers are CONSUMED: the first one is overwritten with Σ uses − grad,
    so that the check costs no extra memory.  ``grad_scale`` (a device scalar) multiplies every
    gradient-derived sum of squares, e.g. ``1/scale**2`` when gradients are still scaled by AMP.
    """
    pieces: list[Tensor] = []
    norms = _norms([*weights, *grads])
    if norms:
        sq = torch.stack([n.to(norms[0].device) for n in norms]).double().square()
        w_sq, g_sq = sq[: len(weights)], sq[len(weights) :]
        if grad_scale is not None:
            g_sq = g_sq * grad_scale
        w_sum = [w.sum(dtype=torch.float32) for w in weights]
        pieces += [w_sq, torch.stack(w_sum).double() if w_sum else w_sq.new_zeros(0), g_sq]
    for grad, uses in shared:
        pieces.append(_shared_partial_sums(grad, uses, grad_scale))
    if not pieces:
        return torch.zeros(0, dtype=torch.float64)
    device = pieces[0].device
    return torch.cat([p.to(device) for p in pieces])


def _shared_partial_sums(grad: Tensor, uses: Sequence[Tensor], grad_scale: Tensor | None) -> Tensor:
    use_sq = torch.stack(_norms(uses)).double().square()
    dots = [
        torch.dot(uses[i].reshape(-1), uses[j].reshape(-1)).double()
        for i in range(len(uses))
        for j in range(i + 1, len(uses))
    ]
    # Σ uses − grad, in place in the first buffer: the sum is the monitor's own, not autograd's.
    residual = uses[0]
    for other in uses[1:]:
        residual.add_(other)
    residual.sub_(grad)
    err_sq = torch.linalg.vector_norm(residual, dtype=torch.float32).double().square().reshape(1)
    out = torch.cat([use_sq, torch.stack(dots) if dots else use_sq.new_zeros(0), err_sq])
    return out * grad_scale if grad_scale is not None else out


def finalize(values: Sequence[float], layout: StatsLayout, aggregate_depth: int | None = None) -> dict[str, float]:
    """Turn the (possibly all-reduced) partial sums into the documented metrics.

    With ``aggregate_depth`` the per-tensor sums are first added up per :func:`module_group`, so
    ``weight_*/``/``grad_norm/`` name modules, not tensors (shared-use metrics stay per parameter).
    """
    it = iter(values)
    w_sq = [next(it) for _ in layout.weight_names]
    w_sum = [next(it) for _ in layout.weight_names]
    g_sq = [next(it) for _ in layout.grad_names]
    metrics: dict[str, float] = {}
    w_names, numels, g_names = layout.weight_names, layout.weight_numels, layout.grad_names
    grad_norms = dict(zip(g_names, map(math.sqrt, g_sq), strict=True))  # per tensor: shared errors need them
    if aggregate_depth:
        w_names, (numels, w_sq, w_sum) = _group_sums(w_names, aggregate_depth, numels, w_sq, w_sum)
        g_names, (g_sq_groups,) = _group_sums(g_names, aggregate_depth, g_sq)
        reported = dict(zip(g_names, map(math.sqrt, g_sq_groups), strict=True))
    else:
        reported = grad_norms
    for name, numel, sq, total in zip(w_names, numels, w_sq, w_sum, strict=True):
        metrics[f"{WEIGHT_MEAN}/{name}"] = total / numel if numel else math.nan
        metrics[f"{WEIGHT_NORM}/{name}"] = math.sqrt(sq)
    for name, norm in reported.items():
        metrics[f"{GRAD_NORM}/{name}"] = norm
    if layout.grad_names:
        metrics[GRAD_NORM_TOTAL] = math.sqrt(math.fsum(g_sq))
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
    norms = [math.sqrt(next(it)) for _ in range(m)]
    pairs = [(i, j) for i in range(m) for j in range(i + 1, m)]
    dots = [next(it) for _ in pairs]
    cosines = [
        dot / (norms[i] * norms[j]) for (i, j), dot in zip(pairs, dots, strict=True) if norms[i] > 0 and norms[j] > 0
    ]
    err = math.sqrt(next(it))
    out = {f"{SHARED_GRAD}/{name}/{site}": norm for site, norm in zip(sites, norms, strict=True)}
    # share_i = <c_i, S> / ||S||^2 with S = sum of the seen uses: <c_i, S> = ||c_i||^2 + sum_j dot_ij,
    # so the shares add up to exactly 1 (negative: a use pulling against the others).
    along = [norms[i] ** 2 for i in range(m)]
    for (i, j), dot in zip(pairs, dots, strict=True):
        along[i] += dot
        along[j] += dot
    total = math.fsum(along)
    for site, value in zip(sites, along, strict=True):
        out[f"{SHARED_GRAD_SHARE}/{name}/{site}"] = value / total if total > 0 else math.nan
    out[f"{SHARED_GRAD_ERROR}/{name}"] = err / grad_norm if grad_norm > 0 else (0.0 if err == 0 else math.inf)
    out[f"{SHARED_GRAD_COSINE}/{name}"] = sum(cosines) / len(cosines) if cosines else math.nan
    return out


def to_host(packed: Tensor) -> list[float]:
    """The one device-to-host transfer of a logging step."""
    return packed.cpu().tolist()


def parameter_statistics(
    named_params: Sequence[tuple[str, Tensor]],
    contributions: Mapping[str, Mapping[str, Tensor]] | None = None,
    reduce: Callable[[Tensor], Tensor] | None = None,
    grad_scale: Tensor | None = None,
) -> dict[str, float]:
    """All documented metrics for ``named_params`` (parameters, their ``.grad`` read if set).

    ``contributions`` maps a shared parameter's name to ``{site: fp32 contribution buffer}``
    (consumed, see :func:`partial_sums`). ``reduce`` is applied to the packed partial sums
    before the transfer (e.g. an all-reduce SUM across shards).
    """
    packed, layout = pack(named_params, contributions or {}, grad_scale)
    if reduce is not None:
        packed = reduce(packed)
    return finalize(to_host(packed), layout)


def pack(
    named_params: Sequence[tuple[str, Tensor]],
    contributions: Mapping[str, Mapping[str, Tensor]],
    grad_scale: Tensor | None = None,
) -> tuple[Tensor, StatsLayout]:
    """Partial sums of ``named_params`` and their layout (the first half of :func:`parameter_statistics`)."""
    # sharded (DTensor) parameters: partial sums of the local shards, numel of the whole tensor
    weights = [(n, local_tensor(p).detach()) for n, p in named_params]
    grads = [(n, local_tensor(p.grad)) for n, p in named_params if p.grad is not None]
    grad_by_name = dict(grads)
    shared = [(n, uses) for n, uses in contributions.items() if n in grad_by_name and uses]
    layout = StatsLayout(
        weight_names=[n for n, _ in weights],
        weight_numels=[p.numel() for _, p in named_params],
        grad_names=[n for n, _ in grads],
        shared=[(n, list(uses)) for n, uses in shared],
    )
    packed = partial_sums(
        [w for _, w in weights],
        [g for _, g in grads],
        [(grad_by_name[n], list(uses.values())) for n, uses in shared],
        grad_scale,
    )
    return packed, layout
