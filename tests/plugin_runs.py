"""Short real runs for the PARAM MONITOR tab's tests: a real Trainer with the monitor writes them.

- ``tiny_shared``: a small MLP whose middle Linear is used twice (``model.2`` and ``model.4``);
- ``shared_mlp``: the exercise's ``SharedMLP`` (tied ``net.3``/``net.6``, or untied), on random images;
- ``nan_run``: the tiny model whose loss becomes NaN from step 6 on (gradients NaN, logged as they are).

Also the in-process TensorBoard app over a logdir (the data provider that ``tensorboard`` itself
builds without the fast loader) and the launcher that serves the tab without an installed entry point.
"""

from __future__ import annotations

import sys
import warnings
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import torch
from lightning.pytorch.loggers import TensorBoardLogger
from torch import nn

from tests.helpers.trainers import make_trainer

REPO_ROOT = Path(__file__).resolve().parents[1]
TINY_SHARED, TINY_SITES = "model.2.weight", ("model.2", "model.4")
MLP_SHARED, MLP_SITES = "model.net.3.weight", ("model.net.3", "model.net.6")
NAN_FROM_STEP = 6


class TinyShared(pl.LightningModule):
    """A middle Linear applied twice; optionally a NaN loss from ``nan_from`` on."""

    def __init__(self, nan_from: int | None = None) -> None:
        super().__init__()
        shared = nn.Linear(8, 8)
        self.model = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), shared, nn.ReLU(), shared, nn.Linear(8, 2))
        self.nan_from = nan_from

    def training_step(self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int) -> torch.Tensor:
        inputs, targets = batch
        loss = nn.functional.cross_entropy(self.model(inputs), targets)
        if self.nan_from is not None and self.global_step >= self.nan_from:
            loss = loss * float("nan")
        self.log("train_loss", loss)
        return loss

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SGD(self.parameters(), lr=0.1)


class ImageClassifier(pl.LightningModule):
    """The experiment's SharedMLP as ``self.model`` (so its tags read ``model.net.3.weight``)."""

    def __init__(self, tied: bool = True) -> None:
        super().__init__()
        sys.path.insert(0, str(REPO_ROOT))
        from experiments.models import SharedMLP, materialize

        self.model = materialize(SharedMLP(tied=tied))

    def training_step(self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int) -> torch.Tensor:
        images, labels = batch
        loss = nn.functional.cross_entropy(self.model(images), labels)
        self.log("train_loss", loss)
        return loss

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SGD(self.parameters(), lr=0.1)


def fit(module: pl.LightningModule, data: torch.utils.data.Dataset, save_dir: Path, name: str, steps: int) -> Path:
    logger = TensorBoardLogger(str(save_dir), name=name)
    trainer = make_trainer(save_dir, max_steps=steps, logger=logger)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the NaN run's warning, the few-workers hint
        trainer.fit(module, torch.utils.data.DataLoader(data, batch_size=8))
    return Path(logger.log_dir)


def train_tiny(save_dir: Path, name: str = "tiny_shared", steps: int = 12, nan_from: int | None = None) -> Path:
    torch.manual_seed(0)
    data = torch.utils.data.TensorDataset(torch.randn(64, 4), torch.randint(0, 2, (64,)))
    return fit(TinyShared(nan_from), data, save_dir, name, steps)


def train_shared_mlp(save_dir: Path, name: str = "shared_mlp", steps: int = 30, tied: bool = True) -> Path:
    torch.manual_seed(0)
    data = torch.utils.data.TensorDataset(torch.rand(240, 1, 28, 28), torch.randint(0, 10, (240,)))
    return fit(ImageClassifier(tied), data, save_dir, name, steps)


def wsgi_app(logdir: Path) -> Any:
    """TensorBoard's WSGI app over ``logdir`` with the PARAM MONITOR plugin, data read once.

    The multiplexer keeps what ``tensorboard`` keeps by default (a reservoir of 1,000 scalars per tag).
    """
    from tensorboard.backend import application
    from tensorboard.backend.event_processing import data_ingester, data_provider, plugin_event_multiplexer
    from tensorboard.plugins import base_plugin

    from param_monitor.tensorboard_plugin.plugin import ParamMonitorPlugin

    multiplexer = plugin_event_multiplexer.EventMultiplexer(  # what `tensorboard --load_fast=false` keeps
        size_guidance=data_ingester.DEFAULT_SIZE_GUIDANCE,
        tensor_size_guidance=data_ingester.DEFAULT_TENSOR_SIZE_GUIDANCE,
    )
    multiplexer.AddRunsFromDirectory(str(logdir))
    multiplexer.Reload()
    provider = data_provider.MultiplexerDataProvider(multiplexer, str(logdir))
    context = base_plugin.TBContext(logdir=str(logdir), data_provider=provider)
    return application.TensorBoardWSGI([ParamMonitorPlugin(context)], data_provider=provider)
