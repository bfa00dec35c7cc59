"""ParameterMonitor in a real Trainer, values read back from the real event files.

Oracles are independent of the monitor: gradients the LightningModule records itself in
``on_before_optimizer_step``, and per-use contributions from a functional re-run of the same
forward pass where every use gets its OWN copy of the shared weights (``torch.autograd.grad``).
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
from lightning.pytorch.loggers import TensorBoardLogger
from torch.utils.data import DataLoader, TensorDataset

from param_monitor import ParameterMonitor
from param_monitor._lightning import grad_scaler, is_compiled, step_label
from tests.helpers.events import load_events, read_scalar_steps, read_scalars
from tests.helpers.modules import Recorder, SharedMLP, assert_close, check_against_oracle, fit, linear, loader
from tests.helpers.trainers import make_trainer


# --------------------------------------------------------------------------------------------
# the textbook's toy and the exercise's network
# --------------------------------------------------------------------------------------------
class Toy(pl.LightningModule):
    """Bias-free Linear(1, 1) used twice, weight 3, input 1: output 9, gradient 6 = 3 + 3."""

    def __init__(self) -> None:
        super().__init__()
        shared = nn.Linear(1, 1, bias=False)
        nn.init.constant_(shared.weight, 3.0)
        self.net = nn.Sequential(shared, shared)

    def training_step(self, batch: list[torch.Tensor], batch_idx: int) -> torch.Tensor:
        return self.net(batch[0]).sum()

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SGD(self.parameters(), lr=0.0)


def test_textbook_toy_gradient_is_sum_of_two_uses(tmp_path: Path) -> None:
    data = DataLoader(TensorDataset(torch.ones(1, 1)), batch_size=1)
    _, scalars = fit(Toy(), tmp_path, data=data, max_steps=1)
    assert scalars["grad_norm/net.0.weight"] == {0: 6.0}
    assert scalars["shared_grad/net.0.weight/net.0"] == {0: 3.0}
    assert scalars["shared_grad/net.0.weight/net.1"] == {0: 3.0}
    assert scalars["shared_grad_error/net.0.weight"] == {0: 0.0}
    assert scalars["shared_grad_cosine/net.0.weight"] == {0: 1.0}
    assert scalars["weight_mean/net.0.weight"] == {0: 3.0}
    assert "weight_mean/net.1.weight" not in scalars  # the tied alias is logged once, under its first name


def test_exercise_mlp_matches_oracle_and_lightning_steps(tmp_path: Path) -> None:
    module = SharedMLP()
    _, scalars = fit(module, tmp_path, max_steps=4)
    assert sorted(scalars["grad_norm/net.3.weight"]) == sorted(scalars["train_loss"]) == [0, 1, 2, 3]
    assert {t for t in scalars if t.startswith("shared_grad/net.3.weight/")} == {
        "shared_grad/net.3.weight/net.3",
        "shared_grad/net.3.weight/net.6",
    }
    check_against_oracle(module, scalars, [0, 1, 2, 3])
    assert "weight_mean/net.6.weight" not in scalars


def test_steps_follow_log_every_n_steps_like_self_log(tmp_path: Path) -> None:
    module = SharedMLP()
    _, scalars = fit(module, tmp_path, max_steps=8, log_every_n_steps=3)
    assert sorted(scalars["grad_norm/net.1.weight"]) == sorted(scalars["train_loss"]) == [2, 5]
    check_against_oracle(module, scalars, [2, 5])


def test_own_frequency_and_no_hooks_on_other_steps(tmp_path: Path) -> None:
    hooks_seen: dict[int, int] = {}

    from torch.nn.modules import module as module_hooks

    class Spy(SharedMLP):
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            assert not self.net[3]._forward_pre_hooks and not self.net[3]._forward_hooks  # never on the model
            hooks_seen[step_label(self.trainer)] = len(module_hooks._global_forward_pre_hooks)
            return super().forward(x)

    _, scalars = fit(Spy(), tmp_path, ParameterMonitor(log_every_n_steps=2), max_steps=6, log_every_n_steps=50)
    assert sorted(scalars["grad_norm/net.1.weight"]) == [1, 3, 5]
    # step 0 names the uses once (the table's call sites); afterwards only logging steps hook
    assert {s: n > 0 for s, n in hooks_seen.items()} == {0: True, 1: True, 2: False, 3: True, 4: False, 5: True}


def test_without_shared_tracking_other_steps_return_at_once(tmp_path: Path) -> None:
    monitor = ParameterMonitor(log_every_n_steps=3, track_shared=False)
    _, scalars = fit(SharedMLP(), tmp_path, monitor, max_steps=4)
    assert sorted(scalars["grad_norm/net.3.weight"]) == [2]
    assert not [t for t in scalars if t.startswith("shared_grad")]
    assert not monitor._core.fit.summary_pending and not monitor._core.fit.count_calls_pending


def test_tracking_does_not_change_the_model() -> None:
    from param_monitor import ParameterWatcher

    torch.manual_seed(0)
    plain, tracked = SharedMLP(), SharedMLP()
    tracked.load_state_dict(plain.state_dict())
    keys = list(plain.state_dict())
    x, y = torch.randn(16, 4), torch.randint(0, 3, (16,))
    watcher = ParameterWatcher(tracked)
    watcher.start_step()
    watcher.begin_forward()
    out_plain, out_tracked = plain(x), tracked(x)
    assert list(tracked.state_dict()) == keys
    F.cross_entropy(out_plain, y).backward()
    loss = F.cross_entropy(out_tracked, y)
    watcher.before_backward(loss)
    loss.backward()
    watcher.after_backward()
    metrics = watcher.compute()
    assert torch.equal(out_plain, out_tracked)
    for (n, p), (_, q) in zip(plain.named_parameters(), tracked.named_parameters(), strict=True):
        assert torch.equal(p.grad, q.grad), n
        assert isinstance(q, nn.Parameter)
    assert list(tracked.state_dict()) == keys
    assert tracked.net[3] is tracked.net[6] and isinstance(tracked.net[3].weight, nn.Parameter)
    assert metrics["shared_grad_error/net.3.weight"] < 1e-6


# --------------------------------------------------------------------------------------------
# other kinds of sharing
# --------------------------------------------------------------------------------------------
class TiedLM(Recorder):
    """Tied input/output embeddings: the same tensor used by ``model.wte`` and ``model.lm_head``."""

    shared_sites = {"model.wte.weight": ["model.wte", "model.lm_head"]}

    def __init__(self) -> None:
        super().__init__()
        self.model = nn.Module()
        self.model.wte = nn.Embedding(11, 6)
        self.model.mix = nn.Linear(6, 6)
        self.model.lm_head = nn.Linear(6, 11, bias=False)
        self.model.lm_head.weight = self.model.wte.weight

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.model.lm_head(torch.tanh(self.model.mix(self.model.wte(x))))

    def forward_uses(self, x: torch.Tensor, w: dict[str, dict[str, torch.Tensor]]) -> torch.Tensor:
        h = torch.tanh(linear(self.model.mix, F.embedding(x, w["model.wte"]["model.wte.weight"])))
        return F.linear(h, w["model.lm_head"]["model.wte.weight"])


def test_tied_embeddings(tmp_path: Path) -> None:
    g = torch.Generator().manual_seed(1)
    data = DataLoader(
        TensorDataset(torch.randint(0, 11, (32,), generator=g), torch.randint(0, 11, (32,), generator=g)), batch_size=8
    )
    module = TiedLM()
    _, scalars = fit(module, tmp_path, data=data)
    check_against_oracle(module, scalars, [0, 1, 2, 3])
    assert "grad_norm/model.lm_head.weight" not in scalars


def test_tied_head_used_functionally_in_the_parent_is_a_site(tmp_path: Path) -> None:
    # issue 8: `F.linear(h, self.wte.weight)` in the parent's forward, `wte` registered once
    class HeadInParent(TiedLM):
        shared_sites = {"model.wte.weight": ["model.wte", "<root>"]}

        def __init__(self) -> None:
            super().__init__()
            del self.model.lm_head

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            h = torch.tanh(self.model.mix(self.model.wte(x)))
            return F.linear(h, self.model.wte.weight)  # the parent uses the weight itself

        def forward_uses(self, x: torch.Tensor, w: dict[str, dict[str, torch.Tensor]]) -> torch.Tensor:
            h = torch.tanh(self.model.mix(F.embedding(x, w["model.wte"]["model.wte.weight"])))
            return F.linear(h, w["<root>"]["model.wte.weight"])

    g = torch.Generator().manual_seed(1)
    data = DataLoader(
        TensorDataset(torch.randint(0, 11, (32,), generator=g), torch.randint(0, 11, (32,), generator=g)), batch_size=8
    )
    module = HeadInParent()
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        _, scalars = fit(module, tmp_path, data=data)
    assert not [w for w in record if "ParameterMonitor" in str(w.message)]
    assert set(scalars["shared_grad_error/model.wte.weight"]) == {0, 1, 2, 3}
    assert max(scalars["shared_grad_error/model.wte.weight"].values()) < 1e-6
    check_against_oracle(module, scalars, [0, 1, 2, 3])


class LoopedBlock(Recorder):
    """One block run three times in a loop: sites ``block#0``, ``block#1``, ``block#2``."""

    shared_sites = {"block.weight": ["block#0", "block#1", "block#2"], "block.bias": ["block#0", "block#1", "block#2"]}

    def __init__(self) -> None:
        super().__init__()
        self.inp = nn.Linear(4, 5)
        self.block = nn.Linear(5, 5)
        self.out = nn.Linear(5, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.inp(x)
        for _ in range(3):
            h = torch.tanh(self.block(h))
        return self.out(h)

    def forward_uses(self, x: torch.Tensor, w: dict[str, dict[str, torch.Tensor]]) -> torch.Tensor:
        h = linear(self.inp, x)
        for k in range(3):
            h = torch.tanh(F.linear(h, w[f"block#{k}"]["block.weight"], w[f"block#{k}"]["block.bias"]))
        return linear(self.out, h)


def test_block_looped_three_times(tmp_path: Path) -> None:
    module = LoopedBlock()
    _, scalars = fit(module, tmp_path)
    check_against_oracle(module, scalars, [0, 1, 2, 3])
    # three uses: the cosine is the mean of the three pairwise cosines
    uses = [module.uses[2][("block.weight", f"block#{k}")].flatten() for k in range(3)]
    pairs = [(0, 1), (0, 2), (1, 2)]
    expected = sum(F.cosine_similarity(uses[i], uses[j], dim=0).item() for i, j in pairs) / 3
    assert_close(scalars["shared_grad_cosine/block.weight"][2], expected, 1e-4)


# --------------------------------------------------------------------------------------------
# the state of the gradients: accumulation, AMP, NaN, frozen, lazy
# --------------------------------------------------------------------------------------------
def test_gradient_accumulation_logs_once_per_optimizer_step(tmp_path: Path) -> None:
    module = SharedMLP()
    _, scalars = fit(module, tmp_path, max_steps=3, accumulate_grad_batches=2, data=loader(n=48, batch_size=8))
    assert sorted(scalars["grad_norm/net.3.weight"]) == [0, 1, 2]
    # the oracle summed each use over both micro-batches; the module recorded the accumulated grad
    check_against_oracle(module, scalars, [0, 1, 2])


class FusedAdamMLP(SharedMLP):
    """An optimizer that unscales inside its own step: Lightning leaves the gradients SCALED."""

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.Adam(self.parameters(), lr=1e-3, fused=True)

    def on_before_optimizer_step(self, optimizer: torch.optim.Optimizer) -> None:
        super().on_before_optimizer_step(optimizer)
        step = step_label(self.trainer)
        scale = grad_scaler(self.trainer).get_scale()
        self.grads[step] = {n: g / scale for n, g in self.grads[step].items()}  # the oracle: unscaled


@pytest.mark.parametrize("module_cls", [SharedMLP, FusedAdamMLP], ids=["unscaled-by-lightning", "fused-adam"])
def test_16_mixed_logs_unscaled_values_and_skips_overflow(tmp_path: Path, module_cls: type[SharedMLP]) -> None:
    from lightning.pytorch.plugins import MixedPrecision

    module = module_cls()
    module.poison_steps = {2}  # a NaN loss: GradScaler skips that step
    trainer, scalars = fit(module, tmp_path, max_steps=5, plugins=[MixedPrecision("16-mixed", "cpu")])
    scaler = grad_scaler(trainer)
    assert scaler is not None and scaler.get_scale() > 1  # the gradients at backward were really scaled
    for step in (0, 1, 3):
        for name, grad in module.grads[step].items():
            assert_close(scalars[f"grad_norm/{name}"][step], grad.norm().item())
        for (name, site), use in module.uses[step].items():  # the oracle ran under the same autocast, unscaled
            assert_close(scalars[f"shared_grad/{name}/{site}"][step], use.norm().item(), 1e-2)
        for name in ("net.3.weight", "net.3.bias"):
            assert scalars[f"shared_grad_error/{name}"][step] < 1e-3  # the uses' sum is unscaled too
    assert 2 not in scalars["grad_norm/net.3.weight"]  # the skipped step is not logged as garbage
    assert 2 not in scalars["shared_grad/net.3.weight/net.3"]
    assert 2 in scalars["weight_mean/net.3.weight"]  # the weights are still real


def test_nan_without_scaler_is_logged_and_warned_once(tmp_path: Path) -> None:
    module = SharedMLP()
    module.poison_steps = {1, 2}
    with pytest.warns(UserWarning, match=r"non-finite.*step 1.*net\.1\.weight") as record:
        _, scalars = fit(module, tmp_path, max_steps=3)
    assert sum("non-finite" in str(w.message) for w in record) == 1
    assert not [w for w in record if "outside the forward" in str(w.message)]  # NaN is not a missed use
    assert math.isnan(scalars["grad_norm/net.1.weight"][1])
    assert math.isfinite(scalars["grad_norm/net.1.weight"][0])


def test_raise_on_nonfinite(tmp_path: Path) -> None:
    from param_monitor import NonFiniteGradientError

    module = SharedMLP()
    module.poison_steps = {1}
    with pytest.raises(NonFiniteGradientError, match="step 1"):
        fit(module, tmp_path, ParameterMonitor(raise_on_nonfinite=True), max_steps=3)


def test_check_finite_every_step_sees_nan_between_logging_steps(tmp_path: Path) -> None:
    module = SharedMLP()
    module.poison_steps = {1}
    monitor = ParameterMonitor(log_every_n_steps=4, check_finite_every_step=True)
    with pytest.warns(UserWarning, match=r"first at step 1, .*not a logging step"):
        fit(module, tmp_path, monitor, max_steps=4)
    # a NaN on the logging step itself is reported as such, with the parameters' names
    module = SharedMLP()
    module.poison_steps = {3}
    with pytest.warns(UserWarning, match=r"first at step 3, in net\.1\.weight.*logged as they are"):
        fit(module, tmp_path / "c", ParameterMonitor(log_every_n_steps=4, check_finite_every_step=True), max_steps=4)
    # and without the opt-in check, nothing is seen
    module = SharedMLP()
    module.poison_steps = {1}
    import warnings

    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        fit(module, tmp_path / "b", ParameterMonitor(log_every_n_steps=4), max_steps=4)
    assert not [w for w in record if "non-finite" in str(w.message)]


def test_frozen_and_unused_parameters_get_weight_stats_only(tmp_path: Path) -> None:
    class Partly(SharedMLP):
        def __init__(self) -> None:
            super().__init__()
            self.net[1].requires_grad_(False)
            self.unused = nn.Linear(2, 2)

    module = Partly()
    _, scalars = fit(module, tmp_path, max_steps=2)
    for name in ("net.1.weight", "unused.weight"):
        param = dict(module.named_parameters())[name]
        assert f"grad_norm/{name}" not in scalars
        assert_close(scalars[f"weight_mean/{name}"][1], param.detach().mean().item())
        assert_close(scalars[f"weight_norm/{name}"][1], param.detach().norm().item())
    check_against_oracle(module, scalars, [0, 1])


def test_lazy_parameters_materialized_during_fit(tmp_path: Path) -> None:
    module = SharedMLP(lazy=True)
    trainer, scalars = fit(module, tmp_path, max_steps=3)
    # materialized by step 0's forward: per-tensor stats and shared uses from step 0 (the step's uses
    # are kept when the parameter list is re-read); the oracle needs the weights before the forward
    assert sorted(scalars["grad_norm/net.3.weight"]) == [0, 1, 2]
    assert sorted(scalars["shared_grad/net.3.weight/net.6"]) == [0, 1, 2]
    assert scalars["shared_grad_error/net.3.weight"][0] < 1e-6
    check_against_oracle(module, scalars, [1, 2])
    text = load_events(trainer.logger.log_dir).Tensors("param_monitor/parameters/text_summary")
    table = text[0].tensor_proto.string_val[0].decode()
    assert "| net.3.weight | 8×8 | 64 | True | net.6.weight | net.3, net.6 |" in table


def test_lazy_module_that_never_runs_does_not_stop_tracking(tmp_path: Path) -> None:
    class WithUnusedProbe(SharedMLP):
        def __init__(self) -> None:
            super().__init__()
            self.probe = nn.LazyLinear(2)  # never called: stays uninitialized

    module = WithUnusedProbe()
    trainer, scalars = fit(module, tmp_path, max_steps=3)
    assert sorted(scalars["shared_grad/net.3.weight/net.6"]) == [0, 1, 2]
    check_against_oracle(module, scalars, [0, 1, 2])
    text = load_events(trainer.logger.log_dir).Tensors("param_monitor/parameters/text_summary")
    assert len(text) == 1 and "| probe.weight | uninitialized | 0 |" in text[0].tensor_proto.string_val[0].decode()


def test_bf16_parameters_accumulate_in_fp32() -> None:
    from param_monitor import parameter_statistics

    torch.manual_seed(0)
    p = nn.Parameter(torch.randn(10_000).to(torch.bfloat16))
    p.grad = torch.randn(10_000).to(torch.bfloat16)
    metrics = parameter_statistics([("p", p)])
    exact = p.detach().double()
    assert_close(metrics["weight_norm/p"], exact.norm().item(), 1e-5)
    assert_close(metrics["weight_mean/p"], exact.mean().item(), 1e-4)
    assert_close(metrics["grad_norm/p"], p.grad.double().norm().item(), 1e-5)
    # what a bf16 result would have been: three significant digits
    assert abs(p.detach().norm().item() - exact.norm().item()) > 1e-5 * exact.norm().item()


# --------------------------------------------------------------------------------------------
# set-up, loggers, resume, compile, pickling
# --------------------------------------------------------------------------------------------
def test_no_logger_is_a_clear_error(tmp_path: Path) -> None:
    from lightning.pytorch.utilities.exceptions import MisconfigurationException

    with pytest.raises(MisconfigurationException, match="no logger.*TensorBoardLogger"):
        fit(SharedMLP(), tmp_path, logger=False)


def test_fsdp1_is_refused_rather_than_logged_wrong(tmp_path: Path) -> None:
    from lightning.pytorch.strategies import FSDPStrategy
    from lightning.pytorch.utilities.exceptions import MisconfigurationException

    class CpuFSDP(FSDPStrategy):  # Lightning refuses the plain class on CPU before our check runs
        pass

    with pytest.raises(MisconfigurationException, match="FSDP1.*ModelParallelStrategy"):
        fit(SharedMLP(), tmp_path, strategy=CpuFSDP())


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"log_every_n_steps": 0}, "positive int"),
        ({"histogram_every_n_steps": -1}, ">= 0"),
        ({"include": "net.*"}, "list of glob patterns"),
    ],
)
def test_bad_arguments(kwargs: dict, match: str) -> None:
    from lightning.pytorch.utilities.exceptions import MisconfigurationException

    with pytest.raises(MisconfigurationException, match=match):
        ParameterMonitor(**kwargs)


