"""``update_ratio/{name}`` = ‖w_after − w_before‖ / ‖w_before‖ of one optimizer step.

The ratio needs the weights from BEFORE the step, which no hook of a training loop keeps. So on a
logging step only, :meth:`UpdateRatio.arm` copies the monitored weights an optimizer steps on into
one flat buffer per dtype (one allocation, one fused ``torch._foreach_copy_``), computes their
squared norms on the device right away, and registers a post-hook on that optimizer's ``step``
(torch's public ``Optimizer.register_step_post_hook``). The hook subtracts the new weights from the
copy in place (``torch._foreach_sub_``), takes the squared norms of the differences (one fused
``torch._foreach_norm``), moves both sets of partial sums to the host in ONE transfer, and frees the
copy. Squared norms are additive, so per-module values (``aggregate_depth``) sum them per module
before the square root, and sharded parameters (FSDP2/DTensor) sum their local shards over the
ranks with one all-reduce. Under DDP the weights, and so the ratios, are identical on every rank:
only rank 0 computes (no collective).

A step that never runs (GradScaler found inf/NaN gradients and skipped it) calls no post-hook:
nothing is logged for it, and :meth:`release` (at the end of the batch) frees the copy.

fp16/bf16 weights are copied and differenced in fp32, so the difference of two nearby
low-precision values is not rounded again.

>>> import torch
>>> w = torch.nn.Parameter(torch.tensor([3.0, 4.0]))
>>> opt = torch.optim.SGD([w], lr=0.1)
>>> ratio = UpdateRatio()
>>> logged = []
>>> ratio.arm(opt, [("w", w)], logged.append)
>>> w.grad = torch.tensor([1.0, 0.0])
>>> opt.step()                 # moves w by 0.1: 0.1 / ||(3, 4)|| = 0.02
>>> round(logged[0]["update_ratio/w"], 6)
0.02
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import Tensor, nn
from torch.optim import Optimizer
from torch.utils.hooks import RemovableHandle

from param_monitor import distributed, tags
from param_monitor.stats import module_group

Metrics = dict[str, float]
_LOW_PRECISION = (torch.float16, torch.bfloat16)


class _Snapshot:
    """One optimizer's weights before its step: flat copies, and their squared norms (on the device)."""

    @torch.no_grad()
    def __init__(self, names: list[str], params: list[Tensor]) -> None:
        self.names = names
        self.params = params
        self.copies = _fused_copy([distributed.local_tensor(p) for p in params])
        self.before_sq = _squared_norms(self.copies)

    @torch.no_grad()
    def deltas_sq(self) -> Tensor:
        """‖w_after − w_before‖² per tensor, differencing in place (the copy is spent afterwards)."""
        torch._foreach_sub_(self.copies, [distributed.local_tensor(p) for p in self.params])
        return _squared_norms(self.copies)


def _snapshot_dtype(t: Tensor) -> torch.dtype:
    return torch.float32 if t.dtype in _LOW_PRECISION else t.dtype


def _fused_copy(tensors: Sequence[Tensor]) -> list[Tensor]:
    """Copies of ``tensors`` as views of one flat buffer per (device, dtype): one allocation, one fused copy."""
    groups: dict[tuple[torch.device, torch.dtype], list[int]] = {}
    for i, t in enumerate(tensors):
        groups.setdefault((t.device, _snapshot_dtype(t)), []).append(i)
    copies: list[Tensor | None] = [None] * len(tensors)
    for (device, dtype), indices in groups.items():
        flat = torch.empty(sum(tensors[i].numel() for i in indices), device=device, dtype=dtype)
        pieces = flat.split([tensors[i].numel() for i in indices])
        views = [piece.view(tensors[i].shape) for i, piece in zip(indices, pieces, strict=True)]
        torch._foreach_copy_(views, [tensors[i] for i in indices])
        for i, view in zip(indices, views, strict=True):
            copies[i] = view
    return copies  # type: ignore[return-value]


def _squared_norms(tensors: Sequence[Tensor]) -> Tensor:
    """Squared L2 norms (fp64 vector on the tensors' device) in one fused pass."""
    if not tensors:
        return torch.zeros(0, dtype=torch.float64)
    # the copies are fp32/fp64 (low precision was widened when copying)
    return torch.stack(torch._foreach_norm(tensors, 2)).double().square()


