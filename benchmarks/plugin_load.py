"""How fast the PARAM MONITOR tab loads a big run: 1,000 parameter tensors, 200 logged steps.

    python benchmarks/plugin_load.py [--tensors 1000] [--steps 200] [--browser]

Writes a run in the monitor's schema with its own writer (``write_scalars``: one event per step;
``write_run_metadata``: the model's structure), then times, medians of ``--repeats``:

- TensorBoard's own first load of the logdir (``EventMultiplexer.Reload``, what ``tensorboard``
  does before any tab can show the run);
- each of the tab's routes, through TensorBoard's WSGI app (werkzeug's client: no network);
- with ``--browser``: a real ``tensorboard`` and headless Chromium, from opening ``#param_monitor``
  until every view is drawn (what a person waits for).
"""

from __future__ import annotations

import argparse
import math
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "tests")]

from torch.utils.tensorboard import SummaryWriter  # noqa: E402
from werkzeug.test import Client  # noqa: E402

from param_monitor import tags  # noqa: E402
from param_monitor.table import ParameterInfo  # noqa: E402
from param_monitor.tensorboard_plugin.metadata import write_run_metadata  # noqa: E402
from param_monitor.writers import write_scalars  # noqa: E402


def write_run(run_dir: Path, tensors: int, steps: int) -> None:
    """A model of ``tensors`` tensors (blocks of weight+bias), one shared weight used twice."""
    names = [f"model.blocks.{i // 2}.{'weight' if i % 2 == 0 else 'bias'}" for i in range(tensors)]
    shared, sites = names[0], ["model.blocks.0", "model.blocks.0#1"]
    rows = [ParameterInfo(n, (64, 64) if n.endswith("weight") else (64,), 4096, True) for n in names]
    with SummaryWriter(str(run_dir)) as writer:
        write_run_metadata(writer, rows, {shared: sites}, step=0)
        for s in range(steps):
            step = 50 * s + 49
            metrics: dict[str, float] = {}
            for i, n in enumerate(names):
                metrics[tags.weight_mean(n)] = math.sin(i + s) * 1e-2
                metrics[tags.weight_norm(n)] = 1.0 + i * 1e-3 + s * 1e-4
                metrics[tags.grad_norm(n)] = math.exp(-i / 200) * (1 + 0.1 * math.cos(s))
            g = metrics[tags.grad_norm(shared)]
            metrics[tags.shared_grad_share(shared, sites[0])] = 0.6
            metrics[tags.shared_grad_share(shared, sites[1])] = 0.4
            metrics[tags.shared_grad(shared, sites[0])] = 0.6 * g
            metrics[tags.shared_grad(shared, sites[1])] = 0.4 * g
            metrics[tags.shared_grad_error(shared)] = 1e-7
            metrics[tags.shared_grad_cosine(shared)] = 1.0
            write_scalars(writer, metrics, step)


def fully_loaded(server: object, steps: int) -> bool:
    """The data server ingests in the background: wait until the heatmap holds every step."""
    data = server.get_json("/data/plugin/param_monitor/runs")  # type: ignore[attr-defined]
    if not data or not data["runs"]:
        return False
    heat = server.get_json("/data/plugin/param_monitor/heatmap?run=big&metric=grad_norm")  # type: ignore[attr-defined]
    return bool(heat) and len(heat["steps"]) == steps and all(len(v) == steps for v in heat["values"])


def timed(fn, repeats: int) -> tuple[float, object]:
    times, result = [], None
    for _ in range(repeats):
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
    from plugin_runs import wsgi_app

    with tempfile.TemporaryDirectory() as tmp:
        logdir = Path(tmp)
        start = time.perf_counter()
        write_run(logdir / "big", args.tensors, args.steps)
        print(f"{args.tensors} tensors x {args.steps} steps: {3 * args.tensors * args.steps:,} scalars, "
              f"written in {time.perf_counter() - start:.2f} s")  # fmt: skip
        load_s, app = timed(lambda: wsgi_app(logdir), args.repeats)
        print(f"TensorBoard's first load of the logdir (multiplexer): {load_s:.2f} s")
        client = Client(app)
        routes = ["/runs", "/run?run=big", "/shared?run=big"]
        routes += [f"/heatmap?run=big&metric={m}" for m in ("grad_norm", "weight_norm", "weight_mean")]
        total = 0.0
        for route in routes:
            seconds, response = timed(lambda r=route: client.get(f"/data/plugin/param_monitor{r}"), args.repeats)
            assert response.status_code == 200, response.get_data(as_text=True)
            total += seconds
            print(f"  {route:40s} {seconds * 1000:8.1f} ms  {len(response.get_data()) / 1e6:6.2f} MB")
        print(f"  what the tab fetches when it opens (runs, run, shared, grad_norm heatmap): "
              f"{total:.2f} s for all routes above")  # fmt: skip
        if args.browser:
            from browser_support import chromium, wait_until
            from test_tensorboard_plugin_browser import open_tab, plugin_server

            # TensorBoard's default reader: the Rust data server (load_fast), as `make tensorboard` runs it
            with tempfile.TemporaryDirectory() as work, plugin_server(logdir, Path(work), load_fast=True) as server:
                loaded = time.perf_counter()
                wait_until(lambda: fully_loaded(server, args.steps), 300, "the run", interval=1.0)
                print(
                    f"real tensorboard (load_fast): run fully loaded {time.perf_counter() - loaded:.1f} s after start"
                )
                for route in routes:
                    seconds, _ = timed(lambda r=route: server.get_json(f"/data/plugin/param_monitor{r}"), args.repeats)
                    print(f"  over HTTP {route:40s} {seconds * 1000:8.1f} ms")
                with chromium(1600, 1100) as driver:
                    first = open_tab(driver, server, timeout=120)
                    again = [open_tab(driver, server, timeout=120) for _ in range(args.repeats)]
                print(f"browser, #param_monitor until drawn: first {first:.2f} s, then median "
                      f"{statistics.median(again):.2f} s")  # fmt: skip


if __name__ == "__main__":
    main()
