"""The PARAM MONITOR tab's routes, through TensorBoard's own WSGI app and data provider (werkzeug's
test client), over event files that real short runs with the monitor wrote.

Every value served is compared with what TensorBoard's reader reads from the event files.
"""

from __future__ import annotations

import dataclasses
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
from plugin_runs import (
    ALBERT_TENSORS,
    NAN_FROM_STEP,
    REPO_ROOT,
    TINY_SHARED,
    TINY_SITES,
    AlbertLike,
    TinyShared,
    train_albert,
    train_no_step,
    train_plain,
    train_tiny,
    wsgi_app,
)
from torch.utils.tensorboard import SummaryWriter
from werkzeug.test import Client

from param_monitor import tags
from param_monitor.table import ParameterInfo
from param_monitor.tensorboard_plugin import health, plugin
from param_monitor.tensorboard_plugin.metadata import parse_run_metadata, write_run_metadata
from param_monitor.tensorboard_plugin.testing import write_synthetic_run
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
#: the families every monitored run logs (update ratio and dead units are opt-in)
ALWAYS = (tags.GRAD_NORM, tags.WEIGHT_NORM, tags.WEIGHT_MEAN)


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
    assert set(info["rows"]) == set(ALWAYS)  # only the families the run logged
    for metric in ALWAYS:
        assert info["rows"][metric] == MODEL_ORDER
    assert info["nonfinite"] == []


@pytest.mark.parametrize("run", [TINY, NAN_RUN])
@pytest.mark.parametrize("metric", ALWAYS)
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
    for module in ("model.js", "views.js"):  # index.js imports them by these relative routes
        assert f"from './{module}'".encode() in index.get_data()
        assert client.get(f"{PREFIX}/{module}").mimetype == "text/javascript"
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


# -- the registry, groups of shared tensors, layer health, empty states (issue 17) -------------------

ALBERT, NO_STEP, PLAIN_LOOP = "albert/version_0", "no_step/version_0", "plain_loop"


@pytest.fixture(scope="module")
def more_logdir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """An ALBERT-like run (one layer of 17 tensors at 12 depths, a tied embedding) and a run of 30
    steps that logged none (the Trainer's default ``log_every_n_steps=50``)."""
    root = tmp_path_factory.mktemp("more_logs")
    train_albert(root)
    train_no_step(root)
    return root


@pytest.fixture(scope="module")
def more(more_logdir: Path) -> Client:
    return Client(wsgi_app(more_logdir))


def test_families_route_serves_the_registry(client: Client) -> None:
    served = get(client, "/families")["families"]
    assert served == [f.to_json() for f in tags.FAMILIES]
    assert {f["name"] for f in served if f["chart"] == "heatmap"} >= {tags.UPDATE_RATIO, tags.DEAD_UNITS}


def test_a_plain_pytorch_run_makes_the_tab_active_in_weight_before_bias_order(tmp_path: Path) -> None:
    train_plain(tmp_path)  # ParameterWatcher + write_scalars: no run metadata
    app = Client(wsgi_app(tmp_path))
    listing = strict_json(app.get("/data/plugins_listing").get_data(as_text=True))
    assert listing["param_monitor"]["enabled"] is True
    assert get(app, "/runs") == {"runs": [{"name": PLAIN_LOOP, "metadata": False}]}
    info = get(app, "/run", run=PLAIN_LOOP)
    order = [name.removeprefix("model.") for name in MODEL_ORDER]  # the bare Sequential's names
    assert info["rows"][tags.GRAD_NORM] == order  # 0.weight, 0.bias, 2.weight, ...: not alphabetical
    assert info["status"]["tracking"] is True and info["status"]["no_step_logged"] is False


def test_an_unknown_metric_error_names_the_allowed_ones(client: Client) -> None:
    response = client.get(PREFIX + "/heatmap", query_string={"run": TINY, "metric": "nope"})
    assert response.status_code == 400
    assert all(m in response.get_data(as_text=True) for m in plugin.heatmap_families())


def test_albert_like_run_has_one_group_for_the_layer_and_one_for_the_tied_embedding(more: Client) -> None:
    info = get(more, "/run", run=ALBERT)
    model = [n for n, _ in AlbertLike().named_parameters()]
    layer = [n for n in model if n.startswith("layer.")]
    assert len(layer) == ALBERT_TENSORS
    groups = [(g["name"], g["tensors"]) for g in info["groups"]]
    assert groups == [("embeddings", ["embeddings.weight"]), ("layer", layer)]
    assert info["groups"][0]["uses"] == ["embeddings", "head"]
    assert info["groups"][1]["uses"] == [f"call {k}" for k in range(12)]
    assert info["rows"][tags.UPDATE_RATIO] == model and info["rows"][tags.GRAD_NORM] == model


