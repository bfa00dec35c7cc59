"""``ParameterMonitor``: the Lightning shell around :class:`~param_monitor.watcher.ParameterWatcher`.

The callback only decides *when* (which optimizer steps log), *what state the gradients are in*
(accumulated? scaled by AMP? skipped?) and *where* to write; the maths lives in ``stats.py`` and
``sharing.py``.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import lightning.pytorch as pl
import torch
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.loggers import TensorBoardLogger
from lightning.pytorch.strategies import FSDPStrategy
from lightning.pytorch.utilities import rank_zero_warn
from lightning.pytorch.utilities.exceptions import MisconfigurationException
from torch import Tensor
from torch.amp.grad_scaler import OptState
from torch.optim import Optimizer

from param_monitor import distributed, stats
from param_monitor.table import format_markdown, parameter_table
from param_monitor.tensorboard_plugin.metadata import write_run_metadata
from param_monitor.watcher import ParameterWatcher
from param_monitor.writers import write_scalars

SUMMARY_TAG = "param_monitor/parameters"
WEIGHT_HIST = "weight_hist"
GRAD_HIST = "grad_hist"
# Σ uses − grad is ~1e-7 in fp32 and ~1e-4 under fp16 autocast; a missed use is O(1).
UNSEEN_USE_TOLERANCE = 1e-2
_GRAD_PREFIXES = (stats.GRAD_NORM, stats.SHARED_GRAD)  # also covers grad_norm_total, shared_grad_*


class NonFiniteGradientError(RuntimeError):
    """Raised when ``raise_on_nonfinite=True`` and a logged step has NaN/inf gradients."""


class ParameterMonitor(Callback):
    r"""Logs weight and gradient statistics, and the per-use gradients of shared parameters.

    Logged keys (``{name}`` is the parameter's first name in the LightningModule's
    ``named_parameters()``, ``{site}`` the module path of one use):

    ================================  ===============================================================
    ``weight_mean/{name}``            mean of the parameter's values
    ``weight_norm/{name}``            L2 norm of the values
    ``grad_norm/{name}``              L2 norm of the gradient the optimizer steps on (unscaled,
                                      fully accumulated, before clipping)
    ``grad_norm_total``               L2 norm over all unique monitored parameters (tied tensors once);
                                      with several optimizers, ``grad_norm_total/optimizer_{i}``
                                      per optimizer, each at its own ``optimizer.step()``
    ``shared_grad/{name}/{site}``     L2 norm of the contribution of ONE use of a shared parameter
    ``shared_grad_error/{name}``      ``‖Σ_sites contribution − grad‖ / ‖grad‖`` (≈1e-7 when every
                                      use is seen)
    ``shared_grad_cosine/{name}``     mean pairwise cosine between the uses' contributions
    ================================  ===============================================================

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

    TensorBoard only: the parameter table as text (``param_monitor/parameters``), a custom-scalars
    layout, and, when ``histogram_every_n_steps`` is set, ``weight_hist/{name}`` and
    ``grad_hist/{name}`` histograms.

    Args:
        log_every_n_steps: log every this many optimizer steps (default: the Trainer's). Steps
            are labelled like ``self.log`` metrics of ``training_step``, so curves line up.
            Steps that do not log install no hook, make no device sync and allocate nothing.
        track_shared: record per-use contributions of shared parameters on logging steps.
        histogram_every_n_steps: also write weight/gradient histograms this often (0: never).
        log_summary: write the parameter table once, when all parameters are materialized.
        check_finite_every_step: keep a device-side flag of NaN/inf gradients on EVERY step (one
            extra norm pass per step, no host sync), read on the next logging step. Without it,
            a NaN on a step that does not log is not seen.
        raise_on_nonfinite: raise :class:`NonFiniteGradientError` instead of warning.
        include: glob patterns (``fnmatch``) of parameter names to monitor (default: all).
        exclude: glob patterns of parameter names to leave out.
        aggregate_depth: report ``weight_*``/``grad_norm`` per module at this depth (see above)
            instead of per tensor: tens of tags instead of thousands (default: per tensor).
    """

    def __init__(
        self,
        log_every_n_steps: int | None = None,
        track_shared: bool = True,
        histogram_every_n_steps: int = 0,
        log_summary: bool = True,
        check_finite_every_step: bool = False,
        raise_on_nonfinite: bool = False,
        include: Sequence[str] | None = None,
        exclude: Sequence[str] | None = None,
        aggregate_depth: int | None = None,
    ) -> None:
        if log_every_n_steps is not None and (not isinstance(log_every_n_steps, int) or log_every_n_steps < 1):
            raise MisconfigurationException(
                f"`log_every_n_steps` must be a positive int or None (the Trainer's), got {log_every_n_steps!r}."
            )
        if not isinstance(histogram_every_n_steps, int) or histogram_every_n_steps < 0:
            raise MisconfigurationException(
                f"`histogram_every_n_steps` must be an int >= 0 (0 disables), got {histogram_every_n_steps!r}."
            )
        if aggregate_depth is not None and (not isinstance(aggregate_depth, int) or aggregate_depth < 1):
            raise MisconfigurationException(
                f"`aggregate_depth` must be a positive int or None (per tensor), got {aggregate_depth!r}."
            )
        for arg, value in (("include", include), ("exclude", exclude)):
            if isinstance(value, str):
                raise MisconfigurationException(f"`{arg}` must be a list of glob patterns, not a string: {value!r}.")
        self.log_every_n_steps = log_every_n_steps
        self.track_shared = track_shared
        self.histogram_every_n_steps = histogram_every_n_steps
        self.log_summary = log_summary
        self.check_finite_every_step = check_finite_every_step
        self.raise_on_nonfinite = raise_on_nonfinite
        self.include = list(include) if include is not None else None
        self.exclude = list(exclude) if exclude is not None else None
        self.aggregate_depth = aggregate_depth
        self._reset_fit_state()

    def _reset_fit_state(self) -> None:
        self._watcher: ParameterWatcher | None = None
        self._every_n = 1
        self._logging_step: int | None = None  # the step whose batches are being tracked
        self._done_step: int | None = None  # the step whose once-per-step work is done
        self._stepped_optimizers: set[int] = set()  # optimizers of that step already written
        self._summary_pending = self.log_summary
        # the first step counts module calls (no views, no buffers): it names call sites and tells
        # later logging steps which parameters are shared, so that only those get views
        self._count_calls_pending = True
        self._warned_nonfinite = False
        self._warned_unseen: set[str] = set()
        self._nonfinite_flag: Tensor | None = None

    # -- pickling (ddp_spawn): hooks and module references are not state -----------------
    def __getstate__(self) -> dict[str, Any]:
        state = self.__dict__.copy()
        state["_watcher"] = None
        state["_nonfinite_flag"] = None
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
        track = self.track_shared
        if track and _is_compiled(pl_module):
            rank_zero_warn(
                "`ParameterMonitor`: the model is `torch.compile`d; per-use tracking of shared parameters "
                "needs eager module calls and is switched off (per-tensor statistics still work)."
            )
            track = False
        self._watcher = ParameterWatcher(
            pl_module,
            track_shared=track,
            include=self.include,
            exclude=self.exclude,
            aggregate_depth=self.aggregate_depth,
        )

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        # The strategy may have replaced the parameters since `setup` (FSDP2's `fully_shard` in `configure_model`).
        if self._watcher is not None:
            self._watcher.refresh()

    def _should_log(self, step: int) -> bool:
        # same rule as Lightning's logger connector: `(batches_that_stepped + 1) % n == 0`
        return bool(self._every_n) and (step + 1) % self._every_n == 0

    # -- hooks ----------------------------------------------------------------------------
    def on_train_batch_start(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any, batch_idx: int
    ) -> None:
        watcher = self._watcher
        if watcher is None:
            return
        step = _step(trainer)
        logs = self._should_log(step)
        if not (logs or self._summary_pending or self._count_calls_pending):
            return
        if watcher.lazy_materialized():
            watcher.refresh()
        if not watcher.tracking:
            # off-schedule, the first step only counts module calls to name the table's call sites
            watcher.start_step(capture=logs)
            self._logging_step = step if logs else None
        watcher.begin_forward()

    def on_before_optimizer_step(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, optimizer: Optimizer
    ) -> None:
        watcher = self._watcher
        if watcher is None:
            return
        step = _step(trainer)
        if self.check_finite_every_step and self._logging_step != step:  # a logging step checks anyway
            self._update_nonfinite_flag(watcher, trainer)
        if self._done_step != step:  # once per step, whatever the number of optimizers
            self._done_step = step
            self._stepped_optimizers.clear()
            self._once_per_step(trainer, pl_module, watcher, step)
        several = len(trainer.optimizers) > 1  # tracking then lasts until the batch ends
        if self._logging_step != step:
            if watcher.tracking and not several:  # the first step's call counting
                watcher.end_step()
            return
        if id(optimizer) in self._stepped_optimizers:
            return
        self._stepped_optimizers.add(id(optimizer))
        names = self._names_stepped_by(trainer, optimizer, watcher) if several else None
        metrics = self._compute(trainer, watcher, optimizer, names)
        if several:  # one total per optimizer: their steps see different gradients
            index = [id(o) for o in trainer.optimizers].index(id(optimizer))
            if stats.GRAD_NORM_TOTAL in metrics:
                metrics[f"{stats.GRAD_NORM_TOTAL}/optimizer_{index}"] = metrics.pop(stats.GRAD_NORM_TOTAL)
        else:
            watcher.end_step()  # free the buffers now
            self._logging_step = None
        if metrics:
            self._write_scalars(trainer, metrics, step)

    def _once_per_step(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, watcher: ParameterWatcher, step: int
    ) -> None:
        materialized = watcher.lazy_materialized()
        if materialized:
            watcher.refresh()  # materialized by this step's forward: from now on they are monitored
        if self.histogram_every_n_steps and (step + 1) % self.histogram_every_n_steps == 0:
            self._write_histograms(trainer, watcher, step)
        if self._summary_pending and not materialized:  # (after a refresh, call sites are known next step)
            self._write_summary(trainer, pl_module, watcher, step)
        if watcher.tracker is None or watcher.tracker.has_seen_forward:
            self._count_calls_pending = False

    @staticmethod
    def _names_stepped_by(trainer: pl.Trainer, optimizer: Optimizer, watcher: ParameterWatcher) -> set[str]:
        """The parameters ``optimizer`` steps on; those no optimizer steps go with the first one."""
        ids_of = [{id(p) for g in opt.param_groups for p in g["params"]} for opt in trainer.optimizers]
        mine = next(ids for opt, ids in zip(trainer.optimizers, ids_of, strict=True) if opt is optimizer)
        first = optimizer is trainer.optimizers[0]
        stepped = set().union(*ids_of)
        return {n for n, p in watcher.named_params if id(p) in mine or (first and id(p) not in stepped)}

    def on_train_batch_end(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        # a step that never reached the optimizer (training_step returned None): drop its hooks
        watcher = self._watcher
        if watcher is not None and watcher.tracking and not trainer.fit_loop._should_accumulate():
            watcher.end_step()
            self._logging_step = None

    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self._watcher is not None:
            self._watcher.end_step()
        for logger in trainer.loggers:
            if isinstance(logger, TensorBoardLogger) and trainer.is_global_zero:
                logger.experiment.flush()

    def teardown(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        if stage == "fit" and self._watcher is not None:
            self._watcher.end_step()
            self._watcher = None

    # -- the logging step -----------------------------------------------------------------
    def _compute(
        self, trainer: pl.Trainer, watcher: ParameterWatcher, optimizer: Optimizer, names: set[str] | None = None
    ) -> dict[str, float]:
        scaler = _grad_scaler(trainer)
        contribution_scale = grad_scale = None
        if scaler is not None:
            # Device-side 1/scale (as GradScaler.unscale_ computes it): no host sync.
            inv_scale = scaler._scale.double().reciprocal().float()
            if scaler._per_optimizer_states[id(optimizer)]["stage"] is OptState.UNSCALED:
                contribution_scale = inv_scale  # grads unscaled, hooks saw scaled uses
            else:
                grad_scale = inv_scale.double().square()  # optimizer unscales itself: scale the sums
        group = distributed.reduction_group()  # every rank reaches here on the same steps
        packed, layout = watcher.pack(contribution_scale, grad_scale, group, names)
        flag = self._nonfinite_flag
        if flag is not None:
            packed = torch.cat([packed, flag.to(packed.device, torch.float64).reshape(1)])
            self._nonfinite_flag = None
        packed = watcher.reduce(packed, layout, group)  # sharded parameters only (and their flags with them)
        values = stats.to_host(packed)
        if flag is not None and values.pop() and not self._warned_nonfinite:
            self._warn_nonfinite("a step that did not log, before this one", [], step=_step(trainer))
        metrics = stats.finalize(values, layout, self.aggregate_depth)
        self._warn_unseen_uses(metrics, layout)
        return self._handle_nonfinite(metrics, scaler is not None, _step(trainer))

    def _warn_unseen_uses(self, metrics: dict[str, float], layout: stats.StatsLayout) -> None:
        # A use outside any owning module's forward (``x @ self.wte.weight.T`` in a parent module)
        # reaches the parameter directly: the sites then do not add up to the gradient.
        for name, _ in layout.shared:
            error = metrics.get(f"{stats.SHARED_GRAD_ERROR}/{name}", 0.0)
            # a NaN/inf gradient makes the error meaningless: the non-finite warning covers it
            if math.isfinite(error) and error > UNSEEN_USE_TOLERANCE and name not in self._warned_unseen:
                self._warned_unseen.add(name)
                rank_zero_warn(
                    f"`ParameterMonitor`: the uses seen of shared parameter `{name}` add up to its gradient only "
                    f"within {error:.2g} (relative): it is also used outside the forward of the modules that own it "
                    "(e.g. `x @ module.weight.T` in a parent), and that use is not reported as a site."
                )

    def _handle_nonfinite(self, metrics: dict[str, float], scaled: bool, step: int) -> dict[str, float]:
        # read from the metrics: with `aggregate_depth` they name modules, not the layout's tensors
        prefix = f"{stats.GRAD_NORM}/"
        bad = [k[len(prefix) :] for k, v in metrics.items() if k.startswith(prefix) and not math.isfinite(v)]
        if not bad:
            return metrics
        if scaled:
            # GradScaler will skip this step: its gradients are overflow garbage, not training signal.
            return {k: v for k, v in metrics.items() if not k.startswith(_GRAD_PREFIXES)}
        if self.raise_on_nonfinite:
            raise NonFiniteGradientError(f"Non-finite gradients at step {step} in: {', '.join(bad[:5])}")
        if not self._warned_nonfinite:
            self._warn_nonfinite("this step", bad, step)
        return metrics

    def _warn_nonfinite(self, where: str, bad: list[str], step: int) -> None:
        self._warned_nonfinite = True
        first = f"; first in: {', '.join(bad[:3])}" if bad else ""
        rank_zero_warn(
            f"`ParameterMonitor`: non-finite (NaN/inf) gradients at step {step} ({where}){first}. "
            "They are logged as they are; this warning is shown once per fit."
        )
        if self.raise_on_nonfinite:
            raise NonFiniteGradientError(f"Non-finite gradients ({where}) at step {step}.")

    def _update_nonfinite_flag(self, watcher: ParameterWatcher, trainer: pl.Trainer) -> None:
        if _grad_scaler(trainer) is not None:
            return  # the scaler handles overflow by skipping the step
        grads = [distributed.local_tensor(p.grad) for _, p in watcher.named_params if p.grad is not None]
        if not grads:
            return
        bad = ~torch.isfinite(torch.stack(torch._foreach_norm(grads, 2, dtype=torch.float32))).all()
        self._nonfinite_flag = bad if self._nonfinite_flag is None else self._nonfinite_flag | bad

    # -- writing --------------------------------------------------------------------------
    def _write_scalars(self, trainer: pl.Trainer, metrics: dict[str, float], step: int) -> None:
        if not trainer.is_global_zero:
            return
        for logger in trainer.loggers:
            if isinstance(logger, TensorBoardLogger):
                write_scalars(logger.experiment, metrics, step)
            else:
                logger.log_metrics(metrics, step)

    def _tensorboard_writers(self, trainer: pl.Trainer) -> list[Any]:
        if not trainer.is_global_zero:
            return []
        return [lg.experiment for lg in trainer.loggers if isinstance(lg, TensorBoardLogger)]

    def _write_summary(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, watcher: ParameterWatcher, step: int
    ) -> None:
        tracker = watcher.tracker
        if tracker is not None and not tracker.has_seen_forward:
            return  # tracker just rebuilt (lazy parameters): name call sites on the next step
        call_sites = tracker.call_sites() if tracker is not None else {}
        table = format_markdown(parameter_table(pl_module, call_sites))
        shared_names = set(tracker.shared_names()) if tracker is not None else set()
        shared = {n: s for n, s in call_sites.items() if n in shared_names}
        for writer in self._tensorboard_writers(trainer):
            writer.add_text(SUMMARY_TAG, table, global_step=step)
            _write_layout(writer, shared)
            write_run_metadata(writer, parameter_table(pl_module, call_sites), shared, step)  # the PARAM MONITOR tab
        self._summary_pending = False

    def _write_histograms(self, trainer: pl.Trainer, watcher: ParameterWatcher, step: int) -> None:
        for writer in self._tensorboard_writers(trainer):
            for name, param in watcher.named_params:
                if distributed.is_sharded(param):
                    continue  # rank 0 holds one shard: its histogram would mislead (gathering costs a collective)
                writer.add_histogram(f"{WEIGHT_HIST}/{name}", param.detach().float(), step)
                if param.grad is not None:
                    writer.add_histogram(f"{GRAD_HIST}/{name}", param.grad.detach().float(), step)


def _write_layout(writer: Any, shared_sites: dict[str, list[str]]) -> None:
    from param_monitor.dashboard import custom_scalars_layout, write_layout

    write_layout(writer, custom_scalars_layout(shared_sites))


def _step(trainer: pl.Trainer) -> int:
    """The step label of Lightning's own ``self.log`` metrics in ``training_step``."""
    return trainer.fit_loop.epoch_loop._batches_that_stepped


def _grad_scaler(trainer: pl.Trainer) -> torch.amp.GradScaler | None:
    scaler = getattr(trainer.precision_plugin, "scaler", None)
    return scaler if scaler is not None and scaler.is_enabled() else None


def _is_compiled(module: torch.nn.Module) -> bool:
    if getattr(module, "_compiler_ctx", None):
        return True
    for sub in module.modules():
        if isinstance(sub, torch._dynamo.eval_frame.OptimizedModule):
            return True
        if getattr(sub, "_compiled_call_impl", None) is not None:
            return True
    return False
