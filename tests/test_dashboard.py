"""Unit tests for param_monitor.dashboard: the layout's charts, regexes and round trip."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
from tensorboard.backend.event_processing import plugin_event_accumulator as pea
from tensorboard.plugins.custom_scalar import layout_pb2
from tensorboard.plugins.custom_scalar import metadata as cs_metadata
from tensorboard.util import tensor_util
from torch.utils.tensorboard import SummaryWriter

from param_monitor.dashboard import (
    custom_scalars_layout,
    layout_as_dict,
    shared_parameter_regex,
    write_layout,
)

SHARED = {
    "model.net.3.weight": ["model.net.3", "model.net.6"],
    "model.net.3.weight2": ["model.net.9", "model.net.12"],
}

# Tags the monitor writes for a model whose `model.net.3.weight` and
# `model.net.3.weight2` are both shared (the second's name extends the first's).
TAGS = [
    "weight_mean/model.net.0.weight",
    "weight_mean/model.net.3.weight",
    "weight_norm/model.net.3.weight",
    "grad_norm/model.net.0.weight",
    "grad_norm/model.net.3.weight",
    "grad_norm/model.net.3.weight2",
    "grad_norm_total",
    "shared_grad/model.net.3.weight/model.net.3",
    "shared_grad/model.net.3.weight/model.net.6",
    "shared_grad/model.net.3.weight2/model.net.9",
    "shared_grad/model.net.3.weight2/model.net.12",
    "shared_grad_error/model.net.3.weight",
    "shared_grad_cosine/model.net.3.weight",
]


def charts_by_title(layout: layout_pb2.Layout) -> dict[str, list[str]]:
    """Chart title -> its tag regexes, for the layout's only category."""
    (category,) = layout.category
    return {chart.title: list(chart.multiline.tag) for chart in category.chart}


def matching(regexes: list[str], tags: list[str] = TAGS) -> list[str]:
    """The tags a chart shows: TensorBoard keeps a tag when ``re.match`` finds a regex."""
    return [tag for tag in tags if any(re.match(regex, tag) for regex in regexes)]


def test_layout_has_one_category_with_the_model_charts_then_one_per_shared_parameter() -> None:
    layout = custom_scalars_layout(SHARED, title="shared_mlp")
    assert [c.title for c in layout.category] == ["shared_mlp"]
    assert not layout.category[0].closed
    assert list(charts_by_title(layout)) == [
        "model.net.3.weight",
        "model.net.3.weight2",
        "gradient norms",
        "weight norms",
        "weight means",
        "shared gradient error",
        "shared gradient cosine",
    ]


def test_every_chart_is_a_single_regex_multiline_chart() -> None:
    layout = custom_scalars_layout(SHARED)
    for chart in layout.category[0].chart:
        assert chart.WhichOneof("content") == "multiline"
        assert len(chart.multiline.tag) == 1
        re.compile(chart.multiline.tag[0])


def test_shared_chart_holds_exactly_its_own_sites_and_total() -> None:
    charts = charts_by_title(custom_scalars_layout(SHARED))
    assert matching(charts["model.net.3.weight"]) == [
        "grad_norm/model.net.3.weight",
        "shared_grad/model.net.3.weight/model.net.3",
        "shared_grad/model.net.3.weight/model.net.6",
    ]
    assert matching(charts["model.net.3.weight2"]) == [
        "grad_norm/model.net.3.weight2",
        "shared_grad/model.net.3.weight2/model.net.9",
        "shared_grad/model.net.3.weight2/model.net.12",
    ]


@pytest.mark.parametrize(
    "tag",
    [
        "grad_norm/model_net_3_weight",  # dots are escaped, not wildcards
        "shared_grad/model.net.3.weight/model.net.3/extra",  # a site is one segment
        "xgrad_norm/model.net.3.weight",  # anchored at the start
        "grad_norm/model.net.3.weight_step",  # anchored at the end
        "shared_grad/model.net.3.weight/",  # a site is not empty
    ],
)
def test_shared_regex_rejects_near_misses(tag: str) -> None:
    assert not re.match(shared_parameter_regex("model.net.3.weight"), tag)


def test_model_charts_match_their_tag_families() -> None:
    charts = charts_by_title(custom_scalars_layout(SHARED))
    assert matching(charts["weight means"]) == [
        "weight_mean/model.net.0.weight",
        "weight_mean/model.net.3.weight",
    ]
    assert matching(charts["weight norms"]) == ["weight_norm/model.net.3.weight"]
    # The total rides along on the per-parameter gradient chart, by design.
    assert matching(charts["gradient norms"]) == [
        "grad_norm/model.net.0.weight",
        "grad_norm/model.net.3.weight",
        "grad_norm/model.net.3.weight2",
        "grad_norm_total",
    ]
    assert matching(charts["shared gradient error"]) == ["shared_grad_error/model.net.3.weight"]
    assert matching(charts["shared gradient cosine"]) == ["shared_grad_cosine/model.net.3.weight"]