def test_csv_logger_gets_the_same_scalars(tmp_path: Path) -> None:
    import csv

    from lightning.pytorch.loggers import CSVLogger

    module = SharedMLP()
    trainer, _ = fit(module, tmp_path, max_steps=3, logger=CSVLogger(str(tmp_path), name="csv"))
    rows = list(csv.DictReader(open(Path(trainer.logger.log_dir) / "metrics.csv")))
    logged = {int(r["step"]): r for r in rows if r.get("grad_norm/net.3.weight")}
    assert sorted(logged) == [0, 1, 2]
    for step, row in logged.items():
        assert_close(float(row["grad_norm/net.3.weight"]), module.grads[step]["net.3.weight"].norm().item())
        assert_close(
            float(row["shared_grad/net.3.weight/net.6"]), module.uses[step][("net.3.weight", "net.6")].norm().item()
        )


def test_resume_continues_steps_without_duplicates(tmp_path: Path) -> None:
    from lightning.pytorch.callbacks import ModelCheckpoint

    logger = TensorBoardLogger(str(tmp_path), name="tb", version=0)
    ckpt = ModelCheckpoint(dirpath=tmp_path / "ckpt", save_last=True)
    fit(
        SharedMLP(),
        tmp_path,
        max_steps=4,
        logger=logger,
        callbacks=[ParameterMonitor(), ckpt],
        enable_checkpointing=True,
        data=loader(n=64),
    )
    module = SharedMLP()
    trainer = make_trainer(tmp_path, max_steps=8, logger=TensorBoardLogger(str(tmp_path), name="tb", version=0))
    trainer.fit(module, loader(n=64), ckpt_path=str(tmp_path / "ckpt" / "last.ckpt"))
    steps = read_scalar_steps(trainer.logger.log_dir, "grad_norm/net.3.weight")
    assert steps == list(range(8))
    assert read_scalar_steps(trainer.logger.log_dir, "train_loss") == list(range(8))
    scalars = read_scalars(trainer.logger.log_dir)
    check_against_oracle(module, scalars, [4, 5, 6, 7])


