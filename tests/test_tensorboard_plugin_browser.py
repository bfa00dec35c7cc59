"""End to end: the PARAM MONITOR tab in a real TensorBoard, looked at in a real (headless) Chromium.

Short real runs with the monitor, one TensorBoard for the module: the exercise's SharedMLP tied
(``model.net.3`` is ``model.net.6``) and untied, a tiny shared model whose gradients turn NaN at step 6,
an ALBERT-like model (one layer of 17 tensors at 12 depths, an embedding tied to the head; update
ratio and dead units on) and a run of 30 steps that logged none. What is plotted is read from the
page (plotly's own trace data on each chart) and compared with the event files; the 1,000-tensor run
(``slow``) gets a server of its own. Draw times are printed (never asserted).

TensorBoard finds the tab through the package's ``tensorboard_plugins`` entry point once
``pip install -e .`` registered it; before that (a checkout whose venv was installed from another
copy), through ``tests/tensorboard_launcher.py``. Set ``PARAM_MONITOR_TAB_DOCS=1`` to write the
screenshots of docs/tab.md (docs/tab.png, docs/tab_health.png, docs/tab_group.png).
"""

from __future__ import annotations

import importlib.metadata
import math
import os
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

if __name__ == "__main__":  # run as a script (the screenshot below): the repository root for `tests.helpers`
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np  # noqa: E402
import pytest  # noqa: E402
from browser_support import (  # noqa: E402
    TensorBoardServer,
    chromium,
    fit_viewport,
    requires_browser,
    run_deep_js,
    tensorboard_server,
    wait_until,
)
from plugin_runs import (
    MLP_SHARED,
    MLP_SITES,
    NAN_FROM_STEP,
    REPO_ROOT,
    AlbertLike,
    ImageClassifier,
    train_albert,
    train_no_step,
    train_shared_mlp,
    train_tiny,
)

from param_monitor.table import parameter_table
from param_monitor.tensorboard_plugin import health, plugin
from param_monitor.tensorboard_plugin.testing import synthetic_names, write_synthetic_run
from tests.helpers.events import read_scalars

pytestmark = [pytest.mark.browser, pytest.mark.slow, requires_browser]

TIED, UNTIED, NAN_RUN = "shared_mlp/version_0", "untied_mlp/version_0", "nan_run/version_0"
ALBERT, NO_STEP = "albert/version_0", "no_step/version_0"
ALL_RUNS = sorted([TIED, UNTIED, NAN_RUN, ALBERT, NO_STEP])
DOCS = REPO_ROOT / "docs"


@dataclass(frozen=True)
class Logs:
    root: Path

    def scalars(self, run: str) -> dict[str, dict[int, float]]:
        return read_scalars(self.root / run)


def plugin_server_args() -> tuple[list[str] | None, dict[str, str]]:
    """How to start TensorBoard with the tab: the plain executable once the entry point is installed."""
    installed = any(e.name == "param_monitor" for e in importlib.metadata.entry_points(group="tensorboard_plugins"))
    launcher = None if installed else [sys.executable, str(REPO_ROOT / "tests" / "tensorboard_launcher.py")]
    # this checkout's package, whichever copy the venv's editable install points at
    path = os.pathsep.join(p for p in (str(REPO_ROOT), os.environ.get("PYTHONPATH", "")) if p)
    return launcher, dict(os.environ, PYTHONPATH=path)


@contextmanager
def plugin_server(logdir: Path, work_dir: Path, load_fast: bool = False) -> Iterator[TensorBoardServer]:
    launcher, env = plugin_server_args()
    with tensorboard_server(logdir, work_dir, launcher=launcher, env=env, load_fast=load_fast) as server:
        yield server


@pytest.fixture(scope="module")
def logs(tmp_path_factory: pytest.TempPathFactory) -> Logs:
    root = tmp_path_factory.mktemp("tab_logs")
    train_shared_mlp(root, "shared_mlp", steps=30)
    train_shared_mlp(root, "untied_mlp", steps=30, tied=False)
    train_tiny(root, "nan_run", nan_from=NAN_FROM_STEP)
    train_albert(root)
    train_no_step(root)
    return Logs(root)


def serve_until_listed(logdir: Path, work: Path, count: int, load_fast: bool = False) -> Iterator[TensorBoardServer]:
    with plugin_server(logdir, work, load_fast=load_fast) as tb:
        runs = lambda: tb.check_alive() or (tb.get_json("/data/plugin/param_monitor/runs") or {}).get("runs")  # noqa: E731
        wait_until(lambda: len(runs() or []) == count, 90, f"TensorBoard to load {count} runs")
        yield tb


@pytest.fixture(scope="module")
def server(logs: Logs, tmp_path_factory: pytest.TempPathFactory) -> Iterator[TensorBoardServer]:
    yield from serve_until_listed(logs.root, tmp_path_factory.mktemp("tensorboard"), len(ALL_RUNS))


@pytest.fixture(scope="module")
def driver(server: TensorBoardServer) -> Iterator[Any]:
    with chromium(1600, 1100) as browser:
        open_tab(browser, server)
        yield browser


