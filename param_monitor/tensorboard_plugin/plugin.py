"""The PARAM MONITOR tab's backend: a TensorBoard dynamic plugin and its JSON routes.

TensorBoard loads ``/index.js`` (``static/index.js``) into an iframe and calls its ``render()``;
that module fetches everything else from the routes below. Every read goes through
``context.data_provider`` (the multiplexer is ``None`` with TensorBoard's fast loader). Values
are sent as read from the event files (float32, printed with 9 significant digits, which round-
trips float32 exactly); TensorBoard's JSON encoder turns NaN and infinities into the strings
``"NaN"``, ``"Infinity"`` and ``"-Infinity"``, which the front end turns back into numbers.

Routes (``/data/plugin/param_monitor/...``), each refusing a run it does not list with 404:

=============================  ==================================================================
``/families``                  the registry of metric families (``tags.FAMILIES``): chart, scale,
                               meaning; the front end draws every ``heatmap`` family it lists
``/runs``                      the runs holding the monitor's data, with whether they hold its metadata
``/run?run=R``                 parameters in model order, shared parameters, their groups (the
                               shared modules), heatmap rows per family, the non-finite record, and
                               ``status``: steps logged, whether per-use tracking ran, why not
``/groups?run=R``              per shared group: each use's share of the group's gradient over
                               time (bands adding up to 1), the worst error, the mean cosine
``/shared?run=R[&name=N]``     per shared parameter (or just ``N``): steps, ``grad_norm``, each
                               use's share, ``share × grad_norm`` (the stack), use norms, checks
``/heatmap?run=R&metric=M``    rows (model order) × step columns of ``M/{name}`` (any heatmap
                               family), at most ``MAX_COLUMNS`` columns (a non-finite value wins)
``/series?run=R&name=N``       every heatmap family of ``N``, at most ``MAX_LINE_POINTS`` points
``/health?run=R``              layers to look at (:mod:`.health`): first NaN/inf, a vanished
                               gradient, an update ratio out of range, mostly dead units
=============================  ==================================================================
"""

from __future__ import annotations

import gzip
import importlib.util
import math
import threading
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from functools import cache
from pathlib import Path
from typing import Any

from tensorboard import context as context_module
from tensorboard import plugin_util
from tensorboard.backend import http_util
from tensorboard.data import provider
from tensorboard.plugins import base_plugin
from werkzeug import Request, Response

from param_monitor import tags
from param_monitor.spikes import parse_markdown
from param_monitor.tensorboard_plugin import health
from param_monitor.tensorboard_plugin.metadata import model_order, parse_run_metadata, row_order, shared_groups

STATIC_DIR = Path(__file__).resolve().parent / "static"
#: The only files served from ``static/`` (anything else, ``..`` included, is a 404).
STATIC_FILES = {
    "index.js": "text/javascript",
    "model.js": "text/javascript",
    "views.js": "text/javascript",
    "style.css": "text/css",
}
#: Heatmap columns and line points sent at most: enough for a screen, small for 1,000 tensors.
MAX_COLUMNS = 240
MAX_LINE_POINTS = 1000
#: Points asked of the data provider per tag (it keeps a reservoir of 1,000 scalars by default).
READ_LIMIT = 100_000
#: Seconds a family's values read for one route serve the next: the heatmap and the health list
#: that the tab asks for at once read ``grad_norm`` once (1,000 tensors: about 1 s each read).
CACHE_SECONDS = 5.0
_cache: dict[tuple[Any, ...], tuple[float, dict[str, dict[int, float]]]] = {}
_cache_locks: dict[tuple[Any, ...], threading.Lock] = {}
_cache_guard = threading.Lock()
#: Only the first ``MAX_GROUP_USES`` uses of a group are drawn as bands (a Mixtral layer: 8 experts).
MAX_GROUP_USES = 64
SCALARS_PLUGIN = "scalars"
#: The text record of gradient spikes a statistic module writes (its name in ``tags`` once registered there).
SPIKES_TAG = getattr(tags, "SPIKES_TAG", "param_monitor/spikes")
TEXT_PLUGIN = "text"


def _value(x: float) -> float:
    """A float32 value as JSON: 9 significant digits round-trip float32; NaN/inf pass through."""
    return float(f"{x:.9g}") if math.isfinite(x) else x


def _json(request: Request, payload: Any, code: int = 200) -> Response:
    return http_util.Respond(request, payload, "application/json", code=code)


