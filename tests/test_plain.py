"""PlainMonitor: the plain-PyTorch API logs what the Lightning callback logs, and says when a call is missing."""

from __future__ import annotations

import math
import warnings
from pathlib import Path

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.tensorboard import SummaryWriter

from param_monitor import ParameterWatcher, PlainMonitor, tags
from param_monitor.tensorboard_plugin.metadata import parse_run_metadata
from tests.helpers.events import load_events, read_scalars, read_texts
from tests.helpers.modules import SharedMLP, fit, loader


def plain_run(module: nn.Module, log_dir: Path, steps: int, **options: object) -> None:
    optimizer = torch.optim.SGD(module.parameters(), lr=0.1)
    monitor = PlainMonitor(module, SummaryWriter(str(log_dir)), log_every_n_steps=1, **options)
    for step, (x, y) in zip(range(steps), loader(), strict=False):
        optimizer.zero_grad(set_to_none=True)
        with monitor.step(step) as s:
            s.backward(F.cross_entropy(module(x), y))
            s.log(optimizer)
        optimizer.step()
    monitor.close()


def test_plain_and_lightning_runs_log_the_same_numbers(tmp_path: Path) -> None:
    options = {"log_update_ratio": True, "log_dead_units": True}
    torch.manual_seed(0)
    plain_module = SharedMLP()
    torch.manual_seed(0)
    lightning_module = SharedMLP()
    from param_monitor import ParameterMonitor

    trainer, lightning = fit(lightning_module, tmp_path / "lightning", ParameterMonitor(**options), max_steps=4)
    plain_run(plain_module, tmp_path / "plain", 4, **options)
    plain = read_scalars(tmp_path / "plain")
    ours = {t for t in lightning if tags.family_of(t) is not None}  # the monitor's, not Lightning's own
    assert set(plain) == ours and any(t.startswith("shared_grad/") for t in ours)
    assert any(t.startswith("update_ratio/") for t in ours)
    for tag in ours:
        assert sorted(plain[tag]) == sorted(lightning[tag]) == [0, 1, 2, 3], tag
        for step, value in lightning[tag].items():
            assert abs(plain[tag][step] - value) <= 1e-6 * max(1.0, abs(value)), (tag, step)
    # first-class in the tab: its run metadata (parameters in model order, shared sites) and the table
    meta = parse_run_metadata(load_events(tmp_path / "plain").Tensors("param_monitor/run_metadata")[-1].tensor_proto)
    assert [p["name"] for p in meta["parameters"]] == [n for n, _ in plain_module.named_parameters()]
    assert meta["shared"] == {"net.3.weight": ["net.3", "net.6"], "net.3.bias": ["net.3", "net.6"]}
    assert meta["steps_logged"] == 1 and meta["log_every_n_steps"] == 1
    assert read_texts(tmp_path / "plain", "param_monitor/parameters")


def shared_block() -> nn.Sequential:
    torch.manual_seed(0)
    shared = nn.Linear(4, 4)
    return nn.Sequential(nn.Linear(2, 4), shared, nn.ReLU(), shared)


def test_readme_example_without_before_backward_warns_instead_of_dropping_shared_tags_silently() -> None:
    model = shared_block()
    watcher = ParameterWatcher(model)
    watcher.start_step()
    watcher.begin_forward()
    model(torch.randn(8, 2)).sum().backward()  # the README's example, as printed: no before_backward
    with pytest.warns(UserWarning, match=r"before_backward\(loss\).*no `shared_grad\*` tag"):
        metrics = watcher.compute()
    assert not [k for k in metrics if k.startswith("shared_grad")] and "grad_norm/1.weight" in metrics


def monitor_of(model: nn.Module, tmp_path: Path) -> tuple[PlainMonitor, torch.optim.Optimizer]:
    return PlainMonitor(model, SummaryWriter(str(tmp_path)), log_every_n_steps=1), torch.optim.SGD(
        model.parameters(), lr=0.1
    )


def test_backward_outside_the_api_is_named(tmp_path: Path) -> None:
    model = shared_block()
    monitor, optimizer = monitor_of(model, tmp_path)
    with pytest.warns(UserWarning, match=r"step 0: no backward pass was announced.*`s.backward\(loss\)`"):
        with monitor.step(0) as s:
            model(torch.randn(8, 2)).sum().backward()
            s.log(optimizer)
    assert "grad_norm/1.weight" in s.metrics and not [k for k in s.metrics if k.startswith("shared_grad")]
    monitor.close()


def test_forward_before_the_block_is_named(tmp_path: Path) -> None:
    model = shared_block()
    monitor, optimizer = monitor_of(model, tmp_path)
    loss = model(torch.randn(8, 2)).sum()
    with pytest.warns(UserWarning, match=r"the loss was computed before `monitor.step\(\)` began"):
        with monitor.step(0) as s:
            s.backward(loss)
            s.log(optimizer)
    monitor.close()


