"""Per-use tracking under FSDP2 (``fully_shard``): 2 gloo processes on CPU, and the private reach it needs.

Oracle: a single process runs the UNTIED twin of the model (the head reads its own copy of the
embedding, so its gradient is that use's contribution) on the concatenated batch of both ranks
(mean loss: FSDP averages the gradients as DDP does). Odd sizes (11 tokens, width 5) make every
shard uneven: rank 0 holds 6 rows, rank 1 holds 5.
"""

from __future__ import annotations

import copy
import json
import math
import os
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any
from unittest.mock import patch

import lightning.pytorch as pl
import pytest
import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.data import DataLoader, DistributedSampler, TensorDataset

from param_monitor import ParameterWatcher, distributed
from param_monitor._internals import fsdp_params, fsdp_unsharded_leaves
from param_monitor.distributed import reduction_group
from param_monitor.stats import finalize
from tests.helpers.events import read_scalars
from tests.helpers.processes import count_collectives, spawn_workers
from tests.helpers.trainers import model_parallel_trainer
from tests.test_distributed import assert_metrics_close

WORLD = 2
VOCAB, WIDTH, SEQ, BATCH = 11, 5, 3, 4  # per rank: BATCH sequences of SEQ tokens
LAYOUTS = ("root", "blocks+root", "[wte,lm_head]+blocks+root")


class TiedLM(nn.Module):
    """Embedding -> 2 residual tanh blocks -> head tied to the embedding (sites ``wte`` and ``lm_head``).

    ``head``: "module" calls ``lm_head``; "root" applies its weight in this forward (site ``<root>``);
    "detached" reads the embedding without gradient (one use left).
    """

    def __init__(self, head: str = "module") -> None:
        super().__init__()
        self.head = head
        torch.manual_seed(0)
        self.wte = nn.Embedding(VOCAB, WIDTH)
        self.blocks = nn.ModuleList(nn.Linear(WIDTH, WIDTH) for _ in range(2))
        self.lm_head = nn.Linear(WIDTH, VOCAB, bias=False)
        self.lm_head.weight = self.wte.weight

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.wte(x)
        for block in self.blocks:
            h = h + torch.tanh(block(h))
        if self.head == "root":
            return F.linear(h, self.lm_head.weight)
        if self.head == "detached":
            return F.linear(h, self.wte.weight.detach())
        return self.lm_head(h)


