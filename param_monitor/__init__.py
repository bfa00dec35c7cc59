"""param_monitor: watch weights, gradients and shared-parameter gradient contributions.

The Lightning callback is :class:`ParameterMonitor`; :class:`ParameterWatcher` is the
framework-free core for plain PyTorch loops.
"""

from param_monitor.callback import NonFiniteGradientError, ParameterMonitor
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
    "SharedUseTracker",
    "count_parameters",
    "format_markdown",
    "parameter_statistics",
    "parameter_table",
    "write_scalars",
]
