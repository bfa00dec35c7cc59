"""pytest set-up. The event readers live in ``tests/helpers/events.py`` (re-exported here for older imports)."""

from __future__ import annotations

import pytest

from tests.helpers.events import load_events, read_scalar_steps, read_scalars  # noqa: F401


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    # Distributed and browser tests are slow too: `-m "not slow"` gives the quick inner loop.
    for item in items:
        if "distributed" in item.keywords or "browser" in item.keywords:
            item.add_marker(pytest.mark.slow)