def _not_found(request: Request, what: str) -> Response:
    return http_util.Respond(request, f"param_monitor: {what}", "text/plain", code=404)


def evenly_spaced(n: int, k: int) -> list[int]:
    """``min(n, k)`` indices into ``range(n)``, evenly spread, first and last included.

    >>> evenly_spaced(10, 4), evenly_spaced(3, 5)
    ([0, 3, 6, 9], [0, 1, 2])
    """
    if n <= k:
        return list(range(n))
    if k == 1:
        return [n - 1]
    return sorted({round(i * (n - 1) / (k - 1)) for i in range(k)})


def bin_rows(
    rows: Mapping[str, Mapping[int, float]], max_columns: int
) -> tuple[list[int], list[list[float | None]], list[list[int | None]] | None]:
    """Columns for a heatmap: every step if they fit, else ``max_columns`` bins of consecutive steps.

    A binned cell holds the value at its row's last step in the bin, unless a value in the bin is
    not finite: then the first such value (a NaN must not hide between columns). Returns the
    column steps (each bin's last step), the values, and, when binned, the step each cell is from.

    >>> bin_rows({"a": {0: 1.0, 1: float("nan"), 2: 3.0, 3: 4.0}}, 2)
    ([1, 3], [[nan, 4.0]], [[1, 3]])
    """
    steps = sorted(set().union(*(r.keys() for r in rows.values()))) if rows else []
    if len(steps) <= max_columns:
        return steps, [[r.get(s) for s in steps] for r in rows.values()], None
    bounds = [round(i * len(steps) / max_columns) for i in range(max_columns + 1)]
    bins = [steps[a:b] for a, b in zip(bounds, bounds[1:], strict=False)]
    values: list[list[float | None]] = []
    sources: list[list[int | None]] = []
    for row in rows.values():
        row_values, row_sources = [], []
        for chunk in bins:
            present = [s for s in chunk if s in row]
            bad = next((s for s in present if not math.isfinite(row[s])), None)
            pick = bad if bad is not None else (present[-1] if present else None)
            row_values.append(None if pick is None else row[pick])
            row_sources.append(pick)
        values.append(row_values)
        sources.append(row_sources)
    return [chunk[-1] for chunk in bins], values, sources


