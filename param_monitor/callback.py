"""``ParameterMonitor``: the Lightning shell around :class:`~param_monitor.watcher.ParameterWatcher`.

The callback only decides *when* (which optimizer steps log), *what state the gradients are in*
(accumulated? scaled by AMP? skipped?) and *where* to write; the maths lives in ``stats.py`` and
``sharing.py``, the tag names in ``tags.py``, the non-finite record in ``nonfinite.py`` and every
reach into Lightning/torch internals in ``_lightning.py``.
"""

from __future__ import annotations

import fnmatch
import math
import re
from collections.abc import Collection
from typing import Any

import lightning.pytorch as pl
import torch
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.loggers import TensorBoardLogger
from lightning.pytorch.strategies import FSDPStrategy
from lightning.pytorch.utilities import rank_zero_warn
from lightning.pytorch.utilities.exceptions import MisconfigurationException
from torch.optim import Optimizer

from param_monitor import _lightning, distributed, stats, tags
from param_monitor.nonfinite import NonFiniteGradientError, NonFinitePolicy, NonFiniteReport
from param_monitor.table import format_markdown, parameter_table
from param_monitor.tensorboard_plugin.metadata import write_run_metadata
from param_monitor.update_ratio import UpdateRatio
from param_monitor.watcher import ParameterWatcher
from param_monitor.writers import write_scalars

__all__ = ["GRAD_HIST", "SUMMARY_TAG", "WEIGHT_HIST", "NonFiniteGradientError", "ParameterMonitor"]

# kept importable from here (older code imports them from the callback); the schema is tags.py's
SUMMARY_TAG = tags.SUMMARY_TAG
WEIGHT_HIST = tags.WEIGHT_HIST
GRAD_HIST = tags.GRAD_HIST
# Σ uses − grad is ~1e-7 in fp32 and ~1e-4 under fp16 autocast; a missed use is O(1).
UNSEEN_USE_TOLERANCE = 1e-2

