"""The reductions behind every statistic: sums of squares, sums and dot products, accumulated in float64.

Two engines give the same numbers (float64 accumulation both; they differ by ~1e-15 relative):

- ``compiled``: a one-pass C kernel (``_reduce.c``) over every tensor of a logging step in ONE call,
  threads over fixed chunks (``torch.get_num_threads()``), for contiguous CPU tensors. It is built with
  the system C compiler (``$CC`` or ``cc``; ~0.6 s) the first time it is needed and cached on disk:
  ``$PARAM_MONITOR_CACHE_DIR``, else ``$XDG_CACHE_HOME/param_monitor``, else ``~/.cache/param_monitor``,
  one file per source/compiler/CPU (``reduce-<hash>.so``; built for the CPU it runs on).
- ``torch``: plain torch ops in float64 (``_foreach_norm(dtype=float64)``, ``sum(dtype=float64)``,
  float64 dots): every device (CUDA included, no host sync), every layout; slower on CPU.

``PARAM_MONITOR_ENGINE`` = ``auto`` (default: compiled where it applies, torch otherwise), ``compiled``
or ``torch`` chooses; the choice is named once in the log (logger ``param_monitor``).

Why float64: torch's CPU fp32 norms drift with length (relative error 1.8e-4 at 6.3M values, 1.8e-3
at 33M), and fp32 squares overflow from 1.8e19 (a finite 1e20 gradient gave an infinite norm).
"""

from __future__ import annotations

import ctypes
import hashlib
import logging
import os
import platform
import shutil
import subprocess
import tempfile
import time
from array import array
from collections.abc import Sequence
from pathlib import Path

import torch
from torch import Tensor

log = logging.getLogger("param_monitor")

ENGINES = ("auto", "compiled", "torch")
SOURCE = Path(__file__).with_name("_reduce.c")
FLAGS = ["-O3", "-march=native", "-fno-math-errno", "-fPIC", "-shared", "-pthread", "-std=gnu11"]
MAX_USES = 15  # the kernel's limit per shared parameter (more: the torch engine for the whole step)
# values read below which the kernel stays on one thread (a helper thread costs its start, ~50 us).
# Above it, torch.get_num_threads() threads share fixed chunks. On the 2-core benchmark VM one core
# already reads at the memory's speed: 13.7M values took 0.94-0.96x the floor at 2 threads either way.
PARALLEL_MIN = 1 << 22
_DTYPES = {torch.float32: 0, torch.float64: 1, torch.bfloat16: 2, torch.float16: 3}

_kernel: ctypes.CDLL | None = None
_kernel_error: str | None = None  # why there is no kernel (once known)
_named: set[str] = set()  # engines named in the log


# -- choosing --------------------------------------------------------------------------------------------
def engine_setting() -> str:
    value = os.environ.get("PARAM_MONITOR_ENGINE", "auto").strip().lower() or "auto"
    if value not in ENGINES:
        raise ValueError(f"PARAM_MONITOR_ENGINE={value!r}: allowed values are {', '.join(ENGINES)}")
    return value


def kernel() -> ctypes.CDLL | None:
    """The compiled kernel (built or loaded once per process), or ``None`` with the reason in the log."""
    global _kernel, _kernel_error
    if _kernel is None and _kernel_error is None:
        try:
            _kernel = _load()
        except (OSError, subprocess.SubprocessError, RuntimeError) as exc:
            _kernel_error = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
    return _kernel


def engine_name() -> str:
    """The engine CPU tensors get in this process (``compiled`` or ``torch``), for reports."""
    setting = engine_setting()
    if setting == "torch":
        return "torch"
    return "compiled" if kernel() is not None else "torch"


def _use_kernel(tensors: Sequence[Tensor]) -> bool:
    setting = engine_setting()
    if setting == "torch":
        _name_once("torch", "param_monitor statistics: the pure-torch float64 engine (PARAM_MONITOR_ENGINE=torch)")
        return False
    if not all(t.is_cpu for t in tensors):  # (is_cpu: 70 ns, .device.type: 400 ns; x 10,000 tensors)
        _name_once("device", "param_monitor statistics: the torch float64 engine for tensors not on the CPU")
        return False  # CUDA: the torch engine, which serves every device without a host sync
    lib = kernel()
    if lib is None:
        if setting == "compiled":
            raise RuntimeError(f"PARAM_MONITOR_ENGINE=compiled, but the kernel cannot be built: {_kernel_error}")
        _name_once(
            "torch",
            f"param_monitor statistics: no compiled kernel ({_kernel_error}); using the pure-torch float64 "
            "engine: the same numbers, slower on CPU",
            logging.WARNING,
        )
        return False
    return True