def test_a_logging_step_without_log_is_named(tmp_path: Path) -> None:
    model = shared_block()
    monitor, optimizer = monitor_of(model, tmp_path)
    with pytest.warns(UserWarning, match=r"step 0: a logging batch ended without an optimizer step.*s.log"):
        with monitor.step(0) as s:
            s.backward(model(torch.randn(8, 2)).sum())
    monitor.close()


def test_log_outside_its_block_is_an_error(tmp_path: Path) -> None:
    model = shared_block()
    monitor, optimizer = monitor_of(model, tmp_path)
    with monitor.step(0) as s:
        s.backward(model(torch.randn(8, 2)).sum())
        s.log(optimizer)
    with pytest.raises(RuntimeError, match=r"`s.log\(\)` outside its `with monitor.step\(step\) as s:` block"):
        s.log(optimizer)
    monitor.close()


def test_a_failed_step_leaves_no_hook_and_the_next_one_logs(tmp_path: Path) -> None:
    model = shared_block()
    monitor, optimizer = monitor_of(model, tmp_path)
    with pytest.raises(ValueError, match="user code"):
        with monitor.step(0):
            model(torch.randn(8, 2))
            raise ValueError("user code")
    assert not torch.nn.modules.module._global_forward_pre_hooks
    optimizer.zero_grad()
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # a clean step: no warning at all
        with monitor.step(1) as s:
            s.backward(model(torch.randn(8, 2)).sum())
            s.log(optimizer)
    assert s.metrics["shared_grad_error/1.weight"] < 1e-6
    assert math.isclose(s.metrics["grad_norm/1.weight"], model[1].weight.grad.norm().item(), rel_tol=1e-6)
    monitor.close()


def test_a_tied_parameter_whose_backward_was_not_announced_is_named(tmp_path: Path) -> None:
    class Tied(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.wte = nn.Embedding(9, 4)
            self.head = nn.Linear(4, 9, bias=False)
            self.head.weight = self.wte.weight  # registered twice: shared by construction
            self.other = nn.Linear(4, 4)

    torch.manual_seed(0)
    model = Tied()
    monitor, optimizer = monitor_of(model, tmp_path)
    idx = torch.randint(0, 9, (6,))
    with pytest.warns(UserWarning, match=r"shared parameter `wte.weight` has a gradient but none of its uses"):
        with monitor.step(0) as s:
            s.backward(model.other(torch.randn(3, 4)).sum())  # announced: no use of the tied weight
            F.cross_entropy(model.head(model.wte(idx)), idx).backward()  # not announced
            s.log(optimizer)
    assert "grad_norm/wte.weight" in s.metrics and "shared_grad_error/wte.weight" not in s.metrics
    monitor.close()


def test_step_hooks_see_the_phases_of_a_plain_loop_even_with_step_after_the_block(tmp_path: Path) -> None:
    from param_monitor.core import StepHook

    class Record(StepHook):
        def __init__(self) -> None:
            self.seen: list[tuple[str, bool]] = []

        def batch_start(self, logging: bool) -> None:
            self.seen.append(("batch_start", logging))

        def after_optimizer_step(self, optimizer: torch.optim.Optimizer, logging: bool) -> None:
            self.seen.append(("after_optimizer_step", logging))

    model = shared_block()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    monitor = PlainMonitor(model, SummaryWriter(str(tmp_path)), log_every_n_steps=2)
    hook = Record()
    monitor.core.hooks.append(hook)
    for step in range(2):
        optimizer.zero_grad()
        with monitor.step(step) as s:
            s.backward(model(torch.randn(8, 2)).sum())
            s.log(optimizer)
        optimizer.step()  # after the block: the hook still learns it was the logging step's
    monitor.close()
    assert hook.seen == [
        ("batch_start", False),
        ("after_optimizer_step", False),
        ("batch_start", True),
        ("after_optimizer_step", True),
    ]


@pytest.mark.parametrize("unscale_first", [True, False], ids=["unscale_-then-log", "log-scaled"])
def test_grad_scaler_values_are_logged_unscaled(tmp_path: Path, unscale_first: bool) -> None:
    model = shared_block()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    scaler = torch.amp.GradScaler("cpu", init_scale=1024.0)
    monitor = PlainMonitor(model, SummaryWriter(str(tmp_path)), log_every_n_steps=1, scaler=scaler)
    x = torch.randn(8, 2)
    with monitor.step(0) as s:
        s.backward(scaler.scale(model(x).square().mean()))
        if unscale_first:
            scaler.unscale_(optimizer)
        s.log(optimizer)
        scaled = not unscale_first
        grad = model[1].weight.grad / (1024.0 if scaled else 1.0)  # the oracle: the gradient the step uses
    scaler.step(optimizer)
    scaler.update()
    monitor.close()
    assert math.isclose(s.metrics["grad_norm/1.weight"], grad.norm().item(), rel_tol=1e-6)
    assert s.metrics["shared_grad_error/1.weight"] < 1e-6
    uses = [s.metrics[f"shared_grad/1.weight/{site}"] for site in ("1", "3")]
    assert sum(uses) >= grad.norm().item() * (1 - 1e-6)  # the uses are unscaled too (triangle inequality)


def test_several_optimizers_get_one_total_each(tmp_path: Path) -> None:
    model = shared_block()
    first, second = (torch.optim.SGD(m.parameters(), lr=0.1) for m in (model[0], model[1]))
    monitor = PlainMonitor(model, SummaryWriter(str(tmp_path)), log_every_n_steps=1, optimizers=[first, second])
    with monitor.step(0) as s:
        s.backward(model(torch.randn(8, 2)).square().mean())
        s.log(first)
        first_metrics = s.metrics
        s.log(second)
    monitor.close()
    norm = lambda m: math.sqrt(sum(p.grad.double().square().sum().item() for p in m.parameters()))  # noqa: E731
    assert math.isclose(first_metrics["grad_norm_total/optimizer_0"], norm(model[0]), rel_tol=1e-6)
    assert math.isclose(s.metrics["grad_norm_total/optimizer_1"], norm(model[1]), rel_tol=1e-6)
    assert s.metrics["shared_grad_error/1.weight"] < 1e-6  # the shared layer's uses, at its own optimizer's step


def test_nonfinite_between_logging_steps_is_recorded(tmp_path: Path) -> None:
    model = shared_block()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.0)
    monitor = PlainMonitor(model, SummaryWriter(str(tmp_path)), log_every_n_steps=3, check_finite_every_step=True)
    with pytest.warns(UserWarning, match=r"non-finite \(NaN/inf\) gradients first at step 1, in 1.weight"):
        for step in range(3):
            optimizer.zero_grad()
            with monitor.step(step) as s:
                s.backward(model(torch.randn(8, 2)).sum())
                if step == 1:
                    model[1].weight.grad[0, 0] = float("nan")
                s.log(optimizer)
    monitor.close()
    assert read_texts(tmp_path, "param_monitor/nonfinite")


