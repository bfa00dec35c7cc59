"""The logging step, whole and framework-free: what the Lightning callback and the plain API both run.

:class:`MonitorCore` decides *when* a step logs, *what state the gradients are in* (AMP-scaled or
not, accumulated by hand, clipped) and *where* the values go (a :class:`~param_monitor.sinks.Sink`),
keeps the non-finite record, splits the statistics per optimizer, arms the update ratio, writes the
run metadata and the parameter table, and checks that the uses of shared parameters add up
(warning once per fit when they do not). The maths is ``stats.py``'s and ``sharing.py``'s; the
step's phases are the pure :class:`~param_monitor.phases.StepMachine`; the options ``config.py``'s;
the writing ``run_writer.py``'s; the once-per-fit warnings ``checks.py``'s. The frameworks are
shells: ``callback.ParameterMonitor`` (Lightning) and ``plain.PlainMonitor`` (a hand-written loop).

Events, in the order a training loop calls them (every one a no-op before :meth:`MonitorCore.start`).
The phase events return the :class:`~param_monitor.phases.Problem` s they saw (calls missing or out
of order): the plain API warns with them, Lightning (which calls its hooks in order) has none.

=====================================================  ===============================================
``start(module, every_n, track_shared=None)``          a fit begins: the module's parameters are indexed
``batch_start(step, module) -> (logs, problems)``      a batch (micro-batch) begins; logs: a logging step
``before_backward(loss)`` / ``after_backward()``       around each backward pass
``before_clip(optimizer, step)``                       before gradient clipping (statistics taken here)
``before_optimizer_step(optimizer, step, module)``     gradients final: statistics written
(``after_optimizer_step``)                             the hooks' event, from torch's step post-hook
``batch_end(accumulating, step_may_follow=False)``     the batch is over
``end()``                                              the fit finished normally
``abort_batch(exc)``                                   a batch failed; the next one may run
``on_exception(exc)`` / ``teardown()``                 the fit failed / ended: hooks off, buffers freed
=====================================================  ===============================================

Extension points (other features plug in with a few lines):

- :class:`StepHook`: ``core.hooks.append(hook)``; its methods ``batch_start(logging: bool)``,
  ``before_backward(loss)``, ``after_backward()``, ``before_optimizer_step(optimizer, logging: bool)``,
  ``after_optimizer_step(optimizer, logging: bool)``, ``batch_end(logging: bool)``,
  ``on_exception(exc)`` and ``teardown()`` run at those events (after the core's own work at
  ``batch_start``, before it at the others). E.g. :class:`EagerLoggingSteps` (registered by the core
  itself): ``torch.compile``'s ``force_eager`` stance set at ``batch_start`` of a tracked batch and
  restored at ``before_optimizer_step``/``batch_end``/``on_exception``/``teardown``; activation hooks
  installed on logging steps; optimizer-state norms after the step. Torch's optimizer step post-hook
  is registered only for hooks that define ``after_optimizer_step``.
- :class:`Collector`: ``core.collectors.append(collector)``; ``start(module)`` at the first batch
  of a logging step (e.g. to install activation hooks for that step only); at the optimizer step
  (each optimizer's, with several), ``pack(optimizer)`` returns a 1-D float64 tensor of partial
  sums (on any device) that rides in the step's ONE device-to-host transfer (appended after the
  statistics; summed over the ranks with them when the parameters are sharded, rank-local
  otherwise), and ``finalize(values)`` turns its slice of the host values into metrics
  (``{tag: value}``) written with the step's. Its tags' family is declared with
  ``tags.register(MetricFamily(...))`` (the tab, the report and the docs read the registry).
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import Any, Protocol

import torch
from torch import Tensor
from torch.optim import Optimizer
from torch.utils.hooks import RemovableHandle

from param_monitor import distributed, stats, tags
from param_monitor._torch import inverse_scale, optimizer_unscaled
from param_monitor.checks import FitWarnings
from param_monitor.compile import EagerStance, tracking_blocked
from param_monitor.config import MonitorConfig
from param_monitor.nonfinite import NonFinitePolicy, NonFiniteReport
from param_monitor.phases import Problem, StepMachine
from param_monitor.run_writer import RunWriter, histogram_values
from param_monitor.sinks import Sink
from param_monitor.update_ratio import UpdateRatio
from param_monitor.watcher import ParameterWatcher

__all__ = ["Collector", "EagerLoggingSteps", "MonitorConfig", "MonitorCore", "Runtime", "StepHook"]

Signature = tuple[tuple[str, int, type], ...]


# -- what the framework provides ---------------------------------------------------------------
class Runtime(Protocol):
    """What a shell tells the core about the training loop it runs in."""

    def sinks(self) -> Sequence[Sink]:
        """Where to write (empty on ranks other than 0)."""
        ...

    def grad_scaler(self) -> torch.amp.GradScaler | None:
        """The enabled AMP ``GradScaler``, if the loop scales the loss."""
        ...

    def optimizers(self) -> Sequence[Optimizer]:
        """Every optimizer of the loop (several: one ``grad_norm_total/optimizer_{i}`` each)."""
        ...


class StepHook:
    """A feature that runs at the step's phases (see the module docstring); every method is optional."""

    def batch_start(self, logging: bool) -> None: ...
    def before_backward(self, loss: Any) -> None: ...
    def after_backward(self) -> None: ...
    def before_optimizer_step(self, optimizer: Optimizer, logging: bool) -> None: ...
    def after_optimizer_step(self, optimizer: Optimizer, logging: bool) -> None: ...
    def batch_end(self, logging: bool) -> None: ...
    def on_exception(self, exc: BaseException) -> None: ...
    def teardown(self) -> None: ...


