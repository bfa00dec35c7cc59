"""More than one process: DDP (Lightning ``ddp_spawn``) and FSDP2 (``fully_shard``), gloo on CPU.

Oracles are single-process and independent of the distributed code paths: the same model trained
on the concatenated batch (mean loss, as DDP averages), and per-use contributions from an UNTIED
copy of the model where each use of the shared layer has its own weights (its gradient is that
use's contribution). Collectives are counted by wrapping ``torch.distributed``'s functions in the
spawned workers while the monitor's own hooks run.

The aggregation tests at the end are single-process and fast.
"""

from __future__ import annotations

import copy
import json
import math
import os
import warnings
from collections.abc import Callable
from functools import partial
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import pytest
import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F
from lightning.pytorch.loggers import TensorBoardLogger
from torch.utils.data import DataLoader, DistributedSampler, TensorDataset

from param_monitor import ParameterMonitor, ParameterWatcher
from param_monitor._lightning import step_label
from param_monitor.distributed import reduction_group
from param_monitor.stats import finalize, pack
from tests.helpers.events import read_scalars
from tests.helpers.processes import count_collectives, free_port, retry_if_killed, spawn_workers
from tests.helpers.trainers import make_trainer, model_parallel_trainer

TOL = 1e-5
WORLD = 2
BATCH = 8  # per rank
STEPS = 4
LOG_EVERY = 2  # steps 1 and 3 log, 0 and 2 do not


# -- helpers --------------------------------------------------------------------------------
def shared_net(seed: int = 0) -> nn.Sequential:
    """The same Linear at positions 2 and 4 (sites ``net.2`` and ``net.4``)."""
    torch.manual_seed(seed)
    shared = nn.Linear(6, 6)
    return nn.Sequential(nn.Linear(4, 6), nn.Tanh(), shared, nn.Tanh(), shared, nn.Linear(6, 3))


def untied(net: nn.Sequential) -> nn.Sequential:
    """A copy where the second use of the shared layer has its own (equal) weights."""
    twin = copy.deepcopy(net)
    twin[4] = copy.deepcopy(twin[2])
    return twin


def dataset(n: int, seed: int = 1) -> TensorDataset:
    g = torch.Generator().manual_seed(seed)
    return TensorDataset(torch.randn(n, 4, generator=g), torch.randint(0, 3, (n,), generator=g))


def rel_close(got: float, want: float, tol: float = TOL) -> bool:
    return math.isclose(got, want, rel_tol=tol, abs_tol=tol * 1e-2)


def assert_metrics_close(got: dict[str, float], want: dict[str, float], keys: list[str] | None = None) -> None:
    keys = keys if keys is not None else sorted(want)
    missing = [k for k in keys if k not in got]
    assert not missing, f"missing: {missing[:5]}"
    bad = {k: (got[k], want[k]) for k in keys if not rel_close(got[k], want[k])}
    assert not bad, f"{len(bad)} differ, e.g. {list(bad.items())[:3]}"


# -- DDP through Lightning ------------------------------------------------------------------
class SharedClassifier(pl.LightningModule):
    def __init__(self) -> None:
        super().__init__()
        self.net = shared_net()

    def training_step(self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int) -> torch.Tensor:
        x, y = batch
        return F.cross_entropy(self.net(x), y)

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SGD(self.parameters(), lr=0.5)

    def train_dataloader(self) -> DataLoader:
        # Lightning's own sampler shuffles training data; without shuffling rank r gets rows r, r+2, ...
        # so a step's two batches are 16 consecutive rows. Built here: the process group exists by now.
        data = dataset(WORLD * BATCH * STEPS)
        sampler = DistributedSampler(data, shuffle=False) if dist.is_initialized() else None
        return DataLoader(data, batch_size=BATCH, sampler=sampler)


