"""The PARAM MONITOR tab's routes, through TensorBoard's own WSGI app and data provider (werkzeug's
test client), over event files that real short runs with the monitor wrote.

Every value served is compared with what TensorBoard's reader reads from the event files.
"""

from __future__ import annotations

import gzip
import importlib
import importlib.metadata
import json
import math
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import tomllib
from plugin_runs import NAN_FROM_STEP, REPO_ROOT, TINY_SHARED, TINY_SITES, TinyShared, train_tiny, wsgi_app
from torch.utils.tensorboard import SummaryWriter
from werkzeug.test import Client

from param_monitor import tags
from param_monitor.tensorboard_plugin import plugin
from param_monitor.tensorboard_plugin.metadata import parse_run_metadata
from param_monitor.writers import write_scalars
from tests.helpers.events import load_events, read_scalars

PREFIX = "/data/plugin/param_monitor"
TINY, NAN_RUN, PLAIN = "tiny_shared/version_0", "nan_run/version_0", "plain"


@pytest.fixture(scope="module")
def logdir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Two monitored runs (one turning NaN at step 6, with a non-finite record) and one without the monitor."""
    root = tmp_path_factory.mktemp("plugin_logs")
    train_tiny(root)
    train_tiny(root, "nan_run", nan_from=NAN_FROM_STEP)  # the monitor writes its non-finite record itself
    with SummaryWriter(str(root / PLAIN)) as writer:
        writer.add_scalar("train_loss", 1.0, 0)
    return root


@pytest.fixture(scope="module")
def client(logdir: Path) -> Client:
    return Client(wsgi_app(logdir))


def get(client: Client, route: str, **params: str) -> Any:
    response = client.get(PREFIX + route, query_string=params)
    assert response.status_code == 200, response.get_data(as_text=True)
    return strict_json(response.get_data(as_text=True))


def strict_json(text: str) -> Any:
    """Decode JSON as a browser does: a bare NaN/Infinity (invalid JSON) is an error, not a float."""

    def refuse(constant: str) -> None:
        raise ValueError(f"invalid JSON constant {constant}")

    return json.loads(text, parse_constant=refuse)


def revive(value: Any) -> float:
    """What the front end does with TensorBoard's strings for non-finite numbers."""
    return {"NaN": math.nan, "Infinity": math.inf, "-Infinity": -math.inf}.get(value, value)


def same(served: Any, logged: float) -> bool:
    """A served value equals the float32 in the event file (NaN equal to NaN)."""
    value = revive(served)
    return (math.isnan(value) and math.isnan(logged)) or np.float32(value) == np.float32(logged)


MODEL_ORDER = [name for name, _ in TinyShared().named_parameters()]  # first names, tied tensors once


def test_the_tab_is_active_only_for_a_logdir_with_the_monitors_data(client: Client, logdir: Path) -> None:
    listing = strict_json(client.get("/data/plugins_listing").get_data(as_text=True))
    entry = listing["param_monitor"]
    assert entry["enabled"] is True and entry["tab_name"] == "Param Monitor"
    assert entry["loading_mechanism"] == {"type": "IFRAME", "module_path": f"{PREFIX}/index.js"}
    plain_only = Client(wsgi_app(logdir / PLAIN))
    listing = strict_json(plain_only.get("/data/plugins_listing").get_data(as_text=True))
    assert listing["param_monitor"]["enabled"] is False


def test_runs_are_those_the_monitor_wrote(client: Client) -> None:
    assert get(client, "/runs") == {"runs": [{"name": NAN_RUN, "metadata": True}, {"name": TINY, "metadata": True}]}


def test_the_monitor_writes_its_metadata_once_per_run(logdir: Path) -> None:
    events = load_events(logdir / TINY)
    (written,) = events.Tensors(tags.RUN_METADATA_TAG)
    meta = parse_run_metadata(written.tensor_proto)
    assert [p["name"] for p in meta["parameters"]] == MODEL_ORDER
    assert meta["shared"] == {TINY_SHARED: list(TINY_SITES), "model.2.bias": list(TINY_SITES)}


