"""Per-use gradient contributions of shared parameters, read off autograd's graph.

Autograd sums the gradients of every use of a leaf tensor into one ``.grad``: each use is one
edge into the parameter's gradient accumulator (``AccumulateGrad``). So, on a logging step only,
:meth:`SharedUseTracker.before_backward` walks the graph from the loss, finds the edges into the
accumulator of every monitored parameter, and hooks the node at the other end of each edge
(``Node.register_hook``): its ``grad_inputs[i]`` is exactly that use's contribution, whoever made
the use (a module's forward, ``F.linear(h, self.wte.weight)`` in a parent, a penalty in
``training_step``, ``nn.MultiheadAttention`` reading ``out_proj.weight`` itself). The model is
never touched: nothing is put in its parameter slots or its hook dicts, so a ``deepcopy`` or a
pickle of it carries nothing of the monitor, and its outputs and gradients are bit-identical.

Where uses meet before the accumulator (autocast's weight-cast cache makes one ``ToCopyBackward0``
for every use of a weight; ``w.t()`` used twice), the walk looks through casts,
views and transposes (nodes that read no other tensor and save none) to the point
where the gradient path really branches, hooks each branch, and maps its gradient down to the
parameter by applying the nodes in between (their backward is linear in the gradient). A hook
that fails never breaks the backward: that parameter is reported as not attributable.

Sites are named by module call. While tracking, global module forward hooks (installed on
logging steps only, never on the model) record the window of autograd sequence numbers that
each module call spans; a use belongs to the innermost module call whose window holds the node
that consumed the parameter (``Node._sequence_nr()``). Inside a region that dynamo traces the
hooks do nothing (no graph break); the monitor runs tracked steps eagerly (``compile.py``).
Names are decided from the step's final call counts (a use is recorded as the call's identity),
so every backward pass and micro-batch of a step names a call alike:

- a module called once in the forward pass: its (first) path (``lm_head``, ``transformer.wte``);
- a module registered at k positions of one ``nn.Sequential`` (whose own forward runs them in
  order) and called k times by that Sequential's single call: its i-th call is its i-th path
  (``net.3``, ``net.6``);
- otherwise ``{path}#{i}``, i counted from 0 in call order (recursion, loops, ``forward()`` of a
  Sequential subclass, the same module under several attribute names);
- a use in the root module's own forward: ``<root>``; outside every module call (a penalty
  term in ``training_step``): ``<outside>``;
- a use through one index of one tensor (``w[3]``, ``w[:, 3]``; MoE experts kept as one 3-D
  parameter): ``{site}[3]``, so an expert keeps its name whichever experts the routing hits
  (an expert without tokens has no use, and no tag, that step);
- several uses inside one call: ``{site}:{j}``, j from 0 in creation order;
- gradient that was already in ``.grad`` when tracking began, or that ``.grad`` kept through a
  change made between two backward passes (manual accumulation, ``zero_grad(set_to_none=False)``):
  ``<earlier>``, so that the sites still add up to ``.grad``.

Some nodes hide their uses (:data:`_OPAQUE_NODES`): a reentrant checkpointed segment runs a
backward of its own (its parameters are found as that backward accumulates them), a compiled
region or a replayed CUDA graph is one node per region. The parameters behind them are reported by
:meth:`SharedUseTracker.unattributed` and get no per-use values; the others are split as usual.

Only *shared* parameters keep anything: per use, the gradient tensor autograd made for it (no
copy; autograd counts our reference and never writes into it); from a second micro-batch on, a
buffer of ours in fp32 (fp64/complex parameters keep their dtype) that sums the micro-batches.
A parameter is shared when it is registered under several names or gets more than one
contribution in a step.

>>> import torch, torch.nn as nn
>>> shared = nn.Linear(1, 1, bias=False)
>>> _ = nn.init.constant_(shared.weight, 3.0)
>>> net = nn.Sequential(shared, shared)
>>> tracker = SharedUseTracker(net)
>>> tracker.start()
>>> tracker.begin_forward()
>>> loss = net(torch.ones(1, 1)).sum()
>>> tracker.before_backward(loss)
>>> loss.backward()
>>> tracker.after_backward()
>>> tracker.stop()
>>> {name: {site: t.item() for site, t in sites.items()} for name, sites in tracker.contributions().items()}
{'0.weight': {'0': 3.0, '1': 3.0}}
>>> net[0].weight.grad.item()
6.0
"""

