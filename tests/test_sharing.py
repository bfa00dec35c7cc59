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


def test_module_under_two_attribute_names_gets_numbered_sites_in_call_order() -> None:
    """``self.first = self.second = layer``: which name a call used is unknowable, so no path is guessed."""

    class TwoNames(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.first = self.second = nn.Linear(3, 3, bias=False)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.first(self.second(x)) * 1000  # `second` runs first

    torch.manual_seed(0)
    net, x = TwoNames(), torch.randn(5, 3)
    copies = [net.first.weight.detach().clone().requires_grad_() for _ in range(2)]
    ((x @ copies[0].T) @ copies[1].T * 1000).sum().backward()  # oracle: call 0, then call 1
    tracker = SharedUseTracker(net)
    tracker.start()
    tracker.begin_forward()
    net(x).sum().backward()
    tracker.stop()
    uses = tracker.contributions()["first.weight"]
    assert list(uses) == ["first#0", "first#1"]
    for k in range(2):
        assert torch.allclose(uses[f"first#{k}"], copies[k].grad, rtol=1e-5)


def test_parameters_frozen_then_unfrozen_are_tracked_once_trainable() -> None:
    shared = nn.Linear(2, 2)
    net = nn.Sequential(nn.Linear(2, 2), shared, shared)
    shared.requires_grad_(False)
    tracker = SharedUseTracker(net)
    run(tracker, net, features=2)  # frozen: no hook may be registered on a view (it would raise)
    assert tracker.contributions() == {}
    shared.requires_grad_(True)
    net.zero_grad()
    uses = run(tracker, net, features=2)
    assert list(uses["1.weight"]) == ["1", "2"]
    assert torch.allclose(sum(uses["1.weight"].values()), shared.weight.grad, rtol=1e-6, atol=1e-7)


def test_activation_checkpointing_recomputation_is_not_a_use() -> None:
    from torch.utils.checkpoint import checkpoint

    class Checkpointed(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.solo = nn.Linear(3, 3)
            self.shared = nn.Linear(3, 3)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            def block(h: torch.Tensor) -> torch.Tensor:
                return torch.tanh(self.shared(torch.tanh(self.shared(self.solo(h)))))

            return checkpoint(block, x, use_reentrant=False)

    net = Checkpointed()
    tracker = SharedUseTracker(net)
    uses = run(tracker, net)
    assert set(uses) == {"shared.weight", "shared.bias"}  # `solo` is not shared
    assert list(uses["shared.weight"]) == ["shared#0", "shared#1"]
    assert torch.allclose(sum(uses["shared.weight"].values()), net.shared.weight.grad, rtol=1e-6, atol=1e-7)
