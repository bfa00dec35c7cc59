"""Where NaN/inf gradients first appeared: the monitor's own record, kept on the device.

A downsampled chart can hide a single bad step; this record cannot. It holds the first step
and the first layers (in model order) whose gradient was non-finite, and it is reported once, in
a warning and as TensorBoard text (``tags.NONFINITE_TAG``). A later logging step whose own
non-finite layers were not named yet is warned about too.

With ``check_finite_every_step`` every optimizer step updates the record ON THE DEVICE (no host
sync): one ``_foreach_norm`` over the gradients, a flag per parameter and a flag per step since
the last read. The record is read in the logging step's one transfer (appended to the packed
statistics, so that sharded runs sum it with them: a flag > 0 means "on some rank") and once
more at the end of fit.

>>> import torch
>>> policy = NonFinitePolicy()
>>> a, b = torch.nn.Parameter(torch.ones(2)), torch.nn.Parameter(torch.ones(2))
>>> a.grad, b.grad = torch.ones(2), torch.tensor([1.0, float("nan")])
>>> policy.check_step([("a", a), ("b", b)], step=7)
>>> report = policy.read_record(policy.device_record().tolist())
>>> report.step, report.layers, report.logged
(7, ['b'], False)
>>> print(report.message())  # doctest: +NORMALIZE_WHITESPACE
`ParameterMonitor`: non-finite (NaN/inf) gradients first at step 7, in b. They are not logged: step 7 was
not a logging step (found by `check_finite_every_step`).
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

from param_monitor import distributed, tags

_SHOWN = 5  # layers named in a message; the rest are counted


class NonFiniteGradientError(RuntimeError):
    """Raised when ``raise_on_nonfinite=True`` and a step has NaN/inf gradients."""


@dataclass
class NonFiniteReport:
    """Non-finite gradients at ``step`` in ``layers`` (model order); ``logged``: their values were written."""

    step: int
    layers: list[str]
    logged: bool
    first: bool = True  # the fit's first record (later ones only name new layers)

    def _layer_list(self) -> str:
        more = len(self.layers) - _SHOWN
        return ", ".join(self.layers[:_SHOWN]) + (f" (+{more} more)" if more > 0 else "") or "unknown layers"

    def message(self) -> str:
        when = "first at step" if self.first else "at step"
        head = f"`ParameterMonitor`: non-finite (NaN/inf) gradients {when} {self.step}, in {self._layer_list()}."
        if self.logged:
            return f"{head} Their values are logged as they are (NaN/inf)."
        found = "found by `check_finite_every_step`"
        return f"{head} They are not logged: step {self.step} was not a logging step ({found})."

    def markdown(self) -> str:
        """The TensorBoard text record (written once per fit, at the first step)."""
        return "\n".join(
            [
                "| non-finite gradients | |",
                "| --- | --- |",
                f"| first step | {self.step} |",
                f"| first layers | {', '.join(self.layers) or 'unknown'} |",
                f"| values logged | {'yes' if self.logged else 'no'} |",
            ]
        )


@dataclass
class _DeviceRecord:
    """Flags of one parameter list since the last read, all on the device."""

    names: list[str]
    base: int  # the step label of ``hits[0]``
    bad: Tensor  # per parameter: non-finite at the first bad step of this record
    hits: Tensor  # per step since ``base``: whether that step had a non-finite gradient
    seen: Tensor  # whether ``bad`` is set

    def size(self) -> int:
        return len(self.names) + self.hits.numel()


class NonFinitePolicy:
    """Keeps the non-finite record of one fit and decides what to report (see the module docstring)."""

    def __init__(self, raise_on_nonfinite: bool = False) -> None:
        self.raise_on_nonfinite = raise_on_nonfinite
        self.recorded = False  # the first record was reported
        self._named: set[str] = set()  # layers named in a report so far
        self._records: list[_DeviceRecord] = []  # one per parameter list seen since the last read
        self._taken: list[tuple[list[str], int, int]] = []  # (names, base, size) of the records being read

    def __getstate__(self) -> dict[str, object]:  # device tensors are not state (ddp_spawn pickles callbacks)
        state = self.__dict__.copy()
        state["_records"] = []
        return state

    # -- every step, on the device --------------------------------------------------------
    def check_step(self, named_params: Sequence[tuple[str, torch.nn.Parameter]], step: int) -> None:
        """Update the record with this step's gradients: device ops only, no host sync."""
        grads = [distributed.local_tensor(p.grad) for _, p in named_params if p.grad is not None]
        if not grads:
            return
        # a sparse gradient (`nn.Embedding(sparse=True)`): its values (no sparse kernel takes `dtype`)
        grads = [g.coalesce().values() if g.is_sparse else g for g in grads]
        norms = torch._foreach_norm(grads, 2, dtype=torch.float32)
        device = norms[0].device
        it = iter(norms)
        zero = torch.zeros((), device=device)  # parameters without a gradient are finite
        flags = [next(it).to(device) if p.grad is not None else zero for _, p in named_params]
        bad = ~torch.isfinite(torch.stack(flags))
        record = self._record_for([n for n, _ in named_params], step, device)
        offset = step - record.base
        if offset >= record.hits.numel():  # more steps than expected since the last read: grow
            grown = torch.zeros(max(2 * record.hits.numel(), offset + 1), dtype=torch.bool, device=device)
            grown[: record.hits.numel()] = record.hits
            record.hits = grown
        any_bad = bad.any()
        record.hits[offset] |= any_bad
        record.bad = torch.where(record.seen, record.bad, bad)
        record.seen = record.seen | any_bad

    def _record_for(self, names: list[str], step: int, device: torch.device) -> _DeviceRecord:
        if not self._records or self._records[-1].names != names:  # the parameter list changed: a new record
            self._records.append(
                _DeviceRecord(
                    names,
                    step,
                    torch.zeros(len(names), dtype=torch.bool, device=device),
                    torch.zeros(8, dtype=torch.bool, device=device),
                    torch.zeros((), dtype=torch.bool, device=device),
                )
            )
        return self._records[-1]

    @property
    def pending(self) -> bool:
        return bool(self._records)

    def device_record(self) -> Tensor | None:
        """The records as one float64 vector (per record: parameter flags, then step flags); fresh ones start."""
        if not self._records:
            return None
        self._taken = [(r.names, r.base, r.size()) for r in self._records]
        packed = torch.cat([torch.cat([r.bad, r.hits]) for r in self._records]).double()
        self._records = []
        return packed

    def read_record(self, values: Sequence[float]) -> NonFiniteReport | None:
        """Decode what :meth:`device_record` packed (possibly summed over ranks): the earliest bad step."""
        offset = 0
        for names, base, size in self._taken:
            flags, hits = values[offset : offset + len(names)], values[offset + len(names) : offset + size]
            offset += size
            first = next((i for i, hit in enumerate(hits) if hit > 0), None)
            if first is not None:
                layers = [n for n, flag in zip(names, flags, strict=True) if flag > 0]
                return self._new_report(base + first, layers, logged=False)
        return None

    # -- a logging step ----------------------------------------------------------------------
    def from_metrics(self, metrics: Mapping[str, float], step: int) -> NonFiniteReport | None:
        """This logging step's own non-finite gradients (read from the metrics: they may name modules)."""
        if all(map(math.isfinite, metrics.values())):  # the usual case, without a Python loop
            return None
        prefix = f"{tags.GRAD_NORM}/"
        bad = [k[len(prefix) :] for k, v in metrics.items() if k.startswith(prefix) and not math.isfinite(v)]
        return self._new_report(step, bad, logged=True) if bad else None

    def _new_report(self, step: int, layers: list[str], logged: bool) -> NonFiniteReport | None:
        if self.recorded and not set(layers) - self._named:
            return None  # nothing new to name: said already
        report = NonFiniteReport(step, layers, logged, first=not self.recorded)
        self.recorded = True
        self._named.update(layers)
        return report

    def raise_if_asked(self, report: NonFiniteReport) -> None:
        if self.raise_on_nonfinite:
            raise NonFiniteGradientError(
                f"Non-finite gradients at step {report.step} in: {report._layer_list()} "
                "(`raise_on_nonfinite=True`)."
            )