def open_tab(driver: Any, server: TensorBoardServer, timeout: float = 90, runs: list[str] | None = None) -> float:
    """Open the PARAM MONITOR tab (only ``runs`` selected, when given) and wait until it is drawn; seconds."""
    driver.get("about:blank")  # a fresh page even when the tab is open already
    start = time.monotonic()
    driver.get(f"{server.url}/#param_monitor")
    with in_tab(driver, timeout):
        wait_ready(driver, timeout)
        if runs is not None:
            driver.execute_script(
                "for (const i of document.querySelectorAll('#run-selector input'))"
                " i.checked = arguments[0].includes(i.value);"
                "document.querySelector('#run-selector input').dispatchEvent(new Event('change'));",
                runs,
            )
            time.sleep(0.3)
            wait_ready(driver, timeout)
    return time.monotonic() - start


def wait_ready(driver: Any, timeout: float = 60) -> dict[str, Any]:
    ready = "const s = window.__paramMonitorState; return s && s.ready ? {errors: s.errors, ms: s.drawMs} : null"
    state = wait_until(lambda: driver.execute_script(ready), timeout, "the PARAM MONITOR tab to draw")
    assert state["errors"] == [], state["errors"]
    return state


@contextmanager
def in_tab(driver: Any, timeout: float = 30) -> Iterator[None]:
    """Run the block inside the tab's iframe (TensorBoard hosts a dynamic plugin's module there)."""
    frame = wait_until(
        lambda: run_deep_js(driver, "return deepFind(document, 'iframe')[0] || null"), timeout, "the tab's iframe"
    )
    driver.switch_to.frame(frame)
    try:
        yield
    finally:
        driver.switch_to.default_content()


def no_console_errors(driver: Any) -> None:
    severe = [e for e in driver.get_log("browser") if e["level"] == "SEVERE"]
    assert severe == [], severe


def column(run: str) -> str:
    """JavaScript: the column of ``run``."""
    return f"document.querySelector('.run[data-run=\"{run}\"]')"


def plot(driver: Any, selector: str) -> dict[str, Any] | None:
    """Plotly's traces and layout of the first chart matching ``selector`` (in the tab's frame)."""
    return driver.execute_script(
        "const d = document.querySelector(arguments[0]); return d && d.data ? "
        "{data: d.data.map((t) => ({name: t.name, x: t.x, y: t.y, z: t.z || null, meta: t.meta || null,"
        " colour: t.line ? t.line.color : null, ticktext: t.colorbar ? t.colorbar.ticktext || null : null})),"
        " yaxis: d._fullLayout.yaxis.type, yrange: d._fullLayout.yaxis.range,"
        " xrange: d._fullLayout.xaxis.range} : null",
        selector,
    )


@pytest.fixture(scope="module")
def say(pytestconfig: pytest.Config) -> Any:
    """Print past pytest's capture (the draw times belong in the test log)."""
    capture = pytestconfig.pluginmanager.getplugin("capturemanager")

    def say(line: str) -> None:
        with capture.global_and_fixture_disabled():
            print(line, flush=True)

    return say


def report_times(driver: Any, say: Any, what: str, seconds: float | None = None) -> None:
    """Print the tab's own draw times (ms per run, and its first screen) for the report."""
    with in_tab(driver):
        ms = driver.execute_script("const s = window.__paramMonitorState; return [s.drawMs, s.firstScreenMs]")
    opened = f"; opened and drawn in {seconds:.2f} s" if seconds is not None else ""
    say(f"[draw times] {what}: first screen {ms[1]} ms, per run {ms[0]}{opened}")


# -- overlapping text, at the sizes people use -----------------------------------------------

OVERLAP_JS = """
const visible = (r) => r.width > 0.5 && r.height > 0.5 && r.bottom > 0 && r.top < innerHeight && r.right > 0
  && r.left < innerWidth;
const shown = (node) => { for (let n = node; n && n.nodeType === 1; n = n.parentNode) {
  const s = getComputedStyle(n);
  if (s.display === 'none' || s.visibility === 'hidden' || s.opacity === '0') return false; }
  return true; };
const boxes = [];
const walker = document.createTreeWalker(document.body, NodeFilter.SHOW_TEXT);
for (let t = walker.nextNode(); t; t = walker.nextNode()) {
  if (!t.textContent.trim() || !shown(t.parentNode) || t.parentNode.closest('.hoverlayer, .modebar')) continue;
  if (t.parentNode.closest('svg')) {
    const r = t.parentNode.getBoundingClientRect();
    const where = t.parentNode.closest('[class]');
    if (visible(r)) boxes.push([r, `${t.textContent.trim()} (${where.getAttribute('class')} in ${
      t.parentNode.closest('.chart')?.dataset.key})`]);
    continue;
  }
  const range = document.createRange();
  range.selectNodeContents(t);
  for (const r of range.getClientRects()) if (visible(r)) boxes.push([r, t.textContent.trim().slice(0, 40)]);
}
const out = [];
for (let i = 0; i < boxes.length; i++) for (let j = i + 1; j < boxes.length; j++) {
  const [a, ta] = boxes[i], [b, tb] = boxes[j];
  const dx = Math.min(a.right, b.right) - Math.max(a.left, b.left);
  const dy = Math.min(a.bottom, b.bottom) - Math.max(a.top, b.top);
  if (dx > 2 && dy > 2) out.push([ta, tb, Math.round(dx), Math.round(dy)]);
}
return {count: boxes.length, overlaps: out.slice(0, 20)};
"""