def test_run_describes_the_model_in_its_order(client: Client) -> None:
    info = get(client, "/run", run=TINY)
    params = {p["name"]: p for p in info["parameters"]}
    assert list(params) == MODEL_ORDER
    assert params[TINY_SHARED] == {
        "name": TINY_SHARED,
        "shape": [8, 8],
        "numel": 64,
        "requires_grad": True,
        "aliases": ["model.4.weight"],
        "call_sites": list(TINY_SITES),
    }
    assert info["shared"] == {TINY_SHARED: list(TINY_SITES), "model.2.bias": list(TINY_SITES)}
    for metric in plugin.HEATMAP_METRICS:
        assert info["rows"][metric] == MODEL_ORDER
    assert info["nonfinite"] == []


@pytest.mark.parametrize("run", [TINY, NAN_RUN])
@pytest.mark.parametrize("metric", plugin.HEATMAP_METRICS)
def test_heatmap_values_equal_the_event_files(client: Client, logdir: Path, run: str, metric: str) -> None:
    logged = read_scalars(logdir / run)
    data = get(client, "/heatmap", run=run, metric=metric)
    assert data["rows"] == MODEL_ORDER and data["cell_steps"] is None  # 12 steps: no binning
    assert data["steps"] == sorted(logged[f"{metric}/{MODEL_ORDER[0]}"])
    for name, values in zip(data["rows"], data["values"], strict=True):
        by_step = logged[f"{metric}/{name}"]
        assert all(same(v, by_step[s]) for s, v in zip(data["steps"], values, strict=True)), name


def test_a_nan_gradient_is_sent_as_the_string_nan_and_its_record_shown(client: Client, logdir: Path) -> None:
    data = get(client, "/heatmap", run=NAN_RUN, metric=tags.GRAD_NORM)
    first = data["values"][0]
    assert all(isinstance(v, float) and math.isfinite(v) for v in first[:NAN_FROM_STEP])
    assert first[NAN_FROM_STEP:] == ["NaN"] * (len(first) - NAN_FROM_STEP)
    (record,) = get(client, "/run", run=NAN_RUN)["nonfinite"]
    assert record["step"] == NAN_FROM_STEP
    assert "first step" in record["html"] and "model.0.weight" in record["html"]
    shared = {v["name"]: v for v in get(client, "/shared", run=NAN_RUN)["shared"]}[TINY_SHARED]
    assert shared["grad_norm"][NAN_FROM_STEP] == "NaN" and shared["stack"][TINY_SITES[0]][NAN_FROM_STEP] == "NaN"


def test_shared_stack_is_share_times_grad_norm_and_adds_up_to_it(client: Client, logdir: Path) -> None:
    logged = read_scalars(logdir / TINY)
    views = {v["name"]: v for v in get(client, "/shared", run=TINY)["shared"]}
    view = views[TINY_SHARED]
    assert view["sites"] == list(TINY_SITES)
    grad = logged[tags.grad_norm(TINY_SHARED)]
    assert view["steps"] == sorted(grad)
    for j, step in enumerate(view["steps"]):
        assert same(view["grad_norm"][j], grad[step])
        shares = [logged[tags.shared_grad_share(TINY_SHARED, s)][step] for s in TINY_SITES]
        for site, share in zip(TINY_SITES, shares, strict=True):
            assert view["stack"][site][j] == pytest.approx(share * grad[step], rel=1e-6)
            assert same(view["use_norm"][site][j], logged[tags.shared_grad(TINY_SHARED, site)][step])
        top = sum(view["stack"][site][j] for site in TINY_SITES)
        assert top == pytest.approx(grad[step], rel=1e-5)  # the stack's top is the gradient norm
        assert same(view["cosine"][j], logged[tags.shared_grad_cosine(TINY_SHARED)][step])
        assert same(view["error"][j], logged[tags.shared_grad_error(TINY_SHARED)][step])


def test_series_of_one_row(client: Client, logdir: Path) -> None:
    logged = read_scalars(logdir / TINY)
    data = get(client, "/series", run=TINY, name="model.0.weight")
    assert set(data["series"]) == {"grad_norm", "weight_norm", "weight_mean"}
    for metric, s in data["series"].items():
        expected = logged[f"{metric}/model.0.weight"]
        assert s["steps"] == sorted(expected)
        assert all(same(v, expected[step]) for step, v in zip(s["steps"], s["values"], strict=True))


