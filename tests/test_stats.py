"""stats: the packed partial sums against closed forms and float64 references."""

from __future__ import annotations

import math

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
    assert m["weight_norm/w"] == torch.linalg.vector_norm(values).item()
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
    # FSDP2: `w` sharded too, its per-use sums are partial sums of this rank's shards: counted once
    assert layout.replica_weights({"x": 1.0, "w": 1.0}, world_size=2, length=packed.numel()) is None


def test_empty_layout() -> None:
    layout = StatsLayout([], [], [])
    assert layout.length == 0 and layout.replica_weights({}, 2, 0) is None
