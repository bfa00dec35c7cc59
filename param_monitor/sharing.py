"""Per-use gradient contributions of shared parameters, without changing the model.

Autograd sums the gradients of every use of a tensor into one ``.grad``; the uses are gone by
the time an optimizer sees it. To see them, while tracking is on, each module that owns
parameters gets a forward pre-hook that puts a fresh *view* of each of its parameters in its
``_parameters`` slot for the duration of that call (and a forward hook, always called, that puts
the parameter back). A view has the same values and passes its gradient straight to the
parameter, so outputs, gradients and ``state_dict`` keys are unchanged; but a hook on the view
sees exactly the gradient of that one use. Only uses of *shared* parameters are kept, in one
fp32 buffer per use (summed over micro-batches); nothing else is allocated.

A parameter is shared when it is registered under several names, or when a module that owns it
runs more than once in a forward pass. Once a forward pass has been counted, only parameters that
were shared in it get views; a module that starts running twice is picked up from the next
forward pass on. Sites are named by module path:

- a module called once: its (first) path (``lm_head``, ``transformer.wte``);
- a module registered at k positions of one ``nn.Sequential`` and called k times: its i-th call
  is its i-th path (``net.3``, ``net.6``): a Sequential runs its entries in that order;
- otherwise ``{path}#{i}``, i counted from 0 in call order.

A use made outside any owning module's forward (``x @ self.wte.weight.T`` in a parent) reaches
the parameter directly and is not seen: the monitor's ``shared_grad_error`` then shows the gap.

>>> import torch, torch.nn as nn
>>> shared = nn.Linear(1, 1, bias=False)
>>> _ = nn.init.constant_(shared.weight, 3.0)
>>> net = nn.Sequential(shared, shared)
>>> tracker = SharedUseTracker(net)
>>> tracker.start()
>>> tracker.begin_forward()
>>> net(torch.ones(1, 1)).sum().backward()
>>> tracker.stop()
>>> {name: {site: t.item() for site, t in sites.items()} for name, sites in tracker.contributions().items()}
{'0.weight': {'0': 3.0, '1': 3.0}}
>>> net[0].weight.grad.item()
6.0
"""

from __future__ import annotations

from collections.abc import Callable
from functools import partial

import torch
import torch.nn as nn
from torch import Tensor
from torch.utils.hooks import RemovableHandle

from param_monitor.table import parameter_aliases


