"""SharedUseTracker: every use of a parameter seen where it happens, named by module call, model untouched.

Each case compares against an independent oracle: a functional re-run with one detached copy of
the shared tensor per use (tests/helpers/uses.py).
"""

from __future__ import annotations

import copy
import io
import math
import pickle
import warnings
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.func import functional_call
from torch.utils.checkpoint import checkpoint

from param_monitor._lightning import step_label
from param_monitor.sharing import EARLIER_SITE, OUTSIDE_SITE, ROOT_SITE, SharedUseTracker
from tests.helpers.modules import SharedMLP, check_against_oracle, data_of, fit
from tests.helpers.uses import assert_matches, copies, oracle_grads, tracked_step


def params_of(module: nn.Module) -> dict[str, torch.Tensor]:
    return dict(module.named_parameters())


# -- uses that no module call of the owner makes ---------------------------------------------------
class TiedHead(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.wte = nn.Embedding(11, 6)
        self.mix = nn.Linear(6, 6)

    def forward(self, idx: torch.Tensor) -> torch.Tensor:
        return F.linear(torch.tanh(self.mix(self.wte(idx))), self.wte.weight)  # tied head, functional


def test_tied_head_used_functionally_in_the_parent() -> None:
    torch.manual_seed(0)
    model, idx = TiedHead(), torch.randint(0, 11, (7,))
    got, _ = tracked_step(model, lambda: model(idx).logsumexp(-1).sum())
    w = {"wte": copies({"wte.weight": model.wte.weight}), ROOT_SITE: copies({"wte.weight": model.wte.weight})}
    h = torch.tanh(model.mix(F.embedding(idx, w["wte"]["wte.weight"])))
    expected = oracle_grads(F.linear(h, w[ROOT_SITE]["wte.weight"]).logsumexp(-1).sum(), w)
    assert_matches(got, {"wte.weight": expected["wte.weight"]}, model)


class Albert(nn.Module):
    """One attention layer used at every depth (ALBERT-style)."""

    def __init__(self, layer: nn.Module, depth: int = 3) -> None:
        super().__init__()
        self.layer = layer
        self.depth = depth

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for _ in range(self.depth):
            out = self.layer(x, x, x, need_weights=False) if isinstance(self.layer, nn.MultiheadAttention) else None
            x = out[0] if out is not None else self.layer(x)
        return x


def albert_oracle(model: Albert, x: torch.Tensor) -> dict[str, dict[str, torch.Tensor]]:
    per_use = {f"layer#{k}": copies(params_of(model.layer)) for k in range(model.depth)}
    h = x
    for k in range(model.depth):
        if isinstance(model.layer, nn.MultiheadAttention):
            h = functional_call(model.layer, per_use[f"layer#{k}"], (h, h, h), {"need_weights": False})[0]
        else:
            h = functional_call(model.layer, per_use[f"layer#{k}"], (h,))
    grads = oracle_grads(h.pow(2).sum(), per_use)
    return {f"layer.{name}": sites for name, sites in grads.items()}


def test_multihead_attention_shared_across_depth_splits_every_weight() -> None:
    # MHA reads out_proj.weight/bias itself (out_proj is never called): still one use per depth
    torch.manual_seed(0)
    model, x = Albert(nn.MultiheadAttention(8, 2, dropout=0.0)), torch.randn(5, 2, 8)
    got, _ = tracked_step(model, lambda: model(x).pow(2).sum())
    expected = albert_oracle(model, x)
    assert {"layer.out_proj.weight", "layer.out_proj.bias", "layer.in_proj_weight"} <= set(got)
    assert_matches(got, expected, model)


def test_transformer_encoder_layer_shared_across_depth() -> None:
    torch.manual_seed(0)
    layer = nn.TransformerEncoderLayer(8, 2, 16, dropout=0.0, batch_first=True)
    model, x = Albert(layer, depth=2), torch.randn(2, 5, 8)
    got, _ = tracked_step(model, lambda: model(x).pow(2).sum())
    expected = {}
    for name, sites in albert_oracle(model, x).items():
        # a use belongs to the innermost module call: `layer.linear1#k`, `layer.self_attn#k` (which
        # reads out_proj's weights itself)
        owner = name.rsplit(".", 1)[0].replace(".out_proj", "")
        expected[name] = {f"{owner}#{k}": g for k, g in enumerate(sites.values())}
    assert_matches(got, expected, model, tol=1e-4)


class Recursive(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.lin = nn.Linear(4, 4)

    def forward(self, x: torch.Tensor, depth: int = 2) -> torch.Tensor:
        h = torch.tanh(self.lin(x))
        return h if depth == 0 else self(h, depth - 1)


def test_module_calling_itself_gets_one_site_per_call() -> None:
    torch.manual_seed(0)
    model, x = Recursive(), torch.randn(3, 4)
    got, _ = tracked_step(model, lambda: model(x).pow(2).sum())
    per_use = {f"{ROOT_SITE}#{k}": copies(params_of(model)) for k in range(3)}
    h = x
    for k in range(3):
        w = per_use[f"{ROOT_SITE}#{k}"]
        h = torch.tanh(F.linear(h, w["lin.weight"], w["lin.bias"]))
    # the uses happen in `lin`, called once per recursion level: its calls name the sites
    expected = {
        name: {f"lin#{k}": g for k, g in enumerate(sites.values())}
        for name, sites in oracle_grads(h.pow(2).sum(), per_use).items()
    }
    assert_matches(got, expected, model)
    norms = [got["lin.weight"][f"lin#{k}"].norm().item() for k in range(3)]
    assert len(set(norms)) == 3 and min(norms) > 0  # not one site holding the whole gradient


class Reordered(nn.Module):
    """A custom forward running a Sequential's entries in another order than registered."""

    def __init__(self) -> None:
        super().__init__()
        shared = nn.Linear(4, 4)
        self.seq = nn.Sequential(shared, nn.ReLU(), shared)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.seq[0](self.seq[1](self.seq[2](x) * 3))


def test_sequential_entries_run_out_of_order_get_call_numbers_not_paths() -> None:
    torch.manual_seed(0)
    model, x = Reordered(), torch.randn(2, 4)
    got, _ = tracked_step(model, lambda: model(x).pow(2).sum())
    w = {"seq.0#0": copies(params_of(model.seq[0])), "seq.0#1": copies(params_of(model.seq[0]))}
    h = F.linear(x, w["seq.0#0"]["weight"], w["seq.0#0"]["bias"]) * 3
    out = F.linear(F.relu(h), w["seq.0#1"]["weight"], w["seq.0#1"]["bias"])
    expected = {f"seq.0.{n}": s for n, s in oracle_grads(out.pow(2).sum(), w).items()}
    assert_matches(got, expected, model)


def test_sequential_sites_are_registered_paths_in_call_order() -> None:
    shared = nn.Linear(3, 3)
    net = nn.Sequential(nn.Linear(3, 3), shared, nn.Tanh(), shared)
    got, tracker = tracked_step(net, lambda: net(torch.randn(2, 3)).sum())
    assert list(got["1.weight"]) == ["1", "3"]
    assert tracker.call_sites()["1.weight"] == ["1", "3"]
    assert tracker.call_sites()["0.weight"] == ["0"]


class ForwardTwice(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.block = nn.Linear(4, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.block.forward(torch.tanh(self.block(x)))  # the second use bypasses __call__


def test_use_through_forward_and_a_penalty_outside_forward() -> None:
    torch.manual_seed(0)
    model, x = ForwardTwice(), torch.randn(3, 4)
    got, _ = tracked_step(model, lambda: model(x).pow(2).sum() + 0.1 * model.block.weight.pow(2).sum())
    sites = ["block", ROOT_SITE, OUTSIDE_SITE]
    w = {s: copies(params_of(model.block)) for s in sites}
    out = F.linear(torch.tanh(F.linear(x, w["block"]["weight"], w["block"]["bias"])), w[ROOT_SITE]["weight"])
    out = out + w[ROOT_SITE]["bias"]
    loss = out.pow(2).sum() + 0.1 * w[OUTSIDE_SITE]["weight"].pow(2).sum()
    expected = {f"block.{n}": s for n, s in oracle_grads(loss, w).items()}
    expected["block.bias"].pop(OUTSIDE_SITE)
    assert_matches(got, expected, model)


class Experts(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.experts = nn.ParameterList([nn.Parameter(torch.randn(4, 4)) for _ in range(2)])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.tanh(x @ self.experts[0]) @ self.experts[0] + x @ self.experts[1]


def test_parameter_list_expert_used_twice_in_one_call() -> None:
    torch.manual_seed(0)
    model, x = Experts(), torch.randn(3, 4)
    got, _ = tracked_step(model, lambda: model(x).pow(2).sum())
    w = {f"{ROOT_SITE}:{j}": copies({"experts.0": model.experts[0]}) for j in range(2)}
    out = torch.tanh(x @ w[f"{ROOT_SITE}:0"]["experts.0"]) @ w[f"{ROOT_SITE}:1"]["experts.0"] + x @ model.experts[1]
    assert_matches(got, oracle_grads(out.pow(2).sum(), w), model)
    assert "experts.1" not in got  # used once: no buffer


def test_derived_weight_through_functional_call_is_split_per_use() -> None:
    # a cast of the weight computed once and used by two calls: the walk looks through the cast
    torch.manual_seed(0)
    lin, x = nn.Linear(4, 4), torch.randn(3, 4, dtype=torch.float64)

    def loss() -> torch.Tensor:
        derived = {"weight": lin.weight.to(torch.float64), "bias": lin.bias.to(torch.float64)}
        return functional_call(lin, derived, (torch.tanh(functional_call(lin, derived, (x,))),)).pow(2).sum()

    got, _ = tracked_step(lin, loss)
    w = {f"{ROOT_SITE}#{k}": copies(params_of(lin)) for k in range(2)}
    first, second = w[f"{ROOT_SITE}#0"], w[f"{ROOT_SITE}#1"]
    h = torch.tanh(F.linear(x, first["weight"].double(), first["bias"].double()))
    out = F.linear(h, second["weight"].double(), second["bias"].double())
    assert_matches(got, oracle_grads(out.pow(2).sum(), w), lin)


def test_a_weight_used_once_is_never_split_where_its_activations_branch() -> None:
    # review: `x @ W.T` with an input that needs no gradient, then a residual branch, was taken for
    # a value of W alone and split into invented sites
    class Residual(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.inp = nn.Linear(4, 4, bias=False)
            self.f = nn.Linear(4, 4)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            h = self.inp(x)
            return torch.tanh(h + self.f(h))

    model = Residual()
    got, tracker = tracked_step(model, lambda: model(torch.randn(3, 4)).pow(2).sum())
    assert got == {} and tracker.shared_names() == []
    assert tracker.call_sites()["inp.weight"] == ["inp"]


def test_a_single_use_is_not_aliased_by_grad() -> None:
    # review: holding a `detach()` alias let AccumulateGrad steal the same memory for `.grad`, so an
    # in-place `unscale_` of `.grad` rewrote the recorded use
    shared = nn.Linear(4, 4)
    model = nn.Module()
    model.a = model.b = shared  # registered twice (statically shared), called once
    got, _ = tracked_step(model, lambda: model.a(torch.randn(3, 4)).pow(2).sum() * 1024)
    use = got["a.weight"]["a"]
    assert use.untyped_storage().data_ptr() != shared.weight.grad.untyped_storage().data_ptr()
    before = use.clone()
    shared.weight.grad.mul_(1 / 1024)
    assert torch.equal(use, before)


def test_a_derived_weight_under_checkpointing_never_breaks_backward() -> None:
    # review: applying a node that saved tensors re-unpacked them under non-reentrant checkpointing
    torch.manual_seed(0)
    w = nn.Parameter(torch.randn(4, 4))
    model = nn.Module()
    model.w = w
    model.register_buffer("scale", torch.rand(4, 4))

    def body(x: torch.Tensor) -> torch.Tensor:
        w2 = w * model.scale
        return torch.tanh(x @ w2) @ w2

    got, _ = tracked_step(model, lambda: checkpoint(body, torch.randn(3, 4), use_reentrant=False).sum())
    assert w.grad is not None and torch.isfinite(w.grad).all()
    assert "w" not in got or torch.allclose(sum(got["w"].values()), w.grad, atol=1e-6)


def test_autocast_weight_cast_cache_is_looked_through() -> None:
    # plain torch.autocast caches one bf16 copy of each weight for all its uses: one ToCopy node
    torch.manual_seed(0)
    shared = nn.Linear(4, 4)
    net, x = nn.Sequential(shared, nn.Tanh(), shared), torch.randn(3, 4)

    def loss() -> torch.Tensor:
        with torch.autocast("cpu", dtype=torch.bfloat16):
            return net(x).float().pow(2).sum()

    got, _ = tracked_step(net, loss)
    assert list(got["0.weight"]) == ["0", "2"]
    w = {s: copies(params_of(shared)) for s in ("0", "2")}
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = F.linear(torch.tanh(F.linear(x, w["0"]["weight"], w["0"]["bias"])), w["2"]["weight"], w["2"]["bias"])
    expected = {f"0.{n}": s for n, s in oracle_grads(out.float().pow(2).sum(), w).items()}
    assert_matches(got, expected, net, tol=2e-2)  # bf16: each branch is rounded on its own


def test_old_style_weight_norm_on_a_shared_layer() -> None:
    torch.manual_seed(0)
    shared = torch.nn.utils.weight_norm(nn.Linear(4, 4))
    net, x = nn.Sequential(shared, nn.Tanh(), shared), torch.randn(3, 4)
    got, _ = tracked_step(net, lambda: net(x).pow(2).sum())
    assert {"0.weight_g", "0.weight_v", "0.bias"} <= set(got)
    for name in ("0.weight_g", "0.weight_v"):
        assert list(got[name]) == ["0", "2"]
        assert torch.allclose(sum(got[name].values()), params_of(net)[name].grad, atol=1e-6)


def test_embedding_with_max_norm_shared_twice() -> None:
    torch.manual_seed(0)
    emb = nn.Embedding(10, 4, max_norm=1.0)
    model = nn.Module()
    model.emb = emb
    a, b = torch.tensor([1, 2, 3]), torch.tensor([3, 4])
    got, _ = tracked_step(model, lambda: emb(a).sum() + emb(b).pow(2).sum())
    w = {f"emb#{k}": copies({"emb.weight": emb.weight}) for k in range(2)}
    loss = F.embedding(a, w["emb#0"]["emb.weight"]).sum() + F.embedding(b, w["emb#1"]["emb.weight"]).pow(2).sum()
    assert_matches(got, oracle_grads(loss, w), model)


def test_sparse_embedding_gradients() -> None:
    torch.manual_seed(0)
    emb = nn.Embedding(10, 4, sparse=True)
    model = nn.Module()
    model.emb = emb
    a, b = torch.tensor([1, 2]), torch.tensor([2, 3])
    got, _ = tracked_step(model, lambda: emb(a).sum() + emb(b).pow(2).sum())  # no crash in the model's backward
    w = {f"emb#{k}": copies({"emb.weight": emb.weight}) for k in range(2)}
    loss = F.embedding(a, w["emb#0"]["emb.weight"]).sum() + F.embedding(b, w["emb#1"]["emb.weight"]).pow(2).sum()
    assert_matches(got, oracle_grads(loss, w), model)


def test_float64_and_complex_parameters_keep_their_dtype() -> None:
    torch.manual_seed(0)
    for dtype in (torch.float64, torch.complex64):
        shared = nn.Linear(3, 3, bias=False, dtype=dtype)
        net, x = nn.Sequential(shared, shared), torch.randn(2, 3, dtype=dtype)
        got, _ = tracked_step(net, lambda net=net, x=x: net(x).abs().pow(2).sum())
        assert {t.dtype for t in got["0.weight"].values()} == {dtype}
        assert torch.allclose(sum(got["0.weight"].values()), shared.weight.grad)


# -- accumulation and what `.grad` holds ------------------------------------------------------------
class SometimesTwice(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.block = nn.Linear(4, 4)
        self.twice = False

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = torch.tanh(self.block(x))
        return self.block(h) if self.twice else h


def test_block_shared_only_in_a_later_micro_batch() -> None:
    # micro-batch 1 uses `block` once (no buffer), micro-batch 2 twice: the sites still add up to .grad
    torch.manual_seed(0)
    model, x1, x2 = SometimesTwice(), torch.randn(3, 4), torch.randn(3, 4)
    tracker = SharedUseTracker(model)
    tracker.start()
    for x, twice in ((x1, False), (x2, True)):
        model.twice = twice
        tracker.begin_forward()
        loss = model(x).pow(2).sum()
        tracker.before_backward(loss)
        loss.backward()
        tracker.after_backward()
    got = tracker.contributions()
    tracker.stop()
    w0, w1 = copies(params_of(model.block)), copies(params_of(model.block))
    first = torch.tanh(F.linear(x1, w0["weight"], w0["bias"])).pow(2).sum()
    second = F.linear(torch.tanh(F.linear(x2, w0["weight"], w0["bias"])), w1["weight"], w1["bias"]).pow(2).sum()
    grads = oracle_grads(first + second, {"block#0": w0, "block#1": w1})
    # names come from the step's final call counts: `block` is called at most twice, so micro-batch
    # 1's one call and micro-batch 2's first call are both `block#0`
    assert list(got["block.weight"]) == ["block#0", "block#1"]
    total = sum(got["block.weight"].values())
    assert torch.allclose(total, model.block.weight.grad, atol=1e-6)
    assert torch.allclose(got["block.weight"]["block#1"], grads["weight"]["block#1"], atol=1e-6)
    assert torch.allclose(got["block.weight"]["block#0"], grads["weight"]["block#0"], atol=1e-6)


def test_names_are_the_same_in_every_backward_pass_of_a_batch() -> None:
    # review: a GAN-like batch, a backward after the first call and another after two more, named
    # the calls `D`, `D#1`, `D#2` (each backward judged by the calls seen so far)
    torch.manual_seed(0)
    d = nn.Linear(4, 4)
    model = nn.Module()
    model.d = d
    tracker = SharedUseTracker(model)
    tracker.start()
    tracker.begin_forward()
    for calls in (1, 2):
        h = torch.randn(3, 4)
        for _ in range(calls):
            h = torch.tanh(d(h))
        loss = h.sum()
        tracker.before_backward(loss)
        loss.backward()
        tracker.after_backward()
    got = tracker.contributions()
    tracker.stop()
    assert list(got["d.weight"]) == ["d#0", "d#1", "d#2"]
    assert torch.allclose(sum(got["d.weight"].values()), d.weight.grad, atol=1e-6)


def test_zero_grad_between_backward_passes_empties_the_contributions() -> None:
    # a GAN's discriminator: the generator loss's backward reaches it, then zero_grad, then its own loss
    torch.manual_seed(0)
    shared = nn.Linear(4, 4)
    net, x = nn.Sequential(shared, nn.Tanh(), shared), torch.randn(3, 4)
    tracker = SharedUseTracker(net)
    tracker.start()
    for scale in (5.0, 1.0):
        net.zero_grad(set_to_none=True) if scale == 1.0 else None
        tracker.begin_forward()
        loss = scale * net(x).pow(2).sum()
        tracker.before_backward(loss)
        loss.backward()
        tracker.after_backward()
    got = tracker.contributions()
    tracker.stop()
    assert list(got["0.weight"]) == ["0", "2"]
    assert torch.allclose(sum(got["0.weight"].values()), shared.weight.grad, atol=1e-6)


def test_gradient_already_in_grad_is_the_earlier_site() -> None:
    torch.manual_seed(0)
    shared = nn.Linear(4, 4)
    net, x = nn.Sequential(shared, nn.Tanh(), shared), torch.randn(3, 4)
    net(x).sum().backward()  # manual accumulation: a batch before tracking began
    before = shared.weight.grad.clone()
    tracker = SharedUseTracker(net)
    tracker.start()
    tracker.begin_forward()
    loss = net(x).pow(2).sum()
    tracker.before_backward(loss)
    loss.backward()
    tracker.after_backward()
    got = tracker.contributions()
    tracker.stop()
    assert list(got["0.weight"]) == [EARLIER_SITE, "0", "2"]
    assert torch.equal(got["0.weight"][EARLIER_SITE], before)
    assert torch.allclose(sum(got["0.weight"].values()), shared.weight.grad, atol=1e-6)


# -- checkpointing ----------------------------------------------------------------------------------
def test_non_reentrant_checkpointing_recomputation_is_not_a_use() -> None:
    torch.manual_seed(0)
    shared = nn.Linear(4, 4)
    net, x = nn.Sequential(shared, nn.Tanh(), shared), torch.randn(3, 4)
    got, _ = tracked_step(net, lambda: checkpoint(net, x, use_reentrant=False).pow(2).sum())
    assert list(got["0.weight"]) == ["0", "2"]
    assert torch.allclose(sum(got["0.weight"].values()), shared.weight.grad, atol=1e-6)


def test_reentrant_checkpointing_is_flagged_not_silent() -> None:
    torch.manual_seed(0)
    shared = nn.Linear(4, 4)
    net, x = nn.Sequential(shared, nn.Tanh(), shared), torch.randn(3, 4, requires_grad=True)
    got, tracker = tracked_step(net, lambda: checkpoint(net, x, use_reentrant=True).pow(2).sum())
    assert "0.weight" not in got
    assert "reentrant" in tracker.unattributed()["0.weight"]


# -- names -------------------------------------------------------------------------------------------
def test_no_grad_calls_are_not_counted() -> None:
    shared = nn.Linear(3, 3)
    net = nn.Sequential(shared, nn.Tanh(), shared)

    def loss() -> torch.Tensor:
        with torch.no_grad():
            net(torch.randn(2, 3))  # e.g. an EMA target pass: no graph, no use
        return net(torch.randn(2, 3)).sum()

    got, _ = tracked_step(net, loss)
    assert list(got["0.weight"]) == ["0", "2"]


def test_module_under_two_attribute_names_gets_numbered_sites_in_call_order() -> None:
    class TwoNames(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.a = self.b = nn.Linear(3, 3)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.b(torch.tanh(self.a(x)))

    model = TwoNames()
    got, _ = tracked_step(model, lambda: model(torch.randn(2, 3)).sum())
    assert list(got["a.weight"]) == ["a#0", "a#1"]


def test_parameters_frozen_then_unfrozen_are_tracked_once_trainable() -> None:
    shared = nn.Linear(3, 3)
    net = nn.Sequential(shared, nn.Tanh(), shared, nn.Linear(3, 1))
    shared.requires_grad_(False)
    tracker = SharedUseTracker(net)
    got, _ = tracked_step(net, lambda: net(torch.randn(2, 3)).sum(), tracker=tracker)
    assert "0.weight" not in got
    shared.requires_grad_(True)
    got, _ = tracked_step(net, lambda: net(torch.randn(2, 3)).sum(), tracker=tracker)
    assert list(got["0.weight"]) == ["0", "2"]


# -- the model is never changed ------------------------------------------------------------------
class BinaryConnect(nn.Module):
    """A forward that writes `self.weight.data` (BinaryConnect-style clipping)."""

    def __init__(self) -> None:
        super().__init__()
        self.lin = nn.Linear(4, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.lin.weight.data = self.lin.weight.data.clamp(-0.3, 0.3)
        return self.lin(torch.tanh(self.lin(x)))


def model_zoo() -> list[tuple[str, nn.Module, torch.Tensor]]:
    torch.manual_seed(0)
    shared = nn.Linear(4, 4)
    return [
        ("mlp", nn.Sequential(nn.Linear(4, 4), shared, nn.ReLU(), shared), torch.randn(3, 4)),
        ("gru", nn.GRU(4, 4, batch_first=True), torch.randn(2, 5, 4)),
        ("lstm", nn.LSTM(4, 4, batch_first=True), torch.randn(2, 5, 4)),
        ("mha", Albert(nn.MultiheadAttention(4, 2), depth=2), torch.randn(3, 2, 4)),
        ("orthogonal", torch.nn.utils.parametrizations.orthogonal(nn.Linear(4, 4)), torch.randn(3, 4)),
        ("weight_norm", torch.nn.utils.parametrizations.weight_norm(nn.Linear(4, 4)), torch.randn(3, 4)),
        ("binary_connect", BinaryConnect(), torch.randn(3, 4)),
    ]


def output_of(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    out = model(x)
    return out[0] if isinstance(out, tuple) else out


def test_training_is_bit_identical_with_and_without_tracking() -> None:
    for name, model, x in model_zoo():
        plain, watched = copy.deepcopy(model), copy.deepcopy(model)
        tracker = SharedUseTracker(watched)
        opts = [torch.optim.SGD(m.parameters(), lr=0.1) for m in (plain, watched)]
        for _ in range(3):
            losses = []
            for m, opt in zip((plain, watched), opts, strict=True):
                opt.zero_grad()
                if m is watched:
                    tracker.start()
                    tracker.begin_forward()
                loss = output_of(m, x).pow(2).sum()
                if m is watched:
                    tracker.before_backward(loss)
                loss.backward()
                if m is watched:
                    tracker.after_backward()
                    tracker.stop()
                opt.step()
                losses.append(loss)
            assert torch.equal(losses[0], losses[1]), name
            for (n, p), (_, q) in zip(plain.named_parameters(), watched.named_parameters(), strict=True):
                assert torch.equal(p.grad, q.grad), (name, n)
        for (k, a), (_, b) in zip(plain.state_dict().items(), watched.state_dict().items(), strict=True):
            assert torch.equal(a, b), (name, k)


def test_copy_or_pickle_of_the_model_during_a_tracked_step_carries_nothing() -> None:
    torch.manual_seed(0)
    shared = nn.Linear(4, 4)
    net = nn.Sequential(shared, nn.Tanh(), shared)
    reference = len(pickle.dumps(net))
    tracker = SharedUseTracker(net)
    tracker.start()
    tracker.begin_forward()
    loss = net(torch.randn(3, 4)).sum()
    tracker.before_backward(loss)
    clone = copy.deepcopy(net)  # taken mid-step, as a user's EMA or checkpoint would
    buffer = io.BytesIO()
    torch.save(net, buffer)
    assert len(pickle.dumps(net)) == reference
    for module in (*net.modules(), *clone.modules()):
        assert not module._forward_pre_hooks and not module._forward_hooks
        assert all(type(p) is nn.Parameter for p in module._parameters.values())
    loss.backward()
    tracker.after_backward()
    tracker.stop()
    assert not torch.nn.modules.module._global_forward_pre_hooks
    assert not torch.nn.modules.module._global_forward_hooks


# -- uses through one index of one tensor (MoE experts as one 3-D parameter) ---------------------------
def test_a_select_of_one_index_is_named_by_the_index() -> None:
    torch.manual_seed(0)
    w = nn.Parameter(torch.randn(4, 3, 3))
    model = nn.Module()
    model.w = w
    x = torch.randn(2, 3)

    def loss() -> torch.Tensor:
        h = torch.tanh(x @ w[2]) @ w[-1]  # a negative index names the same expert as its positive twin
        h = h @ w[torch.tensor(2)] @ w[torch.tensor([0])][0] @ torch.index_select(w, 0, torch.tensor([1]))[0]
        return (h @ w[:, 1].t()).sum()  # a select along dim 1

    got, tracker = tracked_step(model, loss)
    assert list(got["w"]) == [
        f"{OUTSIDE_SITE}[2]:0",
        f"{OUTSIDE_SITE}[3]",
        f"{OUTSIDE_SITE}[2]:1",
        f"{OUTSIDE_SITE}[0]",
        f"{OUTSIDE_SITE}[1]",
        f"{OUTSIDE_SITE}[:, 1]",
    ]
    assert torch.allclose(sum(got["w"].values()), w.grad, atol=1e-6)
    assert got["w"][f"{OUTSIDE_SITE}[3]"][:3].abs().sum() == 0  # the use of expert 3 touches its row only


# -- opaque nodes ---------------------------------------------------------------------------------------
class Graphed(torch.autograd.Function):
    """Named like the Function ``torch.cuda.make_graphed_callables`` builds: its node is ``GraphedBackward``."""

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
        ctx.save_for_backward(x, w)
        return torch.tanh(x @ w) @ w  # two uses of w inside one node

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        x, w = ctx.saved_tensors
        with torch.enable_grad():
            x, w = x.detach().requires_grad_(), w.detach().requires_grad_()
            out = torch.tanh(x @ w) @ w
        return torch.autograd.grad(out, (x, w), grad)


def test_uses_inside_a_replayed_cuda_graph_are_not_attributed() -> None:
    torch.manual_seed(0)
    shared = nn.Linear(4, 4)
    net = nn.Sequential(shared, shared)
    got, tracker = tracked_step(net, lambda: Graphed.apply(net(torch.randn(3, 4)), shared.weight).sum())
    assert "0.weight" not in got and list(got["0.bias"]) == ["0", "1"]
    assert list(tracker.unattributed()) == ["0.weight"] and "CUDA graph" in tracker.unattributed()["0.weight"]


def test_reentrant_checkpointing_lists_only_the_parameters_used_inside() -> None:
    torch.manual_seed(0)
    inner, outer = nn.Linear(4, 4), nn.Linear(4, 4)
    net, x = nn.Sequential(outer, inner, outer, nn.Linear(4, 1)), torch.randn(3, 4)
    got, tracker = tracked_step(net, lambda: net[3](net[2](checkpoint(inner, net[0](x), use_reentrant=True))).sum())
    assert set(tracker.unattributed()) == {"1.weight", "1.bias"}
    assert list(got["0.weight"]) == ["0#0", "0#1"]  # used outside the segment: still split
    assert torch.allclose(sum(got["0.weight"].values()), outer.weight.grad, atol=1e-6)


def test_autocast_cast_cache_records_the_low_precision_sum() -> None:
    shared = nn.Linear(4, 4)
    net = nn.Sequential(shared, nn.Tanh(), shared)

    def loss() -> torch.Tensor:
        with torch.autocast("cpu", dtype=torch.bfloat16):
            return net(torch.randn(3, 4)).float().sum()

    _, tracker = tracked_step(net, loss)
    assert tracker.summed_in() == {"0.weight": torch.bfloat16, "0.bias": torch.bfloat16}
    _, tracker = tracked_step(net, lambda: net(torch.randn(3, 4)).sum())
    assert tracker.summed_in() == {}


# -- in a Trainer: names, warnings, tags never written wrong -----------------------------------------
def fit_recording_warnings(module: pl.LightningModule, tmp_path: Path, **kwargs: Any) -> tuple[dict, list[str]]:
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        _, scalars = fit(module, tmp_path, **kwargs)
    return scalars, [str(w.message) for w in record if "ParameterMonitor" in str(w.message)]


def experts_forward(h: torch.Tensor, route: torch.Tensor, w: Any) -> torch.Tensor:
    """Mixtral-style: the experts hit by the routing, in expert order, each reading ``w(e)``."""
    out = torch.zeros_like(h)
    for e in route.unique().tolist():
        mask = route == e
        out[mask] = torch.tanh(h[mask] @ w(e))
    return out


class ExpertTensor(nn.Module):
    def __init__(self, n: int) -> None:
        super().__init__()
        self.w = nn.Parameter(torch.randn(n, 4, 4) / 2)

    def forward(self, h: torch.Tensor, route: torch.Tensor) -> torch.Tensor:
        return experts_forward(h, route, lambda e: self.w[e])


class MoE(pl.LightningModule):
    """Experts as ONE 3-D parameter, ``w[e]`` per expert; the routing changes every step."""

    E = 4

    def __init__(self) -> None:
        super().__init__()
        self.inp = nn.Linear(4, 4)
        self.experts = ExpertTensor(self.E)
        self.snapshots: dict[int, tuple[torch.Tensor, torch.Tensor, torch.Tensor, list[int]]] = {}

    @staticmethod
    def routing(step: int, n: int) -> torch.Tensor:
        # tokens alternate between experts step % 3 and (step + 1) % 3: the pair changes every step,
        # one of experts 0-2 gets no token on each step, expert 3 never gets one
        return torch.tensor([(step + i % 2) % 3 for i in range(n)])

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        (x,) = batch
        step = step_label(self.trainer)
        route = self.routing(step, len(x))
        hit = route.unique().tolist()
        self.snapshots[step] = (x.clone(), self.inp.weight.detach().clone(), self.experts.w.detach().clone(), hit)
        return self.experts(self.inp(x), route).pow(2).sum()

    def oracle(self, step: int) -> dict[int, torch.Tensor]:
        """Each expert's own copy of the whole 3-D tensor: its gradient is that expert's contribution."""
        x, inp_w, w, hit = self.snapshots[step]
        copies = {e: w.clone().requires_grad_() for e in hit}
        h = F.linear(x, inp_w, self.inp.bias.detach())  # the bias is never stepped (see the optimizer)
        loss = experts_forward(h, self.routing(step, len(x)), lambda e: copies[e][e]).pow(2).sum()
        grads = torch.autograd.grad(loss, list(copies.values()))
        return dict(zip(copies, grads, strict=True))

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SGD([self.inp.weight, self.experts.w], lr=0.05)  # inp.bias stays as it is


def test_moe_experts_of_one_tensor_are_named_by_the_expert_across_steps(tmp_path: Path) -> None:
    torch.manual_seed(0)
    module = MoE()
    scalars, warned = fit_recording_warnings(module, tmp_path, data=data_of(torch.randn(32, 4), batch_size=4))
    assert not warned
    series = {t: v for t, v in scalars.items() if t.startswith("shared_grad/experts.w/")}
    assert set(series) == {f"shared_grad/experts.w/experts[{e}]" for e in range(3)}  # expert 3: never a token
    for step in range(4):
        want = module.oracle(step)
        assert {t for t, v in series.items() if step in v} == {f"shared_grad/experts.w/experts[{e}]" for e in want}
        for e, grad in want.items():
            assert math.isclose(series[f"shared_grad/experts.w/experts[{e}]"][step], grad.norm().item(), rel_tol=1e-5)
        total = sum(g.double() for g in want.values())
        for e, grad in want.items():
            share = ((grad.double() * total).sum() / total.square().sum()).item()
            assert abs(scalars[f"shared_grad_share/experts.w/experts[{e}]"][step] - share) < 1e-6
    assert all(math.isfinite(v) for tag in scalars if tag.startswith("shared_grad") for v in scalars[tag].values())


class Checkpointed(pl.LightningModule):
    """A tied embedding/head around two blocks, the first under reentrant checkpointing."""

    def __init__(self) -> None:
        super().__init__()
        self.wte = nn.Embedding(7, 4)
        self.block0, self.block1, self.norm = nn.Linear(4, 4), nn.Linear(4, 4), nn.LayerNorm(4)

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        (idx,) = batch
        h = checkpoint(lambda t: torch.tanh(self.block0(t)), self.wte(idx), use_reentrant=True)
        return F.linear(self.norm(torch.tanh(self.block1(h))), self.wte.weight).logsumexp(-1).sum()

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SGD(self.parameters(), lr=0.1)


def test_reentrant_checkpointing_is_one_warning_naming_the_segment_parameters(tmp_path: Path) -> None:
    module = Checkpointed()
    scalars, warned = fit_recording_warnings(module, tmp_path, data=data_of(torch.randint(0, 7, (16, 3))))
    assert len(warned) == 1 and "reentrant" in warned[0]
    assert "`block0.weight`, `block0.bias`" in warned[0]
    assert not any(name in warned[0] for name in ("block1", "norm", "wte"))
    assert scalars["shared_grad_error/wte.weight"][3] < 1e-6  # used outside the segment: still split
    assert {"shared_grad/wte.weight/wte", f"shared_grad/wte.weight/{OUTSIDE_SITE}"} <= set(scalars)


class CastCache(pl.LightningModule):
    """Plain ``torch.autocast``: one bf16 copy of ``layer.weight`` for its five uses, summed in bf16.

    Four uses pull one way, the first one (summed last) nearly cancels them: the partial sums are
    large, and their bf16 rounding is ~3e-2 of the gradient, though every use is seen.
    """

    K = 4

    def __init__(self) -> None:
        super().__init__()
        self.layer = nn.Linear(8, 8, bias=False)
        g = torch.Generator().manual_seed(0)
        self.register_buffer("xs", torch.randn(self.K, 16, 8, generator=g) * 0.3 + torch.randn(16, 8, generator=g))
        self.register_buffer("last", self.xs.mean(0) + 0.1 * torch.randn(16, 8, generator=g))
        self.hand_grad = False
        self.uses: dict[int, list[torch.Tensor]] = {}

    def outputs(self, weights: list[torch.Tensor]) -> torch.Tensor:
        out = -self.K * F.linear(self.last, weights[0])
        for x, w in zip(self.xs, weights[1:], strict=True):
            out = out + F.linear(x, w)
        return out

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        copies = [self.layer.weight.detach().clone().requires_grad_() for _ in range(self.K + 1)]
        with torch.enable_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
            twin = (self.outputs(copies).float() * batch[0].mean()).sum()
        self.uses[step_label(self.trainer)] = list(torch.autograd.grad(twin, copies))
        with torch.autocast("cpu", dtype=torch.bfloat16):
            out = -self.K * self.layer(self.last)
            for x in self.xs:
                out = out + self.layer(x)
            return (out.float() * batch[0].mean()).sum()

    def on_after_backward(self) -> None:
        if self.hand_grad:  # a gradient the monitor never saw: more than the rounding
            self.layer.weight.grad.add_(1.0)

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SGD(self.parameters(), lr=1e-3)


def test_autocast_cast_cache_rounding_is_not_an_unseen_use(tmp_path: Path) -> None:
    module = CastCache()
    scalars, warned = fit_recording_warnings(module, tmp_path, data=data_of(torch.rand(16, 1) + 1))
    assert not warned
    assert max(scalars["shared_grad_error/layer.weight"].values()) > 1e-2  # the bf16 sum: above the fp32 rule
    sites = [f"layer#{k}" for k in range(module.K + 1)]
    for step, uses in module.uses.items():
        for site, use in zip(sites, uses, strict=True):  # each use is exact: the twin's cast of its own copy
            assert math.isclose(scalars[f"shared_grad/layer.weight/{site}"][step], use.norm().item(), rel_tol=1e-5)


def test_an_unseen_use_under_autocast_names_the_cast_cache_too(tmp_path: Path) -> None:
    module = CastCache()
    module.hand_grad = True
    _, warned = fit_recording_warnings(module, tmp_path, data=data_of(torch.rand(16, 1) + 1))
    assert len(warned) == 1 and "bfloat16 rounding of autocast's weight-cast cache" in warned[0]


class TiedOnce(pl.LightningModule):
    """A layer registered under two names (a tied alias) and used once: one use, no cosine."""

    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Linear(4, 4)
        self.b = self.a
        self.out = nn.Linear(4, 1)

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        return self.out(torch.tanh(self.a(batch[0]))).pow(2).sum()

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SGD(self.parameters(), lr=0.1)


def test_no_cosine_for_a_single_use(tmp_path: Path) -> None:
    scalars, _ = fit_recording_warnings(TiedOnce(), tmp_path, data=data_of(torch.randn(32, 4)))
    assert scalars["shared_grad_share/a.weight/a"] == {s: 1.0 for s in range(4)}
    assert "shared_grad_cosine/a.weight" not in scalars
    assert all(math.isfinite(v) for values in scalars.values() for v in values.values())


class GrowsAParameter(SharedMLP):
    """At step 1 (a logging step) ``training_step`` creates a parameter and uses it."""

    def training_step(self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int) -> torch.Tensor:
        if step_label(self.trainer) == 1 and not hasattr(self, "extra"):
            self.extra = nn.Parameter(torch.zeros(3))
        return super().training_step(batch, batch_idx)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = super().forward(x)
        return out + self.extra if hasattr(self, "extra") else out

    def forward_uses(self, x: torch.Tensor, w: dict[str, dict[str, torch.Tensor]]) -> torch.Tensor:
        out = super().forward_uses(x, w)
        return out + self.extra if hasattr(self, "extra") else out


def test_a_parameter_added_on_a_logging_step_keeps_the_others_per_use_tags(tmp_path: Path) -> None:
    module = GrowsAParameter()
    scalars, warned = fit_recording_warnings(module, tmp_path)
    assert not warned
    check_against_oracle(module, scalars, [0, 1, 2, 3])
    assert set(scalars["grad_norm/extra"]) == {1, 2, 3}


class ZeroOnStep(pl.LightningModule):
    """A bias-free layer used twice whose input is all zeros on step 1: both uses are exactly zero."""

    def __init__(self) -> None:
        super().__init__()
        self.layer = nn.Linear(4, 4, bias=False)
        self.out = nn.Linear(4, 1)

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        x = batch[0] * (step_label(self.trainer) != 1)
        return self.out(self.layer(torch.tanh(self.layer(x)))).pow(2).sum()

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SGD(self.parameters(), lr=0.1)


def test_uses_without_any_gradient_get_no_share_rather_than_nan(tmp_path: Path) -> None:
    scalars, _ = fit_recording_warnings(ZeroOnStep(), tmp_path, data=data_of(torch.randn(32, 4)))
    assert scalars["shared_grad/layer.weight/layer#0"][1] == 0.0
    assert sorted(scalars["shared_grad_share/layer.weight/layer#0"]) == [0, 2, 3]
    assert all(math.isfinite(v) for values in scalars.values() for v in values.values())
