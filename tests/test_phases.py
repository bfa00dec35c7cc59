"""The step's phases: a pure state machine, no torch, no Trainer."""

from __future__ import annotations

import pytest

from param_monitor.phases import Phase, Problem, StepMachine


# -- the state machine -------------------------------------------------------------------------
def test_a_whole_step_in_order_has_no_problem() -> None:
    m = StepMachine()
    assert m.batch_start(0, logging=True) == []
    assert m.phase is Phase.FORWARD and m.logs_now(0)
    assert m.before_backward() == [] and m.phase is Phase.BACKWARD
    assert m.after_backward() == [] and m.phase is Phase.GRADIENTS
    assert m.before_optimizer_step(0) == [] and m.first_of_step
    assert m.before_optimizer_step(0) == [] and not m.first_of_step  # a second optimizer, same step
    assert m.batch_end(accumulating=False) == []
    assert m.phase is Phase.IDLE and m.tracked_step is None


def test_accumulated_micro_batches_keep_the_step_tracked() -> None:
    m = StepMachine()
    for accumulating in (True, True, False):
        m.batch_start(4, logging=True)
        m.before_backward(), m.after_backward()
        if not accumulating:
            m.before_optimizer_step(4)
        assert m.batch_end(accumulating) == []
        assert m.logs_now(4) == accumulating  # tracking lasts until the stepping micro-batch ends
    assert m.unstepped_batches == 0


def test_manual_accumulation_is_remembered() -> None:
    m = StepMachine()
    m.batch_start(0, logging=False), m.before_backward(), m.after_backward()
    m.batch_end(accumulating=False)  # manual optimization: no step in this batch
    m.batch_start(1, logging=True)
    assert m.accumulated_before


@pytest.mark.parametrize(
    "calls, problem",
    [
        (["before_optimizer_step"], Problem.NO_BACKWARD),  # forward ran, the backward was never announced
        (["before_backward", "before_optimizer_step"], Problem.UNFINISHED_BACKWARD),
        (["before_backward", "after_backward", "batch_end"], Problem.NOT_STEPPED),
    ],
)
def test_a_missing_call_is_named(calls: list[str], problem: Problem) -> None:
    m = StepMachine()
    m.batch_start(0, logging=True)
    seen: list[Problem] = []
    for call in calls:
        args = {"before_optimizer_step": (0,), "batch_end": (False,)}.get(call, ())
        seen += getattr(m, call)(*args)
    assert seen == [problem]


def test_no_batch_start_is_named_even_off_schedule() -> None:
    assert StepMachine().before_optimizer_step(3) == [Problem.NO_BATCH_START]


def test_non_logging_steps_have_no_problems() -> None:
    m = StepMachine()
    m.batch_start(0, logging=False)
    assert m.before_optimizer_step(0) == [] and m.batch_end(False) == []
