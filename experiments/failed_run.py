"""The failed run beside a healthy one, as the monitor shows them: ``docs/failed_run.png``.

    python -m experiments.failed_run                     # trains both (about 1-2 minutes), then plots
    python -m experiments.failed_run --healthy DIR --failed DIR   # plot two existing runs' event files

Healthy: the default run (``seed_everything 0``). Failed: ``configs/failed_init.yaml``, the same data
order but the initial weights of the reference loop's seed 7 (``--model.init_seed 7``). Both log every
10 steps with both diagnostics on. The picture is read back from the event files with TensorBoard's
reader (``param_monitor.report.read_scalars``): per column one run, per row

1. ``dead_units/{layer}``: the share of each layer's output units whose gradient row is exactly zero;
2. the shared layer's per-use gradient norms (``shared_grad/model.net.3.weight/{site}``) and its total;
3. ``update_ratio/{layer}`` (log scale) with the 1e-3 rule of thumb;
4. training loss and validation accuracy.

It prints the numbers the README quotes (final accuracy, dead units, update ratios, per-use gradients
at the end of each run). Unknown arguments go to both runs' LightningCLI.
"""

from __future__ import annotations

import argparse
import statistics
import sys
from collections.abc import Sequence
from pathlib import Path

if __package__ in (None, ""):
    # Run as a file (`python experiments/failed_run.py`), Python puts `experiments/` first on sys.path,
    # not the repository root, and `import experiments` fails: put the root there instead, exactly
    # as `python -m experiments.failed_run` does (also for the processes DDP starts from sys.argv).
    sys.path[0] = str(Path(__file__).resolve().parents[1])

from param_monitor import tags  # noqa: E402
from param_monitor.report import Series, plt, read_scalars  # noqa: E402

REPO_ROOT = Path(__file__).resolve().parents[1]
OUT = REPO_ROOT / "docs" / "failed_run.png"
SHARED = "model.net.3.weight"
RUN_ARGS = ("--trainer.log_every_n_steps=10", "--trainer.enable_progress_bar=false")
HEALTHY_ARGS = ("--trainer.logger.init_args.name=healthy_run",)
FAILED_ARGS = ("--config", str(REPO_ROOT / "configs" / "failed_init.yaml"))
GUIDE = 1e-3  # the update ratio's rule of thumb (per step)


def train_both(cli_args: Sequence[str]) -> tuple[Path, Path]:
    """Fit the healthy and the failed run; their log directories."""
    from experiments.cli import train

    dirs = []
    for own in (HEALTHY_ARGS, FAILED_ARGS):
        result = train([*own, *RUN_ARGS, *cli_args])
        print(f"{'healthy' if own is HEALTHY_ARGS else 'failed'}: val_acc {result.val_acc:.4f}, logs {result.log_dir}")
        assert result.log_dir is not None, "the runs need their TensorBoard logger"
        dirs.append(result.log_dir)
    return dirs[0], dirs[1]


def _prefixed(series: dict[str, Series], prefix: str) -> dict[str, Series]:
    return {tag[len(prefix) + 1 :]: s for tag, s in sorted(series.items()) if tag.startswith(prefix + "/")}


def _first(s: Series, n: int = 5) -> float:
    """Median of the first ``n`` logged points (steps 9-49): how a run started."""
    return statistics.median(s.values[:n])


def _last(s: Series, n: int = 5) -> float:
    """Median of the last ``n`` points: the state a run ended in, not one batch's noise."""
    return statistics.median(s.values[-n:])


def _overall(s: Series) -> float:
    return statistics.median(s.values)