class CountingMonitor(ParameterMonitor):
    """Counts the collectives issued inside the monitor's per-step hooks; each rank writes its counts."""

    def __init__(self, out_dir: str, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.out_dir = out_dir
        self.counts: dict[int, int] = {}

    def _counted(self, trainer: pl.Trainer, hook: Callable[[], None]) -> None:
        step = step_label(trainer)
        with count_collectives() as calls:
            hook()
        self.counts[step] = self.counts.get(step, 0) + len(calls)

    def on_train_batch_start(self, trainer: pl.Trainer, *args: Any) -> None:
        self._counted(trainer, lambda: super(CountingMonitor, self).on_train_batch_start(trainer, *args))

    def on_before_optimizer_step(self, trainer: pl.Trainer, *args: Any) -> None:
        self._counted(trainer, lambda: super(CountingMonitor, self).on_before_optimizer_step(trainer, *args))

    def on_train_batch_end(self, trainer: pl.Trainer, *args: Any) -> None:
        self._counted(trainer, lambda: super(CountingMonitor, self).on_train_batch_end(trainer, *args))

    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        super().on_train_end(trainer, pl_module)
        path = Path(self.out_dir) / f"counts_rank{trainer.global_rank}.json"
        path.write_text(json.dumps(self.counts))


def single_process_reference(steps: int) -> dict[int, dict[str, float]]:
    """Full-batch training (2 ranks x BATCH per step, mean loss), metrics from independent oracles."""
    net = shared_net()
    opt = torch.optim.SGD(net.parameters(), lr=0.5)
    data = dataset(WORLD * BATCH * steps)
    out: dict[int, dict[str, float]] = {}
    for step in range(steps):
        x, y = data[step * WORLD * BATCH : (step + 1) * WORLD * BATCH]
        if (step + 1) % LOG_EVERY == 0:
            out[step] = oracle_metrics(net, x, y)
        opt.zero_grad()
        F.cross_entropy(net(x), y).backward()
        opt.step()
    return out


def oracle_metrics(net: nn.Sequential, x: torch.Tensor, y: torch.Tensor) -> dict[str, float]:
    """Per-tensor norms from the tied model's gradients; per-use contributions from the untied copy."""
    twin = untied(net)
    F.cross_entropy(twin(x), y).backward()
    metrics: dict[str, float] = {}
    for local in ("weight", "bias"):
        uses = [getattr(twin[i], local).grad.double() for i in (2, 4)]
        name = f"net.2.{local}"
        metrics[f"shared_grad/{name}/net.2"] = uses[0].norm().item()
        metrics[f"shared_grad/{name}/net.4"] = uses[1].norm().item()
        metrics[f"shared_grad_cosine/{name}"] = F.cosine_similarity(uses[0].flatten(), uses[1].flatten(), 0).item()
        metrics[f"grad_norm/{name}"] = (uses[0] + uses[1]).norm().item()
    for i in (0, 5):
        for local in ("weight", "bias"):
            p = getattr(twin[i], local)
            metrics[f"grad_norm/net.{i}.{local}"] = p.grad.double().norm().item()
            metrics[f"weight_norm/net.{i}.{local}"] = p.detach().double().norm().item()
            metrics[f"weight_mean/net.{i}.{local}"] = p.detach().double().mean().item()
    return metrics


@pytest.mark.distributed
@pytest.mark.slow
def test_ddp_matches_single_process_and_issues_two_collectives_per_logging_step(tmp_path: Path) -> None:
    def attempt(out: Path) -> None:
        os.environ["MASTER_ADDR"] = "127.0.0.1"
        os.environ["MASTER_PORT"] = str(free_port())
        trainer = make_trainer(
            out,
            CountingMonitor(str(out), log_every_n_steps=LOG_EVERY),
            devices=WORLD,
            strategy="ddp_spawn",
            max_steps=STEPS,
            log_every_n_steps=50,  # the monitor's own interval; Lightning's default for self.log
            logger=TensorBoardLogger(str(out), name="", version="run"),
        )
        trainer.fit(SharedClassifier())

    tmp_path = retry_if_killed(attempt, tmp_path)
    logged = read_scalars(tmp_path / "run")
    reference = single_process_reference(STEPS)
    for step, want in reference.items():
        got = {tag: values[step] for tag, values in logged.items() if step in values}
        assert_metrics_close(got, want)
        assert got["shared_grad_error/net.2.weight"] < 1e-5
    assert set(next(iter(logged.values()))) == set(reference), "logged on other steps than expected"
    for rank in range(WORLD):
        counts = json.loads((tmp_path / f"counts_rank{rank}.json").read_text())
        # a logging step: the ranks agree on the uses (all-gather), then average them (all-reduce)
        assert counts == {"0": 0, "1": 2, "2": 0, "3": 2}, f"rank {rank}: {counts}"


# -- FSDP2 with the framework-free watcher --------------------------------------------------
def _fsdp_worker(rank: int, port: int, out_dir: str) -> None:
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=WORLD)
    try:
        mesh = init_device_mesh("cpu", (WORLD,))
        results = {
            "whole": _fsdp_case(rank, mesh, fully_shard, shard=lambda net: [net], same_data=False),
            # only some layers sharded: the plain ones are replicated and must be counted once
            "partial": _fsdp_case(rank, mesh, fully_shard, shard=lambda net: [net[0], net[2]], same_data=True),
        }
        Path(out_dir, f"fsdp_rank{rank}.json").write_text(json.dumps(results))
        # both ranks done before either tears gloo down: a rank leaving early can abort the other
        # ("terminate called without an active exception", seen once in a full CI run)
        dist.barrier()
    finally:
        dist.destroy_process_group()


