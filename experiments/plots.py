"""A one-PNG summary of what TensorBoard shows for a run, read back from the run's event files.

Tag schema written by ``param_monitor.ParameterMonitor`` (``{name}`` is a LightningModule parameter name,
``{site}`` the module path of one use of a shared parameter):
``weight_mean/{name}``, ``weight_norm/{name}``, ``grad_norm/{name}``, ``grad_norm_total``,
``shared_grad/{name}/{site}``, ``shared_grad_error/{name}``, ``shared_grad_cosine/{name}``.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # headless: no display on CI machines, and nothing is shown interactively

import matplotlib.pyplot as plt  # noqa: E402 -- must follow matplotlib.use()
from matplotlib.axes import Axes  # noqa: E402
from matplotlib.figure import Figure  # noqa: E402
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator  # noqa: E402


@dataclass(frozen=True)
class Series:
    """One scalar tag's values over global steps."""

    steps: list[int]
    values: list[float]


def event_dirs(log_dir: str | os.PathLike[str]) -> list[Path]:
    """Every directory under ``log_dir`` (itself included) that holds TensorBoard event files."""
    return sorted({path.parent for path in Path(log_dir).rglob("events.out.tfevents.*")})


def read_scalars(log_dir: str | os.PathLike[str]) -> dict[str, Series]:
    """All scalar tags of a run, from every event file under ``log_dir`` (all points, not a sample)."""
    series: dict[str, Series] = {}
    for directory in event_dirs(log_dir):
        # size_guidance 0 = keep every point; the default reservoir keeps a random 1000 per tag.
        acc = EventAccumulator(str(directory), size_guidance={"scalars": 0})
        acc.Reload()
        for tag in acc.Tags()["scalars"]:
            events = acc.Scalars(tag)
            series[tag] = Series([e.step for e in events], [float(e.value) for e in events])
    return series


def _with_prefix(series: dict[str, Series], prefix: str) -> dict[str, Series]:
    return {tag[len(prefix) :]: s for tag, s in sorted(series.items()) if tag.startswith(prefix)}


def shared_sites(series: dict[str, Series]) -> dict[str, dict[str, Series]]:
    """``{param name: {site: contribution series}}`` from the ``shared_grad/{name}/{site}`` tags."""
    shared: dict[str, dict[str, Series]] = {}
    for rest, s in _with_prefix(series, "shared_grad/").items():
        # Parameter names and module paths use dots, never slashes, so the split is unambiguous.
        name, _, site = rest.partition("/")
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
        ax.text(0.5, 0.5, empty_note, ha="center", va="center", transform=ax.transAxes)


def _shared_lines(series: dict[str, Series]) -> dict[str, Series]:
    """Per-use contributions of every shared parameter, each next to its total gradient norm."""
    lines: dict[str, Series] = {}
    for name, sites in shared_sites(series).items():
        for site, s in sites.items():
            lines[f"{name} @ {site}"] = s
        if f"grad_norm/{name}" in series:
            lines[f"{name} total"] = series[f"grad_norm/{name}"]
    return lines


def summary_figure(series: dict[str, Series], title: str = "") -> Figure:
    """The 2x2 summary: weight means, gradient norms, shared-use contributions, loss and accuracy.

    Panels whose tags are missing say so instead of failing, so a run without the monitor still gets
    its loss/accuracy panel.
    """
    fig, axes = plt.subplots(2, 2, figsize=(13, 9))
    no_monitor = "no tags: was ParameterMonitor on?"
    _plot_lines(axes[0, 0], _with_prefix(series, "weight_mean/"), "weight mean per layer", no_monitor)
    _plot_lines(axes[0, 1], _with_prefix(series, "grad_norm/"), "gradient norm per layer", no_monitor)
    _plot_lines(
        axes[1, 0], _shared_lines(series), "shared layer: gradient norm per use, and total",
        "no shared parameters logged",
    )  # fmt: skip
    metrics = {tag: series[tag] for tag in ("train_loss", "val_loss", "val_acc") if tag in series}
    _plot_lines(axes[1, 1], metrics, "loss and accuracy", "no metrics logged")
    fig.suptitle(title, fontsize="small")
    fig.tight_layout()
    return fig


def plot_summary(log_dir: str | os.PathLike[str], out_path: str | os.PathLike[str] | None = None) -> Path:
    """Read ``log_dir``'s scalars and save :func:`summary_figure` (default ``<log_dir>/summary.png``)."""
    out = Path(out_path) if out_path is not None else Path(log_dir) / "summary.png"
    fig = summary_figure(read_scalars(log_dir), title=f"TensorBoard scalars of {log_dir}")
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=100)
    plt.close(fig)
    return out
