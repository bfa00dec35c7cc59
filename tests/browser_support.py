"""Helpers for end-to-end tests that look at TensorBoard the way a person does.

A real ``tensorboard`` server on 127.0.0.1 and a headless Debian Chromium driven by
Selenium.  Both are context managers that always stop what they started: the server's
whole process group is killed, the browser is quit.  Nothing here reaches the network.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest

from tests.helpers.processes import free_port

CHROMIUM = Path("/usr/bin/chromium")
CHROMEDRIVER = Path("/usr/bin/chromedriver")
TENSORBOARD = Path(sys.executable).with_name("tensorboard")

CHROMIUM_FLAGS = (
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--disable-quic",
)


def missing_browser_reason() -> str | None:
    """Why the browser tests cannot run here, or ``None`` when they can."""
    missing = [str(p) for p in (CHROMIUM, CHROMEDRIVER, TENSORBOARD) if not p.exists()]
    if missing:
        return f"needs {', '.join(missing)} (Debian's chromium and chromium-driver; the venv's tensorboard)"
    try:
        import selenium  # noqa: F401
    except ImportError:
        return "needs selenium (pip install -e '.[test]')"
    return None


requires_browser = pytest.mark.skipif(missing_browser_reason() is not None, reason=str(missing_browser_reason()))


def wait_until(condition: Callable[[], Any], timeout: float, what: str, interval: float = 0.2) -> Any:
    """Poll ``condition`` until it returns something truthy; fail with ``what`` after ``timeout`` s."""
    deadline = time.monotonic() + timeout
    while True:
        result = condition()
        if result:
            return result
        if time.monotonic() > deadline:
            raise TimeoutError(f"timed out after {timeout:.0f} s waiting for {what}")
        time.sleep(interval)


class TensorBoardServer:
    """A running ``tensorboard`` process and the JSON routes of its data API."""

    def __init__(self, process: subprocess.Popen[bytes], url: str, log_path: Path) -> None:
        self.process = process
        self.url = url
        self.log_path = log_path

    def get_json(self, route: str) -> Any:
        """GET ``route`` (e.g. ``/data/runs``) and decode it; ``None`` while the server is not up."""
        try:
            with urllib.request.urlopen(self.url + route, timeout=5) as response:
                return json.load(response)
        except (urllib.error.URLError, ConnectionError, TimeoutError):
            return None

    def check_alive(self) -> None:
        """Fail with the server's own output if it has exited (a taken port, a bad flag)."""
        if self.process.poll() is not None:
            raise RuntimeError(f"tensorboard exited with {self.process.returncode}:\n{self.log_path.read_text()}")

    def wait_for_data(self, run: str, timeout: float = 30.0) -> None:
        """Wait until ``run`` is loaded: its scalars and its custom-scalars layout are served."""

        def loaded() -> bool:
            self.check_alive()
            tags = self.get_json("/data/plugin/scalars/tags") or {}
            layout = self.get_json("/data/plugin/custom_scalars/layout") or {}
            return bool(tags.get(run)) and bool(layout.get("category"))

        wait_until(loaded, timeout, f"tensorboard to load run {run!r}")


@contextmanager
def tensorboard_server(
    logdir: Path,
    work_dir: Path,
    launcher: Sequence[str] | None = None,
    env: Mapping[str, str] | None = None,
    load_fast: bool = False,
) -> Iterator[TensorBoardServer]:
    """Serve ``logdir`` on a free 127.0.0.1 port; the process group is killed on exit.

    ``--load_fast=false`` keeps the pure-Python reader: the Rust data server is a separate
    download that is not on these machines.  A short ``--reload_interval`` makes the first
    load quick.  ``launcher`` replaces the ``tensorboard`` executable (a script taking its flags);
    ``env`` is the server's environment (default: this process's); ``load_fast=True`` uses the
    Rust data server where the ``tensorboard-data-server`` package has one (benchmarks only).
    """
    port = free_port()
    log_path = work_dir / "tensorboard.log"
    command = [
        *(launcher or [str(TENSORBOARD)]),
        f"--logdir={logdir}",
        "--host=127.0.0.1",
        f"--port={port}",
        f"--load_fast={'true' if load_fast else 'false'}",
        "--reload_interval=1",
    ]
    with log_path.open("wb") as log:
        server_env = None if env is None else dict(env)
        process = subprocess.Popen(
            command, stdout=log, stderr=subprocess.STDOUT, start_new_session=True, env=server_env
        )
    try:
        yield TensorBoardServer(process, f"http://127.0.0.1:{port}", log_path)
    finally:
        stop_process_group(process)


