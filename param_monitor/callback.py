"""``ParameterMonitor``: the Lightning shell around :class:`~param_monitor.core.MonitorCore`.

It maps Lightning's hooks onto the core's events (in the spirit of Lightning's ``ThroughputMonitor``
over Fabric's ``Throughput``) and tells the core about the Trainer: its loggers (as sinks, rank 0
only), its AMP ``GradScaler``, its optimizers, the step label of ``self.log``. Everything else, the
logging step whole, is the core's; every reach into Lightning internals is in ``_lightning.py``.
"""

from __future__ import annotations

from collections.abc import Collection, Sequence
from dataclasses import fields
from functools import partial
from typing import Any

import lightning.pytorch as pl
import torch
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.loggers import TensorBoardLogger
from lightning.pytorch.strategies import FSDPStrategy
from lightning.pytorch.utilities import rank_zero_warn
from lightning.pytorch.utilities.exceptions import MisconfigurationException
from torch.optim import Optimizer

from param_monitor import _lightning, tags
from param_monitor.core import MonitorConfig, MonitorCore, StepHook
from param_monitor.nonfinite import NonFiniteGradientError
from param_monitor.sinks import MetricsSink, Sink, TensorBoardSink

__all__ = ["GRAD_HIST", "SUMMARY_TAG", "WEIGHT_HIST", "NonFiniteGradientError", "ParameterMonitor"]

# kept importable from here (older code imports them from the callback); the schema is tags.py's
SUMMARY_TAG = tags.SUMMARY_TAG
WEIGHT_HIST = tags.WEIGHT_HIST
GRAD_HIST = tags.GRAD_HIST
_OPTIONS = {f.name for f in fields(MonitorConfig)}


