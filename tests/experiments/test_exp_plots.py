"""The summary plot, on event files written here with SummaryWriter in the monitor's tag schema."""

from __future__ import annotations

from pathlib import Path

import matplotlib.pyplot as plt
import pytest
from torch.utils.tensorboard import SummaryWriter

from experiments.plots import Series, plot_summary, read_scalars, shared_sites, summary_figure

NAME = "model.net.3.weight"
SITES = ("model.net.3", "model.net.6")
STEPS = (0, 50, 100)
# Values exact in float32, so reading back must return them unchanged.
USE_3, USE_6 = (0.5, 0.25, 0.125), (1.5, 0.75, 0.375)


@pytest.fixture
def schema_run(tmp_path: Path) -> Path:
    """A log dir holding one event file with the monitor's tags, and a second (subdir) with metrics."""
    writer = SummaryWriter(str(tmp_path))
    for i, step in enumerate(STEPS):
        writer.add_scalar(f"weight_mean/{NAME}", 0.25 * i, step)
        writer.add_scalar("weight_mean/model.net.1.weight", -0.5, step)
        writer.add_scalar(f"grad_norm/{NAME}", USE_3[i] + USE_6[i], step)
        writer.add_scalar("grad_norm_total", 4.0, step)
        writer.add_scalar(f"shared_grad/{NAME}/{SITES[0]}", USE_3[i], step)
        writer.add_scalar(f"shared_grad/{NAME}/{SITES[1]}", USE_6[i], step)
        writer.add_scalar(f"shared_grad_error/{NAME}", 0.0, step)
    writer.close()
    metrics = SummaryWriter(str(tmp_path / "metrics"))
    metrics.add_scalar("val_acc", 0.75, 100)
    metrics.close()
    return tmp_path


def test_read_scalars_returns_every_point(schema_run: Path) -> None:
    series = read_scalars(schema_run)
    assert series[f"shared_grad/{NAME}/{SITES[1]}"] == Series(list(STEPS), list(USE_6))
    assert series["val_acc"] == Series([100], [0.75])  # from the event file in the subdirectory
    assert series[f"weight_mean/{NAME}"].values == [0.0, 0.25, 0.5]


def test_shared_sites_parses_name_and_site(schema_run: Path) -> None:
    sites = shared_sites(read_scalars(schema_run))
    assert list(sites) == [NAME] and list(sites[NAME]) == list(SITES)
    assert sites[NAME][SITES[0]].values == list(USE_3)


def test_summary_figure_panels(schema_run: Path) -> None:
    fig = summary_figure(read_scalars(schema_run))
    weights, grads, shared, metrics = fig.axes
    assert {line.get_label() for line in weights.get_lines()} == {NAME, "model.net.1.weight"}
    assert {line.get_label() for line in grads.get_lines()} == {NAME}  # grad_norm_total is not a layer
    lines = {line.get_label(): list(line.get_ydata()) for line in shared.get_lines()}
    assert lines == {
        f"{NAME} @ {SITES[0]}": list(USE_3),
        f"{NAME} @ {SITES[1]}": list(USE_6),
        f"{NAME} total": [a + b for a, b in zip(USE_3, USE_6, strict=True)],
    }
    assert [line.get_label() for line in metrics.get_lines()] == ["val_acc"]
    plt.close(fig)


def test_plot_summary_writes_png(schema_run: Path) -> None:
    out = plot_summary(schema_run)
    assert out == schema_run / "summary.png"
    data = out.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 10_000


def test_plot_without_monitor_tags(tmp_path: Path) -> None:
    writer = SummaryWriter(str(tmp_path))
    writer.add_scalar("train_loss", 2.0, 0)
    writer.close()
    fig = summary_figure(read_scalars(tmp_path))
    texts = [t.get_text() for ax in fig.axes[:3] for t in ax.texts]
    assert texts == ["no tags: was ParameterMonitor on?"] * 2 + ["no shared parameters logged"]
    assert len(fig.axes[3].get_lines()) == 1
    plt.close(fig)
