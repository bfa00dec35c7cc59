"""Statistics of one model, with or without shared-use tracking: what the monitor's core computes with.

In a plain PyTorch loop use :class:`param_monitor.PlainMonitor` (two calls per step, the same tags,
table and run metadata as the Lightning callback, and a warning for every call forgotten). The
watcher's own step methods still work; every one of them is needed, in this order (a step without
``before_backward(loss)`` cannot see the uses, and :meth:`ParameterWatcher.compute` warns):

>>> import torch, torch.nn as nn
>>> from torch.utils.tensorboard import SummaryWriter
>>> shared = nn.Linear(4, 4)
>>> model = nn.Sequential(nn.Linear(2, 4), shared, nn.ReLU(), shared)
>>> watcher = ParameterWatcher(model)
>>> watcher.start_step()                 # on a step that logs: before its forward pass(es)
>>> watcher.begin_forward()              # before each forward (micro-batch)
>>> loss = model(torch.randn(8, 2)).sum()
>>> watcher.before_backward(loss)        # the graph of each backward is walked for the uses
>>> loss.backward()
>>> watcher.after_backward()
>>> metrics = watcher.compute()          # after backward, before the optimizer step
>>> sorted(k for k in metrics if k.startswith("shared_grad/"))
['shared_grad/1.bias/1', 'shared_grad/1.bias/3', 'shared_grad/1.weight/1', 'shared_grad/1.weight/3']
>>> metrics["shared_grad_error/1.weight"] < 1e-6
True

and ``param_monitor.writers.write_scalars(writer, metrics, step)`` writes them as one event.
"""

from __future__ import annotations

import fnmatch
import warnings
from collections.abc import Callable, Sequence

import torch.nn as nn
from torch import Tensor
from torch.nn.parameter import UninitializedParameter