def stop_process_group(process: subprocess.Popen[bytes], grace: float = 5.0) -> None:
    """SIGTERM the process's group, then SIGKILL it if it lingers."""
    if process.poll() is not None:
        return
    os.killpg(process.pid, signal.SIGTERM)
    try:
        process.wait(timeout=grace)
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, signal.SIGKILL)
        process.wait(timeout=grace)


@contextmanager
def chromium(width: int = 1400, height: int = 1000) -> Iterator[Any]:
    """A headless Chromium whose page viewport is ``width`` x ``height``; quit on exit."""
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    with tempfile.TemporaryDirectory(prefix="chromium-profile-") as profile:
        options = webdriver.ChromeOptions()
        options.binary_location = str(CHROMIUM)
        for flag in CHROMIUM_FLAGS:
            options.add_argument(flag)
        options.add_argument(f"--user-data-dir={profile}")
        options.add_argument(f"--window-size={width},{height}")
        options.set_capability("goog:loggingPrefs", {"browser": "ALL"})  # the console, for driver.get_log
        driver = webdriver.Chrome(service=Service(str(CHROMEDRIVER)), options=options)
        try:
            fit_viewport(driver, width, height)
            yield driver
        finally:
            driver.quit()


def fit_viewport(driver: Any, width: int, height: int) -> None:
    """Grow the window so the page itself (not the window frame) is ``width`` x ``height``."""
    inner_w, inner_h = driver.execute_script("return [window.innerWidth, window.innerHeight]")
    size = driver.get_window_size()
    driver.set_window_size(size["width"] + width - inner_w, size["height"] + height - inner_h)


# JavaScript helpers, prepended to scripts run in the page.  TensorBoard's Polymer
# components keep their contents in shadow roots, which querySelectorAll does not enter.
DEEP_DOM_JS = """
function deepAll(root) {
  const out = [];
  const visit = (node) => {
    for (const el of node.querySelectorAll('*')) {
      out.push(el);
      if (el.shadowRoot) visit(el.shadowRoot);
    }
  };
  if (root.shadowRoot) visit(root.shadowRoot);
  visit(root);
  return out;
}
function deepFind(root, tagName) {
  return deepAll(root).filter((el) => el.tagName.toUpperCase() === tagName.toUpperCase());
}
function text(el) {
  return (el.innerText || el.textContent || '').replace(/\\s+/g, ' ').trim();
}
"""


def run_deep_js(driver: Any, body: str, *args: Any) -> Any:
    """Run ``body`` in the page with ``deepAll``/``deepFind``/``text`` defined."""
    return driver.execute_script(DEEP_DOM_JS + body, *args)


# -- TensorBoard's pages, as a person sees them ----------------------------------------


def open_page(driver: Any, server: TensorBoardServer, page: str, dashboard_tag: str, timeout: float = 30) -> None:
    """Open ``#page`` and wait until its dashboard element (e.g. ``tf-text-dashboard``) exists."""
    driver.get(f"{server.url}/#{page}")
    wait_until(
        lambda: run_deep_js(driver, "return deepFind(document, arguments[0]).length > 0", dashboard_tag),
        timeout,
        f"TensorBoard's {page} page",
    )