class _Reader:
    """The data provider, for one request (its context and experiment id)."""

    def __init__(self, data_provider: provider.DataProvider, request: Request) -> None:
        self.provider = data_provider
        self.ctx = plugin_util.context(request.environ)
        self.eid = plugin_util.experiment_id(request.environ)

    def scalar_tags(self, run: str | None = None) -> dict[str, list[str]]:
        rtf = provider.RunTagFilter(runs=[run]) if run is not None else None
        listing = self.provider.list_scalars(
            self.ctx, experiment_id=self.eid, plugin_name=SCALARS_PLUGIN, run_tag_filter=rtf
        )
        return {r: list(t) for r, t in listing.items()}

    def scalar_listing(self, run: str) -> dict[str, int]:
        """``{tag: last step}`` of the run's scalars."""
        listing = self.provider.list_scalars(
            self.ctx,
            experiment_id=self.eid,
            plugin_name=SCALARS_PLUGIN,
            run_tag_filter=provider.RunTagFilter(runs=[run]),
        )
        return {tag: series.max_step for tag, series in listing.get(run, {}).items()}

    def scalars(self, run: str, tag_names: Sequence[str]) -> dict[str, dict[int, float]]:
        """``{tag: {step: value}}`` (the last value when a step was written twice)."""
        if not tag_names:
            return {}
        data = self.provider.read_scalars(
            self.ctx,
            experiment_id=self.eid,
            plugin_name=SCALARS_PLUGIN,
            downsample=READ_LIMIT,
            run_tag_filter=provider.RunTagFilter(runs=[run], tags=list(tag_names)),
        )
        return {tag: {d.step: _value(d.value) for d in points} for tag, points in data.get(run, {}).items()}

    def family_rows(self, run: str, family: str, names: Sequence[str]) -> dict[str, dict[int, float]]:
        """``{name: {step: value}}`` of ``{family}/{name}``, shared for ``CACHE_SECONDS`` between the
        routes that need the same family (one read; a request arriving during it waits for it)."""
        key = (self.provider, self.eid, run, family, tuple(names))  # the provider itself: ids are reused
        with _cache_guard:
            lock = _cache_locks.setdefault(key, threading.Lock())
        with lock:
            now = time.monotonic()
            hit = _cache.get(key)
            if hit is not None and now - hit[0] < CACHE_SECONDS:
                return hit[1]
            data = self.scalars(run, [f"{family}/{n}" for n in names])
            rows = {n: data.get(f"{family}/{n}", {}) for n in names}
            with _cache_guard:
                for stale in [k for k, (t, _) in _cache.items() if now - t >= CACHE_SECONDS]:
                    del _cache[stale]
                    if stale != key and not _cache_locks[stale].locked():
                        del _cache_locks[stale]
                _cache[key] = (now, rows)
            return rows

    def last_tensor(self, plugin_name: str, run: str | None, tag: str) -> dict[str, Any]:
        """``{run: last TensorDatum}`` of ``tag`` (one run, or all)."""
        rtf = provider.RunTagFilter(runs=None if run is None else [run], tags=[tag])
        data = self.provider.read_tensors(
            self.ctx, experiment_id=self.eid, plugin_name=plugin_name, downsample=1, run_tag_filter=rtf
        )
        return {r: points[-1] for r, by_tag in data.items() for points in by_tag.values() if points}

    def metadata_runs(self) -> set[str]:
        listing = self.provider.list_tensors(self.ctx, experiment_id=self.eid, plugin_name=tags.PLUGIN_NAME)
        return {run for run, by_tag in listing.items() if tags.RUN_METADATA_TAG in by_tag}

    def text(self, run: str, tag: str) -> list[tuple[int, str]]:
        """``(step, text)`` of ``tag`` or of ``tag/...``: torch's ``add_text`` appends ``/text_summary``."""
        rtf = provider.RunTagFilter(runs=[run])
        listing = self.provider.list_tensors(
            self.ctx, experiment_id=self.eid, plugin_name=TEXT_PLUGIN, run_tag_filter=rtf
        )
        names = [t for t in listing.get(run, {}) if t == tag or t.startswith(f"{tag}/")]
        if not names:
            return []
        data = self.provider.read_tensors(
            self.ctx,
            experiment_id=self.eid,
            plugin_name=TEXT_PLUGIN,
            downsample=100,
            run_tag_filter=provider.RunTagFilter(runs=[run], tags=names),
        )
        out = []
        for datum in sorted((d for t in names for d in data.get(run, {}).get(t, [])), key=lambda d: d.step):
            array = datum.numpy
            items = array.reshape(-1).tolist() if array.ndim else [array.item()]
            out.append((datum.step, "\n\n".join(x.decode("utf-8") if isinstance(x, bytes) else str(x) for x in items)))
        return out


def heatmap_families() -> list[str]:
    """The registered families drawn as heatmaps (read at each request: a module may register more)."""
    return [f.name for f in tags.FAMILIES if f.chart == "heatmap"]


def _is_monitor_tag(tag: str) -> bool:
    return tags.family_of(tag) is not None


