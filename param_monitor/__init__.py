"""param_monitor: watch weights, gradients and shared-parameter gradient contributions.

The Lightning callback is :class:`ParameterMonitor`; :class:`PlainMonitor` is the same logging step
for a hand-written PyTorch loop (``param_monitor.core`` is their common, framework-free core);
:class:`ParameterWatcher` computes one model's statistics.
"""

from param_monitor.callback import NonFiniteGradientError, ParameterMonitor
from param_monitor.plain import PlainMonitor
from param_monitor.sharing import SharedUseTracker
from param_monitor.stats import parameter_statistics
from param_monitor.table import ParameterInfo, count_parameters, format_markdown, parameter_table
from param_monitor.watcher import ParameterWatcher
from param_monitor.writers import write_scalars

__all__ = [
    "NonFiniteGradientError",
    "ParameterInfo",
    "ParameterMonitor",
    "ParameterWatcher",
    "PlainMonitor",
    "SharedUseTracker",
    "count_parameters",
    "format_markdown",
    "parameter_statistics",
    "parameter_table",
    "write_scalars",
]