_versions = itertools.count(1)


class HookList(list):
    """``MonitorCore.hooks``: a list whose every change takes a new ``version``.

    The core looks up which hooks act at each event only when the version changed; on every other step it
    reads one number (a step that does not log runs little more than the phase machine).
    """

    __slots__ = ("version",)

    def __init__(self, hooks: Iterable[StepHook] = ()) -> None:
        super().__init__(hooks)
        self.version = next(_versions)


def _changing(name: str) -> Callable[..., Any]:
    method = getattr(list, name)

    def changed(self: HookList, *args: Any) -> Any:
        result = method(self, *args)
        self.version = next(_versions)
        return result

    return changed


for _name in ("append", "extend", "insert", "remove", "pop", "clear", "sort", "reverse", "__setitem__",
              "__delitem__", "__iadd__", "__imul__"):  # fmt: skip
    setattr(HookList, _name, _changing(_name))


class Collector(Protocol):
    """Extra partial sums that ride in a logging step's one transfer (see the module docstring).

    A collector that holds hooks or buffers also implements :class:`StepHook` (``on_exception``,
    ``teardown``) and is added to ``core.hooks`` too.
    """

    def start(self, module: torch.nn.Module) -> None:
        """The first batch of a logging step begins (before its forward pass)."""
        ...

    def pack(self, optimizer: Optimizer) -> Tensor:
        """1-D float64 partial sums of this logging step (empty: nothing this time)."""
        ...

    def finalize(self, values: Sequence[float]) -> dict[str, float]:
        """Metrics from this collector's slice of the host values (possibly summed over ranks)."""
        ...


@dataclass
class _FitState:
    """What one fit accumulates; a new fit starts a fresh one."""

    signature: Signature = ()  # the module's parameters the watcher was built from
    summary_pending: bool = True
    count_calls_pending: bool = True  # the first step names the uses once: the table's call sites
    accumulated_before: bool = False  # the logging step began with gradients of unstepped batches
    steps_logged: int = 0
    steps_run: int = 0
    last_logged: int | None = None  # the step label last logged