class ParamMonitorPlugin(base_plugin.TBPlugin):
    """The PARAM MONITOR tab (``plugin_name`` = ``param_monitor``)."""

    plugin_name = tags.PLUGIN_NAME

    def __init__(self, context: base_plugin.TBContext) -> None:
        self._provider = context.data_provider

    # -- what TensorBoard asks of a plugin ------------------------------------------------
    def get_plugin_apps(self) -> dict[str, Callable[..., Any]]:
        return {
            "/index.js": self._serve_module("index.js"),
            "/model.js": self._serve_module("model.js"),
            "/views.js": self._serve_module("views.js"),
            "/static/*": self._serve_static,
            "/plotly.min.js": self._serve_plotly,
            "/families": self._serve_families,
            "/runs": self._serve_runs,
            "/run": self._with_run(self._run_info),
            "/groups": self._with_run(self._groups),
            "/shared": self._with_run(self._shared),
            "/heatmap": self._with_run(self._heatmap),
            "/series": self._with_run(self._series),
            "/health": self._with_run(self._health),
        }

    def is_active(self) -> bool:
        """Active for a run of the monitor's scalars without its metadata too (a plain-PyTorch loop's
        ``ParameterWatcher``); TensorBoard asks this only when no run holds the metadata."""
        if self._provider is None:
            return False
        ctx = context_module.RequestContext()
        listing = self._provider.list_scalars(ctx, experiment_id="", plugin_name=SCALARS_PLUGIN)
        return any(_is_monitor_tag(t) for by_tag in listing.values() for t in by_tag)

    def data_plugin_names(self) -> tuple[str, ...]:
        return (tags.PLUGIN_NAME,)

    def frontend_metadata(self) -> base_plugin.FrontendMetadata:
        # disable_reload: TensorBoard's reload does not reach an iframed tab; the tab has its own timer
        return base_plugin.FrontendMetadata(es_module_path="/index.js", tab_name="Param Monitor", disable_reload=True)

    # -- static files ---------------------------------------------------------------------
    def _serve_module(self, name: str) -> Callable[..., Any]:
        """One of the tab's ES modules: ``index.js`` imports ``./model.js`` and ``./views.js`` by these routes."""

        @Request.application
        def serve(request: Request) -> Response:
            return http_util.Respond(request, (STATIC_DIR / name).read_bytes(), "text/javascript")

        return serve

    @Request.application
    def _serve_static(self, request: Request) -> Response:
        name = request.path.rsplit("/static/", 1)[-1]
        if name not in STATIC_FILES:  # a fixed list: no path from the request reaches the disk
            return _not_found(request, f"no static file {name!r}")
        return http_util.Respond(request, (STATIC_DIR / name).read_bytes(), STATIC_FILES[name])

    @Request.application
    def _serve_plotly(self, request: Request) -> Response:
        data = _plotly_gzipped()
        if data is None:
            return _not_found(request, "plotly is not installed (pip install 'plotly>=6,<7')")
        return http_util.Respond(request, data, "text/javascript", content_encoding="gzip", expires=86400)

    # -- data -----------------------------------------------------------------------------
    @Request.application
    def _serve_families(self, request: Request) -> Response:
        return _json(request, {"families": [f.to_json() for f in tags.FAMILIES]})

    @Request.application
    def _serve_runs(self, request: Request) -> Response:
        reader = _Reader(self._provider, request)
        with_metadata = reader.metadata_runs()
        runs = set(with_metadata) | {r for r, t in reader.scalar_tags().items() if any(map(_is_monitor_tag, t))}
        return _json(request, {"runs": [{"name": r, "metadata": r in with_metadata} for r in sorted(runs)]})

    def _with_run(self, handler: Callable[[_Reader, str, Request], Any]) -> Callable[..., Any]:
        """A route for one run: 404 unless the run is one that ``/runs`` lists."""

        @Request.application
        def serve(request: Request) -> Response:
            run = request.args.get("run")
            if run is None:
                return http_util.Respond(request, "param_monitor: missing ?run=", "text/plain", code=400)
            reader = _Reader(self._provider, request)
            tag_names = reader.scalar_tags(run).get(run, [])
            if run not in reader.metadata_runs() and not any(map(_is_monitor_tag, tag_names)):
                return _not_found(request, f"no param_monitor data for run {run!r}")
            payload = handler(reader, run, request)
            if isinstance(payload, Response):
                return payload
            return _json(request, payload)

        return serve

    def _metadata(self, reader: _Reader, run: str) -> dict[str, Any] | None:
        datum = reader.last_tensor(tags.PLUGIN_NAME, run, tags.RUN_METADATA_TAG).get(run)
        if datum is None:
            return None
        return parse_run_metadata(datum.numpy.item())

    def _structure(self, reader: _Reader, run: str) -> tuple[dict[str, Any] | None, list[str]]:
        meta = self._metadata(reader, run)
        return meta, [p["name"] for p in meta["parameters"]] if meta else []

    def _shared_of(self, meta: dict[str, Any] | None, tag_names: Iterable[str]) -> dict[str, list[str]]:
        return meta["shared"] if meta else _shared_from_tags(tag_names)

    def _run_info(self, reader: _Reader, run: str, request: Request) -> dict[str, Any]:
        meta, order = self._structure(reader, run)
        listing = reader.scalar_listing(run)
        tag_names = list(listing)
        shared = self._shared_of(meta, tag_names)
        rows = {m: row_order(_suffixes(tag_names, m), order) for m in heatmap_families()}
        nonfinite = reader.text(run, tags.NONFINITE_TAG)
        spikes = reader.text(run, SPIKES_TAG)
        return {
            "run": run,
            "parameters": meta["parameters"] if meta else [],
            "has_metadata": meta is not None,
            "shared": shared,
            "groups": shared_groups(shared, order),
            "rows": {m: names for m, names in rows.items() if names},
            "nonfinite": [{"step": s, "html": plugin_util.markdown_to_safe_html(md)} for s, md in nonfinite],
            "spikes": [{"step": s, "html": plugin_util.markdown_to_safe_html(md)} for s, md in spikes],
            # the steps the records list (each record: the fit's first spikes so far), marked on the time axes
            "spike_steps": sorted({spike.step for _, md in spikes for spike in parse_markdown(md)}),
            "status": run_status(meta, listing),
        }

    def _groups(self, reader: _Reader, run: str, request: Request) -> dict[str, Any]:
        meta, order = self._structure(reader, run)
        tag_names = set(reader.scalar_tags(run).get(run, []))
        groups = shared_groups(self._shared_of(meta, tag_names), order)
        return {"run": run, "groups": [_group_view(reader, run, g, tag_names) for g in groups]}

    def _shared(self, reader: _Reader, run: str, request: Request) -> dict[str, Any]:
        meta, order = self._structure(reader, run)
        tag_names = set(reader.scalar_tags(run).get(run, []))
        shared = self._shared_of(meta, tag_names)
        wanted = request.args.get("name")
        names = [n for n in model_order(list(shared), order) if wanted is None or n == wanted]
        return {"run": run, "shared": [_shared_view(reader, run, n, shared[n], tag_names) for n in names]}

    def _heatmap(self, reader: _Reader, run: str, request: Request) -> dict[str, Any] | Response:
        metric = request.args.get("metric", tags.GRAD_NORM)
        allowed = heatmap_families()
        if metric not in allowed:
            why = f"param_monitor: unknown metric {metric!r}; one of {', '.join(allowed)}"
            return http_util.Respond(request, why, "text/plain", code=400)
        _, order = self._structure(reader, run)
        names = row_order(_suffixes(reader.scalar_tags(run).get(run, []), metric), order)
        rows = reader.family_rows(run, metric, names)
        steps, values, sources = bin_rows(rows, MAX_COLUMNS)
        return {"run": run, "metric": metric, "rows": names, "steps": steps, "values": values, "cell_steps": sources}

    def _series(self, reader: _Reader, run: str, request: Request) -> dict[str, Any]:
        name = request.args.get("name", "")
        present = set(reader.scalar_tags(run).get(run, []))
        data = reader.scalars(run, [t for t in (f"{m}/{name}" for m in heatmap_families()) if t in present])
        out = {}
        for metric in heatmap_families():  # the registry's order, not the reader's
            points = data.get(f"{metric}/{name}")
            if points is None:
                continue
            steps = sorted(points)
            keep = evenly_spaced(len(steps), MAX_LINE_POINTS)
            out[metric] = {"steps": [steps[i] for i in keep], "values": [points[steps[i]] for i in keep]}
        return {"run": run, "name": name, "series": out}

    def _health(self, reader: _Reader, run: str, request: Request) -> dict[str, Any]:
        _, order = self._structure(reader, run)
        tag_names = reader.scalar_tags(run).get(run, [])
        families = (tags.GRAD_NORM, tags.UPDATE_RATIO, tags.DEAD_UNITS)
        names = {m: row_order(_suffixes(tag_names, m), order) for m in families}
        rows = {m: reader.family_rows(run, m, names[m]) for m in families}  # the heatmaps' reads, shared
        every = row_order(set().union(*names.values()), order)
        findings = health.layers_to_look_at(rows[tags.GRAD_NORM], rows[tags.UPDATE_RATIO], rows[tags.DEAD_UNITS], every)
        return {
            "run": run,
            "findings": findings,
            "checked": {m: len(names[m]) for m in families},
            "rules": {
                "update_ratio_range": list(health.UPDATE_RATIO_RANGE),
                "dead_fraction": health.DEAD_FRACTION,
                "vanished": health.VANISHED,
                "recent": health.RECENT,
            },
        }


