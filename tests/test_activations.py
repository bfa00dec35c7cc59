"""Activation statistics against the outputs the modules themselves produced (forward hooks of the test's own)."""

from __future__ import annotations

import math
from functools import partial
from pathlib import Path

import lightning.pytorch as pl
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

from param_monitor import ParameterMonitor
from param_monitor._lightning import step_label
from param_monitor.activations import ActivationStats, finalize
from tests.helpers.modules import fit


def _recorder(module: nn.Module, record: list[torch.Tensor]) -> torch.utils.hooks.RemovableHandle:
    """The module's own outputs, call by call (a hook on the module, independent of the global ones)."""
    return module.register_forward_hook(lambda m, args, out: record.append(out.detach().double().clone()))


def _oracle(outputs: list[torch.Tensor]) -> tuple[float, float, float]:
    x = torch.cat([o.flatten() for o in outputs])
    return x.mean().item(), x.std(correction=0).item(), (x == 0).double().mean().item()


def _measure(stats: ActivationStats, forwards: list) -> dict[str, float]:
    stats.start()
    for forward in forwards:
        stats.begin_forward()
        forward()
    stats.stop()
    packed, sites = stats.pack()
    return finalize(packed.tolist(), sites)


def _assert_site(metrics: dict[str, float], site: str, outputs: list[torch.Tensor]) -> None:
    mean, std, zeros = _oracle(outputs)
    # float32 accumulation of the centred values (partial_sums): about 1e-7 relative
    assert metrics[f"activation_mean/{site}"] == pytest.approx(mean, rel=1e-6, abs=1e-9)
    assert metrics[f"activation_std/{site}"] == pytest.approx(std, rel=1e-6)
    assert metrics[f"activation_zero_frac/{site}"] == zeros


def test_shared_relu_over_two_micro_batches_matches_its_own_outputs() -> None:
    torch.manual_seed(0)
    relu = nn.ReLU()
    net = nn.Sequential(nn.Linear(3, 8), relu, nn.Linear(8, 8), relu, nn.Linear(8, 2))
    first, relu_calls, last = [], [], []
    handles = [_recorder(net[0], first), _recorder(relu, relu_calls), _recorder(net[4], last)]
    batches = [torch.randn(5, 3), torch.randn(7, 3)]
    metrics = _measure(ActivationStats(net), [lambda b=b: net(b).sum().backward() for b in batches])
    for h in handles:
        h.remove()
    # the relu is called twice per forward: calls 0, 2 are site "1" (its first path), calls 1, 3 site "3"
    _assert_site(metrics, "0", first)
    _assert_site(metrics, "1", relu_calls[0::2])
    _assert_site(metrics, "3", relu_calls[1::2])
    _assert_site(metrics, "4", last)
    assert 0 < metrics["activation_zero_frac/1"] < 1  # a ReLU: some exact zeros, not all
    assert "activation_mean/2" in metrics and not any(k.endswith("/") for k in metrics)


class Twice(nn.Module):
    """One Linear called twice by a parent's own forward: sites ``lin#0`` and ``lin#1``."""

    def __init__(self) -> None:
        super().__init__()
        self.lin = nn.Linear(4, 4)
        self.lstm = nn.LSTM(4, 3, batch_first=True)  # a leaf whose output is a tuple

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out, _ = self.lstm(self.lin(torch.tanh(self.lin(x))))
        return out


def test_module_called_twice_gets_numbered_sites_and_tuple_outputs_use_the_first_float_tensor() -> None:
    torch.manual_seed(1)
    model = Twice()
    lin_calls, lstm_calls = [], []
    h1 = _recorder(model.lin, lin_calls)
    h2 = model.lstm.register_forward_hook(lambda m, a, out: lstm_calls.append(out[0].detach().double().clone()))
    batches = [torch.randn(2, 5, 4), torch.randn(3, 5, 4)]
    metrics = _measure(ActivationStats(model), [lambda b=b: model(b) for b in batches])
    h1.remove()
    h2.remove()
    _assert_site(metrics, "lin#0", lin_calls[0::2])
    _assert_site(metrics, "lin#1", lin_calls[1::2])
    _assert_site(metrics, "lstm", lstm_calls)
    assert {k.partition("/")[2] for k in metrics} == {"lin#0", "lin#1", "lstm"}  # leaves only: not the root


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_std_of_outputs_far_from_zero_is_exact_where_float32_sums_of_squares_are_not(dtype: torch.dtype) -> None:
    # mean 3000, std ~1: Σx² in float32 keeps ~7 digits of 9e6 per element, so Σx²/n − mean² is noise;
    # the centred sums keep the std to 1e-6 (bf16 outputs: their own rounded values, widened)
    torch.manual_seed(3)
    net = nn.Sequential(nn.Identity())
    batches = [(3000.0 + torch.randn(20_000)).to(dtype), (3001.0 + 2 * torch.randn(30_000)).to(dtype)]
    outputs: list[torch.Tensor] = []
    handle = _recorder(net[0], outputs)
    metrics = _measure(ActivationStats(net), [lambda b=b: net(b) for b in batches])
    handle.remove()
    _assert_site(metrics, "0", outputs)
    naive = torch.cat([b.float() for b in batches])
    naive_var = (naive.square().sum() / naive.numel() - naive.mean().square()).item()
    assert abs(naive_var - _oracle(outputs)[1] ** 2) > 0.1  # what float32 Σx² would have given: wrong


