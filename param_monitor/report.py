"""A one-PNG summary of a run, read back from its event files: the PARAM MONITOR tab, static.

    python -m param_monitor.report LOGDIR [--out summary.png]

``LOGDIR`` is one run's folder (e.g. ``lightning_logs/shared_mlp/version_0``; event files in its
subfolders count too). Panels: weight means and gradient norms per layer, each shared parameter's
per-use norms next to its total, loss and accuracy, the share stack of the first shared parameter
(each use's ``shared_grad_share × grad_norm``, stacked: the top is the gradient norm), and the
gradient-flow heatmap (rows = parameters in the model's order, columns = steps, colour =
``log10 grad_norm``; NaN/inf magenta, exact zeros black). Panels whose tags are missing say so.

Needs matplotlib: ``pip install 'param_monitor[report]'``.
"""

from __future__ import annotations

import argparse
import math
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

try:
    import matplotlib
except ImportError as error:  # an optional extra: say how to get it
    raise ImportError("param_monitor.report needs matplotlib: pip install 'param_monitor[report]'") from error

matplotlib.use("Agg")  # headless: no display on CI machines, and nothing is shown interactively

import matplotlib.pyplot as plt  # noqa: E402 -- must follow matplotlib.use()
import numpy as np  # noqa: E402
from matplotlib.axes import Axes  # noqa: E402
from matplotlib.colors import ListedColormap  # noqa: E402
from matplotlib.figure import Figure  # noqa: E402
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator  # noqa: E402

from param_monitor import tags  # noqa: E402
from param_monitor.tensorboard_plugin.metadata import model_order, parse_run_metadata  # noqa: E402

NO_MONITOR = "no tags: was ParameterMonitor on?"
NO_SHARED = "no shared parameters logged"
NO_SHARES = "no shared_grad_share tags logged"
NONFINITE_COLOUR = "#ff00ff"


@dataclass(frozen=True)
class Series:
    """One scalar tag's values over global steps."""

    steps: list[int]
    values: list[float]


@dataclass(frozen=True)
class Run:
    """A run's scalars (tags in the order first written) and, when written, its parameters in model order."""

    scalars: dict[str, Series]
    parameters: list[str]
    aliases: dict[str, list[str]]


def event_dirs(log_dir: str | os.PathLike[str]) -> list[Path]:
    """Every directory under ``log_dir`` (itself included) that holds TensorBoard event files."""
    return sorted({path.parent for path in Path(log_dir).rglob("events.out.tfevents.*")})


def read_run(log_dir: str | os.PathLike[str]) -> Run:
    """Every scalar point under ``log_dir`` (not a sample) and the PARAM MONITOR metadata, if any."""
    series: dict[str, Series] = {}
    parameters: list[str] = []
    aliases: dict[str, list[str]] = {}
    for directory in event_dirs(log_dir):
        # size guidance 0 = keep every point; the default reservoir keeps a random 1000 per tag.
        acc = EventAccumulator(str(directory), size_guidance={"scalars": 0, "tensors": 0})
        acc.Reload()
        for tag in acc.Tags()["scalars"]:
            events = acc.Scalars(tag)
            series[tag] = Series([e.step for e in events], [float(e.value) for e in events])
        if tags.RUN_METADATA_TAG in acc.Tags()["tensors"]:
            meta = parse_run_metadata(acc.Tensors(tags.RUN_METADATA_TAG)[-1].tensor_proto)
            parameters = [p["name"] for p in meta["parameters"]]
            aliases = {p["name"]: p["aliases"] for p in meta["parameters"] if p["aliases"]}
    return Run(series, parameters, aliases)


def read_scalars(log_dir: str | os.PathLike[str]) -> dict[str, Series]:
    """All scalar tags of a run, from every event file under ``log_dir`` (all points, not a sample)."""
    return read_run(log_dir).scalars


def _with_prefix(series: dict[str, Series], prefix: str) -> dict[str, Series]:
    return {tag[len(prefix) :]: s for tag, s in sorted(series.items()) if tag.startswith(prefix)}


def shared_sites(series: dict[str, Series], family: str = tags.SHARED_GRAD) -> dict[str, dict[str, Series]]:
    """``{param name: {site: series}}`` from the ``{family}/{name}/{site}`` tags (default: per-use norms)."""
    shared: dict[str, dict[str, Series]] = {}
    for tag, s in sorted(series.items()):
        if tag.startswith(f"{family}/"):
            name, site = tags.split_shared(tag)
            if site:
                shared.setdefault(name, {})[site] = s
    return shared


