"""What the monitor says once per fit: the uses of a shared parameter that do not add up, and why.

A value that cannot be computed right is not written, and one warning says why (never a silent
wrong number). :class:`FitWarnings` keeps which warnings a fit has given.
"""

from __future__ import annotations

import fnmatch
import math
from collections.abc import Mapping

import torch

from param_monitor import distributed, tags
from param_monitor.parameters import parameter_aliases
from param_monitor.sharing import unseen_use_tolerance
from param_monitor.stats import StatsLayout
from param_monitor.watcher import ParameterWatcher


class FitWarnings:
    """The once-per-fit warnings (rank 0 only)."""

    def __init__(self) -> None:
        self.given: set[str] = set()

    def once(self, key: str, message: str) -> None:
        if key not in self.given:
            self.given.add(key)
            distributed.warn_rank_zero(message)

    def unmatched_includes(self, module: torch.nn.Module, include: list[str] | None) -> None:
        names = [n for n, _ in module.named_parameters()]
        unmatched = [p for p in include or [] if not any(fnmatch.fnmatchcase(n, p) for n in names)]
        if unmatched:
            example = f"names such as {names[0]!r}" if names else "names, and the model has none"
            self.once(
                "include",
                f"`ParameterMonitor`: `include` patterns match no parameter: {', '.join(map(repr, unmatched))} "
                f"(`fnmatch` globs over {example}).",
            )

    def unattributed(self, watcher: ParameterWatcher) -> None:
        """Before a logging step's statistics: uses the capture cannot have seen."""
        tracker = watcher.tracker
        if tracker is None or not tracker.active:
            return
        missing = watcher.capture_problem()
        if missing is not None:
            self.once("not-walked", f"`ParameterMonitor`: {missing}")
        if not tracker.has_seen_forward:
            return
        by_cause: dict[str, list[str]] = {}
        for name, why in tracker.unattributed().items():
            by_cause.setdefault(why, []).append(name)
        for why, names in by_cause.items():  # one warning per cause, listing its parameters
            self.once(
                f"unattributed:{why}",
                f"`ParameterMonitor`: the uses of {', '.join(f'`{n}`' for n in names)} cannot all be seen ({why}): "
                "their per-use contributions (`shared_grad*`) are not logged.",
            )

    def uncaptured(self, watcher: ParameterWatcher, layout: StatsLayout) -> None:
        """A parameter registered under several names (tied) has a gradient but no use was captured:
        its gradient came through a backward pass that was not announced."""
        tracker = watcher.tracker
        if tracker is None or not tracker.walked:
            return  # never walked: `unattributed` said so
        tied = {name for name, aliases in parameter_aliases(watcher.module).items() if aliases}
        seen = {name for name, _ in layout.shared} | set(tracker.unattributed())
        for name in sorted(tied & set(layout.grad_names) - seen):
            self.once(
                f"uncaptured:{name}",
                f"`ParameterMonitor`: shared parameter `{name}` has a gradient but none of its uses was captured: "
                "the backward pass that made it was not announced (`before_backward(loss)`, or `s.backward(loss)` "
                "with `PlainMonitor`), so its `shared_grad*` tags are not written.",
            )

    def partial_uses(
        self,
        metrics: dict[str, float],
        layout: StatsLayout,
        accumulated_before: bool,
        summed_in: Mapping[str, torch.dtype] | None = None,
    ) -> dict[str, float]:
        """Per-use values whose sites do not add up to the gradient: say why, once; drop what is wrong.

        ``summed_in``: the parameters whose uses autograd summed in low precision before ``.grad``
        (``SharedUseTracker.summed_in()``): their uses may miss ``.grad`` by that dtype's rounding.
        """
        summed_in = summed_in or {}
        for name, sites in layout.shared:
            error = metrics.get(tags.shared_grad_error(name), 0.0)
            # a NaN/inf gradient makes the error meaningless: the non-finite report covers it; uses that
            # autograd summed in bf16/fp16 (autocast's cast cache) miss `.grad` by that dtype's rounding
            norms = [metrics.get(tags.shared_grad(name, site), 0.0) for site in sites]
            tolerance = unseen_use_tolerance(norms, metrics.get(tags.grad_norm(name)), summed_in.get(name))
            if not (math.isfinite(error) and error > tolerance):
                continue
            if accumulated_before:
                # manual optimization accumulated earlier batches into `.grad`: the uses of the
                # logging batch are only part of it, and the earlier batches were not tracked
                self.once(
                    "manual-accumulation",
                    "`ParameterMonitor`: manual optimization accumulated gradients over several batches before "
                    "`optimizer.step()`; the per-use contributions are tracked on the logging batch only, so they "
                    "are part of the gradient: `shared_grad*` tags are not written on such steps.",
                )
                return {k: v for k, v in metrics.items() if not k.startswith(tags.SHARED_GRAD)}
            rounding = (
                f" beyond the {summed_in[name]} rounding of autocast's weight-cast cache, which summed its uses"
                if name in summed_in
                else ""
            )
            self.once(
                f"unseen:{name}",
                f"`ParameterMonitor`: the uses seen of shared parameter `{name}` add up to its gradient only "
                f"within {error:.2g} (relative){rounding}: part of its gradient did not come through the backward "
                "passes the monitor walked (a gradient written or accumulated by hand, or a backward pass that "
                "was not announced: run outside Lightning's `backward`, or without `s.backward` in a plain loop).",
            )
        return metrics

    def nothing_logged(self, every_n: int, steps_run: int) -> None:
        """The fit ended before its first logging step."""
        self.once(
            "nothing-logged",
            f"`ParameterMonitor` logged no step: the fit ran {steps_run} optimizer step(s) and logs every {every_n} "
            f"(`log_every_n_steps={every_n}`: the first logging step is step {every_n - 1}). Pass "
            f"`log_every_n_steps` of at most {steps_run} (to `ParameterMonitor` or the Trainer) to see this run's "
            "statistics.",
        )