from __future__ import annotations

import bisect
import math
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from functools import partial
from typing import Any

import torch
import torch.nn as nn
from torch import Tensor
from torch.autograd.graph import Node
from torch.nn.parameter import UninitializedParameter
from torch.utils.hooks import RemovableHandle

from param_monitor.parameters import parameter_aliases

# Every autograd node takes the next number of a thread-local counter (`Node._sequence_nr()`).
# Reading the counter without creating a node needs this private binding (0.1 us instead of a
# ~5 us probe node); no public API exposes it. Without it, a probe node reads it.
_peek_sequence_nr = getattr(torch._C._autograd, "_get_sequence_nr", None)

_CALL = "\x1f"  # marks a site recorded as a module call's identity (module id, call index, parent id)
ROOT_SITE = "<root>"
OUTSIDE_SITE = "<outside>"
EARLIER_SITE = "<earlier>"
# Nodes whose uses of a parameter cannot be told apart: a Python node that runs a graph of its own
# inside backward (the uses inside are not edges of ours), or one node standing for a whole
# region (one edge per parameter, however many uses inside). Parameters reached through them
# are not attributed (one warning per cause).
_OPAQUE_NODES = {
    "CheckpointFunctionBackward": "reentrant activation checkpointing (`use_reentrant=True`): a checkpointed "
    "segment runs a backward of its own",
    "CompiledFunctionBackward": "a `torch.compile`d region ran in a logging step's backward (one node for all the "
    "uses inside it; see `ParameterMonitor(eager_logging_steps=...)`)",
    "GraphedBackward": "a CUDA graph captured by the user (`torch.cuda.make_graphed_callables`) ran in a logging "
    "step's backward: its uses run inside the replay",
}
# Of those, the ones that run a backward of their own: their parameters are found as that backward accumulates them.
_NESTED_BACKWARD_NODES = frozenset({"CheckpointFunctionBackward"})
# `Σ uses − grad` is ~1e-7 in fp32 and ~1e-4 under fp16 autocast; a missed use is O(1).
UNSEEN_USE_TOLERANCE = 1e-2
_LOW_PRECISION = (torch.float16, torch.bfloat16)


@dataclass
class _Call:
    """One module call: the sequence numbers of the autograd nodes it created lie in [start, end)."""

    module_id: int
    index: int  # the index of this call among the module's calls in this forward pass
    start: int
    parent: _Call | None
    end: float = float("inf")


@dataclass
class _Use:
    """One edge into a parameter's gradient: ``node``'s ``grad_inputs[slot]``, mapped through ``chain``."""

    pid: int
    node: Node
    slot: int
    chain: tuple[tuple[Node, int], ...]  # (node to apply, index of its output toward the parameter)
    seq: int


@dataclass
class _ParamState:
    """What a shared parameter's buffers hold in this step."""

    buffers: dict[str, Tensor] = field(default_factory=dict)
    owned: set[str] = field(default_factory=set)  # sites whose buffer is ours (else autograd's own tensor)
    grad_ref: tuple[int, int] | None = None  # (id, _version) of `.grad` after our last backward
    single_sites: list[str] = field(default_factory=list)  # untracked backward passes: their one site


