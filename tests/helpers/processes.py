"""Launching processes: free ports, spawned workers (retried once if gloo kills one), counted collectives."""

from __future__ import annotations

import socket
import warnings
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch.distributed as dist
import torch.multiprocessing as mp

COLLECTIVES = ("all_reduce", "all_gather", "all_gather_into_tensor", "broadcast", "reduce_scatter_tensor", "reduce")


def free_port() -> int:
    """A TCP port free on 127.0.0.1 now (the OS picks it)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def retry_if_killed(attempt: Callable[[Path], None], root: Path) -> Path:
    """Run ``attempt(folder)`` once more, in a fresh folder, if a worker process was killed by a signal.

    gloo on CPU sometimes aborts a process (SIGABRT, "terminate called without an active exception",
    pytorch/pytorch#190489): about one multi-process test in 20 here, and it says nothing of the
    numbers. A worker that raises (an assertion, an error) is never retried. Returns the folder used.
    """
    for n in range(2):
        folder = root / f"try{n}"
        folder.mkdir()
        try:
            attempt(folder)
            return folder
        except mp.ProcessExitedException as crash:
            if crash.signal_name is None or n == 1:
                raise
            warnings.warn(f"retrying after a worker died by {crash.signal_name}", stacklevel=2)
    raise AssertionError("unreachable")


def spawn_workers(worker: Callable[..., None], root: Path, nprocs: int = 2) -> Path:
    """``mp.spawn`` ``worker(rank, port, folder)`` on ``nprocs`` processes and a free port; returns the folder."""
    return retry_if_killed(lambda out: mp.spawn(worker, args=(free_port(), str(out)), nprocs=nprocs), root)


@contextmanager
def count_collectives() -> Iterator[list[str]]:
    """Record every ``torch.distributed`` collective called (by name) inside the block."""
    calls: list[str] = []
    originals = {name: getattr(dist, name) for name in COLLECTIVES}

    def wrap(name: str, fn: Callable[..., Any]) -> Callable[..., Any]:
        def counted(*args: Any, **kwargs: Any) -> Any:
            calls.append(name)
            return fn(*args, **kwargs)

        return counted

    for name, fn in originals.items():
        setattr(dist, name, wrap(name, fn))
    try:
        yield calls
    finally:
        for name, fn in originals.items():
            setattr(dist, name, fn)