def _name_once(key: str, message: str, level: int = logging.INFO) -> None:
    if key not in _named:
        _named.add(key)
        log.log(level, message)


# -- building ------------------------------------------------------------------------------------------
def cache_dir() -> Path:
    env = os.environ.get("PARAM_MONITOR_CACHE_DIR")
    if env:
        return Path(env)
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "param_monitor"


def _compiler() -> str:
    cc = os.environ.get("CC") or shutil.which("cc") or shutil.which("gcc")
    if not cc:
        raise RuntimeError("no C compiler found ($CC, cc, gcc)")
    return cc


def _cpu_signature() -> str:
    """-march=native builds for this CPU: a cache shared between machines must not hand it to another."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith(("flags", "Features")):
                    return line
    except OSError:
        pass
    return platform.processor()


def _load() -> ctypes.CDLL:
    cc = _compiler()
    source = SOURCE.read_bytes()
    key = hashlib.sha256(
        b"\0".join([source, " ".join(FLAGS).encode(), os.path.realpath(cc).encode(), _cpu_signature().encode(),
                    platform.machine().encode()])
    ).hexdigest()[:16]  # fmt: skip
    path = cache_dir() / f"reduce-{key}.so"
    if not path.exists():
        path.parent.mkdir(parents=True, exist_ok=True)
        t0 = time.perf_counter()
        with tempfile.TemporaryDirectory(dir=path.parent) as tmp:  # same filesystem: an atomic rename
            built = Path(tmp) / path.name
            subprocess.run([cc, *FLAGS, "-o", str(built), str(SOURCE)], check=True, capture_output=True, timeout=60)
            os.replace(built, path)
        how = f"compiled in {time.perf_counter() - t0:.1f} s into {path}"
    else:
        how = f"loaded from {path}"
    # PyDLL: the GIL stays held for the ~ms call. Released (CDLL), a waiting Python thread (TensorBoard's
    # event writer) takes it, and getting it back can cost a switch interval (5 ms) on a busy machine.
    lib = ctypes.PyDLL(str(path))
    if lib.pm_abi() != 1:
        raise RuntimeError(f"{path}: unexpected kernel ABI")
    lib.pm_reduce.restype = ctypes.c_int
    lib.pm_reduce.argtypes = [ctypes.c_int64] + [ctypes.c_void_p] * 6 + [ctypes.c_int64] * 2
    if not lib.pm_has_f16():
        del _DTYPES[torch.float16]  # this compiler has no _Float16: fp16 tensors go to the torch engine
    _name_once("compiled", f"param_monitor statistics: the compiled float64 kernel ({how})")
    return lib


# -- the reductions ------------------------------------------------------------------------------------------
def gram_length(uses: int) -> int:
    """Outputs of one shared parameter: [|c_i|^2 (uses), <c_i, c_j> (i < j), |sum c - g|^2, |g|^2]."""
    return uses + uses * (uses - 1) // 2 + 2


def _flat(t: Tensor, dense: bool = False) -> Tensor:
    """``t`` itself, or for sparse and complex tensors a real view of its values: sparse values
    coalesced (``dense``: densified, to line up element by element with other tensors), complex
    values as (re, im) pairs."""
    if t.is_sparse:
        t = t.to_dense() if dense else t.coalesce().values()
    if t.is_complex():
        t = torch.view_as_real(t.resolve_conj())
    if t.is_cpu and not t.is_contiguous():
        t = t.contiguous()  # a copy (rare: parameters and gradients are contiguous): the kernel reads memory in order
    return t


def reduce(
    tensors: Sequence[Tensor], groups: Sequence[tuple[Sequence[Tensor], Tensor]] = ()
) -> tuple[Tensor, list[Tensor]]:
    """float64 partial sums of a logging step, in one pass over each tensor.

    Returns ``moments``, a ``(len(tensors), 2)`` float64 tensor of ``[sum x^2, sum x]`` per tensor
    (complex values: ``sum |z|^2`` and the sum of the real and imaginary parts), and per group
    ``(uses, grad)`` a float64 vector of :func:`gram_length` entries. All on the device of the first
    tensor; nothing is moved to the host.
    """
    with torch.no_grad():
        flat = [_flat(t) for t in tensors]
        flat_groups = [([_flat(u, True) for u in uses], _flat(g, True)) for uses, g in groups]
        readable = [*flat, *(t for uses, g in flat_groups for t in (*uses, g))]
        fits = all(len(uses) <= MAX_USES for uses, _ in flat_groups)
        if readable and fits and _use_kernel(readable):
            codes = [_DTYPES.get(t.dtype, -1) for t in readable]
            if -1 not in codes:
                return _reduce_compiled(flat, flat_groups, codes)
            _name_once("dtype", "param_monitor statistics: torch float64 engine for fp16 (the compiler lacks _Float16)")
        return _reduce_torch(flat, flat_groups)


def _reduce_compiled(
    flat: list[Tensor], groups: list[tuple[list[Tensor], Tensor]], dts: list[int]
) -> tuple[Tensor, list[Tensor]]:
    """``dts``: the dtype codes of ``flat`` and then of each group's uses and gradient."""
    n = len(flat)
    lengths = [gram_length(len(uses)) for uses, _ in groups]
    out = torch.empty(2 * n + sum(lengths), dtype=torch.float64)
    m = [1] * n
    ptrs = [t.data_ptr() for t in flat]
    numel = [t.numel() for t in flat]
    offsets = list(range(0, 2 * n, 2))
    at = 2 * n
    for (uses, g), length in zip(groups, lengths, strict=True):
        members = [*uses, g]
        if any(t.numel() != g.numel() for t in uses):
            raise ValueError(f"a use's contribution has {[t.numel() for t in uses]} values, its gradient {g.numel()}")
        m.append(len(members))
        ptrs += [t.data_ptr() for t in members]
        numel.append(g.numel())
        offsets.append(at)
        at += length
    arrays = [array("q", v) for v in (m, ptrs, dts, numel, offsets)]
    addresses = [a.buffer_info()[0] for a in arrays]
    code = _kernel.pm_reduce(len(m), *addresses, out.data_ptr(), torch.get_num_threads(), PARALLEL_MIN)  # type: ignore[union-attr]
    if code != 0:
        raise MemoryError("param_monitor's statistics kernel could not allocate its scratch space")
    grams = list(out[2 * n :].split(lengths)) if lengths else []
    return out[: 2 * n].view(n, 2), grams