def albert_bands_oracle(logged: dict[str, dict[int, float]], tensors: list[str], depth: int = 12) -> list[list[float]]:
    """Use k's share of the layer's gradient per step: Σ_t share_t,k g_t² / Σ_t g_t², from the event files."""
    steps = sorted(logged[f"grad_norm/{tensors[0]}"])
    sites = {t: [f"{t.rpartition('.')[0]}#{k}" for k in range(depth)] for t in tensors}
    bands = []
    for k in range(depth):
        row = []
        for step in steps:
            g2 = {t: logged[f"grad_norm/{t}"][step] ** 2 for t in tensors}
            weighted = sum(logged[f"shared_grad_share/{t}/{sites[t][k]}"][step] * g2[t] for t in tensors)
            row.append(weighted / sum(g2.values()))
        bands.append(row)
    return bands


@pytest.mark.parametrize("size", [(1280, 800), (1920, 1080)])
def test_first_screen_of_the_albert_like_run_shows_every_group_and_no_text_overlaps(
    driver: Any, server: TensorBoardServer, logs: Logs, say: Any, size: tuple[int, int]
) -> None:
    fit_viewport(driver, *size)
    try:
        seconds = open_tab(driver, server, runs=[ALBERT])
        report_times(driver, say, f"ALBERT-like run at {size[0]}x{size[1]}", seconds)
        with in_tab(driver):
            cards = driver.execute_script(
                "return [...document.querySelectorAll('.card.group')].map((c) => [c.dataset.group,"
                " c.getBoundingClientRect().top, innerHeight])"
            )
            overlaps = driver.execute_script(OVERLAP_JS)
            bands = plot(driver, '.plot.bands[data-group="layer"]')
    finally:
        fit_viewport(driver, 1600, 1100)
    assert [c[0] for c in cards] == ["embeddings", "layer"]
    assert all(top < height for _, top, height in cards), f"a group starts below the first screen: {cards}"
    assert overlaps["count"] > 50 and overlaps["overlaps"] == [], overlaps
    layer = [n for n, _ in AlbertLike().named_parameters() if n.startswith("layer.")]
    oracle = albert_bands_oracle(logs.scalars(ALBERT), layer)
    assert [t["name"] for t in bands["data"]] == [f"call {k}" for k in range(12)]
    for trace, expected in zip(bands["data"], oracle, strict=True):
        assert trace["y"] == pytest.approx(expected, rel=1e-6)
    no_console_errors(driver)


def test_the_tab_is_listed(driver: Any) -> None:
    tabs = run_deep_js(
        driver,
        "return deepAll(document).filter((e) => e.children.length === 0).map(text)"
        ".filter((t) => t.toUpperCase() === 'PARAM MONITOR')",
    )
    assert tabs, "no PARAM MONITOR tab in TensorBoard's header"
    no_console_errors(driver)


def test_error_and_cosine_are_separate_charts_with_their_own_axes(
    driver: Any, server: TensorBoardServer, logs: Logs
) -> None:
    open_tab(driver, server, runs=[TIED])
    with in_tab(driver):
        error = plot(driver, '.card.group[data-group="model.net.3"] .plot.error')
        cosine = plot(driver, '.card.group[data-group="model.net.3"] .plot.cosine')
        mark = driver.execute_script("return document.querySelector('.card.group .mark').textContent")
    logged = logs.scalars(TIED)
    group = (MLP_SHARED, "model.net.3.bias")
    errors = {s: max(logged[f"shared_grad_error/{t}"][s] for t in group) for s in error["data"][0]["x"]}
    # its own chart and axis: log where an error is above 0 (a log axis cannot draw an exact 0)
    assert error["yaxis"] == ("log" if any(e > 0 for e in errors.values()) else "linear")
    assert error["data"][0]["y"] == pytest.approx(list(errors.values()), rel=1e-6, abs=1e-12)
    assert cosine["yaxis"] == "linear" and cosine["yrange"] == [-1.05, 1.05]
    means = [np.mean([logged[f"shared_grad_cosine/{t}"][s] for t in group]) for s in cosine["data"][0]["x"]]
    assert cosine["data"][0]["y"] == pytest.approx(means, rel=1e-6)
    assert mark.startswith("✓ every use seen")


