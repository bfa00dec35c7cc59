"""SharedUseTracker alone: which parameters get views, site names, and the closed-form toy."""

from __future__ import annotations

import torch
import torch.nn as nn

from param_monitor.sharing import SharedUseTracker


class RecordingLinear(nn.Linear):
    """Records what sits in its weight slot while it runs (a view when tracked)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.seen_types.append(type(self._parameters["weight"]))
        return super().forward(x)

    seen_types: list[type]


def recording_linear(n: int) -> RecordingLinear:
    layer = RecordingLinear(n, n)
    layer.seen_types = []
    return layer


class Looper(nn.Module):
    """``inp`` then ``block`` ``repeats`` times: ``block`` is shared only when repeats > 1."""

    def __init__(self) -> None:
        super().__init__()
        self.inp = recording_linear(3)
        self.block = recording_linear(3)
        self.repeats = 1

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.inp(x)
        for _ in range(self.repeats):
            h = torch.tanh(self.block(h))
        return h


def run(
    tracker: SharedUseTracker, model: nn.Module, capture: bool = True, features: int = 3
) -> dict[str, dict[str, torch.Tensor]]:
    tracker.start(capture=capture)
    tracker.begin_forward()
    model(torch.randn(4, features)).sum().backward()
    tracker.stop()
    return tracker.contributions()


def test_after_counting_only_shared_parameters_get_views() -> None:
    model = Looper()
    model.repeats = 2
    tracker = SharedUseTracker(model)
    run(tracker, model, capture=False)  # the first step: counting only
    model.inp.seen_types.clear()
    model.block.seen_types.clear()
    contributions = run(tracker, model)
    assert model.inp.seen_types == [nn.Parameter]  # not shared: left alone
    assert model.block.seen_types == [torch.Tensor, torch.Tensor]  # shared: a view during each call
    assert set(contributions) == {"block.weight", "block.bias"}
    assert list(contributions["block.weight"]) == ["block#0", "block#1"]


def test_module_that_starts_running_twice_is_tracked_from_the_next_forward() -> None:
    model = Looper()
    tracker = SharedUseTracker(model)
    assert run(tracker, model, capture=False) == {}
    model.repeats = 3
    assert run(tracker, model) == {}  # judged by the previous forward (one call): no views yet
    model.zero_grad()
    contributions = run(tracker, model)
    assert list(contributions["block.weight"]) == ["block#0", "block#1", "block#2"]
    total = sum(contributions["block.weight"].values())
    assert torch.allclose(total, model.block.weight.grad, rtol=1e-6, atol=1e-7)


def test_sequential_sites_are_registered_paths_in_call_order() -> None:
    shared = nn.Linear(2, 2)
    net = nn.Sequential(nn.Linear(2, 2), shared, nn.ReLU(), shared)
    tracker = SharedUseTracker(net)
    contributions = run(tracker, net, features=2)
    assert list(contributions["1.weight"]) == ["1", "3"]
    assert tracker.call_sites() == {"0.weight": ["0"], "0.bias": ["0"], "1.weight": ["1", "3"], "1.bias": ["1", "3"]}
    assert sorted(tracker.shared_names()) == ["1.bias", "1.weight"]


def test_no_grad_calls_are_not_counted() -> None:
    shared = nn.Linear(2, 2)
    net = nn.Sequential(shared, shared)
    tracker = SharedUseTracker(net)
    tracker.start()
    tracker.begin_forward()
    with torch.no_grad():
        net(torch.ones(1, 2))
    out = net(torch.ones(1, 2))
    out.sum().backward()
    tracker.stop()
    assert list(tracker.contributions()["0.weight"]) == ["0", "1"]
    assert isinstance(net[0].weight, nn.Parameter)
