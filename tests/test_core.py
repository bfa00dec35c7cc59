"""The framework-free core without a Trainer: the core driven by hand, as a hand-written loop would.

The oracle of the core's values is ``.grad`` itself (and an untied twin's gradients for the uses).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from torch import Tensor

from param_monitor.core import MonitorConfig, MonitorCore, StepHook
from param_monitor.sinks import Sink


# -- the core, driven by hand ---------------------------------------------------------------------
class Memory(Sink):
    rich = True

    def __init__(self) -> None:
        self.scalar_rows: dict[int, dict[str, float]] = {}
        self.texts: list[tuple[str, int]] = []
        self.metadata: list[dict] = []

    def scalars(self, metrics, step):  # noqa: ANN001, ANN201
        self.scalar_rows.setdefault(step, {}).update(metrics)

    def text(self, tag, markdown, step):  # noqa: ANN001, ANN201
        self.texts.append((tag, step))

    def run_metadata(self, rows, shared, step, status):  # noqa: ANN001, ANN201
        self.metadata.append({"step": step, "shared": dict(shared), **status})


class Loop:
    """A `core.Runtime` of a hand-written loop."""

    def __init__(self, optimizers: Sequence[torch.optim.Optimizer]) -> None:
        self.sink = Memory()
        self._optimizers = list(optimizers)

    def sinks(self) -> list[Sink]:
        return [self.sink]

    def grad_scaler(self) -> None:
        return None

    def optimizers(self) -> list[torch.optim.Optimizer]:
        return self._optimizers


class Calls(StepHook):
    def __init__(self) -> None:
        self.calls: list[str] = []

    def batch_start(self, logging: bool) -> None:
        self.calls.append(f"batch_start:{logging}")

    def before_optimizer_step(self, optimizer: torch.optim.Optimizer, logging: bool) -> None:
        self.calls.append(f"before_optimizer_step:{logging}")

    def after_optimizer_step(self, optimizer: torch.optim.Optimizer, logging: bool) -> None:
        self.calls.append(f"after_optimizer_step:{logging}")

    def batch_end(self, logging: bool) -> None:
        self.calls.append(f"batch_end:{logging}")

    def teardown(self) -> None:
        self.calls.append("teardown")


class SquaredGradSum:
    """A collector: Σ g² over every gradient, which must equal grad_norm_total²."""

    def __init__(self, model: nn.Module) -> None:
        self.model = model
        self.started: list[nn.Module] = []

    def start(self, module: nn.Module) -> None:
        self.started.append(module)

    def pack(self, optimizer: torch.optim.Optimizer) -> Tensor:
        return torch.stack([p.grad.double().square().sum() for p in self.model.parameters() if p.grad is not None])

    def finalize(self, values: Sequence[float]) -> dict[str, float]:
        return {"extra/grad_sq": sum(values)}


def shared_net() -> nn.Sequential:
    torch.manual_seed(0)
    shared = nn.Linear(4, 4)
    return nn.Sequential(nn.Linear(3, 4), shared, nn.Tanh(), shared, nn.Linear(4, 2))


def test_core_logs_every_family_with_hooks_and_collectors_without_a_trainer() -> None:
    model = shared_net()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    loop = Loop([opt])
    core = MonitorCore(MonitorConfig(log_every_n_steps=2, log_update_ratio=True), loop)
    hook = Calls()
    core.start(model, every_n=2)
    core.hooks.append(hook)
    collector = SquaredGradSum(model)
    core.collectors.append(collector)
    x, y = torch.randn(8, 3), torch.randint(0, 2, (8,))
    grads = {}
    for step in range(4):
        opt.zero_grad()
        core.batch_start(step, model)
        loss = F.cross_entropy(model(x), y)
        assert core.before_backward(loss) == []
        loss.backward()
        assert core.after_backward() == []
        grads[step] = {n: p.grad.clone() for n, p in model.named_parameters()}
        assert core.before_optimizer_step(opt, step, model) == []
        opt.step()
        assert core.batch_end(accumulating=False) == []
    core.end()
    assert collector.started == [model, model]  # the first batch of each logging step
    rows = loop.sink.scalar_rows
    assert sorted(rows) == [1, 3]
    for step in (1, 3):
        total = math.sqrt(sum(g.double().square().sum().item() for g in grads[step].values()))
        assert math.isclose(rows[step]["grad_norm_total"], total, rel_tol=1e-6)
        assert math.isclose(rows[step]["extra/grad_sq"], total**2, rel_tol=1e-6)  # rode in the same transfer
        assert rows[step]["shared_grad_error/1.weight"] < 1e-6
        assert "update_ratio/1.weight" in rows[step]
        assert math.isclose(rows[step]["grad_norm/1.weight"], grads[step]["1.weight"].norm().item(), rel_tol=1e-6)
    assert hook.calls[:4] == [
        "batch_start:False",
        "before_optimizer_step:False",
        "after_optimizer_step:False",
        "batch_end:False",
    ]
    assert hook.calls[4:8] == [
        "batch_start:True",
        "before_optimizer_step:True",
        "after_optimizer_step:True",
        "batch_end:True",
    ]
    meta = loop.sink.metadata
    assert meta[0]["steps_logged"] == 0 and meta[-1]["steps_logged"] == 1  # rewritten at the first logged step
    assert meta[0]["shared"] == {"1.weight": ["1", "3"], "1.bias": ["1", "3"]}
    core.teardown()
    assert hook.calls[-1] == "teardown"
    assert not opt._optimizer_step_post_hooks


def test_a_fit_without_logged_step_warns_once_and_says_so_in_the_metadata() -> None:
    model = shared_net()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    loop = Loop([opt])
    core = MonitorCore(MonitorConfig(), loop)
    core.start(model, every_n=50)
    for step in range(30):
        opt.zero_grad()
        core.batch_start(step, model)
        loss = model(torch.randn(2, 3)).sum()
        core.before_backward(loss)
        loss.backward()
        core.after_backward()
        core.before_optimizer_step(opt, step, model)
        opt.step()
        core.batch_end(False)
    with pytest.warns(UserWarning, match=r"logged no step: the fit ran 30 optimizer step\(s\) and logs every 50") as w:
        core.end()
    assert len([r for r in w if "logged no step" in str(r.message)]) == 1
    assert not loop.sink.scalar_rows
    assert loop.sink.metadata[-1] == {
        "step": 29, "shared": loop.sink.metadata[0]["shared"], "steps_logged": 0, "log_every_n_steps": 50,
        "steps_run": 30,
    }


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"include": {"model.*": 1}}, r"`include` must be a list of glob patterns \(a list or tuple of str\).*dict"),
        ({"exclude": {"*.bias"}}, r"`exclude` must be a list of glob patterns.*set"),
    ],
)
def test_patterns_are_lists_or_tuples_of_str(kwargs: dict, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        MonitorConfig(**kwargs)
