"""Scale: the monitor on 1,000 parameter tensors, alone and under a 2-process gloo group.

    python benchmarks/distributed_scale.py [--layers 500] [--width 64] [--repeats 30]

Prints, for a model of ``--layers`` Linear layers (2 tensors each) in blocks of 10:

1. one process: the median ratio of a logging step's monitor cost (pack the partial sums, one
   transfer, finalize; per tensor, and per block with ``aggregate_depth=1``) to the bandwidth floor, ONE
   ``torch._foreach_norm`` over all weights and gradients (target <= 2x);
2. one process: the per-use capture's graph walk per backward, and the global module hooks' cost
   on a forward, for the same model plus one shared layer;
3. two processes (gloo, CPU): the collectives the monitor issues on a logging step, counted by
   wrapping ``torch.distributed``'s functions, for the same model sharded by FSDP2 without
   tracking (target: exactly 1, the all-reduce of the partial sums) and replicated DDP-style with
   a shared layer (target: exactly 2, the ranks' agreement on the uses, an all-gather, then the
   all-reduce that averages them), and the sharded step's cost ratio against the local floor.
   With tracking under FSDP2 the statistics make 2 too (the agreement, then the all-reduce that
   carries the per-use sums); each tracked backward adds one all-gather (the agreement) and one
   reduce-scatter per use (more for uneven rows or bf16 uses past 64 MiB: column slices).
"""

from __future__ import annotations

import argparse
import os
import socket
import statistics
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn as nn

from param_monitor.distributed import local_tensor, reduction_group
from param_monitor.stats import finalize, to_host
from param_monitor.watcher import ParameterWatcher

COLLECTIVES = (  # reduce_scatter_single: torch 2.14's name for reduce_scatter_tensor
    "all_reduce",
    "all_gather",
    "all_gather_into_tensor",
    "broadcast",
    "reduce_scatter_tensor",
    "reduce_scatter_single",
    "reduce",
)


def build(layers: int, width: int, shared: bool = False, per_block: int = 10) -> nn.Sequential:
    """``layers`` Linear layers in blocks of ``per_block`` (names ``12.3.weight``: block 12, layer 3)."""
    torch.manual_seed(0)
    linears = [nn.Linear(width, width) for _ in range(layers)]
    blocks: list[nn.Module] = [nn.Sequential(*linears[i : i + per_block]) for i in range(0, layers, per_block)]
    if shared:  # the first layer used again at the end: one shared parameter pair
        blocks.append(linears[0])
    return nn.Sequential(*blocks)


def backward(model: nn.Module, width: int, batch: int = 16, watcher: ParameterWatcher | None = None) -> float:
    """One backward; with a tracking ``watcher``, its graph walk first. Returns the walk's seconds."""
    model.zero_grad(set_to_none=True)
    loss = model(torch.randn(batch, width)).square().mean()
    t0 = time.perf_counter()
    if watcher is not None:
        watcher.before_backward(loss)
    walk = time.perf_counter() - t0
    loss.backward()
    if watcher is not None:
        watcher.after_backward()
    return walk


def graph_walk_cost(args: argparse.Namespace) -> None:
    """The per-use capture's graph walk on this model (+ one shared layer), per logging step."""
    model = build(args.layers, args.width, shared=True)
    watcher = ParameterWatcher(model)
    walks, forwards_hooked, forwards_plain = [], [], []
    for _ in range(args.repeats):
        x = torch.randn(16, args.width)
        t0 = time.perf_counter()
        with torch.no_grad():
            model(x)
        forwards_plain.append(time.perf_counter() - t0)
        watcher.start_step()
        watcher.begin_forward()
        t0 = time.perf_counter()
        with torch.no_grad():  # the same forward with the global module hooks installed
            model(x)
        forwards_hooked.append(time.perf_counter() - t0)
        walks.append(backward(model, args.width, watcher=watcher))
        watcher.compute()
    nodes = 3 * (args.layers + 1)  # AddmmBackward, TBackward, AccumulateGrad(weight) per call (+ bias)
    med = lambda xs: 1e3 * statistics.median(xs)  # noqa: E731
    print(
        f"graph walk (per-use capture) on {2 * args.layers + 2} tensors, ~{nodes} graph nodes: "
        f"{med(walks):.2f} ms per backward; module-call windows: forward {med(forwards_hooked):.2f} ms "
        f"with the global hooks vs {med(forwards_plain):.2f} ms without ({args.layers + 1 + len(model)} calls)"
    )


