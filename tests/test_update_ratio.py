"""``update_ratio/{name}`` and ``dead_units/{name}`` in a real Trainer, read back from the event files.

Oracles: the weights the LightningModule records itself just before its optimizer's step
(``on_before_optimizer_step``, after the callbacks' hooks) and right after it (``optimizer_step``
returns), and, for SGD, the closed form ``lr * ‖g‖ / ‖w‖``.
"""

from __future__ import annotations

import math
import warnings
from pathlib import Path

import lightning.pytorch as pl
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from lightning.pytorch.utilities.exceptions import MisconfigurationException
from torch.utils.data import DataLoader, TensorDataset

from param_monitor import ParameterMonitor
from param_monitor.update_ratio import UpdateRatio
from tests.helpers import trainers
from tests.helpers.processes import spawn_workers

TOL = 1e-5


def loader(n: int = 48, batch_size: int = 8, seed: int = 0) -> DataLoader:
    g = torch.Generator().manual_seed(seed)
    return DataLoader(TensorDataset(torch.randn(n, 4, generator=g), torch.randint(0, 3, (n,), generator=g)), batch_size)


def fit(module: pl.LightningModule, tmp_path: Path, monitor: ParameterMonitor | None = None, **kwargs: object):
    return trainers.fit(module, tmp_path, monitor or ParameterMonitor(log_update_ratio=True), data=loader(), **kwargs)


class WeightRecorder(pl.LightningModule):
    """The exercise's shape (one Linear used twice); records weights and gradients around each step."""

    def __init__(self, optimizer: str = "sgd", lr: float = 0.1) -> None:
        super().__init__()
        torch.manual_seed(0)
        shared = nn.Linear(8, 8)
        self.net = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), shared, nn.ReLU(), shared, nn.ReLU(), nn.Linear(8, 3))
        self.optimizer, self.lr = optimizer, lr
        self.before: dict[int, dict[str, torch.Tensor]] = {}
        self.after: dict[int, dict[str, torch.Tensor]] = {}
        self.grads: dict[int, dict[str, torch.Tensor]] = {}
        self.poison_steps: set[int] = set()

    def _step(self) -> int:
        return self.trainer.fit_loop.epoch_loop._batches_that_stepped

    def training_step(self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int) -> torch.Tensor:
        x, y = batch
        loss = F.cross_entropy(self.net(x), y)
        return loss * float("nan") if self._step() in self.poison_steps else loss

    def on_before_optimizer_step(self, optimizer: torch.optim.Optimizer) -> None:
        step = self._step()
        self.before[step] = {n: p.detach().clone() for n, p in self.named_parameters()}
        self.grads[step] = {n: p.grad.detach().clone() for n, p in self.named_parameters() if p.grad is not None}

    def optimizer_step(self, epoch: int, batch_idx: int, optimizer: object, optimizer_closure: object = None) -> None:
        step = self._step()
        super().optimizer_step(epoch, batch_idx, optimizer, optimizer_closure)
        self.after[step] = {n: p.detach().clone() for n, p in self.named_parameters()}

    def configure_optimizers(self) -> torch.optim.Optimizer:
        if self.optimizer == "adamw":
            return torch.optim.AdamW(self.parameters(), lr=self.lr, weight_decay=0.1)
        if self.optimizer == "fused-adam":  # unscales itself: runs even on a step GradScaler skips
            return torch.optim.Adam(self.parameters(), lr=self.lr, fused=True)
        return torch.optim.SGD(self.parameters(), lr=self.lr)


def recorded_ratio(module: WeightRecorder, step: int, name: str) -> float:
    before, after = module.before[step][name].double(), module.after[step][name].double()
    return ((after - before).norm() / before.norm()).item()


def assert_close(actual: float, expected: float, tol: float = TOL) -> None:
    assert math.isclose(actual, expected, rel_tol=tol, abs_tol=1e-12), (actual, expected)


UNIQUE = ["net.0.weight", "net.0.bias", "net.2.weight", "net.2.bias", "net.6.weight", "net.6.bias"]


def test_sgd_ratio_is_lr_grad_over_weight(tmp_path: Path) -> None:
    module = WeightRecorder("sgd", lr=0.1)
    _, scalars = fit(module, tmp_path)
    ratio_tags = {t for t in scalars if t.startswith("update_ratio/")}
    assert ratio_tags == {f"update_ratio/{n}" for n in UNIQUE}  # the tied layer once, under its first name
    for step in range(4):
        for name in UNIQUE:
            closed_form = 0.1 * module.grads[step][name].double().norm() / module.before[step][name].double().norm()
            assert_close(scalars[f"update_ratio/{name}"][step], closed_form.item())
            assert_close(scalars[f"update_ratio/{name}"][step], recorded_ratio(module, step, name))


