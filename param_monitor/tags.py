"""The tag schema, in one place: every name the monitor writes is built here.

The callback, the TensorBoard layout, the PARAM MONITOR tab and the static report all use these
functions, so a renamed tag is renamed everywhere (see the README's tag table).

>>> weight_mean("net.3.weight"), shared_grad_share("net.3.weight", "net.6")
('weight_mean/net.3.weight', 'shared_grad_share/net.3.weight/net.6')
>>> split_shared("shared_grad/net.3.weight/net.6")
('net.3.weight', 'net.6')
"""

from __future__ import annotations

WEIGHT_MEAN = "weight_mean"
WEIGHT_NORM = "weight_norm"
GRAD_NORM = "grad_norm"
GRAD_NORM_TOTAL = "grad_norm_total"
SHARED_GRAD = "shared_grad"
SHARED_GRAD_SHARE = "shared_grad_share"
SHARED_GRAD_ERROR = "shared_grad_error"
SHARED_GRAD_COSINE = "shared_grad_cosine"
UPDATE_RATIO = "update_ratio"
DEAD_UNITS = "dead_units"
WEIGHT_HIST = "weight_hist"
GRAD_HIST = "grad_hist"
#: TensorBoard text: the parameter table, and the record of where non-finite gradients first appeared.
SUMMARY_TAG = "param_monitor/parameters"
NONFINITE_TAG = "param_monitor/nonfinite"

#: Every tag whose value derives from gradients (dropped together when a step's gradients are unusable).
GRADIENT_PREFIXES = (GRAD_NORM, SHARED_GRAD)  # also covers grad_norm_total and shared_grad_*


def weight_mean(name: str) -> str:
    return f"{WEIGHT_MEAN}/{name}"


def weight_norm(name: str) -> str:
    return f"{WEIGHT_NORM}/{name}"


def grad_norm(name: str) -> str:
    return f"{GRAD_NORM}/{name}"


def grad_norm_total(optimizer_index: int | None = None) -> str:
    return GRAD_NORM_TOTAL if optimizer_index is None else f"{GRAD_NORM_TOTAL}/optimizer_{optimizer_index}"


def shared_grad(name: str, site: str) -> str:
    return f"{SHARED_GRAD}/{name}/{site}"


def shared_grad_share(name: str, site: str) -> str:
    return f"{SHARED_GRAD_SHARE}/{name}/{site}"


def shared_grad_error(name: str) -> str:
    return f"{SHARED_GRAD_ERROR}/{name}"


def shared_grad_cosine(name: str) -> str:
    return f"{SHARED_GRAD_COSINE}/{name}"


def update_ratio(name: str) -> str:
    return f"{UPDATE_RATIO}/{name}"


def dead_units(name: str) -> str:
    return f"{DEAD_UNITS}/{name}"


def weight_hist(name: str) -> str:
    return f"{WEIGHT_HIST}/{name}"


def grad_hist(name: str) -> str:
    return f"{GRAD_HIST}/{name}"


def split_shared(tag: str) -> tuple[str, str]:
    """``(parameter name, site)`` of a ``shared_grad/`` or ``shared_grad_share/`` tag.

    Parameter names hold no ``/`` (module paths use dots), so the first ``/`` after the prefix
    ends the name; a site may hold any character.
    """
    _, _, rest = tag.partition("/")
    name, _, site = rest.partition("/")
    return name, site


#: The PARAM MONITOR tab (``param_monitor.tensorboard_plugin``): its plugin name, and the tag of the
#: one summary per run that describes the model (parameters in order, aliases, call sites).
PLUGIN_NAME = "param_monitor"
RUN_METADATA_TAG = "param_monitor/run_metadata"
