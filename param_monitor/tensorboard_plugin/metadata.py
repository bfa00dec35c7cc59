"""The PARAM MONITOR tab's own summary: the model's structure, written once per run.

TensorBoard enables a plugin for the runs holding data of its ``data_plugin_names()``; this summary
is that data, and it tells the tab what the scalars cannot: the parameters in the model's order,
their shapes, tied aliases and call sites, and which parameters are shared. It is one string tensor
holding JSON (``plugin_name="param_monitor"``), read back with :func:`parse_run_metadata`.

Framework-light: it needs a writer with ``_get_file_writer().add_summary`` (torch's
``SummaryWriter`` or tensorboardX's, what Lightning's ``TensorBoardLogger.experiment`` is).

>>> from param_monitor.table import ParameterInfo
>>> rows = [ParameterInfo("net.3.weight", (8, 8), 64, True, ("net.6.weight",), ("net.3", "net.6"))]
>>> meta = parse_run_metadata(run_metadata_summary(rows, {"net.3.weight": ["net.3", "net.6"]}).value[0].tensor)
>>> meta["parameters"][0]["aliases"], meta["shared"]
(['net.6.weight'], {'net.3.weight': ['net.3', 'net.6']})
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Mapping, Sequence
from typing import Any, Protocol

from tensorboard.compat.proto import summary_pb2, tensor_pb2, tensor_shape_pb2, types_pb2

from param_monitor.table import ParameterInfo
from param_monitor.tags import PLUGIN_NAME, RUN_METADATA_TAG

#: Bumped when the JSON changes incompatibly; the plugin reads the versions it knows.
METADATA_VERSION = 1


class _FileWriter(Protocol):
    def add_summary(self, summary: summary_pb2.Summary, global_step: int | None = None) -> None: ...


class SummaryWriterLike(Protocol):
    def _get_file_writer(self) -> _FileWriter: ...


def run_metadata(
    rows: Sequence[ParameterInfo], shared_sites: Mapping[str, Sequence[str]], status: Mapping[str, Any] | None = None
) -> dict[str, Any]:
    """The JSON-ready description of a run's model (rows in the model's registration order).

    ``status`` (from the monitor's core): ``steps_logged`` (0: no step logged yet), ``log_every_n_steps``
    and ``steps_run`` when written; the latest metadata of a run is the current one.
    """
    return {
        **(status or {}),
        "version": METADATA_VERSION,
        "parameters": [
            {
                "name": row.name,
                "shape": None if row.shape is None else list(row.shape),
                "numel": row.numel,
                "requires_grad": row.requires_grad,
                "aliases": list(row.aliases),
                "call_sites": list(row.call_sites),
            }
            for row in rows
        ],
        "shared": {name: list(sites) for name, sites in shared_sites.items()},
    }


def run_metadata_summary(
    rows: Sequence[ParameterInfo], shared_sites: Mapping[str, Sequence[str]], status: Mapping[str, Any] | None = None
) -> summary_pb2.Summary:
    """One ``Summary`` holding :func:`run_metadata` as a scalar string tensor of the plugin."""
    content = json.dumps(run_metadata(rows, shared_sites, status)).encode("utf-8")
    tensor = tensor_pb2.TensorProto(
        dtype=types_pb2.DT_STRING, string_val=[content], tensor_shape=tensor_shape_pb2.TensorShapeProto()
    )
    metadata = summary_pb2.SummaryMetadata(
        plugin_data=summary_pb2.SummaryMetadata.PluginData(plugin_name=PLUGIN_NAME, content=b"%d" % METADATA_VERSION),
        data_class=summary_pb2.DATA_CLASS_TENSOR,
        summary_description="param_monitor: the model's parameters, aliases and call sites",
    )
    return summary_pb2.Summary(
        value=[summary_pb2.Summary.Value(tag=RUN_METADATA_TAG, metadata=metadata, tensor=tensor)]
    )


def write_run_metadata(
    writer: SummaryWriterLike,
    rows: Sequence[ParameterInfo],
    shared_sites: Mapping[str, Sequence[str]],
    step: int,
    status: Mapping[str, Any] | None = None,
) -> None:
    """Write the run's model description (the monitor calls this with the parameter table)."""
    writer._get_file_writer().add_summary(run_metadata_summary(rows, shared_sites, status), global_step=step)


def parse_run_metadata(tensor: tensor_pb2.TensorProto | bytes | str) -> dict[str, Any]:
    """Decode what :func:`write_run_metadata` wrote (a ``TensorProto``, or its string's bytes)."""
    if isinstance(tensor, tensor_pb2.TensorProto):
        tensor = tensor.string_val[0]
    if isinstance(tensor, bytes):
        tensor = tensor.decode("utf-8")
    return json.loads(tensor)


def model_order(names: Iterable[str], parameters: Sequence[str]) -> list[str]:
    """``names`` (tag suffixes) in the model's order: a parameter's own position, or, for a module
    name (``aggregate_depth``), the position of its first parameter; unknown names last, sorted.

    >>> model_order(["b", "net.1", "z", "net.0.weight"], ["net.0.weight", "net.1.weight", "b"])
    ['net.0.weight', 'net.1', 'b', 'z']
    """
    position = {name: i for i, name in enumerate(parameters)}

    def key(name: str) -> tuple[int, str]:
        if name in position:
            return position[name], name
        prefix = name + "."
        first = next((i for i, p in enumerate(parameters) if p.startswith(prefix)), len(parameters))
        return first, name

    return sorted(names, key=key)
