"""stats: the packed partial sums against closed forms and float64 references."""

from __future__ import annotations

import math

import pytest
import torch

from param_monitor.stats import Reduction, StatsLayout, finalize, pack, parameter_statistics, to_host


def leaf(values: torch.Tensor, grad: torch.Tensor | None = None) -> torch.Tensor:
    t = values.clone().requires_grad_()
    t.grad = grad
    return t


def test_textbook_toy_shares_are_one_half_each() -> None:
    w = leaf(torch.tensor([[3.0]]), torch.tensor([[6.0]]))
    m = parameter_statistics([("w", w)], {"w": {"a": torch.tensor([[3.0]]), "b": torch.tensor([[3.0]])}})
    assert m["shared_grad_share/w/a"] == m["shared_grad_share/w/b"] == 0.5
    assert m["shared_grad_error/w"] == 0.0 and m["shared_grad_cosine/w"] == 1.0


def test_a_use_pulling_against_the_other_has_a_negative_share() -> None:
    a, b = torch.tensor([1.0, 0.0]), torch.tensor([-0.5, 0.0])
    w = leaf(torch.zeros(2), a + b)
    m = parameter_statistics([("w", w)], {"w": {"a": a, "b": b}})
    # S = (0.5, 0): <a, S> / |S|^2 = 0.5 / 0.25 = 2, <b, S> / |S|^2 = -1
    assert math.isclose(m["shared_grad_share/w/a"], 2.0) and math.isclose(m["shared_grad_share/w/b"], -1.0)
    assert math.isclose(m["shared_grad_cosine/w"], -1.0)


def test_three_uses_against_float64_reference() -> None:
    torch.manual_seed(0)
    uses = [torch.randn(5, 4) for _ in range(3)]
    grad = sum(uses)
    w = leaf(torch.randn(5, 4), grad)
    m = parameter_statistics([("w", w)], {"w": {f"s{i}": u for i, u in enumerate(uses)}})
    total = sum(u.double() for u in uses)
    shares = [((u.double() * total).sum() / total.square().sum()).item() for u in uses]
    for i, share in enumerate(shares):
        assert math.isclose(m[f"shared_grad_share/w/s{i}"], share, rel_tol=1e-6)
        assert math.isclose(m[f"shared_grad/w/s{i}"], uses[i].double().norm().item(), rel_tol=1e-6)
    assert math.isclose(sum(m[f"shared_grad_share/w/s{i}"] for i in range(3)), 1.0, rel_tol=1e-12)
    cos = [
        torch.nn.functional.cosine_similarity(uses[i].flatten(), uses[j].flatten(), 0).item()
        for i, j in ((0, 1), (0, 2), (1, 2))
    ]
    assert math.isclose(m["shared_grad_cosine/w"], sum(cos) / 3, rel_tol=1e-5)
    assert m["shared_grad_error/w"] < 1e-6


def test_the_uses_are_never_written() -> None:
    # they may be autograd's own gradient tensors
    a, b = torch.randn(3), torch.randn(3)
    a0, b0 = a.clone(), b.clone()
    parameter_statistics([("w", leaf(torch.zeros(3), a + b))], {"w": {"a": a, "b": b}})
    assert torch.equal(a, a0) and torch.equal(b, b0)


def test_float64_parameters_are_reduced_in_float64() -> None:
    torch.manual_seed(0)
    values = torch.randn(1000, dtype=torch.float64) * 1e-3 + 1.0
    w = leaf(values, values * 1e-9)
    m = parameter_statistics([("w", w)])
    assert math.isclose(m["weight_norm/w"], torch.linalg.vector_norm(values).item(), rel_tol=1e-15)  # to an ulp
    assert math.isclose(m["weight_mean/w"], values.mean().item(), rel_tol=1e-15)
    assert math.isclose(m["grad_norm/w"], (values * 1e-9).norm().item(), rel_tol=1e-15)