def test_a_short_plain_run_says_why_it_logged_nothing_when_its_block_ends(tmp_path: Path) -> None:
    model = shared_block()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    with pytest.warns(UserWarning, match=r"logged no step: the fit ran 3 optimizer step\(s\) and logs every 50"):
        with PlainMonitor(model, SummaryWriter(str(tmp_path))) as monitor:
            for step in range(3):
                with monitor.step(step) as s:
                    s.backward(model(torch.randn(8, 2)).sum())
                    s.log(optimizer)
    meta = parse_run_metadata(load_events(tmp_path).Tensors("param_monitor/run_metadata")[-1].tensor_proto)
    assert (meta["steps_logged"], meta["steps_run"]) == (0, 3)


def test_log_called_twice_for_one_optimizer_is_named_not_blamed_on_backward(tmp_path: Path) -> None:
    # The second `s.log(optimizer)` of a step used to re-read the freed capture and warn that the
    # backward pass "was not announced" (it was): the warning named the wrong cause.
    model = shared_block()
    monitor, optimizer = monitor_of(model, tmp_path)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for step in range(2):
            optimizer.zero_grad()
            with monitor.step(step) as s:
                s.backward(model(torch.randn(8, 2)).square().mean())
                s.log(optimizer)
                first = dict(s.metrics)
                s.log(optimizer)
                assert s.metrics == first  # the second call logs nothing new
            optimizer.step()
    monitor.close()
    messages = [str(w.message) for w in caught]
    assert not [m for m in messages if "was not announced" in m], messages
    assert len([m for m in messages if "`s.log(optimizer)` was called twice" in m]) == 1, messages
    scalars = read_scalars(tmp_path)
    assert sorted(scalars[tags.shared_grad("1.weight", "1")]) == [0, 1]


def test_a_closed_monitor_refuses_a_step(tmp_path: Path) -> None:
    # After close() the hooks are off: a step used to run unmonitored with a warning blaming the
    # batch start ("ran before the batch start was announced"), not the close.
    model = shared_block()
    monitor, optimizer = monitor_of(model, tmp_path)
    monitor.close()
    with pytest.raises(RuntimeError, match=r"`PlainMonitor` is closed"):
        monitor.step(0)