Signature = tuple[tuple[str, int, type], ...]


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
    partial sums are all-reduced once; each use of a sharded shared parameter is reduce-scattered
    into this rank's shard in backward. Before combining, the ranks agree on the uses (one small
    all-gather per logging step); a parameter whose uses differ between ranks on a step (a
    data-dependent branch) gets no ``shared_grad*`` there, with one warning. Only rank 0 writes.

    TensorBoard only: the parameter table as text (``param_monitor/parameters``), the record of the
    first non-finite gradients (``param_monitor/nonfinite``), a custom-scalars layout, and, when
    ``histogram_every_n_steps`` is set, ``weight_hist/{name}`` and ``grad_hist/{name}`` histograms.
    A ``TensorBoardLogger(prefix=...)`` prefixes the scalars as its ``log_metrics`` would.

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
            (or tuple) of str; a lone str is refused rather than read as one pattern per character.
        exclude: glob patterns of parameter names to leave out (same type as ``include``).
        aggregate_depth: report ``weight_*``/``grad_norm`` per module at this depth (see above)
            instead of per tensor: tens of tags instead of thousands (default: per tensor).
        log_update_ratio: log ``update_ratio/{name}``; copies the weights on logging steps only
            (one fused copy, freed after the step).
        log_dead_units: log ``dead_units/{name}`` (a per-batch measure: units silent for this batch).
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
    ) -> None:
        _check_int("log_every_n_steps", log_every_n_steps, 1, "a positive int or None (the Trainer's)")
        _check_int("histogram_every_n_steps", histogram_every_n_steps, 0, "an int >= 0 (0 disables)", optional=False)
        _check_int("aggregate_depth", aggregate_depth, 1, "a positive int or None (per tensor)")
        for arg, flag in (
            ("track_shared", track_shared),
            ("log_summary", log_summary),
            ("check_finite_every_step", check_finite_every_step),
            ("raise_on_nonfinite", raise_on_nonfinite),
            ("log_update_ratio", log_update_ratio),
            ("log_dead_units", log_dead_units),
        ):
            if not isinstance(flag, bool):
                raise MisconfigurationException(f"`{arg}` must be True or False, got {flag!r}.")
        self.log_every_n_steps = log_every_n_steps
        self.track_shared = track_shared
        self.histogram_every_n_steps = histogram_every_n_steps
        self.log_summary = log_summary
        self.check_finite_every_step = check_finite_every_step
        self.raise_on_nonfinite = raise_on_nonfinite
        self.include = _patterns("include", include)
        self.exclude = _patterns("exclude", exclude)
        self.aggregate_depth = aggregate_depth
        self.log_update_ratio = log_update_ratio
        self.log_dead_units = log_dead_units
        self._reset_fit_state()

    def _reset_fit_state(self) -> None:
        self._watcher: ParameterWatcher | None = None
        self._every_n = 1
        self._signature: Signature = ()  # the module's parameters the watcher was built from
        self._logging_step: int | None = None  # the step whose batches are being tracked
        self._done_step: int | None = None  # the step whose once-per-step work is done
        self._written: set[str] = set()  # tags of that step already written (a parameter of two optimizers)
        self._summary_pending = self.log_summary
        # the first step names the uses once (a graph walk, no buffers): the table's call sites
        self._count_calls_pending = True
        self._warned: set[str] = set()  # keys of the once-per-fit warnings already given
        self._nonfinite = NonFinitePolicy(self.raise_on_nonfinite)
        # manual optimization: batches since the last optimizer step, and whether the logging
        # batch started with the gradients of such batches (its uses are then only part of them)
        self._stepped_in_batch = False
        self._unstepped_batches = 0
        self._accumulated_before = False
        self._update_ratio = UpdateRatio(self.aggregate_depth) if self.log_update_ratio else None

    # -- pickling (ddp_spawn): hooks and module references are not state -----------------
    def __getstate__(self) -> dict[str, Any]:
        state = self.__dict__.copy()
        state["_watcher"] = None
        state["_update_ratio"] = None
        return state

    # -- set-up ---------------------------------------------------------------------------
    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        if stage != "fit":
            return
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
        self._reset_fit_state()
        self._every_n = self.log_every_n_steps or trainer.log_every_n_steps
        if not self._every_n:
            rank_zero_warn("`ParameterMonitor` logs nothing: `Trainer(log_every_n_steps=0)` and no own value.")

    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        # after `configure_model` (which may compile or shard the model) and the strategy's set-up
        track = self.track_shared
        if track and _lightning.is_compiled(pl_module):
            rank_zero_warn(
                "`ParameterMonitor`: the model is `torch.compile`d; per-use tracking of shared parameters "
                "needs eager module calls and is switched off (per-tensor statistics still work)."
            )
            track = False
        self._warn_unmatched_includes(pl_module)
        self._watcher = ParameterWatcher(
            pl_module,
            track_shared=track,
            include=self.include,
            exclude=self.exclude,
            aggregate_depth=self.aggregate_depth,
            dead_units=self.log_dead_units,
        )
        self._signature = _signature(pl_module)

    def _warn_unmatched_includes(self, pl_module: pl.LightningModule) -> None:
        names = [n for n, _ in pl_module.named_parameters()]
        unmatched = [p for p in self.include or [] if not any(fnmatch.fnmatchcase(n, p) for n in names)]
        if unmatched:
            example = f"names such as {names[0]!r}" if names else "names, and the model has none"
            rank_zero_warn(
                f"`ParameterMonitor`: `include` patterns match no parameter: {', '.join(map(repr, unmatched))} "
                f"(`fnmatch` globs over {example})."
            )

    def _sync_parameters(self, watcher: ParameterWatcher, pl_module: pl.LightningModule) -> bool:
        """Rebuild the watcher if the module's parameters changed (pruning, a replaced layer, lazy ones
        materialized); checked on logging and histogram steps only."""
        signature = _signature(pl_module)
        if signature == self._signature:
            return False
        self._signature = signature
        watcher.refresh()
        self._count_calls_pending = True  # call sites of the new modules are counted on the next forward
        self._summary_pending = self.log_summary
        return True

    def _logs(self, step: int) -> bool:
        # same rule as Lightning's logger connector: `(batches_that_stepped + 1) % n == 0`
        return bool(self._every_n) and (step + 1) % self._every_n == 0

    def _histograms_due(self, step: int) -> bool:
        return bool(self.histogram_every_n_steps) and (step + 1) % self.histogram_every_n_steps == 0

    # -- hooks ----------------------------------------------------------------------------
    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self._watcher is not None:
            self._sync_parameters(self._watcher, pl_module)

    def on_train_batch_start(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any, batch_idx: int
    ) -> None:
        watcher = self._watcher
        if watcher is None:
            return
        step = _lightning.step_label(trainer)
        logs = self._logs(step)
        if not (logs or self._summary_pending or self._count_calls_pending or self._histograms_due(step)):
            return
        if not watcher.tracking:  # (with several optimizers tracking lasts the batch)
            self._sync_parameters(watcher, pl_module)
        if logs and not pl_module.automatic_optimization:
            self._accumulated_before = self._unstepped_batches > 0 and any(
                p.grad is not None for _, p in watcher.named_params
            )
        if not (logs or self._summary_pending or self._count_calls_pending):
            return  # a histogram-only step: no hooks
        if not watcher.tracking:
            # off-schedule, the first step only counts module calls to name the table's call sites
            watcher.start_step(capture=logs)
            self._logging_step = step if logs else None
        watcher.begin_forward()

    def on_before_backward(self, trainer: pl.Trainer, pl_module: pl.LightningModule, loss: torch.Tensor) -> None:
        # each backward of a tracked step: its graph is walked for the uses of shared parameters
        if self._watcher is not None and self._watcher.tracking:
            self._watcher.before_backward(loss)

    def on_after_backward(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        # one backward's contributions are complete; the micro-batches' add up in the same buffers
        if self._watcher is not None and self._watcher.tracking:
            self._watcher.after_backward()

    def on_before_optimizer_step(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, optimizer: Optimizer
    ) -> None:
        watcher = self._watcher
        if watcher is None:
            return
        self._stepped_in_batch = True
        step = _lightning.step_label(trainer)
        logs, histograms = self._logging_step == step, self._histograms_due(step)
        if self.check_finite_every_step and not logs and _lightning.grad_scaler(trainer) is None:
            self._nonfinite.check_step(watcher.named_params, step)  # (a scaler skips non-finite steps itself)
        if self._done_step != step:  # once per step, whatever the number of optimizers
            self._done_step = step
            self._written.clear()
            if logs or histograms or self._summary_pending or self._count_calls_pending:
                self._once_per_step(trainer, pl_module, watcher, step)
        several = len(trainer.optimizers) > 1  # tracking then lasts until the batch ends
        if not logs and watcher.tracking and not several:
            watcher.end_step()  # the first step's call counting
        if not (logs or histograms):
            return
        names = self._names_stepped_by(trainer, optimizer, watcher)
        if histograms:
            self._write_histograms(trainer, watcher, optimizer, names, step)
        if not logs:
            return
        if self._update_ratio is not None:  # its values are written by the optimizer's step, if it runs
            self._update_ratio.arm(optimizer, watcher.named_params, lambda m: self._write_scalars(trainer, m, step))
        metrics = self._compute(trainer, watcher, optimizer, names if several else None, step)
        if several:  # one total per optimizer: their steps see different gradients
            index = [id(o) for o in trainer.optimizers].index(id(optimizer))
            if tags.GRAD_NORM_TOTAL in metrics:
                metrics[tags.grad_norm_total(index)] = metrics.pop(tags.GRAD_NORM_TOTAL)
        else:
            watcher.end_step()  # free the buffers now
            self._logging_step = None
        self._write_scalars(trainer, self._first_at_step(metrics), step)

    def _first_at_step(self, values: dict[str, Any]) -> dict[str, Any]:
        """What was not written yet at this step label: a parameter of two optimizers is written at the first."""
        fresh = {k: v for k, v in values.items() if k not in self._written}
        self._written.update(fresh)
        return fresh

    def _once_per_step(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, watcher: ParameterWatcher, step: int
    ) -> None:
        # parameters changed by this step's forward (lazy ones materialized, a layer replaced in
        # `training_step`): from now on they are monitored; their call sites are counted next step
        if self._sync_parameters(watcher, pl_module):
            return
        if self._summary_pending:
            self._write_summary(trainer, pl_module, watcher, step)
        self._count_calls_pending = False  # counted, even if no owning module was called (own parameters)

    @staticmethod
    def _names_stepped_by(trainer: pl.Trainer, optimizer: Optimizer, watcher: ParameterWatcher) -> set[str]:
        """The parameters ``optimizer`` steps on; those no optimizer steps go with the first one."""
        if len(trainer.optimizers) < 2:
            return {n for n, _ in watcher.named_params}
        ids_of = [{id(p) for g in opt.param_groups for p in g["params"]} for opt in trainer.optimizers]
        mine = next(ids for opt, ids in zip(trainer.optimizers, ids_of, strict=True) if opt is optimizer)
        first = optimizer is trainer.optimizers[0]
        stepped = set().union(*ids_of)
        return {n for n, p in watcher.named_params if id(p) in mine or (first and id(p) not in stepped)}

    def on_train_batch_end(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        if self._update_ratio is not None:  # a copy whose step did not run (skipped by GradScaler)
            self._update_ratio.release()
        watcher = self._watcher
        if watcher is None:
            return
        if not pl_module.automatic_optimization:
            self._unstepped_batches = 0 if self._stepped_in_batch else self._unstepped_batches + 1
        self._stepped_in_batch = False
        # a step that never reached the optimizer (training_step returned None): drop its hooks
        if watcher.tracking and not _lightning.should_accumulate(trainer):
            watcher.end_step()
            self._logging_step = None

    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self._update_ratio is not None:
            self._update_ratio.release()
        if self._watcher is not None:
            self._watcher.end_step()
            self._read_pending_nonfinite(trainer)  # a NaN after the last logging step
        for logger in trainer.loggers:
            if isinstance(logger, TensorBoardLogger) and trainer.is_global_zero:
                logger.experiment.flush()

    def on_exception(self, trainer: pl.Trainer, pl_module: pl.LightningModule, exception: BaseException) -> None:
        # `teardown` is not called after an exception: take the hooks off so that a later fit of
        # the same model starts clean
        self.teardown(trainer, pl_module, "fit")

    def teardown(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        if stage == "fit" and self._watcher is not None:
            self._watcher.end_step()
            self._watcher = None
            self._logging_step = None

    # -- the logging step -----------------------------------------------------------------
    def _compute(
        self, trainer: pl.Trainer, watcher: ParameterWatcher, optimizer: Optimizer, names: set[str] | None, step: int
    ) -> dict[str, float]:
        scaler = _lightning.grad_scaler(trainer)
        contribution_scale = grad_scale = None
        if scaler is not None:
            inv_scale = _lightning.inverse_scale(scaler)  # on the device: no host sync
            if _lightning.optimizer_unscaled(scaler, optimizer):
                contribution_scale = inv_scale  # grads unscaled, hooks saw scaled uses
            else:
                grad_scale = inv_scale.double().square()  # optimizer unscales itself: scale the sums
        group = distributed.reduction_group()  # every rank reaches here on the same steps
        self._warn_unattributed(watcher)
        packed, layout = watcher.pack(contribution_scale, grad_scale, group, names, step=step)
        size = packed.numel()
        record = self._nonfinite.device_record()  # earlier steps' NaN flags ride in the same transfer
        if record is not None:
            packed = torch.cat([packed, record.to(packed.device)])
        packed = watcher.reduce(packed, layout, group)  # sharded parameters only (and the flags with them)
        values = stats.to_host(packed)
        if record is not None:
            self._report_nonfinite(trainer, self._nonfinite.read_record(values[size:]))
        metrics = stats.finalize(values[:size], layout, self.aggregate_depth)
        if scaler is not None:
            if not all(math.isfinite(v) for k, v in metrics.items() if k.startswith(tags.GRAD_NORM)):
                # GradScaler will skip this step: its gradients are overflow garbage, not training signal
                return {k: v for k, v in metrics.items() if not k.startswith(tags.GRADIENT_PREFIXES)}
        else:
            self._report_nonfinite(trainer, self._nonfinite.from_metrics(metrics, step))
        return self._drop_partial_uses(metrics, layout)

    def _warn_unattributed(self, watcher: ParameterWatcher) -> None:
        tracker = watcher.tracker
        if tracker is None or not tracker.active or not tracker.has_seen_forward:
            return
        for name, why in tracker.unattributed().items():
            self._warn_once(
                f"unattributed:{name}",
                f"`ParameterMonitor`: the uses of `{name}` cannot all be seen ({why}): its per-use "
                "contributions are not logged.",
            )

    def _drop_partial_uses(self, metrics: dict[str, float], layout: stats.StatsLayout) -> dict[str, float]:
        """Per-use values whose sites do not add up to the gradient: say why, once."""
        for name, _ in layout.shared:
            error = metrics.get(tags.shared_grad_error(name), 0.0)
            # a NaN/inf gradient makes the error meaningless: the non-finite report covers it
            if not (math.isfinite(error) and error > UNSEEN_USE_TOLERANCE):
                continue
            if self._accumulated_before:
                # manual optimization accumulated earlier batches into `.grad`: the uses of the
                # logging batch are only part of it, and the earlier batches were not tracked
                self._warn_once(
                    "manual-accumulation",
                    "`ParameterMonitor`: manual optimization accumulated gradients over several batches before "
                    "`optimizer.step()`; the per-use contributions are tracked on the logging batch only, so they "
                    "are part of the gradient: `shared_grad*` tags are not written on such steps.",
                )
                return {k: v for k, v in metrics.items() if not k.startswith(tags.SHARED_GRAD)}
            self._warn_once(
                f"unseen:{name}",
                f"`ParameterMonitor`: the uses seen of shared parameter `{name}` add up to its gradient only "
                f"within {error:.2g} (relative): part of its gradient did not come through the backward passes "
                "the monitor walked (reentrant checkpointing, or a gradient written or accumulated by hand).",
            )
        return metrics

    def _read_pending_nonfinite(self, trainer: pl.Trainer) -> None:
        record = self._nonfinite.device_record()
        if record is None:
            return
        group = distributed.reduction_group()
        if group is not None and self._watcher is not None and self._watcher.sharded:
            record = distributed.all_reduce_sum(record, group)  # every rank ends the fit here
        self._report_nonfinite(trainer, self._nonfinite.read_record(stats.to_host(record)))

    def _report_nonfinite(self, trainer: pl.Trainer, report: NonFiniteReport | None) -> None:
        if report is None:
            return
        if report.first:
            for writer in self._tensorboard_writers(trainer):
                writer.add_text(tags.NONFINITE_TAG, report.markdown(), global_step=report.step)
        self._nonfinite.raise_if_asked(report)
        rank_zero_warn(report.message())

    def _warn_once(self, key: str, message: str) -> None:
        if key not in self._warned:
            self._warned.add(key)
            rank_zero_warn(message)

    # -- writing --------------------------------------------------------------------------
    def _write_scalars(self, trainer: pl.Trainer, metrics: dict[str, float], step: int) -> None:
        if not trainer.is_global_zero or not metrics:
            return
        for logger in trainer.loggers:
            if isinstance(logger, TensorBoardLogger):
                write_scalars(logger.experiment, _lightning.logger_prefixed(logger, metrics), step)
            else:
                logger.log_metrics(metrics, step)  # applies its own prefix

    def _tensorboard_loggers(self, trainer: pl.Trainer) -> list[TensorBoardLogger]:
        if not trainer.is_global_zero:
            return []
        return [lg for lg in trainer.loggers if isinstance(lg, TensorBoardLogger)]

    def _tensorboard_writers(self, trainer: pl.Trainer) -> list[Any]:
        return [lg.experiment for lg in self._tensorboard_loggers(trainer)]

    def _write_summary(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, watcher: ParameterWatcher, step: int
    ) -> None:
        tracker = watcher.tracker
        call_sites = tracker.call_sites() if tracker is not None else {}
        table = format_markdown(parameter_table(pl_module, call_sites))
        shared_names = set(tracker.shared_names()) if tracker is not None else set()
        shared = {n: s for n, s in call_sites.items() if n in shared_names}
        for logger in self._tensorboard_loggers(trainer):
            logger.experiment.add_text(tags.SUMMARY_TAG, table, global_step=step)
            _write_layout(
                logger.experiment, shared, _lightning.logger_prefix(logger), self.log_update_ratio, self.log_dead_units
            )
            write_run_metadata(logger.experiment, parameter_table(pl_module, call_sites), shared, step)  # the tab
        self._summary_pending = False

    def _write_histograms(
        self, trainer: pl.Trainer, watcher: ParameterWatcher, optimizer: Optimizer, names: set[str], step: int
    ) -> None:
        writers = self._tensorboard_writers(trainer)
        if not writers:
            return
        # rank 0 holds one shard of a sharded parameter: its histogram would mislead (gathering costs a collective)
        params = [(n, p) for n, p in watcher.named_params if n in names and not distributed.is_sharded(p)]
        weights = {tags.weight_hist(n): p.detach().float() for n, p in params}
        grads = {tags.grad_hist(n): p.grad.detach().float() for n, p in params if p.grad is not None}
        scaler = _lightning.grad_scaler(trainer)
        if scaler is not None and grads and not _lightning.optimizer_unscaled(scaler, optimizer):
            inv_scale = _lightning.inverse_scale(scaler)  # the optimizer unscales itself: the grads are scaled
            grads = {tag: g * inv_scale.to(g.device) for tag, g in grads.items()}
        values = self._first_at_step({**weights, **grads})
        if not values:
            return
        weights = {tag: v for tag, v in weights.items() if tag in values}
        grads = {tag: v for tag, v in grads.items() if tag in values}
        flags = torch.stack([torch.isfinite(v).all() for v in values.values()]).tolist()  # one sync
        finite = dict(zip(values, flags, strict=True))
        if scaler is not None and not all(finite[tag] for tag in grads):
            grads = {}  # an overflow: GradScaler skips this step, its gradients are no training signal
        skipped = [tag for tag in {**weights, **grads} if not finite[tag]]
        if skipped:
            self._warn_once(
                "histogram",
                "`ParameterMonitor`: histograms of non-finite (NaN/inf) values are not written "
                f"({', '.join(skipped[:3])} at step {step}; shown once per fit): they would be empty or wrong.",
            )
        for writer in writers:
            for tag, value in {**weights, **grads}.items():
                if finite[tag]:
                    writer.add_histogram(tag, value, step)


def _write_layout(
    writer: Any, shared_sites: dict[str, list[str]], prefix: str, update_ratio: bool = False, dead_units: bool = False
) -> None:
    from param_monitor.dashboard import custom_scalars_layout, write_layout

    layout = custom_scalars_layout(shared_sites, update_ratio=update_ratio, dead_units=dead_units)
    if prefix:  # the charts' regexes must match the prefixed scalar names
        for category in layout.category:
            for chart in category.chart:
                regexes = [r"^" + re.escape(prefix) + tag.removeprefix("^") for tag in chart.multiline.tag]
                del chart.multiline.tag[:]
                chart.multiline.tag.extend(regexes)
    write_layout(writer, layout)


def _signature(module: torch.nn.Module) -> Signature:
    """Each parameter slot as (local name, tensor id, type) in module order: a renamed, replaced or
    materialized (lazy: its type changes) parameter, or a replaced/moved module, changes it. 4x cheaper than
    ``named_parameters()`` (no path strings): 65 µs for 76 tensors, 1.4 ms for 1,000 in 500 modules."""
    return tuple((k, id(p), type(p)) for sub in module.modules() for k, p in sub._parameters.items())


def _check_int(arg: str, value: object, minimum: int, allowed: str, optional: bool = True) -> None:
    if value is None and optional:
        return
    # bool is an int subclass: `log_every_n_steps=True` would silently mean 1
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise MisconfigurationException(f"`{arg}` must be {allowed}, got {value!r}.")


def _patterns(arg: str, value: object) -> list[str] | None:
    if value is None:
        return None
    if isinstance(value, str):
        raise MisconfigurationException(f"`{arg}` must be a list of glob patterns, not a string: use [{value!r}].")
    if not isinstance(value, Collection):
        raise MisconfigurationException(f"`{arg}` must be a list of glob patterns (str) or None, got {value!r}.")
    wrong = [p for p in value if not isinstance(p, str)]
    if wrong:
        raise MisconfigurationException(
            f"`{arg}` must be a list of glob patterns (str), got {value!r}: {wrong[0]!r} is not a str."
        )
    return list(value)