def test_compiled_model_keeps_per_tensor_stats_and_per_use_tracking(tmp_path: Path) -> None:
    # the logging steps run eagerly (tests/test_compile.py checks every way of compiling against a twin)
    class Compiled(SharedMLP):
        shared_sites = {}

        def __init__(self) -> None:
            super().__init__()
            self.net = torch.compile(self.net, backend="eager")

    module = Compiled()
    _, scalars = fit(module, tmp_path, max_steps=2)
    name = "net._orig_mod.3.weight"
    assert_close(scalars[f"grad_norm/{name}"][1], module.grads[1][name].norm().item())
    assert {f"shared_grad/{name}/net._orig_mod.{k}" for k in (3, 6)} <= set(scalars)
    assert scalars[f"shared_grad_error/{name}"][1] < 1e-6


def test_histograms_and_summary_are_written(tmp_path: Path) -> None:
    trainer, _ = fit(SharedMLP(), tmp_path, ParameterMonitor(histogram_every_n_steps=2), max_steps=4)
    events = load_events(trainer.logger.log_dir)
    hist = events.Histograms("grad_hist/net.3.weight")
    assert [h.step for h in hist] == [1, 3]
    assert "weight_hist/net.1.weight" in events.Tags()["histograms"]
    assert "param_monitor/parameters/text_summary" in events.Tags()["tensors"]


