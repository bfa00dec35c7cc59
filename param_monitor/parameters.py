"""Which parameters a module has: unique tensors, their tied aliases, their owning modules.

>>> import torch.nn as nn
>>> shared = nn.Linear(2, 2, bias=False)
>>> parameter_aliases(nn.Sequential(shared, nn.ReLU(), shared))
{'0.weight': ('2.weight',)}
"""

from __future__ import annotations

import torch.nn as nn


def parameter_aliases(module: nn.Module) -> dict[str, tuple[str, ...]]:
    """Map each unique parameter's first name to the other names it is registered under."""
    names_by_id: dict[int, list[str]] = {}
    for name, param in module.named_parameters(remove_duplicate=False):
        names_by_id.setdefault(id(param), []).append(name)
    return {names[0]: tuple(names[1:]) for names in names_by_id.values()}


def parameter_signature(module: nn.Module) -> tuple[tuple[str, int], ...]:
    """(name, id) of every registered parameter: changes when a parameter is added, renamed or replaced."""
    return tuple((name, id(p)) for name, p in module.named_parameters(remove_duplicate=False))
