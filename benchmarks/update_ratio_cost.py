"""What ``log_update_ratio=True`` costs on a logging step, against the bandwidth floor.

Run: ``.venv/bin/python benchmarks/update_ratio_cost.py`` (about 20 s; ``--repeats`` to change).

Model: ``benchmarks.models.TinyGPT`` (6.85M unique parameters, 76 tensors), random gradients set
once. Per repeat, interleaved so that a slow phase of the machine hits all alike:

- floor: one ``torch._foreach_norm`` over every weight and gradient, ``stack``, one ``.tolist()``
  (what reading every weight and gradient once costs; the same floor as ``monitor_overhead.py``);
- update ratio: :meth:`UpdateRatio.arm` (one flat copy of the weights + their norms) plus the
  post-step work (in-place difference, norms, one transfer), i.e. the time spent inside the
  monitor's code, NOT the optimizer's own step (an SGD step with lr 0 is run in between, untimed
  apart from the hook).

Memory traffic, in units of the weights' size W: the copy reads W and writes W, the norms of the
copy read W; after the step the in-place difference reads 2W and writes W, its norms read W: 7W,
against the floor's 2W (weights and grads read once), i.e. 3.5x the floor's traffic at most.
Prints medians in ms and the ratio to the floor; the memory is one copy of the monitored weights
(on the logging step only).
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
import warnings
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # repo root, when run as a script

import torch  # noqa: E402

from benchmarks.models import TinyGPT  # noqa: E402
from param_monitor.update_ratio import UpdateRatio  # noqa: E402


def floor_pass(weights: list[torch.Tensor], grads: list[torch.Tensor]) -> list[float]:
    """The bandwidth floor: read every weight and gradient once, one transfer."""
    return torch.stack(torch._foreach_norm(weights + grads)).tolist()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeats", type=int, default=30)
    parser.add_argument("--threads", type=int, default=1)
    opts = parser.parse_args()
    torch.set_num_threads(opts.threads)
    warnings.filterwarnings("ignore", message=".*all zeros before the step")  # TinyGPT zero-inits its biases
    torch.manual_seed(0)
    model = TinyGPT()
    named = list(model.named_parameters())
    for _, p in named:
        p.grad = torch.randn_like(p) * 1e-3
    weights, grads = [p.detach() for _, p in named], [p.grad for _, p in named]
    optimizer = torch.optim.SGD(model.parameters(), lr=0.0)
    ratio = UpdateRatio()
    finish_times: list[float] = []
    original_finish = ratio._finish

    def timed_finish(*args: object) -> dict[str, float]:
        start = time.perf_counter()
        out = original_finish(*args)  # type: ignore[arg-type]
        finish_times.append(time.perf_counter() - start)
        return out

    ratio._finish = timed_finish  # type: ignore[method-assign]
    floors, arms, logged = [], [], []
    for _ in range(opts.repeats + 3):  # the first 3 warm up
        start = time.perf_counter()
        floor_pass(weights, grads)
        floors.append(time.perf_counter() - start)
        start = time.perf_counter()
        ratio.arm(optimizer, named, logged.append)
        arms.append(time.perf_counter() - start)
        optimizer.step()  # runs the post-hook (timed inside)
    floors, arms, finish = floors[3:], arms[3:], finish_times[3:]
    totals = [a + f for a, f in zip(arms, finish, strict=True)]
    floor_ms = 1e3 * statistics.median(floors)
    size_mb = sum(w.numel() * w.element_size() for w in weights) / 2**20
    print(f"TinyGPT: {sum(w.numel() for w in weights):,} parameters in {len(weights)} tensors ({size_mb:.1f} MiB)")
    print(f"medians over {opts.repeats} repeats, {opts.threads} threads:")
    print(f"  floor: _foreach_norm(weights + grads) + stack + tolist   {floor_ms:7.2f} ms   1.00x")
    for label, xs in (("arm: fused copy + norms", arms), ("after step: sub + norms + transfer", finish)):
        print(f"  {label:55s} {1e3 * statistics.median(xs):7.2f} ms")
    total_ms = 1e3 * statistics.median(totals)
    print(f"  update ratio, total per logged step                     {total_ms:7.2f} ms   {total_ms / floor_ms:.2f}x")
    print(f"  extra memory on a logged step: {size_mb:.1f} MiB (one copy of the weights), none otherwise")
    assert len(logged) == opts.repeats + 3 and all(v == 0.0 for v in logged[-1].values())  # lr 0: no change


if __name__ == "__main__":
    main()
