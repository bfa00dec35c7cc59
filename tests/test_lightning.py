"""The helpers that reach into Lightning/torch internals, checked against what Lightning itself does."""

from __future__ import annotations

from pathlib import Path

import lightning.pytorch as pl
import torch
import torch.nn as nn
from lightning.pytorch.loggers import TensorBoardLogger

from param_monitor import _lightning
from tests.helpers.events import read_scalars
from tests.helpers.modules import SharedMLP, fit


def test_step_label_is_the_step_of_self_log(tmp_path: Path) -> None:
    labels: list[int] = []

    class Labelled(SharedMLP):
        def on_before_optimizer_step(self, optimizer: torch.optim.Optimizer) -> None:
            super().on_before_optimizer_step(optimizer)
            labels.append(_lightning.step_label(self.trainer))

    _, scalars = fit(Labelled(), tmp_path, max_steps=3, accumulate_grad_batches=2)
    assert labels == sorted(scalars["train_loss"]) == [0, 1, 2]


def test_logger_prefixed_is_what_log_metrics_writes(tmp_path: Path) -> None:
    logger = TensorBoardLogger(str(tmp_path), name="tb", prefix="run")
    logger.log_metrics({"grad_norm/w": 1.0}, step=0)
    logger.experiment.flush()
    assert set(read_scalars(logger.log_dir)) == set(_lightning.logger_prefixed(logger, {"grad_norm/w": 1.0}))
    assert _lightning.logger_prefix(logger) + "grad_norm/w" == "run-grad_norm/w"
    plain = TensorBoardLogger(str(tmp_path), name="plain")
    assert _lightning.logger_prefixed(plain, {"a": 1.0}) == {"a": 1.0} and _lightning.logger_prefix(plain) == ""


def test_scaler_stage_and_inverse_scale() -> None:
    layer = nn.Linear(2, 2)
    opt = torch.optim.SGD(layer.parameters(), lr=0.1)
    scaler = torch.amp.GradScaler("cpu", init_scale=256.0)
    scaler.scale(layer(torch.ones(1, 2)).sum()).backward()
    assert not _lightning.optimizer_unscaled(scaler, opt)  # what fused optimizers leave behind
    scaler.unscale_(opt)
    assert _lightning.optimizer_unscaled(scaler, opt)
    assert _lightning.inverse_scale(scaler).item() == 1 / scaler.get_scale() == 1 / 256


def test_is_compiled() -> None:
    class Holder(pl.LightningModule):
        def __init__(self, inner: nn.Module) -> None:
            super().__init__()
            self.inner = inner

    assert not _lightning.is_compiled(Holder(nn.Linear(2, 2)))
    assert _lightning.is_compiled(Holder(torch.compile(nn.Linear(2, 2), backend="eager")))
    compiled_in_place = nn.Linear(2, 2)
    compiled_in_place.compile(backend="eager")
    assert _lightning.is_compiled(Holder(compiled_in_place))
