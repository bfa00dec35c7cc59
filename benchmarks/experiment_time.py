"""Wall time of the whole default 10-epoch run, three ways, interleaved in ONE run.

Run: ``.venv/bin/python benchmarks/experiment_time.py`` (``--repeats 3``: about 1.5 minutes on 2 idle
cores).

1. **plain**: ``experiments.plain`` (load the tensors, 10 epochs of SGD, validation after each epoch);
2. **lightning**: the experiment's LightningCLI run with no callbacks (``--trainer.callbacks=[]``);
3. **lightning+monitor**: the default run, with its ``ParameterMonitor`` (update ratio and dead units on).

Both Lightning runs keep the default TensorBoardLogger (into a temp dir) and checkpointing; the progress
bar and model summary are off (``--progress-bar`` keeps the bar). Each time covers CLI parsing, data
loading, the sanity validation, training and validation, not Python's start-up and imports. The three
are interleaved per repeat, so a busy phase of the machine hits all of them. Targets: with-monitor
within 3x plain; the monitor adds < 30% over Lightning without it. The load average is printed: other
jobs on the 2 cores move absolute times a lot, ratios from one run less.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # repo root, when run as a script

import torch  # noqa: E402

from experiments.cli import DEFAULT_SEED, DEFAULT_TORCH_THREADS, train  # noqa: E402
from experiments.plain import Splits, train_plain  # noqa: E402
from experiments.seeds import quiet_lightning  # noqa: E402

TARGET_VS_PLAIN, TARGET_MONITOR_OVERHEAD = 3.0, 0.30


def parse() -> argparse.Namespace:
    """Command-line options."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--epochs", type=int, default=10)
    parser.add_argument("--seed", type=int, default=DEFAULT_SEED)
    parser.add_argument("--data-dir", default="data")
    parser.add_argument("--threads", type=int, default=DEFAULT_TORCH_THREADS, help="torch.set_num_threads")
    parser.add_argument("--progress-bar", action="store_true", help="keep Lightning's progress bar on")
    return parser.parse_args()


def lightning_runner(opts: argparse.Namespace, log_dir: str, monitor: bool) -> Callable[[], float]:
    """A function that does one Lightning run and returns its final val_acc."""
    args = [
        f"--seed_everything={opts.seed}",
        f"--trainer.max_epochs={opts.epochs}",
        f"--data.data_dir={opts.data_dir}",
        f"--torch_threads={opts.threads}",
        f"--trainer.logger.init_args.save_dir={log_dir}",
        f"--trainer.enable_progress_bar={str(opts.progress_bar).lower()}",
        "--trainer.enable_model_summary=false",
    ]
    if not monitor:
        args.append("--trainer.callbacks=[]")
    return lambda: train(args, save_config=False).val_acc


def plain_runner(opts: argparse.Namespace) -> Callable[[], float]:
    """A function that does one plain run (data loading included) and returns its final val_acc."""
    return lambda: train_plain(Splits.load(opts.data_dir), opts.seed, max_epochs=opts.epochs).val_acc


def main() -> None:
    """Time the three ways, interleaved, and print medians and ratios."""
    opts = parse()
    quiet_lightning()
    torch.set_num_threads(opts.threads)
    Splits.load(opts.data_dir)  # decompress once (if needed) and warm the page cache, outside the timings
    times: dict[str, list[float]] = {"plain": [], "lightning": [], "lightning+monitor": []}
    print(f"load average before: {os.getloadavg()[0]:.2f}; {opts.repeats} repeats, {opts.epochs} epochs")
    with tempfile.TemporaryDirectory() as log_dir:
        runners = {
            "plain": plain_runner(opts),
            "lightning": lightning_runner(opts, log_dir, monitor=False),
            "lightning+monitor": lightning_runner(opts, log_dir, monitor=True),
        }
        for repeat in range(opts.repeats):
            for label, run in runners.items():
                start = time.perf_counter()
                acc = run()
                times[label].append(time.perf_counter() - start)
                print(f"repeat {repeat}: {label:18s} {times[label][-1]:6.2f} s  val_acc {acc:.4f}", flush=True)
    report(times)


def report(times: dict[str, list[float]]) -> None:
    """Medians, and the two ratios with their targets."""
    med = {label: statistics.median(values) for label, values in times.items()}
    print(f"\nload average after: {os.getloadavg()[0]:.2f}")
    for label, value in med.items():
        print(f"median {label:18s} {value:6.2f} s  (min {min(times[label]):.2f}, max {max(times[label]):.2f})")
    vs_plain = med["lightning+monitor"] / med["plain"]
    overhead = med["lightning+monitor"] / med["lightning"] - 1
    print(f"lightning / plain:           {med['lightning'] / med['plain']:.2f}x")
    print(f"lightning+monitor / plain:   {vs_plain:.2f}x  (target <= {TARGET_VS_PLAIN:.0f}x)")
    print(f"monitor overhead over Lightning: {100 * overhead:+.1f}%  (target < {100 * TARGET_MONITOR_OVERHEAD:.0f}%)")


if __name__ == "__main__":
    main()
