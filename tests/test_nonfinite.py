"""Where NaN/inf gradients first appeared: the monitor's own record, in the warning and as TensorBoard text."""

from __future__ import annotations

import math
import warnings
from pathlib import Path

import pytest

from param_monitor import NonFiniteGradientError, ParameterMonitor
from param_monitor.tags import NONFINITE_TAG
from tests.helpers.events import read_texts
from tests.helpers.modules import SharedMLP, fit


def nonfinite_warnings(record: list[warnings.WarningMessage]) -> list[str]:
    return [str(w.message) for w in record if "non-finite" in str(w.message)]


def fit_recording(module: SharedMLP, tmp_path: Path, monitor: ParameterMonitor, **kwargs: object) -> tuple:
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        trainer, scalars = fit(module, tmp_path, monitor, **kwargs)
    return trainer, scalars, nonfinite_warnings(record)


def test_nan_between_logging_steps_names_its_step_and_first_layers(tmp_path: Path) -> None:
    module = SharedMLP()
    module.poison_grads = {1: ["net.3.bias", "net.9.weight"]}  # net.3.bias comes first in model order
    monitor = ParameterMonitor(log_every_n_steps=4, check_finite_every_step=True)
    trainer, scalars, messages = fit_recording(module, tmp_path, monitor, max_steps=4)
    assert len(messages) == 1
    assert "at step 1" in messages[0] and "net.3.bias, net.9.weight" in messages[0]
    assert "not logged" in messages[0] and "logged as they are" not in messages[0]
    assert all(math.isfinite(v) for v in scalars["grad_norm/net.3.bias"].values())  # step 3 is clean
    texts = read_texts(trainer.logger.log_dir, NONFINITE_TAG)
    assert len(texts) == 1
    step, text = texts[0]
    assert step == 1 and "| first step | 1 |" in text and "| first layers | net.3.bias, net.9.weight |" in text
    assert "| values logged | no |" in text


def test_nan_on_a_logging_step_is_logged_as_it_is(tmp_path: Path) -> None:
    module = SharedMLP()
    module.poison_grads = {1: ["net.9.weight"]}
    trainer, scalars, messages = fit_recording(module, tmp_path, ParameterMonitor(), max_steps=3)
    assert len(messages) == 1 and "at step 1" in messages[0] and "logged as they are" in messages[0]
    assert math.isnan(scalars["grad_norm/net.9.weight"][1])
    (step, text), *more = read_texts(trainer.logger.log_dir, NONFINITE_TAG)
    assert not more and step == 1 and "| values logged | yes |" in text


def test_later_logging_step_names_its_own_layers(tmp_path: Path) -> None:
    module = SharedMLP()
    module.poison_grads = {1: ["net.9.weight"], 3: ["net.1.bias"], 4: ["net.1.bias"]}
    _, _, messages = fit_recording(module, tmp_path, ParameterMonitor(), max_steps=5)
    assert len(messages) == 2  # step 4 repeats step 3's layers: not warned again
    assert "at step 1" in messages[0] and "net.9.weight" in messages[0]
    assert "at step 3" in messages[1] and "net.1.bias" in messages[1] and "net.9.weight" not in messages[1]


def test_nan_after_the_last_logging_step_is_reported_at_the_end(tmp_path: Path) -> None:
    module = SharedMLP()
    module.poison_grads = {5: ["net.1.weight"]}
    monitor = ParameterMonitor(log_every_n_steps=4, check_finite_every_step=True)
    trainer, _, messages = fit_recording(module, tmp_path, monitor, max_steps=6)
    assert len(messages) == 1 and "at step 5" in messages[0] and "net.1.weight" in messages[0]
    assert [s for s, _ in read_texts(trainer.logger.log_dir, NONFINITE_TAG)] == [5]


def test_raise_names_the_first_step_and_layer(tmp_path: Path) -> None:
    module = SharedMLP()
    module.poison_grads = {2: ["net.9.bias"]}
    monitor = ParameterMonitor(log_every_n_steps=4, check_finite_every_step=True, raise_on_nonfinite=True)
    with pytest.raises(NonFiniteGradientError, match=r"step 2.*net\.9\.bias"):
        fit(module, tmp_path, monitor, max_steps=4)


def test_record_grows_and_survives_a_changed_parameter_list() -> None:
    import torch

    from param_monitor.nonfinite import NonFinitePolicy

    a, b = torch.nn.Parameter(torch.ones(2)), torch.nn.Parameter(torch.ones(2))
    policy = NonFinitePolicy()
    a.grad, b.grad = torch.ones(2), torch.ones(2)
    for step in range(20):  # more clean steps than the record's first size
        policy.check_step([("a", a), ("b", b)], step)
    b.grad = torch.tensor([float("inf"), 0.0])
    policy.check_step([("a", a), ("b", b)], 20)
    a.grad = torch.tensor([float("nan"), 0.0])
    policy.check_step([("a", a), ("b", b)], 21)  # later: does not change the first record
    policy.check_step([("a", a)], 22)  # a new parameter list (b pruned away): a second record
    report = policy.read_record(policy.device_record().tolist())
    assert (report.step, report.layers, report.logged, report.first) == (20, ["b"], False, True)
    assert not policy.pending
    # the same layers again: nothing new to name; a new layer: named
    assert policy.from_metrics({"grad_norm/b": float("nan")}, 30) is None
    later = policy.from_metrics({"grad_norm/a": float("nan"), "grad_norm/b": 1.0}, 31)
    assert later is not None and (later.step, later.layers, later.first) == (31, ["a"], False)
