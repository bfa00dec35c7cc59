"""The spike rule on the device against the same rule computed in plain Python over the series."""

from __future__ import annotations

import math
import statistics

import pytest
import torch

from param_monitor.spikes import MAD_TO_STD, RELATIVE_FLOOR, SpikeDetector, markdown


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