def test_opening_a_group_shows_each_tensors_stack_adding_up_to_its_gradient_norm(
    driver: Any, server: TensorBoardServer, logs: Logs
) -> None:
    open_tab(driver, server, runs=[TIED])
    with in_tab(driver):
        driver.execute_script("document.querySelector('.card.group[data-group=\"model.net.3\"] .open-group').click()")
        stack = wait_until(lambda: plot(driver, f'.plot.stack[data-param="{MLP_SHARED}"]'), 20, "the stack")
        norms = plot(driver, ".tensor-view .plot.use-norms")
        if os.environ.get("PARAM_MONITOR_TAB_DOCS"):
            driver.execute_script(  # below the sticky header
                "window.scrollTo(0, document.querySelector('.card.group').getBoundingClientRect().top + scrollY - 50)"
            )
            time.sleep(0.5)
    if os.environ.get("PARAM_MONITOR_TAB_DOCS"):
        driver.save_screenshot(str(DOCS / "tab_group.png"))
    uses = [t for t in stack["data"] if t["name"].startswith("use @")]
    assert [t["name"] for t in uses] == [f"use @ {site}" for site in MLP_SITES]
    logged = logs.scalars(TIED)
    grad = logged[f"grad_norm/{MLP_SHARED}"]
    steps = uses[0]["x"]
    assert steps == sorted(grad)
    for j, step in enumerate(steps):
        assert sum(t["y"][j] for t in uses) == pytest.approx(grad[step], rel=1e-5), f"stack top at step {step}"
        for t, site in zip(uses, MLP_SITES, strict=True):
            share = logged[f"shared_grad_share/{MLP_SHARED}/{site}"][step]
            assert t["y"][j] == pytest.approx(share * grad[step], rel=1e-5)
    by_name = {t["name"]: t["y"] for t in norms["data"]}
    for site in MLP_SITES:
        assert by_name[site] == pytest.approx([logged[f"shared_grad/{MLP_SHARED}/{site}"][s] for s in steps], rel=1e-6)
    assert norms["yaxis"] == "log"


HEATMAP_JS = """
const div = COLUMN.querySelector('.plot.heatmap');
if (!div || !div.data) return null;
return {y: div.data[0].y, x: div.data[0].x, z: div.data[0].z, special: div.data[1] ? div.data[1].z : null,
        metric: div.dataset.metric,
        ticktext: div.data[0].colorbar.ticktext || null, images: div.querySelectorAll('.heatmaplayer image').length};
"""


def heatmap(driver: Any, run: str) -> dict[str, Any]:
    return driver.execute_script(HEATMAP_JS.replace("COLUMN", column(run)))


def expected_rows(tied: bool = True) -> list[str]:
    rows = parameter_table(ImageClassifier(tied))
    return [f"{r.name} (= {', '.join(r.aliases)})" if r.aliases else r.name for r in rows]


def test_heatmap_has_one_row_per_parameter_in_model_order(driver: Any, server: TensorBoardServer, logs: Logs) -> None:
    open_tab(driver, server)
    with in_tab(driver):
        heat = heatmap(driver, TIED)
    assert heat is not None and heat["metric"] == "grad_norm" and heat["images"] >= 1
    assert heat["y"] == expected_rows()
    assert heat["y"][2] == f"{MLP_SHARED} (= model.net.6.weight)"
    assert heat["y"][:2] == ["model.net.1.weight", "model.net.1.bias"]  # weights before biases
    logged = logs.scalars(TIED)
    for i, label in enumerate(heat["y"]):
        name = label.split(" ")[0]
        for j in range(len(heat["x"])):
            assert heat["z"][i][j] == pytest.approx(math.log10(logged[f"grad_norm/{name}"][heat["x"][j]]), abs=1e-6)
    no_console_errors(driver)


@pytest.mark.parametrize("metric", ["update_ratio", "dead_units"])
def test_update_ratio_and_dead_units_heatmaps_equal_the_event_files(
    driver: Any, server: TensorBoardServer, logs: Logs, metric: str
) -> None:
    open_tab(driver, server, runs=[ALBERT])
    with in_tab(driver):
        button = f".metric-buttons button[data-metric='{metric}']"
        driver.execute_script(f"{column(ALBERT)}.querySelector(arguments[0]).click()", button)
        heat = wait_until(lambda: (h := heatmap(driver, ALBERT)) and h["metric"] == metric and h, 20, metric)
        if os.environ.get("PARAM_MONITOR_TAB_DOCS") and metric == "update_ratio":
            driver.execute_script(
                "window.scrollTo(0, document.querySelector('section.health')"
                ".getBoundingClientRect().top + scrollY - 50)"
            )
            time.sleep(0.5)
    if os.environ.get("PARAM_MONITOR_TAB_DOCS") and metric == "update_ratio":
        driver.save_screenshot(str(DOCS / "tab_health.png"))
    logged = logs.scalars(ALBERT)
    names = [n for n, _ in AlbertLike().named_parameters() if f"{metric}/{n}" in logged]
    assert [label.split(" ")[0] for label in heat["y"]] == names  # model order
    for i, name in enumerate(names):
        values = [logged[f"{metric}/{name}"].get(s) for s in heat["x"]]
        log = metric == "update_ratio"  # the registry's scale: log for ratios, linear for fractions
        expected = [None if v is None or (log and v <= 0) else (math.log10(v) if log else v) for v in values]
        assert [z is None for z in heat["z"][i]] == [e is None for e in expected], name
        drawn = [(z, e) for z, e in zip(heat["z"][i], expected, strict=True) if e is not None]
        assert [z for z, _ in drawn] == pytest.approx([e for _, e in drawn], rel=1e-6, abs=1e-9), name
    if metric == "update_ratio":
        assert "1e-3 ← rule of thumb" in heat["ticktext"]


