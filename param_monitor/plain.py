"""``PlainMonitor``: the monitor in a hand-written PyTorch loop, two calls per step.

The same logging step as the Lightning callback (:mod:`param_monitor.core`): AMP unscaling, the
non-finite record, the per-optimizer split, the update ratio, the run metadata and the parameter
table, written to a ``SummaryWriter`` exactly as ``ParameterMonitor`` writes them. A forgotten call
cannot lose data silently: the step's phases are checked (:mod:`param_monitor.phases`) and every
missing call is a warning that names it.

>>> import torch, torch.nn as nn, torch.nn.functional as F, tempfile, warnings
>>> from torch.utils.tensorboard import SummaryWriter
>>> _ = torch.manual_seed(0)
>>> shared = nn.Linear(4, 4)
>>> model = nn.Sequential(nn.Linear(2, 4), shared, nn.ReLU(), shared)
>>> optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
>>> writer = SummaryWriter(tempfile.mkdtemp())
>>> monitor = PlainMonitor(model, writer, log_every_n_steps=1)
>>> for step in range(3):
...     optimizer.zero_grad()
...     with monitor.step(step) as s:              # the forward pass inside
...         loss = model(torch.randn(8, 2)).square().mean()
...         s.backward(loss)                       # loss.backward(), the uses captured
...         s.log(optimizer)                       # after backward (and unscale_), before clipping and step()
...     optimizer.step()
>>> sorted(k for k in s.metrics if k.startswith("shared_grad/1.weight"))
['shared_grad/1.weight/1', 'shared_grad/1.weight/3']
>>> monitor.close()

``s.log(optimizer)`` reads the gradients the optimizer steps on, so it comes before ``step()``, and
before any clipping (the gradient logged is the one from before clipping); ``step()`` may be inside
the block or after it. With a ``GradScaler``, pass it as
``scaler=``; ``s.backward(scaler.scale(loss))``; call ``s.log`` after ``scaler.unscale_(optimizer)``
if you unscale, else before ``scaler.step``. Several optimizers: pass them all as ``optimizers=``
and call ``s.log`` for each before its step. Gradient accumulation: the micro-batches' backward
passes in ONE ``with`` block (``s.backward`` once per micro-batch). A ``torch.compile``d model
(or step function): the block of a tracked step runs eagerly from its start to ``s.log`` (or to the
block's end with several optimizers), every other step compiled (``eager_logging_steps=False``:
no per-use tracking, one warning; see :mod:`param_monitor.compile`).
"""

from __future__ import annotations

from collections.abc import Sequence
from types import TracebackType
from typing import Any

import torch
from torch import nn
from torch.optim import Optimizer

from param_monitor import distributed
from param_monitor._torch import next_sequence_nr
from param_monitor.core import MonitorConfig, MonitorCore
from param_monitor.phases import Problem
from param_monitor.sinks import Sink, TensorBoardSink

_WHAT_TO_DO = {
    Problem.NO_BATCH_START: "run the forward pass inside `with monitor.step(step) as s:`",
    Problem.NO_BACKWARD: "call `s.backward(loss)` before `s.log(optimizer)`, instead of `loss.backward()`",
    Problem.UNFINISHED_BACKWARD: "call `s.backward(loss)` instead of `loss.backward()`",
    Problem.NOT_STEPPED: "call `s.log(optimizer)` after the backward pass, before `optimizer.step()`",
}