def test_picklable_for_ddp_spawn(tmp_path: Path) -> None:
    import pickle

    monitor = ParameterMonitor(log_every_n_steps=2, include=["net.*"])
    fit(SharedMLP(), tmp_path, monitor, max_steps=2)
    clone = pickle.loads(pickle.dumps(monitor))
    assert clone.log_every_n_steps == 2 and clone.include == ["net.*"]


def test_include_exclude_patterns(tmp_path: Path) -> None:
    _, scalars = fit(SharedMLP(), tmp_path, ParameterMonitor(include=["net.3.*"], exclude=["*.bias"]), max_steps=1)
    names = {t.split("/", 1)[1] for t in scalars if t.startswith("weight_mean/")}
    assert names == {"net.3.weight"}
    assert "shared_grad/net.3.weight/net.6" in scalars and "shared_grad/net.3.bias/net.6" not in scalars


class TwoOptimizers(pl.LightningModule):
    """GAN-style manual optimization: D (which uses one layer twice) steps, then G."""

    def __init__(self) -> None:
        super().__init__()
        self.automatic_optimization = False
        shared = nn.Linear(4, 4)
        self.d = nn.Sequential(shared, nn.Tanh(), shared, nn.Linear(4, 1))
        self.g = nn.Linear(4, 4)
        self.seen: dict[tuple[int, int], dict[str, float]] = {}

    def training_step(self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int) -> None:
        d_opt, g_opt = self.optimizers()
        x = batch[0]
        for opt, loss_fn in ((d_opt, self.d_loss), (g_opt, self.g_loss)):
            self.toggle_optimizer(opt)  # freezes the other model's parameters
            self.manual_backward(loss_fn(x))
            opt.step()
            opt.zero_grad()
            self.untoggle_optimizer(opt)

    def d_loss(self, x: torch.Tensor) -> torch.Tensor:
        return self.d(x).pow(2).mean() + self.d(self.g(x).detach()).mean()

    def g_loss(self, x: torch.Tensor) -> torch.Tensor:
        return -self.d(self.g(x)).mean()

    def on_before_optimizer_step(self, optimizer: torch.optim.Optimizer) -> None:
        step = step_label(self.trainer)
        index = [id(o) for o in self.trainer.optimizers].index(id(optimizer))
        self.seen[(step, index)] = {n: p.grad.norm().item() for n, p in self.named_parameters() if p.grad is not None}

    def configure_optimizers(self) -> list[torch.optim.Optimizer]:
        return [torch.optim.SGD(self.d.parameters(), lr=0.1), torch.optim.SGD(self.g.parameters(), lr=0.1)]


