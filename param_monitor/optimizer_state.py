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
from collections.abc import Sequence

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