def lm_loss(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    return F.cross_entropy(model(x).reshape(-1, VOCAB), y.reshape(-1))


def tokens(n: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, VOCAB, (n, SEQ), generator=g), torch.randint(0, VOCAB, (n, SEQ), generator=g)


def untied_twin(model: TiedLM) -> TiedLM:
    twin = copy.deepcopy(model)
    twin.lm_head.weight = nn.Parameter(model.wte.weight.detach().clone())
    return twin


def oracle(
    model: TiedLM, batches: list[tuple[torch.Tensor, torch.Tensor]], untracked: int = 0
) -> dict[str, float]:
    """Metrics of the tied model's gradient, per-use values from the untied twin; ``batches``: micro-batches
    of the concatenated data (the mean loss of each, summed over micro-batches, as backward accumulates).
    The first ``untracked`` ones ran before tracking began: their gradient is the site ``<earlier>``."""
    twin = untied_twin(model)
    earlier = torch.zeros_like(model.wte.weight, dtype=torch.float64)
    for x, y in batches[:untracked]:
        earlier += torch.autograd.grad(lm_loss(model, x, y), model.wte.weight)[0].double()
    for x, y in batches[untracked:]:
        lm_loss(twin, x, y).backward()
    uses = {"<earlier>": earlier} if untracked else {}
    uses.update(wte=twin.wte.weight.grad.double(), lm_head=twin.lm_head.weight.grad.double())
    total = sum(uses.values())
    out = {f"shared_grad/wte.weight/{site}": u.norm().item() for site, u in uses.items()}
    for site, u in uses.items():
        out[f"shared_grad_share/wte.weight/{site}"] = (u * total).sum().item() / total.square().sum().item()
    flat = [u.flatten() for u in uses.values()]
    cosines = [F.cosine_similarity(a, b, 0).item() for i, a in enumerate(flat) for b in flat[i + 1 :]]
    out["shared_grad_cosine/wte.weight"] = sum(cosines) / len(cosines)
    out["grad_norm/wte.weight"] = total.norm().item()
    tied = copy.deepcopy(model)  # the other parameters' gradients: every micro-batch
    for x, y in batches:
        lm_loss(tied, x, y).backward()
    for name, p in tied.named_parameters():
        if name.startswith("blocks"):
            out[f"grad_norm/{name}"] = p.grad.double().norm().item()
            out[f"weight_norm/{name}"] = p.detach().double().norm().item()
    out["weight_norm/wte.weight"] = model.wte.weight.detach().double().norm().item()
    return out


def shard(model: TiedLM, layout: str, mesh: Any, **kwargs: Any) -> TiedLM:
    from torch.distributed.fsdp import fully_shard

    if layout != "root":
        for block in model.blocks:
            fully_shard(block, mesh=mesh, **kwargs)
    if layout == "[wte,lm_head]+blocks+root":
        fully_shard([model.wte, model.lm_head], mesh=mesh, **kwargs)
    fully_shard(model, mesh=mesh, **kwargs)
    return model


# -- the watcher on 2 processes ---------------------------------------------------------------
CASES = {  # name: (layout, micro-batches, of which untracked: run before tracking began)
    **{layout: (layout, 1, 0) for layout in LAYOUTS},
    "blocks+root, 2 micro-batches": ("blocks+root", 2, 0),
    "blocks+root, an untracked micro-batch first": ("blocks+root", 2, 1),
}


def _watcher_worker(rank: int, port: int, out_dir: str) -> None:
    from datetime import timedelta

    from torch.distributed.device_mesh import init_device_mesh

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    # a short timeout: a rank left waiting in a collective fails the test in 30 s, not 30 minutes
    dist.init_process_group("gloo", rank=rank, world_size=WORLD, timeout=timedelta(seconds=30))
    try:
        mesh = init_device_mesh("cpu", (WORLD,))
        results = {case: _watcher_case(rank, mesh, *spec) for case, spec in CASES.items()}
        results["bf16"] = _bf16_case(rank, mesh)
        with patch.object(distributed, "SEND_BUFFER_BYTES", 2 * WIDTH):  # one column (6 padded rows x 4 B) a time
            results["sliced send buffer"] = _watcher_case(rank, mesh, "blocks+root", 1, 0)
        for case, heads in DIVERGING.items():
            results[case] = _watcher_case(rank, mesh, "blocks+root", 1, 0, head=heads[rank])
        Path(out_dir, f"rank{rank}.json").write_text(json.dumps(results))
        dist.barrier()  # both ranks done before either tears gloo down
    finally:
        dist.destroy_process_group()


def _watcher_case(
    rank: int, mesh: Any, layout: str, micro: int, untracked: int, head: str = "module", **kwargs: Any
) -> dict[str, Any]:
    model = shard(TiedLM(head), layout, mesh, **kwargs)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        watcher = ParameterWatcher(model)
        for m in range(micro):
            x, y = tokens(WORLD * BATCH, seed=10 + m)
            mine = slice(rank * BATCH, (rank + 1) * BATCH)
            if m == untracked:
                watcher.start_step()
            watcher.begin_forward()
            loss = lm_loss(model, x[mine], y[mine])
            watcher.before_backward(loss)
            loss.backward()
            watcher.after_backward()
        uses = watcher.tracker.contributions() if watcher.tracker is not None else {}
        held = {site: list(t.shape) for sites in uses.values() for site, t in sites.items()}
        with count_collectives() as calls:
            packed, layout_ = watcher.pack(group=reduction_group())
            packed = watcher.reduce(packed, layout_, reduction_group())
        watcher.end_step()
    return {
        "got": finalize(packed.tolist(), layout_),
        "collectives": calls,
        "warnings": [str(w.message) for w in caught if "param_monitor" in str(w.message)],
        "local_rows": model.wte.weight.to_local().shape[0],
        "held_shapes": held,
    }


def _bf16_case(rank: int, mesh: Any) -> dict[str, Any]:
    from torch.distributed.fsdp import MixedPrecisionPolicy

    try:
        policy = MixedPrecisionPolicy(param_dtype=torch.bfloat16)
        return _watcher_case(rank, mesh, "blocks+root", 1, 0, mp_policy=policy)
    except Exception as error:  # noqa: BLE001 - reported by the test
        return {"error": f"{type(error).__name__}: {error}"}


@pytest.fixture(scope="module")
def fsdp_results(tmp_path_factory: pytest.TempPathFactory) -> list[dict[str, Any]]:
    folder = spawn_workers(_watcher_worker, tmp_path_factory.mktemp("fsdp"))
    return [json.loads((folder / f"rank{rank}.json").read_text()) for rank in range(WORLD)]


def _want(case: str) -> dict[str, float]:
    _, micro, untracked = CASES[case]
    return oracle(TiedLM(), [tokens(WORLD * BATCH, seed=10 + m) for m in range(micro)], untracked)


@pytest.mark.distributed
@pytest.mark.parametrize("case", list(CASES))
def test_fsdp2_per_use_tags_equal_the_single_process_oracle(fsdp_results: list[dict[str, Any]], case: str) -> None:
    want = _want(case)
    for rank, results in enumerate(fsdp_results):
        r = results[case]
        assert r["local_rows"] == (6 if rank == 0 else 5)  # uneven shards really
        assert_metrics_close(r["got"], want)
        assert r["got"]["shared_grad_error/wte.weight"] < 1e-5
        assert not r["warnings"], r["warnings"]
        # each use was reduce-scattered in its hook: only this rank's rows of it are held until the statistics
        assert r["held_shapes"]["wte"] == r["held_shapes"]["lm_head"] == [r["local_rows"], WIDTH]
        # the statistics: the agreement (all-gather) and the one all-reduce; the uses were reduce-scattered in backward
        assert r["collectives"] == ["all_gather", "all_reduce"], r["collectives"]


@pytest.mark.distributed
def test_fsdp2_reduce_scatter_in_column_slices(fsdp_results: list[dict[str, Any]]) -> None:
    """A small send buffer: each use goes out in one-column slices (5 reduce-scatters), values unchanged."""
    want = _want("root")
    for results in fsdp_results:
        assert_metrics_close(results["sliced send buffer"]["got"], want)


@pytest.mark.distributed
def test_fsdp2_bf16_mixed_precision_per_use_tags(fsdp_results: list[dict[str, Any]]) -> None:
    """``MixedPrecisionPolicy(param_dtype=bf16)``: the uses are bf16 gradients (reduced in fp32 by the monitor)."""
    want = _want("blocks+root")
    for results in fsdp_results:
        r = results["bf16"]
        assert "error" not in r, r
        got = r["got"]
        for site in ("wte", "lm_head"):  # bf16 forward and backward: ~1e-2 from the fp32 oracle
            key = f"shared_grad/wte.weight/{site}"
            assert math.isclose(got[key], want[key], rel_tol=3e-2), (key, got[key], want[key])
        shares = [got[f"shared_grad_share/wte.weight/{s}"] for s in ("wte", "lm_head")]
        assert math.isclose(sum(shares), 1.0, rel_tol=1e-9)
        assert got["shared_grad_error/wte.weight"] < 2e-2  # FSDP reduces the gradient itself in bf16


# -- FSDP2 ranks that diverge (inside one FSDP unit: FSDP itself copes) ---------------------------
DIVERGING = {  # case: each rank's head
    "diverging: one use skipped": ("module", "detached"),
    "diverging: as many uses, other sites": ("module", "root"),
}


@pytest.mark.distributed
@pytest.mark.parametrize("case", list(DIVERGING))
def test_fsdp2_ranks_that_diverge_get_no_per_use_values_and_one_warning(
    fsdp_results: list[dict[str, Any]], case: str
) -> None:
    heads = DIVERGING[case]
    x, y = tokens(WORLD * BATCH, seed=10)
    model = TiedLM()
    for rank, head in enumerate(heads):  # the mean of the ranks' losses: the gradient FSDP averages
        model.head = head
        mine = slice(rank * BATCH, (rank + 1) * BATCH)
        (lm_loss(model, x[mine], y[mine]) / WORLD).backward()
    want = {f"grad_norm/{n}": p.grad.double().norm().item() for n, p in model.named_parameters()}
    counts = [2, 1] if heads[1] == "detached" else [2, 2]
    for rank, results in enumerate(fsdp_results):
        r = results[case]
        assert_metrics_close(r["got"], want)  # what is written is right
        assert not [k for k in r["got"] if k.startswith("shared_grad")], r["got"]
        assert r["collectives"] == ["all_gather", "all_reduce"], r["collectives"]
        if rank == 0:
            assert len(r["warnings"]) == 1, r["warnings"]
            assert f"`wte.weight`: uses per rank {counts}" in r["warnings"][0]
        else:
            assert not r["warnings"]


# -- the private reach (one process, fast) ----------------------------------------------------
@contextmanager
def one_process(tmp_path: Path) -> Iterator[None]:
    """A world of one process (FSDP2 needs a process group), ours alone, torn down after."""
    assert not dist.is_initialized(), "an earlier test left a process group up (it must destroy it)"
    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'store'}", rank=0, world_size=1)
    try:
        yield
    finally:
        dist.destroy_process_group()