def test_two_optimizers_each_logged_with_the_gradients_it_steps_on(tmp_path: Path) -> None:
    module = TwoOptimizers()
    _, scalars = fit(module, tmp_path, max_steps=6)  # global_step counts both optimizers: 3 batches
    steps = sorted(scalars["grad_norm/g.weight"])
    assert steps == [0, 1, 2]
    for step in steps:
        for name in ("d.0.weight", "d.3.weight"):  # logged where D's optimizer steps
            assert_close(scalars[f"grad_norm/{name}"][step], module.seen[(step, 0)][name])
        assert_close(scalars["grad_norm/g.weight"][step], module.seen[(step, 1)]["g.weight"])
        assert scalars["shared_grad_error/d.0.weight"][step] < 1e-6  # D's four uses in d_loss
        assert {"grad_norm_total/optimizer_0", "grad_norm_total/optimizer_1"} <= set(scalars)
    assert {t for t in scalars if t.startswith("shared_grad/d.0.weight/")} == {
        f"shared_grad/d.0.weight/d.0#{k}" for k in range(4)
    }
    assert "grad_norm_total" not in scalars


# --------------------------------------------------------------------------------------------
# histograms: the gradient the optimizer steps on, or nothing
# --------------------------------------------------------------------------------------------
def assert_histogram_of(hist: object, values: torch.Tensor) -> None:
    v = values.detach().double().flatten()
    assert hist.num == v.numel()
    assert_close(hist.min, v.min().item(), 1e-6)
    assert_close(hist.max, v.max().item(), 1e-6)
    assert_close(hist.sum_squares, v.square().sum().item(), 1e-5)


@pytest.mark.parametrize(
    "module_cls, overflow",
    [(SharedMLP, 2), (FusedAdamMLP, 2), (FusedAdamMLP, None)],
    ids=["unscaled-by-lightning", "fused-adam", "fused-adam-no-overflow"],
)
def test_16_mixed_histograms_are_unscaled_and_skip_overflow(
    tmp_path: Path, module_cls: type[SharedMLP], overflow: int | None
) -> None:
    from lightning.pytorch.plugins import MixedPrecision

    from tests.helpers.events import read_histograms

    module = module_cls()
    module.poison_steps = {overflow} if overflow is not None else set()  # NaN: the scaler skips that step
    monitor = ParameterMonitor(histogram_every_n_steps=1)
    trainer, _ = fit(module, tmp_path, monitor, max_steps=4, plugins=[MixedPrecision("16-mixed", "cpu")])
    assert grad_scaler(trainer).get_scale() > 1
    hists = read_histograms(trainer.logger.log_dir)
    for step in sorted(set(range(4)) - {overflow}):
        for name, grad in module.grads[step].items():  # the module's own record, unscaled
            assert_histogram_of(hists[f"grad_hist/{name}"][step], grad)
            assert_histogram_of(hists[f"weight_hist/{name}"][step], module.weights[step][name])
    if overflow is not None:
        assert overflow not in hists["grad_hist/net.3.weight"]  # the skipped step: no gradient histogram at all
        assert overflow in hists["weight_hist/net.3.weight"]


def test_nonfinite_gradient_histograms_are_skipped_not_crashed(tmp_path: Path) -> None:
    from tests.helpers.events import read_histograms

    module = SharedMLP()
    module.poison_steps = {1}  # all-NaN gradients
    module.poison_grads = {2: ["net.9.weight"]}  # one all-NaN gradient
    monitor = ParameterMonitor(histogram_every_n_steps=1)
    with pytest.warns(UserWarning, match=r"histograms of non-finite.*not written") as record:
        trainer, scalars = fit(module, tmp_path, monitor, max_steps=4)
    assert sum("histogram" in str(w.message) for w in record) == 1  # told once
    hists = read_histograms(trainer.logger.log_dir)
    assert sorted(hists["grad_hist/net.3.weight"]) == [0, 2, 3]
    assert sorted(hists["grad_hist/net.9.weight"]) == [0, 3]
    assert_histogram_of(hists["grad_hist/net.9.bias"][2], module.grads[2]["net.9.bias"])
    assert sorted(hists["weight_hist/net.9.weight"]) == [0, 1, 2, 3]  # weights stayed finite
    assert sorted(scalars["grad_norm/net.3.weight"]) == [0, 1, 2, 3]  # the fit ran to its end


