"""Train the shared-layer MLP on FashionMNIST with ParameterMonitor (D2L 6.2, exercise 2).

    python -m experiments.shared_mlp                                  # the textbook's default run
    python -m experiments.shared_mlp --config configs/untied_mlp.yaml --trainer.max_epochs 2
    python -m experiments.shared_mlp fit --data.data_dir /tmp/data    # explicit subcommand also works

With no subcommand it fits. Afterwards it prints the final validation accuracy, the tied/untied
parameter counts, the path of ``summary.png`` (``param_monitor.report``: the run's TensorBoard data on
one picture) and the command that serves the run with TensorBoard (the venv's own, on 127.0.0.1).
Other subcommands (``validate`` ...) run plain LightningCLI.
"""

from __future__ import annotations

import sys
from collections.abc import Sequence
from pathlib import Path

if __package__ in (None, ""):
    # Run as a file (`python experiments/shared_mlp.py`), Python puts `experiments/` first on sys.path,
    # not the repository root, and `import experiments` fails: put the root there instead, exactly
    # as `python -m experiments.shared_mlp` does (also for the processes DDP starts from sys.argv).
    sys.path[0] = str(Path(__file__).resolve().parents[1])

from experiments.cli import SUBCOMMANDS, RunResult, build_cli, train  # noqa: E402
from experiments.models import SharedMLP, count_parameters, materialize  # noqa: E402
from param_monitor.report import plot_summary  # noqa: E402


def tied_untied_counts(model: SharedMLP) -> tuple[int, int]:
    """Unique parameter counts of ``model``'s architecture with the shared layer tied and untied."""
    counts = []
    for tied in (True, False):
        twin = SharedMLP(model.num_outputs, model.num_hiddens, model.num_shared_uses, model.dropout, tied)
        counts.append(count_parameters(materialize(twin)))
    return counts[0], counts[1]


def report(result: RunResult) -> None:
    """Print accuracy, tied/untied parameter counts, the summary plot and the TensorBoard command."""
    print(f"\nfinal val_acc: {result.val_acc:.4f}   unique parameters: {result.num_parameters}")
    net = getattr(result.cli.model, "model", None)
    if isinstance(net, SharedMLP) and net.num_shared_uses > 1:
        tied, untied = tied_untied_counts(net)
        print(
            f"this run is {'tied' if net.tied else 'untied'}; this network has {tied} unique parameters tied,"
            f" {untied} untied ({untied - tied} more).\n"
            "accuracy of both over seeds: python -m experiments.seeds --variants tied untied"
        )
    if result.log_dir is not None:
        print(f"summary plot: {plot_summary(result.log_dir)}")
        print(f"to browse the run (the PARAM MONITOR tab):  {tensorboard_command(result.log_dir)}")
        print("  (or `make tensorboard` for every run in lightning_logs/)")


def tensorboard_command(log_dir: Path) -> str:
    """A command that serves ``log_dir`` on 127.0.0.1, runnable as printed in this shell's directory.

    It names this interpreter's own ``tensorboard`` (inside ``.venv``, not on a new shell's PATH),
    relative to the working directory when it lies below it (``.venv/bin/tensorboard``).
    """
    exe = Path(sys.executable).parent / "tensorboard"
    if not exe.exists():
        return f"tensorboard --logdir {log_dir} --host 127.0.0.1"
    cwd = Path.cwd()
    shown = exe.relative_to(cwd) if exe.is_relative_to(cwd) else exe
    return f"{shown} --logdir {log_dir} --host 127.0.0.1"


def main(argv: Sequence[str] | None = None) -> RunResult | None:
    """Fit with the CLI (``argv`` defaults to ``sys.argv[1:]``, ``fit`` optional) and report."""
    args = list(sys.argv[1:] if argv is None else argv)
    if any(arg in SUBCOMMANDS and arg != "fit" for arg in args):
        build_cli(args)  # validate/test/predict: plain LightningCLI behaviour, nothing to report
        return None
    result = train([arg for arg in args if arg != "fit"])
    if result.cli.trainer.is_global_zero:  # under DDP every rank returns here; one report is enough
        report(result)
    return result


if __name__ == "__main__":
    main()