def test_complex_parameters_count_as_magnitudes_and_have_no_mean() -> None:
    z = torch.tensor([3 + 4j, 0 + 1j], dtype=torch.complex64)
    a, b = torch.tensor([1 + 1j, 0j]), torch.tensor([1 - 1j, 1j])
    w = leaf(z, (a + b).to(torch.complex64))
    m = parameter_statistics([("w", w)], {"w": {"a": a.to(torch.complex64), "b": b.to(torch.complex64)}})
    assert math.isclose(m["weight_norm/w"], math.sqrt(25 + 1), rel_tol=1e-6)
    assert "weight_mean/w" not in m  # a mean of complex values is not one number
    assert math.isclose(m["grad_norm/w"], abs(2 + 1j), rel_tol=1e-6)
    # Re<a, b> = Re(conj(1+i)(1-i)) = Re(-2i) = 0
    assert abs(m["shared_grad_cosine/w"]) < 1e-7
    assert m["shared_grad_error/w"] < 1e-7


def test_sparse_gradients_are_coalesced() -> None:
    # duplicate indices: a plain norm of the values would be wrong
    grad = torch.sparse_coo_tensor([[1, 1, 3]], torch.tensor([[1.0, 2.0], [3.0, 4.0], [0.0, 1.0]]), (5, 2))
    w = leaf(torch.ones(5, 2), grad)
    m = parameter_statistics([("w", w)])
    assert math.isclose(m["grad_norm/w"], grad.to_dense().norm().item(), rel_tol=1e-6)
    m = parameter_statistics([("w", w)], {"w": {"a": grad, "b": torch.zeros(5, 2)}})
    assert m["shared_grad_error/w"] == 0.0


def test_low_precision_accumulates_in_fp32() -> None:
    values = torch.full((4096,), 1.0 + 2**-7, dtype=torch.bfloat16)
    m = parameter_statistics([("w", leaf(values))])
    assert math.isclose(m["weight_mean/w"], 1.0 + 2**-7, rel_tol=1e-6)
    assert math.isclose(m["weight_norm/w"], (1.0 + 2**-7) * 64, rel_tol=1e-6)


def test_dead_units_count_rows_whose_gradient_is_zero() -> None:
    grad = torch.randn(6, 3)
    grad[[1, 4]] = 0.0
    w = leaf(torch.randn(6, 3), grad)
    m = finalize(
        to_host(pack([("w", w)], {}, dead_unit_names={"w"})[0]), pack([("w", w)], {}, dead_unit_names={"w"})[1]
    )
    assert m["dead_units/w"] == 2 / 6


def test_layout_declares_every_position_once_with_its_reduction() -> None:
    a, b = torch.randn(4), torch.randn(4)
    params = [("x", leaf(torch.randn(2, 3), torch.randn(2, 3))), ("w", leaf(torch.randn(4), a + b))]
    packed, layout = pack(params, {"w": {"a": a, "b": b}}, dead_unit_names={"x"})
    assert layout.length == packed.numel()
    kinds = [(seg.kind, seg.reduction) for seg in layout.segments()]
    assert kinds == [
        ("weight_sq", Reduction.PER_TENSOR),
        ("weight_sum", Reduction.PER_TENSOR),
        ("grad_sq", Reduction.PER_TENSOR),
        ("dead_rows", Reduction.PER_TENSOR),
        ("shared:w", Reduction.REPLICATED),
    ]
    # two ranks, `x` sharded (each element on one rank), `w` replicated on both
    weights = layout.replica_weights({"x": 1.0, "w": 2.0}, world_size=2, length=packed.numel() + 1)
    assert weights.tolist() == [1, 0.5, 1, 0.5, 1, 0.5, 1] + [0.5] * 4 + [1.0]  # shared: 2 norms, 1 dot, error


def test_empty_layout() -> None:
    layout = StatsLayout([], [], [])
    assert layout.length == 0 and layout.replica_weights({}, 2, 0) is None


# -- exactness at language-model scale (issue 15): fp64 references ------------------------------------------
def rel(value: float, reference: float) -> float:
    return abs(value - reference) / abs(reference)


def reference_statistics(w: torch.Tensor, uses: list[torch.Tensor], grad: torch.Tensor) -> dict[str, float]:
    """The metrics of one shared parameter with two uses, from float64 copies (the oracle)."""
    w64, g64 = w.double(), grad.double()
    c = [u.double() for u in uses]
    total = c[0] + c[1]
    ss = total.square().sum()
    ref = {
        "weight_norm/w": w64.square().sum().sqrt().item(),
        "weight_mean/w": w64.mean().item(),
        "grad_norm/w": g64.square().sum().sqrt().item(),
        "shared_grad/w/a": c[0].square().sum().sqrt().item(),
        "shared_grad/w/b": c[1].square().sum().sqrt().item(),
        "shared_grad_share/w/a": ((c[0] * total).sum() / ss).item(),
        "shared_grad_share/w/b": ((c[1] * total).sum() / ss).item(),
        "shared_grad_error/w": ((total - g64).square().sum().sqrt() / g64.square().sum().sqrt()).item(),
    }
    ref["shared_grad_cosine/w"] = (
        (c[0] * c[1]).sum() / (c[0].square().sum().sqrt() * c[1].square().sum().sqrt())
    ).item()
    return ref