def test_fsdp_private_reach_maps_every_graph_leaf_to_a_registered_parameter(tmp_path: Path) -> None:
    """Fails loudly if FSDP2 renames what ``_internals`` reads (``_get_fsdp_state``, ``_fsdp_param_groups``,
    ``fsdp_params``, ``sharded_param``, ``_unsharded_param``): per-use tracking under FSDP2 depends on it."""
    from torch.distributed.device_mesh import init_device_mesh

    with one_process(tmp_path):
        model = shard(TiedLM(), "[wte,lm_head]+blocks+root", init_device_mesh("cpu", (1,)))
        registered = {id(p) for p in model.parameters()}
        records = list(fsdp_params(model))
        assert {id(r.sharded_param) for r in records} == registered, "FSDP2 renamed `sharded_param`?"
        x, y = tokens(BATCH, seed=1)
        loss = lm_loss(model, x, y)
        leaves = fsdp_unsharded_leaves(model)
        assert leaves, "FSDP2 renamed `FSDPParam._unsharded_param`: per-use tracking cannot find the uses"
        stack, seen, graph_leaves = [loss.grad_fn], set(), []
        while stack:
            node = stack.pop()
            for nxt, _ in node.next_functions:
                if nxt is not None and nxt not in seen:
                    seen.add(nxt)
                    stack.append(nxt)
                    if type(nxt).__name__ == "AccumulateGrad":
                        graph_leaves.append(nxt.variable)
        assert graph_leaves and all(id(v) in leaves for v in graph_leaves), "a graph leaf is not an unsharded parameter"
        assert {id(leaves[id(v)]) for v in graph_leaves} == registered
        loss.backward()


