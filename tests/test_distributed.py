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
from tests.helpers.trainers import make_trainer

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
def test_ddp_matches_single_process_and_issues_one_collective_per_logging_step(tmp_path: Path) -> None:
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
        assert counts == {"0": 0, "1": 1, "2": 0, "3": 1}, f"rank {rank}: {counts}"


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
        "warnings": [str(w.message) for w in caught if "sharded" in str(w.message)],
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
            assert r["collectives"] == ["all_reduce"], f"{case}: {r['collectives']}"
            assert not r["tracking"]
            # one warning, from rank 0 only
            assert len(r["warnings"]) == (1 if rank == 0 else 0), f"{case} rank {rank}: {r['warnings']}"


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
    from lightning.pytorch.strategies import ModelParallelStrategy

    # LOCAL_RANK makes Lightning's environment treat the processes as launched externally (as torchrun does);
    # its own launcher would re-run `sys.argv`, i.e. pytest.
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), LOCAL_RANK=str(rank), NODE_RANK="0")
    torch.set_num_threads(1)
    trainer = make_trainer(
        Path(out_dir),
        ParameterMonitor(log_every_n_steps=1),
        devices=WORLD,
        strategy=ModelParallelStrategy(data_parallel_size=WORLD, tensor_parallel_size=1),
        max_steps=FSDP_STEPS,
        log_every_n_steps=50,
        logger=TensorBoardLogger(out_dir, name="", version="run"),
    )
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
        # the shared-use tracking is switched off once, on rank 0 only
        want_warnings = 1 if rank == 0 else 0
        assert [w for w in info["warnings"] if "sharded" in w] == info["warnings"], info["warnings"]
        assert len(info["warnings"]) == want_warnings, f"rank {rank}: {info['warnings']}"

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
