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
import re
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


def natural_key(name: str) -> tuple[tuple[int, int | str], ...]:
    """A module-path order for names the metadata does not list: numbers as numbers (``2`` before
    ``10``), and within one module its ``weight`` before its ``bias`` (as ``nn.Linear`` registers them).

    >>> sorted(["10.weight", "2.bias", "2.weight", "2.running_mean"], key=natural_key)
    ['2.weight', '2.bias', '2.running_mean', '10.weight']
    """
    *path, last = name.split(".")
    rank = {"weight": (0, 0), "bias": (0, 1)}.get(last, (1, last))
    return (*((0, int(c)) if c.isdigit() else (1, c) for c in path), (2, 0), rank)  # type: ignore[return-value]


def model_order(names: Iterable[str], parameters: Sequence[str]) -> list[str]:
    """``names`` (tag suffixes) in the model's order: a parameter's own position, or, for a module
    name (``aggregate_depth``), the position of its first parameter; names the model does not list
    last, in :func:`natural_key` order (all of them when there is no metadata: a plain loop's run).

    >>> model_order(["b", "net.1", "z", "net.0.weight"], ["net.0.weight", "net.1.weight", "b"])
    ['net.0.weight', 'net.1', 'b', 'z']
    >>> model_order(["0.bias", "0.weight", "10.weight", "2.weight"], [])
    ['0.weight', '0.bias', '2.weight', '10.weight']
    """
    position = {name: i for i, name in enumerate(parameters)}

    def key(name: str) -> tuple[int, Any]:
        if name in position:
            return position[name], ()
        prefix = name + "."
        first = next((i for i, p in enumerate(parameters) if p.startswith(prefix)), len(parameters))
        return first, natural_key(name)

    return sorted(names, key=key)


def _owner(name: str) -> str:
    """The module holding a parameter: its name without the last component."""
    return name.rpartition(".")[0]


def _common_module(a: str, b: str) -> str:
    """The longest common module path of ``a`` and ``b``, component by component (``layer.1`` is not ``layer.10``)."""
    common = []
    for x, y in zip(a.split("."), b.split("."), strict=False):
        if x != y:
            break
        common.append(x)
    return ".".join(common)


def use_signature(name: str, sites: Sequence[str]) -> tuple[str, ...]:
    """How a tensor's uses relate to its own module: ``#3`` for a module's fourth call, the site itself
    for a use from another module (a tied alias, a Sequential holding one module at two positions).

    >>> use_signature("layer.q.weight", ["layer.q#0", "layer.q#1"])
    ('#0', '#1')
    >>> use_signature("net.3.weight", ["net.3", "net.6"])
    ('', 'net.6')
    """
    owner = _owner(name)
    own = (f"{owner}#", f"{owner}:")
    return tuple(s[len(owner) :] if owner and (s == owner or s.startswith(own)) else s for s in sites)


def shared_groups(shared: Mapping[str, Sequence[str]], parameters: Sequence[str]) -> list[dict[str, Any]]:
    """Shared tensors grouped by the module that is shared, in model order.

    A group is a run of shared tensors next to each other in model order (no unshared parameter of
    the model between them) whose uses relate to their modules alike (:func:`use_signature`) and
    that sit under one module. ALBERT's layer called 12 times is one group of its 16-17 tensors; a
    tied embedding is a group of one. Each group: ``name`` (the module), ``tensors``, ``uses``
    (labels of the uses in call order, from the first tensor's sites), ``sites`` per tensor.

    >>> groups = shared_groups({"e.weight": ["e", "head"], "b.f.weight": ["b.f#0", "b.f#1"],
    ...     "b.f.bias": ["b.f#0", "b.f#1"], "b.g.weight": ["b.g#0", "b.g#1"]},
    ...     ["e.weight", "b.f.weight", "b.f.bias", "b.g.weight"])
    >>> [(g["name"], g["tensors"], g["uses"]) for g in groups]
    [('e', ['e.weight'], ['e', 'head']), ('b', ['b.f.weight', 'b.f.bias', 'b.g.weight'], ['call 0', 'call 1'])]
    """
    order = model_order(list(shared), parameters)
    position = {p: i for i, p in enumerate(parameters)}
    groups: list[dict[str, Any]] = []
    for name in order:
        sig = use_signature(name, shared[name])
        last = groups[-1] if groups else None
        if last is not None and _joins(last, name, sig, position):
            last["tensors"].append(name)
            last["name"] = _common_module(last["name"], _owner(name))
        else:
            groups.append({"name": _owner(name) or name, "signature": sig, "tensors": [name], "last": name})
        groups[-1]["last"] = name
    for group in groups:
        sig = group.pop("signature")
        del group["last"]
        first = group["tensors"][0]
        repeated = all(s.startswith("#") for s in sig)
        group["uses"] = [f"call {s[1:]}" for s in sig] if repeated else list(shared[first])
        group["sites"] = {t: list(shared[t]) for t in group["tensors"]}
    return groups


def _joins(group: dict[str, Any], name: str, sig: tuple[str, ...], position: Mapping[str, int]) -> bool:
    if sig != group["signature"] or not _common_module(group["name"], _owner(name)):
        return False
    a, b = position.get(group["last"]), position.get(name)
    return a is None or b is None or b == a + 1  # no unshared parameter between them


def row_order(names: Iterable[str], parameters: Sequence[str]) -> list[str]:
    """Heatmap rows in model order; per-site rows (``layer#3``, ``head:1``) after their module's
    position, calls in call order (``#2`` before ``#10``).

    >>> row_order(["b#10", "b#2", "a.weight", "b"], ["a.weight", "b.weight"])
    ['a.weight', 'b', 'b#2', 'b#10']
    """
    by_module = model_order({_site_module(n) for n in names}, parameters)
    rank = {m: i for i, m in enumerate(by_module)}
    return sorted(names, key=lambda n: (rank[_site_module(n)], _site_index(n), n))


def _site_module(site: str) -> str:
    return re.split(r"[#:]\d+$", site, maxsplit=1)[0]


def _site_index(site: str) -> int:
    match = re.search(r"[#:](\d+)$", site)
    return -1 if match is None else int(match.group(1))