def panels(series: dict[str, Series]) -> list[tuple[str, dict[str, Series]]]:
    """(title, lines) of the four rows for one run."""
    shared = {site: s for (name, site), s in _shared(series).items() if name == SHARED}
    if tags.grad_norm(SHARED) in series:
        shared["total (grad_norm)"] = series[tags.grad_norm(SHARED)]
    metrics = {t: series[t] for t in ("train_loss", "val_acc") if t in series}
    return [
        ("dead units (share of rows with zero gradient)", _prefixed(series, tags.DEAD_UNITS)),
        (f"shared layer {SHARED}: gradient norm per use", shared),
        ("update ratio ‖Δw‖/‖w‖ per step (weights)", _weights(_prefixed(series, tags.UPDATE_RATIO))),
        ("training loss, validation accuracy", metrics),
    ]


def _weights(lines: dict[str, Series]) -> dict[str, Series]:
    return {label: s for label, s in lines.items() if not label.endswith(".bias")}


def _shared(series: dict[str, Series]) -> dict[tuple[str, str], Series]:
    prefix = tags.SHARED_GRAD + "/"
    return {tags.split_shared(t): s for t, s in sorted(series.items()) if t.startswith(prefix)}


def figure(healthy: dict[str, Series], failed: dict[str, Series], titles: tuple[str, str]) -> plt.Figure:
    """Four rows, two columns (healthy, failed), the rows' y axes shared so the columns compare."""
    fig, axes = plt.subplots(4, 2, figsize=(13, 14), sharey="row", sharex=True)
    for col, (series, title) in enumerate(((healthy, titles[0]), (failed, titles[1]))):
        for row, (panel_title, lines) in enumerate(panels(series)):
            ax = axes[row, col]
            for label, s in lines.items():
                ax.plot(s.steps, s.values, "--" if ".bias" in label else "-", label=label, linewidth=1)
            if row in (1, 2):  # norms and ratios: a factor of 3 is what matters, not a spike's height
                ax.set_yscale("log")
            if row == 2:
                ax.axhline(GUIDE, color="grey", linestyle=":", linewidth=1.5, label="1e-3 rule of thumb")
            if not lines:
                ax.text(0.5, 0.5, "not logged", ha="center", va="center", transform=ax.transAxes)
            ax.set_title(f"{title}\n{panel_title}" if row == 0 else panel_title, fontsize="medium")
            ax.legend(fontsize="x-small")
    for ax in axes[-1]:
        ax.set_xlabel("step")
    fig.tight_layout()
    return fig


def report(name: str, series: dict[str, Series]) -> None:
    """The end state of one run, as the README quotes it (medians of the last 5 logged points)."""
    acc = series.get("val_acc")
    print(f"\n{name}: final val_acc {acc.values[-1]:.4f}" if acc else f"\n{name}: no val_acc")
    for title, lines in panels(series)[:3]:
        print(f"  {title} (medians of the first 5 logged points / of all / of the last 5):")
        for label, s in lines.items():
            print(f"    {label:28s} {_first(s):9.3g} {_overall(s):9.3g} {_last(s):9.3g}")


def main(argv: Sequence[str] | None = None) -> Path:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--healthy", type=Path, help="log dir of a healthy run (skips training)")
    parser.add_argument("--failed", type=Path, help="log dir of a failed run (skips training)")
    parser.add_argument("--out", type=Path, default=OUT)
    opts, cli_args = parser.parse_known_args(sys.argv[1:] if argv is None else argv)
    if (opts.healthy is None) != (opts.failed is None):
        parser.error("--healthy and --failed go together")
    healthy_dir, failed_dir = (opts.healthy, opts.failed) if opts.healthy else train_both(cli_args)
    healthy, failed = read_scalars(healthy_dir), read_scalars(failed_dir)
    report("healthy (seed 0)", healthy)
    report("failed (init seed 7, data seed 0)", failed)
    titles = (
        f"healthy: seed 0, final val_acc {healthy['val_acc'].values[-1]:.4f}",
        f"failed: init seed 7 (failed_init.yaml), data seed 0, final val_acc {failed['val_acc'].values[-1]:.4f}",
    )
    fig = figure(healthy, failed, titles)
    opts.out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(opts.out, dpi=80)
    plt.close(fig)
    print(f"\npicture: {opts.out}")
    return opts.out


if __name__ == "__main__":
    main()