def test_log_before_backward_names_the_order(tmp_path: Path) -> None:
    # `s.log` before `s.backward`: the hint used to say only "instead of `loss.backward()`", which
    # this loop does not call.
    model = shared_block()
    monitor, optimizer = monitor_of(model, tmp_path)
    with pytest.warns(UserWarning, match=r"no backward pass was announced.*`s.backward\(loss\)` before `s.log"):
        with monitor.step(0) as s:
            loss = model(torch.randn(8, 2)).sum()
            s.log(optimizer)
            s.backward(loss)
    monitor.close()


def test_histograms_of_a_sparse_gradient_are_written_not_a_crash(tmp_path: Path) -> None:
    # `nn.Embedding(sparse=True)` used twice: `.grad` is a sparse tensor; the histogram step used to
    # raise NotImplementedError (`isfinite` has no sparse kernel) inside `s.log`.
    from tests.helpers.events import read_histograms

    torch.manual_seed(0)
    emb, head = nn.Embedding(10, 4, sparse=True), nn.Linear(4, 10)
    model = nn.ModuleDict({"emb": emb, "head": head})
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    x = torch.tensor([[1, 2, 2, 3]])
    with PlainMonitor(model, SummaryWriter(str(tmp_path)), log_every_n_steps=1, histogram_every_n_steps=1) as monitor:
        with monitor.step(0) as s:
            s.backward(head(emb(x) + emb(x.flip(1))).square().mean())
            s.log(optimizer)
        assert emb.weight.grad.is_sparse
        dense = emb.weight.grad.to_dense()
        optimizer.step()
    histograms = read_histograms(tmp_path)
    grad = next(h[0] for tag, h in histograms.items() if "grad" in tag and "emb.weight" in tag)
    assert grad.num == dense.numel()
    assert grad.sum == pytest.approx(dense.sum().item(), abs=1e-6)
    assert read_scalars(tmp_path)["grad_norm/emb.weight"][0] == pytest.approx(dense.norm().item(), rel=1e-6)


def test_check_finite_every_step_takes_a_sparse_gradient(tmp_path: Path) -> None:
    # `check_finite_every_step` on a step that does not log: `_foreach_norm(dtype=...)` has no sparse
    # kernel, and raised RuntimeError inside `s.log`; a NaN in the sparse gradient is still recorded.
    torch.manual_seed(0)
    emb, head = nn.Embedding(10, 4, sparse=True), nn.Linear(4, 10)
    model = nn.ModuleDict({"emb": emb, "head": head})
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    x = torch.tensor([[1, 2, 2, 3]])
    options = {"log_every_n_steps": 3, "check_finite_every_step": True}
    with pytest.warns(UserWarning, match=r"non-finite \(NaN/inf\) gradients first at step 1, in emb.weight"):
        with PlainMonitor(model, SummaryWriter(str(tmp_path)), **options) as monitor:
            for step in range(3):
                optimizer.zero_grad()
                with monitor.step(step) as s:
                    s.backward(head(emb(x)).square().mean())
                    if step == 1:
                        emb.weight.grad._values()[0, 0] = float("nan")
                    s.log(optimizer)
                if step != 1:
                    optimizer.step()
    record = read_texts(tmp_path, "param_monitor/nonfinite")[0][1]
    assert "| first step | 1 |" in record and "| first layers | emb.weight |" in record


@pytest.mark.parametrize("writer", [None, "runs/plain"])
def test_a_writer_that_is_not_one_is_refused_at_construction(tmp_path: Path, writer: object) -> None:
    # None or a folder name used to be accepted and fail inside the first logging step
    # (AttributeError: no `add_text`), in the middle of training.
    with pytest.raises(ValueError, match=r"`writer` must be a `SummaryWriter`.*or a list of `Sink`s, got"):
        PlainMonitor(shared_block(), writer, log_every_n_steps=1)


def test_log_every_n_steps_none_is_refused_in_a_plain_loop(tmp_path: Path) -> None:
    # None means "the Trainer's" for the callback; a plain loop has no Trainer: it used to log
    # nothing at all, without a warning.
    with pytest.raises(ValueError, match=r"`log_every_n_steps` must be a positive int.*got None"):
        PlainMonitor(shared_block(), SummaryWriter(str(tmp_path)), log_every_n_steps=None)


def test_a_step_label_that_does_not_increase_is_named(tmp_path: Path) -> None:
    # A loop that passes the epoch's batch index (0, 1, 0, 1, ...) repeats labels: TensorBoard keeps
    # one point per label and draws the rest out of order. It used to be accepted silently.
    model = shared_block()
    monitor, optimizer = monitor_of(model, tmp_path)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for step in (0, 1, 1, 0):
            optimizer.zero_grad()
            with monitor.step(step) as s:
                s.backward(model(torch.randn(8, 2)).square().mean())
                s.log(optimizer)
            optimizer.step()
    monitor.close()
    named = [str(w.message) for w in caught if "step labels must increase" in str(w.message)]
    assert len(named) == 1 and "step 1 after step 1" in named[0], named
