"""Optimizer-state norms against the optimizer's own ``state_dict``."""

from __future__ import annotations

import copy
from pathlib import Path

import lightning.pytorch as pl
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from param_monitor import ParameterMonitor, optimizer_state
from tests.helpers.modules import fit


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


# -- under a real Trainer, read back from the event files ----------------------------------------------
class Tied(pl.LightningModule):
    """A Linear used twice (one tensor, two names), AdamW; records its optimizer's state_dict after each step
    (a step post-hook of its own)."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.inp = nn.Linear(4, 4)
        self.again = self.inp
        self.out = nn.Linear(4, 3)
        self.states: dict[int, dict] = {}

    def training_step(self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int) -> torch.Tensor:
        x, y = batch
        return F.cross_entropy(self.out(torch.tanh(self.again(torch.tanh(self.inp(x))))), y)

    def configure_optimizers(self) -> torch.optim.Optimizer:
        optimizer = torch.optim.AdamW(self.parameters(), lr=1e-2)

        def record(opt, args, kwargs) -> None:  # noqa: ANN001
            # the state after the step whose label is the number of steps taken before it
            self.states[len(self.states)] = copy.deepcopy(opt.state_dict())

        optimizer.register_step_post_hook(record)
        return optimizer


def test_trainer_logs_every_state_norm_after_the_logging_steps_optimizer_step(tmp_path: Path) -> None:
    module = Tied()
    _, scalars = fit(module, tmp_path, ParameterMonitor(log_every_n_steps=2, log_optimizer_state=True), max_steps=4)
    names = {i: n for i, (n, _) in enumerate(module.named_parameters())}  # first names: inp.*, out.*
    state_tags = {t for t in scalars if t.startswith("optimizer_state_norm/")}
    assert state_tags == {f"optimizer_state_norm/{n}/{s}" for n in names.values() for s in ("exp_avg", "exp_avg_sq")}
    for step in (1, 3):
        oracle = _oracle_from(module.states[step], names)
        for tag, value in oracle.items():
            assert scalars[tag][step] == pytest.approx(value, rel=1e-6)
    assert all(sorted(scalars[t]) == [1, 3] for t in state_tags)


def _oracle_from(sd: dict, names: dict[int, str]) -> dict[str, float]:
    order = [i for group in sd["param_groups"] for i in group["params"]]
    return {
        f"optimizer_state_norm/{names[order.index(i)]}/{k}": v.double().norm().item()
        for i, state in sd["state"].items()
        for k, v in state.items()
        if v.dim() > 0
    }


def test_trainer_without_the_option_logs_no_state(tmp_path: Path) -> None:
    _, scalars = fit(Tied(), tmp_path, ParameterMonitor(), max_steps=2)
    assert scalars and not any(t.startswith("optimizer_state_norm/") for t in scalars)


def test_plain_loop_logs_the_state_after_its_step(tmp_path: Path) -> None:
    from torch.utils.tensorboard import SummaryWriter

    from param_monitor import PlainMonitor
    from tests.helpers.events import read_scalars

    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 1))
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    after: dict[int, float] = {}
    writer = SummaryWriter(str(tmp_path))
    with PlainMonitor(model, writer, log_every_n_steps=2, log_optimizer_state=True) as monitor:
        for step in range(4):
            x, y = torch.randn(8, 4), torch.randn(8, 1)
            optimizer.zero_grad()
            with monitor.step(step) as s:
                s.backward(nn.functional.mse_loss(model(x), y))
                s.log(optimizer)
            optimizer.step()
            after[step] = optimizer.state[model[0].weight]["momentum_buffer"].double().norm().item()
    writer.close()
    logged = read_scalars(tmp_path)["optimizer_state_norm/0.weight/momentum_buffer"]
    assert sorted(logged) == [1, 3]
    assert all(logged[s] == pytest.approx(after[s], rel=1e-6) for s in logged)
