"""A one-PNG summary of a run, read back from its event files: the PARAM MONITOR tab, static.

    python -m param_monitor.report LOGDIR [--out summary.png]

``LOGDIR`` is one run's folder (e.g. ``lightning_logs/shared_mlp/version_0``; event files in its
subfolders count too). Panels: weight means and gradient norms per layer, each shared parameter's
per-use norms next to its total, loss and accuracy, the share stack of the first shared parameter
(each use's ``shared_grad_share × grad_norm``, stacked: the top is the gradient norm), the
gradient-flow heatmap (rows = parameters in the model's order, columns = steps, colour =
``log10 grad_norm``; NaN/inf magenta, exact zeros black), layer health (heatmaps of the update
ratio, its 1e-3 rule of thumb the centre of the colour scale, and of the dead units) and the
layers to look at (the tab's rules, :mod:`param_monitor.tensorboard_plugin.health`). The steps of
the ``param_monitor/spikes`` record (``detect_spikes=True``) are dashed red lines on the gradient
norm and the loss panels. Panels whose tags are missing say so.

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
from matplotlib.colors import ListedColormap, TwoSlopeNorm  # noqa: E402
from matplotlib.figure import Figure  # noqa: E402
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator  # noqa: E402

from param_monitor import tags  # noqa: E402
from param_monitor.spikes import Spike, parse_markdown  # noqa: E402
from param_monitor.tensorboard_plugin import health  # noqa: E402
from param_monitor.tensorboard_plugin.metadata import model_order, parse_run_metadata, row_order, shared_groups  # noqa: E402

NO_MONITOR = "no tags: was ParameterMonitor on?"
NO_SHARED = "no shared parameters logged"
NO_SHARES = "no shared_grad_share tags logged"
NO_UPDATE_RATIO = "no update_ratio tags: ParameterMonitor(log_update_ratio=True) logs them"
NO_DEAD_UNITS = "no dead_units tags: ParameterMonitor(log_dead_units=True) logs them"
#: the rule of thumb for the update ratio, the centre of its colour scale
UPDATE_RATIO_GUIDE = 1e-3
NONFINITE_COLOUR = "#ff00ff"
#: the gid of the vertical lines marking a spike's step (``detect_spikes=True``), for finding them again
SPIKE_GID = "spike"
SPIKE_COLOUR = "red"


@dataclass(frozen=True)
class Series:
    """One scalar tag's values over global steps."""

    steps: list[int]
    values: list[float]


@dataclass(frozen=True)
class Run:
    """A run's scalars (tags in the order first written), when written, its parameters in model order, and
    the spikes of its ``param_monitor/spikes`` record (the last one written: it lists the fit's first)."""

    scalars: dict[str, Series]
    parameters: list[str]
    aliases: dict[str, list[str]]
    spikes: tuple[Spike, ...] = ()


def event_dirs(log_dir: str | os.PathLike[str]) -> list[Path]:
    """Every directory under ``log_dir`` (itself included) that holds TensorBoard event files."""
    return sorted({path.parent for path in Path(log_dir).rglob("events.out.tfevents.*")})


def read_run(log_dir: str | os.PathLike[str]) -> Run:
    """Every scalar point under ``log_dir`` (not a sample) and the PARAM MONITOR metadata, if any."""
    series: dict[str, Series] = {}
    parameters: list[str] = []
    aliases: dict[str, list[str]] = {}
    spikes: tuple[int, tuple[Spike, ...]] = (-1, ())  # (step, spikes) of the latest record
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
        spikes = max(spikes, _spike_record(acc), key=lambda record: record[0])
    return Run(series, parameters, aliases, spikes[1])