def test_include_exclude_select_by_module_path() -> None:
    net = nn.Sequential(nn.Linear(2, 2), nn.ReLU(), nn.Sequential(nn.Linear(2, 2), nn.Tanh()))
    x = torch.randn(3, 2)
    only_inner = _measure(ActivationStats(net, include=["2.*"], exclude=["*.1"]), [lambda: net(x)])
    assert {k.partition("/")[2] for k in only_inner} == {"2.0"}


def test_hooks_only_while_started_and_nothing_left_on_the_model() -> None:
    net = nn.Sequential(nn.Linear(2, 2), nn.ReLU())
    stats = ActivationStats(net)
    net(torch.randn(2, 2))  # before start: not counted
    stats.start()
    stats.begin_forward()
    net(torch.ones(1, 2))
    stats.stop()
    net(torch.randn(2, 2))  # after stop: not counted
    packed, sites = stats.pack()
    assert packed.tolist()[0::4] == [2.0, 2.0]  # one call of 2 elements per site
    assert not nn.modules.module._global_forward_hooks and not nn.modules.module._global_forward_pre_hooks
    assert all(not m._forward_hooks and not m._forward_pre_hooks for m in net.modules())


def test_checkpointed_forward_rerun_in_backward_is_not_counted_twice() -> None:
    torch.manual_seed(2)
    inner = nn.Sequential(nn.Linear(3, 3), nn.ReLU())
    calls: list[torch.Tensor] = []
    handle = _recorder(inner[0], calls)
    x = torch.randn(4, 3, requires_grad=True)
    metrics = _measure(
        ActivationStats(inner), [lambda: checkpoint(inner, x, use_reentrant=False).sum().backward()]
    )
    handle.remove()
    assert len(calls) == 2  # the forward, then its re-run inside backward
    _assert_site(metrics, "0", calls[:1])


def test_non_finite_output_gets_no_value_and_is_named() -> None:
    net = nn.ModuleList([nn.Identity(), nn.Identity()])
    stats = ActivationStats(net)
    stats.start()
    net[0](torch.tensor([1.0, math.nan]))
    net[1](torch.tensor([0.0, 1.0]))
    stats.stop()
    packed, sites = stats.pack()
    skipped: list[str] = []
    metrics = finalize(packed.tolist(), sites, skipped)
    assert skipped == ["0"] and "activation_mean/0" not in metrics
    assert (metrics["activation_mean/1"], metrics["activation_std/1"], metrics["activation_zero_frac/1"]) == (
        0.5,
        0.5,
        0.5,
    )