class SharedUseTracker:
    """Records, for each shared parameter, the gradient contribution of each use (call site)."""

    def __init__(self, root: nn.Module, param_filter: Callable[[str], bool] | None = None) -> None:
        self._root = root
        self._param_filter = param_filter
        self.reindex()
        self._probe = torch.zeros((), requires_grad=True)
        self._handles: list[RemovableHandle] = []
        self._node_handles: list[RemovableHandle] = []
        self._capture = False
        self._reset_forward()
        self._states: dict[int, _ParamState] = {}
        self._site_order: dict[str, int] = {}
        self._sites_seen: dict[int, list[str]] = {}
        self._last_sites: dict[int, list[str]] = {}
        self._last_order: dict[str, int] = {}
        self._max_calls: dict[int, int] = {}  # per module, its most calls in one forward of this step
        self._last_max: dict[int, int] = {}
        self._shared_seen: set[int] = set()
        self._last_shared: set[int] = set()
        self._opaque: dict[str, str] = {}  # opaque node kind -> why its uses cannot be seen
        self._opaque_params: dict[int, str] = {}  # parameters reached through an opaque node -> its kind
        self._inside_nested = 0  # > 0 while a node that runs its own backward runs
        self._held_accumulators: list[Node] = []  # kept alive so that a nested backward accumulates through them
        self._summed_in: dict[int, torch.dtype] = {}  # uses summed by autograd in low precision before `.grad`
        self._failed: dict[int, str] = {}  # parameters whose use could not be recorded in backward
        self._walked = False

    def reindex(self) -> None:
        """Re-read the root's parameters and modules; what this step recorded so far is kept.

        For a parameter or module added, replaced or materialized during a tracked step: the
        parameters that are still there keep their uses (they are keyed by the tensor).
        """
        root, keep = self._root, self._param_filter
        aliases = parameter_aliases(root)
        self._name_of: dict[int, str] = {}
        self._param_of: dict[int, nn.Parameter] = {}
        self._statically_shared: set[int] = set()
        for name, param in root.named_parameters():
            if keep is not None and not keep(name):
                continue
            self._name_of[id(param)] = name
            self._param_of[id(param)] = param
            if aliases.get(name):
                self._statically_shared.add(id(param))
        self._paths: dict[int, list[str]] = {}
        modules_at: dict[str, nn.Module] = {}
        for path, module in root.named_modules(remove_duplicate=False):
            self._paths.setdefault(id(module), []).append(path)
            modules_at[path] = module
        self._sequential_parent = {
            mid: _sequential_parent(paths, modules_at) for mid, paths in self._paths.items() if len(paths) > 1
        }
        for attr in ("_states", "_sites_seen", "_last_sites"):
            states = getattr(self, attr, {})
            for pid in [pid for pid in states if pid not in self._param_of]:  # a parameter that is gone
                del states[pid]

    # -- life cycle -------------------------------------------------------------------------
    @property
    def active(self) -> bool:
        return bool(self._handles)

    def start(self, capture: bool = True) -> None:
        """Begin a tracked step. ``capture=False`` only names the uses (for the parameter table)."""
        if self.active:
            return
        self._capture = capture
        self._states = {}
        self._site_order = {}
        self._sites_seen = {}
        self._max_calls = {}
        self._shared_seen = set()
        self._opaque = {}
        self._opaque_params = {}
        self._summed_in = {}
        self._failed = {}
        self._walked = False
        self._reset_forward()
        module_hooks = torch.nn.modules.module
        self._handles.append(module_hooks.register_module_forward_pre_hook(self._before_call))
        self._handles.append(module_hooks.register_module_forward_hook(self._after_call, always_call=True))

    def begin_forward(self) -> None:
        """Call before each forward pass (micro-batch): call indices restart from 0."""
        self._reset_forward()

    def stop(self) -> None:
        """Remove every hook; buffers stay readable until the next :meth:`start`."""
        for handle in [*self._handles, *self._node_handles]:
            handle.remove()
        self._handles = []
        self._node_handles = []
        if self._walked:
            self._last_sites = self._sites_seen
            self._last_shared = self._shared_seen
            self._last_order = self._site_order
            self._last_max = self._max_calls
        self._reset_forward()

    @property
    def has_seen_forward(self) -> bool:
        """Whether a backward pass was walked under tracking (so call sites are known)."""
        return self._walked or bool(self._last_sites)

    def discard(self, names: Iterable[str]) -> None:
        """Forget the buffers of ``names`` (consumed by the statistics of one optimizer's step)."""
        drop = set(names)
        for pid, name in self._name_of.items():
            if name in drop:
                self._states.pop(pid, None)

    def reset(self) -> None:
        """Free the buffers."""
        self._states = {}

    # -- results ------------------------------------------------------------------------------
    def contributions(self) -> dict[str, dict[str, Tensor]]:
        """``{parameter name: {site: contribution}}`` for the shared parameters seen, sites in call order.

        Parameters whose contributions cannot be attributed this step (see :meth:`unattributed`)
        are left out.
        """
        order, counts = self._site_order, self._max_calls
        out: dict[str, dict[str, Tensor]] = {}
        for pid, state in self._states.items():
            if pid in self._failed or pid in self._opaque_params:
                continue  # not all of its uses were seen: nothing partial is reported
            if state.buffers and self._param_of[pid].grad is not None:
                sites: dict[str, Tensor] = {}
                for raw, t in sorted(state.buffers.items(), key=lambda item: order.get(item[0], -1)):
                    site = self._final(raw, counts)
                    sites[site] = sites[site] + t if site in sites else t  # one call reached two ways
                out[self._name_of[pid]] = sites
        return out

    @property
    def walked(self) -> bool:
        """Whether :meth:`before_backward` saw a graph in this tracked step."""
        return self._walked

    def unattributed(self) -> dict[str, str]:
        """``{parameter name: why}`` for parameters whose uses could not all be seen this step.

        A parameter reached through an opaque node (:data:`_OPAQUE_NODES`): used inside a
        reentrant checkpointed segment (found as the segment's own backward accumulates it), read
        by a compiled region or a replayed CUDA graph; or one whose use could not be read in
        backward. Their ``shared_grad*`` are not written; parameters used elsewhere only are not listed.
        """
        out: dict[str, str] = {}
        for pid, name in self._name_of.items():  # in the model's order
            if pid in self._failed:
                out[name] = self._failed[pid]
            elif pid in self._opaque_params:
                out[name] = _OPAQUE_NODES[self._opaque_params[pid]]
        return out

    def summed_in(self) -> dict[str, torch.dtype]:
        """``{parameter name: dtype}`` for parameters whose uses autograd summed in low precision before ``.grad``.

        Autocast's weight-cast cache (one bf16/fp16 copy of a weight for all its uses) sums the uses'
        gradients in that dtype inside the cast node: ``Σ uses − grad`` is then that dtype's rounding
        (1.7e-2 for 48 bf16 uses), not an unseen use.
        """
        return {self._name_of[pid]: dtype for pid, dtype in self._summed_in.items() if pid in self._name_of}

    def call_sites(self) -> dict[str, list[str]]:
        """Sites of every monitored parameter in the last tracked step (for the table)."""
        seen = self._sites_seen if self._walked else self._last_sites
        order = self._site_order if self._walked else self._last_order
        counts = self._max_calls if self._walked else self._last_max
        return {
            self._name_of[pid]: list(
                dict.fromkeys(self._final(s, counts) for s in sorted(sites, key=lambda s: order.get(s, -1)))
            )
            for pid, sites in seen.items()
        }

    def shared_names(self) -> list[str]:
        """Names of the parameters that were shared in the last tracked step."""
        shared = self._shared_seen if self._walked else self._last_shared
        return [name for pid, name in self._name_of.items() if pid in shared]

    # -- module-call windows (global hooks, logging steps only) ----------------------------------
    def _reset_forward(self) -> None:
        self._calls: list[_Call] = []
        self._starts: list[int] = []
        self._open: list[_Call | None] = []
        self._n_calls: dict[int, int] = {}

    def _sequence_number(self) -> int:
        """The number the next autograd node created on this thread will take."""
        if _peek_sequence_nr is not None:
            return _peek_sequence_nr()
        with torch.enable_grad():  # a probe node takes a number: the next one is after it
            return self._probe.view_as(self._probe).grad_fn._sequence_nr() + 1  # type: ignore[union-attr]

    def _before_call(self, module: nn.Module, args: Any) -> None:
        if torch.compiler.is_compiling():  # traced by dynamo: a no-op there, never a graph break (compile.py)
            return
        mid = id(module)
        if mid not in self._paths:
            return
        if (
            not torch.is_grad_enabled()
            or torch.is_inference_mode_enabled()
            or torch._C._current_graph_task_id() != -1  # a forward re-run inside backward (checkpointing)
        ):
            self._open.append(None)
            return
        k = self._n_calls.get(mid, 0)
        self._n_calls[mid] = k + 1
        parent = next((c for c in reversed(self._open) if c is not None), None)
        call = _Call(mid, k, self._sequence_number(), parent)
        self._calls.append(call)
        self._open.append(call)

    def _after_call(self, module: nn.Module, args: Any, output: Any) -> None:
        if torch.compiler.is_compiling():
            return
        if id(module) not in self._paths or not self._open:
            return
        call = self._open.pop()
        if call is not None:
            call.end = self._sequence_number()

    def _site_of(self, seq: int) -> str:
        """The innermost module call whose window holds node number ``seq``."""
        calls = self._calls
        i = bisect.bisect_right(self._starts, seq) - 1
        while i >= 0:
            call = calls[i]
            if call.start <= seq < call.end:
                parent = call.parent.module_id if call.parent is not None else 0
                return f"{_CALL}{call.module_id}{_CALL}{call.index}{_CALL}{parent}"
            i -= 1
        return OUTSIDE_SITE

    def _final(self, label: str, counts: dict[int, int]) -> str:
        """The documented name of a use recorded as a module call's identity, from the step's final call counts.

        Decided once the step's calls are all known, so that every backward pass of a batch (a GAN's
        two steps) and every micro-batch names the same call alike.
        """
        if not label.startswith(_CALL):
            return label
        head = label[1:]
        cut = min((i for i in (head.find("["), head.find(":")) if i >= 0), default=len(head))
        raw, suffix = head[:cut], head[cut:]  # suffix: `[index]` of a select, `:j` of several uses in one call
        mid, k, parent = (int(v) for v in raw.split(_CALL))
        paths = self._paths[mid]
        n = counts.get(mid, 0)
        if paths == [""]:
            name = ROOT_SITE if n == 1 else f"{ROOT_SITE}#{k}"
        elif n == 1:
            name = paths[0]
        elif (
            (seq_parent := self._sequential_parent.get(mid)) is not None
            and len(paths) == n
            and parent == seq_parent
            and counts.get(seq_parent, 0) == 1
        ):
            name = paths[k]
        else:
            name = f"{paths[0]}#{k}"
        return name + suffix

    # -- the graph walk (once per backward pass of a tracked step) --------------------------------
    def before_backward(self, loss: Any) -> None:
        """Find every use of the monitored parameters in the graph of ``loss`` and hook them."""
        if not self.active:
            return
        roots = [t.grad_fn for t in _tensors(loss) if t.grad_fn is not None]
        if not roots:
            return
        for handle in self._node_handles:  # a backward without `after_backward`: never hook a node twice
            handle.remove()
        self._node_handles = []
        self._held_accumulators = []
        self._inside_nested = 0
        self._starts = [c.start for c in self._calls]
        for mid, n in self._n_calls.items():
            self._max_calls[mid] = max(self._max_calls.get(mid, 0), n)
        incoming, accumulators, opaque = _walk(roots, self._trainable_ids())
        self._note_opaque(opaque, accumulators)
        uses_of: dict[int, list[_Use]] = {}
        for node, pid in accumulators.items():
            for consumer, slot in incoming.get(node, ()):
                for use in _split(consumer, slot, (), incoming):
                    uses_of.setdefault(pid, []).append(_Use(pid, *use))
        self._walked = True
        hooks: dict[Node, list[tuple[_Use, str]]] = {}
        for pid, uses in uses_of.items():
            sites = self._label(uses)
            known = self._sites_seen.setdefault(pid, [])
            known.extend(s for s in sites if s not in known)
            for use, site in zip(uses, sites, strict=True):  # sites in creation order
                self._site_order[site] = min(self._site_order.get(site, use.seq), use.seq)
            if len(uses) > 1 or pid in self._statically_shared or len(known) > 1:
                self._shared_seen.add(pid)
            if not self._capture:
                continue
            if not self._prepare(pid, uses, sites):
                continue
            for use, site in zip(uses, sites, strict=True):
                hooks.setdefault(use.node, []).append((use, site))
        for node, targets in hooks.items():
            self._node_handles.append(node.register_hook(partial(self._on_node_grad, targets=targets)))

    def after_backward(self) -> None:
        """Call after each backward pass: the node hooks go; what ``.grad`` holds now is remembered."""
        for handle in self._node_handles:
            handle.remove()
        self._node_handles = []
        self._held_accumulators = []
        self._inside_nested = 0
        for pid, state in self._states.items():
            if pid in self._param_of:
                grad = self._param_of[pid].grad
                state.grad_ref = None if grad is None else (id(grad), grad._version)

    def _note_opaque(self, opaque: dict[Node, str], accumulators: dict[Node, int]) -> None:
        """Mark the parameters reached through opaque nodes: their edges now, a nested backward's as it runs."""
        nested = [node for node, kind in opaque.items() if kind in _NESTED_BACKWARD_NODES]
        for node, kind in opaque.items():
            self._opaque.setdefault(kind, _OPAQUE_NODES[kind])
            for nxt, _ in node.next_functions:
                if nxt in accumulators:  # a region's input: its uses inside are one edge
                    self._opaque_params.setdefault(accumulators[nxt], kind)
        if not nested:
            return
        for node in nested:
            self._node_handles.append(node.register_prehook(self._enter_nested))
            self._node_handles.append(node.register_hook(self._leave_nested))
        # The segment's backward accumulates into each parameter's accumulator node: we hold the node
        # (the parameter hands out the same one while it lives) and see which ones fire inside.
        kind = next(kind for kind in opaque.values() if kind in _NESTED_BACKWARD_NODES)
        with torch.enable_grad():
            for pid in self._trainable_ids():
                param = self._param_of[pid]
                acc = param.view_as(param).grad_fn.next_functions[0][0]  # type: ignore[union-attr]
                self._held_accumulators.append(acc)
                self._node_handles.append(acc.register_prehook(partial(self._accumulated, pid=pid, kind=kind)))

    def _enter_nested(self, grad_outputs: Any) -> None:
        self._inside_nested += 1

    def _leave_nested(self, grad_inputs: Any, grad_outputs: Any) -> None:
        self._inside_nested -= 1

    def _accumulated(self, grad_outputs: Any, pid: int, kind: str) -> None:
        if self._inside_nested > 0:
            self._opaque_params.setdefault(pid, kind)

    def _trainable_ids(self) -> set[int]:
        return {
            pid
            for pid, param in self._param_of.items()
            if param.requires_grad and not isinstance(param, UninitializedParameter)
        }

    def _label(self, uses: list[_Use]) -> list[str]:
        sites = [self._site_of(use.seq) + _index_suffix(use.node) for use in uses]
        counts: dict[str, int] = {}
        for site in sites:
            counts[site] = counts.get(site, 0) + 1
        if all(c == 1 for c in counts.values()):
            return sites
        order = sorted(range(len(uses)), key=lambda i: uses[i].seq)
        index: dict[str, int] = {}
        labels = list(sites)
        for i in order:
            if counts[sites[i]] > 1:
                j = index.get(sites[i], 0)
                index[sites[i]] = j + 1
                labels[i] = f"{sites[i]}:{j}"
        return labels

    def _prepare(self, pid: int, uses: list[_Use], sites: list[str]) -> bool:
        """Decide, before this backward, whether ``pid``'s contributions can be kept; fix up what ``.grad`` holds."""
        state = self._states.get(pid)
        grad = self._param_of[pid].grad
        shared = pid in self._shared_seen
        if state is not None and state.buffers:
            if grad is None:  # `.grad` was reset (zero_grad): so are its contributions
                state.buffers.clear()
                state.owned.clear()
            elif state.grad_ref != (id(grad), grad._version):  # changed between backward passes
                state.buffers = {EARLIER_SITE: _buffer_like(grad, grad)}
                state.owned = {EARLIER_SITE}
                self._site_order.setdefault(EARLIER_SITE, -1)
            return True
        if not shared:
            # one use: no buffer; remember where, in case a later micro-batch makes it shared
            state = self._states.setdefault(pid, _ParamState())
            if grad is None:
                state.single_sites = []
            state.single_sites.extend(s for s in sites if s not in state.single_sites)
            state.grad_ref = None
            return False
        state = self._states.setdefault(pid, _ParamState())
        if grad is not None:  # gradient from before: one earlier site if we know it, else <earlier>
            earlier = state.single_sites[0] if len(state.single_sites) == 1 else EARLIER_SITE
            state.buffers[earlier] = _buffer_like(grad, grad)
            state.owned.add(earlier)
            self._site_order.setdefault(earlier, -1)
        state.single_sites = []
        return True

    def _on_node_grad(self, grad_inputs: tuple[Tensor | None, ...], grad_outputs: Any, targets: list) -> None:
        # runs inside the user's backward: whatever goes wrong here must not break training
        for use, site in targets:
            try:
                self._record_use(use, site, grad_inputs)
            except Exception as error:  # noqa: BLE001 - reported as unattributed, never raised in backward
                self._failed.setdefault(use.pid, f"its gradient could not be read in backward: {error}")
                self._states.pop(use.pid, None)

    def _record_use(self, use: _Use, site: str, grad_inputs: tuple[Tensor | None, ...]) -> None:
        if use.pid in self._failed:
            return
        grad = grad_inputs[use.slot]
        if grad is None:
            return
        param = self._param_of[use.pid]
        if use.chain and grad.dtype in _LOW_PRECISION and grad.dtype != param.dtype:
            # the uses branch off a low-precision copy (autocast's cast cache): autograd sums them in that dtype
            self._summed_in[use.pid] = grad.dtype
        for node, index in use.chain:
            out = node(grad)
            grad = out[index] if isinstance(out, tuple) else out
            if grad is None:
                return
        state = self._states.setdefault(use.pid, _ParamState())
        held = state.buffers.get(site)
        if held is None:
            # Keep autograd's own tensor, no copy: autograd sees our reference (its use count)
            # and neither steals it for `.grad` nor accumulates into it in place.
            state.buffers[site] = _held(grad, self._param_of[use.pid])
        elif site in state.owned:
            held.add_(grad.to_dense() if grad.is_sparse else grad)
        else:  # a second micro-batch: from now on an accumulation buffer of our own
            state.buffers[site] = _buffer_like(held, self._param_of[use.pid]).add_(
                grad.to_dense() if grad.is_sparse else grad
            )
            state.owned.add(site)