def big_shared_parameter(n: int, dtype: torch.dtype = torch.float32) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """A weight of ``n`` values (offset mean, as trained weights have) whose gradient is the sum of two uses.

    The uses are correlated (cosine ~0.6, a tied embedding's look) and their fp32 sum is the gradient: its
    rounding makes the true error ~1e-8, which only an fp64 residual sees.
    """
    g = torch.Generator().manual_seed(n)
    w = (torch.randn(n, generator=g) * 1e-3 + 2e-4).to(dtype)
    common = torch.randn(n, generator=g)
    a = (common + 0.8 * torch.randn(n, generator=g)).mul_(1e-3).to(dtype)
    b = (common + 0.8 * torch.randn(n, generator=g)).mul_(7e-4).to(dtype)
    return leaf(w, a + b), [a, b]


@pytest.mark.slow
def test_a_2_25_value_tensor_is_within_1e6_of_float64() -> None:
    """2^25 values (a GPT-2 embedding has 38.6M): fp32 norms drift to ~1e-3 at this length."""
    w, (a, b) = big_shared_parameter(2**25)
    m = parameter_statistics([("w", w)], {"w": {"a": a, "b": b}})
    ref = reference_statistics(w.detach(), [a, b], w.grad)
    assert ref["shared_grad_error/w"] > 0  # the fp32 sum of the uses rounds: an error an fp64 residual sees
    for key, expected in ref.items():
        assert rel(m[key], expected) < 1e-6, (key, m[key], expected)


@pytest.mark.parametrize("n", [1000, 2**20 + 7, 2**23 + 1])
def test_every_metric_within_1e6_of_float64(n: int) -> None:
    w, (a, b) = big_shared_parameter(n)
    m = parameter_statistics([("w", w)], {"w": {"a": a, "b": b}})
    ref = reference_statistics(w.detach(), [a, b], w.grad)
    for key, expected in ref.items():
        assert rel(m[key], expected) < 1e-6, (key, m[key], expected)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_low_precision_inputs_within_1e6_of_float64(dtype: torch.dtype) -> None:
    w, (a, b) = big_shared_parameter(2**21 + 3, dtype)
    m = parameter_statistics([("w", w)], {"w": {"a": a, "b": b}})
    ref = reference_statistics(w.detach(), [a, b], w.grad)
    for key, expected in ref.items():
        assert rel(m[key], expected) < 1e-6, (key, dtype, m[key], expected)


def test_shards_of_one_tensor_add_up_to_the_whole() -> None:
    """What a sharded run all-reduces: the shards' partial sums, summed, are the whole tensor's (1e-9)."""
    torch.manual_seed(0)
    whole = leaf(torch.randn(2**22 + 5) * 1e-2 + 3e-3, torch.randn(2**22 + 5))
    packed, layout = pack([("w", whole)], {})
    bounds = [0, 1_000_003, 1_000_004, 2_900_000, whole.numel()]  # uneven, one shard of one value
    shards = [
        leaf(whole.detach()[lo:hi], whole.grad[lo:hi]) for lo, hi in zip(bounds, bounds[1:], strict=False)
    ]
    summed = sum(pack([("w", s)], {})[0] for s in shards)
    for got, expected in zip(summed.tolist(), packed.tolist(), strict=True):
        assert rel(got, expected) < 1e-9
    whole64 = whole.detach().double()
    assert rel(packed[0].item(), whole64.square().sum().item()) < 1e-9  # weight_sq
    assert rel(packed[1].item(), whole64.sum().item()) < 1e-9  # weight_sum
    assert rel(packed[2].item(), whole.grad.double().square().sum().item()) < 1e-9  # grad_sq


