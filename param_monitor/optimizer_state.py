"""Norms of the optimizer's per-parameter state: ``optimizer_state_norm/{name}/{state}``.

Adam's first and second moments (``exp_avg``, ``exp_avg_sq``, ``max_exp_avg_sq`` with amsgrad),
SGD's ``momentum_buffer``, Adagrad's ``sum``, ...: every floating-point (or complex) tensor the
optimizer keeps in ``optimizer.state[param]``, read after the optimizer step of a logging step,
under the parameter's first name. A step that Adam makes tiny or huge is explained here: the
update is ``exp_avg / (sqrt(exp_avg_sq) + eps)``, not the gradient.

Left out: 0-dimensional states (Adam's ``step`` counter, the same number for every parameter, and
other scalars), non-float states, and parameters without state (not stepped yet, or frozen).

:func:`pack` gives the squared L2 norms as one float64 vector on the device (no host sync); they
are additive over the shards of a sharded (FSDP2/DTensor) state, so a sharded run SUM-all-reduces
the vector once; under DDP every rank holds the same state and rank 0's vector is the answer.
:func:`finalize` takes the square roots on the host.

>>> import torch
>>> w = torch.nn.Parameter(torch.tensor([3.0, 4.0]))
>>> opt = torch.optim.SGD([w], lr=0.1, momentum=0.9)
>>> w.grad = torch.tensor([0.5, 0.5])
>>> opt.step()
>>> packed, keys = pack(opt, [("w", w)])
>>> finalize(packed.tolist(), keys)
{'optimizer_state_norm/w/momentum_buffer': 0.7071067811865476}
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence

import torch
from torch import Tensor, nn
from torch.optim import Optimizer

from param_monitor.dtensor import is_sharded, local_tensor
from param_monitor.tags import optimizer_state_norm


def _monitored(value: object) -> bool:
    return isinstance(value, Tensor) and value.dim() > 0 and (value.is_floating_point() or value.is_complex())


def state_tensors(optimizer: Optimizer, named_params: Sequence[tuple[str, nn.Parameter]]) -> list[tuple[str, Tensor]]:
    """``(tag, tensor)`` for every monitored state tensor of the parameters ``optimizer`` steps on.

    Parameters in ``named_params`` order (first names; a tied tensor once), states in the
    optimizer's own order.
    """
    out = []
    for name, param in named_params:
        for key, value in optimizer.state.get(param, {}).items():
            if _monitored(value):
                out.append((optimizer_state_norm(name, str(key)), value))
    return out


@torch.no_grad()
def pack(
    optimizer: Optimizer, named_params: Sequence[tuple[str, nn.Parameter]], device: torch.device | None = None
) -> tuple[Tensor, list[str]]:
    """Squared L2 norms of the state tensors (float64, on ``device`` or the first state's), and their tags."""
    found = state_tensors(optimizer, named_params)
    if not found:
        return torch.zeros(0, dtype=torch.float64, device=device), []
    target = device if device is not None else local_tensor(found[0][1]).device
    squares = [
        torch.linalg.vector_norm(local_tensor(t), 2, dtype=torch.float64).square().to(target) for _, t in found
    ]
    return torch.stack(squares), [tag for tag, _ in found]


def any_sharded(optimizer: Optimizer, named_params: Sequence[tuple[str, nn.Parameter]]) -> bool:
    """Whether a state tensor is a shard (its squared norms must be summed over the ranks)."""
    return any(is_sharded(t) for _, t in state_tensors(optimizer, named_params))


def finalize(values: Sequence[float], tags: Sequence[str]) -> dict[str, float]:
    """``{tag: norm}`` from the (reduced) squared norms; a non-finite one is left out (the caller warns)."""
    if len(values) != len(tags):
        raise ValueError(f"expected {len(tags)} squared norms, got {len(values)}")
    return {tag: math.sqrt(v) for tag, v in zip(tags, values, strict=True) if math.isfinite(v)}


class OptimizerStateHook:
    """``log_optimizer_state``: a step hook of the monitor's core (``core.StepHook``), after each optimizer step.

    On a logging step, the norms of ``optimizer``'s state for ``named_params()`` (the monitored
    parameters, first names) are read right after its ``step()`` (torch's step post-hook, run by the
    core; none for a step GradScaler skips) and go to ``write(metrics)`` in one transfer. Under DDP
    the states are the same on every rank: rank 0 reads them, no collective; sharded states are
    summed over the ranks with one all-reduce (every rank takes part).
    """

    def __init__(self, named_params: Callable[[], Sequence[tuple[str, nn.Parameter]]], write: Callable) -> None:
        self._named_params = named_params
        self._write = write

    def after_optimizer_step(self, optimizer: Optimizer, logging: bool) -> None:
        from param_monitor import distributed

        if not logging:
            return
        named = self._named_params()
        sharded = any_sharded(optimizer, named)
        if not (sharded or distributed.is_rank_zero()):
            return
        packed, tags = pack(optimizer, named)
        if not tags:
            return
        if sharded:
            packed = distributed.all_reduce_sum(packed, distributed.reduction_group())
        metrics = finalize(packed.cpu().tolist(), tags)  # the one transfer
        if metrics and distributed.is_rank_zero():
            self._write(metrics)

    def batch_start(self, logging: bool) -> None: ...
    def before_backward(self, loss: object) -> None: ...
    def after_backward(self) -> None: ...
    def before_optimizer_step(self, optimizer: Optimizer, logging: bool) -> None: ...
    def batch_end(self, logging: bool) -> None: ...
    def on_exception(self, exc: BaseException) -> None: ...
    def teardown(self) -> None: ...
