"""Optimizer-state norms against the optimizer's own ``state_dict``."""

from __future__ import annotations

import pytest
import torch
import torch.nn as nn

from param_monitor import optimizer_state


def _oracle(optimizer: torch.optim.Optimizer, names: dict[int, str]) -> dict[str, float]:
    """Norms of every non-scalar float state in ``state_dict()`` (indices mapped to names by param order)."""
    sd = optimizer.state_dict()
    order = [i for group in sd["param_groups"] for i in group["params"]]
    out = {}
    for index, state in sd["state"].items():
        name = names[order.index(index)]
        for key, value in state.items():
            if torch.is_tensor(value) and value.dim() > 0:
                out[f"optimizer_state_norm/{name}/{key}"] = value.double().norm().item()
    return out


@pytest.mark.parametrize(
    "make",
    [
        lambda p: torch.optim.AdamW(p, lr=1e-2, amsgrad=True),
        lambda p: torch.optim.SGD(p, lr=1e-2, momentum=0.9),
        lambda p: torch.optim.Adagrad(p, lr=1e-2),
        lambda p: torch.optim.RMSprop(p, lr=1e-2, momentum=0.5, centered=True),
    ],
    ids=["adamw_amsgrad", "sgd_momentum", "adagrad", "rmsprop"],
)
def test_norms_match_the_state_dict(make) -> None:
    torch.manual_seed(0)
    shared = nn.Linear(3, 3)
    model = nn.Sequential(nn.Linear(2, 3), shared, nn.ReLU(), shared, nn.Linear(3, 1))
    named = list(model.named_parameters())  # first names, the tied tensor once
    opt = make(model.parameters())
    for _ in range(3):
        opt.zero_grad()
        model(torch.randn(4, 2)).pow(2).sum().backward()
        opt.step()
    packed, tags = optimizer_state.pack(opt, named)
    metrics = optimizer_state.finalize(packed.tolist(), tags)
    names = {i: n for i, (n, _) in enumerate(named)}
    oracle = _oracle(opt, names)
    assert set(metrics) == set(oracle) and metrics
    for tag, value in oracle.items():
        assert metrics[tag] == pytest.approx(value, rel=1e-12)
    assert not any(tag.endswith("/step") for tag in metrics)  # the scalar step counter is left out
    assert "optimizer_state_norm/1.weight/" + tags[0].rpartition("/")[2] in metrics  # first name of the tied layer


def test_parameters_without_state_give_nothing_and_non_finite_is_dropped() -> None:
    w = nn.Parameter(torch.ones(2))
    frozen = nn.Parameter(torch.ones(2))
    opt = torch.optim.Adam([w, frozen])
    assert optimizer_state.pack(opt, [("w", w)])[1] == []  # no step taken yet
    w.grad = torch.tensor([1.0, float("inf")])
    opt.step()
    packed, tags = optimizer_state.pack(opt, [("w", w), ("frozen", frozen)])
    assert tags == ["optimizer_state_norm/w/exp_avg", "optimizer_state_norm/w/exp_avg_sq"]
    assert optimizer_state.finalize(packed.tolist(), tags) == {}  # inf moments: no value