def _spike_record(acc: EventAccumulator) -> tuple[int, tuple[Spike, ...]]:
    """The step and spikes of the last ``param_monitor/spikes`` text in ``acc`` (``(-1, ())`` when none):
    each record lists the first spikes of the fit so far, so the last one holds them all."""
    key = f"{tags.SPIKES_TAG}/text_summary"  # torch's add_text appends /text_summary
    if key not in acc.Tags()["tensors"]:
        return -1, ()
    last = acc.Tensors(key)[-1]
    return last.step, tuple(parse_markdown(last.tensor_proto.string_val[0].decode("utf-8")))


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


def _plot_lines(ax: Axes, lines: dict[str, Series], title: str, empty_note: str, spikes: Sequence[int] = ()) -> None:
    for label, s in lines.items():
        # Biases dashed: weights and biases of one layer share a colour cycle position otherwise.
        style = "--" if ".bias" in label else "-"
        ax.plot(s.steps, s.values, style, label=label, linewidth=1)
    _mark_spikes(ax, spikes)
    ax.set_title(title)
    ax.set_xlabel("step")
    if lines:
        ax.legend(fontsize="xx-small" if len(lines) > 9 else "x-small", ncol=2 if len(lines) > 9 else 1)
    else:
        _note(ax, empty_note)


def _mark_spikes(ax: Axes, steps: Sequence[int]) -> None:
    """A dashed red vertical line at each spike's step; one legend entry ("spike") for all of them."""
    for i, step in enumerate(sorted(set(steps))):
        line = ax.axvline(step, color=SPIKE_COLOUR, linestyle="--", linewidth=0.8, alpha=0.8,
                          label="spike" if i == 0 else "_spike")  # fmt: skip
        line.set_gid(SPIKE_GID)


def _note(ax: Axes, text: str) -> None:
    ax.text(0.5, 0.5, text, ha="center", va="center", transform=ax.transAxes)


def _shared_lines(series: dict[str, Series], parameters: Sequence[str] = (), most: int = 9) -> dict[str, Series]:
    """Per-use contributions of every shared parameter, each next to its total gradient norm; past
    ``most`` lines (ALBERT: 17 tensors x 12 uses), one line per use of each shared group instead."""
    lines: dict[str, Series] = {}
    for name, sites in shared_sites(series).items():
        for site, s in sites.items():
            lines[f"{name} @ {site}"] = s
        if tags.grad_norm(name) in series:
            lines[f"{name} total"] = series[tags.grad_norm(name)]
    if len(lines) <= most:
        return lines
    return _group_lines(series, parameters)


def _group_lines(series: dict[str, Series], parameters: Sequence[str]) -> dict[str, Series]:
    """Per group and use k: ``sqrt(Σ_t ‖c_t,k‖²)`` over its tensors, and the group's ``sqrt(Σ_t grad_norm_t²)``."""
    per_use = shared_sites(series)
    lines: dict[str, Series] = {}
    in_call_order = {n: row_order(s, parameters) for n, s in per_use.items()}  # #2 before #10
    for group in shared_groups(in_call_order, parameters):
        columns = [[dict(zip(*_pair(per_use[t][s]), strict=True)) for s in group["sites"][t]] for t in group["tensors"]]
        totals = [dict(zip(*_pair(series[tags.grad_norm(t)]), strict=True)) for t in group["tensors"]
                  if tags.grad_norm(t) in series]  # fmt: skip
        for k, use in enumerate(group["uses"]):
            lines[f"{group['name']} @ {use}"] = _root_sum_sq([col[k] for col in columns if k < len(col)])
        if totals:
            lines[f"{group['name']} total"] = _root_sum_sq(totals)
    return lines


def _pair(s: Series) -> tuple[list[int], list[float]]:
    return s.steps, s.values


def _root_sum_sq(columns: Sequence[dict[int, float]]) -> Series:
    steps = sorted(set.intersection(*(set(c) for c in columns))) if columns else []
    return Series(steps, [math.sqrt(math.fsum(c[step] ** 2 for c in columns)) for step in steps])


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
    _plot_family_heatmap(fig, ax, run, tags.GRAD_NORM, "gradient flow: log10 grad_norm (rows in model order)")