def test_huge_and_tiny_finite_values_neither_overflow_nor_underflow() -> None:
    big = torch.full((1000,), 1e20)
    tiny = torch.full((1000,), 1e-30)
    m = parameter_statistics([("big", leaf(big, big * 3)), ("tiny", leaf(tiny, tiny * 3))])
    assert rel(m["weight_norm/big"], 1e20 * math.sqrt(1000)) < 1e-6
    assert rel(m["grad_norm/big"], 3e20 * math.sqrt(1000)) < 1e-6
    assert rel(m["weight_norm/tiny"], 1e-30 * math.sqrt(1000)) < 1e-6
    assert rel(m["grad_norm/tiny"], 3e-30 * math.sqrt(1000)) < 1e-6
    assert rel(m["grad_norm_total"], 3e20 * math.sqrt(1000)) < 1e-6
    # the largest finite fp32 values: a norm beyond fp32's range, still right as a Python float
    top = torch.full((4,), torch.finfo(torch.float32).max)
    m = parameter_statistics([("top", leaf(top, top))])
    assert rel(m["grad_norm/top"], 2 * torch.finfo(torch.float32).max) < 1e-6


def test_nan_and_inf_still_come_out_non_finite() -> None:
    g = torch.randn(5000)
    g[17] = float("nan")
    h = torch.randn(5000)
    h[3] = float("inf")
    m = parameter_statistics([("g", leaf(torch.randn(5000), g)), ("h", leaf(torch.randn(5000), h))])
    assert math.isnan(m["grad_norm/g"]) and m["grad_norm/h"] == math.inf


def test_mixed_dtypes_in_one_shared_parameter() -> None:
    """fp32 contribution buffers for a bf16 parameter (its gradient bf16)."""
    torch.manual_seed(0)
    a, b = torch.randn(3000), torch.randn(3000)
    grad = (a + b).bfloat16()
    w = leaf(torch.randn(3000).bfloat16(), grad)
    m = parameter_statistics([("w", w)], {"w": {"a": a, "b": b}})
    ref = reference_statistics(w.detach(), [a, b], grad)
    for key, expected in ref.items():
        assert rel(m[key], expected) < 1e-6, (key, m[key], expected)


# -- the two engines: the compiled kernel and the pure-torch fallback ------------------------------------------
def mixed_step() -> tuple[list[tuple[str, torch.Tensor]], dict[str, dict[str, torch.Tensor]]]:
    """Parameters of every dtype the kernel reads, one non-contiguous, one shared with three uses."""
    g = torch.Generator().manual_seed(3)
    params = []
    for i, dtype in enumerate([torch.float32, torch.float64, torch.bfloat16, torch.float16, torch.float32]):
        shape = (300 + i, 70) if i != 4 else (70, 301)
        values = (torch.randn(shape, generator=g) * 0.1 + 0.01).to(dtype)
        grad = torch.randn(shape, generator=g).to(dtype)
        params.append((f"p{i}", leaf(values.t() if i == 4 else values, grad.t() if i == 4 else grad)))
    uses = [torch.randn(300, 70, generator=g) for _ in range(3)]
    params[0][1].grad = uses[0] + uses[1] + uses[2]
    return params, {"p0": {f"u{i}": u for i, u in enumerate(uses)}}


def test_the_engines_give_the_same_numbers(monkeypatch: pytest.MonkeyPatch) -> None:
    params, uses = mixed_step()
    monkeypatch.setenv("PARAM_MONITOR_ENGINE", "compiled")
    compiled = pack(params, uses)[0]
    monkeypatch.setenv("PARAM_MONITOR_ENGINE", "torch")
    plain = pack(params, uses)[0]
    assert compiled.shape == plain.shape
    for got, expected in zip(compiled.tolist(), plain.tolist(), strict=True):
        assert got == expected or abs(got - expected) <= 1e-12 * abs(expected), (got, expected)


def test_the_kernel_gives_the_same_bits_on_any_thread_count(monkeypatch: pytest.MonkeyPatch) -> None:
    from param_monitor import reduce

    x = [torch.randn(3_000_001), torch.randn(70_000)]
    monkeypatch.setenv("PARAM_MONITOR_ENGINE", "compiled")
    monkeypatch.setattr(reduce, "PARALLEL_MIN", 0)
    threads = torch.get_num_threads()
    try:
        results = []
        for n in (1, 2, 3):
            torch.set_num_threads(n)
            results.append(reduce.reduce(x, [([x[0], x[0]], x[0])]))
    finally:
        torch.set_num_threads(threads)
    for moments, grams in results[1:]:
        assert torch.equal(moments, results[0][0]) and torch.equal(grams[0], results[0][1][0])


