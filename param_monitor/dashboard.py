"""A TensorBoard custom-scalars layout for the tags that :class:`ParameterMonitor` logs.

TensorBoard's Scalars page draws one chart per tag, so a shared parameter's gradient
contributions (``shared_grad/{name}/{site}``) and its total (``grad_norm/{name}``) land
in different sections and cannot be compared by eye.  The custom-scalars page can put
several tags on one chart; this module builds that layout.

Every chart holds a regular expression over the documented tags rather than a list of
tags, so the layout written at step 0 keeps matching when layers are added or renamed.
TensorBoard applies the expressions with ``re.match`` (anchored at the start only), so
each one is anchored at both ends here.

This module imports no Lightning: it only needs TensorBoard's protos and a writer with
``add_custom_scalars`` (``torch.utils.tensorboard.SummaryWriter``, or tensorboardX's).

>>> layout = custom_scalars_layout({"model.net.3.weight": ["model.net.3", "model.net.5"]})
>>> for chart in layout.category[0].chart:
...     print(f"{chart.title}: {chart.multiline.tag[0]}")
model.net.3.weight: ^(shared_grad/model\\.net\\.3\\.weight/[^/]+|grad_norm/model\\.net\\.3\\.weight)$
gradient norms: ^(grad_norm/.*|grad_norm_total)$
weight norms: ^weight_norm/.*$
weight means: ^weight_mean/.*$
shared gradient error: ^shared_grad_error/.*$
shared gradient cosine: ^shared_grad_cosine/.*$
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from typing import Any, Protocol

from tensorboard.plugins.custom_scalar import layout_pb2

from param_monitor import tags

__all__ = ["custom_scalars_layout", "shared_parameter_regex", "write_layout", "layout_as_dict", "registered_charts"]

# (chart title, regex) for the charts every model gets, in the order they are drawn:
# gradients before weights, as they move first when training goes wrong.
# "gradient norms" holds grad_norm_total too: the total is the root of the sum of squares
# of the per-parameter norms, so it bounds them from above without squashing the scale,
# and shows at a glance which parameter carries the gradient.
MODEL_CHARTS: tuple[tuple[str, str], ...] = (
    ("gradient norms", r"^(grad_norm/.*|grad_norm_total)$"),
    ("weight norms", r"^weight_norm/.*$"),
    ("weight means", r"^weight_mean/.*$"),
)

# Opt-in diagnostics (``log_update_ratio``, ``log_dead_units``), drawn after the gradient norms.
# A custom-scalars chart cannot draw a constant guide line (a margin chart needs logged tags), so
# the rule of thumb for the update ratio is in the title.
UPDATE_RATIO_CHART = ("update ratio ‖Δw‖/‖w‖ per step (rule of thumb: about 1e-3)", r"^update_ratio/.*$")
DEAD_UNITS_CHART = ("dead units: fraction of rows with an all-zero gradient (1.0: layer dead)", r"^dead_units/.*$")

# Charts that only make sense when some parameter is shared.  Error and cosine get a
# chart each because their healthy values (about 0 and about 1) differ in scale.
SHARED_CHECK_CHARTS: tuple[tuple[str, str], ...] = (
    ("shared gradient error", r"^shared_grad_error/.*$"),
    ("shared gradient cosine", r"^shared_grad_cosine/.*$"),
)


class CustomScalarsWriter(Protocol):
    """What :func:`write_layout` needs of a writer: SummaryWriter's dict-based method."""

    def add_custom_scalars(self, layout: dict[str, dict[str, list[Any]]]) -> None: ...


def shared_parameter_regex(name: str) -> str:
    """Regex for one shared parameter's chart: each use's contribution plus its total.

    The name is escaped (parameter names are full of dots) and a site is one path
    segment, so ``model.net.3.weight`` does not pick up ``model.net.3.weight2``'s tags.

    >>> pattern = re.compile(shared_parameter_regex("net.3.weight"))
    >>> [bool(pattern.match(t)) for t in
    ...  ["shared_grad/net.3.weight/net.3", "grad_norm/net.3.weight", "grad_norm/net.3.weight2"]]
    [True, True, False]
    """
    escaped = re.escape(name)
    return rf"^(shared_grad/{escaped}/[^/]+|grad_norm/{escaped})$"


def _multiline(title: str, regex: str) -> layout_pb2.Chart:
    """One chart whose series are all tags matching ``regex``."""
    return layout_pb2.Chart(title=title, multiline=layout_pb2.MultilineChartContent(tag=[regex]))


