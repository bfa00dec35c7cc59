"""The one seeds runner: variants x seeds, in Lightning and/or the plain-PyTorch twin, and the table.

    python -m experiments.seeds --seeds 20                               # the default run, seeds 0-19
    python -m experiments.seeds --seeds 20 --variants tied untied        # exercise 3, measured
    python -m experiments.seeds --seeds 20 --loops lightning plain       # Lightning against the plain loop
    python -m experiments.seeds --seeds 200 --loops plain                # searching for a failed run (~3 s each)
    python -m experiments.seeds --seeds 5 --model.init_seed 7            # one initialization, five data orders
    python -m experiments.seeds --seeds 1 --first-seed 7 --loops reference   # the issue's reference loop, seed 7

Every argument this runner does not know goes to the LightningCLI (``--config``, ``--trainer.*``,
``--model.*``, ``--data.*``), for every variant; the plain loop reads its settings (epochs, lr, batch
size, data dir, tying, init seed) from the same parsed configuration, so both loops run the same
experiment. A variant adds its own overrides (``VARIANTS``). Logger, monitor, progress bar and
checkpoints are off (``--tensorboard`` keeps a TensorBoard log per run, without the monitor).

Prints one line per seed as it finishes, then per variant and loop: unique parameters, median, IQR,
min, max and the failed runs (val_acc below ``--fail-below``, 0.5 by default: a run that failed to learn).
"""

from __future__ import annotations

import argparse
import logging
import statistics
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch

if __package__ in (None, ""):
    # Run as a file (`python experiments/seeds.py`), Python puts `experiments/` first on sys.path,
    # not the repository root, and `import experiments` fails: put the root there instead, exactly
    # as `python -m experiments.seeds` does (also for the processes DDP starts from sys.argv).
    sys.path[0] = str(Path(__file__).resolve().parents[1])

from experiments.cli import LOG_SAVE_DIR, QUIET_TRAINER_ARGS, RunResult, build_cli, train  # noqa: E402

#: A run whose final val_acc is below this failed to learn (a healthy run ends near 0.80; failed ones near 0.36).
FAIL_BELOW = 0.5
#: CLI overrides of each variant (after the common arguments).
VARIANTS: dict[str, list[str]] = {
    "config": [],  # as the configuration (and the other arguments) say
    "tied": ["--model.model.init_args.tied=true"],
    "untied": ["--model.model.init_args.tied=false"],
}
#: lightning: the experiment; plain: its plain-PyTorch twin (same seeding); reference: the issue's
#: independent loop, seeded its own way (``experiments.plain.train_reference``; ignores init_seed).
LOOPS = ("lightning", "plain", "reference")


@dataclass(frozen=True)
class Spread:
    """Median and spread of one metric over seeds."""

    n: int
    median: float
    minimum: float
    maximum: float
    q1: float
    q3: float
    failed: int

    @property
    def iqr(self) -> float:
        """Interquartile range, ``q3 - q1``."""
        return self.q3 - self.q1

    def line(self, label: str) -> str:
        """One printable summary line."""
        return (
            f"{label}: median {self.median:.4f}  min {self.minimum:.4f}  max {self.maximum:.4f}  "
            f"IQR {self.iqr:.4f} [{self.q1:.4f}, {self.q3:.4f}]  failed {self.failed}/{self.n}"
        )


def spread(values: Sequence[float], fail_below: float = FAIL_BELOW) -> Spread:
    """Median, min, max, quartiles (inclusive method) and failure count of ``values``.

    >>> s = spread([0.1, 0.8, 0.82, 0.84])
    >>> round(s.median, 2), s.minimum, s.maximum, s.failed
    (0.81, 0.1, 0.84, 1)
    """
    if not values:
        raise ValueError("no values")
    q1, _, q3 = statistics.quantiles(values, n=4, method="inclusive") if len(values) > 1 else [values[0]] * 3
    return Spread(
        n=len(values),
        median=statistics.median(values),
        minimum=min(values),
        maximum=max(values),
        q1=q1,
        q3=q3,
        failed=sum(v < fail_below for v in values),
    )


def add_seed_arguments(parser: argparse.ArgumentParser, default_count: int = 20) -> None:
    """``--seeds N --first-seed S``: the seeds S .. S+N-1 (the one place that parses them)."""
    parser.add_argument("--seeds", type=int, default=default_count, help=f"number of seeds (default {default_count})")
    parser.add_argument("--first-seed", type=int, default=0, help="seeds are first-seed .. first-seed+N-1")