def _fsdp_case(
    rank: int,
    mesh: Any,
    fully_shard: Callable[..., Any],
    shard: Callable[[nn.Sequential], list[nn.Module]],
    same_data: bool,
) -> dict[str, Any]:
    # Odd sizes (7 rows over 2 ranks) so that the shards are uneven.
    torch.manual_seed(0)
    shared = nn.Linear(7, 7)
    net = nn.Sequential(nn.Linear(5, 7), nn.Tanh(), shared, nn.Tanh(), shared, nn.Linear(7, 3))
    reference = copy.deepcopy(net)
    g = torch.Generator().manual_seed(2)
    x, y = torch.randn(2 * BATCH, 5, generator=g), torch.randint(0, 3, (2 * BATCH,), generator=g)
    F.cross_entropy(reference(x), y).backward()
    want = ParameterWatcher(reference, track_shared=False).compute()

    for module in shard(net):
        fully_shard(module, mesh=mesh)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        watcher = ParameterWatcher(net, track_shared=True, aggregate_depth=1)
    local = slice(None) if same_data else slice(rank * BATCH, (rank + 1) * BATCH)
    watcher.start_step()
    watcher.begin_forward()
    F.cross_entropy(net(x[local]), y[local]).backward()
    with count_collectives() as calls:
        packed, layout = watcher.pack(group=reduction_group())
        packed = watcher.reduce(packed, layout, reduction_group())
    watcher.end_step()
    values = packed.tolist()
    return {
        "want": want,
        "got": finalize(values, layout),
        "got_by_module": finalize(values, layout, aggregate_depth=1),
        "want_by_module": _by_module(reference),
        "collectives": calls,
        "warnings": [str(w.message) for w in caught if "param_monitor" in str(w.message)],
        "tracking": watcher.tracker is not None,
    }


def _by_module(net: nn.Module) -> dict[str, float]:
    packed, layout = pack(list(net.named_parameters()), {})
    return finalize(packed.tolist(), layout, aggregate_depth=1)


@pytest.mark.distributed
@pytest.mark.slow
def test_fsdp2_local_shards_match_the_unsharded_model(tmp_path: Path) -> None:
    tmp_path = spawn_workers(_fsdp_worker, tmp_path)
    for rank in range(WORLD):
        results = json.loads((tmp_path / f"fsdp_rank{rank}.json").read_text())
        for case, r in results.items():
            assert r["got"].keys() == r["want"].keys(), case
            assert_metrics_close(r["got"], r["want"])
            assert_metrics_close(r["got_by_module"], r["want_by_module"])
            # the ranks agree on the uses (none walked here), then the one all-reduce of the sharded sums
            assert r["collectives"] == ["all_gather", "all_reduce"], f"{case}: {r['collectives']}"
            assert r["tracking"]  # per-use tracking stays on under FSDP2 (tests/test_fsdp.py checks its values)
            assert not r["warnings"], f"{case} rank {rank}: {r['warnings']}"


# -- FSDP2 through Lightning's ModelParallelStrategy ---------------------------------------
FSDP_STEPS = 3


def plain_mlp() -> nn.Sequential:
    """No shared layer; 7 rows over 2 ranks and a 3-element bias, so the shards are uneven."""
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(4, 7), nn.Tanh(), nn.Linear(7, 7), nn.Tanh(), nn.Linear(7, 3))


