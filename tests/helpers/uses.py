"""Run a model under a :class:`SharedUseTracker` and compare its per-use contributions to an oracle.

The oracle is a functional re-run in which every use of a shared parameter gets its own detached
copy (``torch.func.functional_call`` per call, or the copy passed by hand): the gradient of each
copy is exactly that use's contribution.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn as nn
from torch import Tensor

from param_monitor.sharing import SharedUseTracker


def tracked_step(
    model: nn.Module, loss_fn: Callable[[], Tensor], capture: bool = True, tracker: SharedUseTracker | None = None
) -> tuple[dict[str, dict[str, Tensor]], SharedUseTracker]:
    """One tracked forward + backward of ``loss_fn()``; the contributions and the tracker."""
    model.zero_grad(set_to_none=True)
    tracker = tracker or SharedUseTracker(model)
    tracker.start(capture=capture)
    tracker.begin_forward()
    loss = loss_fn()
    tracker.before_backward(loss)
    loss.backward()
    tracker.after_backward()
    tracker.stop()
    return tracker.contributions(), tracker


def copies(tensors: dict[str, Tensor]) -> dict[str, Tensor]:
    return {name: t.detach().clone().requires_grad_() for name, t in tensors.items()}


def oracle_grads(loss: Tensor, per_use: dict[str, dict[str, Tensor]]) -> dict[str, dict[str, Tensor]]:
    """``{param name: {site: gradient of that use's copy}}`` from one backward of ``loss``."""
    flat = [(site, name, t) for site, d in per_use.items() for name, t in d.items()]
    grads = torch.autograd.grad(loss, [t for *_, t in flat], allow_unused=True)
    out: dict[str, dict[str, Tensor]] = {}
    for (site, name, t), g in zip(flat, grads, strict=True):
        out.setdefault(name, {})[site] = torch.zeros_like(t) if g is None else g
    return out


def assert_matches(
    got: dict[str, dict[str, Tensor]], expected: dict[str, dict[str, Tensor]], model: nn.Module, tol: float = 1e-5
) -> None:
    """Same sites, each contribution equal to the oracle's, and the sites adding up to ``.grad``."""
    params = dict(model.named_parameters())
    for name, sites in expected.items():
        assert name in got, (name, sorted(got))
        assert list(got[name]) == list(sites), (name, list(got[name]), list(sites))
        for site, want in sites.items():
            assert torch.allclose(got[name][site].to(want.dtype), want, atol=tol, rtol=tol), (name, site)
        total = sum(got[name].values())
        grad = params[name].grad
        grad = grad.to_dense() if grad.is_sparse else grad
        assert torch.allclose(total.to(grad.dtype), grad, atol=tol, rtol=tol), name