def test_without_a_compiler_the_torch_engine_is_chosen_and_named_once(
    monkeypatch: pytest.MonkeyPatch, tmp_path, caplog: pytest.LogCaptureFixture
) -> None:
    from param_monitor import reduce

    params, uses = mixed_step()
    expected = pack(params, uses)[0]
    monkeypatch.setenv("PARAM_MONITOR_CACHE_DIR", str(tmp_path))  # nothing cached there
    monkeypatch.setenv("CC", str(tmp_path / "no-such-compiler"))
    monkeypatch.setenv("PARAM_MONITOR_ENGINE", "auto")
    monkeypatch.setattr(reduce, "_kernel", None)
    monkeypatch.setattr(reduce, "_kernel_error", None)
    monkeypatch.setattr(reduce, "_named", set())
    with caplog.at_level("INFO", logger="param_monitor"):
        first = pack(params, uses)[0]
        pack(params, uses)
    named = [r.getMessage() for r in caplog.records if "engine" in r.getMessage()]
    assert len(named) == 1 and "pure-torch" in named[0] and "no-such-compiler" in named[0]
    assert reduce.engine_name() == "torch"
    assert torch.allclose(first, expected, rtol=1e-12, atol=0)
    monkeypatch.setenv("PARAM_MONITOR_ENGINE", "compiled")
    with pytest.raises(RuntimeError, match="cannot be built"):
        pack(params, uses)
    monkeypatch.setenv("PARAM_MONITOR_ENGINE", "fast")
    with pytest.raises(ValueError, match="auto, compiled, torch"):
        pack(params, uses)


def test_the_kernel_is_built_once_and_cached_on_disk(monkeypatch: pytest.MonkeyPatch, tmp_path) -> None:
    from param_monitor import reduce

    monkeypatch.setenv("PARAM_MONITOR_CACHE_DIR", str(tmp_path))
    for _ in range(2):
        monkeypatch.setattr(reduce, "_kernel", None)
        monkeypatch.setattr(reduce, "_kernel_error", None)
        assert reduce.kernel() is not None, reduce._kernel_error
    assert len(list(tmp_path.glob("reduce-*.so"))) == 1 and not list(tmp_path.glob("tmp*"))


# -- a 1e20 gradient through a real Trainer -------------------------------------------------------------------
def test_a_1e20_gradient_is_logged_finite_and_right_without_a_nonfinite_record(tmp_path) -> None:
    """fp32 squares overflow from 1.8e19: the old norms were inf, a false non-finite record, a raised error."""
    import warnings

    from param_monitor import ParameterMonitor
    from param_monitor.tags import NONFINITE_TAG
    from tests.helpers.events import read_texts
    from tests.helpers.modules import TOL, SharedMLP, fit

    module = SharedMLP()
    module.poison_steps, module.poison_value = {1}, 1e20  # the loss times 1e20: every gradient ~1e19-1e20
    monitor = ParameterMonitor(raise_on_nonfinite=True)
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        trainer, scalars = fit(module, tmp_path, monitor, max_steps=2)  # raises on a non-finite record
    assert not [w for w in record if "non-finite" in str(w.message)]
    assert not read_texts(trainer.logger.log_dir, NONFINITE_TAG)
    grads = module.grads[1]  # recorded by the module itself, after the monitor read them
    assert max(g.abs().max().item() for g in grads.values()) > 1e19
    for name, g in grads.items():
        assert rel(scalars[f"grad_norm/{name}"][1], g.double().norm().item()) < 1e-6
    total = math.sqrt(sum(g.double().square().sum().item() for g in grads.values()))
    assert rel(scalars["grad_norm_total"][1], total) < 1e-6
    # per-use values: the oracle's uses come from the unscaled loss (shares and cosines do not see a scale)
    a, b = (module.uses[1][("net.3.weight", site)].double() for site in ("net.3", "net.6"))
    assert rel(scalars["shared_grad/net.3.weight/net.3"][1], 1e20 * a.norm().item()) < TOL
    share = ((a * (a + b)).sum() / (a + b).square().sum()).item()
    assert rel(scalars["shared_grad_share/net.3.weight/net.3"][1], share) < TOL
    cosine = ((a * b).sum() / (a.norm() * b.norm())).item()
    assert abs(scalars["shared_grad_cosine/net.3.weight"][1] - cosine) < TOL