class ShardedClassifier(SharedClassifier):
    """``fully_shard`` on every Linear and on the Sequential, over the strategy's data-parallel mesh."""

    def __init__(self) -> None:
        pl.LightningModule.__init__(self)
        self.net = plain_mlp()

    def configure_model(self) -> None:
        from torch.distributed.fsdp import fully_shard

        mesh = self.device_mesh["data_parallel"]
        for layer in self.net:
            if isinstance(layer, nn.Linear):
                fully_shard(layer, mesh=mesh)
        fully_shard(self.net, mesh=mesh)


def _model_parallel_worker(rank: int, port: int, out_dir: str) -> None:
    trainer = model_parallel_trainer(rank, port, out_dir, WORLD, max_steps=FSDP_STEPS, log_every_n_steps=50)
    model = ShardedClassifier()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        trainer.fit(model)
    info = {
        "global_rank": trainer.global_rank,
        "sharded": [type(p).__name__ for p in model.parameters()],
        "warnings": [str(w.message) for w in caught if "param_monitor" in str(w.message)],
    }
    Path(out_dir, f"model_parallel_rank{rank}.json").write_text(json.dumps(info))
    dist.barrier()  # see _fsdp_worker
    dist.destroy_process_group()


def plain_reference(steps: int) -> dict[int, dict[str, float]]:
    """The unsharded MLP on both ranks' batches (mean loss: FSDP averages gradients like DDP), plain torch."""
    net = plain_mlp()
    opt = torch.optim.SGD(net.parameters(), lr=0.5)
    data = dataset(WORLD * BATCH * STEPS)
    out: dict[int, dict[str, float]] = {}
    for step in range(steps):
        x, y = data[step * WORLD * BATCH : (step + 1) * WORLD * BATCH]
        opt.zero_grad()
        F.cross_entropy(net(x), y).backward()
        metrics: dict[str, float] = {}
        for name, p in net.named_parameters():
            metrics[f"weight_mean/net.{name}"] = p.detach().double().mean().item()
            metrics[f"weight_norm/net.{name}"] = p.detach().double().norm().item()
            metrics[f"grad_norm/net.{name}"] = p.grad.double().norm().item()
        metrics["grad_norm_total"] = math.sqrt(sum(p.grad.double().square().sum().item() for p in net.parameters()))
        out[step] = metrics
        opt.step()
    return out


@pytest.mark.distributed
@pytest.mark.slow
def test_lightning_model_parallel_fsdp2_matches_single_process(tmp_path: Path) -> None:
    tmp_path = spawn_workers(_model_parallel_worker, tmp_path)
    for rank in range(WORLD):
        info = json.loads((tmp_path / f"model_parallel_rank{rank}.json").read_text())
        assert info["global_rank"] == rank
        assert set(info["sharded"]) == {"DTensor"}, info["sharded"]  # fully_shard really ran
        # shared-use tracking stays on: nothing to warn about
        assert not info["warnings"], f"rank {rank}: {info['warnings']}"

    assert len(list((tmp_path / "run").glob("events.out.tfevents.*"))) == 1  # only rank 0 writes
    logged = read_scalars(tmp_path / "run")
    reference = plain_reference(FSDP_STEPS)
    assert set(logged) == set(reference[0]), sorted(set(logged) ^ set(reference[0]))
    for tag, values in logged.items():
        assert set(values) == set(reference), f"{tag} logged on steps {sorted(values)}"
    for step, want in reference.items():
        assert_metrics_close({tag: values[step] for tag, values in logged.items()}, want)


# -- aggregation per module (single process, fast) ------------------------------------------
def test_aggregate_depth_keeps_shared_metrics_per_parameter() -> None:
    net = shared_net()
    watcher = ParameterWatcher(net, aggregate_depth=1)
    watcher.start_step()
    watcher.begin_forward()
    x, y = dataset(16)[:]
    loss = F.cross_entropy(net(x), y)
    watcher.before_backward(loss)
    loss.backward()
    metrics = watcher.compute()
    assert {k for k in metrics if k.startswith("grad_norm")} == {
        "grad_norm/0",
        "grad_norm/2",
        "grad_norm/5",
        "grad_norm_total",
    }
    assert metrics["shared_grad_error/2.weight"] < 1e-6
    assert "shared_grad/2.weight/2" in metrics and "shared_grad/2.weight/4" in metrics


