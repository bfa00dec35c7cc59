"""Every place where ``param_monitor`` reaches into Lightning or torch internals, in one module.

Each helper says why it is needed and which public API would replace it. The callback, the
tests and the benchmarks import these helpers instead of reaching in themselves, so a Lightning
or torch release that moves one of these attributes breaks one function, not every caller.
"""

from __future__ import annotations

from collections.abc import Mapping

import lightning.pytorch as pl
import torch
from lightning.fabric.utilities.logger import _add_prefix
from lightning.pytorch.loggers import Logger
from torch import Tensor
from torch.amp.grad_scaler import OptState
from torch.optim import Optimizer


def step_label(trainer: pl.Trainer) -> int:
    """The step label of Lightning's own ``self.log`` metrics in ``training_step``.

    Why: Lightning's logger connector labels metrics with ``_batches_that_stepped``, which is
    not ``trainer.global_step`` (that one counts every optimizer's steps, so a GAN's two
    optimizers make it run twice as fast). Public replacement: none yet (a
    ``trainer.logger_step``-like property would do).
    """
    return trainer.fit_loop.epoch_loop._batches_that_stepped


def should_accumulate(trainer: pl.Trainer) -> bool:
    """Whether this batch only accumulates gradients (automatic optimization, no optimizer step).

    Why: a batch that returned ``None`` from ``training_step`` reaches no optimizer step; the
    monitor must end its tracking at that batch's end unless the gradients are still being
    accumulated. Public replacement: none (the fit loop's ``_should_accumulate()``).
    """
    return trainer.fit_loop._should_accumulate()


def grad_scaler(trainer: pl.Trainer) -> torch.amp.GradScaler | None:
    """The enabled ``GradScaler`` of the precision plugin (``16-mixed``), else ``None``.

    Why: scaled gradients must be unscaled before their statistics are taken. ``scaler`` is an
    attribute of Lightning's ``MixedPrecision`` plugin, not part of the ``Precision`` interface.
    """
    scaler = getattr(trainer.precision_plugin, "scaler", None)
    return scaler if scaler is not None and scaler.is_enabled() else None


def inverse_scale(scaler: torch.amp.GradScaler) -> Tensor:
    """``1/scale`` as a device scalar, computed as ``GradScaler.unscale_`` does (float64 reciprocal).

    Why: ``GradScaler.get_scale()`` (the public API) copies the scale to the host, one device
    sync per logging step; ``_scale`` is the device tensor itself.
    """
    return scaler._scale.double().reciprocal().float()


def optimizer_unscaled(scaler: torch.amp.GradScaler, optimizer: Optimizer) -> bool:
    """Whether ``optimizer``'s gradients were unscaled already (``scaler.unscale_(optimizer)`` ran).

    Why: Lightning unscales before ``on_before_optimizer_step``, except for optimizers that unscale
    inside their own step (``Adam(fused=True)``): there the gradients are still scaled. Public
    replacement: none (``GradScaler`` keeps the stage in ``_per_optimizer_states``).
    """
    state = scaler._per_optimizer_states.get(id(optimizer))
    return state is not None and state["stage"] is OptState.UNSCALED


def is_compiled(module: torch.nn.Module) -> bool:
    """Whether ``module`` or a submodule runs under ``torch.compile`` (kept here for older imports).

    The private reaches it needs, and why, are documented in :func:`param_monitor.compile.compiled_parts`.
    """
    from param_monitor.compile import is_compiled as compiled

    return compiled(module)


def logger_prefixed(logger: Logger, metrics: Mapping[str, float]) -> Mapping[str, float]:
    """``metrics`` with the logger's ``prefix`` applied exactly as its own ``log_metrics`` applies it.

    Why: the monitor writes a TensorBoardLogger's scalars as one event through its writer, which
    bypasses ``log_metrics`` and so its prefix; ``_prefix``, ``LOGGER_JOIN_CHAR`` and
    ``_add_prefix`` are how Lightning's loggers build ``f"{prefix}-{name}"``. Public replacement:
    a ``Logger.prefix`` property (or ``log_metrics`` taking a pre-built ``Summary``).
    """
    prefix = getattr(logger, "_prefix", "")
    return _add_prefix(metrics, prefix, getattr(logger, "LOGGER_JOIN_CHAR", "-")) if prefix else metrics


def logger_prefix(logger: Logger) -> str:
    """The string :func:`logger_prefixed` puts before every name ("" without a prefix)."""
    prefix = getattr(logger, "_prefix", "")
    return f"{prefix}{getattr(logger, 'LOGGER_JOIN_CHAR', '-')}" if prefix else ""