def _plot_lines(ax: Axes, lines: dict[str, Series], title: str, empty_note: str) -> None:
    for label, s in lines.items():
        # Biases dashed: weights and biases of one layer share a colour cycle position otherwise.
        style = "--" if ".bias" in label else "-"
        ax.plot(s.steps, s.values, style, label=label, linewidth=1)
    ax.set_title(title)
    ax.set_xlabel("step")
    if lines:
        ax.legend(fontsize="x-small")
    else:
        _note(ax, empty_note)


def _note(ax: Axes, text: str) -> None:
    ax.text(0.5, 0.5, text, ha="center", va="center", transform=ax.transAxes)


def _shared_lines(series: dict[str, Series]) -> dict[str, Series]:
    """Per-use contributions of every shared parameter, each next to its total gradient norm."""
    lines: dict[str, Series] = {}
    for name, sites in shared_sites(series).items():
        for site, s in sites.items():
            lines[f"{name} @ {site}"] = s
        if tags.grad_norm(name) in series:
            lines[f"{name} total"] = series[tags.grad_norm(name)]
    return lines


def share_stack(series: dict[str, Series], name: str) -> tuple[list[int], dict[str, list[float]]]:
    """Steps and, per site, ``share × grad_norm`` on the steps where every share and the norm exist.

    The shares of one step sum to 1, so the stack of a step adds up to its ``grad_norm``.
    """
    shares = shared_sites(series, tags.SHARED_GRAD_SHARE).get(name, {})
    total = series.get(tags.grad_norm(name))
    if not shares or total is None:
        return [], {}
    by_site = {site: dict(zip(s.steps, s.values, strict=True)) for site, s in shares.items()}
    norm = dict(zip(total.steps, total.values, strict=True))
    steps = [step for step in total.steps if all(step in values for values in by_site.values())]
    return steps, {site: [values[step] * norm[step] for step in steps] for site, values in by_site.items()}


def _plot_share_stack(ax: Axes, series: dict[str, Series], parameters: Sequence[str] = ()) -> None:
    names = list(shared_sites(series, tags.SHARED_GRAD_SHARE))
    if parameters:  # the first shared parameter of the model (a weight before its bias)
        names = model_order(names, parameters)
    ax.set_xlabel("step")
    if not names:
        ax.set_title("shared layer: each use's share of the gradient")
        _note(ax, NO_SHARES)
        return
    name = names[0]
    steps, stack = share_stack(series, name)
    more = f" (+{len(names) - 1} more in the tab)" if len(names) > 1 else ""
    ax.set_title(f"{name}: share × grad_norm per use, stacked{more}", fontsize="medium")
    # stackplot cannot stack a NaN: those steps are left out and shaded
    finite = [i for i, step in enumerate(steps) if all(math.isfinite(v[i]) for v in stack.values())]
    if finite:
        ax.stackplot([steps[i] for i in finite], *[[v[i] for i in finite] for v in stack.values()], labels=list(stack))
    total = series[tags.grad_norm(name)]
    ax.plot(total.steps, total.values, "k:", linewidth=1, label="grad_norm (the top)")
    for step in sorted(set(steps) - {steps[i] for i in finite}):
        ax.axvspan(step - 0.5, step + 0.5, color=NONFINITE_COLOUR, alpha=0.3, linewidth=0)
    ax.axhline(0, color="grey", linewidth=0.5)
    ax.legend(fontsize="x-small", loc="upper right")


def heatmap_rows(run: Run, family: str = tags.GRAD_NORM) -> list[str]:
    """The names of ``{family}/{name}`` tags, in the model's order when the metadata says it."""
    names = [tag[len(family) + 1 :] for tag in run.scalars if tag.startswith(f"{family}/")]
    if not run.parameters:
        return names  # the order the monitor wrote them: its parameter order
    return model_order(names, run.parameters)


def gradient_flow(run: Run, family: str = tags.GRAD_NORM) -> tuple[list[str], list[int], np.ndarray]:
    """Rows, steps and the ``rows × steps`` matrix of ``{family}/{name}`` values (NaN where not logged)."""
    rows = heatmap_rows(run, family)
    steps = sorted({step for name in rows for step in run.scalars[f"{family}/{name}"].steps})
    column = {step: j for j, step in enumerate(steps)}
    matrix = np.full((len(rows), len(steps)), np.nan)
    for i, name in enumerate(rows):
        s = run.scalars[f"{family}/{name}"]
        matrix[i, [column[step] for step in s.steps]] = s.values
    return rows, steps, matrix