def test_callback_aggregates_and_rejects_bad_depth(tmp_path: Path) -> None:
    from lightning.pytorch.utilities.exceptions import MisconfigurationException

    with pytest.raises(MisconfigurationException):
        ParameterMonitor(aggregate_depth=0)
    trainer = make_trainer(
        tmp_path,
        ParameterMonitor(aggregate_depth=2),
        max_steps=2,
        logger=TensorBoardLogger(str(tmp_path), name="", version="run"),
    )
    trainer.fit(SharedClassifier())
    tags = set(read_scalars(tmp_path / "run"))
    assert {t for t in tags if t.startswith("grad_norm")} == {
        "grad_norm/net.0",
        "grad_norm/net.2",
        "grad_norm/net.5",
        "grad_norm_total",
    }
    assert "shared_grad/net.2.weight/net.4" in tags


# -- DDP ranks that diverge ---------------------------------------------------------------------
# step: (rank 0's branch, rank 1's branch). "twice": the shared layer at two calls; "once": one call;
# "none": not at all; "root": one call and one `F.linear` in the LightningModule's own forward (as
# many uses as "twice", at other sites: same buffer sizes, different meaning).
# Each fit: step 0 and 2 agree, step 1 diverges as named (one fit each: on the old code each failed its own way).
DIVERGENCES = {  # case: (rank 1's branch at step 1, each rank's use count)
    "branch skipped on one rank": ("once", [2, 1]),
    "one rank without uses": ("none", [2, 0]),
    "same buffer sizes, other uses": ("root", [2, 2]),
}
DIVERGED_STEP = 1


def branches_of(case: str) -> dict[int, tuple[str, str]]:
    return {0: ("twice", "twice"), 1: ("twice", DIVERGENCES[case][0]), 2: ("twice", "twice")}


def branch_forward(m: nn.Module, x: torch.Tensor, branch: str, use: Callable[[int, torch.Tensor], torch.Tensor]):
    """The branchy model's maths; ``use(i, h)`` applies the i-th use of the shared layer."""
    h = torch.tanh(m.inp(x))
    if branch in ("twice", "root"):
        h = torch.tanh(use(1, torch.tanh(use(0, h))))
    elif branch == "once":
        h = torch.tanh(m.other(torch.tanh(use(0, h))))
    else:
        h = torch.tanh(m.other(h))
    return m.out(h)


class Branchy(pl.LightningModule):
    def __init__(self, case: str) -> None:
        super().__init__()
        self.branches = branches_of(case)
        torch.manual_seed(0)
        self.inp, self.shared, self.other, self.out = nn.Linear(4, 6), nn.Linear(6, 6), nn.Linear(6, 6), nn.Linear(6, 3)

    def forward(self, x: torch.Tensor, branch: str) -> torch.Tensor:
        def use(i: int, h: torch.Tensor) -> torch.Tensor:
            if branch == "root" and i == 1:  # a use in this module's own forward: site <root>
                return F.linear(h, self.shared.weight, self.shared.bias)
            return self.shared(h)

        return branch_forward(self, x, branch, use)

    def training_step(self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int) -> torch.Tensor:
        x, y = batch
        return F.cross_entropy(self(x, self.branches[batch_idx][self.global_rank]), y)

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SGD(self.parameters(), lr=0.5)

    def train_dataloader(self) -> DataLoader:
        data = dataset(WORLD * BATCH * len(self.branches))
        return DataLoader(data, batch_size=BATCH, sampler=DistributedSampler(data, shuffle=False))


def _diverging_worker(rank: int, port: int, out_dir: str, case: str) -> None:
    from datetime import timedelta

    from lightning.pytorch.strategies import DDPStrategy

    # LOCAL_RANK: Lightning treats the processes as launched externally (its launcher would re-run pytest)
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), LOCAL_RANK=str(rank), NODE_RANK="0")
    torch.set_num_threads(1)
    trainer = make_trainer(
        Path(out_dir),
        ParameterMonitor(log_every_n_steps=1),
        devices=WORLD,
        # a short timeout: a rank left waiting in a collective fails the test in 30 s, not 30 minutes
        strategy=DDPStrategy(find_unused_parameters=True, timeout=timedelta(seconds=30)),
        max_steps=len(branches_of(case)),
        logger=TensorBoardLogger(out_dir, name="", version="run"),
    )
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        trainer.fit(Branchy(case))
    messages = [str(w.message) for w in caught if "param_monitor" in str(w.message)]
    Path(out_dir, f"rank{rank}.json").write_text(json.dumps(messages))
    dist.barrier()
    dist.destroy_process_group()


