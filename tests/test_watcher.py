"""ParameterWatcher: the framework-free core, in a plain loop and under Lightning, for unusual dtypes."""

from __future__ import annotations

import math
from pathlib import Path

import lightning.pytorch as pl
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.data import DataLoader, TensorDataset

from param_monitor import ParameterWatcher
from param_monitor.stats import module_group
from tests.helpers.events import read_scalars
from tests.helpers.trainers import make_trainer


def plain_step(watcher: ParameterWatcher, model: nn.Module, loss_fn) -> dict[str, float]:  # noqa: ANN001
    model.zero_grad(set_to_none=True)
    watcher.start_step()
    watcher.begin_forward()
    loss = loss_fn()
    watcher.before_backward(loss)
    loss.backward()
    watcher.after_backward()
    return watcher.compute()


def test_plain_loop_tied_head_in_the_parent() -> None:
    class Tied(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.wte = nn.Embedding(9, 4)

        def forward(self, idx: torch.Tensor) -> torch.Tensor:
            return F.linear(torch.tanh(self.wte(idx)), self.wte.weight)

    torch.manual_seed(0)
    model, idx = Tied(), torch.randint(0, 9, (6,))
    metrics = plain_step(ParameterWatcher(model), model, lambda: F.cross_entropy(model(idx), idx))
    assert metrics["shared_grad_error/wte.weight"] < 1e-6
    assert set(k for k in metrics if k.startswith("shared_grad_share/")) == {
        "shared_grad_share/wte.weight/wte",
        "shared_grad_share/wte.weight/<root>",
    }
    assert math.isclose(metrics["grad_norm/wte.weight"], model.wte.weight.grad.norm().item(), rel_tol=1e-6)
    assert not torch.nn.modules.module._global_forward_pre_hooks  # compute() ended the step


def test_dead_units_of_linear_and_conv_against_their_own_gradients() -> None:
    torch.manual_seed(0)
    lin, conv = nn.Linear(3, 6), nn.Conv1d(2, 4, 3)
    with torch.no_grad():
        lin.bias[[0, 2, 5]] = -100.0  # these ReLU units never fire: their weight rows get no gradient
        conv.bias[1] = -100.0
    model = nn.ModuleDict({"lin": lin, "conv": conv, "emb": nn.Embedding(5, 3), "up": nn.ConvTranspose1d(2, 2, 3)})
    x, seq, tok = torch.randn(8, 3), torch.randn(8, 2, 7), torch.tensor([1, 2])

    def loss() -> torch.Tensor:
        return F.relu(lin(x)).sum() + F.relu(conv(seq)).sum() + model["emb"](tok).sum() + model["up"](seq).sum()

    metrics = plain_step(ParameterWatcher(model, dead_units=True), model, loss)
    assert metrics["dead_units/lin.weight"] == 3 / 6
    assert metrics["dead_units/conv.weight"] == 1 / 4
    rows = lambda g: (g.reshape(g.shape[0], -1) == 0).all(1).float().mean().item()  # noqa: E731
    assert metrics["dead_units/lin.weight"] == rows(lin.weight.grad)
    # not for embeddings (a zero row is a token absent from the batch) nor transposed convolutions
    assert "dead_units/emb.weight" not in metrics and "dead_units/up.weight" not in metrics
    assert not [k for k in metrics if k.startswith("dead_units/") and k.endswith("bias")]


class Tiny(pl.LightningModule):
    """A shared layer used twice; optionally complex or with a sparse embedding in front."""

    def __init__(self, kind: str) -> None:
        super().__init__()
        self.kind = kind
        dtype = torch.complex64 if kind == "complex" else None
        self.emb = nn.Embedding(10, 4, sparse=kind == "sparse")
        self.shared = nn.Linear(4, 4, dtype=dtype)
        self.head = nn.Linear(4, 1, dtype=dtype)
        self.grads: dict[int, dict[str, torch.Tensor]] = {}

    def training_step(self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int) -> torch.Tensor:
        idx, y = batch
        h = self.emb(idx)
        if self.kind == "complex":
            h = h.to(torch.complex64)
        out = self.head(torch.tanh(self.shared(torch.tanh(self.shared(h)))))
        return (out.abs() - y).pow(2).mean()

    def on_before_optimizer_step(self, optimizer: torch.optim.Optimizer) -> None:
        step = self.trainer.fit_loop.epoch_loop._batches_that_stepped
        self.grads[step] = {n: p.grad.detach().clone() for n, p in self.named_parameters() if p.grad is not None}

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SGD(self.parameters(), lr=0.01)


def tiny_trainer(tmp_path: Path, precision: str = "32-true") -> pl.Trainer:
    return make_trainer(tmp_path, max_steps=3, precision=precision)


def fit_tiny(tmp_path: Path, kind: str, precision: str = "32-true") -> tuple[Tiny, dict[str, dict[int, float]]]:
    torch.manual_seed(0)
    module = Tiny(kind)
    data = DataLoader(TensorDataset(torch.randint(0, 10, (24,)), torch.randn(24, 1).double()), batch_size=8)
    trainer = tiny_trainer(tmp_path, precision)
    trainer.fit(module, data)
    return module, read_scalars(trainer.logger.log_dir)


def check_norms(module: Tiny, scalars: dict[str, dict[int, float]]) -> None:
    for step, grads in module.grads.items():
        for name, grad in grads.items():
            dense = grad.to_dense() if grad.is_sparse else grad
            expected = torch.linalg.vector_norm(dense).item()
            assert math.isclose(scalars[f"grad_norm/{name}"][step], expected, rel_tol=1e-5), (name, step)
        assert scalars["shared_grad_error/shared.weight"][step] < 1e-5
        assert math.isclose(
            sum(scalars[f"shared_grad_share/shared.weight/shared#{k}"][step] for k in range(2)), 1.0, rel_tol=1e-6
        )


def test_sparse_embedding_gradients_under_lightning(tmp_path: Path) -> None:
    module, scalars = fit_tiny(tmp_path, "sparse")
    assert module.grads[0]["emb.weight"].is_sparse
    check_norms(module, scalars)


def test_float64_training_under_lightning(tmp_path: Path) -> None:
    module, scalars = fit_tiny(tmp_path, "plain", precision="64-true")
    assert module.grads[0]["shared.weight"].dtype == torch.float64
    check_norms(module, scalars)


def test_complex_parameters_under_lightning(tmp_path: Path) -> None:
    module, scalars = fit_tiny(tmp_path, "complex")
    check_norms(module, scalars)
    assert "weight_mean/shared.weight" not in scalars and "weight_norm/shared.weight" in scalars


def test_a_copy_of_the_model_on_a_logging_step_carries_nothing_and_nothing_outlives_a_failed_fit(
    tmp_path: Path,
) -> None:
    import copy
    import pickle

    import pytest

    copies: list[bytes] = []

    class Copying(Tiny):
        def training_step(self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int) -> torch.Tensor:
            loss = super().training_step(batch, batch_idx)
            clone = copy.deepcopy(self.shared)  # a user's EMA copy, mid-step
            copies.append(pickle.dumps(clone))
            assert not clone._forward_pre_hooks and not clone._forward_hooks
            if batch_idx == 2:
                raise RuntimeError("boom")
            return loss

    module = Copying("plain")
    data = DataLoader(TensorDataset(torch.randint(0, 10, (24,)), torch.randn(24, 1)), batch_size=8)
    trainer = tiny_trainer(tmp_path)
    with pytest.raises(RuntimeError, match="boom"):
        trainer.fit(module, data)
    assert len(copies) == 3 and all(b"param_monitor" not in c for c in copies)
    assert not torch.nn.modules.module._global_forward_pre_hooks
    assert not torch.nn.modules.module._global_forward_hooks


# -- aggregation per module (moved from test_distributed: single process) ----------------------
class Blocks(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.blocks = nn.ModuleList(nn.Linear(3, 2) for _ in range(2))
        self.head = nn.Linear(2, 1, bias=False)
        self.scale = nn.Parameter(torch.tensor([2.0]))


def constant_blocks() -> Blocks:
    """Block i: weight filled with i+1, bias with -(i+1); gradients 0.5x the weights; head weight 4."""
    model = Blocks()
    with torch.no_grad():
        for i, block in enumerate(model.blocks):
            block.weight.fill_(i + 1)
            block.bias.fill_(-(i + 1))
            block.weight.grad = torch.full_like(block.weight, 0.5 * (i + 1))
            block.bias.grad = torch.full_like(block.bias, -0.5 * (i + 1))
        model.head.weight.fill_(4.0)
    return model


def test_aggregate_depth_closed_form() -> None:
    watcher = ParameterWatcher(constant_blocks(), track_shared=False, aggregate_depth=2)
    metrics = watcher.compute()
    for i in range(2):
        c = i + 1  # 6 weights equal to c, 2 biases equal to -c
        assert metrics[f"weight_norm/blocks.{i}"] == pytest.approx(math.sqrt(8 * c * c))
        assert metrics[f"weight_mean/blocks.{i}"] == pytest.approx((6 * c - 2 * c) / 8)
        assert metrics[f"grad_norm/blocks.{i}"] == pytest.approx(0.5 * math.sqrt(8 * c * c))
    assert metrics["weight_norm/head"] == pytest.approx(math.sqrt(2 * 16))
    assert metrics["weight_mean/head"] == pytest.approx(4.0)
    assert metrics["weight_mean/scale"] == pytest.approx(2.0)  # a root parameter is its own group
    assert "grad_norm/head" not in metrics  # no gradient in the group
    assert metrics["grad_norm_total"] == pytest.approx(0.5 * math.sqrt(8 + 8 * 4))
    assert sorted(k for k in metrics if k.startswith("weight_norm/")) == [
        "weight_norm/blocks.0",
        "weight_norm/blocks.1",
        "weight_norm/head",
        "weight_norm/scale",
    ]


def test_aggregate_depth_1_and_deeper_than_the_tree() -> None:
    shallow = ParameterWatcher(constant_blocks(), track_shared=False, aggregate_depth=1).compute()
    # blocks: 12 weights (1 and 2) and 4 biases (-1 and -2): sum of squares 6+24+2+8 = 40
    assert shallow["weight_norm/blocks"] == pytest.approx(math.sqrt(40))
    assert shallow["weight_mean/blocks"] == pytest.approx((6 + 12 - 2 - 4) / 16)
    deep = ParameterWatcher(constant_blocks(), track_shared=False, aggregate_depth=9).compute()
    assert deep["weight_norm/blocks.1"] == pytest.approx(math.sqrt(8 * 4))  # module paths used whole
    assert module_group("blocks.1.weight", 9) == "blocks.1"
