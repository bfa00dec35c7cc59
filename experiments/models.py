"""The networks of D2L 6.2, as plain ``nn.Module`` s (no Lightning), so any training loop can use them."""

from __future__ import annotations

import torch
from torch import nn

#: Shape of one FashionMNIST image batch, used to materialize the lazy layers.
IMAGE_SHAPE = (1, 28, 28)


class SharedMLP(nn.Module):
    """The exercise-2 MLP: one hidden layer, then ONE ``LazyLinear`` applied ``num_shared_uses`` times.

    With the defaults ``net`` is exactly::

        Flatten, LazyLinear(8), ReLU, shared, ReLU, Dropout, shared, ReLU, Dropout, LazyLinear(10)

    where ``shared`` is the same module object at positions 3 and 6 (so its weight receives the sum of
    both uses' gradients). ``tied=False`` puts separate layers there instead (exercise 3's comparison).
    """

    def __init__(
        self,
        num_outputs: int = 10,
        num_hiddens: int = 8,
        num_shared_uses: int = 2,
        dropout: float = 0.0,
        tied: bool = True,
    ) -> None:
        super().__init__()
        self.num_outputs, self.num_hiddens, self.num_shared_uses = num_outputs, num_hiddens, num_shared_uses
        self.dropout, self.tied = dropout, tied
        if num_shared_uses < 1:
            raise ValueError(f"num_shared_uses must be >= 1, got {num_shared_uses}")
        layers: list[nn.Module] = [nn.Flatten(), nn.LazyLinear(num_hiddens), nn.ReLU()]
        shared = nn.LazyLinear(num_hiddens)
        for _ in range(num_shared_uses):
            layers += [shared if tied else nn.LazyLinear(num_hiddens), nn.ReLU(), nn.Dropout(dropout)]
        layers.append(nn.LazyLinear(num_outputs))
        self.net = nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Logits for a batch of images (any shape ``N, ...``; flattened first)."""
        return self.net(x)


class NestMLP(nn.Module):
    """D2L 6.1's ``NestMLP``, verbatim: a nested ``Sequential`` followed by a layer."""

    def __init__(self) -> None:
        super().__init__()
        self.net = nn.Sequential(nn.LazyLinear(64), nn.ReLU(), nn.LazyLinear(32), nn.ReLU())
        self.linear = nn.LazyLinear(16)

    def forward(self, X: torch.Tensor) -> torch.Tensor:
        """The textbook's forward: ``linear(net(X))``."""
        return self.linear(self.net(X))


def materialize(module: nn.Module, input_shape: tuple[int, ...] = IMAGE_SHAPE) -> nn.Module:
    """Run one dummy forward so every ``Lazy*`` layer creates (and initializes) its parameters.

    Uses eval mode (dropout draws no random numbers) and restores the previous mode afterwards.
    """
    was_training = module.training
    module.eval()
    with torch.no_grad():
        module(torch.zeros(1, *input_shape))
    module.train(was_training)
    return module


def count_parameters(module: nn.Module) -> int:
    """Unique parameter count: ``parameters()`` yields a shared tensor once, however often it is used."""
    return sum(p.numel() for p in module.parameters())


def materialize_seeded(model: nn.Module, init_seed: int | None = None) -> nn.Module:
    """Initialize ``model``'s lazy layers, from the global RNG or, with ``init_seed``, from that seed alone.

    ``init_seed`` draws the weights exactly as ``torch.manual_seed(init_seed)`` right before building
    the network would (building lazy layers draws nothing; the first forward draws the weights in layer
    order), inside ``fork_rng`` so that the global stream (data order, dropout) is left as it was.
    """
    if init_seed is None:
        return materialize(model, IMAGE_SHAPE)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(init_seed)
        return materialize(model, IMAGE_SHAPE)
