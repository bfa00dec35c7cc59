"""Train the experiment over several seeds and report the spread of the final validation accuracy.

    python experiments/multi_seed.py --seeds 20
    python experiments/multi_seed.py --seeds 10 --first-seed 100 --config configs/untied_mlp.yaml

Any argument this script does not know is passed to the LightningCLI (``--config``, ``--trainer.*``,
``--model.*``, ``--data.*``). The monitor, logger, progress bar and checkpoints are off (they would only
slow repeated runs down); pass e.g. ``--trainer.logger true`` to turn one back on.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # repo root, when run as a script

from experiments.cli import RunResult  # noqa: E402
from experiments.seeds import COLLAPSE_THRESHOLD, Spread, quiet_lightning, spread, train_seeds  # noqa: E402


def parse(argv: Sequence[str]) -> tuple[argparse.Namespace, list[str]]:
    """This script's options, and the rest (for the CLI)."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seeds", type=int, default=20, help="number of seeds (default 20)")
    parser.add_argument("--first-seed", type=int, default=0, help="seeds are first-seed .. first-seed+N-1")
    parser.add_argument("--collapse-threshold", type=float, default=COLLAPSE_THRESHOLD)
    return parser.parse_known_args(argv)


def main(argv: Sequence[str] | None = None) -> Spread:
    """Run every seed, print each final val_acc as it comes, then the summary."""
    opts, cli_args = parse(sys.argv[1:] if argv is None else argv)
    quiet_lightning()
    seeds = range(opts.first_seed, opts.first_seed + opts.seeds)

    def show(seed: int, result: RunResult) -> None:
        flag = "  <- collapsed" if result.val_acc < opts.collapse_threshold else ""
        print(f"seed {seed:4d}: val_acc {result.val_acc:.4f}{flag}", flush=True)

    summary = spread(train_seeds(cli_args, seeds, on_result=show), opts.collapse_threshold)
    print(summary.line(f"final val_acc over {summary.n} seeds"))
    return summary


if __name__ == "__main__":
    main()
