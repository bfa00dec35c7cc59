"""The static report (``python -m param_monitor.report``), on event files written here in the monitor's tag schema."""

from __future__ import annotations

import contextlib
import math
from pathlib import Path

import matplotlib.pyplot as plt
import numpy as np
import pytest
import torch
from torch.utils.tensorboard import SummaryWriter

from param_monitor import report
from param_monitor.report import Series, plot_summary, read_scalars, shared_sites, summary_figure
from param_monitor.table import ParameterInfo
from param_monitor.tensorboard_plugin.metadata import write_run_metadata

NAME = "model.net.3.weight"
SITES = ("model.net.3", "model.net.6")
STEPS = (0, 50, 100)
# Values exact in float32, so reading back must return them unchanged.
USE_3, USE_6 = (0.5, 0.25, 0.125), (1.5, 0.75, 0.375)
# shares of the gradient (sum 1; a negative one: a use pulling against the other), and its norm
SHARE_3, SHARE_6 = (0.25, -0.5, 0.75), (0.75, 1.5, 0.25)
GRAD = (2.0, 1.0, 0.5)


@pytest.fixture
def schema_run(tmp_path: Path) -> Path:
    """A log dir holding one event file with the monitor's tags, and a second (subdir) with metrics."""
    writer = SummaryWriter(str(tmp_path))
    for i, step in enumerate(STEPS):
        writer.add_scalar(f"weight_mean/{NAME}", 0.25 * i, step)
        writer.add_scalar("weight_mean/model.net.1.weight", -0.5, step)
        writer.add_scalar(f"grad_norm/{NAME}", GRAD[i], step)
        writer.add_scalar(f"shared_grad_share/{NAME}/{SITES[0]}", SHARE_3[i], step)
        writer.add_scalar(f"shared_grad_share/{NAME}/{SITES[1]}", SHARE_6[i], step)
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
    weights, grads, shared, metrics, stack, heatmap, _colorbar = fig.axes[:7]
    assert {line.get_label() for line in weights.get_lines()} == {NAME, "model.net.1.weight"}
    assert {line.get_label() for line in grads.get_lines()} == {NAME}  # grad_norm_total is not a layer
    lines = {line.get_label(): list(line.get_ydata()) for line in shared.get_lines()}
    assert lines == {
        f"{NAME} @ {SITES[0]}": list(USE_3),
        f"{NAME} @ {SITES[1]}": list(USE_6),
        f"{NAME} total": list(GRAD),
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
    texts = [t.get_text() for ax in fig.axes for t in ax.texts]
    assert texts == [report.NO_MONITOR] * 2 + [report.NO_SHARED, report.NO_SHARES, report.NO_MONITOR] + [
        report.NO_UPDATE_RATIO,
        report.NO_DEAD_UNITS,
        report.NO_MONITOR,  # no layer to look at
    ]
    assert len(fig.axes[3].get_lines()) == 1
    plt.close(fig)


def test_share_stack_adds_up_to_the_gradient_norm(schema_run: Path) -> None:
    steps, stack = report.share_stack(read_scalars(schema_run), NAME)
    assert steps == list(STEPS) and list(stack) == list(SITES)
    assert stack[SITES[0]] == [s * g for s, g in zip(SHARE_3, GRAD, strict=True)]  # -0.5: below zero
    assert [a + b for a, b in zip(stack[SITES[0]], stack[SITES[1]], strict=True)] == list(GRAD)
    fig = summary_figure(read_scalars(schema_run))
    polygons = fig.axes[4].collections  # one filled band per use
    assert len(polygons) == 2 and len({tuple(p.get_facecolor()[0]) for p in polygons}) == 2
    plt.close(fig)


def test_heatmap_rows_follow_the_model_order_of_the_metadata(tmp_path: Path) -> None:
    """Tags written in another order than the model's: the metadata's order wins; a NaN is marked."""
    names = ["net.0.weight", "net.0.bias", "net.3.weight", "net.9.weight"]
    writer = SummaryWriter(str(tmp_path))
    rows = [ParameterInfo(n, (2,), 2, True, ("net.6.weight",) if n == "net.3.weight" else ()) for n in names]
    write_run_metadata(writer, rows, {"net.3.weight": ["net.3", "net.6"]}, step=0)
    for step in range(3):
        for n in reversed(names):
            value = math.nan if (n, step) == ("net.3.weight", 2) else 0.0 if n == "net.9.weight" else 10.0**step
            writer.add_scalar(f"grad_norm/{n}", value, step)
    writer.close()
    run = report.read_run(tmp_path)
    assert run.parameters == names and run.aliases == {"net.3.weight": ["net.6.weight"]}
    rows_out, steps, matrix = report.gradient_flow(run)
    assert rows_out == names and steps == [0, 1, 2]
    assert matrix[0].tolist() == [1.0, 10.0, 100.0] and math.isnan(matrix[2, 2]) and matrix[3].tolist() == [0.0] * 3
    fig = summary_figure(run)
    heatmap = fig.axes[5]
    assert [t.get_text() for t in heatmap.get_yticklabels()][2] == "net.3.weight (= net.6.weight)"
    special = heatmap.get_images()[1].get_array()
    assert special[2, 2] == 1.0 and special[3].tolist() == [0.0] * 3  # NaN magenta, zeros black
    assert np.ma.count(special) == 4  # and nothing else marked
    plt.close(fig)


def test_cli_writes_the_png(schema_run: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "out" / "report.png"
    assert report.main([str(schema_run), "--out", str(out)]) == out
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and str(out) in capsys.readouterr().out
    with pytest.raises(SystemExit):
        report.main([str(tmp_path / "empty")])


def write_health_run(root: Path) -> Path:
    """Update ratios and dead units around the rules' limits, and a NaN gradient at step 2."""
    names = ["net.0.weight", "net.0.bias", "net.2.weight"]
    writer = SummaryWriter(str(root))
    write_run_metadata(writer, [ParameterInfo(n, (2,), 2, True) for n in names], {}, step=0)
    ratios = {"net.0.weight": 1e-3, "net.0.bias": 5e-5, "net.2.weight": 0.05}
    dead = {"net.0.weight": 0.0, "net.2.weight": 0.75}
    for step in range(4):
        for n in names:
            writer.add_scalar(f"grad_norm/{n}", math.nan if (n, step) == ("net.2.weight", 2) else 1.0, step)
            writer.add_scalar(f"update_ratio/{n}", ratios[n], step)
            if n in dead:
                writer.add_scalar(f"dead_units/{n}", dead[n], step)
    writer.close()
    return root


def test_health_panels_show_update_ratio_and_dead_units_and_the_layers_to_look_at(tmp_path: Path) -> None:
    run = report.read_run(write_health_run(tmp_path))
    fig = summary_figure(run)
    ratio = next(ax for ax in fig.axes if ax.get_title().startswith("update ratio"))
    dead = next(ax for ax in fig.axes if ax.get_title().startswith("dead units"))
    listed = next(ax for ax in fig.axes if ax.get_title(loc="left") == "layers to look at")
    shown = ratio.get_images()[0].get_array()
    assert np.allclose(shown[:, 0], np.log10([1e-3, 5e-5, 0.05]), atol=1e-6)  # model order, log10
    assert [t.get_text() for t in ratio.get_yticklabels()] == ["net.0.weight", "net.0.bias", "net.2.weight"]
    bar = next(ax for ax in fig.axes if "1e-3 rule of thumb" in [t.get_text() for t in ax.get_yticklabels()])
    assert bar is not ratio
    assert dead.get_images()[0].get_array()[:, 0].tolist() == [0.0, 0.75]
    text = listed.texts[0].get_text().split("\n")
    assert text[0] == "net.2.weight: first NaN/inf gradient norm at step 2: net.2.weight (step 2)"
    assert text[1].startswith("net.0.bias: update ratio 5e-05") and "below 0.0001" in text[1]
    assert text[2].startswith("net.2.weight: update ratio 0.05")
    assert text[3] == "net.2.weight: 75% of its units dead (step 3)"
    assert len(text) == 4
    plt.close(fig)


def test_a_layer_shared_at_many_depths_gets_one_line_per_use_not_per_tensor_and_use(tmp_path: Path) -> None:
    """ALBERT-like: 3 tensors x 12 uses would be 39 lines; one line per use of the group instead, in call order."""
    tensors = ["layer.q.weight", "layer.q.bias", "layer.f.weight"]
    writer = SummaryWriter(str(tmp_path))
    sites = {t: [f"{t.rpartition('.')[0]}#{k}" for k in range(12)] for t in tensors}
    write_run_metadata(writer, [ParameterInfo(t, (2,), 2, True) for t in tensors], sites, step=0)
    for step in range(2):
        for i, t in enumerate(tensors):
            writer.add_scalar(f"grad_norm/{t}", 2.0 + i, step)
            for k, site in enumerate(sites[t]):
                writer.add_scalar(f"shared_grad/{t}/{site}", float(k + i), step)
    writer.close()
    fig = summary_figure(report.read_run(tmp_path))
    lines = {line.get_label(): list(line.get_ydata()) for line in fig.axes[2].get_lines()}
    assert list(lines) == [f"layer @ call {k}" for k in range(12)] + ["layer total"]
    assert lines["layer @ call 10"] == pytest.approx([math.sqrt(10**2 + 11**2 + 12**2)] * 2)
    assert lines["layer total"] == pytest.approx([math.sqrt(4 + 9 + 16)] * 2)
    plt.close(fig)


# -- spikes (detect_spikes=True), from a real fit -----------------------------------------------------
def _spike_marks(ax: plt.Axes) -> list[float]:
    """The x of every vertical spike marker on ``ax`` (a line whose gid says so)."""
    marks = [line for line in ax.get_lines() if line.get_gid() == report.SPIKE_GID]
    assert all(line.get_xdata()[0] == line.get_xdata()[1] for line in marks)  # vertical
    return sorted(float(line.get_xdata()[0]) for line in marks)


def _spike_run(tmp_path: Path, spike_at: int | None) -> report.Run:
    from param_monitor import ParameterMonitor
    from tests.helpers.modules import fit, loader
    from tests.test_spikes import Regression

    class LoggedRegression(Regression):
        def training_step(self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int) -> torch.Tensor:
            loss = super().training_step(batch, batch_idx)
            self.log("train_loss", loss)
            return loss

    monitor = ParameterMonitor(log_every_n_steps=10, detect_spikes=True)
    with pytest.warns(UserWarning, match="spiked") if spike_at is not None else contextlib.nullcontext():
        trainer, _ = fit(LoggedRegression(spike_at), tmp_path, monitor, loader(n=64, batch_size=64), max_steps=60)
    return report.read_run(trainer.logger.log_dir)


def test_a_planted_spike_is_marked_on_the_loss_and_gradient_norm_panels(tmp_path: Path) -> None:
    run = _spike_run(tmp_path, spike_at=37)
    assert sorted({(s.series, s.step) for s in run.spikes}) == [("grad_norm_total", 37), ("train_loss", 37)]
    fig = summary_figure(run)
    grads, metrics = fig.axes[1], fig.axes[3]
    assert _spike_marks(grads) == [37.0] and _spike_marks(metrics) == [37.0]
    assert "spike" in [t.get_text() for t in metrics.get_legend().get_texts()]
    assert all(_spike_marks(ax) == [] for ax in fig.axes if ax not in (grads, metrics))
    plt.close(fig)


def test_a_spike_free_run_has_no_marker(tmp_path: Path) -> None:
    run = _spike_run(tmp_path, spike_at=None)
    assert run.spikes == ()
    fig = summary_figure(run)
    assert all(_spike_marks(ax) == [] for ax in fig.axes)
    assert [t.get_text() for t in fig.axes[3].get_legend().get_texts()] == ["train_loss"]
    plt.close(fig)