class PlainMonitor:
    """``ParameterMonitor`` for a plain loop: ``with monitor.step(step) as s`` around forward and backward.

    Args:
        model: the module whose parameters are monitored.
        writer: a ``torch.utils.tensorboard.SummaryWriter`` (or tensorboardX's), or a list of
            :class:`~param_monitor.sinks.Sink`. Only rank 0 writes.
        log_every_n_steps: log the steps ``step`` with ``(step + 1) % n == 0`` (Lightning's rule).
        scaler: the AMP ``GradScaler`` of the loop, if any (the values are logged unscaled).
        optimizers: every optimizer of the loop, when there are several (one
            ``grad_norm_total/optimizer_{i}`` each); one optimizer is found by ``s.log``.
        **options: the other options of ``ParameterMonitor`` (``track_shared``, ``include``,
            ``eager_logging_steps``, ...).
    """

    def __init__(
        self,
        model: nn.Module,
        writer: Any,
        log_every_n_steps: int = 50,
        scaler: torch.amp.GradScaler | None = None,
        optimizers: Sequence[Optimizer] = (),
        **options: Any,
    ) -> None:
        # the callback's None means "the Trainer's"; a plain loop has no Trainer (it would never log)
        if isinstance(log_every_n_steps, bool) or not isinstance(log_every_n_steps, int) or log_every_n_steps < 1:
            raise ValueError(f"`log_every_n_steps` must be a positive int, got {log_every_n_steps!r}.")
        self.model = model
        self.scaler = scaler
        self._optimizers = list(optimizers)
        rank_zero = distributed.is_rank_zero()
        if rank_zero or writer is not None:  # other ranks write nothing: they may pass None
            _check_writer(writer)
        sinks = list(writer) if isinstance(writer, list | tuple) else [TensorBoardSink(writer)]
        self._sinks: list[Sink] = sinks if rank_zero else []
        self.core = MonitorCore(MonitorConfig(log_every_n_steps=log_every_n_steps, **options), self)
        self.core.start(model, log_every_n_steps)
        self._open: MonitorStep | None = None
        self._warned: set[Problem | str] = set()
        self._closed = False
        self._last_step: int | None = None  # the label of the last step: labels must increase

    # -- what the core asks of the loop (core.Runtime) -------------------------------------------
    def sinks(self) -> Sequence[Sink]:
        return self._sinks

    def grad_scaler(self) -> torch.amp.GradScaler | None:
        return self.scaler if self.scaler is not None and self.scaler.is_enabled() else None

    def optimizers(self) -> Sequence[Optimizer]:
        return self._optimizers

    # -- the loop -------------------------------------------------------------------------------
    def step(self, step: int) -> MonitorStep:
        """The context of training step ``step``: forward and backward passes inside, ``s.log`` before ``step()``."""
        if isinstance(step, bool) or not isinstance(step, int) or step < 0:
            raise ValueError(f"`step` must be an int >= 0 (the step's label), got {step!r}.")
        if self._closed:  # its hooks are off: the step would run unmonitored
            raise RuntimeError("`PlainMonitor` is closed: `monitor.step()` needs a new `PlainMonitor`.")
        if self._last_step is not None and step <= self._last_step:
            # TensorBoard keeps one point per label and draws decreasing ones out of order
            self._warn(
                "labels",
                f"step labels must increase: step {step} after step {self._last_step} (a repeated label is "
                "written once, a smaller one out of order); pass a global step counter, not the batch index.",
            )
        self._last_step = step
        return MonitorStep(self, step)

    def close(self) -> None:
        """The end of training: the pending non-finite record, a warning if no step was logged, hooks off."""
        self._closed = True
        self.core.end()
        self.core.teardown()

    def __enter__(self) -> PlainMonitor:  # `with PlainMonitor(model, writer) as monitor:` closes it at the end
        return self

    def __exit__(self, *exc_info: object) -> None:
        if exc_info[0] is None:
            self.close()
        else:
            self.core.teardown()  # a failed run: hooks off, nothing more to report

    def _warn(self, key: Problem | str, message: str) -> None:
        if key not in self._warned:  # once per monitor: a loop repeats its mistake every step
            self._warned.add(key)
            distributed.warn_rank_zero(f"`PlainMonitor`: {message}")

    def _report(self, problems: list[Problem], step: int) -> None:
        for problem in problems:
            self._warn(problem, f"step {step}: {problem.value}, so it was not monitored: {_WHAT_TO_DO[problem]}.")