def test_adamw_against_recorded_weights_on_logging_steps_only(tmp_path: Path) -> None:
    module = WeightRecorder("adamw", lr=1e-2)
    _, scalars = fit(module, tmp_path, max_steps=6, log_every_n_steps=3)
    for name in UNIQUE:
        assert sorted(scalars[f"update_ratio/{name}"]) == [2, 5]
        for step in (2, 5):
            assert_close(scalars[f"update_ratio/{name}"][step], recorded_ratio(module, step, name))


def test_no_copy_and_no_hook_on_steps_that_do_not_log(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    armed: list[int] = []
    original = UpdateRatio.arm

    def spy(self: UpdateRatio, optimizer: torch.optim.Optimizer, *args: object) -> None:
        armed.append(len(optimizer._optimizer_step_post_hooks))
        original(self, optimizer, *args)

    monkeypatch.setattr(UpdateRatio, "arm", spy)
    trainer, _ = fit(WeightRecorder(), tmp_path, max_steps=6, log_every_n_steps=3)
    assert armed == [0, 0]  # two logging steps, and each found no hook left over
    assert not trainer.optimizers[0]._optimizer_step_post_hooks
    assert not trainer.callbacks[0]._core.update_ratio.armed


def test_off_by_default(tmp_path: Path) -> None:
    _, scalars = fit(WeightRecorder(), tmp_path, ParameterMonitor(), max_steps=1)
    assert "grad_norm/net.2.weight" in scalars
    assert not any(t.startswith("update_ratio/") for t in scalars)


def test_gradient_accumulation_one_ratio_per_optimizer_step(tmp_path: Path) -> None:
    module = WeightRecorder("sgd")
    _, scalars = fit(module, tmp_path, max_steps=3, accumulate_grad_batches=2)
    assert sorted(scalars["update_ratio/net.2.weight"]) == [0, 1, 2]
    for step in range(3):
        for name in UNIQUE:  # the step's update, made with the gradient of both micro-batches
            assert_close(scalars[f"update_ratio/{name}"][step], recorded_ratio(module, step, name))
            closed_form = 0.1 * module.grads[step][name].double().norm() / module.before[step][name].double().norm()
            assert_close(scalars[f"update_ratio/{name}"][step], closed_form.item())


@pytest.mark.parametrize("optimizer", ["sgd", "fused-adam"])
def test_a_step_gradscaler_skips_logs_no_ratio(tmp_path: Path, optimizer: str) -> None:
    from lightning.pytorch.plugins import MixedPrecision

    module = WeightRecorder(optimizer, lr=0.1 if optimizer == "sgd" else 1e-2)
    module.poison_steps = {2}  # a NaN loss: GradScaler skips that optimizer step
    trainer, scalars = fit(module, tmp_path, max_steps=5, plugins=[MixedPrecision("16-mixed", "cpu")])
    assert torch.equal(module.before[2]["net.2.weight"], module.after[2]["net.2.weight"])  # really skipped
    for name in UNIQUE:
        assert sorted(scalars[f"update_ratio/{name}"]) == [0, 1, 3, 4]
        for step in (0, 1, 3, 4):
            assert_close(scalars[f"update_ratio/{name}"][step], recorded_ratio(module, step, name))
    assert 2 in scalars["weight_mean/net.2.weight"]
    assert not trainer.optimizers[0]._optimizer_step_post_hooks  # the skipped step's hook was removed


def test_aggregate_depth_sums_squares_per_module(tmp_path: Path) -> None:
    module = WeightRecorder("adamw", lr=1e-2)
    _, scalars = fit(module, tmp_path, ParameterMonitor(log_update_ratio=True, aggregate_depth=2), max_steps=2)
    assert {t for t in scalars if t.startswith("update_ratio/")} == {
        "update_ratio/net.0",
        "update_ratio/net.2",
        "update_ratio/net.6",
    }
    for step in range(2):
        for module_name in ("net.0", "net.2", "net.6"):
            names = [f"{module_name}.weight", f"{module_name}.bias"]
            b = {n: module.before[step][n].double() for n in names}
            delta = sum((module.after[step][n].double() - b[n]).square().sum() for n in names)
            expected = math.sqrt(delta / sum(b[n].square().sum() for n in names))
            assert_close(scalars[f"update_ratio/{module_name}"][step], expected)


class TwoOptimizers(pl.LightningModule):
    """Manual optimization: ``a`` steps, then ``b`` (with a loss that reads the new ``a``)."""

    def __init__(self) -> None:
        super().__init__()
        self.automatic_optimization = False
        torch.manual_seed(0)
        self.a, self.b = nn.Linear(4, 4), nn.Linear(4, 3)
        self.records: dict[tuple[int, str], tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]] = {}

    def training_step(self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int) -> None:
        x, y = batch
        for opt, key in zip(self.optimizers(), ("a", "b"), strict=True):
            step = self.trainer.fit_loop.epoch_loop._batches_that_stepped
            loss = F.cross_entropy(self.b(torch.tanh(self.a(x))), y)
            opt.zero_grad()
            self.manual_backward(loss)
            before = {n: p.detach().clone() for n, p in self.named_parameters()}
            opt.step()
            self.records[(step, key)] = (before, {n: p.detach().clone() for n, p in self.named_parameters()})

    def configure_optimizers(self) -> list[torch.optim.Optimizer]:
        return [torch.optim.SGD(self.a.parameters(), lr=0.1), torch.optim.Adam(self.b.parameters(), lr=1e-2)]


