"""Per-use tracking under ``torch.compile``: the logging steps run eagerly, every other step compiled.

Each way of compiling is fitted by a real Trainer; the per-use tags read back from the event files
are compared, at every logging step, with an UNTIED TWIN: the same forward where each use reads
its own detached copy of the shared tensor, run eagerly after the fit on the weights and batches
of that step (so each copy's gradient is one use's contribution). The steps that do not log run
under ``torch.compiler.set_stance("fail_on_recompile")`` (the user's stance, which the monitor
must give back), and dynamo's counters must not move on them: no graph, recompile or graph break
of the monitor's making. ``aot_eager`` keeps the compile cheap (the stance acts in dynamo, before
any backend); one case uses the default inductor backend.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import lightning.pytorch as pl
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from lightning.pytorch.callbacks import Callback
from torch._dynamo.utils import counters
from torch.utils.data import DataLoader, TensorDataset
from torch.utils.tensorboard import SummaryWriter

from param_monitor import ParameterMonitor, PlainMonitor
from param_monitor._lightning import should_accumulate, step_label
from param_monitor.compile import EagerStance, compiled_parts, graphed_parts
from param_monitor.core import EagerLoggingSteps, MonitorCore
from tests.helpers.events import read_scalars
from tests.helpers.modules import fit

V, D, T = 11, 6, 5  # vocabulary, width, sequence length
EVERY, STEPS = 2, 7  # logging steps 1, 3, 5; step 0 names the call sites (eager), 2 compiles, 4 and 6 reuse
SITES = {"wte.weight": ["wte", "head"], "block.weight": ["block#0", "block#1"], "block.bias": ["block#0", "block#1"]}


class Net(nn.Module):
    """A tied embedding/head and one block used twice (ALBERT-style)."""

    def __init__(self) -> None:
        super().__init__()
        self.wte = nn.Embedding(V, D)
        self.block = nn.Linear(D, D)
        self.head = nn.Linear(D, V, bias=False)
        self.head.weight = self.wte.weight

    def forward(self, idx: torch.Tensor) -> torch.Tensor:
        h = self.wte(idx)
        h = torch.tanh(self.block(h))
        h = torch.tanh(self.block(h))
        return self.head(h)


def lm_loss(net: Callable[[torch.Tensor], torch.Tensor], x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    return F.cross_entropy(net(x).reshape(-1, V), y.reshape(-1))


def twin_uses(w: dict[str, torch.Tensor], x: torch.Tensor, y: torch.Tensor) -> dict[tuple[str, str], torch.Tensor]:
    """The untied twin: every use reads its own detached copy; ``{(parameter, site): that use's gradient}``."""
    copies = {(n, s): w[n].detach().clone().requires_grad_() for n, sites in SITES.items() for s in sites}
    h = F.embedding(x, copies["wte.weight", "wte"])
    for k in range(2):
        h = torch.tanh(F.linear(h, copies["block.weight", f"block#{k}"], copies["block.bias", f"block#{k}"]))
    loss = F.cross_entropy(F.linear(h, copies["wte.weight", "head"]).reshape(-1, V), y.reshape(-1))
    grads = torch.autograd.grad(loss, list(copies.values()))
    return dict(zip(copies, grads, strict=True))


def compiled_loss(net: nn.Module, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    return lm_loss(net, x, y)


STEP_FN = torch.compile(compiled_loss, backend="aot_eager")  # a compiled function no module holds


class LM(pl.LightningModule):
    """``how`` picks the way the user compiles; the weights and batches of each logging step are kept."""

    def __init__(self, how: str, backend: str = "aot_eager") -> None:
        super().__init__()
        self.how, self.backend = how, backend
        self.net: nn.Module = Net()
        self.plain = self.net  # the uncompiled Net, for the oracle
        if how == "torch.compile(model)":
            self.net = torch.compile(self.net, backend=backend)
        elif how == "Module.compile()":
            self.net.compile(backend=backend)
        elif how == "forward = torch.compile(forward)":
            self.net.forward = torch.compile(self.net.forward, backend=backend)
        elif how == "compiled autograd":
            self.step_fn = torch.compile(compiled_loss, backend=backend)
        self.snapshots: dict[int, tuple[dict[str, torch.Tensor], list[tuple[torch.Tensor, torch.Tensor]]]] = {}

    def configure_model(self) -> None:
        if self.how == "configure_model" and self.net is self.plain:
            self.net = torch.compile(self.net, backend=self.backend)

    def on_train_batch_start(self, batch: Any, batch_idx: int) -> None:
        step = step_label(self.trainer)
        if (step + 1) % EVERY == 0:
            weights = {n: p.detach().clone() for n, p in self.plain.named_parameters()}
            self.snapshots.setdefault(step, (weights, []))[1].append((batch[0].clone(), batch[1].clone()))

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        x, y = batch
        if self.how == "compiled function":
            return STEP_FN(self.net, x, y)
        if self.how == "compiled autograd":
            return self.step_fn(self.net, x, y)
        return lm_loss(self.net, x, y)

    def backward(self, loss: torch.Tensor, *args: Any, **kwargs: Any) -> None:
        if self.how != "compiled autograd":
            return super().backward(loss, *args, **kwargs)
        from torch._dynamo import compiled_autograd

        with compiled_autograd._enable(torch.compile(backend=self.backend)):
            loss.backward()

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SGD(self.parameters(), lr=0.1)


class RecompileGuard(Callback):
    """After the first compiled step, the user's stance is ``fail_on_recompile``; dynamo's counters are kept."""

    def __init__(self, armed_after: int) -> None:
        self.armed_after = armed_after
        self.counts: dict[str, int] | None = None
        self.before: dict[str, int] | None = None  # before the first step that does not track
        self.stances: dict[int, str] = {}

    def on_train_batch_start(self, trainer: pl.Trainer, *args: Any) -> None:
        self.stances[step_label(trainer)] = torch._dynamo.eval_frame._stance.stance  # read only
        if step_label(trainer) == self.armed_after and self.before is None:
            self.before = compile_counts()

    def on_train_batch_end(self, trainer: pl.Trainer, *args: Any) -> None:
        if step_label(trainer) == self.armed_after and not should_accumulate(trainer):  # its last micro-batch
            self.counts = compile_counts()
            torch.compiler.set_stance("fail_on_recompile")

    def teardown(self, *args: Any, **kwargs: Any) -> None:
        torch.compiler.set_stance("default")


def compile_counts() -> dict[str, int]:
    return {
        "graphs": counters["stats"]["unique_graphs"],
        "recompiles": sum(counters["recompiles"].values()),
        "graph_breaks": sum(counters["graph_break"].values()),
        "compiled_autograd": counters["compiled_autograd"]["captures"],
    }


def data(accumulate: int) -> DataLoader:
    g = torch.Generator().manual_seed(0)
    tokens = torch.randint(0, V, (STEPS * accumulate * 4, T + 1), generator=g)
    return DataLoader(TensorDataset(tokens[:, :-1], tokens[:, 1:]), batch_size=4)


def fit_compiled(
    how: str, tmp_path: Path, accumulate: int = 1, backend: str = "aot_eager", **monitor: Any
) -> tuple[LM, dict[str, dict[int, float]], RecompileGuard]:
    torch._dynamo.reset()
    counters.clear()
    torch.manual_seed(0)
    module = LM(how, backend)
    guard = RecompileGuard(armed_after=2)
    target = torch.compile(module, backend=backend) if how == "fit(torch.compile(lit))" else module
    _, scalars = fit(
        target,  # type: ignore[arg-type]
        tmp_path,
        data=data(accumulate),
        max_steps=STEPS,
        accumulate_grad_batches=accumulate,
        callbacks=[guard, ParameterMonitor(log_every_n_steps=EVERY, **monitor)],
    )
    return module, scalars, guard


def plain_name(tag: str) -> str:
    """``shared_grad/net._orig_mod.wte.weight/net._orig_mod.head`` -> ``shared_grad/wte.weight/head``."""
    return tag.replace("_orig_mod.", "").replace("net.", "")


def check_against_twin(module: LM, scalars: dict[str, dict[int, float]], accumulate: int) -> None:
    logged = {plain_name(t): v for t, v in scalars.items()}
    assert sorted(module.snapshots) == [1, 3, 5]
    for step, (weights, batches) in module.snapshots.items():
        assert len(batches) == accumulate
        parts = [twin_uses(weights, x, y) for x, y in batches]
        uses = {key: sum(p[key] for p in parts) / accumulate for key in parts[0]}  # Lightning scales by 1/accumulate
        tags = {t for t, v in logged.items() if t.startswith("shared_grad/") and step in v}
        assert tags == {f"shared_grad/{n}/{s}" for n, s in uses}, step
        for name, sites in SITES.items():
            total = sum(uses[name, s].double() for s in sites)
            for site in sites:
                want = uses[name, site]
                norm = want.norm().item()
                assert logged[f"shared_grad/{name}/{site}"][step] == pytest.approx(norm, rel=1e-6, abs=1e-9)
                share = ((want.double() * total).sum() / total.square().sum()).item()
                assert logged[f"shared_grad_share/{name}/{site}"][step] == pytest.approx(share, abs=1e-6)
            assert logged[f"shared_grad_error/{name}"][step] < 1e-6


def eager_hook(core: MonitorCore) -> EagerLoggingSteps:
    (hook,) = [h for h in core.hooks if isinstance(h, EagerLoggingSteps)]  # registered by the core itself
    return hook


def stance() -> str:
    return torch._dynamo.eval_frame._stance.stance  # read only


def check_no_compile_on_plain_steps(guard: RecompileGuard | SimpleNamespace) -> None:
    # steps 0 (naming the call sites) and 1 (logging) ran eagerly: nothing traced, no graph break
    assert guard.before == {"graphs": 0, "recompiles": 0, "graph_breaks": 0, "compiled_autograd": 0}
    assert guard.counts is not None and guard.counts["graphs"] >= 1, guard.counts  # the model was compiled
    assert guard.counts["recompiles"] == 0 and guard.counts["graph_breaks"] == 0, guard.counts
    assert compile_counts() == guard.counts  # steps 3-6: nothing traced, recompiled or broken
    assert {guard.stances[s] for s in (4, 5, 6)} == {"fail_on_recompile"}  # the monitor gave it back


VARIANTS = [
    "torch.compile(model)",
    "Module.compile()",
    "configure_model",
    "fit(torch.compile(lit))",
    "forward = torch.compile(forward)",
    "compiled function",
    "compiled autograd",
]


@pytest.mark.parametrize("how", VARIANTS)
def test_per_use_tags_equal_the_untied_twin_under_every_way_of_compiling(how: str, tmp_path: Path) -> None:
    module, scalars, guard = fit_compiled(how, tmp_path)
    check_against_twin(module, scalars, accumulate=1)
    check_no_compile_on_plain_steps(guard)
    assert not eager_hook(module.trainer.callbacks[1]._core).stance.held
    if how == "compiled autograd":
        assert guard.counts["compiled_autograd"] >= 1  # the plain steps' backward was compiled


def test_gradient_accumulation_under_compile(tmp_path: Path) -> None:
    module, scalars, guard = fit_compiled("fit(torch.compile(lit))", tmp_path, accumulate=2)
    check_against_twin(module, scalars, accumulate=2)
    check_no_compile_on_plain_steps(guard)


@pytest.mark.slow
def test_inductor_backend(tmp_path: Path) -> None:
    module, scalars, guard = fit_compiled("torch.compile(model)", tmp_path, backend="inductor")
    check_against_twin(module, scalars, accumulate=1)
    check_no_compile_on_plain_steps(guard)


# -- detection, the off switch, what cannot run eagerly --------------------------------------------
def test_every_way_of_compiling_is_detected() -> None:
    def holder(net: nn.Module) -> nn.Module:
        outer = nn.Module()
        outer.net = net
        return outer

    assert compiled_parts(holder(Net())) == []
    assert compiled_parts(holder(torch.compile(Net(), backend="eager"))) == ["`net` (`torch.compile(module)`)"]
    in_place = Net()
    in_place.block.compile(backend="eager")
    assert compiled_parts(holder(in_place)) == ["`net.block` (`Module.compile()`)"]
    forward = Net()
    forward.forward = torch.compile(forward.forward, backend="eager")
    assert compiled_parts(holder(forward)) == ["`net.forward` (`= torch.compile(...)`)"]
    lit = LM("plain")
    torch.compile(lit, backend="eager")  # what `fit` receives; Lightning marks the module when fit unwraps it
    from lightning.pytorch.utilities.compile import from_compiled

    assert compiled_parts(from_compiled(torch.compile(lit, backend="eager"))) == [
        "the LightningModule (`fit(torch.compile(module))`)"
    ]


@pytest.mark.parametrize("how", ["torch.compile(model)", "forward = torch.compile(forward)"])
def test_eager_logging_steps_off_turns_tracking_off_with_one_warning(how: str, tmp_path: Path) -> None:
    with pytest.warns(UserWarning, match=r"compiled and `eager_logging_steps=False`") as record:
        module, scalars, guard = fit_compiled(how, tmp_path, eager_logging_steps=False)
    assert len([w for w in record if "eager_logging_steps" in str(w.message)]) == 1
    assert not [t for t in scalars if t.startswith("shared_grad")]
    name = next(t for t in scalars if t.startswith("grad_norm/") and t.endswith("block.weight"))
    assert sorted(scalars[name]) == [1, 3, 5]
    assert guard.stances[1] == "default"  # the monitor never touched the stance


def test_a_compiled_region_it_cannot_see_is_not_attributed(tmp_path: Path) -> None:
    # a compiled function the step calls cannot be found up front; with the off switch its region is
    # ONE node reading the tied weight once: no per-use value is written, one warning names the cause
    with pytest.warns(UserWarning, match=r"`torch.compile`d region") as record:
        _, scalars, _ = fit_compiled("compiled function", tmp_path, eager_logging_steps=False)
    warned = [str(w.message) for w in record if "region" in str(w.message)]
    assert len(warned) == 1 and "`net.wte.weight`" in warned[0] and "`net.block.weight`" in warned[0]
    assert not [t for t in scalars if t.startswith("shared_grad")]
    assert compile_counts()["graph_breaks"] == 0  # the monitor's module hooks are no-ops inside the region


def make_graphed_forward(module: nn.Module) -> Callable[..., torch.Tensor]:
    """What ``torch.cuda.make_graphed_callables`` puts on a module (CUDA only): a closure of this name."""

    def new_fwd(*args: Any) -> torch.Tensor:
        return type(module).forward(module, *args)

    return new_fwd


def test_a_user_captured_cuda_graph_turns_tracking_off_with_one_warning(tmp_path: Path) -> None:
    module = LM("plain")
    module.net.forward = make_graphed_forward(module.net)
    assert graphed_parts(module) == ["`net`"]
    with pytest.warns(UserWarning, match=r"`net` replay\(s\) a CUDA graph") as record:
        _, scalars = fit(module, tmp_path, ParameterMonitor(log_every_n_steps=EVERY), data(1), max_steps=2)
    assert len([w for w in record if "CUDA graph" in str(w.message)]) == 1
    assert not [t for t in scalars if t.startswith("shared_grad")] and "grad_norm/net.block.weight" in scalars


def test_the_stance_is_given_back_at_the_optimizer_step_and_after_an_exception(tmp_path: Path) -> None:
    seen: dict[str, str] = {}

    class Step(torch.optim.SGD):
        def step(self, closure: Any = None) -> Any:
            loss = closure()  # forward, backward, `on_before_optimizer_step`
            seen["optimizer"] = torch._dynamo.eval_frame._stance.stance
            if seen["forward"] == "force_eager":  # the logging step
                raise RuntimeError("user code failed")
            return super().step() or loss

    class Fails(LM):
        def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
            seen["forward"] = torch._dynamo.eval_frame._stance.stance
            return super().training_step(batch, batch_idx)

        def configure_optimizers(self) -> torch.optim.Optimizer:
            return Step(self.parameters(), lr=0.1)

    torch.compiler.set_stance("eager_on_recompile")
    try:
        with pytest.raises(RuntimeError, match="user code failed"):
            fit(Fails("torch.compile(model)"), tmp_path, ParameterMonitor(log_every_n_steps=EVERY), data(1))
        assert seen == {"forward": "force_eager", "optimizer": "eager_on_recompile"}
        assert torch._dynamo.eval_frame._stance.stance == "eager_on_recompile"  # the user's, after the failure
    finally:
        torch.compiler.set_stance("default")


def test_eager_stance_restores_what_the_user_had() -> None:
    stance = EagerStance()
    stance.exit()  # not held: nothing
    with torch.compiler.set_stance("fail_on_recompile"):
        stance.enter()
        stance.enter()  # held once
        assert stance.held and torch._dynamo.eval_frame._stance.stance == "force_eager"
        stance.exit()
        assert not stance.held and torch._dynamo.eval_frame._stance.stance == "fail_on_recompile"
    assert torch._dynamo.eval_frame._stance.stance == "default"


class TwoOptimizers(LM):
    """Manual optimization, a forward pass per optimizer in one batch (a GAN's pattern), compiled model."""

    def __init__(self) -> None:
        super().__init__("torch.compile(model)")
        self.automatic_optimization = False

    def training_step(self, batch: Any, batch_idx: int) -> None:
        x, y = batch
        for opt in self.optimizers():
            opt.zero_grad()
            self.manual_backward(lm_loss(self.net, x, y))
            opt.step()

    def configure_optimizers(self) -> list[torch.optim.Optimizer]:  # type: ignore[override]
        net = self.plain
        return [torch.optim.SGD([net.wte.weight], lr=0.1), torch.optim.SGD(net.block.parameters(), lr=0.1)]


def test_every_forward_pass_of_a_tracked_batch_with_several_optimizers_is_eager(tmp_path: Path) -> None:
    torch._dynamo.reset()
    counters.clear()
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        _, scalars = fit(TwoOptimizers(), tmp_path, ParameterMonitor(log_every_n_steps=EVERY), data(1), max_steps=8)
    assert not [w for w in record if "ParameterMonitor" in str(w.message)]
    for name in ("net._orig_mod.wte.weight", "net._orig_mod.block.weight"):
        assert sorted(scalars[f"shared_grad_error/{name}"]) == [1, 3]
        assert max(scalars[f"shared_grad_error/{name}"].values()) < 1e-6
    assert compile_counts()["graph_breaks"] == 0 and compile_counts()["recompiles"] == 0


def test_plain_api_runs_the_logging_steps_eagerly_too(tmp_path: Path) -> None:
    # the same stance hook, from the core: the `with monitor.step()` block of a tracked step runs eagerly
    # up to `s.log`, its per-use tags equal the untied twin's; the other steps run the compiled graph
    torch._dynamo.reset()
    counters.clear()
    torch.manual_seed(0)
    plain = Net()
    model = torch.compile(plain, backend="aot_eager")
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    oracle = SimpleNamespace(snapshots={})
    guard = SimpleNamespace(before=None, counts=None, stances={})
    inside: dict[int, tuple[str, str]] = {}  # step: (stance in the forward, stance after `s.log`)
    try:
        with PlainMonitor(model, SummaryWriter(str(tmp_path)), log_every_n_steps=EVERY) as monitor:
            for step, (x, y) in enumerate(data(1)):
                guard.stances[step] = stance()
                if step == 2:
                    guard.before = compile_counts()
                if (step + 1) % EVERY == 0:
                    weights = {n: p.detach().clone() for n, p in plain.named_parameters()}
                    oracle.snapshots[step] = (weights, [(x.clone(), y.clone())])
                optimizer.zero_grad()
                with monitor.step(step) as s:
                    forward = stance()
                    s.backward(lm_loss(model, x, y))
                    s.log(optimizer)
                    inside[step] = (forward, stance())
                optimizer.step()
                if step == 2:
                    guard.counts = compile_counts()
                    torch.compiler.set_stance("fail_on_recompile")  # from now on a recompile fails the step
    finally:
        torch.compiler.set_stance("default")
    assert {s for s, (forward, _) in inside.items() if forward == "force_eager"} == {0, 1, 3, 5}  # 0: call sites
    assert {after for _, after in inside.values()} <= {"default", "fail_on_recompile"}  # the user's, at `s.log`
    check_against_twin(oracle, read_scalars(tmp_path), accumulate=1)  # type: ignore[arg-type]
    check_no_compile_on_plain_steps(guard)
    assert not eager_hook(monitor.core).stance.held