def floor(model: nn.Module) -> None:
    """The bandwidth floor: one fused norm pass over every weight and gradient (local shards)."""
    tensors = [local_tensor(p).detach() for p in model.parameters()]
    tensors += [local_tensor(p.grad) for p in model.parameters() if p.grad is not None]
    torch.stack(torch._foreach_norm(tensors)).sum().item()  # .item(): the same one host sync


def monitor_step(watcher: ParameterWatcher, depth: int | None = None) -> dict[str, float]:
    """What ParameterMonitor does on a logging step, minus writing."""
    group = reduction_group()
    packed, layout = watcher.pack(group=group)
    packed = watcher.reduce(packed, layout, group)
    return finalize(to_host(packed), layout, depth)


def median_ratio(cost: Callable[[], Any], base: Callable[[], Any], repeats: int) -> tuple[float, float, float]:
    """Median of per-repeat ratios (interleaved, so drifts hit both), and the two medians in ms."""
    for _ in range(3):
        cost(), base()
    ratios, costs, bases = [], [], []
    for _ in range(repeats):
        t0 = time.perf_counter()
        cost()
        t1 = time.perf_counter()
        base()
        t2 = time.perf_counter()
        ratios.append((t1 - t0) / (t2 - t1))
        costs.append(t1 - t0)
        bases.append(t2 - t1)
    return statistics.median(ratios), 1e3 * statistics.median(costs), 1e3 * statistics.median(bases)


@contextmanager
def count_collectives() -> Iterator[list[str]]:
    calls: list[str] = []
    originals = {name: getattr(dist, name) for name in COLLECTIVES if hasattr(dist, name)}
    for name, fn in originals.items():
        setattr(dist, name, lambda *a, _n=name, _f=fn, **k: (calls.append(_n), _f(*a, **k))[1])
    try:
        yield calls
    finally:
        for name, fn in originals.items():
            setattr(dist, name, fn)


def single_process(args: argparse.Namespace) -> None:
    model = build(args.layers, args.width)
    backward(model, args.width)
    watcher = ParameterWatcher(model, track_shared=False)
    n = len(watcher.named_params)
    numel = sum(p.numel() for p in model.parameters())
    print(
        f"model: {args.layers} x Linear({args.width}, {args.width}) in blocks of 10: {n} tensors, "
        f"{numel / 1e6:.2f}M values"
    )
    for depth in (None, 1):
        ratio, cost, base = median_ratio(lambda d=depth: monitor_step(watcher, d), lambda: floor(model), args.repeats)
        tags = len(monitor_step(watcher, depth))
        label = "per tensor      " if depth is None else f"aggregate_depth={depth}"
        timing = f"monitor {cost:.2f} ms vs floor {base:.2f} ms -> median ratio {ratio:.2f}x"
        print(f"1 process, {label}: {timing} ({tags} tags)")


def _worker(rank: int, port: int, args: argparse.Namespace) -> None:
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=2)
    torch.set_num_threads(1)  # two processes on the same cores
    try:
        sharded = build(args.layers, args.width)
        fully_shard(sharded, mesh=init_device_mesh("cpu", (2,)))
        backward(sharded, args.width)
        watcher = ParameterWatcher(sharded, track_shared=False)
        with count_collectives() as fsdp_calls:
            monitor_step(watcher)
        ratio, cost, base = median_ratio(lambda: monitor_step(watcher), lambda: floor(sharded), args.repeats)

        replicated = build(args.layers, args.width, shared=True)
        tracked = ParameterWatcher(replicated)
        tracked.start_step()
        tracked.begin_forward()
        backward(replicated, args.width, watcher=tracked)
        with count_collectives() as ddp_calls:
            metrics = monitor_step(tracked)
        tracked.end_step()
        if rank == 0:
            print(f"2 processes (gloo), FSDP2 untracked: collectives (target 1): {len(fsdp_calls)} {fsdp_calls}")
            print(f"  sharded monitor {cost:.2f} ms vs local floor {base:.2f} ms -> median ratio {ratio:.2f}x")
            shared_tags = sum(k.startswith("shared_grad/") for k in metrics)
            print(
                f"2 processes (gloo), DDP-style + 1 shared layer: collectives (target 2): {len(ddp_calls)} {ddp_calls}"
                f" ({shared_tags} shared_grad tags)"
            )
    finally:
        dist.destroy_process_group()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--layers", type=int, default=500)
    parser.add_argument("--width", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=30)
    args = parser.parse_args()
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads")
    single_process(args)
    graph_walk_cost(args)
    mp.spawn(_worker, args=(free_port(), args), nprocs=2)


if __name__ == "__main__":
    main()