def test_several_optimizers_each_at_its_own_step(tmp_path: Path) -> None:
    module = TwoOptimizers()
    _, scalars = fit(module, tmp_path, max_steps=4)  # 2 batches, both optimizers step in each
    assert {t for t in scalars if t.startswith("update_ratio/")} == {
        f"update_ratio/{m}.{k}" for m in "ab" for k in ("weight", "bias")
    }
    # each tag is written at the step label its optimizer stepped at, with that step's change only
    for (step, key), (before, after) in module.records.items():
        for name in (f"{key}.weight", f"{key}.bias"):
            b, a = before[name].double(), after[name].double()
            assert_close(scalars[f"update_ratio/{name}"][step], ((a - b).norm() / b.norm()).item())


def test_bf16_weights_are_differenced_in_fp32() -> None:
    torch.manual_seed(0)
    w = nn.Parameter(torch.randn(64, 64).to(torch.bfloat16) + 4)  # large values: bf16 steps of 2^-5
    opt = torch.optim.SGD([w], lr=1.0)
    before = w.detach().double().clone()
    logged: list[dict[str, float]] = []
    ratio = UpdateRatio()
    ratio.arm(opt, [("w", w)], logged.append)
    w.grad = torch.full_like(w, 0.1)
    opt.step()
    expected = ((w.detach().double() - before).norm() / before.norm()).item()
    assert_close(logged[0]["update_ratio/w"], expected, 1e-6)
    assert not ratio.armed


def test_zero_weights_log_nothing_and_warn_once() -> None:
    w = nn.Parameter(torch.zeros(3))
    opt = torch.optim.SGD([w], lr=1.0)
    ratio, logged, warned = UpdateRatio(), [], []
    for _ in range(2):
        with torch.no_grad():
            w.zero_()
        ratio.arm(opt, [("w", w)], logged.append)
        w.grad = torch.ones(3)
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            opt.step()
        warned += [str(c.message) for c in caught if "undefined" in str(c.message)]
    assert logged == []  # ‖Δw‖/0 is not a number to plot
    assert len(warned) == 1 and "first: w" in warned[0]


@pytest.mark.parametrize(
    "kwargs", [{"log_update_ratio": "yes"}, {"log_dead_units": 1}], ids=["update_ratio", "dead_units"]
)
def test_bad_flags(kwargs: dict) -> None:
    with pytest.raises(MisconfigurationException, match="must be True or False"):
        ParameterMonitor(**kwargs)


