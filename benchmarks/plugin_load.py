"""How fast the PARAM MONITOR tab loads a big run: 1,000 parameter tensors, 200 logged steps.

    python benchmarks/plugin_load.py [--tensors 1000] [--steps 200] [--browser]

Writes a run in the monitor's schema (``param_monitor.tensorboard_plugin.testing.write_synthetic_run``:
``write_scalars``, one event per step, and ``write_run_metadata``), then times, medians of ``--repeats``:

- TensorBoard's own first load of the logdir (``EventMultiplexer.Reload``, what ``tensorboard``
  does before any tab can show the run);
- each of the tab's routes, through TensorBoard's WSGI app (werkzeug's client: no network);
- with ``--browser``: a real ``tensorboard`` and headless Chromium, from opening ``#param_monitor``
  until every view is drawn (what a person waits for).
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # this checkout's package (benchmarks never import the tests)

from werkzeug.test import Client  # noqa: E402

from param_monitor.tensorboard_plugin.plugin import CACHE_SECONDS  # noqa: E402
from param_monitor.tensorboard_plugin.testing import write_synthetic_run, wsgi_app  # noqa: E402


def write_run(run_dir: Path, tensors: int, steps: int) -> None:
    """A model of ``tensors`` tensors (blocks of weight+bias), the first block shared by two calls."""
    write_synthetic_run(run_dir, tensors, steps, uses=2)


def fully_loaded(get_json: Callable[[str], Any], steps: int) -> bool:
    """The data server ingests in the background: wait until the heatmap holds every step."""
    data = get_json("/data/plugin/param_monitor/runs")
    if not data or not data["runs"]:
        return False
    heat = get_json("/data/plugin/param_monitor/heatmap?run=big&metric=grad_norm")
    return bool(heat) and len(heat["steps"]) == steps and all(len(v) == steps for v in heat["values"])


def wait(condition: Callable[[], Any], timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise TimeoutError(f"nothing after {timeout} s")
        time.sleep(1.0)


@contextmanager
def tab_server(logdir: Path, work: Path) -> Iterator[tuple[str, Callable[[str], Any]]]:
    """``tensorboard`` with the tab (``python -m param_monitor.tensorboard_plugin.testing``) on a free port."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, (str(ROOT), os.environ.get("PYTHONPATH")))))
    command = [sys.executable, "-m", "param_monitor.tensorboard_plugin.testing", f"--logdir={logdir}",
               "--host=127.0.0.1", f"--port={port}", "--load_fast=true", "--reload_interval=1"]  # fmt: skip
    with (work / "tensorboard.log").open("wb") as log:
        process = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, env=env, start_new_session=True)
    url = f"http://127.0.0.1:{port}"

    def get_json(route: str) -> Any:
        try:
            with urllib.request.urlopen(url + route, timeout=30) as response:
                return json.load(response)
        except (OSError, ValueError):
            return None

    try:
        yield url, get_json
    finally:
        os.killpg(process.pid, signal.SIGTERM)
        process.wait(timeout=10)


def browser_times(url: str, repeats: int) -> tuple[float, list[float], Any]:
    """Headless Chromium (selenium): seconds from opening ``#param_monitor`` until the tab says it is drawn."""
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = "/usr/bin/chromium"
    for flag in ("--headless", "--no-sandbox", "--disable-gpu", "--window-size=1600,1100"):
        options.add_argument(flag)
    driver = webdriver.Chrome(service=Service("/usr/bin/chromedriver"), options=options)
    ready = "const s = window.__paramMonitorState; return s && s.ready ? s.firstScreenMs : null"

    def open_tab() -> tuple[float, Any]:
        driver.get("about:blank")
        start = time.monotonic()
        driver.get(f"{url}/#param_monitor")
        deadline = start + 120
        while True:
            frames = driver.execute_script(
                "const find = (r) => { for (const e of r.querySelectorAll('*')) { if (e.tagName === 'IFRAME') return e;"
                " if (e.shadowRoot) { const f = find(e.shadowRoot); if (f) return f; } } return null; };"
                " return find(document);"
            )
            if frames is not None:
                driver.switch_to.frame(frames)
                screen = driver.execute_script(ready)
                driver.switch_to.default_content()
                if screen is not None:
                    return time.monotonic() - start, screen
            if time.monotonic() > deadline:
                raise TimeoutError("the tab did not draw in 120 s")
            time.sleep(0.1)

    try:
        first, screen = open_tab()
        again = []
        for _ in range(repeats):
            time.sleep(CACHE_SECONDS + 0.1)  # each look reads the run afresh
            again.append(open_tab()[0])
    finally:
        driver.quit()
    return first, again, screen


def timed(fn, repeats: int) -> tuple[float, object]:
    """The median of ``repeats`` calls, each after the plugin's cache of a family's values expired
    (``CACHE_SECONDS``: the heatmap and the health list share one read), so every call reads afresh."""
    times, result = [], None
    for _ in range(repeats):
        time.sleep(CACHE_SECONDS + 0.1)
        start = time.perf_counter()
        result = fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times), result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--tensors", type=int, default=1000)
    parser.add_argument("--steps", type=int, default=200)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--browser", action="store_true")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        logdir = Path(tmp)
        start = time.perf_counter()
        write_run(logdir / "big", args.tensors, args.steps)
        print(f"{args.tensors} tensors x {args.steps} steps: {3 * args.tensors * args.steps:,} scalars, "
              f"written in {time.perf_counter() - start:.2f} s")  # fmt: skip
        load_s, app = timed(lambda: wsgi_app(logdir), 1)
        print(f"TensorBoard's first load of the logdir (multiplexer): {load_s:.2f} s")
        client = Client(app)
        routes = ["/families", "/runs", "/run?run=big", "/groups?run=big", "/health?run=big"]
        routes += [f"/heatmap?run=big&metric={m}" for m in ("grad_norm", "weight_norm", "weight_mean")]
        total = 0.0
        for route in routes:
            seconds, response = timed(lambda r=route: client.get(f"/data/plugin/param_monitor{r}"), args.repeats)
            assert response.status_code == 200, response.get_data(as_text=True)
            total += seconds
            print(f"  {route:40s} {seconds * 1000:8.1f} ms  {len(response.get_data()) / 1e6:6.2f} MB")
        print(f"  what the tab fetches when it opens (families, runs, run, groups, health, one heatmap): "
              f"{total:.2f} s for all routes above")  # fmt: skip
        if args.browser:
            # TensorBoard's default reader: the Rust data server (load_fast), as `make tensorboard` runs it
            with tempfile.TemporaryDirectory() as work, tab_server(logdir, Path(work)) as (url, get_json):
                loaded = time.perf_counter()
                wait(lambda: fully_loaded(get_json, args.steps), 300)
                took = time.perf_counter() - loaded
                print(f"real tensorboard (load_fast): run fully loaded {took:.1f} s after start")
                for route in routes:
                    seconds, _ = timed(lambda r=route: get_json(f"/data/plugin/param_monitor{r}"), args.repeats)
                    print(f"  over HTTP {route:40s} {seconds * 1000:8.1f} ms")
                time.sleep(CACHE_SECONDS + 0.1)  # the tab reads the run afresh, as on a first look
                first, again, screen = browser_times(url, args.repeats)
                print(f"browser, #param_monitor until drawn: first {first:.2f} s, then median "
                      f"{statistics.median(again):.2f} s; the tab's own first-screen time {screen} ms")  # fmt: skip

if __name__ == "__main__":
    main()
