"""The spike rule on the device against the same rule computed in plain Python over the series."""

from __future__ import annotations

import math
import statistics
from pathlib import Path

import lightning.pytorch as pl
import pytest
import torch
import torch.nn as nn

from param_monitor import ParameterMonitor
from param_monitor._lightning import step_label
from param_monitor.spikes import MAD_TO_STD, RELATIVE_FLOOR, SpikeDetector, markdown
from tests.helpers.events import read_texts
from tests.helpers.modules import fit, loader


def _lower_median(values: list[float]) -> float:
    return statistics.median_low(values)  # torch.nanmedian: the lower of the two middle values


def _oracle(series: list[float], window: int, threshold: float, warmup: int) -> list[int]:
    """Steps flagged by the documented rule, recomputed with the statistics module."""
    flagged, kept = [], []
    for step, value in enumerate(series):
        recent = [v for v in kept[-window:] if not math.isnan(v)]
        if len(recent) >= warmup and math.isfinite(value):
            median = _lower_median(recent)
            mad = _lower_median([abs(v - median) for v in recent])
            if value > median + threshold * max(MAD_TO_STD * mad, RELATIVE_FLOOR * abs(median)):
                flagged.append(step)
        kept.append(value if math.isfinite(value) else math.nan)
    return flagged


def _run(series: list[float], **kwargs) -> list[int]:
    detector = SpikeDetector("loss", capacity=64, **kwargs)
    for step, value in enumerate(series):
        detector.update(torch.tensor(value, dtype=torch.float32), step)
    return [s.step for s in detector.read_record(detector.device_record().tolist())]


def test_planted_spike_is_recorded_at_its_step_with_its_value() -> None:
    gen = torch.Generator().manual_seed(0)
    series = (1.0 + 0.05 * torch.randn(300, generator=gen)).tolist()
    series[217] = 3.0
    detector = SpikeDetector("grad_norm_total")
    for step, value in enumerate(series):
        detector.update(torch.tensor(value), step)
    (spike,) = detector.read_record(detector.device_record().tolist())
    assert (spike.series, spike.step, spike.value) == ("grad_norm_total", 217, pytest.approx(3.0))
    assert 1.0 < spike.threshold < 1.6


def test_spike_free_series_records_none() -> None:
    gen = torch.Generator().manual_seed(1)
    # a decaying loss with noise: no value leaves the band
    series = [4.0 * math.exp(-i / 300) + 0.05 * float(torch.randn((), generator=gen)) for i in range(1000)]
    assert _run(series) == []


@pytest.mark.parametrize("seed", [2, 3])
def test_flags_match_the_rule_recomputed_on_the_host(seed: int) -> None:
    torch.manual_seed(seed)
    series = torch.distributions.LogNormal(0.0, 0.3).sample((400,)).tolist()
    for step in (30, 31, 150, 399):
        series[step] *= 8
    series[200] = math.nan
    series[201] = math.inf
    expected = _oracle(series, window=50, threshold=6.0, warmup=10)
    assert 30 in expected and 150 in expected  # the planted ones, at least
    assert _run(series, window=50, warmup=10) == expected


def test_nothing_before_warm_up() -> None:
    assert _run([1.0, 1.0, 100.0], warmup=3, window=10) == []
    assert _run([1.0, 1.0, 1.0, 100.0], warmup=3, window=10) == [3]


def test_count_beyond_capacity_and_the_text() -> None:
    detector = SpikeDetector("loss", window=10, warmup=2, capacity=2)
    for step, value in enumerate([1.0, 1.0, 50.0, 1.0, 1.0, 60.0, 1.0, 70.0]):
        detector.update(torch.tensor(value), step)
    record = detector.device_record().tolist()
    assert record[0] == 3  # three spikes, two kept
    spikes = detector.read_record(record)
    assert [s.step for s in spikes] == [2, 5]
    text = markdown(spikes, 3, "median + 6 spreads")
    assert "| 2 | loss | 50 |" in text and text.startswith("3 spike(s)")


def test_warmup_must_fit_the_window() -> None:
    with pytest.raises(ValueError, match="warmup must be between 1 and window"):
        SpikeDetector("loss", window=10, warmup=11)


# -- under a real Trainer, read back from the event files ----------------------------------------------
class Regression(pl.LightningModule):
    """Linear regression on one fixed batch (a smooth, decaying gradient norm); ``spike_at``: that step's
    loss is multiplied by 50."""

    def __init__(self, spike_at: int | None = None) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.lin = nn.Linear(4, 1)
        self.spike_at = spike_at

    def training_step(self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int) -> torch.Tensor:
        x, _ = batch
        loss = (self.lin(x) - x.sum(dim=1, keepdim=True)).pow(2).mean() + 1.0
        return loss * 50 if step_label(self.trainer) == self.spike_at else loss

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SGD(self.parameters(), lr=1e-3)


def _spike_fit(tmp_path: Path, spike_at: int | None) -> tuple[list[tuple[int, str]], list[str]]:
    import warnings

    data = loader(n=64, batch_size=64)  # the same batch every step: no noise that could pass for a spike
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        monitor = ParameterMonitor(log_every_n_steps=10, detect_spikes=True)
        trainer, _ = fit(Regression(spike_at), tmp_path, monitor, data, max_steps=60)
    texts = read_texts(trainer.logger.log_dir, "param_monitor/spikes")
    return texts, [str(w.message) for w in caught if "spiked" in str(w.message)]


def test_trainer_records_a_planted_spike_at_its_step(tmp_path: Path) -> None:
    texts, warned = _spike_fit(tmp_path, spike_at=37)
    assert texts and texts[0][0] == 37  # written at the spike's step, read on the next logging step (39)
    text = texts[-1][1]
    assert "| 37 | grad_norm_total |" in text and "| 37 | train_loss |" in text
    assert "| 38 |" not in text and "| 36 |" not in text
    assert len(warned) == 2 and all("at step 37" in w for w in warned)  # once per series


def test_trainer_spike_free_run_records_none(tmp_path: Path) -> None:
    texts, warned = _spike_fit(tmp_path, spike_at=None)
    assert texts == [] and warned == []