@pytest.mark.parametrize("route", ["/run", "/shared", "/heatmap", "/series"])
@pytest.mark.parametrize("run", ["nope", PLAIN, "../../etc/passwd", f"{TINY}/.."])
def test_an_unknown_run_is_404(client: Client, route: str, run: str) -> None:
    response = client.get(PREFIX + route, query_string={"run": run})
    assert response.status_code == 404 and run in response.get_data(as_text=True)


def test_a_missing_run_or_unknown_metric_is_400(client: Client) -> None:
    assert client.get(PREFIX + "/heatmap").status_code == 400
    assert client.get(PREFIX + "/heatmap", query_string={"run": TINY, "metric": "../x"}).status_code == 400


@pytest.mark.parametrize(
    "path",
    [
        "/static/../plugin.py",
        "/static/..%2fplugin.py",
        "/static/%2e%2e/%2e%2e/table.py",
        "/static//etc/passwd",
        "/static/index.js/../../metadata.py",
        "/static/",
    ],
)
def test_path_traversal_is_refused(client: Client, path: str) -> None:
    response = client.get(PREFIX + path)
    assert response.status_code == 404
    assert b"import" not in response.get_data() and b"root:" not in response.get_data()


def test_front_end_assets_come_from_the_plugins_routes(client: Client) -> None:
    index = client.get(PREFIX + "/index.js")
    assert index.status_code == 200 and index.mimetype == "text/javascript"
    assert b"export async function render()" in index.get_data()
    assert client.get(PREFIX + "/static/style.css").mimetype == "text/css"
    served = client.get(PREFIX + "/plotly.min.js", headers={"Accept-Encoding": "gzip"})
    assert served.status_code == 200 and served.headers["Content-Encoding"] == "gzip"
    spec = importlib.util.find_spec("plotly")
    installed = Path(next(iter(spec.submodule_search_locations))) / "package_data" / "plotly.min.js"
    assert gzip.decompress(served.get_data()) == installed.read_bytes()  # the installed package's own file


def test_many_steps_are_binned_on_the_server_and_a_nan_between_columns_still_shows(tmp_path: Path) -> None:
    steps = plugin.MAX_COLUMNS * 3 + 7
    names = [f"layer.{i}.weight" for i in range(5)]
    run = tmp_path / "long"
    with SummaryWriter(str(run)) as writer:
        for step in range(steps):
            metrics = {f"grad_norm/{n}": float(step + i) for i, n in enumerate(names)}
            if step == 100:
                metrics["grad_norm/layer.3.weight"] = math.nan
            write_scalars(writer, metrics, step)
    data = get(Client(wsgi_app(tmp_path)), "/heatmap", run="long", metric="grad_norm")
    assert data["rows"] == names and len(data["steps"]) == plugin.MAX_COLUMNS and data["steps"][-1] == steps - 1
    for i, (values, sources) in enumerate(zip(data["values"], data["cell_steps"], strict=True)):
        for value, source in zip(values, sources, strict=True):
            if (i, source) == (3, 100):
                assert value == "NaN"
            else:
                assert value == float(source + i)  # a value really logged at the step it says
    assert 100 in data["cell_steps"][3] and 100 not in data["steps"]  # the NaN's column ends later


def test_pyproject_declares_the_entry_point_tensorboard_loads() -> None:
    project = tomllib.loads((REPO_ROOT / "pyproject.toml").read_text())
    target = project["project"]["entry-points"]["tensorboard_plugins"]["param_monitor"]
    module, _, attr = target.partition(":")
    loaded = getattr(importlib.import_module(module), attr)
    assert loaded is plugin.ParamMonitorPlugin and loaded.plugin_name == tags.PLUGIN_NAME
    package_data = project["tool"]["setuptools"]["package-data"]["param_monitor.tensorboard_plugin"]
    shipped = {p.name for pattern in package_data for p in plugin.STATIC_DIR.parent.glob(pattern)}
    assert shipped == set(plugin.STATIC_FILES)
    assert any(d.startswith("plotly>=6,<7") for d in project["project"]["dependencies"])
    installed = [e for e in importlib.metadata.entry_points(group="tensorboard_plugins") if e.name == "param_monitor"]
    assert all(e.value == target for e in installed)  # once installed, the same target