# --------------------------------------------------------------------------------------------
# the parameter list follows the module: pruning, replaced layers
# --------------------------------------------------------------------------------------------
def test_pruning_renames_parameters_and_tracking_survives(tmp_path: Path) -> None:
    from lightning.pytorch.callbacks import ModelPruning

    module = SharedMLP()
    pruning = ModelPruning(
        "l1_unstructured", parameters_to_prune=[(module.net[1], "weight")], amount=0.5, make_pruning_permanent=False
    )
    from tests.helpers.events import read_texts

    # pruned after epoch 0 (4 steps)
    trainer, scalars = fit(module, tmp_path, callbacks=[ParameterMonitor(), pruning], max_steps=8)
    assert sorted(scalars["weight_mean/net.1.weight"]) == [0, 1, 2, 3]
    tables = read_texts(trainer.logger.log_dir, "param_monitor/parameters")
    assert [s for s, _ in tables] == [0, 4] and "| net.1.weight_orig | 8×4 |" in tables[1][1]
    assert sorted(scalars["weight_mean/net.1.weight_orig"]) == [4, 5, 6, 7]
    for step in (4, 5, 6, 7):
        assert_close(scalars["weight_mean/net.1.weight_orig"][step], module.weights[step]["net.1.weight_orig"].mean())
    check_against_oracle(module, scalars, list(range(8)))  # shared tags on every step, no KeyError


def test_layer_replaced_during_fit_is_logged_from_the_new_tensor(tmp_path: Path) -> None:
    class Replaces(SharedMLP):
        def on_train_epoch_start(self) -> None:
            if self.current_epoch == 1:
                self.net[9] = nn.Linear(8, 3)
                self.trainer.optimizers[0].add_param_group({"params": self.net[9].parameters()})

    module = Replaces()
    _, scalars = fit(module, tmp_path, max_steps=6)
    for step in (4, 5):
        assert_close(scalars["weight_norm/net.9.weight"][step], module.weights[step]["net.9.weight"].norm().item())
    check_against_oracle(module, scalars, list(range(6)))


# --------------------------------------------------------------------------------------------
# optimizers, modules without submodules, exceptions, compile
# --------------------------------------------------------------------------------------------
class TwoOptimizersOneParameter(Recorder):
    """Manual optimization; ``head`` is stepped by both optimizers."""

    def __init__(self) -> None:
        super().__init__()
        self.automatic_optimization = False
        self.body = nn.Linear(4, 4)
        self.head = nn.Linear(4, 3)

    def training_step(self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int) -> None:
        x, y = batch
        first, second = self.optimizers()
        self.manual_backward(F.cross_entropy(self.head(torch.tanh(self.body(x))), y))
        first.step()
        second.step()
        first.zero_grad()

    def on_before_optimizer_step(self, optimizer: torch.optim.Optimizer) -> None:
        if optimizer is self.trainer.optimizers[0]:
            super().on_before_optimizer_step(optimizer)

    def configure_optimizers(self) -> list[torch.optim.Optimizer]:
        return [torch.optim.SGD(self.parameters(), lr=0.1), torch.optim.SGD(self.head.parameters(), lr=0.1)]


def test_parameter_of_two_optimizers_is_written_once_per_step(tmp_path: Path) -> None:
    module = TwoOptimizersOneParameter()
    trainer, scalars = fit(module, tmp_path, max_steps=8)  # 4 batches, two steps each
    for tag in ("grad_norm/head.weight", "weight_mean/head.weight", "grad_norm/body.weight"):
        assert read_scalar_steps(trainer.logger.log_dir, tag) == [0, 1, 2, 3], tag
    for step in range(4):  # written at the first optimizer's step, as the module saw it
        assert_close(scalars["grad_norm/head.weight"][step], module.grads[step]["head.weight"].norm().item())
        assert_close(scalars["weight_mean/head.weight"][step], module.weights[step]["head.weight"].mean().item())


class OwnParameters(pl.LightningModule):
    """No submodule: ``training_step`` uses its own parameter directly (no forward call)."""

    def __init__(self) -> None:
        super().__init__()
        self.w = nn.Parameter(torch.randn(4, 3))
        self.hooks_seen: dict[int, int] = {}

    def training_step(self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int) -> torch.Tensor:
        from torch.nn.modules import module as module_hooks

        assert not self._forward_pre_hooks  # never on the model
        self.hooks_seen[step_label(self.trainer)] = len(module_hooks._global_forward_pre_hooks)
        x, y = batch
        return F.cross_entropy(x @ self.w, y)

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SGD(self.parameters(), lr=0.1)


def test_module_with_only_its_own_parameters(tmp_path: Path) -> None:
    from tests.helpers.events import read_texts

    module = OwnParameters()
    trainer, scalars = fit(module, tmp_path, ParameterMonitor(log_every_n_steps=2), max_steps=6)
    assert sorted(scalars["grad_norm/w"]) == [1, 3, 5]
    # step 0 counts calls once; afterwards only logging steps hook
    assert {s: n > 0 for s, n in module.hooks_seen.items()} == {0: True, 1: True, 2: False, 3: True, 4: False, 5: True}
    texts = read_texts(trainer.logger.log_dir, "param_monitor/parameters")
    assert len(texts) == 1 and "| w | 4×3 | 12 | True |" in texts[0][1]


def test_exception_on_a_logging_step_leaves_no_hooks(tmp_path: Path) -> None:
    class Fails(SharedMLP):
        fail_at: int | None = 1

        def training_step(self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int) -> torch.Tensor:
            loss = super().training_step(batch, batch_idx)
            if step_label(self.trainer) == self.fail_at:
                raise RuntimeError("user code failed")
            return loss

    module = Fails()
    with pytest.raises(RuntimeError, match="user code failed"):
        fit(module, tmp_path / "a", max_steps=4)
    assert not [m for m in module.modules() if m._forward_pre_hooks or m._forward_hooks]
    assert not torch.nn.modules.module._global_forward_pre_hooks
    module.fail_at = None
    module.grads, module.uses, module.weights = {}, {}, {}
    _, scalars = fit(module, tmp_path / "b", max_steps=3)  # the same model object, fitted again
    check_against_oracle(module, scalars, [0, 1, 2])


def test_compile_without_eager_logging_steps_turns_tracking_off_with_warning(tmp_path: Path) -> None:
    class CompiledLate(SharedMLP):
        shared_sites = {}

        def configure_model(self) -> None:
            if not is_compiled(self):
                self.net = torch.compile(self.net, backend="eager")

    module = CompiledLate()
    with pytest.warns(UserWarning, match="compile"):  # no eager logging steps: no per-use tracking
        _, scalars = fit(module, tmp_path, ParameterMonitor(eager_logging_steps=False), max_steps=2)
    name = "net._orig_mod.3.weight"
    for step in (0, 1):
        assert_close(scalars[f"grad_norm/{name}"][step], module.grads[step][name].norm().item())
    assert not [t for t in scalars if t.startswith("shared_grad")]


