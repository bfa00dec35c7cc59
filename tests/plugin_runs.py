"""Short real runs for the PARAM MONITOR tab's tests: a real Trainer with the monitor writes them.

- ``tiny_shared``: a small MLP whose middle Linear is used twice (``model.2`` and ``model.4``);
- ``shared_mlp``: the exercise's ``SharedMLP`` (tied ``net.3``/``net.6``, or untied), on random images;
- ``nan_run``: the tiny model whose loss becomes NaN from step 6 on (gradients NaN, logged as they are);
- ``albert``: an ALBERT-like model: one layer of 17 tensors called at every depth (12 by default)
  and an embedding tied to the output head (a group of one), update ratio and dead units on;
- ``no_step``: 30 steps with the Trainer's default ``log_every_n_steps=50`` (nothing logged);
- ``plain``: a plain PyTorch loop with ``ParameterWatcher`` and ``write_scalars`` (no Lightning).

The in-process TensorBoard app over a logdir (``wsgi_app``) lives in the package, in
``param_monitor.tensorboard_plugin.testing``, with the synthetic runs the benchmarks use too.
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

from param_monitor import ParameterMonitor
from param_monitor.tensorboard_plugin.testing import wsgi_app
from tests.helpers.trainers import make_trainer

__all__ = ["wsgi_app"]  # re-exported for the tests

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


ALBERT_TENSORS = 17
VOCAB, WIDTH = 40, 16


class AlbertLayer(nn.Module):
    """ALBERT's shared layer, small: attention (q, k, v, dense), two LayerNorms, a feed-forward, and
    a learned residual scale; 17 tensors, weights before biases."""

    def __init__(self) -> None:
        super().__init__()
        self.attention = nn.ModuleDict({k: nn.Linear(WIDTH, WIDTH) for k in ("query", "key", "value", "dense")})
        self.attention_norm = nn.LayerNorm(WIDTH)
        self.ffn = nn.Linear(WIDTH, 2 * WIDTH)
        self.ffn_output = nn.Linear(2 * WIDTH, WIDTH)
        self.full_layer_norm = nn.LayerNorm(WIDTH)
        self.scale = nn.Parameter(torch.ones(()))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        a = self.attention
        q, k, v = a["query"](x), a["key"](x), a["value"](x)
        weights = torch.softmax(q @ k.transpose(-1, -2) / WIDTH**0.5, dim=-1)
        x = self.attention_norm(x + a["dense"](weights @ v))
        h = self.ffn_output(torch.relu(self.ffn(x)))
        return self.full_layer_norm(x + self.scale * h)


class AlbertLike(pl.LightningModule):
    """Token embedding tied to the output head, one ``AlbertLayer`` applied ``depth`` times."""

    def __init__(self, depth: int = 12) -> None:
        super().__init__()
        self.embeddings = nn.Embedding(VOCAB, WIDTH)
        self.layer = AlbertLayer()
        self.head = nn.Linear(WIDTH, VOCAB, bias=False)
        self.head.weight = self.embeddings.weight
        self.depth = depth

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        x = self.embeddings(tokens)
        for _ in range(self.depth):
            x = self.layer(x)
        return self.head(x)

    def training_step(self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int) -> torch.Tensor:
        tokens, targets = batch
        loss = nn.functional.cross_entropy(self(tokens).flatten(0, 1), targets.flatten())
        self.log("train_loss", loss)
        return loss

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.Adam(self.parameters(), lr=1e-3)


def fit(
    module: pl.LightningModule,
    data: torch.utils.data.Dataset,
    save_dir: Path,
    name: str,
    steps: int,
    log_every_n_steps: int | None = 1,
    **monitor: Any,
) -> Path:
    logger = TensorBoardLogger(str(save_dir), name=name)
    every = 50 if log_every_n_steps is None else log_every_n_steps  # None: the Trainer's default, 50
    trainer = make_trainer(
        save_dir, ParameterMonitor(**monitor), max_steps=steps, logger=logger, log_every_n_steps=every
    )
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


def train_albert(save_dir: Path, name: str = "albert", steps: int = 20, depth: int = 12) -> Path:
    torch.manual_seed(0)
    tokens = torch.randint(0, VOCAB, (64, 8))
    data = torch.utils.data.TensorDataset(tokens, tokens.roll(1, dims=1))
    return fit(AlbertLike(depth), data, save_dir, name, steps, log_update_ratio=True, log_dead_units=True)


def train_no_step(save_dir: Path, name: str = "no_step", steps: int = 30) -> Path:
    """30 steps, the Trainer's default ``log_every_n_steps=50``: the monitor logs no step."""
    torch.manual_seed(0)
    data = torch.utils.data.TensorDataset(torch.randn(240, 4), torch.randint(0, 2, (240,)))
    return fit(TinyShared(), data, save_dir, name, steps, log_every_n_steps=None)


def train_plain(save_dir: Path, name: str = "plain_loop", steps: int = 8) -> Path:
    """A plain PyTorch loop (no Lightning): ``ParameterWatcher`` and ``write_scalars`` every step."""
    from torch.utils.tensorboard import SummaryWriter

    from param_monitor.watcher import ParameterWatcher
    from param_monitor.writers import write_scalars

    torch.manual_seed(0)
    model = TinyShared().model
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    watcher = ParameterWatcher(model)
    run_dir = save_dir / name
    with SummaryWriter(str(run_dir)) as writer:
        for step in range(steps):
            inputs, targets = torch.randn(8, 4), torch.randint(0, 2, (8,))
            watcher.start_step()
            watcher.begin_forward()
            loss = nn.functional.cross_entropy(model(inputs), targets)
            watcher.before_backward(loss)
            loss.backward()
            watcher.after_backward()
            write_scalars(writer, watcher.compute(), step)
            optimizer.step()
            optimizer.zero_grad()
    return run_dir