def _plot_heatmap(fig: Figure, ax: Axes, run: Run) -> None:
    ax.set_title("gradient flow: log10 grad_norm (rows in model order)")
    rows, steps, matrix = gradient_flow(run)
    if not rows:
        _note(ax, NO_MONITOR)
        return
    with np.errstate(divide="ignore", invalid="ignore"):
        logged = np.where(matrix > 0, np.log10(matrix), np.nan)
    extent = (-0.5, len(steps) - 0.5, len(rows) - 0.5, -0.5)
    image = ax.imshow(logged, aspect="auto", interpolation="nearest", cmap="viridis", extent=extent)
    fig.colorbar(image, ax=ax, fraction=0.04, pad=0.02)
    special = np.full(matrix.shape, np.nan)
    special[matrix == 0] = 0.0  # a dead layer
    special[_logged_nonfinite(run, rows, steps)] = 1.0  # a logged NaN/inf (not a step without a value)
    ax.imshow(special, aspect="auto", interpolation="nearest", extent=extent,
              cmap=ListedColormap(["black", NONFINITE_COLOUR]), vmin=0, vmax=1)  # fmt: skip
    labels = [f"{n} (= {', '.join(run.aliases[n])})" if n in run.aliases else n for n in rows]
    if len(rows) <= 40:
        ax.set_yticks(range(len(rows)), labels, fontsize="x-small")
    ticks = sorted(set(np.linspace(0, len(steps) - 1, min(len(steps), 8)).round().astype(int)))
    ax.set_xticks(ticks, [str(steps[t]) for t in ticks])
    ax.set_xlabel("step")


def _logged_nonfinite(run: Run, rows: Sequence[str], steps: Sequence[int]) -> np.ndarray:
    mask = np.zeros((len(rows), len(steps)), dtype=bool)
    column = {step: j for j, step in enumerate(steps)}
    for i, name in enumerate(rows):
        s = run.scalars[f"{tags.GRAD_NORM}/{name}"]
        for step, value in zip(s.steps, s.values, strict=True):
            if not math.isfinite(value):
                mask[i, column[step]] = True
    return mask


def summary_figure(series: dict[str, Series] | Run, title: str = "") -> Figure:
    """The 3x2 summary: weight means, gradient norms; per-use norms, loss and accuracy; share stack, heatmap.

    Panels whose tags are missing say so instead of failing, so a run without the monitor still gets
    its loss/accuracy panel.
    """
    run = series if isinstance(series, Run) else Run(series, [], {})
    scalars = run.scalars
    fig, axes = plt.subplots(3, 2, figsize=(14, 13))
    _plot_lines(axes[0, 0], _with_prefix(scalars, "weight_mean/"), "weight mean per layer", NO_MONITOR)
    _plot_lines(axes[0, 1], _with_prefix(scalars, "grad_norm/"), "gradient norm per layer", NO_MONITOR)
    _plot_lines(axes[1, 0], _shared_lines(scalars), "shared layer: gradient norm per use, and total", NO_SHARED)
    metrics = {tag: scalars[tag] for tag in ("train_loss", "val_loss", "val_acc") if tag in scalars}
    _plot_lines(axes[1, 1], metrics, "loss and accuracy", "no metrics logged")
    _plot_share_stack(axes[2, 0], scalars, run.parameters)
    _plot_heatmap(fig, axes[2, 1], run)
    fig.suptitle(title, fontsize="small")
    fig.tight_layout()
    return fig


def plot_summary(log_dir: str | os.PathLike[str], out_path: str | os.PathLike[str] | None = None) -> Path:
    """Read ``log_dir``'s run and save :func:`summary_figure` (default ``<log_dir>/summary.png``)."""
    out = Path(out_path) if out_path is not None else Path(log_dir) / "summary.png"
    fig = summary_figure(read_run(log_dir), title=f"param_monitor: {log_dir}")
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=100)
    plt.close(fig)
    return out


def main(argv: Sequence[str] | None = None) -> Path:
    parser = argparse.ArgumentParser(prog="python -m param_monitor.report", description=__doc__.split("\n\n")[0])
    parser.add_argument("logdir", help="one run's folder, e.g. lightning_logs/shared_mlp/version_0")
    parser.add_argument("--out", default=None, help="the PNG to write (default: LOGDIR/summary.png)")
    args = parser.parse_args(argv)
    if not event_dirs(args.logdir):
        parser.error(f"no TensorBoard event files under {args.logdir}")
    out = plot_summary(args.logdir, args.out)
    print(out)
    return out


if __name__ == "__main__":
    main()
