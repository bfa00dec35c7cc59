"""The tag schema and the registry of metric families, in one place.

Every name the monitor writes is built here, and every family of scalars it writes is declared
once in :data:`FAMILIES`: its prefix, what follows the prefix, how a multi-process run combines
it, the chart that shows it, the axis it is read on, the option that turns it on and what it
means. The statistics, the custom-scalars layout, the PARAM MONITOR tab (through its
``/families`` route), the static report and the docs' tag table read this registry, so adding
a statistic means its partial sums plus one entry here.

>>> weight_mean("net.3.weight"), shared_grad_share("net.3.weight", "net.6")
('weight_mean/net.3.weight', 'shared_grad_share/net.3.weight/net.6')
>>> split_shared("shared_grad/net.3.weight/net.6")
('net.3.weight', 'net.6')
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

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
ACTIVATION_MEAN = "activation_mean"
ACTIVATION_STD = "activation_std"
ACTIVATION_ZERO_FRAC = "activation_zero_frac"
OPTIMIZER_STATE_NORM = "optimizer_state_norm"
WEIGHT_HIST = "weight_hist"
GRAD_HIST = "grad_hist"
#: TensorBoard text: the parameter table, and the record of where non-finite gradients first appeared.
SUMMARY_TAG = "param_monitor/parameters"
NONFINITE_TAG = "param_monitor/nonfinite"
#: TensorBoard text: the first steps whose grad_norm_total or training loss spiked (``detect_spikes=True``).
SPIKES_TAG = "param_monitor/spikes"

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


def activation_mean(site: str) -> str:
    return f"{ACTIVATION_MEAN}/{site}"


def activation_std(site: str) -> str:
    return f"{ACTIVATION_STD}/{site}"


def activation_zero_frac(site: str) -> str:
    return f"{ACTIVATION_ZERO_FRAC}/{site}"


def optimizer_state_norm(name: str, state: str) -> str:
    return f"{OPTIMIZER_STATE_NORM}/{name}/{state}"


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


# -- the registry of metric families ----------------------------------------------------------
#: what follows a family's prefix in its tags
KEYS = ("", "name", "name/site", "site", "name/state", "optimizer")
#: how a multi-process run combines a family (always from additive partial sums, see stats.py)
REDUCTIONS = ("sqrt_sum_sq", "sum_over_numel", "ratio_of_sums", "per_use", "rank0")
#: the tab's and the report's view of a family
CHARTS = ("heatmap", "stack", "lines", "scalar")


@dataclass(frozen=True)
class MetricFamily:
    """One family of scalars: ``{name}/{key}`` tags (just ``{name}`` when ``key`` is empty).

    >>> family("grad_norm").tag("net.3.weight"), family("grad_norm").scale
    ('grad_norm/net.3.weight', 'log')
    >>> family_of("shared_grad_share/net.3.weight/net.6").name
    'shared_grad_share'
    """

    name: str
    key: str  # one of KEYS
    reduction: str  # one of REDUCTIONS
    chart: str  # one of CHARTS
    scale: str  # the default axis: "log" or "linear"
    option: str | None  # the ParameterMonitor argument that turns it on (None: always on)
    meaning: str  # one line, as the docs' tag table says it
    gradient: bool = False  # derived from gradients: dropped together when a step's gradients are unusable

    def tag(self, *parts: str) -> str:
        return "/".join((self.name, *parts))

    def to_json(self) -> dict[str, object]:
        return asdict(self)


FAMILIES: tuple[MetricFamily, ...] = (
    MetricFamily(WEIGHT_MEAN, "name", "sum_over_numel", "heatmap", "linear", None,
                 "mean of the parameter's values"),
    MetricFamily(WEIGHT_NORM, "name", "sqrt_sum_sq", "heatmap", "log", None,
                 "L2 norm of the values"),
    MetricFamily(GRAD_NORM, "name", "sqrt_sum_sq", "heatmap", "log", None,
                 "L2 norm of the gradient the optimizer steps on (unscaled, fully accumulated, before clipping)",
                 gradient=True),
    MetricFamily(GRAD_NORM_TOTAL, "optimizer", "sqrt_sum_sq", "scalar", "log", None,
                 "L2 norm over all unique monitored parameters (tied tensors once); "
                 "`grad_norm_total/optimizer_{i}` per optimizer when there are several", gradient=True),
    MetricFamily(SHARED_GRAD, "name/site", "per_use", "stack", "log", "track_shared",
                 "L2 norm of the contribution of ONE use of a shared parameter", gradient=True),
    MetricFamily(SHARED_GRAD_SHARE, "name/site", "per_use", "stack", "linear", "track_shared",
                 "that use's share <c_site, S>/||S||^2 of the gradient S: the shares add up to 1, "
                 "negative for a use pulling against the others", gradient=True),
    MetricFamily(SHARED_GRAD_ERROR, "name", "per_use", "lines", "log", "track_shared",
                 "||sum of the uses - grad|| / ||grad||: about 1e-7 when every use is seen", gradient=True),
    MetricFamily(SHARED_GRAD_COSINE, "name", "per_use", "lines", "linear", "track_shared",
                 "mean pairwise cosine between the uses' contributions (two uses or more)", gradient=True),
    MetricFamily(UPDATE_RATIO, "name", "ratio_of_sums", "heatmap", "log", "log_update_ratio",
                 "||w_after - w_before|| / ||w_before|| of the logging step's optimizer step (rule of thumb: 1e-3)"),
    MetricFamily(DEAD_UNITS, "name", "ratio_of_sums", "heatmap", "linear", "log_dead_units",
                 "Linear/Conv weights: fraction of output units whose gradient row is exactly zero on this batch",
                 gradient=True),
    MetricFamily(ACTIVATION_MEAN, "site", "sum_over_numel", "heatmap", "linear", "log_activations",
                 "mean of every element of the step's outputs of one leaf-module call (all micro-batches)"),
    MetricFamily(ACTIVATION_STD, "site", "sum_over_numel", "heatmap", "log", "log_activations",
                 "population standard deviation of those elements (from float64 sums of x and x^2)"),
    MetricFamily(ACTIVATION_ZERO_FRAC, "site", "ratio_of_sums", "heatmap", "linear", "log_activations",
                 "fraction of those elements exactly zero (a ReLU unit that nothing activates shows here first)"),
    MetricFamily(OPTIMIZER_STATE_NORM, "name/state", "sqrt_sum_sq", "lines", "log", "log_optimizer_state",
                 "L2 norm of one tensor the optimizer keeps for the parameter (exp_avg, exp_avg_sq, "
                 "momentum_buffer, ...), after the logging step's optimizer step"),
)

_BY_NAME = {f.name: f for f in FAMILIES}


def register(new: MetricFamily) -> MetricFamily:
    """Add a family (an opt-in statistic's module declares its own); names are unique."""
    global FAMILIES
    if new.name in _BY_NAME:
        raise ValueError(f"metric family {new.name!r} is already registered")
    checks = ((new.key, KEYS), (new.reduction, REDUCTIONS), (new.chart, CHARTS), (new.scale, ("log", "linear")))
    for value, allowed in checks:
        if value not in allowed:
            raise ValueError(f"{new.name}: {value!r} is not one of {allowed}")
    FAMILIES = (*FAMILIES, new)
    _BY_NAME[new.name] = new
    return new


def family(name: str) -> MetricFamily:
    """The family registered as ``name`` (a KeyError names the registered ones)."""
    try:
        return _BY_NAME[name]
    except KeyError:
        raise KeyError(f"no metric family {name!r}; registered: {', '.join(_BY_NAME)}") from None


def family_of(tag: str) -> MetricFamily | None:
    """The family a scalar tag belongs to (``None`` for other tags). ``grad_norm_total`` is not ``grad_norm``."""
    head = tag.split("/", 1)[0]
    return _BY_NAME.get(head)