class UpdateRatio:
    """Logs ``update_ratio/{name}`` for the optimizer steps taken on logging steps.

    Usage per logging step: :meth:`arm` with each optimizer (before its ``step()``), then
    :meth:`release` once the batch is over (it frees copies of steps that never ran).
    ``aggregate_depth`` reports ‖Δw‖ / ‖w‖ over each module's tensors taken as one vector.
    """

    def __init__(self, aggregate_depth: int | None = None) -> None:
        self.aggregate_depth = aggregate_depth
        self._armed: dict[int, tuple[_Snapshot, RemovableHandle]] = {}
        self._warned_zero = False

    @property
    def armed(self) -> bool:
        return bool(self._armed)

    def arm(
        self,
        optimizer: Optimizer,
        named_params: Sequence[tuple[str, nn.Parameter]],
        write: Callable[[Metrics], Any],
    ) -> None:
        """Copy the parameters of ``named_params`` that ``optimizer`` steps on; its next step ``write`` s the ratios."""
        if id(optimizer) in self._armed:
            return
        stepped = {id(p) for group in optimizer.param_groups for p in group["params"]}
        mine = [(n, p) for n, p in named_params if id(p) in stepped]
        sharded = any(distributed.is_sharded(p) for _, p in mine)
        # DDP: every rank holds the same weights and only rank 0 writes; sharded sums need every rank
        if not mine or not (sharded or distributed.is_rank_zero()):
            return
        snapshot = _Snapshot([n for n, _ in mine], [p for _, p in mine])

        def after_step(opt: Optimizer, args: Any, kwargs: Any) -> None:
            self._disarm(id(opt))
            # GradScaler hands optimizers that unscale themselves (fused Adam) its inf flag for the
            # length of their step: they run, but leave the weights alone when it is set
            metrics = self._finish(snapshot, sharded, getattr(opt, "found_inf", None))
            if metrics:
                write(metrics)

        self._armed[id(optimizer)] = (snapshot, optimizer.register_step_post_hook(after_step))

    def release(self) -> None:
        """Remove every hook and free every copy (the steps they waited for did not run)."""
        for key in list(self._armed):
            self._disarm(key)

    def _disarm(self, key: int) -> None:
        entry = self._armed.pop(key, None)
        if entry is not None:
            entry[1].remove()

    def _finish(self, snapshot: _Snapshot, sharded: bool, found_inf: Tensor | None = None) -> Metrics:
        n = len(snapshot.names)
        packed = torch.cat([snapshot.deltas_sq(), snapshot.before_sq])
        snapshot.copies = []  # free the copy before the host sync
        if sharded:
            packed = self._sum_shards(packed, snapshot.params)
        if isinstance(found_inf, Tensor):
            packed = torch.cat([packed, found_inf.to(packed.device, torch.float64).reshape(1)])
        values = packed.cpu().tolist()  # the one transfer
        if len(values) > 2 * n and values.pop():
            return {}  # a skipped step: its "update" of 0 is not a measurement
        return self._ratios(snapshot.names, values[:n], values[n:])

    @staticmethod
    def _sum_shards(packed: Tensor, params: Sequence[Tensor]) -> Tensor:
        group = distributed.reduction_group()
        if group is None:
            return packed
        world = distributed.dist.get_world_size(group)
        # a tensor replicated on r ranks would be counted r times by the SUM (deltas, then befores)
        weights = distributed.replica_weights([distributed.replication_factor(p, world) for p in params] * 2)
        if weights is not None:
            packed = packed * weights.to(packed.device)
        return distributed.all_reduce_sum(packed, group)

    def _ratios(self, names: list[str], deltas: list[float], befores: list[float]) -> Metrics:
        if self.aggregate_depth is not None:
            names, deltas, befores = _group(names, deltas, befores, self.aggregate_depth)
        metrics: Metrics = {}
        zero = []
        for name, delta, before in zip(names, deltas, befores, strict=True):
            if before > 0.0:
                metrics[tags.update_ratio(name)] = math.sqrt(delta / before)
            else:  # no relative change of an all-zero tensor (a zero-initialised bias): write nothing
                zero.append(name)
        if zero and not self._warned_zero:
            self._warned_zero = True
            distributed.warn_rank_zero(
                f"`ParameterMonitor`: {len(zero)} tensor(s) were all zeros before the step (first: "
                f"{', '.join(zero[:3])}): their update ratio ‖Δw‖/‖w‖ is undefined and is not logged while "
                "they are zero. This warning is shown once."
            )
        return metrics


def _group(
    names: list[str], deltas: list[float], befores: list[float], depth: int
) -> tuple[list[str], list[float], list[float]]:
    """Squared norms summed per module (first-seen order): the module's tensors as one vector."""
    sums: dict[str, list[float]] = {}
    for name, delta, before in zip(names, deltas, befores, strict=True):
        total = sums.setdefault(module_group(name, depth), [0.0, 0.0])
        total[0] += delta
        total[1] += before
    return list(sums), [s[0] for s in sums.values()], [s[1] for s in sums.values()]