def test_group_bands_are_grad_norm_squared_weighted_shares_adding_up_to_one(more: Client, more_logdir: Path) -> None:
    logged = read_scalars(more_logdir / ALBERT)
    groups = {g["name"]: g for g in get(more, "/groups", run=ALBERT)["groups"]}
    layer = groups["layer"]
    sites = get(more, "/run", run=ALBERT)["groups"][1]["sites"]
    assert layer["steps"] == sorted(logged[tags.grad_norm(layer["tensors"][0])])
    for j, step in enumerate(layer["steps"]):
        g2 = {t: logged[tags.grad_norm(t)][step] ** 2 for t in layer["tensors"]}
        for k in range(12):
            oracle = sum(logged[tags.shared_grad_share(t, sites[t][k])][step] * g2[t] for t in g2) / sum(g2.values())
            assert layer["bands"][k][j] == pytest.approx(oracle, rel=1e-6)
            norm = math.sqrt(sum(logged[tags.shared_grad(t, sites[t][k])][step] ** 2 for t in g2))
            assert layer["use_norm"][k][j] == pytest.approx(norm, rel=1e-6)
        assert sum(band[j] for band in layer["bands"]) == pytest.approx(1.0, abs=1e-6)
        worst = max(logged[tags.shared_grad_error(t)][step] for t in g2)
        assert same(layer["error"][j], worst)
    assert layer["every_use_seen"] is True and layer["max_error"] < health.EVERY_USE_SEEN_BELOW


def test_a_run_without_a_logged_step_says_so(more: Client) -> None:
    info = get(more, "/run", run=NO_STEP)
    assert info["status"]["no_step_logged"] is True and info["status"]["last_step"] is None
    assert info["rows"] == {}  # no empty heatmap rows
    assert [p["name"] for p in info["parameters"]] == MODEL_ORDER  # the table still shows the model


def test_health_lists_update_ratios_out_of_range_with_the_event_files_values(more: Client, more_logdir: Path) -> None:
    logged = read_scalars(more_logdir / ALBERT)
    served = get(more, "/health", run=ALBERT)
    ratios = {n[len("update_ratio/") :]: v for n, v in logged.items() if n.startswith("update_ratio/")}
    low, high = health.UPDATE_RATIO_RANGE
    expected = []
    for name in [n for n, _ in AlbertLike().named_parameters() if n in ratios]:
        recent = [ratios[name][s] for s in sorted(ratios[name])][-health.RECENT :]
        median = float(np.median(recent))
        if not low <= median <= high:
            expected.append((name, median))
    found = [(f["name"], f["value"]) for f in served["findings"] if f["kind"] == "update_ratio"]
    assert [n for n, _ in found] == [n for n, _ in expected]
    assert all(v == pytest.approx(m, rel=1e-6) for (_, v), (_, m) in zip(found, expected, strict=True))
    assert served["checked"][tags.UPDATE_RATIO] == len(ratios)


def test_health_rules_on_known_values() -> None:
    grad = {"a.weight": {0: 1.0, 1: 2.0, 2: math.nan}, "b.weight": {0: 1.0, 1: 0.0}, "c.weight": {0: 1.0, 1: 0.5}}
    ratio = {"a.weight": {1: 1e-3}, "c.weight": {0: 5e-5, 1: 2e-2, 2: 3e-2}}
    dead = {"b.weight": {1: 0.5}, "c.weight": {1: 0.51}}
    found = health.layers_to_look_at(grad, ratio, dead, ["a.weight", "b.weight", "c.weight"])
    assert [(f["kind"], f["name"], f["step"]) for f in found] == [
        ("nonfinite", "a.weight", 2),
        ("vanished", "b.weight", 1),
        ("update_ratio", "c.weight", 2),  # median 2e-2 of the last logged steps
        ("dead_units", "c.weight", 1),  # 0.5 exactly is not "more than half"
    ]