# --------------------------------------------------------------------------------------------
# dead units (computed by the watcher; the callback only asks for them)
# --------------------------------------------------------------------------------------------
class KnownDeadRows(pl.LightningModule):
    """Linear rows 1 and 4 of 6, and conv channel 2 of 4, never fire (weight 0, bias -1 before a ReLU);
    the other units always do (bias 3)."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.emb = nn.Embedding(10, 4)  # a zero row here is an unused token, not a dead unit
        self.fc = nn.Linear(4, 6)
        self.conv = nn.Conv2d(1, 4, 3)
        self.head = nn.Linear(6 + 4, 3)
        with torch.no_grad():
            for rows, layer in (([1, 4], self.fc), ([2], self.conv)):
                layer.bias.fill_(3.0)  # every other unit fires on every input
                layer.weight[rows] = 0.0
                layer.bias[rows] = -1.0

    def training_step(self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int) -> torch.Tensor:
        x, y = batch
        tokens = (x.abs() * 3).long().clamp(max=9)
        h = F.relu(self.fc(self.emb(tokens).mean(1)))
        c = F.relu(self.conv(x.view(-1, 1, 2, 2).repeat(1, 1, 2, 2))).mean((2, 3))
        return F.cross_entropy(self.head(torch.cat([h, c], 1)), y)

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SGD(self.parameters(), lr=0.0)  # lr 0: the dead rows stay as built


def test_dead_units_of_hand_built_layers(tmp_path: Path) -> None:
    monitor = ParameterMonitor(log_dead_units=True)
    _, scalars = fit(KnownDeadRows(), tmp_path, monitor, max_steps=2)
    for step in range(2):
        assert scalars["dead_units/fc.weight"][step] == pytest.approx(2 / 6)
        assert scalars["dead_units/conv.weight"][step] == pytest.approx(1 / 4)
        assert scalars["dead_units/head.weight"][step] == 0.0
    assert "dead_units/emb.weight" not in scalars  # embeddings: not a unit
    assert not any(t.startswith("dead_units/") and t.endswith(".bias") for t in scalars)


# --------------------------------------------------------------------------------------------
# the TensorBoard layout
# --------------------------------------------------------------------------------------------
def written_charts(log_dir: str) -> dict[str, list[str]]:
    """Chart title -> regexes of the custom-scalars layout the run wrote (TensorBoard's reader)."""
    from tensorboard.backend.event_processing import plugin_event_accumulator as pea
    from tensorboard.plugins.custom_scalar import layout_pb2
    from tensorboard.plugins.custom_scalar import metadata as cs_metadata
    from tensorboard.util import tensor_util

    acc = pea.EventAccumulator(log_dir)
    acc.Reload()
    (event,) = acc.Tensors(cs_metadata.CONFIG_SUMMARY_TAG)
    layout = layout_pb2.Layout.FromString(tensor_util.make_ndarray(event.tensor_proto).item())
    return {chart.title: list(chart.multiline.tag) for chart in layout.category[0].chart}


@pytest.mark.parametrize("on", [True, False], ids=["flags-on", "flags-off"])
def test_layout_charts_the_update_ratio_and_dead_units_when_logged(tmp_path: Path, on: bool) -> None:
    import re

    from param_monitor.dashboard import DEAD_UNITS_CHART, UPDATE_RATIO_CHART

    trainer, scalars = fit(WeightRecorder(), tmp_path, ParameterMonitor(log_update_ratio=on), max_steps=2)
    charts = written_charts(trainer.logger.log_dir)
    assert (UPDATE_RATIO_CHART[0] in charts) is on
    assert DEAD_UNITS_CHART[0] not in charts  # not asked for
    assert "1e-3" in UPDATE_RATIO_CHART[0]  # the guide, as text: custom scalars draw no constant line
    if on:
        (regex,) = charts[UPDATE_RATIO_CHART[0]]
        shown = {t for t in scalars if re.match(regex, t)}
        assert shown == {f"update_ratio/{n}" for n in UNIQUE}


# --------------------------------------------------------------------------------------------
# FSDP2: local shard sums, one all-reduce (2 gloo processes on CPU)
# --------------------------------------------------------------------------------------------
def _fsdp_worker(rank: int, port: int, out_dir: str) -> None:
    import json
    import os

    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=2)
    try:
        torch.manual_seed(0)
        # 7 rows over 2 ranks: uneven shards; the last layer stays replicated (counted once)
        net = nn.Sequential(nn.Linear(5, 7), nn.Tanh(), nn.Linear(7, 7), nn.Tanh(), nn.Linear(7, 3))
        mesh = init_device_mesh("cpu", (2,))
        for layer in (net[0], net[2]):
            fully_shard(layer, mesh=mesh)
        g = torch.Generator().manual_seed(2)
        x, y = torch.randn(16, 5, generator=g), torch.randint(0, 3, (16,), generator=g)
        optimizer = torch.optim.AdamW(net.parameters(), lr=1e-2, weight_decay=0.1)
        ratio, logged, calls = UpdateRatio(), [], []
        all_reduce = dist.all_reduce

        def counted(*args: object, **kwargs: object) -> object:
            calls.append(1)
            return all_reduce(*args, **kwargs)

        for _ in range(2):  # the second step: Adam's state is in it
            full_before = {n: _full(p) for n, p in net.named_parameters()}
            # the same batch on both ranks: the unsharded last layer (no DDP around it) stays identical
            F.cross_entropy(net(x), y).backward()
            ratio.arm(optimizer, list(net.named_parameters()), logged.append)
            dist.all_reduce = counted
            optimizer.step()
            dist.all_reduce = all_reduce
            optimizer.zero_grad()
        full_after = {n: _full(p) for n, p in net.named_parameters()}
        oracle = {
            f"update_ratio/{n}": ((full_after[n] - b).norm() / b.norm()).item() for n, b in full_before.items()
        }
        sharded = sorted(n for n, p in net.named_parameters() if type(p).__name__ == "DTensor")
        result = {"logged": logged[-1], "oracle": oracle, "calls": len(calls), "sharded": sharded}
        Path(out_dir, f"rank{rank}.json").write_text(json.dumps(result))
        dist.barrier()
    finally:
        dist.destroy_process_group()