def run_status(meta: dict[str, Any] | None, listing: Mapping[str, int]) -> dict[str, Any]:
    """What the tab says before any chart: steps logged, whether per-use tracking ran, and why not.

    ``listing`` is ``{tag: last step}`` of the run's scalars. Per-use tracking ran when the metadata
    names call sites (the tracker finds them) or a ``shared_grad`` tag exists. "No step logged yet"
    comes from the metadata's ``steps_logged`` (0) where the monitor wrote it, else from the event
    data: metadata and no scalar step.

    >>> meta = {"steps_logged": 0, "log_every_n_steps": 50, "steps_run": 30, "parameters": [], "shared": {}}
    >>> status = run_status(meta, {})
    >>> status["no_step_logged"], status["log_every_n_steps"], status["steps_run"]
    (True, 50, 30)
    >>> run_status(meta, {"grad_norm/a.weight": 49})["no_step_logged"]  # written since: the scalars win
    False
    """
    monitor = {t: s for t, s in listing.items() if _is_monitor_tag(t)}
    parameters = meta["parameters"] if meta else []
    tracking = meta.get("track_shared") if meta else None
    if tracking is None:
        ran = any(p["call_sites"] for p in parameters) or any(t.startswith(f"{tags.SHARED_GRAD}/") for t in monitor)
        tracking = True if ran else (None if not parameters else False)
    shared = meta["shared"] if meta else {}
    single_use = [
        {"name": p["name"], "aliases": p["aliases"], "sites": p["call_sites"]}
        for p in parameters
        if p["aliases"] and p["name"] not in shared and tracking
    ]
    said = meta or {}  # the monitor's core writes its logging status into the metadata (steps_logged 0: none yet)
    no_step = said["steps_logged"] == 0 if "steps_logged" in said else not monitor
    return {
        "steps_logged": bool(monitor),
        "last_step": max(monitor.values(), default=None),
        "no_step_logged": no_step and not monitor,  # a scalar logged since the metadata was written wins
        "log_every_n_steps": said.get("log_every_n_steps"),
        "steps_run": said.get("steps_run"),
        "tracking": tracking,
        "single_use_aliases": single_use,
    }