def tracked_backward(watcher: ParameterWatcher, model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> None:
    """One tracked forward and backward of ``model`` on ``(x, y)``; the watcher's step stays open."""
    watcher.start_step()
    watcher.begin_forward()
    loss = lm_loss(model, x, y)
    watcher.before_backward(loss)
    loss.backward()
    watcher.after_backward()


def test_fsdp2_one_process_per_use_tags_equal_the_oracle(tmp_path: Path) -> None:
    """World size 1 (fast): the walk finds the uses through the unsharded parameters."""
    from torch.distributed.device_mesh import init_device_mesh

    with one_process(tmp_path):
        model = shard(TiedLM(), "blocks+root", init_device_mesh("cpu", (1,)))
        watcher = ParameterWatcher(model)
        x, y = tokens(BATCH, seed=3)
        tracked_backward(watcher, model, x, y)
        got = watcher.compute()
    assert_metrics_close(got, oracle(TiedLM(), [(x, y)]))


class CheckpointedLM(TiedLM):
    """The first block inside a reentrant checkpointed segment (its own backward, opaque to the walk)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        from torch.utils.checkpoint import checkpoint

        first, second = self.blocks
        h = self.wte(x)
        h = checkpoint(lambda t: t + torch.tanh(first(t)), h, use_reentrant=True)
        h = h + torch.tanh(second(h))
        return self.lm_head(h)


def test_fsdp2_reentrant_checkpointing_names_the_parameters_inside_the_segment(tmp_path: Path) -> None:
    """Under FSDP2 the segment's own backward accumulates into the UNSHARDED parameters: those are the
    accumulators to watch, or its parameters go unreported (as on one process without FSDP)."""
    from torch.distributed.device_mesh import init_device_mesh

    with one_process(tmp_path):
        model = shard(CheckpointedLM(), "blocks+root", init_device_mesh("cpu", (1,)))
        watcher = ParameterWatcher(model)
        x, y = tokens(BATCH, seed=3)
        tracked_backward(watcher, model, x, y)
        unattributed = watcher.tracker.unattributed()
        watcher.end_step()
    assert sorted(unattributed) == ["blocks.0.bias", "blocks.0.weight"], unattributed
    assert all("reentrant" in why for why in unattributed.values())


def test_fsdp2_other_shard_dim_is_not_tracked_and_says_so(tmp_path: Path) -> None:
    """``Shard(-1)``: a use's rows are not this rank's rows, so it cannot be reduce-scattered into them:
    one warning naming the parameter, no per-use values, the per-tensor statistics as ever."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard
    from torch.distributed.tensor import Shard

    with one_process(tmp_path):
        model = TiedLM()
        fully_shard(model, mesh=init_device_mesh("cpu", (1,)), shard_placement_fn=lambda p: Shard(p.dim() - 1))
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            watcher = ParameterWatcher(model)
        x, y = tokens(BATCH, seed=3)
        tracked_backward(watcher, model, x, y)
        got = watcher.compute()
    ours = [str(w.message) for w in caught if "param_monitor" in str(w.message)]
    assert len(ours) == 1 and "Shard(0)" in ours[0] and "wte.weight" in ours[0], ours
    assert not [k for k in got if k.startswith("shared_grad")], got
    want = oracle(TiedLM(), [(x, y)])
    assert_metrics_close(got, {k: v for k, v in want.items() if not k.startswith("shared_grad")})


# -- end to end: Lightning's ModelParallelStrategy, fully_shard in configure_model --------------
STEPS = 3


class ShardedLM(pl.LightningModule):
    def __init__(self) -> None:
        super().__init__()
        self.model = TiedLM()

    def configure_model(self) -> None:
        shard(self.model, "[wte,lm_head]+blocks+root", self.device_mesh["data_parallel"])

    def training_step(self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int) -> torch.Tensor:
        return lm_loss(self.model, *batch)

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SGD(self.parameters(), lr=0.5)

    def train_dataloader(self) -> DataLoader:
        data = TensorDataset(*tokens(WORLD * BATCH * STEPS, seed=5))
        return DataLoader(data, batch_size=BATCH, sampler=DistributedSampler(data, shuffle=False))


def _lightning_worker(rank: int, port: int, out_dir: str) -> None:
    trainer = model_parallel_trainer(rank, port, out_dir, WORLD, max_steps=STEPS)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        trainer.fit(ShardedLM())
    ours = ("param_monitor", "ParameterMonitor")
    messages = [str(w.message) for w in caught if any(k in str(w.message) for k in ours)]
    Path(out_dir, f"rank{rank}.json").write_text(json.dumps(messages))
    dist.barrier()
    dist.destroy_process_group()


def reference(steps: int) -> dict[int, dict[str, float]]:
    """The unsharded tied model trained on both ranks' batches (SGD 0.5), oracle metrics before each step."""
    model = TiedLM()
    opt = torch.optim.SGD(model.parameters(), lr=0.5)
    x, y = tokens(WORLD * BATCH * STEPS, seed=5)
    out = {}
    for step in range(steps):
        # DistributedSampler(shuffle=False): rank r gets rows r, r+2, ...; its batch b the next BATCH of those
        rows = [r for rank in range(WORLD) for r in range(rank, len(x), WORLD)[step * BATCH : (step + 1) * BATCH]]
        out[step] = {  # names and sites inside the LightningModule: under `model.`
            "/".join([tag, *(f"model.{part}" for part in parts)]): v
            for (tag, *parts), v in ((key.split("/"), v) for key, v in oracle(model, [(x[rows], y[rows])]).items())
        }
        opt.zero_grad()
        lm_loss(model, x[rows], y[rows]).backward()
        opt.step()
    return out


@pytest.mark.distributed
@pytest.mark.slow
def test_model_parallel_strategy_per_use_tags_equal_the_oracle(tmp_path: Path) -> None:
    folder = spawn_workers(_lightning_worker, tmp_path)
    for rank in range(WORLD):
        assert json.loads((folder / f"rank{rank}.json").read_text()) == []  # tracking on, nothing to warn about
    logged = read_scalars(folder / "run")
    for step, want in reference(STEPS).items():
        got = {tag: values[step] for tag, values in logged.items() if step in values}
        assert_metrics_close(got, want)
        assert got["shared_grad_error/model.wte.weight"] < 1e-5