# -- under a real Trainer, read back from the event files ----------------------------------------------
class ReluTwice(pl.LightningModule):
    """A ReLU used twice by a Sequential; the module records its own outputs per step label (the oracle)."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        relu = nn.ReLU()  # registered at net.1 and net.3 only: its sites are those two paths
        self.net = nn.Sequential(nn.Linear(4, 8), relu, nn.Linear(8, 8), relu, nn.Linear(8, 3))
        self.outputs: dict[tuple[int, str], list[torch.Tensor]] = {}
        self._relu_calls = 0

    def on_fit_start(self) -> None:
        def keep(site_of_call, module, args, out) -> None:  # noqa: ANN001
            key = (step_label(self.trainer), site_of_call())
            self.outputs.setdefault(key, []).append(out.detach().double().clone())

        def relu_site() -> str:  # its calls alternate: first net.1, then net.3
            self._relu_calls += 1
            return "net.1" if self._relu_calls % 2 == 1 else "net.3"

        self.net[0].register_forward_hook(partial(keep, lambda: "net.0"))
        self.net[1].register_forward_hook(partial(keep, relu_site))

    def training_step(self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int) -> torch.Tensor:
        x, y = batch
        return F.cross_entropy(self.net(x), y)

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SGD(self.parameters(), lr=0.5)


def test_trainer_activation_statistics_over_accumulated_micro_batches_match_the_modules_own_outputs(
    tmp_path: Path,
) -> None:
    module = ReluTwice()
    monitor = ParameterMonitor(log_every_n_steps=2, log_activations=True)
    _, scalars = fit(module, tmp_path, monitor, max_steps=4, accumulate_grad_batches=2)
    logged = sorted(scalars["activation_mean/net.1"])
    assert logged == [1, 3]  # the logging steps only
    for step in logged:
        for site in ("net.0", "net.1", "net.3"):
            outputs = module.outputs[(step, site)]
            assert len(outputs) == 2  # both micro-batches of the step
            mean, std, zeros = _oracle(outputs)
            assert scalars[f"activation_mean/{site}"][step] == pytest.approx(mean, rel=1e-5, abs=1e-7)
            assert scalars[f"activation_std/{site}"][step] == pytest.approx(std, rel=1e-5)
            assert scalars[f"activation_zero_frac/{site}"][step] == pytest.approx(zeros, rel=1e-6)
    assert not nn.modules.module._global_forward_hooks and not nn.modules.module._global_forward_pre_hooks


def test_trainer_without_the_option_logs_no_activations(tmp_path: Path) -> None:
    _, scalars = fit(ReluTwice(), tmp_path, ParameterMonitor(), max_steps=2)
    assert scalars and not any(tag.startswith("activation_") for tag in scalars)


# -- two processes (DDP, gloo on CPU) --------------------------------------------------------------------
@pytest.mark.distributed
@pytest.mark.slow
def test_ddp_activation_statistics_are_those_of_the_global_batch(tmp_path: Path) -> None:
    """Each rank sees half of a step's rows; the logged statistics are those of all rows (one process, oracle)."""
    import os

    from lightning.pytorch.loggers import TensorBoardLogger

    from tests.helpers.events import read_scalars
    from tests.test_distributed import BATCH, STEPS, WORLD, SharedClassifier, dataset, free_port, retry_if_killed

    def attempt(out: Path) -> None:
        os.environ["MASTER_ADDR"] = "127.0.0.1"
        os.environ["MASTER_PORT"] = str(free_port())
        trainer = pl.Trainer(
            accelerator="cpu",
            devices=WORLD,
            strategy="ddp_spawn",
            max_steps=STEPS,
            logger=TensorBoardLogger(str(out), name="", version="run"),
            callbacks=[ParameterMonitor(log_every_n_steps=2, log_activations=True, track_shared=False)],
            enable_checkpointing=False,
            enable_progress_bar=False,
            enable_model_summary=False,
        )
        trainer.fit(SharedClassifier())

    logged = read_scalars(retry_if_killed(attempt, tmp_path) / "run")
    # the oracle: one process on both ranks' rows (DDP averages the gradients: the mean loss of all rows)
    model = SharedClassifier()
    opt = torch.optim.SGD(model.parameters(), lr=0.5)
    data = dataset(WORLD * BATCH * STEPS)
    sites = {"net.0": model.net[0], "net.1": model.net[1], "net.5": model.net[5]}
    for step in range(STEPS):
        x, y = data[step * WORLD * BATCH : (step + 1) * WORLD * BATCH]
        outputs: dict[str, list[torch.Tensor]] = {s: [] for s in sites}
        handles = [
            m.register_forward_hook(lambda mod, a, out, keep=outputs[s]: keep.append(out.detach().double()))
            for s, m in sites.items()
        ]
        opt.zero_grad()
        F.cross_entropy(model.net(x), y).backward()
        opt.step()
        for h in handles:
            h.remove()
        if step in (1, 3):
            for site, outs in outputs.items():
                mean, std, zeros = _oracle(outs)
                assert logged[f"activation_mean/{site}"][step] == pytest.approx(mean, rel=1e-5, abs=1e-7)
                assert logged[f"activation_std/{site}"][step] == pytest.approx(std, rel=1e-5)
                assert logged[f"activation_zero_frac/{site}"][step] == zeros
    assert sorted(logged["activation_mean/net.2"]) == [1, 3] and "activation_mean/net.4" in logged


def test_plain_loop_logs_activations_of_the_step(tmp_path: Path) -> None:
    from torch.utils.tensorboard import SummaryWriter

    from param_monitor import PlainMonitor
    from tests.helpers.events import read_scalars

    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 1))
    outputs: dict[int, list[torch.Tensor]] = {}
    step_now = [0]
    model[1].register_forward_hook(lambda m, a, out: outputs.setdefault(step_now[0], []).append(out.double()))
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    writer = SummaryWriter(str(tmp_path))
    with PlainMonitor(model, writer, log_every_n_steps=2, log_activations=True) as monitor:
        for step in range(4):
            step_now[0] = step
            optimizer.zero_grad()
            with monitor.step(step) as s:
                s.backward(nn.functional.mse_loss(model(torch.randn(8, 4)), torch.randn(8, 1)))
                s.log(optimizer)
            optimizer.step()
    writer.close()
    logged = read_scalars(tmp_path)
    assert sorted(logged["activation_zero_frac/1"]) == [1, 3]
    for step in (1, 3):
        mean, std, zeros = _oracle(outputs[step])
        assert logged["activation_mean/1"][step] == pytest.approx(mean, rel=1e-5)
        assert logged["activation_zero_frac/1"][step] == pytest.approx(zeros)