def _plot_family_heatmap(fig: Figure, ax: Axes, run: Run, family: str, title: str, empty: str = NO_MONITOR) -> None:
    """Rows (model order) x steps of ``family``; log10 colours for ``grad_norm`` and ``update_ratio``
    (the 1e-3 rule of thumb the centre of a diverging scale), 0..1 for ``dead_units``."""
    ax.set_title(title, fontsize="medium")
    rows, steps, matrix = gradient_flow(run, family)
    if not rows:
        _note(ax, empty)
        return
    log = family in (tags.GRAD_NORM, tags.UPDATE_RATIO)
    with np.errstate(divide="ignore", invalid="ignore"):
        shown = np.where(matrix > 0, np.log10(matrix), np.nan) if log else matrix
    extent = (-0.5, len(steps) - 0.5, len(rows) - 0.5, -0.5)
    style: dict[str, object] = {"cmap": "viridis"}
    if family == tags.UPDATE_RATIO:
        style = {"cmap": "RdBu_r", "norm": TwoSlopeNorm(vcenter=math.log10(UPDATE_RATIO_GUIDE), vmin=-6, vmax=0)}
    elif family == tags.DEAD_UNITS:
        style = {"cmap": "Reds", "vmin": 0.0, "vmax": 1.0}
    image = ax.imshow(shown, aspect="auto", interpolation="nearest", extent=extent, **style)
    bar = fig.colorbar(image, ax=ax, fraction=0.04, pad=0.02)
    if family == tags.UPDATE_RATIO:
        bar.set_ticks([-5, -4, -3, -2, -1], labels=["1e-5", "1e-4", "1e-3 rule of thumb", "1e-2", "0.1"])
    elif family == tags.DEAD_UNITS:
        bar.set_ticks([0, 0.5, 1], labels=["0", "half dead", "all dead"])
    special = np.full(matrix.shape, np.nan)
    if log:
        special[matrix == 0] = 0.0  # an exact zero has no log: black
    special[_logged_nonfinite(run, rows, steps, family)] = 1.0  # a logged NaN/inf (not a step without a value)
    ax.imshow(special, aspect="auto", interpolation="nearest", extent=extent,
              cmap=ListedColormap(["black", NONFINITE_COLOUR]), vmin=0, vmax=1)  # fmt: skip
    labels = [f"{n} (= {', '.join(run.aliases[n])})" if n in run.aliases else n for n in rows]
    if len(rows) <= 40:
        ax.set_yticks(range(len(rows)), labels, fontsize="x-small")
    ticks = sorted(set(np.linspace(0, len(steps) - 1, min(len(steps), 8)).round().astype(int)))
    ax.set_xticks(ticks, [str(steps[t]) for t in ticks])
    ax.set_xlabel("step")


def _rows(run: Run, family: str) -> dict[str, dict[int, float]]:
    prefix = f"{family}/"
    return {
        tag[len(prefix) :]: dict(zip(s.steps, s.values, strict=True))
        for tag, s in run.scalars.items()
        if tag.startswith(prefix)
    }


def findings(run: Run) -> list[dict[str, object]]:
    """The tab's "layers to look at" for this run (:mod:`param_monitor.tensorboard_plugin.health`)."""
    rows = {f: _rows(run, f) for f in (tags.GRAD_NORM, tags.UPDATE_RATIO, tags.DEAD_UNITS)}
    names = model_order(set().union(*(r.keys() for r in rows.values())), run.parameters)
    return health.layers_to_look_at(rows[tags.GRAD_NORM], rows[tags.UPDATE_RATIO], rows[tags.DEAD_UNITS], names)


