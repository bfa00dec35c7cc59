"""Writing one fit: scalars to every sink, and to TensorBoard sinks the table, the tab's metadata, histograms.

The core decides what a step logs; :class:`RunWriter` writes it: once per step label (a parameter
of two optimizers is written at the first), the parameter table and custom-scalars layout once,
the PARAM MONITOR tab's run metadata with the run's logging status (``steps_logged`` 0: "no step
logged yet", rewritten at the first logged step and at the end of a fit that logged none).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Any

import torch
from torch import Tensor

from param_monitor import distributed, tags
from param_monitor.sharing import SharedUseTracker
from param_monitor.sinks import Sink
from param_monitor.table import format_markdown, parameter_table

Warn = Callable[[str, str], None]  # (once-per-fit key, message)


class RunWriter:
    """One fit's writing (see the module docstring); ``sinks`` is asked each time (rank 0 has them)."""

    def __init__(
        self,
        sinks: Callable[[], Sequence[Sink]],
        update_ratio: bool,
        dead_units: bool,
        options: Mapping[str, bool] | None = None,
    ) -> None:
        self.sinks = sinks
        self.layout_flags = (update_ratio, dead_units, dict(options or {}))  # options: charts of later families
        self.written: set[str] = set()  # tags written at the current step label
        self.metadata_logged: int | None = None  # `steps_logged` of the last run metadata written

    def rich(self) -> list[Sink]:
        return [sink for sink in self.sinks() if sink.rich]

    def new_step(self) -> None:
        self.written.clear()

    def first_at_step(self, values: dict[str, Any]) -> dict[str, Any]:
        """What was not written yet at this step label."""
        fresh = {k: v for k, v in values.items() if k not in self.written}
        self.written.update(fresh)
        return fresh

    def scalars(self, metrics: Mapping[str, float], step: int) -> None:
        if metrics:
            for sink in self.sinks():
                sink.scalars(metrics, step)

    def text(self, tag: str, markdown: str, step: int) -> None:
        for sink in self.rich():
            sink.text(tag, markdown, step)

    def summary(self, module: torch.nn.Module, tracker: SharedUseTracker | None, step: int, status: dict) -> None:
        """The parameter table, the custom-scalars layout and the run metadata (once, or after a change)."""
        rows, shared = _described(module, tracker)
        table = format_markdown(rows)
        for sink in self.rich():
            sink.text(tags.SUMMARY_TAG, table, step)
            sink.layout(shared, *self.layout_flags)
        self.metadata(module, tracker, step, status, (rows, shared))

    def metadata(
        self, module: torch.nn.Module, tracker: SharedUseTracker | None, step: int, status: dict, described: Any = None
    ) -> None:
        rows, shared = described or _described(module, tracker)
        for sink in self.rich():
            sink.run_metadata(rows, shared, step, status)
        self.metadata_logged = status["steps_logged"]

    def histograms(self, weights: dict[str, Tensor], grads: dict[str, Tensor], scaled: bool, step: int, warn: Warn):
        """Histograms of the finite values not written yet at ``step``; ``scaled``: a GradScaler run."""
        values = self.first_at_step({**weights, **grads})
        if not values:
            return
        # a sparse gradient (`nn.Embedding(sparse=True)`): the dense tensor the optimizer steps on
        # (`isfinite` and TensorBoard's histogram have no sparse kernel)
        values = {tag: v.to_dense() if v.is_sparse else v for tag, v in values.items()}
        flags = torch.stack([torch.isfinite(v).all() for v in values.values()]).tolist()  # one sync
        finite = dict(zip(values, flags, strict=True))
        if scaled and not all(finite.get(tag, True) for tag in grads):
            values = {t: v for t, v in values.items() if t not in grads}  # an overflow: GradScaler skips this step
        skipped = [tag for tag in values if not finite[tag]]
        if skipped:
            warn(
                "histogram",
                "`ParameterMonitor`: histograms of non-finite (NaN/inf) values are not written "
                f"({', '.join(skipped[:3])} at step {step}; shown once per fit): they would be empty or wrong.",
            )
        kept = {tag: v for tag, v in values.items() if finite[tag]}
        for sink in self.rich():
            sink.histograms(kept, step)

    def flush(self) -> None:
        for sink in self.sinks():
            sink.flush()


def _described(module: torch.nn.Module, tracker: SharedUseTracker | None) -> tuple[list, dict[str, list[str]]]:
    """The parameter table's rows (with call sites) and the shared parameters' sites."""
    call_sites = tracker.call_sites() if tracker is not None else {}
    shared_names = set(tracker.shared_names()) if tracker is not None else set()
    shared = {n: s for n, s in call_sites.items() if n in shared_names}
    return parameter_table(module, call_sites), shared


def histogram_values(
    named_params: Sequence[tuple[str, torch.nn.Parameter]], names: set[str], inv_scale: Tensor | None
) -> tuple[dict[str, Tensor], dict[str, Tensor]]:
    """``weight_hist``/``grad_hist`` values of ``names`` (gradients times ``inv_scale`` when still scaled)."""
    # rank 0 holds one shard of a sharded parameter: its histogram would mislead (gathering costs a collective)
    params = [(n, p) for n, p in named_params if n in names and not distributed.is_sharded(p)]
    weights = {tags.weight_hist(n): p.detach().float() for n, p in params}
    grads = {tags.grad_hist(n): p.grad.detach().float() for n, p in params if p.grad is not None}
    if inv_scale is not None:
        grads = {tag: g * inv_scale.to(g.device) for tag, g in grads.items()}
    return weights, grads