def test_layers_to_look_at_are_the_ones_the_rules_pick_from_the_event_files(
    driver: Any, server: TensorBoardServer, logs: Logs
) -> None:
    open_tab(driver, server, runs=[ALBERT, NAN_RUN])
    with in_tab(driver):
        listed = driver.execute_script(
            "return Object.fromEntries([...document.querySelectorAll('.run')].map((c) => [c.dataset.run,"
            " [...c.querySelectorAll('li.finding')].map((li) => [li.dataset.kind, li.querySelector('a').textContent,"
            " li.textContent])]))"
        )
    logged = logs.scalars(ALBERT)
    low, high = health.UPDATE_RATIO_RANGE
    expected = []
    for name, _ in AlbertLike().named_parameters():
        recent = [v for _, v in sorted(logged[f"update_ratio/{name}"].items())][-health.RECENT :]
        if not low <= float(np.median(recent)) <= high:
            expected.append(name)
        if logged.get(f"dead_units/{name}") and logged[f"dead_units/{name}"][max(logged[f"dead_units/{name}"])] > 0.5:
            expected.append(name)
    assert [name for kind, name, _ in listed[ALBERT] if kind in ("update_ratio", "dead_units")] == expected
    kind, name, text = listed[NAN_RUN][0]
    assert kind == "nonfinite" and name == "model.0.weight" and f"at step {NAN_FROM_STEP}" in text


def test_nan_gradients_are_marked_where_they_are(driver: Any, server: TensorBoardServer, logs: Logs) -> None:
    open_tab(driver, server, runs=[NAN_RUN])
    with in_tab(driver):
        heat = heatmap(driver, NAN_RUN)
        bands = driver.execute_script(
            f"return {column(NAN_RUN)}.querySelector('.plot.bands')._fullLayout.shapes.map((s) => s.x0)"
        )
    logged = logs.scalars(NAN_RUN)
    for i, label in enumerate(heat["y"]):
        values = logged[f"grad_norm/{label.split(' ')[0]}"]
        for j, step in enumerate(heat["x"]):
            nan = math.isnan(values[step])
            assert (heat["special"][i][j] == 1) == nan and (heat["z"][i][j] is None) == nan
    assert len(bands) == len(heat["x"]) - NAN_FROM_STEP  # one band per NaN step on the group's bands


def test_a_run_without_a_logged_step_says_why_and_draws_no_empty_axes(driver: Any, server: TensorBoardServer) -> None:
    open_tab(driver, server, runs=[NO_STEP])
    with in_tab(driver):
        page = driver.execute_script(
            f"const c = {column(NO_STEP)}; return {{note: c.querySelector('.empty.no-step').textContent,"
            " plots: c.querySelectorAll('.plot').length,"
            " groups: [...c.querySelectorAll('.card.group')].map((g) => g.dataset.group),"
            " table: c.querySelectorAll('table.params tbody tr').length}"
        )
    assert "No step logged yet" in page["note"] and "log_every_n_steps=10" in page["note"]
    assert page["plots"] == 0  # no rows of empty axes
    assert page["groups"] == ["model.2"] and page["table"] == 6


