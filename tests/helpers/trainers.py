"""The one Trainer factory of the tests: a quiet CPU Trainer with a TensorBoardLogger and a monitor."""

from __future__ import annotations

from pathlib import Path

import lightning.pytorch as pl
from lightning.pytorch.loggers import TensorBoardLogger
from torch.utils.data import DataLoader

from param_monitor import ParameterMonitor
from tests.helpers.events import read_scalars


def trainer_kwargs(tmp_path: Path, monitor: ParameterMonitor | None = None, **overrides: object) -> dict:
    """Four steps, every step logged, TensorBoard under ``tmp_path/tb``; ``overrides`` replace any of them."""
    kwargs: dict = dict(
        max_steps=4,
        log_every_n_steps=1,
        logger=TensorBoardLogger(str(tmp_path), name="tb"),
        callbacks=[monitor or ParameterMonitor()],
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        accelerator="cpu",
        devices=1,
    )
    kwargs.update(overrides)
    return kwargs


def make_trainer(tmp_path: Path, monitor: ParameterMonitor | None = None, **overrides: object) -> pl.Trainer:
    return pl.Trainer(**trainer_kwargs(tmp_path, monitor, **overrides))


def fit(
    module: pl.LightningModule,
    tmp_path: Path,
    monitor: ParameterMonitor | None = None,
    data: DataLoader | None = None,
    **overrides: object,
) -> tuple[pl.Trainer, dict[str, dict[int, float]]]:
    """Fit ``module`` on ``data`` (default: its own ``train_dataloader``); the scalars read back from the events."""
    trainer = make_trainer(tmp_path, monitor, **overrides)
    trainer.fit(module, data)
    return trainer, read_scalars(trainer.logger.log_dir) if trainer.logger else {}


def model_parallel_trainer(rank: int, port: int, out_dir: str, world: int, **overrides: object) -> pl.Trainer:
    """Rank ``rank`` of a ``ModelParallelStrategy`` (FSDP2) fit on CPU, every step logged to ``out_dir/run``.

    LOCAL_RANK makes Lightning treat the processes as launched externally (as torchrun does): its own
    launcher would re-run ``sys.argv``, i.e. pytest.
    """
    import os

    import torch
    from lightning.pytorch.strategies import ModelParallelStrategy

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), LOCAL_RANK=str(rank), NODE_RANK="0")
    torch.set_num_threads(1)
    kwargs = dict(
        devices=world,
        strategy=ModelParallelStrategy(data_parallel_size=world, tensor_parallel_size=1),
        logger=TensorBoardLogger(out_dir, name="", version="run"),
    )
    return make_trainer(Path(out_dir), ParameterMonitor(log_every_n_steps=1), **{**kwargs, **overrides})