class ParameterMonitor(Callback):
    r"""Logs weight and gradient statistics, and the per-use gradients of shared parameters.

    Logged keys (``{name}`` is the parameter's first name in the LightningModule's
    ``named_parameters()``, ``{site}`` the module path of one use):

    ======================================  =========================================================
    ``weight_mean/{name}``                  mean of the parameter's values
    ``weight_norm/{name}``                  L2 norm of the values
    ``grad_norm/{name}``                    L2 norm of the gradient the optimizer steps on (unscaled,
                                            fully accumulated, before clipping)
    ``grad_norm_total``                     L2 norm over all unique monitored parameters (tied tensors once);
                                            with several optimizers, ``grad_norm_total/optimizer_{i}``
                                            per optimizer, each at its own ``optimizer.step()``
    ``shared_grad/{name}/{site}``           L2 norm of the contribution of ONE use of a shared parameter
    ``shared_grad_share/{name}/{site}``     that use's share ``<c_site, S> / ‖S‖²`` (S: the sum of the
                                            uses); the shares add up to 1, negative: pulling against
    ``shared_grad_error/{name}``            ``‖Σ_sites contribution − grad‖ / ‖grad‖`` (≈1e-7 when every
                                            use is seen)
    ``shared_grad_cosine/{name}``           mean pairwise cosine between the uses' contributions
    ``update_ratio/{name}``                 ``‖w_after − w_before‖ / ‖w_before‖`` of the optimizer step the
                                            logging step takes (``log_update_ratio=True``; per module with
                                            ``aggregate_depth``); nothing for a step GradScaler skips
    ``dead_units/{name}``                   Linear/Conv weights: fraction of output units (rows) whose
                                            gradient row is exactly zero on this batch (``log_dead_units=True``)
    ======================================  =========================================================

    With ``aggregate_depth=k`` the ``weight_*`` and ``grad_norm`` keys name MODULES instead of
    tensors: ``{name}`` becomes the first ``k`` components of the parameter's module path
    (``model.blocks.3.attn.weight`` → ``model.blocks.3`` for k=3; a shorter module path whole;
    a parameter of the LightningModule itself keeps its own name). Over a group's tensors:

    ================================  ===============================================================
    ``weight_mean/{module}``          Σ values / Σ numel (the mean of all its values, not of means)
    ``weight_norm/{module}``          sqrt(Σ_tensors ‖w‖²): the norm of all its values as one vector
    ``grad_norm/{module}``            sqrt(Σ_tensors ‖g‖²) over its tensors that have a gradient
    ================================  ===============================================================

    ``grad_norm_total`` and the ``shared_grad*`` keys are unchanged (per shared parameter).

    Several processes: under DDP (``ddp``/``ddp_spawn``) the statistics are those of the averaged
    gradient the optimizer steps on; the per-use contributions, captured before DDP's all-reduce,
    are averaged over the ranks the same way (one all-reduce per logging step, none otherwise).
    With sharded parameters (FSDP2 ``fully_shard``/DTensor) each rank sums over its shards and the
    partial sums are all-reduced once; shared-use tracking is then off (with a warning). Only rank 0
    writes.

    TensorBoard only: the parameter table as text (``param_monitor/parameters``), the record of the
    first non-finite gradients (``param_monitor/nonfinite``), a custom-scalars layout, and, when
    ``histogram_every_n_steps`` is set, ``weight_hist/{name}`` and ``grad_hist/{name}`` histograms.
    A ``TensorBoardLogger(prefix=...)`` prefixes the scalars as its ``log_metrics`` would.

    Manual optimization: the statistics of a logging step are taken before ``self.clip_gradients``
    (the gradient the README promises, and the one the per-use contributions add up to). A fit that
    ends before its first logging step warns once, and its run metadata says so (``steps_logged: 0``).

    Args:
        log_every_n_steps: log every this many optimizer steps (default: the Trainer's). Steps
            are labelled like ``self.log`` metrics of ``training_step``, so curves line up.
            Steps that do not log install no hook, make no device sync and allocate nothing.
        track_shared: record per-use contributions of shared parameters on logging steps.
        histogram_every_n_steps: also write weight/gradient histograms this often (0: never).
        log_summary: write the parameter table once, when all parameters are materialized.
        check_finite_every_step: keep a device-side record of NaN/inf gradients on EVERY step (one
            extra norm pass per step, no host sync), read on the next logging step and at the end
            of fit. Without it, a NaN on a step that does not log is not seen.
        raise_on_nonfinite: raise :class:`NonFiniteGradientError` instead of warning.
        include: glob patterns (``fnmatch``) of parameter names to monitor (default: all). A list
            or tuple of str; a lone str (one pattern per character) or a dict is refused.
        exclude: glob patterns of parameter names to leave out (same type as ``include``).
        aggregate_depth: report ``weight_*``/``grad_norm`` per module at this depth (see above)
            instead of per tensor: tens of tags instead of thousands (default: per tensor).
        log_update_ratio: log ``update_ratio/{name}``; copies the weights on logging steps only
            (one fused copy, freed after the step).
        log_dead_units: log ``dead_units/{name}`` (a per-batch measure: units silent for this batch).
        eager_logging_steps: under ``torch.compile`` (any way of compiling), run the tracked batches
            (logging steps) eagerly, ``torch.compiler.set_stance("force_eager")`` from the batch's start
            to its optimizer step, so that shared parameters' uses can be told apart; every other step
            stays compiled, with no recompile. A logging step then costs an eager forward and backward
            (eager memory), and code branching on ``torch.compiler.is_compiling()`` takes its eager
            branch there. ``False``: compiled models get no per-use tracking (one warning).
    """

    def __init__(
        self,
        log_every_n_steps: int | None = None,
        track_shared: bool = True,
        histogram_every_n_steps: int = 0,
        log_summary: bool = True,
        check_finite_every_step: bool = False,
        raise_on_nonfinite: bool = False,
        include: Collection[str] | None = None,
        exclude: Collection[str] | None = None,
        aggregate_depth: int | None = None,
        log_update_ratio: bool = False,
        log_dead_units: bool = False,
        eager_logging_steps: bool = True,
    ) -> None:
        options = {k: v for k, v in locals().items() if k in _OPTIONS}
        try:
            self.config = MonitorConfig(**options)
        except ValueError as error:
            raise MisconfigurationException(str(error)) from None
        self._core = MonitorCore(self.config, _TrainerRuntime())

    def __getattr__(self, name: str) -> Any:  # the options, read as attributes (`monitor.log_update_ratio`)
        if name in _OPTIONS and "config" in self.__dict__:
            return getattr(self.__dict__["config"], name)
        raise AttributeError(name)

    # -- set-up ---------------------------------------------------------------------------
    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        if stage != "fit":
            return
        if getattr(trainer, "barebones", False):
            raise MisconfigurationException(
                "`ParameterMonitor` cannot run under `Trainer(barebones=True)`: barebones mode forbids loggers, "
                "and the monitor writes through them. Drop `barebones=True`, or monitor a plain PyTorch loop with "
                "`param_monitor.PlainMonitor(model, SummaryWriter(...))`."
            )
        if not trainer.loggers:
            raise MisconfigurationException(
                "Cannot use `ParameterMonitor` with a Trainer that has no logger: pass e.g. "
                "`Trainer(logger=TensorBoardLogger('lightning_logs'))` (or leave `logger` unset)."
            )
        if isinstance(trainer.strategy, FSDPStrategy):
            raise MisconfigurationException(
                "`ParameterMonitor` does not support `FSDPStrategy` (FSDP1): its flat parameters hold rank-local "
                "fragments, and the statistics would silently describe rank 0's piece only. Use "
                "`ModelParallelStrategy` with `fully_shard` (FSDP2) in `configure_model`, or DDP."
            )
        self._core.runtime = _TrainerRuntime(trainer)

    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        # after `configure_model` (which may compile or shard the model) and the strategy's set-up; the core
        # checks there whether per-use tracking can run (a CUDA graph replay, compiled without eager logging steps)
        every_n = self.config.log_every_n_steps or trainer.log_every_n_steps
        if not every_n:
            rank_zero_warn("`ParameterMonitor` logs nothing: `Trainer(log_every_n_steps=0)` and no own value.")
        core = self._core
        core.start(pl_module, every_n or 0)
        if not pl_module.automatic_optimization:  # `self.clip_gradients` runs before `on_before_optimizer_step`
            core.hooks.append(_ClipWatch(core, trainer))

    # -- hooks ----------------------------------------------------------------------------
    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._core.sync_parameters(pl_module)

    def on_train_batch_start(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any, batch_idx: int
    ) -> None:
        self._core.batch_start(_lightning.step_label(trainer), pl_module)

    def on_before_backward(self, trainer: pl.Trainer, pl_module: pl.LightningModule, loss: torch.Tensor) -> None:
        self._core.before_backward(loss)  # each backward of a tracked step: its graph is walked for the uses

    def on_after_backward(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._core.after_backward()

    def on_before_optimizer_step(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, optimizer: Optimizer
    ) -> None:
        self._core.before_optimizer_step(optimizer, _lightning.step_label(trainer), pl_module)

    def on_train_batch_end(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        self._core.batch_end(accumulating=_lightning.should_accumulate(trainer))

    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._core.end()

    def on_exception(self, trainer: pl.Trainer, pl_module: pl.LightningModule, exception: BaseException) -> None:
        # `teardown` is not called after an exception: take the hooks off so that a later fit starts clean
        self._core.on_exception(exception)

    def teardown(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        if stage == "fit":
            self._core.teardown()


class _TrainerRuntime:
    """What the core asks of the loop, answered by a Trainer (see ``core.Runtime``)."""

    def __init__(self, trainer: pl.Trainer | None = None) -> None:
        self.trainer = trainer
        self._sinks: list[Sink] | None = None

    def __getstate__(self) -> dict[str, Any]:  # ddp_spawn pickles the callback: the Trainer is not state
        return {"trainer": None, "_sinks": None}

    def sinks(self) -> Sequence[Sink]:
        trainer = self.trainer
        if trainer is None or not trainer.is_global_zero:
            return []
        if self._sinks is None:
            self._sinks = [_sink(logger) for logger in trainer.loggers]
        return self._sinks

    def grad_scaler(self) -> torch.amp.GradScaler | None:
        return None if self.trainer is None else _lightning.grad_scaler(self.trainer)

    def optimizers(self) -> Sequence[Optimizer]:
        return [] if self.trainer is None else self.trainer.optimizers


def _sink(logger: Any) -> Sink:
    if isinstance(logger, TensorBoardLogger):
        prefixed = partial(_lightning.logger_prefixed, logger)
        return TensorBoardSink(logger.experiment, _lightning.logger_prefix(logger), prefixed)
    return MetricsSink(logger.log_metrics)  # applies its own prefix


class _ClipWatch(StepHook):
    """Manual optimization: the statistics are taken before ``self.clip_gradients`` rescales the gradients."""

    def __init__(self, core: MonitorCore, trainer: pl.Trainer) -> None:
        self.core = core
        self.undo = _lightning.intercept_clipping(
            trainer, lambda optimizer: core.before_clip(optimizer, _lightning.step_label(trainer))
        )

    def teardown(self) -> None:
        self.undo()
        if self in self.core.hooks:
            self.core.hooks.remove(self)