def _index_suffix(node: Node) -> str:
    """``[3]`` for a use through ``w[3]`` (one index of one tensor: an MoE expert of a 3-D weight), else "".

    Naming the use by its index keeps the name of an expert the same from step to step, whichever
    experts the routing hits. Read from the node's saved index (``SelectBackward0``), or from a
    one-element index tensor (``IndexBackward0``, ``IndexSelectBackward0``: one read of that element).
    """
    kind = type(node).__name__
    try:
        if kind == "SelectBackward0":
            dim, index = int(node._saved_dim), int(node._saved_index)
        elif kind == "IndexSelectBackward0" and node._saved_index.numel() == 1:
            dim, index = int(node._saved_dim), int(node._saved_index.item())
        elif kind == "IndexBackward0" and len(node._saved_indices) == 1 and node._saved_indices[0].numel() == 1:
            dim, index = 0, int(node._saved_indices[0].item())
        else:
            return ""
        if index >= 2**63:  # a negative index comes back as an unsigned 64-bit value
            index -= 2**64
        if index < 0:
            index += int(node._saved_self_sym_sizes[dim])
    except (AttributeError, RuntimeError, TypeError, IndexError):
        return ""
    return "[" + ", ".join([":"] * dim + [str(index)]) + "]"


def unseen_use_tolerance(
    use_norms: Sequence[float], grad_norm: float | None = None, summed_in: torch.dtype | None = None
) -> float:
    """How far (relative to ``grad_norm``) the seen uses may miss ``.grad`` before a use counts as not seen.

    In fp32 ``Σ uses − grad`` is ~1e-7 (~1e-4 under fp16 autocast without a shared cast): 1e-2.
    When autograd summed the uses in ``summed_in`` (autocast's weight-cast cache, see
    :meth:`SharedUseTracker.summed_in`), each addition rounds to that dtype, the partial sums as
    large as the uses: the error grows like sqrt(uses) x eps x ``sqrt(Σ‖use‖²)``, relative to
    ``‖grad‖`` (measured 0.1-0.2 of this bound; ALBERT at 48 bf16 depths: 1.7e-2). Without
    ``grad_norm`` (per-module statistics), ``sqrt(Σ‖use‖²)`` stands for it.
    """
    if summed_in is None or not use_norms:
        return UNSEEN_USE_TOLERANCE
    size = math.sqrt(math.fsum(n * n for n in use_norms))
    scale = size / grad_norm if grad_norm is not None and grad_norm > 0 and math.isfinite(grad_norm) else 1.0
    return max(UNSEEN_USE_TOLERANCE, math.sqrt(len(use_norms)) * torch.finfo(summed_in).eps * scale)


