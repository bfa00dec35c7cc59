"""writers: one event per logging step; values float32 cannot hold are named, never written wrong."""

from __future__ import annotations

import math
import warnings
from pathlib import Path

from torch.utils.tensorboard import SummaryWriter

from param_monitor.writers import write_scalars
from tests.helpers.events import read_scalars


def test_a_value_beyond_float32_is_named_once_and_not_written(tmp_path: Path) -> None:
    writer = SummaryWriter(str(tmp_path))
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        for step in (1, 2):
            write_scalars(writer, {"grad_norm/huge": 5e39, "grad_norm/tiny": 1e-50, "grad_norm/w": 2.5}, step)
    writer.close()
    messages = [str(w.message) for w in record if "float32" in str(w.message)]
    assert len(messages) == 1
    assert "grad_norm/huge = 5e+39" in messages[0] and "grad_norm/tiny = 1e-50" in messages[0]
    assert "grad_norm/w" not in messages[0]
    scalars = read_scalars(tmp_path)
    assert "grad_norm/huge" not in scalars and "grad_norm/tiny" not in scalars  # never inf, never 0
    assert scalars["grad_norm/w"] == {1: 2.5, 2: 2.5}


def test_nan_inf_and_the_edges_of_float32_are_written_as_they_are(tmp_path: Path) -> None:
    writer = SummaryWriter(str(tmp_path))
    edges = {"nan": math.nan, "inf": math.inf, "max": 3.4e38, "small": 1e-44, "zero": 0.0}
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        write_scalars(writer, edges, 1)
    writer.close()
    assert not [w for w in record if "float32" in str(w.message)]
    scalars = {tag: v[1] for tag, v in read_scalars(tmp_path).items()}
    assert math.isnan(scalars["nan"]) and scalars["inf"] == math.inf and scalars["zero"] == 0.0
    assert math.isclose(scalars["max"], 3.4e38, rel_tol=1e-7) and scalars["small"] > 0


def test_the_hand_encoded_summary_is_the_protobuf_one() -> None:
    from tensorboard.compat.proto.summary_pb2 import Summary

    from param_monitor.writers import scalars_summary

    metrics = {"grad_norm/w": 6.0, "x" * 300: -1.5e-3, "weight_mean/ü": math.nan, "inf": -math.inf, "z": 0.0}
    expected = Summary(value=[Summary.Value(tag=t, simple_value=v) for t, v in metrics.items()])
    got = scalars_summary(metrics)
    assert got.SerializeToString() == expected.SerializeToString()