class SharedUseTracker:
    """Records, for each shared parameter, the gradient contribution of each use (call site)."""

    def __init__(self, root: nn.Module, param_filter: Callable[[str], bool] | None = None) -> None:
        self._root = root
        aliases = parameter_aliases(root)
        self._name_of: dict[int, str] = {}
        self._statically_shared: set[int] = set()
        for name, param in root.named_parameters():
            if param_filter is not None and not param_filter(name):
                continue
            self._name_of[id(param)] = name
            if aliases.get(name):
                self._statically_shared.add(id(param))
        self._paths: dict[int, list[str]] = {}
        modules_at: dict[str, nn.Module] = {}
        for path, module in root.named_modules(remove_duplicate=False):
            self._paths.setdefault(id(module), []).append(path or "<root>")
            modules_at[path] = module
        self._in_call_order = {mid for mid, paths in self._paths.items() if _called_in_path_order(paths, modules_at)}
        # modules that own a tracked parameter directly, and which ones (trainable or not: a
        # parameter may be frozen now and unfrozen later, e.g. by BackboneFinetuning)
        self._owned: list[tuple[nn.Module, list[str]]] = []
        self._owners_of: dict[int, list[int]] = {}
        for module in _unique_modules(root):
            local = [
                local_name for local_name, p in module._parameters.items() if p is not None and id(p) in self._name_of
            ]
            if local:
                self._owned.append((module, local))
                for local_name in local:
                    self._owners_of.setdefault(id(module._parameters[local_name]), []).append(id(module))
        self._handles: list[RemovableHandle] = []
        self._calls: dict[int, int] = {}
        self._last_calls: dict[int, int] = {}
        self._call_order: dict[tuple[int, int], int] = {}  # (module, k) -> position in the forward
        self._site_order: dict[str, int] = {}
        self._capture = False
        self._buffers: dict[str, dict[str, Tensor]] = {}

    # -- life cycle -------------------------------------------------------------------------
    @property
    def active(self) -> bool:
        return bool(self._handles)

    def start(self, capture: bool = True) -> None:
        """Install the hooks. ``capture=False`` only counts calls (to name call sites)."""
        if self.active:
            return
        self._capture = capture
        self._buffers = {}
        self._site_order = {}
        self._calls = {}
        self._call_order = {}
        for module, local in self._owned:
            pre = partial(self._before_call, local_names=local)
            post = partial(self._after_call, local_names=local)
            self._handles.append(module.register_forward_pre_hook(pre))
            self._handles.append(module.register_forward_hook(post, always_call=True))

    def begin_forward(self) -> None:
        """Call before each forward pass (micro-batch): call indices restart from 0."""
        if self._calls:
            self._last_calls = self._calls
        self._calls = {}
        self._call_order = {}

    def stop(self) -> None:
        """Remove every hook; buffers stay readable until the next :meth:`start`."""
        for handle in self._handles:
            handle.remove()
        self._handles = []
        if self._calls:
            self._last_calls = self._calls
        self._calls = {}

    @property
    def has_seen_forward(self) -> bool:
        """Whether a forward pass ran under the hooks (so call sites are known)."""
        return bool(self._calls or self._last_calls)

    def discard(self, names: object) -> None:
        """Forget the buffers of ``names`` (consumed by the statistics of one optimizer's step)."""
        for name in list(names):  # type: ignore[call-overload]
            self._buffers.pop(name, None)

    def reset(self) -> None:
        """Free the buffers."""
        self._buffers = {}

    # -- results ------------------------------------------------------------------------------
    def contributions(self) -> dict[str, dict[str, Tensor]]:
        """``{parameter name: {site: fp32 contribution}}`` for the shared parameters seen, sites in call order."""
        order = self._site_order
        return {
            name: dict(sorted(sites.items(), key=lambda item: order.get(item[0], 0)))
            for name, sites in self._buffers.items()
        }

    def call_sites(self) -> dict[str, list[str]]:
        """Sites of every tracked parameter in the last forward pass seen (for the table)."""
        calls = self._calls or self._last_calls
        sites: dict[str, list[str]] = {}
        for pid, name in self._name_of.items():
            for mid in self._owners_of.get(pid, []):
                n = calls.get(mid, 0)
                sites.setdefault(name, []).extend(self._site(mid, k, n) for k in range(n))
        return sites

    def shared_names(self) -> list[str]:
        """Names of the parameters that were shared in the last forward pass seen."""
        calls = self._calls or self._last_calls
        return [name for pid, name in self._name_of.items() if self._is_shared(pid, calls)]

    # -- hooks --------------------------------------------------------------------------------
    def _before_call(self, module: nn.Module, args: object, local_names: list[str]) -> None:
        if not torch.is_grad_enabled() or torch._C._current_graph_task_id() != -1:
            # no graph, or inside backward (activation checkpointing re-running a forward: with
            # non-reentrant checkpointing the original call's views still receive the gradient)
            return
        mid = id(module)
        k = self._calls.get(mid, 0)
        self._calls[mid] = k + 1
        self._call_order[(mid, k)] = len(self._call_order)
        if not self._capture:
            return
        # Swap only what can be shared, judged by the last counted forward (when there is one):
        # a view and its grad hook per parameter cost ~0.3x the bandwidth floor on a 76-tensor LM.
        known = self._last_calls
        for local_name in local_names:
            param = module._parameters[local_name]
            if not isinstance(param, nn.Parameter) or not param.requires_grad:  # swapped (re-entrant) or frozen
                continue
            if known and not self._is_shared(id(param), known):
                continue
            view = param.view_as(param)
            view.register_hook(partial(self._on_use_grad, pid=id(param), mid=mid, k=k))
            view._param_monitor_original = param  # type: ignore[attr-defined]
            module._parameters[local_name] = view

    def _after_call(self, module: nn.Module, args: object, output: object, local_names: list[str]) -> None:
        for local_name in local_names:
            original = getattr(module._parameters[local_name], "_param_monitor_original", None)
            if original is not None:
                module._parameters[local_name] = original

    def _on_use_grad(self, grad: Tensor, pid: int, mid: int, k: int) -> None:
        # runs in backward, after the forward pass: the call counts are complete.
        if not self._is_shared(pid, self._calls):
            return
        name = self._name_of[pid]
        site = self._site(mid, k, self._calls.get(mid, 0))
        sites = self._buffers.setdefault(name, {})
        if site in sites:
            sites[site].add_(grad)
        else:
            sites[site] = grad.detach().to(torch.float32, copy=True)
            self._site_order.setdefault(site, self._call_order.get((mid, k), 0))

    def _is_shared(self, pid: int, calls: dict[int, int]) -> bool:
        if pid in self._statically_shared:
            return True
        return sum(calls.get(mid, 0) for mid in self._owners_of.get(pid, [])) > 1

    def _site(self, mid: int, k: int, n_calls: int) -> str:
        paths = self._paths[mid]
        if n_calls == 1:
            return paths[0]
        if len(paths) == n_calls and mid in self._in_call_order:
            return paths[k]
        return f"{paths[0]}#{k}"


def _called_in_path_order(paths: list[str], modules_at: dict[str, nn.Module]) -> bool:
    """Whether the k-th call of a module registered under ``paths`` is known to come from its k-th path.

    True for the ``nn.Sequential`` case (all paths are entries of one Sequential, which runs its
    entries in registration order). A module under several attribute names (``self.a = self.b =
    layer``) may be called in any order: its sites are then ``{path}#k``.
    """
    if len(paths) < 2:
        return False
    parents = {path.rpartition(".")[0] for path in paths}
    return len(parents) == 1 and isinstance(modules_at.get(parents.pop()), nn.Sequential)


def _unique_modules(root: nn.Module) -> list[nn.Module]:
    return [module for _, module in root.named_modules()]