def grads_of(model: nn.Module) -> list[tuple[str, nn.Parameter]]:
    return [(n, p) for n, p in model.named_parameters() if p.grad is not None]


def diverging_reference(case: str) -> dict[int, dict[str, float]]:
    """Single process: each step's loss is the mean over the ranks of each rank's loss on its own branch
    (DDP's averaged gradient); per-use contributions from separate copies of the shared layer per use."""
    model = Branchy(case)
    opt = torch.optim.SGD(model.parameters(), lr=0.5)
    x, y = dataset(WORLD * BATCH * len(model.branches))[:]
    out: dict[int, dict[str, float]] = {}
    for step, branches in model.branches.items():
        shared = (model.shared.weight, model.shared.bias)
        copies = [[p.detach().clone().requires_grad_() for p in shared] for _ in range(2)]

        def copy_use(i: int, h: torch.Tensor, copies: list[list[torch.Tensor]] = copies) -> torch.Tensor:
            return F.linear(h, *copies[i])

        opt.zero_grad()
        tied, untied = [], []
        for rank, branch in enumerate(branches):
            rows = list(range(rank, len(x), WORLD))[step * BATCH : (step + 1) * BATCH]
            tied.append(F.cross_entropy(model(x[rows], branch), y[rows]))
            untied.append(F.cross_entropy(branch_forward(model, x[rows], branch, copy_use), y[rows]))
        torch.stack(tied).mean().backward()
        metrics = {f"grad_norm/{n}": p.grad.double().norm().item() for n, p in grads_of(model)}
        if step != DIVERGED_STEP:
            grads = torch.autograd.grad(torch.stack(untied).mean(), [p for c in copies for p in c])
            for i, local in enumerate(("weight", "bias")):
                uses = [grads[i].double(), grads[2 + i].double()]
                for j, u in enumerate(uses):
                    metrics[f"shared_grad/shared.{local}/shared#{j}"] = u.norm().item()
                cosine = F.cosine_similarity(uses[0].flatten(), uses[1].flatten(), 0)
                metrics[f"shared_grad_cosine/shared.{local}"] = cosine.item()
        out[step] = metrics
        opt.step()
    return out


@pytest.mark.distributed
@pytest.mark.slow
@pytest.mark.parametrize("case", list(DIVERGENCES))
def test_ddp_ranks_that_diverge_get_no_per_use_values_one_warning_and_no_hang(tmp_path: Path, case: str) -> None:
    # a rank left waiting in a collective ends in the 30 s process-group timeout: an error, not a hang
    folder = spawn_workers(partial(_diverging_worker, case=case), tmp_path)
    logged = read_scalars(folder / "run")
    for step, want in diverging_reference(case).items():
        got = {tag: values[step] for tag, values in logged.items() if step in values}
        assert_metrics_close(got, want)  # every value written equals the oracle
        shared_tags = [t for t in got if t.startswith("shared_grad") and "/shared." in t]
        if step == DIVERGED_STEP:
            assert not shared_tags, f"step {step}: {shared_tags}"
        else:  # weight and bias: 2 norms, 2 shares, the error, the cosine
            assert len(shared_tags) == 2 * 6, shared_tags
    warned = [w for w in json.loads((folder / "rank0.json").read_text()) if "different uses" in w]
    assert len(warned) == 1, warned
    counts = DIVERGENCES[case][1]
    assert f"at step {DIVERGED_STEP}" in warned[0] and f"uses per rank {counts}" in warned[0], warned[0]
    assert "`shared.weight`" in warned[0] and "`shared.bias`" in warned[0], warned[0]
    assert ("different sites" in warned[0]) == (counts[0] == counts[1]), warned[0]
    assert not json.loads((folder / "rank1.json").read_text())  # rank 0 alone warns