def _reduce_torch(flat: list[Tensor], groups: list[tuple[list[Tensor], Tensor]]) -> tuple[Tensor, list[Tensor]]:
    device = (flat or [g for _, g in groups] or [torch.empty(0)])[0].device
    if not flat:
        moments = torch.zeros(0, 2, dtype=torch.float64, device=device)
    else:
        by_kind: dict[tuple[torch.device, torch.dtype], list[int]] = {}
        for i, t in enumerate(flat):
            by_kind.setdefault((t.device, t.dtype), []).append(i)
        pieces, order = [], []
        for index in by_kind.values():
            members = [flat[i] for i in index]
            sq = _squares(members)
            sums = torch.stack([t.sum(dtype=torch.float64) for t in members])
            pieces.append(torch.stack([sq, sums], dim=1).to(device))
            order += index
        moments = torch.cat(pieces)
        if order != sorted(order):  # several devices or dtypes: back to the callers' order
            where = torch.empty(len(order), dtype=torch.long)
            where[torch.tensor(order)] = torch.arange(len(order))
            moments = moments.index_select(0, where.to(device, non_blocking=True))  # no host sync
    return moments, [_gram_torch(uses, g).to(device) for uses, g in groups]


def _squares(members: list[Tensor]) -> Tensor:
    """float64 sums of squares: no fp32 drift with length, no fp32 overflow of squares.

    On CPU ``_foreach_norm(dtype=float64)`` casts each value before it is squared (measured: 1e-13 at
    6.3M values, right at 1e20). Elsewhere it may accumulate in the input's type, so non-float64
    tensors take ``linalg.vector_norm(dtype=float64)``, which is documented to cast first.
    """
    if members[0].is_cpu or members[0].dtype == torch.float64:
        norms = torch._foreach_norm(members, 2, dtype=torch.float64)
    else:
        norms = [torch.linalg.vector_norm(t, dtype=torch.float64) for t in members]
    return torch.stack(norms).square()


def _gram_torch(uses: list[Tensor], g: Tensor) -> Tensor:
    c = [u.reshape(-1).to(torch.float64) for u in uses]
    g64 = g.reshape(-1).to(device=c[0].device, dtype=torch.float64)
    residual = -g64  # float64 (sees a 1e-8 error), added in the kernel's order: -g + c_0 + c_1 ...
    for x in c:
        residual += x
    pairs = [torch.dot(c[i], c[j]) for i in range(len(c)) for j in range(i + 1, len(c))]
    return torch.stack([*(torch.dot(x, x) for x in c), *pairs, torch.dot(residual, residual), torch.dot(g64, g64)])