def seed_range(opts: argparse.Namespace) -> range:
    if opts.seeds < 1:
        raise SystemExit(f"--seeds must be positive, got {opts.seeds}")
    return range(opts.first_seed, opts.first_seed + opts.seeds)


def quiet_lightning() -> None:
    """Silence Lightning's per-run banner lines ("Seed set to", "GPU available", ...) for repeated runs."""
    for name in ("lightning.pytorch", "lightning.fabric", "lightning"):
        logging.getLogger(name).setLevel(logging.WARNING)


def train_seed(args: Sequence[str], seed: int, quiet: bool = True) -> RunResult:
    """One Lightning fit with ``--seed_everything seed``; ``quiet`` turns logger, monitor, bar and checkpoints off.

    ``args`` come after the quiet overrides, so they can turn any of them back on.
    """
    configs, rest = split_configs(args)
    prefix = list(QUIET_TRAINER_ARGS) if quiet else []
    return train([*configs, *prefix, f"--seed_everything={seed}", *rest], save_config=not quiet)


def split_configs(args: Sequence[str]) -> tuple[list[str], list[str]]:
    """``(--config arguments, the others)``, in order: the configs go first, so that the quiet overrides
    apply on top of them (an overlay that renames the logger must find the logger still there).

    >>> split_configs(["--config", "a.yaml", "--trainer.max_epochs=1", "--config=b.yaml"])
    (['--config', 'a.yaml', '--config=b.yaml'], ['--trainer.max_epochs=1'])
    """
    configs, rest, it = [], [], iter(args)
    for arg in it:
        if arg == "--config":
            configs += [arg, next(it)]
        elif arg.startswith("--config="):
            configs.append(arg)
        else:
            rest.append(arg)
    return configs, rest


@dataclass
class Settings:
    """One variant's run as the LightningCLI parses it: what the plain loop needs, and the size."""

    data_dir: str
    max_epochs: int
    lr: float
    batch_size: int
    tied: bool
    init_seed: int | None
    num_parameters: int
    whole_epochs: bool

    @classmethod
    def from_cli(cls, args: Sequence[str]) -> Settings:
        from experiments.models import count_parameters, materialize

        configs, rest = split_configs(args)
        cli = build_cli([*configs, *QUIET_TRAINER_ARGS, *rest], run=False)
        limits = (cli.trainer.max_steps, cli.trainer.limit_train_batches)
        return cls(
            data_dir=cli.datamodule.data_dir,
            max_epochs=cli.trainer.max_epochs,
            lr=cli.model.lr,
            batch_size=cli.datamodule.batch_size,
            tied=bool(getattr(cli.model.model, "tied", True)),
            init_seed=cli.model.init_seed,
            num_parameters=count_parameters(materialize(cli.model.model)),
            whole_epochs=limits[0] == -1 and limits[1] in (None, 1.0),
        )


@dataclass
class Runs:
    """Final val_acc per (variant, loop), in seed order, and each variant's unique parameter count."""

    seeds: list[int] = field(default_factory=list)
    accs: dict[tuple[str, str], list[float]] = field(default_factory=dict)
    num_parameters: dict[str, int] = field(default_factory=dict)


def run(
    cli_args: Sequence[str],
    seeds: Sequence[int],
    variants: Sequence[str] = ("tied",),
    loops: Sequence[str] = ("lightning",),
    log_name: str | None = None,
    on_row: Callable[[int, dict[tuple[str, str], float]], None] | None = None,
) -> Runs:
    """Every seed, every variant, every loop (interleaved, so a slow phase of the machine hits all alike)."""
    from experiments.plain import Splits, train_plain, train_reference

    runs = Runs()
    settings = {v: Settings.from_cli([*cli_args, *VARIANTS[v]]) for v in variants}
    runs.num_parameters = {v: s.num_parameters for v, s in settings.items()}
    twins = {"plain", "reference"} & set(loops)
    if twins and not all(s.whole_epochs for s in settings.values()):
        # the plain loop runs whole epochs: refuse rather than compare two different runs
        raise SystemExit("the plain loop takes --trainer.max_epochs only (no max_steps, no limit_train_batches)")
    splits = Splits.load(settings[variants[0]].data_dir) if twins else None
    for seed in seeds:
        row: dict[tuple[str, str], float] = {}
        for variant in variants:
            if "lightning" in loops:
                logger = _logger_args(log_name, variant, seed) if log_name else []
                row[(variant, "lightning")] = train_seed([*cli_args, *VARIANTS[variant], *logger], seed).val_acc
            if "plain" in loops:
                s = settings[variant]
                result = train_plain(
                    splits, seed, s.max_epochs, s.lr, s.batch_size, s.tied, validate_every_epoch=False,
                    init_seed=s.init_seed,
                )  # fmt: skip
                row[(variant, "plain")] = result.val_acc
            if "reference" in loops:
                s = settings[variant]
                reference = train_reference(splits, seed, s.max_epochs, s.lr, s.batch_size, s.tied)
                row[(variant, "reference")] = reference.val_acc
        runs.seeds.append(seed)
        for key, acc in row.items():
            runs.accs.setdefault(key, []).append(acc)
        if on_row is not None:
            on_row(seed, row)
    return runs