def click_heatmap_row(driver: Any, run: str, row: int) -> None:
    from selenium.webdriver.common.action_chains import ActionChains

    drag, x, y = driver.execute_script(
        f"""const div = {column(run)}.querySelector('.plot.heatmap');
        div.scrollIntoView({{block: 'center'}});
        const l = div._fullLayout, drag = div.querySelector('.nsewdrag'), box = drag.getBoundingClientRect();
        const y = l.yaxis.l2p({row}) + l.yaxis._offset - (box.top - div.getBoundingClientRect().top);
        return [drag, Math.round(box.width / 2), Math.round(y)];"""
    )
    size = drag.size
    offset = (x - size["width"] // 2, y - size["height"] // 2)
    ActionChains(driver).move_to_element_with_offset(drag, *offset).click().perform()


def row_charts(driver: Any, run: str) -> dict[str, Any] | None:
    return driver.execute_script(
        f"""const c = {column(run)}.querySelector('.row-chart');
        const divs = [...c.querySelectorAll('.plot.row')];
        return divs.length && divs.every((d) => d.data) ? {{title: c.querySelector('.row-title').textContent,
          charts: Object.fromEntries(divs.map((d) => [d.dataset.metric, {{type: d._fullLayout.yaxis.type,
            traces: d.data.map((t) => [t.meta, t.x, t.y])}}]))}} : null;"""
    )


def test_clicking_a_heatmap_row_opens_a_small_chart_per_family(
    driver: Any, server: TensorBoardServer, logs: Logs
) -> None:
    open_tab(driver, server, runs=[TIED])
    with in_tab(driver):
        click_heatmap_row(driver, TIED, 4)  # model.net.9.weight
        row = wait_until(lambda: row_charts(driver, TIED), 20, "the clicked row's charts")
    assert row["title"] == "model.net.9.weight"
    assert set(row["charts"]) == {"grad_norm", "weight_norm", "weight_mean"}
    assert row["charts"]["grad_norm"]["type"] == "log" and row["charts"]["weight_mean"]["type"] == "linear"
    logged = logs.scalars(TIED)
    for metric, chart in row["charts"].items():
        (meta, x, y), = chart["traces"]
        expected = logged[f"{metric}/model.net.9.weight"]
        assert meta == "raw" and x == sorted(expected) and y == pytest.approx([expected[s] for s in x], rel=1e-6)
    no_console_errors(driver)


def tb_smooth(values: list[float], weight: float) -> list[float]:
    """TensorBoard's scalar smoothing (a debiased exponential moving average), written out here."""
    last, out = 0.0, []
    for i, v in enumerate(values, start=1):
        last = last * weight + (1 - weight) * v
        out.append(last / (1 - weight**i))
    return out


def test_filter_scale_and_smoothing_act_on_the_open_row(driver: Any, server: TensorBoardServer, logs: Logs) -> None:
    open_tab(driver, server, runs=[TIED])
    with in_tab(driver):
        click_heatmap_row(driver, TIED, 4)
        wait_until(lambda: row_charts(driver, TIED), 20, "the row's charts")
        scale = ".chart[data-key='row:grad_norm'] .scale"
        driver.execute_script(f"{column(TIED)}.querySelector(arguments[0]).click()", scale)
        is_linear = lambda: (r := row_charts(driver, TIED)) and r["charts"]["grad_norm"]["type"] == "linear"  # noqa: E731
        linear = wait_until(is_linear, 10, "the linear axis")
        slider = driver.find_element("id", "smoothing")
        driver.execute_script("arguments[0].value = '0.6'; arguments[0].dispatchEvent(new Event('change'))", slider)
        time.sleep(0.3)
        wait_ready(driver)
        smoothed = wait_until(lambda: row_charts(driver, TIED), 20, "the smoothed row")
        box = driver.find_element("id", "filter")
        box.send_keys("net.3")
        wait_until(lambda: driver.execute_script("return window.__paramMonitorState.filter === 'net.3'"), 10, "filter")
        wait_ready(driver)
        hidden = driver.execute_script(f"return {column(TIED)}.querySelector('.row-chart').textContent")
        rows = heatmap(driver, TIED)["y"]
    assert linear
    grad = smoothed["charts"]["grad_norm"]
    assert grad["type"] == "linear"  # the chosen scale survives the redraw
    (_, x, raw), (_, _, smooth) = grad["traces"]
    logged = logs.scalars(TIED)["grad_norm/model.net.9.weight"]
    assert raw == pytest.approx([logged[s] for s in x], rel=1e-6)
    assert smooth == pytest.approx(tb_smooth([logged[s] for s in x], 0.6), rel=1e-6)
    assert hidden == "model.net.9.weight is hidden by the filter."
    assert rows == [r for r in expected_rows() if r.startswith("model.net.3.")]


def test_csv_and_json_downloads_hold_the_logged_values(driver: Any, server: TensorBoardServer, logs: Logs) -> None:
    open_tab(driver, server, runs=[TIED])
    with in_tab(driver):
        driver.execute_script(  # keep each file's blob; the link gets an empty one (no navigation, no file)
            "window.__blobs = []; const make = URL.createObjectURL.bind(URL);"
            "URL.createObjectURL = (b) => { window.__blobs.push(b); return make(new Blob([])); };"
        )
        for kind in ("csv", "json"):
            button = f".chart[data-key='group:model.net.3:bands'] button.{kind}"
            driver.execute_script(f"{column(TIED)}.querySelector(arguments[0]).click()", button)
        texts = driver.execute_async_script(
            "const done = arguments[0]; Promise.all(window.__blobs.map((b) => b.text())).then(done)"
        )
    csv, payload = texts
    header, *lines = csv.strip().split("\n")
    assert header == "step," + ",".join(MLP_SITES)
    logged = logs.scalars(TIED)
    g2 = {t: logged[f"grad_norm/{t}"] for t in (MLP_SHARED, "model.net.3.bias")}
    for line in lines:
        step, *values = line.split(",")
        step = int(step)
        for site, value in zip(MLP_SITES, values, strict=True):
            oracle = sum(logged[f"shared_grad_share/{t}/{site}"][step] * g2[t][step] ** 2 for t in g2) / sum(
                g2[t][step] ** 2 for t in g2
            )
            assert float(value) == pytest.approx(oracle, rel=1e-6)
    import json

    data = json.loads(payload)
    assert data["run"] == TIED and [s["name"] for s in data["series"]] == list(MLP_SITES)


def test_reload_keeps_zoom_filter_scale_and_open_groups(driver: Any, server: TensorBoardServer) -> None:
    open_tab(driver, server, runs=[ALBERT])
    with in_tab(driver):
        driver.execute_script(
            "const d = document.querySelector('.plot.bands[data-group=\"layer\"]');"
            "Plotly.relayout(d, {'xaxis.range': [3, 9]});"
            "document.querySelector('.card.group[data-group=\"layer\"] .open-group').click();"
        )
        wait_until(lambda: plot(driver, ".tensor-view .plot.stack"), 20, "the open group")
        box = driver.find_element("id", "filter")
        box.send_keys("layer")
        wait_until(lambda: driver.execute_script("return window.__paramMonitorState.filter === 'layer'"), 10, "filter")
        wait_ready(driver)
        before = driver.execute_script("return window.__paramMonitorState.refreshes")
        driver.find_element("id", "reload").click()
        wait_until(lambda: driver.execute_script("return window.__paramMonitorState.refreshes") > before, 20, "reload")
        wait_ready(driver)
        wait_until(lambda: plot(driver, ".tensor-view .plot.stack"), 20, "the group reopened")
        bands = plot(driver, '.plot.bands[data-group="layer"]')
        filter_value = driver.execute_script("return document.getElementById('filter').value")
        box.clear()
        driver.execute_script("document.getElementById('filter').dispatchEvent(new Event('input'))")
    assert bands["xrange"] == [3, 9]
    assert filter_value == "layer"


def test_runs_overlaid_draw_one_colour_per_run(driver: Any, server: TensorBoardServer, logs: Logs) -> None:
    open_tab(driver, server, runs=[TIED, UNTIED])
    with in_tab(driver):
        driver.execute_script(
            "const s = document.getElementById('layout'); s.value = 'overlay'; s.dispatchEvent(new Event('change'))"
        )
        time.sleep(0.3)
        wait_ready(driver)
        click_heatmap_row(driver, TIED, 0)
        overlaid = '.compare .plot.row[data-metric="grad_norm"]'
        chart = wait_until(lambda: plot(driver, overlaid), 20, "the overlaid chart")
    name = "model.net.1.weight"
    assert [t["name"] for t in chart["data"]] == [TIED, UNTIED]
    assert len({t["colour"] for t in chart["data"]}) == 2
    for trace in chart["data"]:
        logged = logs.scalars(trace["name"])[f"grad_norm/{name}"]
        assert trace["y"] == pytest.approx([logged[s] for s in trace["x"]], rel=1e-6)


def test_runs_are_side_by_side_and_untied_has_no_shared_layer(driver: Any, server: TensorBoardServer) -> None:
    open_tab(driver, server, runs=[TIED, UNTIED])
    with in_tab(driver):
        boxes = driver.execute_script(
            "return [...document.querySelectorAll('.run')].map((c) => "
            "[c.dataset.run, c.getBoundingClientRect().left, c.getBoundingClientRect().top])"
        )
        untied_note = driver.execute_script(f"return {column(UNTIED)}.querySelector('.empty.no-shared').textContent")
        untied_rows = heatmap(driver, UNTIED)["y"]
    (_, left_a, top_a), (_, left_b, top_b) = boxes
    assert top_a == top_b and left_a < left_b  # one row, two columns
    assert untied_note.startswith("No shared parameter in this run.")
    assert untied_rows == expected_rows(tied=False)


def test_parameter_table_lists_the_model(driver: Any, server: TensorBoardServer) -> None:
    open_tab(driver, server, runs=[TIED])
    with in_tab(driver):
        rows = driver.execute_script(
            f"return [...{column(TIED)}.querySelectorAll('table.params tbody tr')]"
            ".map((r) => [...r.cells].map((c) => c.textContent))"
        )
    assert [r[0] for r in rows] == [r.name for r in parameter_table(ImageClassifier())]
    shared = next(r for r in rows if r[0] == MLP_SHARED)
    assert shared == [MLP_SHARED, "8×8", "64", "model.net.6.weight", ", ".join(MLP_SITES)]


def test_overview_screenshot_and_no_console_error(driver: Any, server: TensorBoardServer, say: Any) -> None:
    seconds = open_tab(driver, server, runs=[ALBERT, TIED])
    report_times(driver, say, "ALBERT-like and the exercise's run side by side", seconds)
    if os.environ.get("PARAM_MONITOR_TAB_DOCS"):
        time.sleep(0.5)
        driver.save_screenshot(str(DOCS / "tab.png"))
    no_console_errors(driver)


# -- the 1,000-tensor run --------------------------------------------------------------------

# -- spikes (detect_spikes=True) on the time axes ----------------------------------------------
SPIKE_STEPS = [99, 120]  # a logged step, and one between two: the heatmap's column 149 holds it
SPIKE_COLUMNS = [99, 149]


@pytest.fixture(scope="module")
def spiky(tmp_path_factory: pytest.TempPathFactory) -> Iterator[TensorBoardServer]:
    """A synthetic run with a ``param_monitor/spikes`` record, and one without (logged steps 49, 99, ..., 299)."""
    root = tmp_path_factory.mktemp("spiky_logs")
    write_synthetic_run(root / "spiky", tensors=6, steps=6, spikes=SPIKE_STEPS)
    write_synthetic_run(root / "calm", tensors=6, steps=6)
    route = "/data/plugin/param_monitor/run?run=spiky"
    for tb in serve_until_listed(root, tmp_path_factory.mktemp("spiky_tb"), 2):
        wait_until(lambda s=tb: (s.get_json(route) or {}).get("spike_steps") == SPIKE_STEPS, 60, "the spike record")
        time.sleep(plugin.CACHE_SECONDS + 0.5)
        yield tb


def spike_marks(driver: Any, run: str, selector: str) -> list[list[float]]:
    """``[x0, x1]`` of the shapes named 'spike' on every chart matching ``selector`` in ``run``'s column."""
    return driver.execute_script(
        f"return [...{column(run)}.querySelectorAll(arguments[0])].map((d) => d._fullLayout.shapes"
        ".filter((s) => s.name === 'spike').map((s) => [s.x0, s.x1]))",
        selector,
    )


def test_spikes_are_marked_on_the_time_axes_and_above_their_heatmap_columns(spiky: TensorBoardServer) -> None:
    vertical = [[step, step] for step in SPIKE_STEPS]
    with chromium(1600, 1100) as driver:
        open_tab(driver, spiky)
        with in_tab(driver):
            for run in ("spiky", "calm"):
                click_heatmap_row(driver, run, 0)
                wait_until(lambda r=run: row_charts(driver, r), 20, "the clicked row's charts")
            bands, rows, heat = (spike_marks(driver, "spiky", s) for s in (".plot.bands", ".plot.row", ".plot.heatmap"))
            calm = [spike_marks(driver, "calm", s) for s in (".plot.bands", ".plot.row", ".plot.heatmap")]
        no_console_errors(driver)
    assert bands == [vertical]  # the group's share bands
    assert len(rows) == 3 and all(marks == vertical for marks in rows)  # weight_mean, weight_norm, grad_norm of the row
    assert heat == [[[c, c] for c in SPIKE_COLUMNS]]  # above the column holding each spike
    assert calm == [[[]], [[]] * 3, [[]]]  # a run without spikes: none


BIG_TENSORS, BIG_STEPS = 1000, 200


@pytest.fixture(scope="module")
def big(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[TensorBoardServer, Path]]:
    root = tmp_path_factory.mktemp("big_logs")
    write_synthetic_run(root / "big", BIG_TENSORS, BIG_STEPS)
    route = "/data/plugin/param_monitor/heatmap?run=big&metric=grad_norm"
    # TensorBoard's default reader (the Rust data server, what `make tensorboard` runs): about 4x faster here
    for tb in serve_until_listed(root, tmp_path_factory.mktemp("big_tb"), 1, load_fast=True):
        # TensorBoard reads in the background: wait until it has read every step of the run
        wait_until(lambda s=tb: len((s.get_json(route) or {}).get("steps", [])) == BIG_STEPS, 300, "the run", 2)
        time.sleep(plugin.CACHE_SECONDS + 0.5)  # the tab then reads the run afresh, as a person's first look does
        yield tb, root / "big"


def test_the_1000_tensor_run_draws_every_row_in_model_order(big: tuple[TensorBoardServer, Path], say: Any) -> None:
    server, run_dir = big
    with chromium(1280, 800) as driver:
        seconds = open_tab(driver, server, timeout=180)
        report_times(driver, say, "1,000-tensor run at 1280x800", seconds)
        with in_tab(driver):
            heat = heatmap(driver, "big")
            groups = driver.execute_script(
                "return [...document.querySelectorAll('.card.group')].map((c) => c.dataset.group)"
            )
            overlaps = driver.execute_script(OVERLAP_JS)
        no_console_errors(driver)
    assert [label.split(" ")[0] for label in heat["y"]] == synthetic_names(BIG_TENSORS)
    logged = read_scalars(run_dir)
    for i in (0, 1, 499, 999):
        name = heat["y"][i]
        for j in (0, len(heat["x"]) // 2, len(heat["x"]) - 1):
            assert heat["z"][i][j] == pytest.approx(math.log10(logged[f"grad_norm/{name}"][heat["x"][j]]), abs=1e-6)
    assert groups == ["model.blocks.0"] and overlaps["overlaps"] == [], overlaps


def screenshot_logdir(logdir: Path, png: Path, width: int = 1600, height: int = 1100) -> None:
    """Serve ``logdir`` with the tab and save the tab's first screen (every run selected)."""
    import tempfile

    with tempfile.TemporaryDirectory() as work, plugin_server(logdir, Path(work)) as server:
        wait_until(lambda: server.check_alive() or server.get_json("/data/plugin/param_monitor/runs"), 60, "runs")
        with chromium(width, height) as driver:
            open_tab(driver, server)
            time.sleep(1.0)
            driver.save_screenshot(str(png))


if __name__ == "__main__":
    # python tests/test_tensorboard_plugin_browser.py LOGDIR OUT.png [WIDTH HEIGHT]
    size = [int(v) for v in sys.argv[3:5]] or [1600, 1100]
    screenshot_logdir(Path(sys.argv[1]), Path(sys.argv[2]), *size)
