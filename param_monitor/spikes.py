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

from collections.abc import Callable, Sequence
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


def parse_markdown(text: str) -> list[Spike]:
    """The spikes listed in a :func:`markdown` record (its table's rows, in its order).

    >>> found = [Spike("train_loss", 37, 50.5, 2.25), Spike("grad_norm_total", 40, 9.0, 1.5)]
    >>> parse_markdown(markdown(found, 2, rule())) == found
    True
    """
    spikes = []
    for line in text.splitlines():
        cells = [cell.strip() for cell in line.strip().strip("|").split("|")]
        if len(cells) == 4 and cells[0].isdigit():  # a table row; not the header, the rule or the separator
            spikes.append(Spike(cells[1], int(cells[0]), float(cells[2]), float(cells[3])))
    return spikes


#: the rule as the text record states it
def rule(window: int = 100, threshold: float = 6.0, warmup: int = 20) -> str:
    return (
        f"value > median + {threshold:g} * max(1.4826 * MAD, 0.01 * |median|) over the last {window} values, "
        f"after {warmup}"
    )


class SpikeHook:
    """``detect_spikes``: a step hook and a collector of the monitor's core (``core.StepHook``/``core.Collector``).

    Every optimizer step (logging or not) the total gradient norm of ``params()`` (squared norms
    times ``grad_scale(optimizer)`` where AMP's gradients are still scaled) is tested and added on
    the device; every backward pass, the loss handed to it (times ``loss_scale()`` under a
    GradScaler; under Lightning's gradient accumulation, divided by the number of micro-batches, so
    one point per micro-batch on a steady scale). The records ride in the next logging step's
    transfer (:meth:`pack`); new spikes are warned about once per series and written as the
    ``param_monitor/spikes`` text (the first 20 of the fit) through ``write_text(markdown, step)``.
    ``step()`` gives the current step label. Under DDP each rank keeps its own detectors (the gradient
    norm is the same everywhere; the loss is rank 0's); with sharded parameters the gradient norm
    of a rank's shards is not the model's, so only the loss is watched.
    """

    SHOWN = 20

    def __init__(
        self,
        params: Callable[[], Sequence[Tensor]],
        step: Callable[[], int],
        write_text: Callable[[str, int], None],
        grad_scale: Callable[[object], Tensor | None] = lambda optimizer: None,
        loss_scale: Callable[[], Tensor | None] = lambda: None,
        sharded: Callable[[], bool] = lambda: False,
        window: int = 100,
        threshold: float = 6.0,
        warmup: int = 20,
    ) -> None:
        self._params, self._step, self._write_text = params, step, write_text
        self._grad_scale, self._loss_scale, self._sharded = grad_scale, loss_scale, sharded
        self.rule = rule(window, threshold, warmup)
        self.detectors = {
            name: SpikeDetector(name, window, threshold, warmup) for name in ("grad_norm_total", "train_loss")
        }
        self._stepped = -1  # the last step whose gradient norm was tested (several optimizers: once)
        self._taken: list[SpikeDetector] = []
        self.found: list[Spike] = []
        self.total = 0
        self._warned: set[str] = set()

    # -- every step, on the device ------------------------------------------------------------------
    @torch.no_grad()
    def before_backward(self, loss: object) -> None:
        if not isinstance(loss, Tensor) or loss.numel() != 1 or not loss.is_floating_point():
            return
        value = loss.detach().reshape(())
        scale = self._loss_scale()
        if scale is not None:
            value = value * scale.to(value.device)
        self.detectors["train_loss"].update(value, self._step())

    @torch.no_grad()
    def before_optimizer_step(self, optimizer: object, logging: bool) -> None:
        from param_monitor.dtensor import local_tensor

        step = self._step()
        if step == self._stepped or self._sharded():
            return
        self._stepped = step
        grads = [local_tensor(p.grad) for p in self._params() if p.grad is not None]
        if not grads:
            return
        squares = torch.stack([n.to(grads[0].device) for n in torch._foreach_norm(grads, 2)]).double().square()
        total = squares.sum()
        scale = self._grad_scale(optimizer)
        if scale is not None:
            total = total * scale.to(total.device)
        self.detectors["grad_norm_total"].update(total.sqrt(), step)

    # -- the logging step's transfer -----------------------------------------------------------------
    def start(self, module: object) -> None: ...

    def pack(self, optimizer: object) -> Tensor:
        from param_monitor import distributed

        self._taken = [d for d in self.detectors.values() if d._values is not None]
        records = [d.device_record() for d in self._taken]
        if not records:
            return torch.zeros(0, dtype=torch.float64)
        device = records[0].device
        packed = torch.cat([r.to(device) for r in records])
        if self._sharded() and not distributed.is_rank_zero():
            packed = torch.zeros_like(packed)  # the core sums a sharded run's values over the ranks: rank 0's count
        return packed

    def finalize(self, values: Sequence[float]) -> dict[str, float]:
        from param_monitor import distributed

        offset, new = 0, []
        for detector in self._taken:
            new += detector.read_record(values[offset : offset + detector.record_size])
            self.total += int(values[offset])
            offset += detector.record_size
        self._taken = []
        if new:
            new.sort(key=lambda s: s.step)
            self.found = sorted(self.found + new, key=lambda s: s.step)[: self.SHOWN]
            self._write_text(markdown(self.found, self.total, self.rule), max(s.step for s in new))
            for spike in new:
                if spike.series not in self._warned:
                    self._warned.add(spike.series)
                    distributed.warn_rank_zero(
                        f"`ParameterMonitor`: {spike.series} spiked at step {spike.step}: {spike.value:.4g} > "
                        f"{spike.threshold:.4g} ({self.rule}). Later spikes of {spike.series} go to the "
                        "`param_monitor/spikes` text only."
                    )
        return {}

    def batch_start(self, logging: bool) -> None: ...
    def after_backward(self) -> None: ...
    def after_optimizer_step(self, optimizer: object, logging: bool) -> None: ...
    def batch_end(self, logging: bool) -> None: ...
    def on_exception(self, exc: BaseException) -> None: ...

    def teardown(self) -> None:
        """The end of fit: spikes after the last logging step are read (one transfer) and reported."""
        packed = self.pack(None)
        if packed.numel():
            self.finalize(packed.cpu().tolist())
