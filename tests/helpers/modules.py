"""LightningModules that record their own gradients and per-use contributions (the oracles), and a ``fit``.

Oracles are independent of the monitor: gradients the LightningModule records itself in
``on_before_optimizer_step``, and per-use contributions from a functional re-run of the same
forward pass where every use gets its OWN copy of the shared weights (``torch.autograd.grad``).
"""

from __future__ import annotations

import math
from pathlib import Path

import lightning.pytorch as pl
import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.nn.parameter import UninitializedParameter
from torch.utils.data import DataLoader, TensorDataset

from param_monitor import ParameterMonitor
from param_monitor._lightning import step_label
from tests.helpers import trainers
from tests.helpers.trainers import trainer_kwargs  # noqa: F401  (re-exported for older imports)

TOL = 1e-5


def loader(n: int = 32, features: int = 4, classes: int = 3, batch_size: int = 8, seed: int = 0) -> DataLoader:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, features, generator=g)
    y = torch.randint(0, classes, (n,), generator=g)
    return DataLoader(TensorDataset(x, y), batch_size=batch_size)


def fit(
    module: pl.LightningModule,
    tmp_path: Path,
    monitor: ParameterMonitor | None = None,
    data: DataLoader | None = None,
    **overrides: object,
) -> tuple[pl.Trainer, dict[str, dict[int, float]]]:
    """:func:`tests.helpers.trainers.fit` on :func:`loader`'s data unless ``data`` is given."""
    return trainers.fit(module, tmp_path, monitor, data or loader(), **overrides)