def _tensors(obj: Any) -> list[Tensor]:
    if isinstance(obj, Tensor):
        return [obj]
    if isinstance(obj, list | tuple):
        return [t for item in obj for t in _tensors(item)]
    return []


def _walk(
    roots: list[Node], tracked: set[int]
) -> tuple[dict[Node, list[tuple[Node, int]]], dict[Node, int], dict[Node, str]]:
    """Every edge below ``roots`` as ``{node: [(consumer, slot), ...]}``, the accumulators of the
    ``tracked`` parameters (``{AccumulateGrad node: id(parameter)}``), and the opaque nodes (``{node: kind}``)."""
    incoming: dict[Node, list[tuple[Node, int]]] = {}
    accumulators: dict[Node, int] = {}
    opaque: dict[Node, str] = {}
    seen = set(roots)
    stack = list(roots)
    while stack:
        node = stack.pop()
        for slot, (nxt, _) in enumerate(node.next_functions):
            if nxt is None:
                continue
            incoming.setdefault(nxt, []).append((node, slot))
            if nxt in seen:
                continue
            seen.add(nxt)
            kind = type(nxt).__name__
            if kind == "AccumulateGrad":  # a leaf: its `variable` is the parameter
                pid = id(nxt.variable)
                if pid in tracked:
                    accumulators[nxt] = pid
                continue
            if kind in _OPAQUE_NODES:
                opaque[nxt] = kind
            stack.append(nxt)
    for root in roots:
        if type(root).__name__ in _OPAQUE_NODES:
            opaque[root] = type(root).__name__
    return incoming, accumulators, opaque


