"""The statistics engine on one CUDA GPU: host syncs, 16-mixed against an oracle, ratios to the floor.

Run: ``python benchmarks/gpu_check.py`` (under 5 minutes on one GPU; ``--quick``: about 1 minute).
Without CUDA it says so and exits with status 2. ``--cpu`` runs the same checks on the CPU in 32-bit
precision (no sync or GradScaler checks): a dry run of the script's own logic.

1. **Syncs.** A Lightning fit of the tied-embedding LM (``benchmarks/models.py``) with
   ``ParameterMonitor(log_every_n_steps=5, track_shared=True)``. Around every one of the monitor's
   hooks and the shared-use tracker's hooks, ``torch.cuda.set_sync_debug_mode`` is ``"error"`` on
   steps that do not log (a host sync raises) and ``"warn"`` on logging steps, where the warnings
   are counted: the design is ONE device-to-host transfer per logging step.
2. **16-mixed with a real GradScaler, against an oracle.** The same fit in ``precision="16-mixed"``.
   The oracle is the module's own record: its fp32 gradients at ``on_before_optimizer_step``
   (unscaled by Lightning before that hook) give every ``grad_norm`` in float64; its weights give
   ``weight_norm``/``weight_mean``; module hooks on the two uses of the tied weight (the embedding's
   ``index_add`` of its output gradient, the head's ``grad_out^T @ input``) give the per-use
   contributions, divided by the loss scale. Checked: norms and means within 1e-6 relative, per-use
   norms, shares and the cosine within 2e-3 (the oracle recomputes the uses from fp16 activations),
   the shares adding up to 1, and steps that GradScaler skipped (inf/NaN) logging no gradient values.
3. **Ratios.** Interleaved medians of ``stats.pack`` + one transfer against the floor (one
   ``_foreach_norm`` over every weight and gradient + ``stack`` + ``tolist``), per-tensor and with the
   two uses of the tied weight, on the benchmark model and on a GPT-2-small-sized one (vocab 50,257 x
   768: 38.6M values in the embedding), next to the naive ``.item()`` loop; and float64 accuracy of
   the logged norms at 2^27 values against a float64 reference.

Prints PASS/FAIL per check; exits 1 if any fails.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
import warnings
from collections import defaultdict
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch

perf = time.perf_counter
FAILURES: list[str] = []


def check(name: str, ok: bool, detail: str = "") -> None:
    print(f"  [{'PASS' if ok else 'FAIL'}] {name}{': ' + detail if detail else ''}", flush=True)
    if not ok:
        FAILURES.append(name)


# -- 1. host syncs around the monitor's code -----------------------------------------------------------------
class SyncGuard:
    """Wraps the monitor's and the tracker's hooks: "error" mode on steps that do not log, counted on logging steps."""

    def __init__(self, every_n: int) -> None:
        self.every_n = every_n
        self.logging = False
        self.syncs: dict[int, int] = defaultdict(int)
        self.step = -1
        self.errors: list[str] = []

    @contextmanager
    def guarded(self) -> Iterator[None]:
        if not torch.cuda.is_available():
            yield
            return
        previous = torch.cuda.get_sync_debug_mode()
        torch.cuda.set_sync_debug_mode("warn" if self.logging else "error")
        try:
            with warnings.catch_warnings(record=True) as record:
                warnings.simplefilter("always")
                yield
            self.syncs[self.step] += sum("synchronizing" in str(w.message) for w in record)
        except RuntimeError as exc:
            if "synchroniz" in str(exc):
                self.errors.append(f"step {self.step}: {str(exc).splitlines()[0]}")
            raise
        finally:
            torch.cuda.set_sync_debug_mode(previous)

    def wrap(self, fn: Callable[..., Any]) -> Callable[..., Any]:
        def hooked(*args: Any, **kwargs: Any) -> Any:
            with self.guarded():
                return fn(*args, **kwargs)

        return hooked


@contextmanager
def patched(owner_attrs: list[tuple[Any, str]], guard: SyncGuard) -> Iterator[None]:
    saved = [(owner, attr, owner.__dict__[attr]) for owner, attr in owner_attrs]
    for owner, attr, fn in saved:
        setattr(owner, attr, guard.wrap(fn))
    try:
        yield
    finally:
        for owner, attr, fn in saved:
            setattr(owner, attr, fn)


# -- the module and its oracle -----------------------------------------------------------------------------
def make_module(models: Any, every_n: int) -> Any:
    import lightning.pytorch as pl

    class OracleLM(models.LitLM):
        """LitLM that records its own gradients, weights and per-use contributions on logging steps."""

        def __init__(self) -> None:
            super().__init__()
            self.grads: dict[int, dict[str, torch.Tensor]] = {}
            self.weights: dict[int, dict[str, torch.Tensor]] = {}
            self.uses: dict[int, dict[str, torch.Tensor]] = {}
            self.scales: dict[int, float] = {}
            self._inputs: dict[str, torch.Tensor] = {}
            # tensor hooks on the modules' outputs (no extra graph nodes for the monitor's walk to see)
            self.model.wte.register_forward_hook(lambda m, args, out: self._watch("wte", args[0], out))
            self.model.lm_head.register_forward_hook(lambda m, args, out: self._watch("lm_head", args[0], out))

        def _logging(self) -> bool:
            return (self.trainer.fit_loop.epoch_loop._batches_that_stepped + 1) % every_n == 0

        def _watch(self, site: str, x: torch.Tensor, out: torch.Tensor) -> None:
            if self._logging() and out.requires_grad:
                inputs = x.detach()
                out.register_hook(lambda g: self._use(site, inputs, g))

        def _use(self, site: str, x: torch.Tensor, grad_out: torch.Tensor) -> None:
            step = self.trainer.fit_loop.epoch_loop._batches_that_stepped
            w = self.model.wte.weight
            if site == "wte":  # embedding: row idx of W receives the output gradient at idx
                g = grad_out.detach().float().reshape(-1, w.shape[1])
                contribution = torch.zeros_like(w, dtype=torch.float32).index_add_(0, x.reshape(-1), g)
            else:  # head: logits = x @ W^T, so dL/dW = grad_out^T @ x
                g = grad_out.detach().float().reshape(-1, w.shape[0])
                contribution = g.T @ x.float().reshape(-1, w.shape[1])
            self.uses.setdefault(step, {})[site] = contribution

        def on_before_optimizer_step(self, optimizer: torch.optim.Optimizer) -> None:
            if not self._logging():
                return
            step = self.trainer.fit_loop.epoch_loop._batches_that_stepped
            self.grads[step] = {n: p.grad.detach().clone() for n, p in self.named_parameters() if p.grad is not None}
            self.weights[step] = {n: p.detach().clone() for n, p in self.named_parameters()}
            scaler = getattr(self.trainer.precision_plugin, "scaler", None)
            if scaler is not None:
                self.scales[step] = scaler.get_scale()  # the scale of this step's backward (a sync: the oracle's)

    assert issubclass(OracleLM, pl.LightningModule)
    return OracleLM()


def fit_checked(device: str, precision: str, steps: int, every_n: int, root: Path) -> tuple[Any, dict, SyncGuard]:
    import lightning.pytorch as pl
    import models
    from lightning.pytorch.loggers import TensorBoardLogger

    from param_monitor import ParameterMonitor
    from param_monitor.sharing import SharedUseTracker

    torch.manual_seed(0)
    module = make_module(models, every_n)
    guard = SyncGuard(every_n)
    monitor = ParameterMonitor(log_every_n_steps=every_n, track_shared=True)

    class StepMarker(pl.Callback):
        def on_train_batch_start(self, trainer: pl.Trainer, *args: Any) -> None:
            guard.step = trainer.fit_loop.epoch_loop._batches_that_stepped
            guard.logging = (guard.step + 1) % every_n == 0

    hooks = ["on_train_batch_start", "on_before_backward", "on_after_backward", "on_before_optimizer_step",
             "on_train_batch_end"]  # fmt: skip
    targets = [(ParameterMonitor, h) for h in hooks if h in ParameterMonitor.__dict__]
    targets += [(SharedUseTracker, h) for h in ("_before_call", "_after_call", "_on_node_grad")
                if h in SharedUseTracker.__dict__]  # fmt: skip
    trainer = pl.Trainer(
        accelerator="gpu" if device == "cuda" else "cpu",
        devices=1,
        precision=precision,
        max_steps=steps,
        logger=TensorBoardLogger(str(root), name=precision),
        log_every_n_steps=every_n,
        callbacks=[StepMarker(), monitor],
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        num_sanity_val_steps=0,
    )
    with patched(targets, guard):
        trainer.fit(module, models.random_token_loader(steps))
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(trainer.logger.log_dir, size_guidance={"scalars": 0})
    events.Reload()
    scalars = {tag: {e.step: e.value for e in events.Scalars(tag)} for tag in events.Tags()["scalars"]}
    return module, scalars, guard


def rel(a: float, b: float) -> float:
    return abs(a - b) / abs(b) if b else abs(a)


def check_against_oracle(module: Any, scalars: dict, label: str) -> None:
    worst: dict[str, float] = defaultdict(float)
    skipped = 0
    steps = sorted(module.grads)
    for step in steps:
        grads, weights = module.grads[step], module.weights[step]
        finite = all(torch.isfinite(g).all() for g in grads.values())
        if not finite:  # GradScaler skips this step: no gradient values may be logged
            skipped += 1
            logged = [t for t, v in scalars.items() if t.startswith(("grad_norm", "shared_grad")) and step in v]
            check(f"{label}: skipped step {step} logs no gradient values", not logged, ", ".join(logged[:3]))
            continue
        def worse(key: str, err: float) -> None:
            worst[key] = max(worst[key], err)

        for name, g in grads.items():
            worse("grad_norm", rel(scalars[f"grad_norm/{name}"][step], g.double().norm().item()))
        for name, w in weights.items():
            w64 = w.double()
            worse("weight_norm", rel(scalars[f"weight_norm/{name}"][step], w64.norm().item()))
            rms = w64.square().mean().sqrt().item() or 1.0
            worse("weight_mean (abs/|w|rms)", abs(scalars[f"weight_mean/{name}"][step] - w64.mean().item()) / rms)
        uses = module.uses.get(step, {})
        if len(uses) == 2:
            scale = module.scales.get(step, 1.0)
            a, b = (uses[s].double() / scale for s in ("wte", "lm_head"))
            total = a + b
            shared = "model.wte.weight"
            sites = sorted(t.rsplit("/", 1)[1] for t in scalars if t.startswith(f"shared_grad/{shared}/"))
            by_site = {s: (a if "wte" in s else b) for s in sites}
            shares = []
            for site, c in by_site.items():
                worse("per-use norm", rel(scalars[f"shared_grad/{shared}/{site}"][step], c.norm().item()))
                share = scalars[f"shared_grad_share/{shared}/{site}"][step]
                shares.append(share)
                worse("share", abs(share - ((c * total).sum() / total.square().sum()).item()))
            cosine = ((a * b).sum() / (a.norm() * b.norm())).item()
            worse("cosine", abs(scalars[f"shared_grad_cosine/{shared}"][step] - cosine))
            worse("shares sum - 1", abs(sum(shares) - 1))
    limits = {"grad_norm": 1e-6, "weight_norm": 1e-6, "weight_mean (abs/|w|rms)": 1e-6, "per-use norm": 2e-3,
              "share": 2e-3, "cosine": 2e-3, "shares sum - 1": 1e-6}  # fmt: skip  (event files hold float32)
    print(f"  {label}: {len(steps)} logged steps checked ({skipped} skipped by GradScaler)")
    for key, limit in limits.items():
        if key in worst:
            check(f"{label}: {key} worst error {worst[key]:.2e} <= {limit:g}", worst[key] <= limit)
    check(f"{label}: some logged steps checked", len(steps) > skipped)


# -- 3. ratios -------------------------------------------------------------------------------------------
def timed(fn: Callable[[], Any], device: str) -> float:
    if device == "cuda":
        torch.cuda.synchronize()
    t0 = perf()
    fn()
    if device == "cuda":
        torch.cuda.synchronize()
    return perf() - t0


def ratios(label: str, named: list[tuple[str, torch.Tensor]], uses: dict, device: str, reps: int) -> None:
    from param_monitor import stats

    weights = [p.detach() for _, p in named]
    grads = [p.grad for _, p in named]
    fns: dict[str, Callable[[], Any]] = {
        "floor": lambda: torch.stack(torch._foreach_norm(weights + grads)).tolist(),
        "per-tensor": lambda: stats.to_host(stats.pack(named, {})[0]),
        "shared": lambda: stats.to_host(stats.pack(named, {k: dict(v) for k, v in uses.items()})[0]),
        "naive .item() loop": lambda: [(p.mean().item(), p.norm().item(), p.grad.norm().item()) for _, p in named],
    }
    samples: dict[str, list[float]] = defaultdict(list)
    for r in range(reps + 3):
        for key, fn in fns.items():
            t = timed(fn, device)
            if r >= 3:
                samples[key].append(t)
    floor = statistics.median(samples["floor"])
    n = sum(p.numel() for _, p in named)
    row = ", ".join(f"{k} {statistics.median(v) / floor:.2f}x" for k, v in samples.items() if k != "floor")
    print(f"  {label} ({len(named)} tensors, {n / 1e6:.1f}M values): floor {floor * 1e3:.3f} ms; {row}")


def lm_tensors(models: Any, cfg: Any, device: str) -> tuple[list[tuple[str, torch.Tensor]], dict]:
    torch.manual_seed(0)
    model = models.TinyGPT(cfg).to(device)
    named = list(model.named_parameters())
    for _, p in named:
        p.grad = torch.randn_like(p)
    w = model.wte.weight
    a = torch.randn_like(w)
    return named, {"wte.weight": {"wte": a, "lm_head": w.grad - a}}


def accuracy(device: str) -> None:
    from param_monitor.stats import parameter_statistics

    n = 2**27 if device == "cuda" else 2**25
    g = torch.Generator(device=device).manual_seed(0)
    w = (torch.randn(n, generator=g, device=device) * 1e-3 + 2e-4).requires_grad_()
    w.grad = torch.randn(n, generator=g, device=device) * 1e20  # finite, beyond fp32 squares
    m = parameter_statistics([("w", w)])
    w64, g64 = w.detach().double(), w.grad.double()
    errors = {
        "weight_norm": rel(m["weight_norm/w"], w64.norm().item()),
        "weight_mean": rel(m["weight_mean/w"], w64.mean().item()),
        "grad_norm (1e20 values)": rel(m["grad_norm/w"], g64.norm().item()),
    }
    for key, err in errors.items():
        check(f"{n:,} values on {device}: {key} relative error {err:.1e} <= 1e-6", err <= 1e-6)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="fewer steps and repetitions (about 1 minute)")
    parser.add_argument("--cpu", action="store_true", help="dry run of the logic on the CPU (32-bit, no sync checks)")
    args = parser.parse_args()
    if not args.cpu and not torch.cuda.is_available():
        print("gpu_check: no CUDA device is available (torch.cuda.is_available() is False): nothing was checked. "
              "Run it on a machine with one GPU, or with --cpu for a dry run of its logic.")  # fmt: skip
        sys.exit(2)
    sys.path.insert(0, str(Path(__file__).parent))  # benchmarks/models.py
    import models

    from param_monitor import reduce

    device = "cpu" if args.cpu else "cuda"
    name = torch.cuda.get_device_name() if device == "cuda" else "CPU (dry run)"
    print(f"gpu_check on {name}; torch {torch.__version__}; CPU engine for CPU tensors: {reduce.engine_name()}")
    t_start = perf()
    steps, every_n = (12, 4) if args.quick else (40, 5)
    warnings.filterwarnings("ignore", message=".*does not have many workers.*")
    with tempfile.TemporaryDirectory(prefix="pm_gpu_") as tmp:
        print("1. host syncs of the monitor (32-bit fit, shared tracking)")
        module, scalars, guard = fit_checked(device, "32-true", steps, every_n, Path(tmp))
        if device == "cuda":
            check("no host sync in the monitor's hooks on steps that do not log", not guard.errors,
                  "; ".join(guard.errors[:2]))  # fmt: skip
            logged = sorted(s for s in guard.syncs if (s + 1) % every_n == 0)
            counts = [guard.syncs[s] for s in logged]
            check(f"syncs per logging step {counts} == 1 (one transfer)", bool(counts) and all(c == 1 for c in counts))
        check_against_oracle(module, scalars, "32-true")
        if device == "cuda":
            print("2. 16-mixed with a real GradScaler against the oracle")
            module, scalars, guard = fit_checked(device, "16-mixed", steps, every_n, Path(tmp))
            check("16-mixed: the scaler was active", bool(module.scales))
            check_against_oracle(module, scalars, "16-mixed")
    print("3. ratios to the floor (interleaved medians) and accuracy at 2^27 values")
    reps = 10 if args.quick else 30
    ratios("benchmark LM (vocab 8192 x 256, 6 layers)", *lm_tensors(models, models.GPTConfig(), device), device, reps)
    big = models.GPTConfig(vocab_size=50257, d_model=768, n_layer=12, n_head=12, block_size=1024)
    if device == "cuda" and not args.quick:
        ratios("GPT-2-small-sized LM (vocab 50,257 x 768, 12 layers)", *lm_tensors(models, big, device), device, reps)
    accuracy(device)
    print(f"total {perf() - t_start:.0f} s; {'all checks pass' if not FAILURES else f'FAILED: {len(FAILURES)}'}")
    sys.exit(1 if FAILURES else 0)


if __name__ == "__main__":
    main()