def test_without_shared_parameters_only_the_model_charts_remain() -> None:
    assert list(charts_by_title(custom_scalars_layout({}))) == [
        "gradient norms",
        "weight norms",
        "weight means",
    ]


def test_layout_as_dict_refuses_what_the_writer_cannot_say() -> None:
    closed = layout_pb2.Layout(category=[layout_pb2.Category(title="c", closed=True)])
    with pytest.raises(ValueError, match="closed"):
        layout_as_dict(closed)
    margin = layout_pb2.Layout(
        category=[layout_pb2.Category(title="c", chart=[layout_pb2.Chart(title="m", margin={})])]
    )
    with pytest.raises(ValueError, match="multi-line"):
        layout_as_dict(margin)


def read_layouts(run_dir: Path) -> list[tuple[int, layout_pb2.Layout]]:
    """(step, layout) of every custom-scalars config event, read by TensorBoard's own reader."""
    accumulator = pea.EventAccumulator(str(run_dir), size_guidance={pea.TENSORS: 0})
    accumulator.Reload()
    assert cs_metadata.PLUGIN_NAME in accumulator.ActivePlugins()
    events = accumulator.Tensors(cs_metadata.CONFIG_SUMMARY_TAG)
    return [
        (event.step, layout_pb2.Layout.FromString(tensor_util.make_ndarray(event.tensor_proto).item()))
        for event in events
    ]


def test_written_layout_reads_back_identical_at_step_zero(tmp_path: Path) -> None:
    layout = custom_scalars_layout(SHARED, title="shared_mlp")
    writer = SummaryWriter(log_dir=str(tmp_path))
    try:
        write_layout(writer, layout)
    finally:
        writer.close()
    assert read_layouts(tmp_path) == [(0, layout)]


def test_dashboard_module_does_not_import_lightning() -> None:
    """The layout is usable from plain PyTorch loops: only torch/tensorboard imports."""
    import ast

    import param_monitor.dashboard as dashboard

    tree = ast.parse(Path(dashboard.__file__).read_text())
    imported = {alias.name for node in ast.walk(tree) if isinstance(node, ast.Import) for alias in node.names}
    imported |= {node.module or "" for node in ast.walk(tree) if isinstance(node, ast.ImportFrom)}
    assert not [name for name in imported if name.split(".")[0] in ("lightning", "pytorch_lightning")]


def test_update_ratio_and_dead_units_charts_follow_the_gradient_norms() -> None:
    from param_monitor.dashboard import DEAD_UNITS_CHART, UPDATE_RATIO_CHART

    charts = charts_by_title(custom_scalars_layout({}, update_ratio=True, dead_units=True))
    expected = ["gradient norms", UPDATE_RATIO_CHART[0], DEAD_UNITS_CHART[0], "weight norms", "weight means"]
    assert list(charts) == expected
    tags = [*TAGS, "update_ratio/model.net.0.weight", "dead_units/model.net.0.weight", "update_ratio_x"]
    assert matching(charts[UPDATE_RATIO_CHART[0]], tags) == ["update_ratio/model.net.0.weight"]
    assert matching(charts[DEAD_UNITS_CHART[0]], tags) == ["dead_units/model.net.0.weight"]


def test_a_family_registered_later_gets_a_chart_when_its_option_is_on(monkeypatch: pytest.MonkeyPatch) -> None:
    from param_monitor import tags

    family = tags.MetricFamily("test_family", "site", "sum_over_numel", "heatmap", "linear", "test_option",
                               "a statistic added later")  # fmt: skip
    monkeypatch.setattr(tags, "FAMILIES", (*tags.FAMILIES, family))
    off = [c.title for c in custom_scalars_layout({}).category[0].chart]
    on = custom_scalars_layout({}, options={"test_option": True}).category[0].chart
    assert off == ["gradient norms", "weight norms", "weight means"]
    assert [c.title for c in on] == off + ["test_family: a statistic added later"]
    assert list(on[-1].multiline.tag) == [r"^test_family/.*$"]


def test_a_fit_writes_a_chart_for_each_opt_in_family_it_logs(tmp_path: Path) -> None:
    """The monitor passes its options to the layout: `log_optimizer_state=True` gives that family a chart."""
    import torch

    from param_monitor import ParameterMonitor
    from tests.helpers.modules import SharedMLP, fit

    class WithAdam(SharedMLP):
        def configure_optimizers(self) -> torch.optim.Optimizer:
            return torch.optim.Adam(self.parameters(), lr=1e-3)

    trainer, scalars = fit(
        WithAdam(), tmp_path, ParameterMonitor(log_every_n_steps=1, log_optimizer_state=True), max_steps=2
    )
    (_, layout), *_ = read_layouts(trainer.logger.log_dir)
    charts = charts_by_title(layout)
    state_charts = [title for title in charts if title.startswith("optimizer_state_norm")]
    assert len(state_charts) == 1
    logged = [tag for tag in scalars if tag.startswith("optimizer_state_norm/")]
    assert logged and matching(charts[state_charts[0]], logged) == logged