class MonitorCore:
    """One model's logging step (see the module docstring)."""

    def __init__(self, config: MonitorConfig, runtime: Runtime) -> None:
        self.config = config
        self.runtime = runtime
        self.hooks: list[StepHook] = HookList([EagerLoggingSteps(self)] if config.eager_logging_steps else [])
        self._hooks_seen: int | None = None  # the `hooks.version` that `_acting` was built from
        self._acting: dict[str, tuple[Callable[..., None], ...]] = {}  # per event: the hooks' methods that act
        self.collectors: list[Collector] = []
        self._features: list[Any] = []  # this fit's opt-in statistics (activations, optimizer state, spikes)
        self.current_step = 0  # the step label of the batch under way (the features' writes)
        self.watcher: ParameterWatcher | None = None
        self.every_n = 0
        self._reset()

    def _reset(self) -> None:
        self.machine = StepMachine()
        self.fit = _FitState(summary_pending=self.config.log_summary)
        self.warnings = FitWarnings()
        self.writer = self._new_writer()
        self.nonfinite = NonFinitePolicy(self.config.raise_on_nonfinite)
        self.update_ratio = UpdateRatio(self.config.aggregate_depth) if self.config.log_update_ratio else None
        self._before_clip: dict[int, dict[str, float]] = {}  # statistics taken before clipping, per optimizer
        self._measured: set[int] = set()  # optimizers whose statistics this batch has taken
        self._post_hooks: dict[int, RemovableHandle] = {}
        self._stepping: dict[int, bool] = {}  # per optimizer: whether its step under way is a logging one

    def _new_writer(self) -> RunWriter:
        flags = {k: v for k, v in vars(self.config).items() if isinstance(v, bool)}  # the options a family may need
        return RunWriter(lambda: self.runtime.sinks(), self.config.log_update_ratio, self.config.log_dead_units, flags)

    def __getstate__(self) -> dict[str, Any]:  # ddp_spawn pickles the callback: hooks and modules are not state
        state = self.__dict__.copy()
        state.update(watcher=None, update_ratio=None, _post_hooks={}, writer=None, _features=[], _hooks_seen=None)
        state["_acting"] = {}
        features = set(map(id, self._features))  # they hold the module and closures: attached again by `start`
        state["hooks"] = [h for h in self.hooks if id(h) not in features]  # (a HookList again on unpickling)
        state["collectors"] = [c for c in self.collectors if id(c) not in features]
        return state

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state)
        self.hooks = HookList(self.hooks)  # a version of this process
        self.writer = self._new_writer()

    # -- set-up --------------------------------------------------------------------------------
    def start(self, module: torch.nn.Module, every_n: int, track_shared: bool | None = None) -> None:
        """A fit begins: index ``module``'s parameters; log every ``every_n`` steps (0: never)."""
        self.teardown()
        self._reset()
        self.every_n = every_n
        config = self.config
        self.warnings.unmatched_includes(module, config.include)
        track = config.track_shared if track_shared is None else track_shared
        # after the model was compiled or graphed (Lightning's `configure_model`): can its uses be seen?
        why = tracking_blocked(module, config.eager_logging_steps) if track else None
        if why is not None:
            self.warnings.once("tracking-blocked", why)
            track = False
        self.watcher = ParameterWatcher(
            module,
            track_shared=track,
            include=config.include,
            exclude=config.exclude,
            aggregate_depth=config.aggregate_depth,
            dead_units=config.log_dead_units,
        )
        self.fit.signature = _signature(module)
        self._attach_features(module)

    def _attach_features(self, module: torch.nn.Module) -> None:
        """The opt-in statistics on the extension points (a previous fit's taken off first)."""
        from param_monitor.activations import ActivationCollector
        from param_monitor.optimizer_state import OptimizerStateHook
        from param_monitor.spikes import SpikeHook

        self._detach_features()
        config, features = self.config, []
        sharded = lambda: self.watcher is not None and self.watcher.sharded  # noqa: E731
        named = lambda: self.watcher.named_params if self.watcher is not None else []  # noqa: E731
        if config.log_activations:
            features.append(ActivationCollector(module, config.activation_include, config.activation_exclude, sharded))
        if config.log_optimizer_state:
            features.append(OptimizerStateHook(named, lambda m: self.writer.scalars(m, self.current_step)))
        if config.detect_spikes:
            scaler = self.runtime.grad_scaler
            features.append(
                SpikeHook(
                    params=lambda: [p for _, p in named()],
                    step=lambda: self.current_step,
                    write_text=lambda markdown, step: self.writer.text(tags.SPIKES_TAG, markdown, step),
                    grad_scale=lambda optimizer: self._scaling(optimizer)[1],
                    loss_scale=lambda: inverse_scale(scaler()) if scaler() is not None else None,
                    sharded=sharded,
                )
            )
        self._features = features
        self.hooks.extend(features)
        self.collectors.extend(f for f in features if hasattr(f, "pack"))

    def _detach_features(self) -> None:
        for feature in self._features:
            for where in (self.hooks, self.collectors):
                if feature in where:
                    where.remove(feature)
        self._features = []

    def sync_parameters(self, module: torch.nn.Module) -> bool:
        """Rebuild the index if the module's parameters changed (pruning, a replaced layer, lazy ones
        materialized); checked on logging and histogram steps only."""
        signature = _signature(module)
        if self.watcher is None or signature == self.fit.signature:
            return False
        self.fit.signature = signature
        self.watcher.refresh()
        self.fit.count_calls_pending = True  # call sites of the new modules are counted on the next forward
        self.fit.summary_pending = self.config.log_summary
        return True

    def logs(self, step: int) -> bool:
        # the rule of Lightning's logger connector: `(batches_that_stepped + 1) % n == 0`
        return bool(self.every_n) and (step + 1) % self.every_n == 0

    def _histograms_due(self, step: int) -> bool:
        n = self.config.histogram_every_n_steps
        return bool(n) and (step + 1) % n == 0

    def _hooks(self, name: str, *args: Any) -> None:
        for method in self._acting_now()[name]:  # a snapshot: a hook may take itself off at teardown
            method(*args)

    def _acting_now(self) -> dict[str, tuple[Callable[..., None], ...]]:
        """Per event, the hooks' methods that do something (not :class:`StepHook`'s no-ops).

        Looked up again only when ``hooks`` changes (the events check ``_hooks_seen`` inline, without a call:
        a step that does not log runs little more than the phase machine).
        """
        if getattr(self.hooks, "version", 0) != self._hooks_seen:
            if not isinstance(self.hooks, HookList):  # a list assigned to `hooks`
                self.hooks = HookList(self.hooks)
            self._hooks_seen, self._acting = self.hooks.version, {}
            for name in _EVENTS:
                no_op = getattr(StepHook, name)
                bound = [getattr(hook, name) for hook in self.hooks]
                self._acting[name] = tuple(m for m in bound if getattr(m, "__func__", m) is not no_op)
        return self._acting

    # -- the phases ------------------------------------------------------------------------------
    def batch_start(self, step: int, module: torch.nn.Module) -> tuple[bool, list[Problem]]:
        """A batch of step ``step`` begins: install the capture on logging steps. (logs?, problems)."""
        watcher = self.watcher
        if watcher is None:
            return False, []
        if self.update_ratio is not None:  # a copy whose step never ran (a plain loop's skipped step)
            self.update_ratio.release()
        self.current_step = step
        logs = bool(self.every_n) and (step + 1) % self.every_n == 0  # `self.logs(step)`, without a call
        first_batch = logs and not self.machine.logs_now(step)
        problems = self.machine.batch_start(step, logs)
        if first_batch:  # manual accumulation: gradients of earlier, untracked batches are in `.grad`
            self.fit.accumulated_before = self.machine.accumulated_before and any(
                p.grad is not None for _, p in watcher.named_params
            )
            for collector in self.collectors:
                collector.start(module)
        fit = self.fit
        histograms = bool(self.config.histogram_every_n_steps) and self._histograms_due(step)
        if logs or fit.summary_pending or fit.count_calls_pending or histograms:
            if not watcher.tracking:  # (with several optimizers tracking lasts the batch)
                self.sync_parameters(module)
            if logs or fit.summary_pending or fit.count_calls_pending:  # not on a histogram-only step
                if not watcher.tracking:
                    # off-schedule, the first step only counts module calls to name the table's call sites
                    watcher.start_step(capture=logs)
                watcher.begin_forward()
        acting = self._acting if getattr(self.hooks, "version", 0) == self._hooks_seen else self._acting_now()
        for method in acting["batch_start"]:
            method(logs)
        return logs, problems

    def before_backward(self, loss: Any) -> list[Problem]:
        acting = self._acting if getattr(self.hooks, "version", 0) == self._hooks_seen else self._acting_now()
        for method in acting["before_backward"]:
            method(loss)
        problems = self.machine.before_backward()
        watcher = self.watcher
        if watcher is not None and watcher.tracking:
            watcher.before_backward(loss)  # the graph is walked for the uses of shared parameters
        return problems

    def after_backward(self) -> list[Problem]:
        acting = self._acting if getattr(self.hooks, "version", 0) == self._hooks_seen else self._acting_now()
        for method in acting["after_backward"]:
            method()
        problems = self.machine.after_backward()
        watcher = self.watcher
        if watcher is not None and watcher.tracking:
            watcher.after_backward()  # the micro-batches' contributions add up in the same buffers
        return problems

    def before_clip(self, optimizer: Optimizer, step: int) -> None:
        """Gradient clipping is about to rescale ``optimizer``'s gradients: take the statistics now.

        The logged gradient is the one from before clipping, and the uses (never clipped) add up to it.
        """
        # (automatic optimization clips after `before_optimizer_step`: its statistics are taken then)
        if self.watcher is None or not self.machine.logs_now(step) or id(optimizer) in self._measured:
            return
        self._measured.add(id(optimizer))
        several = len(self.runtime.optimizers()) > 1
        names = self._names(optimizer) if several else None
        self._before_clip[id(optimizer)] = self._compute(optimizer, names, step)

    def before_optimizer_step(self, optimizer: Optimizer, step: int, module: torch.nn.Module) -> list[Problem]:
        watcher = self.watcher
        if watcher is None:
            return []
        machine = self.machine
        logs = machine.tracked_step == step  # `machine.logs_now(step)`, without a call
        self.current_step = step
        acting = self._acting if getattr(self.hooks, "version", 0) == self._hooks_seen else self._acting_now()
        for method in acting["before_optimizer_step"]:
            method(optimizer, logs)
        self._stepping[id(optimizer)] = logs  # for `after_optimizer_step`, which may come after the batch
        problems = machine.before_optimizer_step(step)
        if acting["after_optimizer_step"] and id(optimizer) not in self._post_hooks:
            self._watch_step(optimizer)
        self.fit.steps_run = max(self.fit.steps_run, step + 1)
        histograms = bool(self.config.histogram_every_n_steps) and self._histograms_due(step)
        if self.config.check_finite_every_step and not logs and self.runtime.grad_scaler() is None:
            self.nonfinite.check_step(watcher.named_params, step)  # (a scaler skips non-finite steps itself)
        if machine.first_of_step:  # once per step, whatever the number of optimizers
            self.writer.new_step()
            if logs or histograms or self.fit.summary_pending or self.fit.count_calls_pending:
                self._once_per_step(module, step, logs)
        tracking = watcher.tracking
        if not (logs or histograms or tracking):
            return problems
        several = len(self.runtime.optimizers()) > 1  # tracking then lasts until the batch ends
        if not logs and tracking and not several:
            watcher.end_step()  # the first step's call counting
        if not (logs or histograms):
            return problems
        names = self._names(optimizer) if histograms or several else None  # (one optimizer: every parameter)
        if histograms:
            self._write_histograms(optimizer, names, step)
        if logs:
            self._log(optimizer, names if several else None, step, several)
        return problems

    def _log(self, optimizer: Optimizer, names: set[str] | None, step: int, several: bool) -> None:
        if self.update_ratio is not None:  # its values are written by the optimizer's step, if it runs
            self.update_ratio.arm(optimizer, self.watcher.named_params, lambda m: self.writer.scalars(m, step))
        metrics = self._before_clip.pop(id(optimizer), None)
        if metrics is None:
            self._measured.add(id(optimizer))
            metrics = self._compute(optimizer, names, step)
        if several:  # one total per optimizer: their steps see different gradients
            index = [id(o) for o in self.runtime.optimizers()].index(id(optimizer))
            if tags.GRAD_NORM_TOTAL in metrics:
                metrics[tags.grad_norm_total(index)] = metrics.pop(tags.GRAD_NORM_TOTAL)
        else:
            self.watcher.end_step()  # free the buffers now
        if self.fit.last_logged != step:
            self.fit.last_logged, self.fit.steps_logged = step, self.fit.steps_logged + 1
        self.writer.scalars(self.writer.first_at_step(metrics), step)
        if self.writer.metadata_logged == 0:  # the metadata said "no step logged yet": no longer true
            self.writer.metadata(self.watcher.module, self.watcher.tracker, step, self._status(step))

    def _watch_step(self, optimizer: Optimizer) -> None:
        """``after_optimizer_step`` from torch's public step post-hook (none for a step GradScaler skips)."""
        if id(optimizer) not in self._post_hooks and self._acting_now()["after_optimizer_step"]:
            self._post_hooks[id(optimizer)] = optimizer.register_step_post_hook(
                lambda opt, args, kwargs: self._hooks("after_optimizer_step", opt, self._stepping.get(id(opt), False))
            )

    def batch_end(self, accumulating: bool, step_may_follow: bool = False) -> list[Problem]:
        """The batch is over; ``accumulating``: the step's gradients are still being accumulated;
        ``step_may_follow``: the optimizer may still step (a plain loop's ``step()`` after its block)."""
        acting = self._acting if getattr(self.hooks, "version", 0) == self._hooks_seen else self._acting_now()
        for method in acting["batch_end"]:
            method(self.machine.logging)
        if self.update_ratio is not None and not step_may_follow:  # a copy whose step did not run (GradScaler)
            self.update_ratio.release()
        self._before_clip.clear()
        self._measured.clear()
        problems = self.machine.batch_end(accumulating)
        # a step that never reached the optimizer (training_step returned None): drop its hooks
        watcher = self.watcher
        if watcher is not None and not accumulating and watcher.tracking:
            watcher.end_step()
        return problems

    def accumulation_matters(self) -> bool:
        """Whether :meth:`batch_end`'s ``accumulating`` changes anything: no optimizer stepped in the batch,
        or a capture is installed. Otherwise a shell need not ask its loop (``False`` does the same)."""
        watcher = self.watcher
        return not self.machine.stepped or (watcher is not None and watcher.tracking)

    def end(self) -> None:
        """The fit finished: the pending non-finite record, and one warning if no step was logged."""
        if self.update_ratio is not None:
            self.update_ratio.release()
        if self.watcher is not None:
            self.watcher.end_step()
            self._read_pending_nonfinite()  # a NaN after the last logging step
            if self.fit.steps_logged == 0 and self.fit.steps_run and self.every_n:
                self._nothing_logged()
        self.writer.flush()

    def _nothing_logged(self) -> None:
        run = self.fit.steps_run
        self.warnings.nothing_logged(self.every_n, run)
        if self.writer.metadata_logged is not None:  # the tab's metadata says so too
            self.writer.metadata(self.watcher.module, self.watcher.tracker, run - 1, self._status(run - 1))

    def abort_batch(self, exc: BaseException) -> None:
        """The batch failed: its capture ends, the core stays ready for the next batch."""
        self._hooks("on_exception", exc)
        if self.update_ratio is not None:
            self.update_ratio.release()
        self._before_clip.clear()
        self._measured.clear()
        self.machine.reset()
        if self.watcher is not None:
            self.watcher.end_step()

    def on_exception(self, exc: BaseException) -> None:
        """The fit failed: everything off (``teardown``), as after a normal fit."""
        self.abort_batch(exc)
        self.teardown()

    def teardown(self) -> None:
        """Take every hook off, so that a later fit of the same model starts clean."""
        self._hooks("teardown")
        self._detach_features()
        for handle in self._post_hooks.values():
            handle.remove()
        self._post_hooks = {}
        if self.update_ratio is not None:
            self.update_ratio.release()
        if self.watcher is not None:
            self.watcher.end_step()
            self.watcher = None
        self.machine.reset()

    # -- the logging step ------------------------------------------------------------------------
    def _once_per_step(self, module: torch.nn.Module, step: int, logs: bool) -> None:
        # parameters changed by this step's forward (lazy ones materialized, a layer replaced in
        # `training_step`): from now on they are monitored; their call sites are counted next step
        if self.sync_parameters(module):
            return
        if self.fit.summary_pending:
            status = self._status(step, self.fit.steps_logged + int(logs))
            self.writer.summary(module, self.watcher.tracker, step, status)
            self.fit.summary_pending = False
        self.fit.count_calls_pending = False  # counted, even if no owning module was called (own parameters)

    def _names(self, optimizer: Optimizer) -> set[str]:
        """The parameters ``optimizer`` steps on; those no optimizer steps go with the first one."""
        named = self.watcher.named_params
        optimizers = list(self.runtime.optimizers())
        if len(optimizers) < 2:
            return {n for n, _ in named}
        ids_of = [{id(p) for g in opt.param_groups for p in g["params"]} for opt in optimizers]
        mine = next((ids for opt, ids in zip(optimizers, ids_of, strict=True) if opt is optimizer), set())
        first = optimizer is optimizers[0]
        stepped = set().union(*ids_of)
        return {n for n, p in named if id(p) in mine or (first and id(p) not in stepped)}

    def _scaling(self, optimizer: Optimizer) -> tuple[Tensor | None, Tensor | None]:
        """(contribution scale, gradient scale): AMP's 1/scale where the values are still scaled."""
        scaler = self.runtime.grad_scaler()
        if scaler is None:
            return None, None
        inv_scale = inverse_scale(scaler)  # on the device: no host sync
        if optimizer_unscaled(scaler, optimizer):
            return inv_scale, None  # grads unscaled, hooks saw scaled uses
        return None, inv_scale.double().square()  # the optimizer unscales itself: scale the sums

    def _compute(self, optimizer: Optimizer, names: set[str] | None, step: int) -> dict[str, float]:
        watcher = self.watcher
        contribution_scale, grad_scale = self._scaling(optimizer)
        group = distributed.reduction_group()  # every rank reaches here on the same steps
        self.warnings.unattributed(watcher)
        # ranks whose uses differ: one warning (the step named) among the fit's once-per-fit ones
        packed, layout = watcher.pack(
            contribution_scale, grad_scale, group, names, step=step, fit_warnings=self.warnings
        )
        self.warnings.uncaptured(watcher, layout)
        # the collectors' partial sums and earlier steps' NaN flags ride in the same transfer
        extras = [c.pack(optimizer).to(packed.device, torch.float64).reshape(-1) for c in self.collectors]
        record = self.nonfinite.device_record()
        if record is not None:
            extras.append(record.to(packed.device))
        size = packed.numel()
        packed = watcher.reduce(torch.cat([packed, *extras]), layout, group)  # sharded parameters only
        values = stats.to_host(packed)
        metrics = stats.finalize(values[:size], layout, self.config.aggregate_depth)
        offset = size
        for collector, extra in zip(self.collectors, extras, strict=False):
            metrics.update(collector.finalize(values[offset : offset + extra.numel()]))
            offset += extra.numel()
        if record is not None:
            self._report_nonfinite(self.nonfinite.read_record(values[offset:]))
        if self.runtime.grad_scaler() is not None:
            if not all(math.isfinite(v) for k, v in metrics.items() if k.startswith(tags.GRAD_NORM)):
                # GradScaler will skip this step: its gradients are overflow garbage, not training signal
                return {k: v for k, v in metrics.items() if not _from_gradients(k)}
        else:
            self._report_nonfinite(self.nonfinite.from_metrics(metrics, step))
        summed_in = watcher.tracker.summed_in() if watcher.tracker is not None else {}
        return self.warnings.partial_uses(metrics, layout, self.fit.accumulated_before, summed_in)

    def _read_pending_nonfinite(self) -> None:
        record = self.nonfinite.device_record()
        if record is None:
            return
        group = distributed.reduction_group()
        if group is not None and self.watcher is not None and self.watcher.sharded:
            record = distributed.all_reduce_sum(record, group)  # every rank ends the fit here
        self._report_nonfinite(self.nonfinite.read_record(stats.to_host(record)))

    def _report_nonfinite(self, report: NonFiniteReport | None) -> None:
        if report is None:
            return
        if report.first:
            self.writer.text(tags.NONFINITE_TAG, report.markdown(), report.step)
        self.nonfinite.raise_if_asked(report)
        distributed.warn_rank_zero(report.message())

    # -- writing ---------------------------------------------------------------------------------
    def _status(self, step: int, logged: int | None = None) -> dict[str, int]:
        """The run's logging status in the tab's metadata (``steps_logged`` 0: no step logged yet)."""
        logged = self.fit.steps_logged if logged is None else logged
        run = max(self.fit.steps_run, step + 1)
        return {"steps_logged": logged, "log_every_n_steps": self.every_n, "steps_run": run}

    def _write_histograms(self, optimizer: Optimizer, names: set[str], step: int) -> None:
        if not self.writer.rich():
            return
        scaler = self.runtime.grad_scaler()
        still_scaled = scaler is not None and not optimizer_unscaled(scaler, optimizer)  # it unscales itself
        inv_scale = inverse_scale(scaler) if still_scaled else None
        weights, grads = histogram_values(self.watcher.named_params, names, inv_scale)
        self.writer.histograms(weights, grads, scaler is not None, step, self.warnings.once)