def _split(
    node: Node, slot: int, chain: tuple[tuple[Node, int], ...], incoming: dict[Node, list[tuple[Node, int]]]
) -> list[tuple[Node, int, tuple[tuple[Node, int], ...], int]]:
    """The uses behind edge (``node``, ``slot``): look up through single-output nodes for a branching.

    Returns ``(hook node, slot, chain, sequence number)`` per use.
    """
    climb: list[tuple[Node, int]] = [(node, slot)]
    current = node
    while _pass_through(current):
        parents = incoming.get(current, [])
        if len(parents) >= 2:  # the gradient path branches here: one use per branch
            through = tuple(reversed(climb)) + chain
            return [use for parent, pslot in parents for use in _split(parent, pslot, through, incoming)]
        if len(parents) != 1:
            break
        current, pslot = parents[0]
        climb.append((current, pslot))
    return [(node, slot, chain, node._sequence_nr())]


# Nodes that compute a value of their one input alone, save no tensor, and have one output: casts,
# views, transposes, negation. On a chain up from a parameter's accumulator they compute a
# value of the parameter alone, so a branching above them is several uses of that one value, and
# applying them maps a branch's gradient down to the parameter. A node that also reads an
# activation (mm, embedding, cat, ...) is a use itself: its output branching is not the parameter's.
_PASS_THROUGH_NODES = frozenset(
    {
        "ToCopyBackward0",
        "TBackward0",
        "TransposeBackward0",
        "TransposeBackward1",
        "PermuteBackward0",
        "ViewBackward0",
        "UnsafeViewBackward0",
        "ReshapeAliasBackward0",
        "UnsqueezeBackward0",
        "SqueezeBackward0",
        "SqueezeBackward1",
        "SqueezeBackward2",
        "SqueezeBackward3",
        "SqueezeBackward4",
        "AliasBackward0",
        "CloneBackward0",
        "NegBackward0",
        "MulBackward1",  # by a Python scalar
        "DivBackward1",
        "AddBackward1",
        "SubBackward1",
    }
)


