"""Does the Lightning experiment learn what the plain PyTorch loop learns? Both, over the same seeds.

Run: ``.venv/bin/python benchmarks/experiment_accuracy.py --seeds 20`` (about 13 s per seed on 2 busy
cores: 20 seeds in 4.5 minutes; pass fewer seeds when short of time).

For each seed: the Lightning run (``experiments/cli.py`` defaults, monitor/logger/bar off) and
``experiments.plain.train_plain`` (same network, SGD lr 0.1, batch 256, 10 epochs, the same tensors,
and the same random-number order), side by side. Prints both final val accuracies per seed, then the
median, min/max, IQR and collapsed seeds (val_acc < 0.3) of each, and the difference of the medians.
Target: Lightning's median within +-1.5 points of plain's (plain's ~0.80 over 20 seeds). The two
loops draw random numbers in the same order, so the weights usually agree bit for bit and the
difference is 0.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # repo root, when run as a script

import torch  # noqa: E402

from experiments.cli import DEFAULT_MAX_EPOCHS, DEFAULT_TORCH_THREADS  # noqa: E402
from experiments.plain import Splits, train_plain  # noqa: E402
from experiments.seeds import COLLAPSE_THRESHOLD, quiet_lightning, spread, train_seed  # noqa: E402

TARGET_POINTS = 1.5


def parse() -> argparse.Namespace:
    """Command-line options."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seeds", type=int, default=20)
    parser.add_argument("--first-seed", type=int, default=0)
    parser.add_argument("--epochs", type=int, default=DEFAULT_MAX_EPOCHS)
    parser.add_argument("--data-dir", default="data")
    parser.add_argument("--threads", type=int, default=DEFAULT_TORCH_THREADS, help="torch.set_num_threads")
    return parser.parse_args()


def main() -> None:
    """Run both loops per seed, then compare the spreads."""
    opts = parse()
    quiet_lightning()
    torch.set_num_threads(opts.threads)
    splits = Splits.load(opts.data_dir)
    plain_accs, lightning_accs = [], []
    print(f"{'seed':>4s}  {'plain':>7s}  {'lightning':>9s}  {'diff':>7s}")
    start = time.perf_counter()
    for seed in range(opts.first_seed, opts.first_seed + opts.seeds):
        plain = train_plain(splits, seed, max_epochs=opts.epochs).val_acc
        lit = train_seed(
            [
                f"--trainer.max_epochs={opts.epochs}",
                f"--data.data_dir={opts.data_dir}",
                f"--torch_threads={opts.threads}",
            ],
            seed,
        ).val_acc
        plain_accs.append(plain)
        lightning_accs.append(lit)
        print(f"{seed:4d}  {plain:7.4f}  {lit:9.4f}  {lit - plain:+7.4f}", flush=True)
    p, lt = spread(plain_accs, COLLAPSE_THRESHOLD), spread(lightning_accs, COLLAPSE_THRESHOLD)
    print(f"\nfinal val_acc over {opts.seeds} seeds ({opts.epochs} epochs), {time.perf_counter() - start:.0f} s:")
    print(p.line("plain    "))
    print(lt.line("lightning"))
    diff = 100 * (lt.median - p.median)
    verdict = "within" if abs(diff) <= TARGET_POINTS else "OUTSIDE"
    identical = sum(abs(a - b) < 0.5e-4 for a, b in zip(plain_accs, lightning_accs, strict=True))  # < 1 image
    print(f"median difference: {diff:+.2f} points ({verdict} +-{TARGET_POINTS}); identical on {identical}/{opts.seeds}")


if __name__ == "__main__":
    main()
