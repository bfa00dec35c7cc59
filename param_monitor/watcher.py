"""The framework-free core: statistics of one model, with or without shared-use tracking.

Usable from a plain PyTorch loop with a ``SummaryWriter``:

>>> import torch, torch.nn as nn
>>> from torch.utils.tensorboard import SummaryWriter
>>> shared = nn.Linear(4, 4)
>>> model = nn.Sequential(nn.Linear(2, 4), shared, nn.ReLU(), shared)
>>> watcher = ParameterWatcher(model)
>>> watcher.start_step()                 # on a step that logs: before its forward pass(es)
>>> watcher.begin_forward()              # before each forward (micro-batch)
>>> model(torch.randn(8, 2)).sum().backward()
>>> metrics = watcher.compute()          # after backward, before the optimizer step
>>> sorted(k for k in metrics if k.startswith("shared_grad/"))
['shared_grad/1.bias/1', 'shared_grad/1.bias/3', 'shared_grad/1.weight/1', 'shared_grad/1.weight/3']
>>> metrics["shared_grad_error/1.weight"] < 1e-6
True

and ``param_monitor.writers.write_scalars(writer, metrics, step)`` writes them as one event.
"""

from __future__ import annotations

import fnmatch
from collections.abc import Callable, Sequence

import torch.nn as nn
from torch import Tensor
from torch.nn.parameter import UninitializedParameter

from param_monitor.sharing import SharedUseTracker
from param_monitor.stats import StatsLayout, finalize, pack, to_host


def name_filter(include: Sequence[str] | None, exclude: Sequence[str] | None) -> Callable[[str], bool]:
    """A predicate on parameter names from glob patterns (``fnmatch``): included and not excluded.

    >>> keep = name_filter(["model.*"], ["*.bias"])
    >>> keep("model.net.3.weight"), keep("model.net.3.bias"), keep("head.weight")
    (True, False, False)
    """
    inc, exc = list(include or []), list(exclude or [])

    def keep(name: str) -> bool:
        if inc and not any(fnmatch.fnmatchcase(name, p) for p in inc):
            return False
        return not any(fnmatch.fnmatchcase(name, p) for p in exc)

    return keep


class ParameterWatcher:
    """Statistics of ``module``'s unique parameters, and per-use contributions of the shared ones.

    Parameters that are still lazy (``UninitializedParameter``) are skipped until they are
    materialized; call :meth:`refresh` after that (the Lightning callback does it for you).
    """

    def __init__(
        self,
        module: nn.Module,
        track_shared: bool = True,
        include: Sequence[str] | None = None,
        exclude: Sequence[str] | None = None,
    ) -> None:
        self.module = module
        self.track_shared = track_shared
        self._keep = name_filter(include, exclude)
        self.refresh()

    def refresh(self) -> None:
        """Re-read the parameter list (after lazy parameters were materialized)."""
        self.named_params: list[tuple[str, nn.Parameter]] = [
            (n, p)
            for n, p in self.module.named_parameters()
            if not isinstance(p, UninitializedParameter) and self._keep(n)
        ]
        self.has_lazy = any(isinstance(p, UninitializedParameter) for p in self.module.parameters())
        self.tracker = SharedUseTracker(self.module, param_filter=self._keep) if self.track_shared else None

    # -- one logged step ------------------------------------------------------------------
    def start_step(self, capture: bool = True) -> None:
        """Install the tracking hooks (only on steps that log)."""
        if self.tracker is not None:
            self.tracker.start(capture=capture)

    def begin_forward(self) -> None:
        if self.tracker is not None:
            self.tracker.begin_forward()

    def end_step(self) -> None:
        """Remove the hooks and free the buffers."""
        if self.tracker is not None:
            self.tracker.stop()
            self.tracker.reset()

    @property
    def tracking(self) -> bool:
        return self.tracker is not None and self.tracker.active

    def pack(
        self, contribution_scale: Tensor | None = None, grad_scale: Tensor | None = None
    ) -> tuple[Tensor, StatsLayout]:
        """Partial sums on the device (consumes the contribution buffers).

        ``contribution_scale`` multiplies the contributions first (e.g. AMP's ``1/scale`` when
        the optimizer's gradients were already unscaled but the hooks saw scaled ones).
        """
        contributions = self.tracker.contributions() if self.tracker is not None else {}
        if contribution_scale is not None:
            for sites in contributions.values():
                for buf in sites.values():
                    buf.mul_(contribution_scale)
        return pack(self.named_params, contributions, grad_scale)

    def compute(self, reduce: Callable[[Tensor], Tensor] | None = None) -> dict[str, float]:
        """Every metric of this step in one transfer; then the hooks are removed."""
        packed, layout = self.pack()
        if reduce is not None:
            packed = reduce(packed)
        self.end_step()
        return finalize(to_host(packed), layout)
