"""Read back what was really written, with TensorBoard's own reader."""

from __future__ import annotations

from pathlib import Path

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


def read_texts(log_dir: str | Path, tag: str) -> list[tuple[int, str]]:
    """``(step, markdown)`` of every TensorBoard text written under ``tag``."""
    events = load_events(log_dir)
    key = f"{tag}/text_summary"
    if key not in events.Tags()["tensors"]:
        return []
    return [(e.step, e.tensor_proto.string_val[0].decode()) for e in events.Tensors(key)]


def read_histograms(log_dir: str | Path) -> dict[str, dict[int, object]]:
    """``{tag: {step: HistogramValue}}`` for every histogram written."""
    events = load_events(log_dir)
    return {tag: {e.step: e.histogram_value for e in events.Histograms(tag)} for tag in events.Tags()["histograms"]}