#: Families with a chart of their own above; any other registered family gets one from the registry.
_CHARTED = (
    tags.GRAD_NORM, tags.GRAD_NORM_TOTAL, tags.WEIGHT_NORM, tags.WEIGHT_MEAN, tags.UPDATE_RATIO, tags.DEAD_UNITS,
    tags.SHARED_GRAD, tags.SHARED_GRAD_SHARE, tags.SHARED_GRAD_ERROR, tags.SHARED_GRAD_COSINE,
)  # fmt: skip


def registered_charts(options: Mapping[str, bool]) -> list[tuple[str, str]]:
    """``(title, regex)`` for every registered family this module has no chart of its own for (a
    statistic added later: per-site activations, optimizer state), when its option is on.

    >>> registered_charts({})
    []
    """
    return [
        (f"{f.name}: {f.meaning}", rf"^{re.escape(f.name)}/.*$")
        for f in tags.FAMILIES
        if f.name not in _CHARTED and (f.option is None or options.get(f.option, False))
    ]


def custom_scalars_layout(
    shared_sites: Mapping[str, Sequence[str]],
    title: str = "param_monitor",
    update_ratio: bool = False,
    dead_units: bool = False,
    options: Mapping[str, bool] | None = None,
) -> layout_pb2.Layout:
    """Build the custom-scalars layout: one category ``title`` with multi-line charts.

    ``shared_sites`` maps each shared parameter's name to the module paths that use it
    (the callback's own bookkeeping).  Only the names shape the layout: the sites are
    matched by the regex, so a model re-wired later still fills the chart.

    The shared parameters' charts come first, as they are what this project adds and
    what the top of the page should show; the two checks of the split (error, cosine)
    come last, flat lines unless something is wrong.  With no shared parameters, only
    the model charts remain. ``update_ratio``/``dead_units`` (the callback's opt-in flags) add
    their charts right after the gradient norms. ``options`` (a monitor option's name: on or off) adds
    a chart for each family registered later whose option is on (:func:`registered_charts`), after
    the model charts.

    >>> [c.title for c in custom_scalars_layout({}, title="mlp").category[0].chart]
    ['gradient norms', 'weight norms', 'weight means']
    >>> [c.title[:12] for c in custom_scalars_layout({}, update_ratio=True, dead_units=True).category[0].chart]
    ['gradient nor', 'update ratio', 'dead units: ', 'weight norms', 'weight means']
    """
    charts = [_multiline(name, shared_parameter_regex(name)) for name in shared_sites]
    model = list(MODEL_CHARTS)
    model[1:1] = [c for c, on in ((UPDATE_RATIO_CHART, update_ratio), (DEAD_UNITS_CHART, dead_units)) if on]
    charts += [_multiline(chart_title, regex) for chart_title, regex in model]
    charts += [_multiline(chart_title, regex) for chart_title, regex in registered_charts(options or {})]
    if shared_sites:
        charts += [_multiline(chart_title, regex) for chart_title, regex in SHARED_CHECK_CHARTS]
    return layout_pb2.Layout(category=[layout_pb2.Category(title=title, chart=charts)])


def layout_as_dict(layout: layout_pb2.Layout) -> dict[str, dict[str, list[Any]]]:
    """Translate a multi-line-only layout to the dict ``SummaryWriter.add_custom_scalars`` takes.

    That dict cannot say ``closed`` nor hold margin charts, so those are refused rather
    than silently dropped.

    >>> layout_as_dict(custom_scalars_layout({}, title="mlp"))["mlp"]["weight means"]
    ['Multiline', ['^weight_mean/.*$']]
    """
    result: dict[str, dict[str, list[Any]]] = {}
    for category in layout.category:
        if category.closed:
            raise ValueError(f"category {category.title!r}: a closed category cannot be written")
        charts: dict[str, list[Any]] = {}
        for chart in category.chart:
            if chart.WhichOneof("content") != "multiline":
                raise ValueError(f"chart {chart.title!r}: only multi-line charts can be written")
            charts[chart.title] = ["Multiline", list(chart.multiline.tag)]
        result[category.title] = charts
    return result


def write_layout(writer: CustomScalarsWriter, layout: layout_pb2.Layout) -> None:
    """Write ``layout`` once into the writer's run (its event lands at step 0).

    Goes through the writer's public ``add_custom_scalars`` so it works with both
    ``torch.utils.tensorboard`` and tensorboardX writers (Lightning's TensorBoardLogger
    uses either).  Call it once per run: TensorBoard reads the first layout of a run and
    merges layouts across runs, skipping identical charts.
    """
    writer.add_custom_scalars(layout_as_dict(layout))