def _full(p: torch.Tensor) -> torch.Tensor:
    full = p.full_tensor() if hasattr(p, "full_tensor") else p
    return full.detach().double().clone()


@pytest.mark.distributed
def test_fsdp2_shard_sums_match_the_full_weights(tmp_path: Path) -> None:
    import json
    tmp_path = spawn_workers(_fsdp_worker, tmp_path)
    results = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in range(2)]
    for result in results:
        assert result["sharded"] == ["0.bias", "0.weight", "2.bias", "2.weight"]  # fully_shard really ran
        assert result["calls"] == 2  # one all-reduce per logged step (two steps)
        assert set(result["logged"]) == set(result["oracle"])
        for tag, want in result["oracle"].items():
            assert math.isclose(result["logged"][tag], want, rel_tol=TOL), (tag, result["logged"][tag], want)


def _ddp_worker(rank: int, port: int, out_dir: str) -> None:
    import json
    import os

    import torch.distributed as dist
    from torch.nn.parallel import DistributedDataParallel

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=2)
    try:
        torch.manual_seed(0)
        net = DistributedDataParallel(nn.Sequential(nn.Linear(5, 7), nn.Tanh(), nn.Linear(7, 3)))
        g = torch.Generator().manual_seed(2)
        x, y = torch.randn(16, 5, generator=g), torch.randint(0, 3, (16,), generator=g)
        optimizer = torch.optim.SGD(net.parameters(), lr=0.1)
        F.cross_entropy(net(x[rank * 8 : (rank + 1) * 8]), y[rank * 8 : (rank + 1) * 8]).backward()
        before = {n: p.detach().double().clone() for n, p in net.named_parameters()}
        ratio, logged, calls = UpdateRatio(), [], []
        originals = {name: getattr(dist, name) for name in ("all_reduce", "broadcast", "all_gather")}
        for name, fn in originals.items():
            setattr(dist, name, lambda *a, _fn=fn, **k: calls.append(1) or _fn(*a, **k))
        ratio.arm(optimizer, list(net.named_parameters()), logged.append)
        optimizer.step()
        for name, fn in originals.items():
            setattr(dist, name, fn)
        oracle = {
            f"update_ratio/{n}": ((p.detach().double() - before[n]).norm() / before[n].norm()).item()
            for n, p in net.named_parameters()
        }
        Path(out_dir, f"rank{rank}.json").write_text(json.dumps({"logged": logged, "oracle": oracle, "calls": calls}))
        dist.barrier()
    finally:
        dist.destroy_process_group()


@pytest.mark.distributed
def test_ddp_rank_zero_computes_without_a_collective(tmp_path: Path) -> None:
    import json
    tmp_path = spawn_workers(_ddp_worker, tmp_path)
    zero, one = (json.loads((tmp_path / f"rank{r}.json").read_text()) for r in range(2))
    assert zero["calls"] == [] and one["calls"] == []  # the weights are the same everywhere: nothing to reduce
    assert one["logged"] == []  # only rank 0 writes, so only rank 0 copies and computes
    assert zero["oracle"] == pytest.approx(one["oracle"], rel=1e-12)  # DDP kept the ranks identical
    (metrics,) = zero["logged"]
    for tag, want in zero["oracle"].items():
        assert math.isclose(metrics[tag], want, rel_tol=TOL), (tag, metrics[tag], want)
