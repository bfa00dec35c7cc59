"""The monitor's options, checked once: every error names the allowed values.

>>> MonitorConfig(include=["net.*"], aggregate_depth=2).aggregate_depth
2
>>> MonitorConfig(include={"net.*": 1})
Traceback (most recent call last):
...
ValueError: `include` must be a list of glob patterns (a list or tuple of str) or None, got dict {'net.*': 1}.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass
class MonitorConfig:
    """The monitor's options (see ``ParameterMonitor``'s docstring); checked on construction (``ValueError``)."""

    log_every_n_steps: int | None = None
    track_shared: bool = True
    histogram_every_n_steps: int = 0
    log_summary: bool = True
    check_finite_every_step: bool = False
    raise_on_nonfinite: bool = False
    include: list[str] | None = None
    exclude: list[str] | None = None
    aggregate_depth: int | None = None
    log_update_ratio: bool = False
    log_dead_units: bool = False
    # under `torch.compile`, run the tracked batches eagerly so that shared parameters' uses can be told apart
    eager_logging_steps: bool = True

    def __post_init__(self) -> None:
        _check_int("log_every_n_steps", self.log_every_n_steps, 1, "a positive int or None (the Trainer's)")
        _check_int("histogram_every_n_steps", self.histogram_every_n_steps, 0, "an int >= 0 (0 disables)", False)
        _check_int("aggregate_depth", self.aggregate_depth, 1, "a positive int or None (per tensor)")
        for arg in ("track_shared", "log_summary", "check_finite_every_step", "raise_on_nonfinite"):
            _check_bool(arg, getattr(self, arg))
        _check_bool("log_update_ratio", self.log_update_ratio)
        _check_bool("log_dead_units", self.log_dead_units)
        _check_bool("eager_logging_steps", self.eager_logging_steps)
        self.include = _patterns("include", self.include)
        self.exclude = _patterns("exclude", self.exclude)


def _check_bool(arg: str, value: object) -> None:
    if not isinstance(value, bool):
        raise ValueError(f"`{arg}` must be True or False, got {value!r}.")


def _check_int(arg: str, value: object, minimum: int, allowed: str, optional: bool = True) -> None:
    if value is None and optional:
        return
    # bool is an int subclass: `log_every_n_steps=True` would silently mean 1
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ValueError(f"`{arg}` must be {allowed}, got {value!r}.")


def _patterns(arg: str, value: object) -> list[str] | None:
    """A list or tuple of str (glob patterns); a str, a dict, a set are refused with what is allowed."""
    if value is None:
        return None
    if isinstance(value, str):
        raise ValueError(f"`{arg}` must be a list of glob patterns, not a string: use [{value!r}].")
    if not isinstance(value, list | tuple):
        kind = type(value).__name__
        allowed = "a list of glob patterns (a list or tuple of str) or None"
        raise ValueError(f"`{arg}` must be {allowed}, got {kind} {value!r}.")
    wrong = [p for p in value if not isinstance(p, str)]
    if wrong:
        raise ValueError(f"`{arg}` must be a list of glob patterns (str), got {value!r}: {wrong[0]!r} is not a str.")
    return list(value)