def test_a_per_site_family_registered_later_is_a_heatmap_in_model_order(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A family a peer module registers (``activation_std/{site}``) is served without plugin changes."""
    family = tags.MetricFamily("activation_std", "site", "sum_over_numel", "heatmap", "linear", None, "std of outputs")
    monkeypatch.setattr(tags, "FAMILIES", (*tags.FAMILIES, family))
    monkeypatch.setitem(tags._BY_NAME, family.name, family)
    sites = ["model.2#10", "model.0", "model.2#2"]
    with SummaryWriter(str(tmp_path / "acts")) as writer:
        rows = [ParameterInfo(f"model.{i}.weight", (2, 2), 4, True) for i in (0, 2)]
        write_run_metadata(writer, rows, {}, 0)
        write_scalars(writer, {f"activation_std/{s}": float(i) for i, s in enumerate(sites)}, 0)
    app = Client(wsgi_app(tmp_path))
    assert get(app, "/run", run="acts")["rows"] == {"activation_std": ["model.0", "model.2#2", "model.2#10"]}
    data = get(app, "/heatmap", run="acts", metric="activation_std")
    assert data["values"] == [[1.0], [2.0], [0.0]]


def test_the_heatmap_and_the_health_list_read_grad_norm_once(logdir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The tab asks for both at once; on 1,000 tensors each read of a family takes about a second."""
    app = wsgi_app(logdir)
    provider = next(p for p in app._plugins if isinstance(p, plugin.ParamMonitorPlugin))._provider
    reads: list[list[str]] = []
    original = provider.read_scalars

    def counted(*args: Any, **kwargs: Any) -> Any:
        reads.append(sorted(kwargs["run_tag_filter"].tags))
        return original(*args, **kwargs)

    monkeypatch.setattr(provider, "read_scalars", counted)
    client = Client(app)
    get(client, "/heatmap", run=TINY, metric=tags.GRAD_NORM)
    get(client, "/health", run=TINY)
    grad_reads = [r for r in reads if r and r[0].startswith("grad_norm/")]
    assert grad_reads == [sorted(f"grad_norm/{n}" for n in MODEL_ORDER)]
    monkeypatch.setattr(plugin, "CACHE_SECONDS", 0.0)  # stale: read again (a run being written)
    get(client, "/heatmap", run=TINY, metric=tags.GRAD_NORM)
    assert len([r for r in reads if r and r[0].startswith("grad_norm/")]) == 2


def write_metadata_run(run_dir: Path, rows: list[ParameterInfo], shared: dict[str, list[str]]) -> None:
    with SummaryWriter(str(run_dir)) as writer:
        write_run_metadata(writer, rows, shared, 0)
        write_scalars(writer, {f"grad_norm/{r.name}": 1.0 for r in rows}, 0)


def test_tracking_off_and_a_single_use_alias_are_told_apart(tmp_path: Path) -> None:
    """Tracking off: no call sites anywhere. A tied alias used once: call sites known, one of them."""
    tied = ("head.weight",)
    write_metadata_run(tmp_path / "off", [ParameterInfo("emb.weight", (4, 2), 8, True, tied)], {})
    emb, other = ParameterInfo("emb.weight", (4, 2), 8, True, tied, ("emb",)), ParameterInfo("x.weight", (2,), 2, True)
    rows = [emb, dataclasses.replace(other, call_sites=("x",))]
    write_metadata_run(tmp_path / "alias", rows, {})
    app = Client(wsgi_app(tmp_path))
    off = get(app, "/run", run="off")["status"]
    assert off["tracking"] is False and off["single_use_aliases"] == []
    alias = get(app, "/run", run="alias")["status"]
    assert alias["tracking"] is True
    assert alias["single_use_aliases"] == [{"name": "emb.weight", "aliases": list(tied), "sites": ["emb"]}]


def test_a_spike_record_is_served_as_safe_html(tmp_path: Path) -> None:
    """The text record a statistic module writes (``param_monitor/spikes``), shown like the non-finite one."""
    with SummaryWriter(str(tmp_path / "spiky")) as writer:
        write_scalars(writer, {"grad_norm/a.weight": 1.0}, 0)
        writer.add_text(plugin.SPIKES_TAG, "step 7: `a.weight` grad_norm 40x its median <script>x</script>", 7)
    (record,) = get(Client(wsgi_app(tmp_path)), "/run", run="spiky")["spikes"]
    assert record["step"] == 7 and "<code>a.weight</code>" in record["html"] and "<script>" not in record["html"]


def test_the_spike_steps_of_the_record_are_served_for_the_time_axes(tmp_path: Path) -> None:
    """``spike_steps``: every step the ``param_monitor/spikes`` records list (a logged step, and one between two)."""
    write_synthetic_run(tmp_path / "spiky", tensors=4, steps=4, spikes=(120, 99))
    write_synthetic_run(tmp_path / "calm", tensors=4, steps=4)
    app = Client(wsgi_app(tmp_path))
    info = get(app, "/run", run="spiky")
    assert info["spike_steps"] == [99, 120] and [r["step"] for r in info["spikes"]] == [99, 120]
    assert get(app, "/run", run="calm")["spike_steps"] == []