# --------------------------------------------------------------------------------------------
# clear errors
# --------------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"include": [1, 2]}, r"`include`.*glob patterns \(str\).*1"),
        ({"exclude": ("*.bias", None)}, r"`exclude`.*glob patterns \(str\)"),
        ({"include": 3}, r"`include`.*list"),
        ({"include": {"model.*": 1}}, r"`include` must be a list of glob patterns \(a list or tuple of str\).*dict"),
        ({"exclude": {"*.bias"}}, r"`exclude` must be a list of glob patterns \(a list or tuple of str\).*set"),
        ({"track_shared": "no"}, r"`track_shared` must be True or False.*'no'"),
        ({"log_summary": 1}, r"`log_summary` must be True or False"),
        ({"check_finite_every_step": None}, r"`check_finite_every_step` must be True or False"),
        ({"raise_on_nonfinite": "yes"}, r"`raise_on_nonfinite` must be True or False"),
        ({"eager_logging_steps": 1}, r"`eager_logging_steps` must be True or False, got 1"),
        ({"log_every_n_steps": True}, r"`log_every_n_steps` must be a positive int.*True"),
        ({"histogram_every_n_steps": True}, r"`histogram_every_n_steps` must be an int >= 0"),
        ({"aggregate_depth": True}, r"`aggregate_depth` must be a positive int"),
    ],
)
def test_bad_arguments_name_the_allowed_values(kwargs: dict, match: str) -> None:
    from lightning.pytorch.utilities.exceptions import MisconfigurationException

    with pytest.raises(MisconfigurationException, match=match):
        ParameterMonitor(**kwargs)


def test_include_patterns_that_match_nothing_are_named(tmp_path: Path) -> None:
    monitor = ParameterMonitor(include=["net.3.*", "decoder.*", "*.scale"])
    with pytest.warns(UserWarning, match=r"match no parameter: 'decoder\.\*', '\*\.scale'") as record:
        _, scalars = fit(SharedMLP(), tmp_path, monitor, max_steps=1)
    assert not [w for w in record if "net.3" in str(w.message)]
    logged = {t for t in scalars if t.startswith("weight_mean/")}
    assert logged == {"weight_mean/net.3.weight", "weight_mean/net.3.bias"}


def test_tensorboard_prefix_matches_csv_logger_names(tmp_path: Path) -> None:
    import csv

    from lightning.pytorch.loggers import CSVLogger
    from tensorboard.plugins.custom_scalar import layout_pb2
    from tensorboard.plugins.custom_scalar import metadata as cs_metadata

    tb = TensorBoardLogger(str(tmp_path), name="tb", prefix="run")
    csv_logger = CSVLogger(str(tmp_path), name="csv", prefix="run")
    module = SharedMLP()
    fit(module, tmp_path, max_steps=2, logger=[tb, csv_logger])
    scalars = read_scalars(tb.log_dir)
    rows = list(csv.DictReader(open(Path(csv_logger.log_dir) / "metrics.csv")))
    csv_names = {k for r in rows for k, v in r.items() if v and k not in ("step", "epoch")}
    assert "run-train_loss" in scalars and "run-grad_norm/net.3.weight" in csv_names
    assert set(scalars) == csv_names
    assert_close(scalars["run-grad_norm/net.3.weight"][1], module.grads[1]["net.3.weight"].norm().item())
    # the dashboard's charts follow the prefix
    import re

    events = load_events(tb.log_dir)
    layout = layout_pb2.Layout()
    layout.ParseFromString(events.Tensors(cs_metadata.CONFIG_SUMMARY_TAG)[0].tensor_proto.string_val[0])
    regexes = [t for c in layout.category for chart in c.chart for t in chart.multiline.tag]
    assert regexes and all(any(re.match(r, tag) for tag in scalars) for r in regexes)


class ManualAccumulation(SharedMLP):
    """Manual optimization that steps every second batch: ``.grad`` holds two batches."""

    def __init__(self) -> None:
        super().__init__()
        self.automatic_optimization = False

    def training_step(self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int) -> None:
        x, y = batch
        self.manual_backward(F.cross_entropy(self(x), y) / 2)
        if batch_idx % 2 == 1:
            opt = self.optimizers()
            opt.step()
            opt.zero_grad()


def test_manual_accumulation_keeps_the_earlier_batches_as_one_site(tmp_path: Path) -> None:
    # the batches accumulated before the logging one are in `.grad` when tracking starts: they are
    # the `<earlier>` site, so the sites still add up to the gradient the optimizer steps on
    import warnings

    module = ManualAccumulation()
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        _, scalars = fit(module, tmp_path, max_steps=2)
    assert not [w for w in record if "ParameterMonitor" in str(w.message)]
    assert sorted(scalars["grad_norm/net.3.weight"]) == [1, 3]
    for step in (1, 3):
        assert_close(scalars["grad_norm/net.3.weight"][step], module.grads[step]["net.3.weight"].norm().item())
        assert scalars["shared_grad_error/net.3.weight"][step] < 1e-6
    sites = {t.rsplit("/", 1)[1] for t in scalars if t.startswith("shared_grad/net.3.weight/")}
    assert sites == {"<earlier>", "net.3", "net.6"}


class GeneratorFirstGAN(pl.LightningModule):
    """Manual optimization without ``toggle_optimizer``: G steps first, then ``opt_d.zero_grad()`` and D's backward.

    D's shared layer receives G's loss too; ``zero_grad`` erases that from ``.grad``, so the
    contributions must not keep it either.
    """

    def __init__(self) -> None:
        super().__init__()
        self.automatic_optimization = False
        shared = nn.Linear(4, 4)
        self.d = nn.Sequential(shared, nn.Tanh(), shared, nn.Linear(4, 1))
        self.g = nn.Linear(4, 4)

    def training_step(self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int) -> None:
        opt_d, opt_g = self.optimizers()
        x = batch[0]
        self.manual_backward(-self.d(self.g(x)).mean())
        opt_g.step()
        opt_g.zero_grad()
        opt_d.zero_grad()  # empties `.grad` of D, which G's backward filled
        self.manual_backward(self.d(x).pow(2).mean() + self.d(self.g(x).detach()).mean())
        opt_d.step()

    def configure_optimizers(self) -> list[torch.optim.Optimizer]:
        return [torch.optim.SGD(self.d.parameters(), lr=0.1), torch.optim.SGD(self.g.parameters(), lr=0.1)]