def test_module_patterns_without_the_option_are_refused_and_matching_nothing_is_warned(tmp_path: Path) -> None:
    from lightning.pytorch.utilities.exceptions import MisconfigurationException

    with pytest.raises(MisconfigurationException, match="log_activations=True`, which is off"):
        ParameterMonitor(activation_include=["net.*"])
    with pytest.warns(UserWarning, match="no leaf module is selected"):
        _, scalars = fit(ReluTwice(), tmp_path, ParameterMonitor(log_activations=True, activation_include=["x.*"]))
    assert scalars and not any(t.startswith("activation_") for t in scalars)


# -- ranks whose forward passes differ (a data-dependent branch) -----------------------------------------
class _Branchy(nn.Module):
    """Rank 0 calls ``a`` then ``b``; rank 1 calls ``b`` then ``a``, and ``c`` once more on step 1."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.a, self.b, self.c = nn.Linear(4, 4), nn.Linear(4, 4), nn.Linear(4, 4)

    def forward(self, x: torch.Tensor, rank: int, step: int) -> torch.Tensor:
        x = self.b(self.a(x)) if rank == 0 else self.a(self.b(x))
        for _ in range(1 + (rank == 1 and step == 1)):
            x = self.c(x)
        return x


def _branchy_worker(rank: int, port: int, out: str) -> None:
    import os
    import warnings

    import torch.distributed as dist
    from torch.utils.tensorboard import SummaryWriter

    from param_monitor import PlainMonitor

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=2)
    model = _Branchy()
    outputs: dict[tuple[int, str], list[torch.Tensor]] = {}
    now = [0]
    for name in "ab":
        getattr(model, name).register_forward_hook(
            lambda m, a, o, name=name: outputs.setdefault((now[0], name), []).append(o.detach().double().flatten())
        )
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    writer = SummaryWriter(out) if rank == 0 else None
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        with PlainMonitor(model, writer, log_every_n_steps=1, log_activations=True) as monitor:
            for step in range(2):
                now[0] = step
                x = torch.randn(8, 4, generator=torch.Generator().manual_seed(10 * step + rank))
                optimizer.zero_grad()
                with monitor.step(step) as s:
                    s.backward(model(x, rank, step).square().mean())
                    s.log(optimizer)
                optimizer.step()
    # the oracle: every rank's outputs of `a` and `b`
    for key in sorted(outputs):
        local = torch.cat(outputs[key])
        gathered = [torch.empty_like(local) for _ in range(2)]
        dist.all_gather(gathered, local)
        outputs[key] = [torch.cat(gathered)]
    if rank == 0:
        torch.save({"outputs": outputs, "warnings": [str(w.message) for w in caught]}, f"{out}/oracle.pt")
        writer.close()
    dist.destroy_process_group()


@pytest.mark.distributed
def test_ranks_calling_modules_in_another_order_or_count_neither_mix_sites_nor_crash(tmp_path: Path) -> None:
    """The ranks' site lists used to be summed position by position: rank 0's `a` with rank 1's `b`
    (silently wrong), and a rank with one call more sent a longer vector (gloo aborted)."""
    import torch.multiprocessing as mp

    from tests.helpers.events import read_scalars
    from tests.helpers.processes import free_port, retry_if_killed

    def attempt(out: Path) -> None:
        mp.spawn(_branchy_worker, args=(free_port(), str(out)), nprocs=2)

    out = retry_if_killed(attempt, tmp_path)
    logged = read_scalars(out)
    oracle = torch.load(out / "oracle.pt")
    for step in (0, 1):
        for site in "ab":
            mean, std, zeros = _oracle(oracle["outputs"][(step, site)])
            assert logged[f"activation_mean/{site}"][step] == pytest.approx(mean, rel=1e-5, abs=1e-7)
            assert logged[f"activation_std/{site}"][step] == pytest.approx(std, rel=1e-5)
    # `c`: once on both ranks at step 0; once against twice at step 1: not written then, and said so
    assert sorted(logged["activation_mean/c"]) == [0]
    assert not any(tag.startswith("activation_mean/c#") for tag in logged)
    assert [w for w in oracle["warnings"] if "`c`" in w and "[1, 2]" in w], oracle["warnings"]