def _plot_findings(ax: Axes, run: Run, limit: int = 12) -> None:
    ax.set_axis_off()
    ax.set_title("layers to look at", loc="left", fontsize="medium")
    found = findings(run)
    if not any(tag.startswith(f"{tags.GRAD_NORM}/") for tag in run.scalars):
        _note(ax, NO_MONITOR)
        return
    lines = [f"{f['name']}: {f['text']} (step {f['step']})" for f in found[:limit]]
    if len(found) > limit:
        lines.append(f"... and {len(found) - limit} more (the tab lists them all)")
    low, high = health.UPDATE_RATIO_RANGE
    rules = (f"rules: first NaN/inf gradient; gradient norm below {health.VANISHED:g} of its largest; update ratio "
             f"outside {low:g}..{high:g} (median of the last {health.RECENT} logged steps); more than "
             f"{health.DEAD_FRACTION:.0%} of the units dead")  # fmt: skip
    body = "\n".join(lines) if lines else "nothing: every checked layer is within the rules"
    ax.text(0, 1, body, va="top", ha="left", fontsize="small", family="monospace", transform=ax.transAxes)
    ax.text(0, 0, rules, va="bottom", ha="left", fontsize="x-small", color="#555", transform=ax.transAxes)


def _logged_nonfinite(run: Run, rows: Sequence[str], steps: Sequence[int], family: str = tags.GRAD_NORM) -> np.ndarray:
    mask = np.zeros((len(rows), len(steps)), dtype=bool)
    column = {step: j for j, step in enumerate(steps)}
    for i, name in enumerate(rows):
        s = run.scalars[f"{family}/{name}"]
        for step, value in zip(s.steps, s.values, strict=True):
            if not math.isfinite(value):
                mask[i, column[step]] = True
    return mask


def summary_figure(series: dict[str, Series] | Run, title: str = "") -> Figure:
    """The summary: weight means, gradient norms; per-use norms, loss and accuracy; share stack, gradient
    heatmap; layer health (update ratio and dead units heatmaps); the layers to look at.

    Panels whose tags are missing say so instead of failing, so a run without the monitor still gets
    its loss/accuracy panel. ``fig.axes`` holds the six first panels first (in that order), then the
    gradient heatmap's colour bar, then the health panels.
    """
    run = series if isinstance(series, Run) else Run(series, [], {})
    scalars = run.scalars
    fig = plt.figure(figsize=(14, 20))
    grid = fig.add_gridspec(5, 2, height_ratios=[1, 1, 1, 1, 0.35])
    axes = np.array([[fig.add_subplot(grid[r, c]) for c in range(2)] for r in range(3)])
    _plot_lines(axes[0, 0], _with_prefix(scalars, "weight_mean/"), "weight mean per layer", NO_MONITOR)
    spikes = [s.step for s in run.spikes]  # every series' spikes on both panels: one step, one cause to look for
    _plot_lines(axes[0, 1], _with_prefix(scalars, "grad_norm/"), "gradient norm per layer", NO_MONITOR, spikes)
    _plot_lines(axes[1, 0], _shared_lines(scalars, run.parameters), "shared: gradient norm per use, and total",
                NO_SHARED)
    metrics = {tag: scalars[tag] for tag in ("train_loss", "val_loss", "val_acc") if tag in scalars}
    _plot_lines(axes[1, 1], metrics, "loss and accuracy", "no metrics logged", spikes)
    _plot_share_stack(axes[2, 0], scalars, run.parameters)
    _plot_heatmap(fig, axes[2, 1], run)
    ratio, dead = fig.add_subplot(grid[3, 0]), fig.add_subplot(grid[3, 1])
    _plot_family_heatmap(fig, ratio, run, tags.UPDATE_RATIO, "update ratio ‖Δw‖/‖w‖, log10 (1e-3: the rule of thumb)",
                         NO_UPDATE_RATIO)  # fmt: skip
    _plot_family_heatmap(fig, dead, run, tags.DEAD_UNITS, "dead units: fraction of output units with zero gradient",
                         NO_DEAD_UNITS)  # fmt: skip
    _plot_findings(fig.add_subplot(grid[4, :]), run)
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
