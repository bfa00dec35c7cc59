"""Shared helpers: read back what was really written, with TensorBoard's own reader."""

from __future__ import annotations

from pathlib import Path

import pytest
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

# Keep every event: the default size guidance samples scalars down to 10,000 and text to 10.
_KEEP_ALL = {"scalars": 0, "tensors": 0, "histograms": 0}


def load_events(log_dir: str | Path) -> EventAccumulator:
    accumulator = EventAccumulator(str(log_dir), size_guidance=_KEEP_ALL)
    accumulator.Reload()
    return accumulator


def read_scalars(log_dir: str | Path) -> dict[str, dict[int, float]]:
    """``{tag: {step: value}}`` for every scalar in the event files under ``log_dir``."""
    events = load_events(log_dir)
    return {tag: {e.step: e.value for e in events.Scalars(tag)} for tag in events.Tags()["scalars"]}


def read_scalar_steps(log_dir: str | Path, tag: str) -> list[int]:
    """Steps of ``tag`` in write order, duplicates kept (to catch steps written twice)."""
    return [e.step for e in load_events(log_dir).Scalars(tag)]


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    # Distributed and browser tests are slow too: `-m "not slow"` gives the quick inner loop.
    for item in items:
        if "distributed" in item.keywords or "browser" in item.keywords:
            item.add_marker(pytest.mark.slow)
