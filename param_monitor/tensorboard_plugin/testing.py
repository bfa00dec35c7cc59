"""Trying the PARAM MONITOR tab without training: TensorBoard in-process or as a server with the tab,
and synthetic runs in the monitor's schema of any size (the benchmarks' 1,000 tensors, an ALBERT-like
layer at many depths).

    python -m param_monitor.tensorboard_plugin.testing --logdir DIR [tensorboard's flags]

serves ``DIR`` with the tab even where the package's ``tensorboard_plugins`` entry point is not
installed (a checkout used through ``PYTHONPATH``); once it is, plain ``tensorboard`` does the same.
"""

from __future__ import annotations

import math
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from param_monitor import tags


def wsgi_app(logdir: str | Path) -> Any:
    """TensorBoard's WSGI app over ``logdir`` with the tab, data read once (werkzeug's test client
    serves it without a network). The multiplexer keeps what ``tensorboard --load_fast=false`` keeps
    (a reservoir of 1,000 scalars per tag)."""
    from tensorboard.backend import application
    from tensorboard.backend.event_processing import data_ingester, data_provider, plugin_event_multiplexer
    from tensorboard.plugins import base_plugin

    from param_monitor.tensorboard_plugin.plugin import ParamMonitorPlugin

    multiplexer = plugin_event_multiplexer.EventMultiplexer(
        size_guidance=data_ingester.DEFAULT_SIZE_GUIDANCE,
        tensor_size_guidance=data_ingester.DEFAULT_TENSOR_SIZE_GUIDANCE,
    )
    multiplexer.AddRunsFromDirectory(str(logdir))
    multiplexer.Reload()
    provider = data_provider.MultiplexerDataProvider(multiplexer, str(logdir))
    context = base_plugin.TBContext(logdir=str(logdir), data_provider=provider)
    return application.TensorBoardWSGI([ParamMonitorPlugin(context)], data_provider=provider)


def serve(argv: Sequence[str]) -> int:
    """``tensorboard`` with ``argv`` as its flags, the tab added unless its entry point already loads it."""
    from tensorboard import default, program

    from param_monitor.tensorboard_plugin.plugin import ParamMonitorPlugin

    plugins = default.get_plugins()
    if not any(getattr(p, "plugin_name", None) == ParamMonitorPlugin.plugin_name for p in plugins):
        plugins.append(ParamMonitorPlugin)
    board = program.TensorBoard(plugins=plugins)
    board.configure(argv=["tensorboard", *argv])
    return board.main()


def synthetic_names(tensors: int) -> list[str]:
    """``tensors`` parameter names in model order: blocks of a weight and its bias."""
    return [f"model.blocks.{i // 2}.{'weight' if i % 2 == 0 else 'bias'}" for i in range(tensors)]


def write_synthetic_run(
    run_dir: str | Path, tensors: int = 1000, steps: int = 200, uses: int = 2, spikes: Sequence[int] = ()
) -> None:
    """A run of ``tensors`` tensors over ``steps`` logged steps (every 50th), the first block's weight
    and bias shared by ``uses`` calls: what the monitor writes, from closed forms (no training).
    ``spikes``: steps of ``grad_norm_total`` spikes, in the ``param_monitor/spikes`` record written
    as ``detect_spikes=True`` writes it (at each spike's step, the spikes so far)."""
    from torch.utils.tensorboard import SummaryWriter

    from param_monitor.table import ParameterInfo
    from param_monitor.tensorboard_plugin.metadata import write_run_metadata
    from param_monitor.writers import write_scalars

    names = synthetic_names(tensors)
    shared = {n: [f"model.blocks.0#{k}" for k in range(uses)] for n in names[:2]}
    rows = [
        ParameterInfo(n, (64, 64) if n.endswith("weight") else (64,), 4096 if n.endswith("weight") else 64, True)
        for n in names
    ]
    share = [(k + 1) / (uses * (uses + 1) / 2) for k in range(uses)]  # 1..uses, normalised: they add up to 1
    with SummaryWriter(str(run_dir)) as writer:
        write_run_metadata(writer, rows, shared, step=0)
        for s in range(steps):
            metrics: dict[str, float] = {}
            for i, n in enumerate(names):
                metrics[tags.weight_mean(n)] = math.sin(i + s) * 1e-2
                metrics[tags.weight_norm(n)] = 1.0 + i * 1e-3 + s * 1e-4
                metrics[tags.grad_norm(n)] = math.exp(-i / 200) * (1 + 0.1 * math.cos(s))
            for n, sites in shared.items():
                g = metrics[tags.grad_norm(n)]
                for site, part in zip(sites, share, strict=True):
                    metrics[tags.shared_grad_share(n, site)] = part
                    metrics[tags.shared_grad(n, site)] = part * g
                metrics[tags.shared_grad_error(n)] = 1e-7
                metrics[tags.shared_grad_cosine(n)] = 1.0
            write_scalars(writer, metrics, 50 * s + 49)
        _write_spikes(writer, sorted(spikes))


def _write_spikes(writer: Any, steps: Sequence[int]) -> None:
    from param_monitor import spikes

    found = [spikes.Spike(tags.GRAD_NORM_TOTAL, step, 10.0, 2.0) for step in steps]
    for i, spike in enumerate(found):
        writer.add_text(tags.SPIKES_TAG, spikes.markdown(found[: i + 1], i + 1, spikes.rule()), spike.step)


if __name__ == "__main__":
    sys.exit(serve(sys.argv[1:]))
