"""Spikes of a training signal (``grad_norm_total``, the training loss), detected on the device every step.

The rule, per series: a value is a **spike** when

    value > median + threshold * spread,   spread = max(1.4826 * MAD, 0.01 * |median|)

where median and MAD (the median absolute deviation from the median) are taken over the last
``window`` finite values BEFORE this one (default: 100 values, ``threshold`` 6), and only once at
least ``warmup`` values (default 20) are in the window. 1.4826 * MAD estimates the standard
deviation of normally distributed values without being moved by the spikes themselves; the 1%
floor keeps a nearly constant series from flagging rounding noise. Only upward spikes count. A
non-finite value is neither a spike nor kept (the non-finite record reports it). A spike enters the
window like any value: a lasting jump stops being flagged once it is half of the window.

Everything stays on the device: a ring buffer of the last ``window`` values (NaN where none yet),
``torch.nanmedian`` for the median and the MAD, and a small table of the first ``capacity`` spikes
since the last read (step, value, threshold) with their count: about 15 small kernels per step,
no host sync. :meth:`SpikeDetector.device_record` packs it as one float64 vector to ride in a
logging step's transfer; :meth:`SpikeDetector.read_record` decodes it on the host.

>>> import torch
>>> detector = SpikeDetector("grad_norm_total", window=10, warmup=5)
>>> for step, value in enumerate([1.0, 1.1, 0.9, 1.0, 1.05, 0.95, 9.0, 1.0]):
...     detector.update(torch.tensor(value), step)
>>> detector.read_record(detector.device_record().tolist())
[Spike(series='grad_norm_total', step=6, value=9.0, threshold=1.44478)]
>>> detector.read_record(detector.device_record().tolist())   # read once
[]
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

from param_monitor.tags import SPIKES_TAG  # noqa: F401  (the text record's tag)

#: the spread of a normal distribution is 1.4826 MADs
MAD_TO_STD = 1.4826
#: spread floor, relative to |median|
RELATIVE_FLOOR = 0.01
_FIELDS = 3  # per recorded spike: step, value, threshold


@dataclass(frozen=True)
class Spike:
    series: str
    step: int
    value: float
    threshold: float

    def __post_init__(self) -> None:
        object.__setattr__(self, "threshold", round(self.threshold, 6))


class SpikeDetector:
    """The running window and the spike table of one series (see the module docstring)."""

    def __init__(
        self, series: str, window: int = 100, threshold: float = 6.0, warmup: int = 20, capacity: int = 16
    ) -> None:
        if not 1 <= warmup <= window:
            raise ValueError(f"warmup must be between 1 and window ({window}), got {warmup}")
        self.series = series
        self.window, self.threshold, self.warmup, self.capacity = window, threshold, warmup, capacity
        self._values: Tensor | None = None  # created on the first value's device
        self._position = 0  # next slot of the ring (a host int: every update is a host call)

    def __getstate__(self) -> dict[str, object]:  # device tensors are not state (ddp_spawn pickles callbacks)
        state = self.__dict__.copy()
        state["_values"] = None
        state["_position"] = 0
        return state

    def _allocate(self, device: torch.device) -> None:
        self._values = torch.full((self.window,), float("nan"), dtype=torch.float64, device=device)
        self._table = torch.zeros(self.capacity + 1, _FIELDS, dtype=torch.float64, device=device)  # last: discard
        self._count = torch.zeros((), dtype=torch.int64, device=device)

    @torch.no_grad()
    def update(self, value: Tensor, step: int) -> None:
        """Test ``value`` (a 0-dim tensor, any device) against the window, then add it: device ops only."""
        value = value.detach().reshape(()).to(torch.float64)
        if self._values is None or self._values.device != value.device:
            self._allocate(value.device)
        values = self._values
        median = torch.nanmedian(values)
        spread = torch.maximum(MAD_TO_STD * torch.nanmedian((values - median).abs()), RELATIVE_FLOOR * median.abs())
        limit = median + self.threshold * spread
        finite = torch.isfinite(value)
        enough = (~torch.isnan(values)).sum() >= self.warmup
        spike = finite & enough & (value > limit)
        row = torch.where(spike, self._count.clamp(max=self.capacity), self.capacity)
        entry = torch.stack([torch.full_like(value, float(step)), value, limit]).unsqueeze(0)
        self._table.index_copy_(0, row.reshape(1), entry)
        self._count += spike.to(torch.int64)
        values[self._position] = torch.where(finite, value, float("nan"))
        self._position = (self._position + 1) % self.window

    def device_record(self) -> Tensor | None:
        """``[count, (step, value, threshold) x capacity]`` since the last read (float64); the table restarts."""
        if self._values is None:
            return None
        packed = torch.cat([self._count.reshape(1).to(torch.float64), self._table[: self.capacity].flatten()])
        self._count = torch.zeros_like(self._count)
        return packed

    @property
    def record_size(self) -> int:
        return 1 + _FIELDS * self.capacity

    def read_record(self, values: Sequence[float]) -> list[Spike]:
        """The spikes in a :meth:`device_record` vector (the first ``capacity`` of them; ``count`` may be more)."""
        count = int(values[0])
        rows = values[1:]
        return [
            Spike(self.series, int(rows[_FIELDS * i]), rows[_FIELDS * i + 1], rows[_FIELDS * i + 2])
            for i in range(min(count, self.capacity))
        ]


def markdown(spikes: Sequence[Spike], total: int, rule: str) -> str:
    """The TensorBoard text record: the first spikes of the fit (step, series, value, threshold)."""
    lines = [
        f"{total} spike(s) so far; the first {len(spikes)}: (rule: {rule})",
        "",
        "| step | series | value | threshold |",
        "| --- | --- | --- | --- |",
    ]
    lines += [f"| {s.step} | {s.series} | {s.value:.6g} | {s.threshold:.6g} |" for s in spikes]
    return "\n".join(lines)