from param_monitor import distributed
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

    Several processes: pass ``group`` (e.g. ``param_monitor.distributed.reduction_group()``) to
    :meth:`compute`/:meth:`pack` on EVERY rank. Under DDP the per-use contributions are averaged
    over the ranks like ``.grad``; with sharded (FSDP2/DTensor) parameters the partial sums of the
    local shards are summed (shared-use tracking is then off). One collective either way.
    ``aggregate_depth`` reports weight/gradient statistics per module (see ``stats.module_group``).
    """

    def __init__(
        self,
        module: nn.Module,
        track_shared: bool = True,
        include: Sequence[str] | None = None,
        exclude: Sequence[str] | None = None,
        aggregate_depth: int | None = None,
        dead_units: bool = False,
    ) -> None:
        self.module = module
        self.track_shared = track_shared
        self.aggregate_depth = aggregate_depth
        self.dead_units = dead_units
        self._keep = name_filter(include, exclude)
        self.refresh()

    def refresh(self) -> None:
        """Re-read the parameter list (after lazy parameters were materialized)."""
        old = getattr(self, "tracker", None)
        self.named_params: list[tuple[str, nn.Parameter]] = [
            (n, p)
            for n, p in self.module.named_parameters()
            if not isinstance(p, UninitializedParameter) and self._keep(n)
        ]
        self._lazy = [p for p in self.module.parameters() if isinstance(p, UninitializedParameter)]
        self.sharded = any(distributed.is_sharded(p) for _, p in self.named_params)
        if self.sharded and self.track_shared:
            # FSDP swaps in unsharded parameters for each forward: the graph's accumulators are not theirs.
            distributed.warn_rank_zero(
                "`param_monitor`: parameters are sharded (FSDP2/DTensor); per-use tracking of shared "
                "parameters is switched off (per-tensor statistics still work, summed over the shards)."
            )
            self.track_shared = False
        if self.track_shared and old is not None and old.active:
            old.reindex()  # a parameter added during a tracked step: the others keep this step's uses
            self.tracker = old
        else:
            if old is not None:
                old.stop()
            self.tracker = SharedUseTracker(self.module, param_filter=self._keep) if self.track_shared else None
        self._dead_unit_names = _unit_weights(self.module) if self.dead_units else frozenset()

    def lazy_materialized(self) -> bool:
        """Whether a parameter that was lazy at the last :meth:`refresh` has been materialized since.

        A lazy module that never runs stays lazy: it must not make every step rebuild the index.
        """
        return any(not isinstance(p, UninitializedParameter) for p in self._lazy)

    # -- one logged step ------------------------------------------------------------------
    def start_step(self, capture: bool = True) -> None:
        """Install the tracking hooks (only on steps that log)."""
        if self.tracker is not None:
            self._capture = capture and not self.tracker.active
            self.tracker.start(capture=capture)

    def begin_forward(self) -> None:
        if self.tracker is not None:
            self.tracker.begin_forward()

    def before_backward(self, loss: object) -> None:
        """Before each backward pass of a tracked step: find (and hook) every use in ``loss``'s graph."""
        if self.tracker is not None:
            self.tracker.before_backward(loss)

    def after_backward(self) -> None:
        """After each backward pass of a tracked step."""
        if self.tracker is not None:
            self.tracker.after_backward()

    def end_step(self) -> None:
        """Remove the hooks and free the buffers."""
        if self.tracker is not None:
            self.tracker.stop()
            self.tracker.reset()

    def capture_problem(self) -> str | None:
        """Why this tracked step cannot have captured the uses of shared parameters, or ``None``.

        A forward and backward ran (gradients exist) under :meth:`start_step`, but no backward pass
        was announced with :meth:`before_backward`: the graph was never walked, so no use is known.
        """
        tracker = self.tracker
        if tracker is None or not tracker.active or not getattr(self, "_capture", False) or tracker.walked:
            return None
        if not any(p.grad is not None for _, p in self.named_params):
            return None
        return (
            "no backward pass of this tracked step was announced (`before_backward(loss)` before `loss.backward()`, "
            "`after_backward()` after it): the uses of shared parameters cannot be seen and no `shared_grad*` tag "
            "is written. The plain-PyTorch API does it for you: `with monitor.step(step) as s: ...; s.backward(loss)`."
        )

    @property
    def tracking(self) -> bool:
        return self.tracker is not None and self.tracker.active

    def pack(
        self,
        contribution_scale: Tensor | None = None,
        grad_scale: Tensor | None = None,
        group: distributed.ProcessGroup | None = None,
        names: set[str] | None = None,
    ) -> tuple[Tensor, StatsLayout]:
        """Partial sums on the device (the contribution buffers are handed over, never written).

        ``contribution_scale`` multiplies the contributions first (e.g. AMP's ``1/scale`` when
        the optimizer's gradients were already unscaled but the hooks saw scaled ones). With
        ``group``, the rank-local contributions are averaged over its ranks first (one collective,
        only if there are any). Sharded partial sums still need :meth:`reduce`. ``names`` restricts
        everything to those parameters (one optimizer's, when several step in one batch).
        """
        contributions = self.tracker.contributions() if self.tracker is not None else {}
        named_params = self.named_params
        if names is not None:
            named_params = [(n, p) for n, p in named_params if n in names]
            contributions = {n: sites for n, sites in contributions.items() if n in names}
        if self.tracker is not None:
            self.tracker.discard(contributions)  # consumed below: later uses start new buffers
        keys = [(n, site) for n, sites in contributions.items() for site in sites]
        buffers = [contributions[n][site] for n, site in keys]
        if contribution_scale is not None:
            buffers = [buf * contribution_scale for buf in buffers]
        buffers = distributed.average_contributions(buffers, group)
        scaled: dict[str, dict[str, Tensor]] = {}
        for (n, site), buf in zip(keys, buffers, strict=True):
            scaled.setdefault(n, {})[site] = buf
        return pack(named_params, scaled, grad_scale, self._dead_unit_names)

    def reduce(self, packed: Tensor, layout: StatsLayout, group: distributed.ProcessGroup | None) -> Tensor:
        """Sum the shards' partial sums over ``group`` (one collective; none unless parameters are sharded).

        Trailing entries appended to ``packed`` after :meth:`pack` (flags) are summed as they are.
        """
        if group is None or not self.sharded:
            return packed
        world = distributed.dist.get_world_size(group)
        factors = {n: distributed.replication_factor(p, world) for n, p in self.named_params}
        weights = layout.replica_weights(factors, world, packed.numel())
        if weights is not None:  # replicated tensors next to sharded ones: count them once
            packed = packed * weights.to(packed.device)
        return distributed.all_reduce_sum(packed, group)

    def compute(self, group: distributed.ProcessGroup | None = None) -> dict[str, float]:
        """Every metric of this step in one transfer; then the hooks are removed.

        With several processes, every rank calls it with the same ``group``
        (``distributed.reduction_group()``): at most one collective.
        """
        missing = self.capture_problem()
        if missing is not None:
            warnings.warn(f"`ParameterWatcher.compute`: {missing}", stacklevel=2)
        packed, layout = self.pack(group=group)
        packed = self.reduce(packed, layout, group)
        self.end_step()
        return finalize(to_host(packed), layout, self.aggregate_depth)


def _unit_weights(module: nn.Module) -> frozenset[str]:
    """Names of the weights whose rows are output units: ``nn.Linear`` and (non-transposed) convolutions.

    Not embeddings (a zero row is only a token absent from the batch), nor transposed convolutions
    (their output units are columns).
    """
    first_name = {id(p): n for n, p in module.named_parameters()}
    names = set()
    for sub in module.modules():
        is_conv = isinstance(sub, nn.modules.conv._ConvNd) and not sub.transposed
        if isinstance(sub, nn.Linear | nn.Bilinear) or is_conv:
            weight = sub._parameters.get("weight")
            if weight is not None and id(weight) in first_name:
                names.add(first_name[id(weight)])
    return frozenset(names)
