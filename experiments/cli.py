"""The experiment's LightningCLI, and helpers to run it from scripts, benchmarks and tests.

Defaults (all overridable from YAML or the command line) are the textbook's exercise 2:
``SharedMLP`` (8 hidden units, one layer used twice, no dropout), SGD lr 0.1, batch 256, 10 epochs.
"""

from __future__ import annotations

import sys
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import torch
from lightning.pytorch.cli import LightningArgumentParser, LightningCLI, SaveConfigCallback

from experiments.data import FashionMNISTDataModule
from experiments.module import Classifier

#: The fixed seed of the default run (``seed_everything``): val_acc 0.8249 after 10 epochs (>= 0.80).
DEFAULT_SEED = 0
DEFAULT_MAX_EPOCHS = 10
#: Where TensorBoardLogger writes: ``lightning_logs/shared_mlp/version_N``.
LOG_SAVE_DIR = "lightning_logs"
LOG_NAME = "shared_mlp"
SUBCOMMANDS = ("fit", "validate", "test", "predict")
#: torch intra-op threads. The matmuls here are tiny (256x784 @ 784x8): a second thread buys nothing,
#: and on a busy 2-core machine OpenMP's spinning threads made an epoch 13-40x slower (0.41 s with one
#: thread vs 5-17 s with two, measured with other jobs running).
DEFAULT_TORCH_THREADS = 1
#: Trainer overrides for repeated runs (multi-seed, benchmarks): no logger, monitor, bar or checkpoints.
QUIET_TRAINER_ARGS = (
    "--trainer.logger=false",
    "--trainer.callbacks=[]",
    "--trainer.enable_progress_bar=false",
    "--trainer.enable_model_summary=false",
    "--trainer.enable_checkpointing=false",
)


class ExperimentCLI(LightningCLI):
    """LightningCLI with this experiment's defaults for the logger and callbacks."""

    def add_arguments_to_parser(self, parser: LightningArgumentParser) -> None:
        """Default callbacks are config values (not ``trainer_defaults``), so a config can remove them."""
        parser.add_argument(
            "--torch_threads", type=int, default=DEFAULT_TORCH_THREADS, help="torch.set_num_threads (0: keep)"
        )
        parser.set_defaults(
            {
                "trainer.max_epochs": DEFAULT_MAX_EPOCHS,
                # Explicit (Classifier's None default means the same), so `--model.model.init_args.tied
                # false` works without naming the class first.
                "model.model": {"class_path": "experiments.models.SharedMLP"},
                # A class_path string (not an instance) keeps param_monitor's import lazy, until parsing.
                # both diagnostics on: they are what explains a failed run (docs/experiment.md, docs/failed_run.png)
                "trainer.callbacks": [
                    {
                        "class_path": "param_monitor.ParameterMonitor",
                        "init_args": {"log_update_ratio": True, "log_dead_units": True},
                    }
                ],
                "trainer.logger": {
                    "class_path": "lightning.pytorch.loggers.TensorBoardLogger",
                    "init_args": {"save_dir": LOG_SAVE_DIR, "name": LOG_NAME},
                },
            }
        )

    def before_fit(self) -> None:
        """Fix the logger's version in this process before any worker starts.

        ``ddp_spawn`` pickles the logger into its workers; unresolved, the workers pick a version and
        this process later picks the NEXT free one for ``log_dir`` (an empty folder).
        """
        for logger in self.trainer.loggers:
            _ = logger.version

    def before_instantiate_classes(self) -> None:
        """Apply ``--torch_threads`` before anything computes."""
        config = self.config[self.subcommand] if self.subcommand else self.config
        if config.torch_threads > 0:
            torch.set_num_threads(config.torch_threads)


def with_subcommand(args: Sequence[str]) -> list[str]:
    """``args`` with ``fit`` put in front when no subcommand is given (so a bare run trains)."""
    args = list(args)
    if any(arg in SUBCOMMANDS for arg in args) or any(arg in ("-h", "--help") for arg in args[:1]):
        return args
    return ["fit", *args]


def build_cli(args: Sequence[str], run: bool = True, save_config: bool = True) -> ExperimentCLI:
    """Parse ``args`` (``run=True``: a subcommand is added if missing, and it runs).

    ``run=False`` only instantiates model, data and trainer from ``args`` (no subcommand allowed).
    ``save_config=False`` skips writing ``config.yaml`` (repeated runs into one directory would clash).
    """
    with _as_command_line(with_subcommand(args) if run else list(args)):
        return ExperimentCLI(
            Classifier,
            FashionMNISTDataModule,
            seed_everything_default=DEFAULT_SEED,
            save_config_callback=SaveConfigCallback if save_config else None,
            args=None,  # read from sys.argv, set just above
            run=run,
        )


@contextmanager
def _as_command_line(args: Sequence[str]) -> Iterator[None]:
    """Make ``args`` the command line (``sys.argv[1:]``) while LightningCLI parses and runs them.

    Lightning's DDP launcher starts the other ranks by re-running ``sys.argv``: they must see the
    same arguments as rank 0 (with the subcommand), not our script's raw argv or nothing. Passing
    ``args=`` instead would make LightningCLI warn that both argv and args are given.
    """
    saved = sys.argv
    sys.argv = [saved[0], *args]
    try:
        yield
    finally:
        sys.argv = saved


@dataclass
class RunResult:
    """What a finished fit left behind."""

    cli: ExperimentCLI
    val_acc: float
    num_parameters: int
    log_dir: Path | None


def train(args: Sequence[str], save_config: bool = True) -> RunResult:
    """Fit with the CLI (args as on the command line, without subcommand); measure the final val_acc."""
    cli = build_cli(["fit", *args], run=True, save_config=save_config)
    if "val_acc" not in cli.trainer.callback_metrics:
        # Fit stopped before any validation (max_steps inside the first epoch): measure the final model.
        for callback in cli.trainer.callbacks:
            if isinstance(callback, SaveConfigCallback):  # saved by fit (in a worker under ddp_spawn)
                callback.already_saved = True
        cli.trainer.validate(cli.model, datamodule=cli.datamodule, verbose=False)
    val_acc = float(cli.trainer.callback_metrics["val_acc"])
    log_dir = Path(cli.trainer.log_dir) if cli.trainer.logger is not None else None
    # under ddp_spawn, `setup` ran in the workers only: the count comes back as a logged metric
    num_parameters = cli.model.hparams.get("num_parameters", cli.trainer.callback_metrics.get("num_parameters"))
    return RunResult(cli, val_acc, int(num_parameters), log_dir)