class Recorder(pl.LightningModule):
    """A LightningModule that records its own gradients and per-use contributions (the oracles).

    Subclasses define ``forward_uses(x, weights)``: the forward pass where each use of a shared
    parameter reads its own entry of ``weights`` (``{site: {param name: tensor}}``), and
    ``shared_sites``: ``{param name: [sites]}``. ``weights[step]`` holds the parameters' values
    as the monitor sees them at ``on_before_optimizer_step``.
    """

    shared_sites: dict[str, list[str]] = {}

    def __init__(self, lr: float = 0.1) -> None:
        super().__init__()
        self.lr = lr
        self.grads: dict[int, dict[str, torch.Tensor]] = {}
        self.weights: dict[int, dict[str, torch.Tensor]] = {}
        self.uses: dict[int, dict[tuple[str, str], torch.Tensor]] = {}
        self.poison_steps: set[int] = set()
        self.poison_value = float("nan")
        self.poison_grads: dict[int, list[str]] = {}  # step -> parameters whose gradient turns NaN

    def loss_fn(self, out: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return F.cross_entropy(out, y)

    def training_step(self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int) -> torch.Tensor:
        x, y = batch
        step = step_label(self.trainer)
        self._record_uses(x, y, step)
        loss = self.loss_fn(self(x), y)
        if step in self.poison_steps:
            loss = loss * self.poison_value
        self.log("train_loss", loss)
        return loss

    def _record_uses(self, x: torch.Tensor, y: torch.Tensor, step: int) -> None:
        params = dict(self.named_parameters())
        if not self.shared_sites or any(isinstance(params[n], UninitializedParameter) for n in self.shared_sites):
            return
        # each site gets its own detached copy of every shared parameter it uses
        per_site: dict[str, dict[str, torch.Tensor]] = {}
        for name, sites in self.shared_sites.items():
            for site in sites:
                per_site.setdefault(site, {})[name] = params[name].detach().clone().requires_grad_()
        with torch.enable_grad():
            loss = self.loss_fn(self.forward_uses(x, per_site), y) / self.trainer.accumulate_grad_batches
            flat = [(site, name, t) for site, d in per_site.items() for name, t in d.items()]
            grads = torch.autograd.grad(loss, [t for _, _, t in flat], allow_unused=True)
        acc = self.uses.setdefault(step, {})
        for (site, name, _), g in zip(flat, grads, strict=True):
            if g is not None:
                acc[(name, site)] = acc.get((name, site), 0) + g

    def forward_uses(self, x: torch.Tensor, weights: dict[str, dict[str, torch.Tensor]]) -> torch.Tensor:
        raise NotImplementedError

    def on_after_backward(self) -> None:
        params = dict(self.named_parameters())
        for name in self.poison_grads.get(step_label(self.trainer), []):
            params[name].grad.fill_(float("nan"))

    def on_before_optimizer_step(self, optimizer: torch.optim.Optimizer) -> None:
        # runs after the callbacks' hook: the monitor has seen the gradients as they were
        step = step_label(self.trainer)
        self.grads[step] = {n: p.grad.detach().clone() for n, p in self.named_parameters() if p.grad is not None}
        self.weights[step] = {
            n: p.detach().clone() for n, p in self.named_parameters() if not isinstance(p, UninitializedParameter)
        }
        if step in self.poison_steps or step in self.poison_grads:  # keep the weights finite: later steps clean
            for p in self.parameters():
                if p.grad is not None:
                    p.grad.nan_to_num_(0.0, 0.0, 0.0)

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SGD(self.parameters(), lr=self.lr)


class SharedMLP(Recorder):
    """The exercise's network: the SAME Linear at positions 3 and 6 of an nn.Sequential."""

    shared_sites = {"net.3.weight": ["net.3", "net.6"], "net.3.bias": ["net.3", "net.6"]}

    def __init__(self, lazy: bool = False, **kwargs: object) -> None:
        super().__init__(**kwargs)
        shared = nn.LazyLinear(8) if lazy else nn.Linear(8, 8)
        first = nn.LazyLinear(8) if lazy else nn.Linear(4, 8)
        self.net = nn.Sequential(
            nn.Flatten(),
            first,
            nn.ReLU(),
            shared,
            nn.ReLU(),
            nn.Dropout(0.0),
            shared,
            nn.ReLU(),
            nn.Dropout(0.0),
            nn.LazyLinear(3) if lazy else nn.Linear(8, 3),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)

    def forward_uses(self, x: torch.Tensor, w: dict[str, dict[str, torch.Tensor]]) -> torch.Tensor:
        # functional calls only: a module call here would be one more use for the monitor
        h = F.relu(linear(self.net[1], x))
        h = F.relu(F.linear(h, w["net.3"]["net.3.weight"], w["net.3"]["net.3.bias"]))
        h = F.relu(F.linear(h, w["net.6"]["net.3.weight"], w["net.6"]["net.3.bias"]))
        return linear(self.net[9], h)


def linear(layer: nn.Linear, x: torch.Tensor) -> torch.Tensor:
    """``layer(x)`` without calling the module (no forward hooks run; a pruned weight is recomputed, as
    ``torch.nn.utils.prune``'s pre-hook would)."""
    pruned = hasattr(layer, "weight_orig")
    return F.linear(x, layer.weight_orig * layer.weight_mask if pruned else layer.weight, layer.bias)


def assert_close(actual: float, expected: float, tol: float = TOL) -> None:
    assert math.isclose(actual, expected, rel_tol=tol, abs_tol=1e-9), (actual, expected)


def check_against_oracle(module: Recorder, scalars: dict[str, dict[int, float]], steps: list[int]) -> None:
    assert steps, "no logged step to check"
    expected = {f"shared_grad/{name}/{site}" for name, sites in module.shared_sites.items() for site in sites}
    for step in steps:
        assert {t for t, v in scalars.items() if t.startswith("shared_grad/") and step in v} == expected
        grads = module.grads[step]
        for name, grad in grads.items():
            assert_close(scalars[f"grad_norm/{name}"][step], grad.norm().item())
        total = math.sqrt(sum(g.double().square().sum().item() for g in grads.values()))
        assert_close(scalars["grad_norm_total"][step], total)
        for (name, site), use in module.uses[step].items():
            assert_close(scalars[f"shared_grad/{name}/{site}"][step], use.norm().item())
        for name, sites in module.shared_sites.items():
            uses = [module.uses[step][(name, s)] for s in sites]
            assert scalars[f"shared_grad_error/{name}"][step] < 1e-6
            pairs = [(i, j) for i in range(len(uses)) for j in range(i + 1, len(uses))]
            cos = [F.cosine_similarity(uses[i].flatten(), uses[j].flatten(), dim=0).item() for i, j in pairs]
            assert_close(scalars[f"shared_grad_cosine/{name}"][step], sum(cos) / len(cos), 1e-4)
            total_use = sum(u.double() for u in uses)
            for site, use in zip(sites, uses, strict=True):  # each use's share of the step: <c, S> / ||S||^2
                share = (use.double() * total_use).sum() / total_use.square().sum()
                assert abs(scalars[f"shared_grad_share/{name}/{site}"][step] - share.item()) < 1e-6
            assert abs(sum(scalars[f"shared_grad_share/{name}/{s}"][step] for s in sites) - 1) < 1e-6  # fp32 events


def data_of(x: torch.Tensor, y: torch.Tensor | None = None, batch_size: int = 8) -> DataLoader:
    tensors = (x,) if y is None else (x, y)
    return DataLoader(TensorDataset(*tensors), batch_size=batch_size)