def _pass_through(node: Node) -> bool:
    """Whether ``node`` computes a value of the parameter alone (a cast, view, transpose, a negation)."""
    return type(node).__name__ in _PASS_THROUGH_NODES and sum(nxt is not None for nxt, _ in node.next_functions) == 1


def _buffer_like(grad: Tensor, param: Tensor) -> Tensor:
    """A copy of ``grad`` to accumulate uses in: fp32 for low precision, the parameter's dtype otherwise."""
    dtype = param.dtype if param.dtype in (torch.float64, torch.complex64, torch.complex128) else torch.float32
    if grad.is_sparse:
        grad = grad.to_dense()
    return grad.detach().to(dtype, copy=True)


def _held(grad: Tensor, param: Tensor) -> Tensor:
    """The first contribution of a use, as autograd made it (read-only for us), densified if sparse.

    The very tensor object, not a ``detach()`` alias: AccumulateGrad counts references to that
    object before stealing it for ``.grad``; an alias would not count, and ``.grad`` would then
    share our memory (and a later ``unscale_`` or micro-batch would rewrite it).
    """
    return grad.to_dense() if grad.is_sparse else grad


def _sequential_parent(paths: list[str], modules_at: dict[str, nn.Module]) -> int | None:
    """The ``nn.Sequential`` (with Sequential's own forward) holding every path of a module, if any."""
    parents = {path.rpartition(".")[0] for path in paths}
    if len(parents) != 1:
        return None
    parent = modules_at.get(parents.pop())
    if isinstance(parent, nn.Sequential) and type(parent).forward is nn.Sequential.forward:
        return id(parent)
    return None
