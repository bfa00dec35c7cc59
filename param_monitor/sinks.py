"""Where the core writes: a small sink interface, so that the core imports no training framework.

A :class:`Sink` receives one logging step's scalars and, if it is a TensorBoard writer
(``rich = True``), the parameter table, the run metadata of the PARAM MONITOR tab, the
custom-scalars layout, histograms and the non-finite record. The Lightning shell makes one sink per
logger (on rank 0 only); the plain-PyTorch API one per ``SummaryWriter``.

>>> class Memory(Sink):
...     def __init__(self): self.rows = []
...     def scalars(self, metrics, step): self.rows.append((step, dict(metrics)))
>>> sink = Memory()
>>> sink.scalars({"grad_norm/w": 1.0}, 3); sink.text("t", "x", 3)   # text: a no-op for scalar-only sinks
>>> sink.rows
[(3, {'grad_norm/w': 1.0})]
"""

from __future__ import annotations

import re
from collections.abc import Callable, Mapping, Sequence
from typing import Any

from torch import Tensor

from param_monitor.table import ParameterInfo
from param_monitor.tensorboard_plugin.metadata import write_run_metadata
from param_monitor.writers import write_scalars


class Sink:
    """Scalar-only by default; :class:`TensorBoardSink` overrides the rest."""

    rich = False  # takes text, histograms, run metadata and the layout

    def scalars(self, metrics: Mapping[str, float], step: int) -> None:
        raise NotImplementedError

    def text(self, tag: str, markdown: str, step: int) -> None:
        pass

    def histograms(self, values: Mapping[str, Tensor], step: int) -> None:
        pass

    def run_metadata(
        self, rows: Sequence[ParameterInfo], shared: Mapping[str, Sequence[str]], step: int, status: Mapping[str, Any]
    ) -> None:
        pass

    def layout(
        self,
        shared_sites: Mapping[str, list[str]],
        update_ratio: bool,
        dead_units: bool,
        options: Mapping[str, bool] | None = None,
    ) -> None:
        pass

    def flush(self) -> None:
        pass


class MetricsSink(Sink):
    """Scalars through a ``log_metrics(metrics, step)`` callable (a Lightning logger other than TensorBoard)."""

    def __init__(self, log_metrics: Callable[[dict[str, float], int], Any]) -> None:
        self._log_metrics = log_metrics

    def scalars(self, metrics: Mapping[str, float], step: int) -> None:
        self._log_metrics(dict(metrics), step)


class TensorBoardSink(Sink):
    """A ``SummaryWriter`` (torch's or tensorboardX's); ``prefix`` goes before every scalar name."""

    rich = True

    def __init__(self, writer: Any, prefix: str = "", prefixed: Callable[[Mapping[str, float]], Mapping] | None = None):
        self.writer = writer
        self.prefix = prefix
        self._prefixed = prefixed or (lambda metrics: {prefix + k: v for k, v in metrics.items()})

    def scalars(self, metrics: Mapping[str, float], step: int) -> None:
        write_scalars(self.writer, self._prefixed(metrics), step)

    def text(self, tag: str, markdown: str, step: int) -> None:
        self.writer.add_text(tag, markdown, global_step=step)

    def histograms(self, values: Mapping[str, Tensor], step: int) -> None:
        for tag, value in values.items():
            self.writer.add_histogram(tag, value, step)

    def run_metadata(
        self, rows: Sequence[ParameterInfo], shared: Mapping[str, Sequence[str]], step: int, status: Mapping[str, Any]
    ) -> None:
        write_run_metadata(self.writer, rows, shared, step, status)

    def layout(
        self,
        shared_sites: Mapping[str, list[str]],
        update_ratio: bool,
        dead_units: bool,
        options: Mapping[str, bool] | None = None,
    ) -> None:
        from param_monitor.dashboard import custom_scalars_layout, write_layout

        layout = custom_scalars_layout(
            dict(shared_sites), update_ratio=update_ratio, dead_units=dead_units, options=options
        )
        if self.prefix:  # the charts' regexes must match the prefixed scalar names
            for category in layout.category:
                for chart in category.chart:
                    regexes = [r"^" + re.escape(self.prefix) + tag.removeprefix("^") for tag in chart.multiline.tag]
                    del chart.multiline.tag[:]
                    chart.multiline.tag.extend(regexes)
        write_layout(self.writer, layout)

    def flush(self) -> None:
        self.writer.flush()