def _suffixes(tag_names: Iterable[str], metric: str) -> list[str]:
    prefix = f"{metric}/"
    return [t[len(prefix) :] for t in tag_names if t.startswith(prefix)]


def _shared_from_tags(tag_names: Iterable[str]) -> dict[str, list[str]]:
    """Shared parameters and sites from ``shared_grad/{name}/{site}`` tags (runs without metadata),
    sites in call order (``#2`` before ``#10``)."""
    shared: dict[str, list[str]] = {}
    for tag in sorted(tag_names):
        if tag.startswith(f"{tags.SHARED_GRAD}/"):
            name, site = tags.split_shared(tag)
            shared.setdefault(name, []).append(site)
    return {name: row_order(sites, []) for name, sites in shared.items()}


def _shared_view(reader: _Reader, run: str, name: str, sites: Sequence[str], tag_names: set[str]) -> dict[str, Any]:
    """One shared parameter's stack and checks, on the steps where its gradient norm was logged."""
    wanted = {
        "grad_norm": tags.grad_norm(name),
        "cosine": tags.shared_grad_cosine(name),
        "error": tags.shared_grad_error(name),
        **{f"share:{s}": tags.shared_grad_share(name, s) for s in sites},
        **{f"use:{s}": tags.shared_grad(name, s) for s in sites},
    }
    present = {key: tag for key, tag in wanted.items() if tag in tag_names}
    data = reader.scalars(run, list(present.values()))
    series = {key: data.get(tag, {}) for key, tag in present.items()}
    grad = series.get("grad_norm", {})
    all_steps = sorted(grad)
    steps = [all_steps[i] for i in evenly_spaced(len(all_steps), MAX_LINE_POINTS)]

    def column(key: str) -> list[float | None] | None:
        return [series[key].get(s) for s in steps] if key in series else None

    has_shares = all(f"share:{s}" in series for s in sites)
    stack = {}
    if has_shares:  # share × grad_norm: the uses add up to the norm (the shares sum to 1)
        for s in sites:
            share = series[f"share:{s}"]
            stack[s] = [_product(share.get(step), grad[step]) for step in steps]
    return {
        "name": name,
        "sites": list(sites),
        "steps": steps,
        "grad_norm": [grad[s] for s in steps],
        "share": {s: column(f"share:{s}") for s in sites} if has_shares else None,
        "stack": stack or None,
        "use_norm": {s: column(f"use:{s}") for s in sites},
        "cosine": column("cosine"),
        "error": column("error"),
    }


def _product(share: float | None, norm: float) -> float | None:
    return None if share is None else share * norm