class EagerLoggingSteps(StepHook):
    """``eager_logging_steps``: a tracked batch runs eagerly under ``torch.compile`` (see :mod:`param_monitor.compile`).

    ``force_eager`` from the start of every tracked batch (a logging step, and the first step that names
    the call sites) to its optimizer step, so that the compiled forward and backward run module by module
    and the uses of shared parameters are seen; the user's stance is back for the optimizer step (with
    several optimizers at the batch's end: the batch's later forward passes are tracked too), and after
    an exception or the fit. Registered by the core for every shell (Lightning and the plain API).
    """

    def __init__(self, core: MonitorCore) -> None:
        self.core = core
        self.stance = EagerStance()

    def __getstate__(self) -> dict[str, Any]:  # ddp_spawn pickles the callback: a held stance is not state
        return {"core": self.core, "stance": EagerStance()}

    def batch_start(self, logging: bool) -> None:
        watcher = self.core.watcher  # (run after the core's own work: the capture is installed)
        if watcher is not None and watcher.tracking:
            self.stance.enter()

    def before_optimizer_step(self, optimizer: Optimizer, logging: bool) -> None:
        if self.stance.held and len(self.core.runtime.optimizers()) < 2:
            self.stance.exit()  # the optimizer step (compiled or not) runs as the user set it

    def batch_end(self, logging: bool) -> None:
        self.stance.exit()

    def on_exception(self, exc: BaseException) -> None:
        self.stance.exit()

    def teardown(self) -> None:
        self.stance.exit()


_EVENTS = tuple(name for name in vars(StepHook) if not name.startswith("_"))


def _from_gradients(tag: str) -> bool:
    """Whether ``tag``'s family is derived from gradients (the registry's ``gradient`` flag)."""
    family = tags.family_of(tag)
    return family is not None and family.gradient


def _signature(module: torch.nn.Module) -> Signature:
    """Each parameter slot as (local name, tensor id, type) in module order: a renamed, replaced or
    materialized (lazy: its type changes) parameter, or a replaced/moved module, changes it. The walk of
    ``module.modules()`` (each module once, depth first), without its generators and path strings:
    19 µs for 76 tensors in 60 modules (through ``modules()``: 32-38 µs; ``named_parameters()``: 4x that)."""
    slots: list[tuple[str, int, type]] = []
    seen: set[torch.nn.Module] = set()

    def visit(sub: torch.nn.Module) -> None:
        seen.add(sub)
        for k, p in sub._parameters.items():
            slots.append((k, id(p), type(p)))
        for child in sub._modules.values():
            if child is not None and child not in seen:
                visit(child)

    visit(module)
    return tuple(slots)