def _check_writer(writer: Any) -> None:
    """A ``SummaryWriter`` (anything with ``add_scalar`` and ``add_text``) or a list of sinks, refused at once
    otherwise: a wrong one would fail inside the first logging step, in the middle of training."""
    if isinstance(writer, list | tuple):
        wrong = [w for w in writer if not isinstance(w, Sink)]
        if not wrong:
            return
    elif all(callable(getattr(writer, method, None)) for method in ("add_scalar", "add_text")):
        return
    raise ValueError(
        "`writer` must be a `SummaryWriter` (torch's or tensorboardX's; None only on ranks other than 0) "
        f"or a list of `Sink`s, got {type(writer).__name__} {writer!r}."
    )


class MonitorStep:
    """One step's context (``monitor.step(step)``); ``metrics`` holds what ``log`` wrote last."""

    def __init__(self, monitor: PlainMonitor, step: int) -> None:
        self.monitor = monitor
        self.step = step
        self.logging = False
        self.metrics: dict[str, float] = {}
        self._first_node = 0
        self._logged: set[int] = set()  # id() of the optimizers `log` has read in this block

    def __enter__(self) -> MonitorStep:
        monitor = self.monitor
        if monitor._open is not None:
            raise RuntimeError("`PlainMonitor.step()` is already open: one step at a time (close the other block).")
        monitor._open = self
        self.logging, problems = monitor.core.batch_start(self.step, monitor.model)
        monitor._report(problems, self.step)
        watcher = monitor.core.watcher
        if self.logging and watcher is not None and watcher.tracker is not None:
            self._first_node = next_sequence_nr()  # a loss built before this point ran its forward outside
        return self

    def backward(self, loss: torch.Tensor, **kwargs: Any) -> None:
        """``loss.backward(**kwargs)`` with the capture around it (once per micro-batch)."""
        self._check_open("backward")
        grad_fn = getattr(loss, "grad_fn", None)
        if self._first_node and grad_fn is not None and grad_fn._sequence_nr() < self._first_node:
            self.monitor._warn(
                "outside",
                f"step {self.step}: the loss was computed before `monitor.step()` began, so its forward pass "
                "ran outside the block: the uses of shared parameters are not named by their modules "
                "(`<outside>`). Run the forward pass inside `with monitor.step(step) as s:`.",
            )
        core = self.monitor.core
        self.monitor._report(core.before_backward(loss), self.step)
        loss.backward(**kwargs)
        self.monitor._report(core.after_backward(), self.step)

    def log(self, optimizer: Optimizer) -> None:
        """Read ``optimizer``'s gradients (final: after every backward pass, before clipping and ``step()``)."""
        self._check_open("log")
        monitor = self.monitor
        if id(optimizer) in self._logged:
            # the first call took the statistics and freed the capture: a second read would find no
            # use captured and blame the backward pass
            monitor._warn(
                "log-twice",
                f"step {self.step}: `s.log(optimizer)` was called twice for the same optimizer; only the first "
                "call is logged: call it once per optimizer and step, after the last `s.backward`.",
            )
            return
        self._logged.add(id(optimizer))
        if not any(opt is optimizer for opt in monitor._optimizers):
            monitor._optimizers.append(optimizer)
        sinks = monitor._sinks
        captured: dict[str, float] = {}
        monitor._sinks = [_Tee(captured), *sinks]
        try:
            monitor._report(monitor.core.before_optimizer_step(optimizer, self.step, monitor.model), self.step)
        finally:
            monitor._sinks = sinks
        self.metrics = captured

    def _check_open(self, call: str) -> None:
        if self.monitor._open is not self:
            raise RuntimeError(f"`s.{call}()` outside its `with monitor.step(step) as s:` block.")

    def __exit__(
        self, kind: type[BaseException] | None, exc: BaseException | None, traceback: TracebackType | None
    ) -> None:
        monitor = self.monitor
        monitor._open = None
        if exc is not None:  # hooks off; the monitor stays usable for the next step
            monitor.core.abort_batch(exc)
            return
        monitor._report(monitor.core.batch_end(accumulating=False, step_may_follow=True), self.step)


class _Tee(Sink):
    """Keeps a copy of the scalars ``s.log`` writes (``s.metrics``)."""

    def __init__(self, into: dict[str, float]) -> None:
        self.into = into

    def scalars(self, metrics: Any, step: int) -> None:
        self.into.update(metrics)
