"""Every place where the framework-free core reaches into torch internals (no Lightning here).

The Lightning callback's reaches live in ``_lightning.py``; these are the torch ones the core
itself needs. Each helper says why it is needed and which public API would replace it, and
``tests/test_fsdp.py`` fails loudly (not with a silently switched-off feature) if torch renames
what it reads.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import torch.nn as nn

try:  # FSDP2 (`fully_shard`), public since torch 2.6
    from torch.distributed.fsdp import FSDPModule
except ImportError:  # pragma: no cover - builds without distributed support
    FSDPModule = None  # type: ignore[assignment,misc]


def is_fsdp_module(module: nn.Module) -> bool:
    return FSDPModule is not None and isinstance(module, FSDPModule)


def fsdp_params(root: nn.Module) -> Iterator[Any]:
    """Every ``FSDPParam`` (FSDP2's record of one sharded parameter) under ``root``.

    Why: the monitor must know which plain tensor stands for each registered (sharded) parameter
    in the autograd graph (see :func:`fsdp_unsharded_leaves`). ``_get_fsdp_state()``,
    ``_fsdp_param_groups`` and ``fsdp_params`` are private to FSDP2 (``_fsdp_state.py``,
    ``_fsdp_param_group.py``). Public replacement: none (an ``FSDPModule.unsharded_parameters()``
    would do).
    """
    for module in root.modules():
        if is_fsdp_module(module):
            for group in module._get_fsdp_state()._fsdp_param_groups:
                yield from group.fsdp_params


def fsdp_unsharded_leaves(root: nn.Module) -> dict[int, nn.Parameter]:
    """``{id(unsharded parameter): registered (sharded) parameter}`` for the FSDP2 parameters under ``root``.

    Why: before each module runs, FSDP2 swaps ``FSDPParam.unsharded_param`` (a plain Parameter
    over the all-gathered data, the same object at every all-gather) into the module's slot, so
    every use of a sharded parameter is an edge into THAT tensor's ``AccumulateGrad``, not into
    the registered DTensor's; FSDP's post-backward then reduce-scatters its ``.grad`` into the
    registered parameter's. ``_unsharded_param`` exists only after the first all-gather (read
    after a forward pass). Public replacement: none.
    """
    out: dict[int, nn.Parameter] = {}
    for fsdp_param in fsdp_params(root):
        unsharded = fsdp_unsharded_param(fsdp_param)
        if unsharded is not None:
            out[id(unsharded)] = fsdp_param.sharded_param
    return out


def fsdp_unsharded_param(fsdp_param: Any) -> nn.Parameter | None:
    """The unsharded parameter of one ``FSDPParam`` (see :func:`fsdp_unsharded_leaves`); ``None`` before
    the first all-gather. ``_unsharded_param`` is private (``_fsdp_param.py``). Public replacement: none."""
    return getattr(fsdp_param, "_unsharded_param", None)
