"""The plain networks (exact textbook structure, tying, parameter counts) and the LightningModule's setup."""

from __future__ import annotations

import torch
from torch import nn
from torch.nn.parameter import UninitializedParameter

from experiments.models import NestMLP, SharedMLP, count_parameters, materialize
from experiments.module import Classifier

# 784*8+8 (first) + 8*8+8 (shared, once) + 8*10+10 (output); untied adds one more 8*8+8.
TIED_PARAMS, UNTIED_PARAMS = 6442, 6514


def test_shared_mlp_is_the_textbook_sequential() -> None:
    net = SharedMLP().net
    kinds = [type(m) for m in net]
    assert kinds == [
        nn.Flatten, nn.LazyLinear, nn.ReLU,
        nn.LazyLinear, nn.ReLU, nn.Dropout,
        nn.LazyLinear, nn.ReLU, nn.Dropout,
        nn.LazyLinear,
    ]  # fmt: skip
    assert net[3] is net[6] and net[1] is not net[3]
    assert [net[i].out_features for i in (1, 3, 9)] == [8, 8, 10]
    assert net[5].p == 0.0 and net[8].p == 0.0


def test_untied_has_separate_layers_and_more_parameters() -> None:
    tied, untied = materialize(SharedMLP()), materialize(SharedMLP(tied=False, dropout=0.5))
    assert untied.net[3] is not untied.net[6] and untied.net[5].p == 0.5
    assert count_parameters(tied) == TIED_PARAMS and count_parameters(untied) == UNTIED_PARAMS
    # named_parameters() lists a tied tensor once, under its first path
    assert [n for n, _ in tied.named_parameters()] == [
        "net.1.weight", "net.1.bias", "net.3.weight", "net.3.bias", "net.9.weight", "net.9.bias",
    ]  # fmt: skip


def test_shared_weight_gradient_is_the_sum_of_both_uses() -> None:
    """Autograd accumulates both uses into one .grad: the effect the monitor splits per use."""
    torch.manual_seed(0)
    model = materialize(SharedMLP())
    x = torch.rand(4, 1, 28, 28)
    model(x).sum().backward()
    untied = materialize(SharedMLP(tied=False))
    for i, source in ((1, 1), (3, 3), (6, 3), (9, 9)):  # both untied copies start as the shared layer
        untied.net[i].load_state_dict(model.net[source].state_dict())
    untied(x).sum().backward()
    expected = untied.net[3].weight.grad + untied.net[6].weight.grad
    torch.testing.assert_close(model.net[3].weight.grad, expected)


def test_lazy_layers_materialize_with_dummy_forward() -> None:
    model = SharedMLP()
    assert any(isinstance(p, UninitializedParameter) for p in model.parameters())
    materialize(model)
    assert model.training  # mode restored
    assert model.net[1].weight.shape == (8, 784)


def test_nest_mlp_names_match_the_textbook() -> None:
    model = NestMLP()
    model(torch.rand(2, 20))
    assert [name for name, _ in model.net.named_parameters()] == ["0.weight", "0.bias", "2.weight", "2.bias"]
    assert model.linear.weight.shape == (16, 32) and count_parameters(model) == 3952


def test_classifier_setup_materializes_before_optimizer() -> None:
    module = Classifier(SharedMLP(), lr=0.1)
    module.setup("fit")
    optimizer = module.configure_optimizers()
    params = optimizer.param_groups[0]["params"]
    assert len(params) == 6 and not any(isinstance(p, UninitializedParameter) for p in params)
    assert optimizer.param_groups[0]["lr"] == 0.1 and isinstance(optimizer, torch.optim.SGD)
    assert module.hparams["num_parameters"] == TIED_PARAMS and module.hparams["lr"] == 0.1
    names = [n for n, _ in module.named_parameters()]
    assert "model.net.3.weight" in names and "model.net.6.weight" not in names  # the monitor's tag names


def test_classifier_default_network_is_the_shared_mlp() -> None:
    module = Classifier()
    assert isinstance(module.model, SharedMLP) and module.model.tied


def test_init_seed_draws_the_reference_weights_and_leaves_the_global_rng() -> None:
    """``init_seed`` = the reference loop's seeding: ``torch.manual_seed(s)`` right before building the
    network, lazy layers initialised by the first (training) forward; the global stream is untouched."""
    from experiments.models import materialize_seeded

    batch = torch.rand(4, 1, 28, 28)
    torch.manual_seed(7)
    reference = SharedMLP()
    reference(batch)  # the first training batch materializes the layers
    torch.manual_seed(123)
    state = torch.get_rng_state()
    seeded = materialize_seeded(SharedMLP(), init_seed=7)
    assert torch.equal(torch.get_rng_state(), state)  # data order and dropout draw as without init_seed
    for (name, a), (_, b) in zip(reference.named_parameters(), seeded.named_parameters(), strict=True):
        assert torch.equal(a, b), name
    unseeded = materialize_seeded(SharedMLP())  # None: from the global RNG, as before
    assert not torch.equal(unseeded.net[1].weight, seeded.net[1].weight)
