"""Exercise 3 by measurement: the shared (tied) MLP against the same network untied, seed by seed.

    python experiments/compare_tied.py                 # seeds 0..4, 10 epochs each, both variants
    python experiments/compare_tied.py --seeds 20 --trainer.max_epochs 5

Both variants of one seed start from the same seed (same data order; the untied one draws one more
layer's initial weights). Prints the unique parameter count and final val_acc of both, per seed and
as medians; each run also logs ``num_parameters`` and ``val_acc`` to TensorBoard under
``lightning_logs/compare_tied/<date-time>/{tied,untied}_seed{N}``. Unknown arguments go to the LightningCLI.
"""

from __future__ import annotations

import argparse
import sys
import time
from collections.abc import Sequence
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # repo root, when run as a script

from experiments.cli import LOG_SAVE_DIR, RunResult  # noqa: E402
from experiments.seeds import COLLAPSE_THRESHOLD, quiet_lightning, spread, train_seed  # noqa: E402

LOG_NAME = "compare_tied"
VARIANTS = {"tied": "true", "untied": "false"}


def variant_args(variant: str, seed: int, run_name: str) -> list[str]:
    """CLI overrides for one variant: the tying flag, and a TensorBoard version named after it."""
    logger = (
        '{"class_path": "lightning.pytorch.loggers.TensorBoardLogger", "init_args": '
        f'{{"save_dir": "{LOG_SAVE_DIR}", "name": "{run_name}", "version": "{variant}_seed{seed}"}}}}'
    )
    return [f"--model.model.init_args.tied={VARIANTS[variant]}", f"--trainer.logger={logger}"]


def compare(cli_args: Sequence[str], seeds: Sequence[int], run_name: str) -> dict[str, list[RunResult]]:
    """Both variants for every seed (interleaved, so a slow machine phase hits both alike)."""
    results: dict[str, list[RunResult]] = {variant: [] for variant in VARIANTS}
    for seed in seeds:
        row = []
        for variant in VARIANTS:
            result = train_seed([*cli_args, *variant_args(variant, seed, run_name)], seed)
            results[variant].append(result)
            row.append(f"{variant} {result.val_acc:.4f}")
        print(f"seed {seed:4d}: " + "   ".join(row), flush=True)
    return results


def main(argv: Sequence[str] | None = None) -> dict[str, list[RunResult]]:
    """Parse ``--seeds``/``--first-seed``, run both variants per seed, print the comparison."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seeds", type=int, default=5, help="number of seeds (default 5)")
    parser.add_argument("--first-seed", type=int, default=0)
    opts, cli_args = parser.parse_known_args(sys.argv[1:] if argv is None else argv)
    quiet_lightning()
    # One directory per invocation: a rerun must not add its events to an earlier run's version dirs.
    run_name = f"{LOG_NAME}/{time.strftime('%Y%m%d-%H%M%S')}"
    results = compare(cli_args, range(opts.first_seed, opts.first_seed + opts.seeds), run_name)
    print(f"\n{'variant':8s} {'unique params':>13s}  final val_acc over {opts.seeds} seeds")
    for variant, runs in results.items():
        stats = spread([r.val_acc for r in runs], COLLAPSE_THRESHOLD)
        print(f"{variant:8s} {runs[0].num_parameters:13d}  {stats.line('val_acc')}")
    print(f"TensorBoard: tensorboard --logdir {Path(LOG_SAVE_DIR) / run_name}")
    return results


if __name__ == "__main__":
    main()
