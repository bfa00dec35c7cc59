"""End to end: the PARAM MONITOR tab in a real TensorBoard, looked at in a real (headless) Chromium.

Three short real runs with the monitor: the exercise's SharedMLP tied (``model.net.3`` is
``model.net.6``) and untied, and a tiny shared model whose gradients turn NaN at step 6. What is
plotted is read from the page (plotly's own trace data on each chart, and the drawn SVG) and compared
with the event files.

TensorBoard finds the tab through the package's ``tensorboard_plugins`` entry point once
``pip install -e .`` registered it; before that (a checkout whose venv was installed from another
copy), through ``tests/tensorboard_launcher.py``. Set ``PARAM_MONITOR_TAB_PNG=/some/file.png`` to keep
the screenshot; the README's picture (docs/tab.png) is made from the experiment's FashionMNIST runs::

    python experiments/shared_mlp.py --trainer.logger.init_args.save_dir /tmp/tab
    python experiments/shared_mlp.py --config configs/untied_mlp.yaml --trainer.logger.init_args.save_dir /tmp/tab
    python tests/test_tensorboard_plugin_browser.py /tmp/tab docs/tab.png
"""

from __future__ import annotations

import importlib.metadata
import math
import os
import shutil
import sys
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

if __name__ == "__main__":  # run as a script (the screenshot below): the repository root for `tests.conftest`
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import pytest  # noqa: E402
from browser_support import (  # noqa: E402
    TensorBoardServer,
    chromium,
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
    ImageClassifier,
    train_shared_mlp,
    train_tiny,
)

from param_monitor.table import parameter_table
from tests.helpers.events import read_scalars

pytestmark = [pytest.mark.browser, pytest.mark.slow, requires_browser]

TIED, UNTIED, NAN_RUN = "shared_mlp/version_0", "untied_mlp/version_0", "nan_run/version_0"


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
    return Logs(root)


@pytest.fixture(scope="module")
def server(logs: Logs, tmp_path_factory: pytest.TempPathFactory) -> Iterator[TensorBoardServer]:
    with plugin_server(logs.root, tmp_path_factory.mktemp("tensorboard")) as tb:
        runs = lambda: tb.check_alive() or (tb.get_json("/data/plugin/param_monitor/runs") or {}).get("runs")  # noqa: E731
        wait_until(lambda: len(runs() or []) == 3, 60, "TensorBoard to load the three runs")
        yield tb


@pytest.fixture(scope="module")
def driver(server: TensorBoardServer) -> Iterator[Any]:
    with chromium(1600, 1100) as browser:
        open_tab(browser, server)
        yield browser


def open_tab(driver: Any, server: TensorBoardServer, timeout: float = 60) -> float:
    """Open the PARAM MONITOR tab and wait until every selected run is drawn; seconds it took."""
    driver.get("about:blank")  # a fresh page even when the tab is open already
    start = time.monotonic()
    driver.get(f"{server.url}/#param_monitor")
    with in_tab(driver, timeout):
        ready = "const s = window.__paramMonitorState; return s && s.ready ? {errors: s.errors} : null"
        state = wait_until(lambda: driver.execute_script(ready), timeout, "the PARAM MONITOR tab to draw")
        assert state["errors"] == [], state["errors"]
    return time.monotonic() - start


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
    """JavaScript: the column of ``run`` (by its heading)."""
    return f"[...document.querySelectorAll('.run')].find((c) => c.querySelector('.run-name').textContent === {run!r})"


def test_the_tab_is_listed(driver: Any) -> None:
    tabs = run_deep_js(
        driver,
        "return deepAll(document).filter((e) => e.children.length === 0).map(text)"
        ".filter((t) => t.toUpperCase() === 'PARAM MONITOR')",
    )
    assert tabs, "no PARAM MONITOR tab in TensorBoard's header"
    no_console_errors(driver)


STACK_JS = """
const col = COLUMN;
const div = col.querySelector(`.plot.stack[data-param="${arguments[0]}"]`);
if (!div) return null;
const fills = [...div.querySelectorAll('.scatterlayer .trace path.js-fill')]
  .map((p) => p.style.fill).filter((f) => f && f !== 'none');
return {
  traces: div.data.map((t) => ({name: t.name, stackgroup: t.stackgroup || null, x: t.x, y: t.y,
                                 line: t.line.color, fill: t.fillcolor || null})),
  fills: fills,
};
"""


