"""The phases of one training step, as a pure state machine: no torch, no Lightning, no I/O.

Every training loop, Lightning's or a hand-written one, walks one batch through the same events:
the batch starts, one or more backward passes run, each optimizer steps, the batch ends. The
monitor's core (:mod:`param_monitor.core`) feeds those events to a :class:`StepMachine`, which
keeps the few facts the logging step depends on (which step is being tracked, whether its
once-per-step work is done, whether earlier batches left gradients behind) and names every
event that arrives out of order as a :class:`Problem`: a call the capture needed did not happen.
The Lightning callback never causes one (Lightning calls the hooks in order); the plain-PyTorch
API turns them into warnings, so that a forgotten call cannot lose data silently.

>>> m = StepMachine()
>>> m.batch_start(step=0, logging=True)
[]
>>> m.before_backward(), m.after_backward()
([], [])
>>> m.before_optimizer_step(step=0)
[]
>>> m.phase, m.first_of_step, m.logs_now(0)
(<Phase.STEPPING: 'stepping'>, True, True)
>>> m.batch_end(accumulating=False)
[]
>>> m.phase, m.tracked_step
(<Phase.IDLE: 'idle'>, None)

A step whose backward was never announced:

>>> m.batch_start(step=1, logging=True)
[]
>>> m.before_optimizer_step(step=1)
[<Problem.NO_BACKWARD: 'no backward pass was announced before the optimizer step'>]
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import Enum


class Phase(Enum):
    IDLE = "idle"  # between batches
    FORWARD = "forward"  # a batch started: its forward pass may run
    BACKWARD = "backward"  # inside a backward pass (announced, not finished)
    GRADIENTS = "gradients"  # a backward pass finished: the gradients are ready
    STEPPING = "stepping"  # an optimizer's statistics are taken, its step under way


class Problem(Enum):
    """An event that arrived in a phase where the capture cannot have seen what it needs."""

    NO_BATCH_START = "the step's forward/backward ran before the batch start was announced"
    NO_BACKWARD = "no backward pass was announced before the optimizer step"
    UNFINISHED_BACKWARD = "a backward pass was announced but its end was not"
    NOT_STEPPED = "a logging batch ended without an optimizer step"


# (phase, event) -> next phase; a pair not listed is a Problem (see StepMachine._go)
_NEXT: dict[tuple[Phase, str], Phase] = {
    (Phase.IDLE, "batch_start"): Phase.FORWARD,
    (Phase.FORWARD, "before_backward"): Phase.BACKWARD,
    (Phase.GRADIENTS, "before_backward"): Phase.BACKWARD,  # several backward passes in one batch
    (Phase.STEPPING, "before_backward"): Phase.BACKWARD,  # a GAN: the next loss after a step
    (Phase.BACKWARD, "after_backward"): Phase.GRADIENTS,
    (Phase.GRADIENTS, "before_optimizer_step"): Phase.STEPPING,
    (Phase.STEPPING, "before_optimizer_step"): Phase.STEPPING,  # several optimizers on one backward
    (Phase.FORWARD, "before_optimizer_step"): Phase.STEPPING,  # manual accumulation: grads of earlier batches
}
_PROBLEM: dict[tuple[Phase, str], Problem] = {
    (Phase.IDLE, "before_backward"): Problem.NO_BATCH_START,
    (Phase.IDLE, "before_optimizer_step"): Problem.NO_BATCH_START,
    (Phase.BACKWARD, "before_optimizer_step"): Problem.UNFINISHED_BACKWARD,
    (Phase.BACKWARD, "batch_end"): Problem.UNFINISHED_BACKWARD,
}


@dataclass
class StepMachine:
    """The state of the step under way (see the module docstring); every method returns its problems."""

    phase: Phase = Phase.IDLE
    tracked_step: int | None = None  # the step whose batches are tracked (lasts over accumulated batches)
    done_step: int | None = None  # the step whose once-per-step work is done
    first_of_step: bool = False  # the last before_optimizer_step was the first of its step
    logging: bool = False  # the current batch belongs to a logging step
    backward_seen: bool = False  # a backward pass was announced in this tracked step
    stepped: bool = False  # an optimizer stepped in the current batch
    unstepped_batches: int = 0  # batches since the last optimizer step (manual accumulation)

    def _go(self, event: str, strict: bool = True) -> list[Problem]:
        key = (self.phase, event)
        nxt = _NEXT.get(key)
        problem = _PROBLEM.get(key)
        if nxt is None:  # out of order: continue from where the event leads
            nxt = {"before_backward": Phase.BACKWARD, "after_backward": Phase.GRADIENTS}.get(event, Phase.STEPPING)
        self.phase = nxt
        if problem is None and event == "before_optimizer_step" and self.logging and not self.backward_seen:
            problem = Problem.NO_BACKWARD
        return [problem] if problem is not None and strict else []

    def batch_start(self, step: int, logging: bool) -> list[Problem]:
        problems = [Problem.UNFINISHED_BACKWARD] if self.phase is Phase.BACKWARD else []
        self.phase, self.logging, self.stepped = Phase.FORWARD, logging, False
        if logging and self.tracked_step != step:
            self.tracked_step, self.backward_seen = step, False
        return problems

    def before_backward(self) -> list[Problem]:
        self.backward_seen = True
        return self._go("before_backward")

    def after_backward(self) -> list[Problem]:
        problems = [] if self.phase is Phase.BACKWARD else [Problem.NO_BACKWARD]
        self.phase = Phase.GRADIENTS
        return problems if self.logging else []

    def before_optimizer_step(self, step: int) -> list[Problem]:
        problems = self._go("before_optimizer_step", strict=self.logging or self.phase is Phase.IDLE)
        self.stepped = True
        self.first_of_step = self.done_step != step
        self.done_step = step
        return problems

    def logs_now(self, step: int) -> bool:
        """Whether ``step`` is the tracked logging step (its statistics are taken at the optimizer step)."""
        return self.tracked_step == step

    @property
    def accumulated_before(self) -> bool:
        """Manual optimization: earlier batches ran backward without an optimizer step since the last one."""
        return self.unstepped_batches > 0

    def batch_end(self, accumulating: bool) -> list[Problem]:
        """``accumulating``: the step's gradients are still being accumulated (no optimizer step due yet)."""
        problems = [Problem.UNFINISHED_BACKWARD] if self.phase is Phase.BACKWARD else []
        if self.logging and not self.stepped and not accumulating:
            problems.append(Problem.NOT_STEPPED)
        self.unstepped_batches = 0 if self.stepped else self.unstepped_batches + 1
        if not accumulating or self.stepped:
            self.tracked_step = None  # the step is over (or never reached the optimizer)
        self.phase, self.logging, self.stepped = Phase.IDLE, False, False
        return problems

    def reset(self) -> None:
        """An exception or the end of fit: nothing is under way any more."""
        self.phase, self.tracked_step, self.logging, self.stepped = Phase.IDLE, None, False, False