CUSTOM_CHARTS_JS = """
const dash = deepFind(document, 'tf-custom-scalar-dashboard')[0];
if (!dash) return [];
return deepFind(dash, 'tf-custom-scalar-multi-line-chart-card').map((card) => {
  const inner = deepAll(card.shadowRoot);
  const heading = inner.find((el) => el.tagName === 'TF-CARD-HEADING');
  const caption = heading && heading.shadowRoot && heading.shadowRoot.querySelector('figcaption');
  const lines = inner.filter((el) => el.tagName === 'path' && el.getAttribute('class') === 'line');
  return {
    title: caption ? text(caption) : '',
    series: inner.filter((el) => el.classList.contains('match-list-entry'))
                 .map((el) => text(el).replace(/^[^\\w]+\\s*/, '')),
    drawn_lines: lines.filter((el) => (el.getAttribute('d') || '').length > 10).length,
  };
});
"""


def custom_scalar_charts(driver: Any) -> list[dict[str, Any]]:
    """The custom-scalars page's charts: title, legend entries (``tag (run)``), lines drawn."""
    return run_deep_js(driver, CUSTOM_CHARTS_JS)


def wait_for_custom_charts(driver: Any, timeout: float = 30) -> list[dict[str, Any]]:
    """Wait until every chart of the custom-scalars page has drawn each of its series."""

    def drawn() -> list[dict[str, Any]] | None:
        charts = custom_scalar_charts(driver)
        done = charts and all(c["series"] and c["drawn_lines"] >= len(c["series"]) for c in charts)
        return charts if done else None

    return wait_until(drawn, timeout, "the custom-scalars charts to draw")


FEATURE_CHART_JS = """
const dash = deepFind(document, 'tf-custom-scalar-dashboard')[0];
const card = deepFind(dash, 'tf-custom-scalar-multi-line-chart-card')
  .find((c) => text(c.shadowRoot.querySelector('tf-card-heading').shadowRoot.querySelector('figcaption'))
               === arguments[0]);
if (!card) return false;
card.shadowRoot.querySelector('.toggle-matches-button').click();  // open its legend
if (arguments[1]) card.shadowRoot.querySelector('paper-icon-button[icon="fullscreen"]').click();
return true;
"""


def show_custom_scalars(
    driver: Any, server: TensorBoardServer, feature: str | None = None, enlarge: bool = False
) -> list[dict[str, Any]]:
    """Open the custom-scalars page and wait for its charts; open the legend of chart ``feature``.

    ``enlarge`` also widens that chart to the page's width, as its fullscreen button does.
    """
    open_page(driver, server, "custom_scalars", "tf-custom-scalar-dashboard")
    charts = wait_for_custom_charts(driver)
    if feature is not None:
        if not run_deep_js(driver, FEATURE_CHART_JS, feature, enlarge):
            raise LookupError(f"no chart titled {feature!r} among {[c['title'] for c in charts]}")
        time.sleep(1.0)  # the legend's collapse animates open; an enlarged chart redraws
    return charts


def screenshot_logdir(logdir: Path, png: Path, feature: str | None = None) -> None:
    """Serve ``logdir`` and save its custom-scalars page to ``png`` (how docs/dashboard.png is made).

    ``feature`` names the chart to enlarge and show the legend of (a shared parameter).
    """
    with tempfile.TemporaryDirectory() as work, tensorboard_server(logdir, Path(work)) as server:
        runs = wait_until(lambda: server.check_alive() or server.get_json("/data/runs"), 30, "a run to load")
        server.wait_for_data(runs[0])
        with chromium() as driver:
            show_custom_scalars(driver, server, feature, enlarge=True)
            driver.save_screenshot(str(png))


if __name__ == "__main__":
    # python tests/browser_support.py LOGDIR OUT.png [SHARED_PARAMETER_NAME]
    screenshot_logdir(Path(sys.argv[1]), Path(sys.argv[2]), sys.argv[3] if len(sys.argv) > 3 else None)
