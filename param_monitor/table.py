"""The parameter table: one row per unique parameter, with its tied aliases and call sites.

Used by the textbook's exercise 1 (``experiments/param_table.py``) and by the monitor's text
summary. Tied parameters (one tensor registered under several names) appear once, under their
first name, with the other names listed as aliases.

>>> import torch.nn as nn
>>> shared = nn.Linear(2, 2, bias=False)
>>> net = nn.Sequential(nn.Linear(3, 2), shared, nn.ReLU(), shared)
>>> for row in parameter_table(net):
...     print(row.name, row.shape, row.numel, row.aliases)
0.weight (2, 3) 6 ()
0.bias (2,) 2 ()
1.weight (2, 2) 4 ('3.weight',)
>>> count_parameters(net)
12
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import torch.nn as nn
from torch.nn.parameter import UninitializedParameter

from param_monitor.parameters import parameter_aliases


@dataclass(frozen=True)
class ParameterInfo:
    """One unique parameter. ``shape`` is ``None`` while a lazy parameter is uninitialized."""

    name: str
    shape: tuple[int, ...] | None
    numel: int
    requires_grad: bool
    aliases: tuple[str, ...] = ()
    call_sites: tuple[str, ...] = ()


def parameter_table(
    module: nn.Module, call_sites: Mapping[str, Sequence[str]] | None = None
) -> list[ParameterInfo]:
    """Rows for every unique parameter of ``module`` in registration order.

    ``call_sites`` maps a parameter name to the module paths that used it in one forward pass
    (as recorded by :class:`param_monitor.sharing.SharedUseTracker`); it is optional.
    """
    aliases = parameter_aliases(module)
    sites = call_sites or {}
    rows = []
    for name, param in module.named_parameters():  # first names: a tied tensor once
        lazy = isinstance(param, UninitializedParameter)
        rows.append(
            ParameterInfo(
                name=name,
                shape=None if lazy else tuple(param.shape),
                numel=0 if lazy else param.numel(),
                requires_grad=param.requires_grad,
                aliases=aliases.get(name, ()),
                call_sites=tuple(sites.get(name, ())),
            )
        )
    return rows


def count_parameters(module: nn.Module) -> int:
    """Number of scalar values in the unique, materialized parameters (tied tensors counted once)."""
    return sum(row.numel for row in parameter_table(module))


def format_markdown(rows: Sequence[ParameterInfo]) -> str:
    """A markdown table (renders as an HTML table in TensorBoard's Text page).

    >>> import torch.nn as nn
    >>> print(format_markdown(parameter_table(nn.Linear(2, 1))))
    | name | shape | numel | requires_grad | tied aliases | call sites |
    | --- | --- | ---: | --- | --- | --- |
    | weight | 1×2 | 2 | True | – | – |
    | bias | 1 | 1 | True | – | – |
    | **total (unique)** | | **3** | | | |
    """
    lines = [
        "| name | shape | numel | requires_grad | tied aliases | call sites |",
        "| --- | --- | ---: | --- | --- | --- |",
    ]
    for row in rows:
        shape = "uninitialized" if row.shape is None else "×".join(map(str, row.shape)) or "scalar"
        lines.append(
            f"| {row.name} | {shape} | {row.numel} | {row.requires_grad} | "
            f"{', '.join(row.aliases) or '–'} | {', '.join(row.call_sites) or '–'} |"
        )
    lines.append(f"| **total (unique)** | | **{sum(r.numel for r in rows)}** | | | |")
    return "\n".join(lines)
