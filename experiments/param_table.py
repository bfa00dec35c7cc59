"""Exercise 1: the parameters of D2L's ``NestMLP`` (and, for contrast, the shared MLP's tied ones).

    python -m experiments.param_table

Lazy layers have no parameters until the first forward pass, so a dummy batch shaped like the
textbook's (``torch.rand(2, 20)``) materializes them first.
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch
from torch import nn

if __package__ in (None, ""):
    # Run as a file (`python experiments/param_table.py`), Python puts `experiments/` first on sys.path,
    # not the repository root, and `import experiments` fails: put the root there instead, exactly
    # as `python -m experiments.param_table` does (also for the processes DDP starts from sys.argv).
    sys.path[0] = str(Path(__file__).resolve().parents[1])

from experiments.models import IMAGE_SHAPE, NestMLP, SharedMLP, materialize  # noqa: E402
from param_monitor.sharing import SharedUseTracker  # noqa: E402
from param_monitor.table import format_markdown, parameter_table  # noqa: E402

#: The textbook's input for NestMLP: a batch of 20 features.
NEST_INPUT_SHAPE = (20,)


def table(module: nn.Module, input_shape: tuple[int, ...]) -> str:
    """Markdown table of ``module`` after a dummy forward, with the call sites that forward used."""
    materialize(module, input_shape)
    tracker = SharedUseTracker(module)
    tracker.start(capture=False)  # only name each parameter's call sites (no buffers)
    tracker.begin_forward()
    out = module(torch.zeros(1, *input_shape))  # with autograd on: the uses are read off its graph
    tracker.before_backward(out)
    tracker.stop()
    return format_markdown(parameter_table(module, tracker.call_sites()))


def nest_mlp_table() -> str:
    """Markdown table of a materialized ``NestMLP``."""
    return table(NestMLP(), NEST_INPUT_SHAPE)


def shared_mlp_table() -> str:
    """Markdown table of the shared MLP: its shared layer shows up once, with an alias and two call sites."""
    return table(SharedMLP(), IMAGE_SHAPE)


def main() -> None:
    """Print both tables, and the names the textbook lists for ``model.net.named_parameters()``."""
    model = materialize(NestMLP(), NEST_INPUT_SHAPE)
    print("NestMLP: [name for name, param in model.net.named_parameters()]")
    print([name for name, _ in model.net.named_parameters()])
    print("\nNestMLP, every parameter (materialized with a 2x20 dummy batch):")
    print(nest_mlp_table())
    print("\nSharedMLP (net.3 and net.6 are one layer):")
    print(shared_mlp_table())


if __name__ == "__main__":
    main()
