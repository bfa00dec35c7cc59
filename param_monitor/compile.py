"""``torch.compile`` and per-use tracking: the logging steps run eagerly, every other step stays compiled.

A compiled region is ONE autograd node (``CompiledFunctionBackward``) with one edge into each
parameter it reads: a tied weight used twice inside it has one edge, and its uses cannot be told
apart. The module calls inside it run no forward hooks either, and the monitor's global module
hooks, installed on a logging step, make dynamo break the graph at every module call (112 breaks
and a 4x slower fit for ``model.forward = torch.compile(model.forward)``).

So on a tracked batch (a logging step, and the first step that names the call sites) the monitor
holds ``torch.compiler.set_stance("force_eager")`` from the start of the batch to
``on_before_optimizer_step`` (:class:`EagerStance`): every ``torch.compile`` directive is ignored
(``torch.compile(model)``, ``Module.compile()``, a compiled ``forward``, a compiled function the
step calls, compiled autograd), so the tracked batch runs eagerly and is walked as usual. The
stance the user had is restored before the optimizer step (a compiled optimizer step stays
compiled), at the end of the batch, on an exception and at teardown. Nothing is traced under the
stance, so the monitor adds no graph, no recompile and no graph break: every other step runs the
graphs compiled without it. A logging step then costs an eager forward and backward (on CPU
1.0-1.2x a compiled one; its memory is eager memory), and code that branches on
``torch.compiler.is_compiling()`` takes its eager branch on that step.

Where an eager step is not wanted (``ParameterMonitor(eager_logging_steps=False)``), or cannot
replay what was compiled (user-captured CUDA graphs, ``torch.cuda.make_graphed_callables``), the
per-use tracking is off with one warning; the per-tensor statistics do not need it.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn as nn

__all__ = ["EagerStance", "compiled_parts", "graphed_parts", "is_compiled", "tracking_blocked"]


def _is_dynamo_wrapper(value: Any) -> bool:
    """Whether ``value`` is what ``torch.compile(fn)`` returns.

    Why the private attribute: ``torch.compile`` wraps a function in dynamo's ``_fn``, which
    carries ``_torchdynamo_orig_callable`` (the function it compiles); no public API tells a
    compiled callable from a plain one.
    """
    return callable(value) and getattr(value, "_torchdynamo_orig_callable", None) is not None


def compiled_parts(module: nn.Module) -> list[str]:
    """Where ``module`` or a submodule is compiled, one line each (empty: no compile seen).

    Why each private reach: ``OptimizedModule`` is the class ``torch.compile(module)`` returns
    (``torch._dynamo.eval_frame``); ``_compiled_call_impl`` is what ``Module.compile()`` sets;
    ``_compiler_ctx`` is Lightning's mark of ``fit(torch.compile(lit))`` (``from_compiled``); a
    compiled method put on the instance (``model.forward = torch.compile(model.forward)``) is
    found by :func:`_is_dynamo_wrapper`. A compiled function that the step calls (a loss, a
    block held outside the module) cannot be seen from the module: the eager stance covers it all
    the same. Public replacement: none (``torch.compiler.is_compiling()`` only answers inside a
    compiled region).
    """
    found: list[str] = []
    if getattr(module, "_compiler_ctx", None):
        found.append("the LightningModule (`fit(torch.compile(module))`)")
    optimized = torch._dynamo.eval_frame.OptimizedModule
    for path, sub in module.named_modules():
        where = path or "the root module"
        if isinstance(sub, optimized):
            found.append(f"`{where}` (`torch.compile(module)`)")
            continue  # its own `forward` is dynamo's wrapper
        if getattr(sub, "_compiled_call_impl", None) is not None:
            found.append(f"`{where}` (`Module.compile()`)")
        if sub is module and getattr(module, "_compiler_ctx", None):
            continue  # Lightning's own wrapping of `forward`/`*_step`: named above
        for attr, value in vars(sub).items():
            if not attr.startswith("_") and _is_dynamo_wrapper(value):
                found.append(f"`{path + '.' if path else ''}{attr}` (`= torch.compile(...)`)")
    return found


def is_compiled(module: nn.Module) -> bool:
    """Whether ``module`` or a submodule runs under ``torch.compile`` (see :func:`compiled_parts`)."""
    return bool(compiled_parts(module))


def graphed_parts(module: nn.Module) -> list[str]:
    """Submodules whose ``forward`` replays a CUDA graph the user captured (``make_graphed_callables``).

    Why the qualified name: ``torch.cuda.make_graphed_callables`` puts a closure of its own
    (``...make_graphed_forward.<locals>.new_fwd``) on the module instance as ``forward``; no public
    attribute marks a graphed module. A replayed graph runs recorded kernels, not the module's
    code: it cannot be run eagerly for a logging step.
    """
    return [
        f"`{path or 'the root module'}`"
        for path, sub in module.named_modules()
        if "make_graphed_forward" in getattr(vars(sub).get("forward"), "__qualname__", "")
    ]


def tracking_blocked(module: nn.Module, eager_logging_steps: bool) -> str | None:
    """Why per-use tracking must be off for ``module`` (a warning's text), or ``None``."""
    graphed = graphed_parts(module)
    if graphed:
        return (
            f"`ParameterMonitor`: {', '.join(graphed)} replay(s) a CUDA graph captured with "
            "`torch.cuda.make_graphed_callables`: a replay cannot run eagerly for a logging step, so per-use "
            "tracking of shared parameters is switched off (per-tensor statistics still work)."
        )
    compiled = compiled_parts(module)
    if compiled and not eager_logging_steps:
        return (
            f"`ParameterMonitor`: {', '.join(compiled)} is compiled and `eager_logging_steps=False`: per-use "
            "tracking of shared parameters needs the logging steps to run eagerly and is switched off "
            "(per-tensor statistics still work)."
        )
    return None


class EagerStance:
    """``torch.compiler.set_stance("force_eager")`` held across hooks: :meth:`enter` ... :meth:`exit`.

    ``set_stance(...)`` called as a function sets the stance at once and remembers the one before;
    its ``__exit__`` puts that one back (``fail_on_recompile``, ``eager_on_recompile``, a forced
    backend: whatever the user had). Entering twice keeps the first; exiting when not held does
    nothing, so every end of a batch (optimizer step, batch end, exception, teardown) may call it.
    """

    def __init__(self) -> None:
        self._ctx: Any = None

    @property
    def held(self) -> bool:
        return self._ctx is not None

    def enter(self) -> None:
        if self._ctx is None:
            self._ctx = torch.compiler.set_stance("force_eager")

    def exit(self) -> None:
        ctx, self._ctx = self._ctx, None
        if ctx is not None:
            ctx.__exit__(None, None, None)