def test_gan_contributions_follow_zero_grad(tmp_path: Path) -> None:
    import warnings

    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        _, scalars = fit(GeneratorFirstGAN(), tmp_path, max_steps=6)
    assert sorted(scalars["shared_grad_error/d.0.weight"]) == [0, 1, 2]
    assert max(scalars["shared_grad_error/d.0.weight"].values()) < 1e-6
    assert not [w for w in record if "outside the forward" in str(w.message)]


# --------------------------------------------------------------------------------------------
# manual optimization with clipping, short runs, odd Trainers
# --------------------------------------------------------------------------------------------
class ManualClipping(SharedMLP):
    """Manual optimization that clips with ``self.clip_gradients`` before ``opt.step()``; records the gradients
    before clipping (the oracle) in ``training_step``."""

    def __init__(self) -> None:
        super().__init__(lr=0.5)
        self.automatic_optimization = False
        self.before_clip: dict[int, dict[str, torch.Tensor]] = {}

    def training_step(self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int) -> None:
        x, y = batch
        step = step_label(self.trainer)
        self._record_uses(x, y, step)
        opt = self.optimizers()
        opt.zero_grad()
        self.manual_backward(F.cross_entropy(self(x), y))
        self.before_clip[step] = {n: p.grad.detach().clone() for n, p in self.named_parameters()}
        self.clip_gradients(opt, gradient_clip_val=0.05, gradient_clip_algorithm="norm")
        opt.step()


def test_manual_clipping_logs_the_gradient_before_clipping_and_exact_uses(tmp_path: Path) -> None:
    module = ManualClipping()
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        _, scalars = fit(module, tmp_path, max_steps=3)
    assert not [w for w in record if "ParameterMonitor" in str(w.message)]  # no false "uses don't add up"
    for step in range(3):
        grads = module.before_clip[step]
        total = math.sqrt(sum(g.double().square().sum().item() for g in grads.values()))
        clipped = math.sqrt(sum(g.double().square().sum().item() for g in module.grads[step].values()))
        assert clipped < 0.051 < total  # the step was really clipped
        assert_close(scalars["grad_norm_total"][step], total)
        assert_close(scalars["grad_norm/net.3.weight"][step], grads["net.3.weight"].norm().item())
        assert scalars["shared_grad_error/net.3.weight"][step] < 1e-6
        for site in ("net.3", "net.6"):
            use = module.uses[step][("net.3.weight", site)]
            assert_close(scalars[f"shared_grad/net.3.weight/{site}"][step], use.norm().item())


def test_a_fit_shorter_than_the_logging_interval_warns_once_and_says_so(tmp_path: Path) -> None:
    from param_monitor.tensorboard_plugin.metadata import parse_run_metadata

    with pytest.warns(UserWarning) as record:
        trainer, scalars = fit(SharedMLP(), tmp_path, max_steps=30, log_every_n_steps=50)
    ours = [str(w.message) for w in record if "ParameterMonitor" in str(w.message)]
    assert len(ours) == 1, ours
    assert "ran 30 optimizer step(s) and logs every 50 (`log_every_n_steps=50`" in ours[0]
    assert not [t for t in scalars if t.startswith("grad_norm")]
    meta = load_events(trainer.logger.log_dir).Tensors("param_monitor/run_metadata")[-1].tensor_proto
    status = parse_run_metadata(meta)
    assert (status["steps_logged"], status["log_every_n_steps"], status["steps_run"]) == (0, 50, 30)


def test_barebones_trainer_is_refused_with_the_truth(tmp_path: Path) -> None:
    from lightning.pytorch.utilities.exceptions import MisconfigurationException

    trainer = pl.Trainer(barebones=True, callbacks=[ParameterMonitor()], max_steps=1, accelerator="cpu", devices=1)
    match = r"barebones=True\)`: barebones mode forbids loggers.*PlainMonitor"
    with pytest.raises(MisconfigurationException, match=match):
        trainer.fit(SharedMLP(), loader())


class ManualClippingTwoOptimizers(ManualClipping):
    """Two optimizers (the shared layer in the second), each clipped before its step."""

    def configure_optimizers(self) -> list[torch.optim.Optimizer]:
        shared = list(self.net[3].parameters())
        rest = [p for n, p in self.named_parameters() if not n.startswith("net.3.")]
        return [torch.optim.SGD(rest, lr=self.lr), torch.optim.SGD(shared, lr=self.lr)]

    def training_step(self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int) -> None:
        x, y = batch
        step = step_label(self.trainer)
        self._record_uses(x, y, step)
        optimizers = self.optimizers()
        for opt in optimizers:
            opt.zero_grad()
        self.manual_backward(F.cross_entropy(self(x), y))
        self.before_clip[step] = {n: p.grad.detach().clone() for n, p in self.named_parameters()}
        for opt in optimizers:
            self.clip_gradients(opt, gradient_clip_val=0.01, gradient_clip_algorithm="norm")
            opt.step()


def test_manual_clipping_with_two_optimizers_logs_each_total_before_clipping(tmp_path: Path) -> None:
    module = ManualClippingTwoOptimizers()
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        _, scalars = fit(module, tmp_path, max_steps=4)  # global_step counts both optimizers' steps
    assert not [w for w in record if "ParameterMonitor" in str(w.message)]
    for step in range(2):
        grads = module.before_clip[step]
        shared = ["net.3.weight", "net.3.bias"]
        norm_shared = math.sqrt(sum(grads[n].double().square().sum().item() for n in shared))
        norm_rest = math.sqrt(sum(g.double().square().sum().item() for n, g in grads.items() if n not in shared))
        assert_close(scalars["grad_norm_total/optimizer_1"][step], norm_shared)
        assert_close(scalars["grad_norm_total/optimizer_0"][step], norm_rest)
        assert norm_shared > 0.011  # really clipped
        assert scalars["shared_grad_error/net.3.weight"][step] < 1e-6