def _logger_args(log_name: str, variant: str, seed: int) -> list[str]:
    logger = (
        '{"class_path": "lightning.pytorch.loggers.TensorBoardLogger", "init_args": '
        f'{{"save_dir": "{LOG_SAVE_DIR}", "name": "{log_name}", "version": "{variant}_seed{seed}"}}}}'
    )
    return [f"--trainer.logger={logger}"]


def table(runs: Runs, fail_below: float = FAIL_BELOW) -> str:
    """The summary as a Markdown table (what the README quotes)."""
    lines = [
        f"| variant | loop | unique parameters | median val_acc | IQR | min | max | failed (<{fail_below:g}) |",
        "| --- | --- | ---: | ---: | --- | ---: | ---: | ---: |",
    ]
    for (variant, loop), accs in runs.accs.items():
        s = spread(accs, fail_below)
        lines.append(
            f"| {variant} | {loop} | {runs.num_parameters[variant]:,} | {s.median:.4f} | {s.q1:.4f}-{s.q3:.4f} "
            f"| {s.minimum:.4f} | {s.maximum:.4f} | {s.failed}/{s.n} |"
        )
    return "\n".join(lines)


def parse(argv: Sequence[str]) -> tuple[argparse.Namespace, list[str]]:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_seed_arguments(parser)
    parser.add_argument("--variants", nargs="+", choices=list(VARIANTS), default=["config"])
    parser.add_argument("--loops", nargs="+", choices=LOOPS, default=["lightning"])
    parser.add_argument("--fail-below", type=float, default=FAIL_BELOW, help="a run below this val_acc failed")
    parser.add_argument("--tensorboard", action="store_true", help="log every Lightning run to TensorBoard")
    parser.add_argument("--threads", type=int, default=1, help="torch.set_num_threads for the plain loop")
    return parser.parse_known_args(argv)


def main(argv: Sequence[str] | None = None) -> Runs:
    """Run, print a line per seed, then the table (and how often the two loops agreed)."""
    opts, cli_args = parse(sys.argv[1:] if argv is None else argv)
    quiet_lightning()
    torch.set_num_threads(opts.threads)
    log_name = f"seeds/{time.strftime('%Y%m%d-%H%M%S')}" if opts.tensorboard else None

    def show(seed: int, row: dict[tuple[str, str], float]) -> None:
        cells = "   ".join(
            f"{v} {loop} {acc:.4f}{' FAILED' if acc < opts.fail_below else ''}" for (v, loop), acc in row.items()
        )
        print(f"seed {seed:4d}: {cells}", flush=True)

    start = time.perf_counter()
    runs = run(cli_args, seed_range(opts), opts.variants, opts.loops, log_name, show)
    print(f"\nfinal val_acc, seeds {runs.seeds[0]}-{runs.seeds[-1]}, {time.perf_counter() - start:.0f} s:")
    print(table(runs, opts.fail_below))
    for variant in opts.variants:
        if {"lightning", "plain"} <= set(opts.loops):
            pairs = zip(runs.accs[(variant, "lightning")], runs.accs[(variant, "plain")], strict=True)
            same = sum(abs(a - b) < 0.5e-4 for a, b in pairs)  # < 1 image of 10k
            print(f"{variant}: Lightning and plain agree on {same}/{len(runs.seeds)} seeds")
    failed = [
        f"seed {seed} ({v}, {loop})"
        for (v, loop), accs in runs.accs.items()
        for seed, acc in zip(runs.seeds, accs, strict=True)
        if acc < opts.fail_below
    ]
    print(f"failed runs: {', '.join(failed) or 'none'}")
    if log_name:
        print(f"TensorBoard: tensorboard --logdir {LOG_SAVE_DIR}/{log_name}")
    return runs


if __name__ == "__main__":
    main()