def test_shared_layer_stack_shows_two_coloured_uses_whose_top_is_grad_norm(driver: Any, logs: Logs) -> None:
    with in_tab(driver):
        stack = driver.execute_script(STACK_JS.replace("COLUMN", column(TIED)), MLP_SHARED)
    assert stack is not None, "no stack chart for the shared layer"
    uses = [t for t in stack["traces"] if t["stackgroup"]]
    assert [t["name"] for t in uses] == [f"use @ {site}" for site in MLP_SITES]
    assert len({t["line"] for t in uses}) == 2 and len({t["fill"] for t in uses}) == 2  # a colour each
    assert len(set(stack["fills"])) == 2, "the two uses were not drawn as two coloured areas"
    logged = logs.scalars(TIED)
    grad = logged[f"grad_norm/{MLP_SHARED}"]
    steps = uses[0]["x"]
    assert steps == sorted(grad)
    for j in (len(steps) // 2, len(steps) - 1):  # sampled steps: the middle and the last
        step = steps[j]
        top = sum(t["y"][j] for t in uses)
        assert top == pytest.approx(grad[step], rel=1e-5), f"stack top at step {step}"
        for t, site in zip(uses, MLP_SITES, strict=True):
            share = logged[f"shared_grad_share/{MLP_SHARED}/{site}"][step]
            assert t["y"][j] == pytest.approx(share * grad[step], rel=1e-5)
    total = next(t for t in stack["traces"] if not t["stackgroup"])
    assert total["name"].startswith("grad_norm") and total["y"][steps.index(steps[-1])] == pytest.approx(
        grad[steps[-1]], rel=1e-6
    )


HEATMAP_JS = """
const col = COLUMN;
const div = col.querySelector('.plot.heatmap');
if (!div || !div.data) return null;
return {y: div.data[0].y, x: div.data[0].x, z: div.data[0].z, special: div.data[1].z,
        metric: div.dataset.metric, images: div.querySelectorAll('.heatmaplayer image').length};
"""


def expected_rows(tied: bool = True) -> list[str]:
    rows = parameter_table(ImageClassifier(tied))
    return [f"{r.name} (= {', '.join(r.aliases)})" if r.aliases else r.name for r in rows]


def test_heatmap_has_one_row_per_parameter_in_model_order(driver: Any, logs: Logs) -> None:
    with in_tab(driver):
        heat = driver.execute_script(HEATMAP_JS.replace("COLUMN", column(TIED)))
    assert heat is not None and heat["metric"] == "grad_norm" and heat["images"] >= 1
    assert heat["y"] == expected_rows()
    assert heat["y"][2] == f"{MLP_SHARED} (= model.net.6.weight)"
    logged = logs.scalars(TIED)
    for i, label in enumerate(heat["y"]):
        name = label.split(" ")[0]
        for j in (0, len(heat["x"]) - 1):
            assert heat["z"][i][j] == pytest.approx(math.log10(logged[f"grad_norm/{name}"][heat["x"][j]]), abs=1e-6)
    no_console_errors(driver)


def test_nan_gradients_are_marked_where_they_are(driver: Any, logs: Logs) -> None:
    with in_tab(driver):
        heat = driver.execute_script(HEATMAP_JS.replace("COLUMN", column(NAN_RUN)))
        bands = driver.execute_script(
            f"return {column(NAN_RUN)}.querySelector('.plot.stack')._fullLayout.shapes.map((s) => s.x0)"
        )
    logged = logs.scalars(NAN_RUN)
    for i, label in enumerate(heat["y"]):
        values = logged[f"grad_norm/{label.split(' ')[0]}"]
        for j, step in enumerate(heat["x"]):
            nan = math.isnan(values[step])
            assert (heat["special"][i][j] == 1) == nan and (heat["z"][i][j] is None) == nan
    assert len(bands) == len(heat["x"]) - NAN_FROM_STEP  # one band per NaN step on the stack


def test_parameter_table_lists_the_model(driver: Any) -> None:
    with in_tab(driver):
        rows = driver.execute_script(
            f"return [...{column(TIED)}.querySelectorAll('table.params tbody tr')]"
            ".map((r) => [...r.cells].map((c) => c.textContent))"
        )
    assert [r[0] for r in rows] == [r.name for r in parameter_table(ImageClassifier())]
    shared = next(r for r in rows if r[0] == MLP_SHARED)
    assert shared == [MLP_SHARED, "8×8", "64", "model.net.6.weight", ", ".join(MLP_SITES)]


def test_runs_are_side_by_side_and_untied_has_no_shared_layer(driver: Any) -> None:
    with in_tab(driver):
        boxes = driver.execute_script(
            "return [...document.querySelectorAll('.run')].map((c) => "
            "[c.querySelector('.run-name').textContent, c.getBoundingClientRect().left, c.getBoundingClientRect().top])"
        )
        untied_note = driver.execute_script(f"return {column(UNTIED)}.querySelector('section p.note').textContent")
        untied_rows = driver.execute_script(f"return {column(UNTIED)}.querySelector('.plot.heatmap').data[0].y")
    by_run = {name: (left, top) for name, left, top in boxes}
    assert set(by_run) == {TIED, UNTIED, NAN_RUN}
    (left_a, top_a), (left_b, top_b) = by_run[NAN_RUN], by_run[TIED]  # sorted: nan_run, shared_mlp, untied_mlp
    assert top_a == top_b and left_a < left_b  # one row, two columns
    assert untied_note == "No shared parameter in this run."
    assert untied_rows == expected_rows(tied=False)


def test_clicking_a_heatmap_row_opens_its_line_chart(driver: Any, logs: Logs) -> None:
    from selenium.webdriver.common.action_chains import ActionChains

    row = 4  # model.net.9.weight
    with in_tab(driver):
        target = driver.execute_script(
            f"""const div = {column(TIED)}.querySelector('.plot.heatmap');
            div.scrollIntoView({{block: 'center'}});
            const l = div._fullLayout, drag = div.querySelector('.nsewdrag'), box = drag.getBoundingClientRect();
            const y = l.yaxis.l2p({row}) + l.yaxis._offset - (box.top - div.getBoundingClientRect().top);
            return [drag, Math.round(box.width / 2), Math.round(y)];"""
        )
        drag, x, y = target
        size = drag.size
        ActionChains(driver).move_to_element_with_offset(
            drag, x - size["width"] // 2, y - size["height"] // 2
        ).click().perform()
        chart = wait_until(
            lambda: driver.execute_script(
                f"""const div = {column(TIED)}.querySelector('.row-chart .plot.row');
                return div && div.data ? {{title: div.layout.title.text,
                  series: div.data.map((t) => [t.name, t.x, t.y])}} : null;"""
            ),
            20,
            "the clicked row's line chart",
        )
    assert chart["title"] == "model.net.9.weight"
    logged = logs.scalars(TIED)
    series = {name: dict(zip(x, y, strict=True)) for name, x, y in chart["series"]}
    assert set(series) == {"grad_norm", "weight_norm", "weight_mean"}
    for metric, points in series.items():
        expected = logged[f"{metric}/model.net.9.weight"]
        assert points.keys() == expected.keys()
        assert all(points[s] == pytest.approx(v, rel=1e-6) for s, v in expected.items())
    no_console_errors(driver)


def test_filter_box_keeps_matching_parameters(driver: Any) -> None:
    with in_tab(driver):
        box = driver.find_element("id", "filter")
        box.send_keys("net.3")
        rows = lambda: driver.execute_script(  # noqa: E731
            f"const s = window.__paramMonitorState; return s.ready && s.filter === 'net.3' ? "
            f"{column(TIED)}.querySelector('.plot.heatmap').data[0].y : null"
        )
        shown = wait_until(rows, 20, "the filtered heatmap")
        box.clear()
        driver.execute_script("document.getElementById('filter').dispatchEvent(new Event('input'))")
        wait_until(lambda: driver.execute_script("return window.__paramMonitorState.filter === ''"), 20, "unfilter")
    assert shown == [r for r in expected_rows() if r.startswith("model.net.3.")]


def test_screenshot_and_no_console_error(driver: Any, server: TensorBoardServer, tmp_path: Path) -> None:
    seconds = open_tab(driver, server)  # a fresh load, timed for the report below
    time.sleep(0.5)  # let plotly's transitions settle
    png = tmp_path / "tab.png"
    driver.save_screenshot(str(png))
    data = png.read_bytes()
    assert data.startswith(b"\x89PNG") and len(data) > 50_000, "screenshot is empty"
    if os.environ.get("PARAM_MONITOR_TAB_PNG"):
        shutil.copyfile(png, os.environ["PARAM_MONITOR_TAB_PNG"])
    no_console_errors(driver)
    assert seconds < 30, f"the tab took {seconds:.1f} s to draw three small runs"


def screenshot_logdir(logdir: Path, png: Path, width: int = 1600, height: int = 1500) -> None:
    """Serve ``logdir`` with the tab and save the tab (how docs/tab.png is made)."""
    with tempfile.TemporaryDirectory() as work, plugin_server(logdir, Path(work)) as server:
        wait_until(lambda: server.check_alive() or server.get_json("/data/plugin/param_monitor/runs"), 60, "runs")
        with chromium(width, height) as driver:
            open_tab(driver, server)
            time.sleep(1.0)
            driver.save_screenshot(str(png))


if __name__ == "__main__":
    # python tests/test_tensorboard_plugin_browser.py LOGDIR OUT.png [WIDTH HEIGHT]
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    size = [int(v) for v in sys.argv[3:5]] or [1600, 1500]
    screenshot_logdir(Path(sys.argv[1]), Path(sys.argv[2]), *size)
