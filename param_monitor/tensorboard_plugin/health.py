"""Layers to look at: the rules of thumb the tab and the PNG report both apply to a run's scalars.

Pure Python over ``{name: {step: value}}`` (no TensorBoard, no matplotlib), so the tab's ``/health``
route and :mod:`param_monitor.report` list the same layers for the same run:

- the first NaN/inf gradient norm (the step, and the parameters non-finite there, in model order);
- a gradient norm that vanished: the last finite value exactly 0, or below ``VANISHED`` times the
  largest of the run (a layer that stopped learning);
- an update ratio ``‖Δw‖/‖w‖`` outside ``UPDATE_RATIO_RANGE`` (the median of the last
  ``RECENT`` logged steps: one noisy step is not a finding);
- more than ``DEAD_FRACTION`` of a layer's units dead (the last logged value).

>>> finds = layers_to_look_at({"a": {0: 1.0, 1: 1e-6}}, {"a": {1: 5e-5}}, {"a": {1: 0.75}}, ["a"])
>>> [(f["kind"], f["name"], f["step"]) for f in finds]
[('vanished', 'a', 1), ('update_ratio', 'a', 1), ('dead_units', 'a', 1)]
"""

from __future__ import annotations

import math
import statistics
from collections.abc import Mapping, Sequence
from typing import Any

#: Healthy update ratios (the rule of thumb is about 1e-3: below 1e-4 a layer barely moves, above 1e-2 it thrashes).
UPDATE_RATIO_RANGE = (1e-4, 1e-2)
UPDATE_RATIO_GUIDE = 1e-3
#: A layer with more than this fraction of its units dead is listed.
DEAD_FRACTION = 0.5
#: A gradient norm whose last value fell below this fraction of its largest has vanished.
VANISHED = 1e-4
#: Logged steps whose median update ratio is compared with the range.
RECENT = 10

Rows = Mapping[str, Mapping[int, float]]


def first_nonfinite(grad_norms: Rows, order: Sequence[str]) -> dict[str, Any] | None:
    """The first step holding a NaN/inf gradient norm, and every parameter non-finite there."""
    bad = [(step, name) for name in order for step, v in grad_norms.get(name, {}).items() if not math.isfinite(v)]
    if not bad:
        return None
    step = min(s for s, _ in bad)
    names = [n for s, n in bad if s == step]
    return {
        "kind": "nonfinite",
        "name": names[0],
        "names": names,
        "step": step,
        "value": grad_norms[names[0]][step],
        "text": f"first NaN/inf gradient norm at step {step}: {', '.join(names[:5])}"
        + (f" and {len(names) - 5} more" if len(names) > 5 else ""),
    }


def vanished(name: str, values: Mapping[int, float]) -> dict[str, Any] | None:
    finite = [(s, v) for s, v in sorted(values.items()) if math.isfinite(v)]
    if not finite:
        return None
    step, last = finite[-1]
    peak = max(abs(v) for _, v in finite)
    if last != 0 and abs(last) >= VANISHED * peak:
        return None
    why = "exactly 0" if last == 0 else f"{last:.3g}, {abs(last) / peak:.1e} of its largest ({peak:.3g})"
    return {"kind": "vanished", "name": name, "step": step, "value": last, "text": f"gradient norm vanished: {why}"}


def update_ratio_out_of_range(name: str, values: Mapping[int, float]) -> dict[str, Any] | None:
    recent = [(s, v) for s, v in sorted(values.items()) if math.isfinite(v)][-RECENT:]
    if not recent:
        return None
    median = statistics.median(v for _, v in recent)
    low, high = UPDATE_RATIO_RANGE
    if low <= median <= high:
        return None
    side = f"below {low:g}: barely moves" if median < low else f"above {high:g}: large steps"
    text = f"update ratio {median:.2g} (median of the last {len(recent)} logged steps), {side}"
    return {"kind": "update_ratio", "name": name, "step": recent[-1][0], "value": median, "text": text}


def mostly_dead(name: str, values: Mapping[int, float]) -> dict[str, Any] | None:
    finite = [(s, v) for s, v in sorted(values.items()) if math.isfinite(v)]
    if not finite or finite[-1][1] <= DEAD_FRACTION:
        return None
    step, last = finite[-1]
    return {"kind": "dead_units", "name": name, "step": step, "value": last, "text": f"{last:.0%} of its units dead"}


def layers_to_look_at(
    grad_norms: Rows, update_ratios: Rows, dead_units: Rows, order: Sequence[str]
) -> list[dict[str, Any]]:
    """Every finding, the first non-finite step first, then per parameter in ``order`` (model order).

    Each finding: ``kind`` (``nonfinite``, ``vanished``, ``update_ratio``, ``dead_units``), ``name``,
    ``step``, ``value`` and one sentence ``text``.
    """
    findings: list[dict[str, Any]] = []
    first = first_nonfinite(grad_norms, order)
    if first is not None:
        findings.append(first)
    for name in order:
        checks = ((vanished, grad_norms), (update_ratio_out_of_range, update_ratios), (mostly_dead, dead_units))
        for check, rows in checks:
            if name in rows:
                found = check(name, rows[name])
                if found is not None:
                    findings.append(found)
    return findings
#: A shared parameter's uses add up to its gradient when ``shared_grad_error`` stays below this
#: (about 1e-7 when every use is seen; the monitor warns above it).
EVERY_USE_SEEN_BELOW = 1e-2
