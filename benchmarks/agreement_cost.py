"""The cost of the ranks' agreement on the uses before combining them, 2 gloo processes on CPU.

    python benchmarks/agreement_cost.py [--repeats 50]

Prints the median wall time, per logging step, of:

1. ``distributed.agree_on_uses`` (host-side header of [use count, site digest] per monitored
   parameter, ONE all-gather of 16 bytes per parameter and rank, the comparison) for 100, 1,000
   and 10,000 monitored parameters (2% of them shared, with 2 sites);
2. for scale, the collectives the logging step makes anyway: the all-reduce of the packed partial
   sums (3 float64 per parameter) and DDP's average of two uses of a 50,257 x 768 tied embedding
   (``average_contributions``), and FSDP2's per-use reduce-scatter (``shard_of_mean``) of one such use.
"""

from __future__ import annotations

import argparse
import os
import socket
import statistics
import time
from collections.abc import Callable
from typing import Any

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from param_monitor.distributed import agree_on_uses, average_contributions, shard_of_mean

WORLD = 2


def median_ms(fn: Callable[[], Any], repeats: int) -> float:
    fn()  # warm-up (connections, allocations)
    times = []
    for _ in range(repeats):
        dist.barrier()
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return 1e3 * statistics.median(times)


def _worker(rank: int, port: int, repeats: int) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=WORLD)
    group = dist.group.WORLD
    rows = []
    for n in (100, 1_000, 10_000):
        names = [f"blocks.{i // 2}.{'weight' if i % 2 == 0 else 'bias'}" for i in range(n)]
        uses = {name: ([f"blocks.{i // 2}#0", f"blocks.{i // 2}#1"] if i % 50 == 0 else [f"blocks.{i // 2}"])
                for i, name in enumerate(names)}
        agree = median_ms(lambda names=names, uses=uses: agree_on_uses(names, uses, group), repeats)
        packed = torch.zeros(3 * n, dtype=torch.float64)
        stats = median_ms(lambda packed=packed: dist.all_reduce(packed, group=group), repeats)
        rows.append(f"{n:>6} parameters: agreement {agree:7.3f} ms; the packed statistics' all-reduce {stats:7.3f} ms")
    use = torch.randn(50_257, 768)
    average = median_ms(lambda: average_contributions([use, use], group), max(5, repeats // 5))
    scatter = median_ms(lambda: shard_of_mean(use, group), max(5, repeats // 5))
    if rank == 0:
        print("\n".join(rows))
        print(f"DDP: averaging 2 uses of a 50,257 x 768 embedding (one all-reduce): {average:.1f} ms")
        print(f"FSDP2: one use's reduce-scatter into this rank's shard (in its hook): {scatter:.1f} ms")
    dist.barrier()
    dist.destroy_process_group()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=50)
    args = parser.parse_args()
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    mp.spawn(_worker, args=(port, args.repeats), nprocs=WORLD)


if __name__ == "__main__":
    main()
