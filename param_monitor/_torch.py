"""The places where ``param_monitor``'s framework-free core reaches into torch internals.

Each helper says why it is needed and which public API would replace it. Lightning's own reaches
are in ``_lightning.py`` (which re-exports these for older imports).
"""

from __future__ import annotations

import torch
from torch import Tensor
from torch.amp.grad_scaler import OptState
from torch.optim import Optimizer


def inverse_scale(scaler: torch.amp.GradScaler) -> Tensor:
    """``1/scale`` as a device scalar, computed as ``GradScaler.unscale_`` does (float64 reciprocal).

    Why: ``GradScaler.get_scale()`` (the public API) copies the scale to the host, one device
    sync per logging step; ``_scale`` is the device tensor itself.
    """
    return scaler._scale.double().reciprocal().float()


def optimizer_unscaled(scaler: torch.amp.GradScaler, optimizer: Optimizer) -> bool:
    """Whether ``optimizer``'s gradients were unscaled already (``scaler.unscale_(optimizer)`` ran).

    Why: Lightning unscales before ``on_before_optimizer_step``, except for optimizers that unscale
    inside their own step (``Adam(fused=True)``): there the gradients are still scaled; a plain
    loop unscales when it clips. Public replacement: none (``GradScaler`` keeps the stage in
    ``_per_optimizer_states``).
    """
    state = scaler._per_optimizer_states.get(id(optimizer))
    return state is not None and state["stage"] is OptState.UNSCALED


def next_sequence_nr() -> int:
    """The number the next autograd node created on this thread will take (a probe node: ~5 us).

    Why: telling whether a loss was built before a point in the program (its ``grad_fn`` has a
    lower number). ``Node._sequence_nr()`` is public-ish (no underscore-free alternative).
    """
    probe = torch.zeros((), requires_grad=True)
    with torch.enable_grad():
        return probe.view_as(probe).grad_fn._sequence_nr() + 1  # type: ignore[union-attr]