def _group_view(reader: _Reader, run: str, group: Mapping[str, Any], tag_names: set[str]) -> dict[str, Any]:
    """A shared group's compact view: each use's share of the group's gradient per step, and the checks.

    The group's gradient is its tensors' gradients side by side, so use k's share of it is
    ``Σ_t share_t,k · grad_norm_t² / Σ_t grad_norm_t²`` (the bands add up to 1 at every step, as
    each tensor's shares do); its norm is ``sqrt(Σ_t ‖c_t,k‖²)``. A step where a value is missing or
    not finite is a gap (``None``) and is listed in ``nonfinite_steps`` when a value was not finite.
    """
    tensors, uses = group["tensors"], group["uses"][:MAX_GROUP_USES]
    wanted = [tags.grad_norm(t) for t in tensors]
    wanted += [tags.shared_grad_error(t) for t in tensors] + [tags.shared_grad_cosine(t) for t in tensors]
    for t in tensors:
        sites = group["sites"][t][: len(uses)]
        wanted += [tags.shared_grad_share(t, s) for s in sites] + [tags.shared_grad(t, s) for s in sites]
    data = reader.scalars(run, [w for w in wanted if w in tag_names])
    grad = {t: data.get(tags.grad_norm(t), {}) for t in tensors}
    all_steps = sorted(set().union(*(g.keys() for g in grad.values())))
    steps = [all_steps[i] for i in evenly_spaced(len(all_steps), MAX_LINE_POINTS)]
    shares = {t: [data.get(tags.shared_grad_share(t, s), {}) for s in group["sites"][t][: len(uses)]] for t in tensors}
    norms = {t: [data.get(tags.shared_grad(t, s), {}) for s in group["sites"][t][: len(uses)]] for t in tensors}
    bands: list[list[float | None]] = [[] for _ in uses]
    use_norm: list[list[float | None]] = [[] for _ in uses]
    bad_steps = []
    for step in steps:
        weights = [grad[t].get(step) for t in tensors]
        per_use = [[shares[t][k].get(step) for t in tensors] for k in range(len(uses))]
        values = [w for w in weights if w is not None] + [v for col in per_use for v in col if v is not None]
        if any(not math.isfinite(v) for v in values):
            bad_steps.append(step)
        total = sum(w * w for w in weights if w is not None and math.isfinite(w))
        complete = all(w is not None and math.isfinite(w) for w in weights) and total > 0
        for k, col in enumerate(per_use):
            ok = complete and all(v is not None and math.isfinite(v) for v in col)
            bands[k].append(_value(sum(v * w * w for v, w in zip(col, weights, strict=True)) / total) if ok else None)
            sq = [norms[t][k].get(step) for t in tensors]
            use_norm[k].append(_value(math.sqrt(sum(v * v for v in sq))) if all(_finite(v) for v in sq) else None)
    errors = [[data.get(tags.shared_grad_error(t), {}).get(s) for t in tensors] for s in steps]
    cosines = [[data.get(tags.shared_grad_cosine(t), {}).get(s) for t in tensors] for s in steps]
    worst = [max((v for v in col if v is not None), default=None, key=_nan_last) for col in errors]
    finite_worst = [w for w in worst if _finite(w)]
    return {
        "name": group["name"],
        "tensors": list(tensors),
        "uses": list(uses),
        "more_uses": max(0, len(group["uses"]) - len(uses)),
        "steps": steps,
        "bands": bands,
        "use_norm": use_norm,
        "error": worst,
        "cosine": [_mean([v for v in col if _finite(v)]) for col in cosines],
        "max_error": max(finite_worst, default=None),
        "every_use_seen": bool(finite_worst) and max(finite_worst) <= health.EVERY_USE_SEEN_BELOW,
        "nonfinite_steps": bad_steps,
    }


def _finite(v: float | None) -> bool:
    return v is not None and math.isfinite(v)


def _nan_last(v: float) -> float:
    """A key for ``max`` that puts an infinite error first and a NaN (no error known) last."""
    return -math.inf if math.isnan(v) else v


def _mean(values: Sequence[float]) -> float | None:
    return _value(math.fsum(values) / len(values)) if values else None


@cache
def _plotly_gzipped() -> bytes | None:
    """plotly.js from the installed ``plotly`` package (never a copy in this repository), gzipped once."""
    spec = importlib.util.find_spec("plotly")
    if spec is None or not spec.submodule_search_locations:
        return None
    path = Path(next(iter(spec.submodule_search_locations))) / "package_data" / "plotly.min.js"
    return gzip.compress(path.read_bytes(), compresslevel=6) if path.is_file() else None
