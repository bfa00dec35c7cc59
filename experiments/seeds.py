"""Training one configuration over several seeds, and summarizing the spread of its accuracy."""

from __future__ import annotations

import logging
import statistics
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from experiments.cli import QUIET_TRAINER_ARGS, RunResult, train

#: A seed whose final val_acc is below this has collapsed (dead ReLUs: 8 hidden units leave little slack).
COLLAPSE_THRESHOLD = 0.3


@dataclass(frozen=True)
class Spread:
    """Median and spread of one metric over seeds."""

    n: int
    median: float
    minimum: float
    maximum: float
    q1: float
    q3: float
    collapsed: int

    @property
    def iqr(self) -> float:
        """Interquartile range, ``q3 - q1``."""
        return self.q3 - self.q1

    def line(self, label: str) -> str:
        """One printable summary line."""
        return (
            f"{label}: median {self.median:.4f}  min {self.minimum:.4f}  max {self.maximum:.4f}  "
            f"IQR {self.iqr:.4f} [{self.q1:.4f}, {self.q3:.4f}]  collapsed {self.collapsed}/{self.n}"
        )


def spread(values: Sequence[float], collapse_below: float = COLLAPSE_THRESHOLD) -> Spread:
    """Median, min, max, quartiles (inclusive method) and collapse count of ``values``.

    >>> s = spread([0.1, 0.8, 0.82, 0.84])
    >>> round(s.median, 2), s.minimum, s.maximum, s.collapsed
    (0.81, 0.1, 0.84, 1)
    """
    if not values:
        raise ValueError("no values")
    q1, _, q3 = statistics.quantiles(values, n=4, method="inclusive") if len(values) > 1 else [values[0]] * 3
    return Spread(
        n=len(values),
        median=statistics.median(values),
        minimum=min(values),
        maximum=max(values),
        q1=q1,
        q3=q3,
        collapsed=sum(v < collapse_below for v in values),
    )


def quiet_lightning() -> None:
    """Silence Lightning's per-run banner lines ("Seed set to", "GPU available", ...) for repeated runs."""
    for name in ("lightning.pytorch", "lightning.fabric", "lightning"):
        logging.getLogger(name).setLevel(logging.WARNING)


def train_seed(args: Sequence[str], seed: int, quiet: bool = True) -> RunResult:
    """One fit with ``--seed_everything seed``; ``quiet`` turns logger, monitor, bar and checkpoints off.

    ``args`` come after the quiet overrides, so they can turn any of them back on.
    """
    prefix = list(QUIET_TRAINER_ARGS) if quiet else []
    return train([*prefix, f"--seed_everything={seed}", *args], save_config=not quiet)


def train_seeds(
    args: Sequence[str],
    seeds: Sequence[int],
    on_result: Callable[[int, RunResult], None] | None = None,
) -> list[float]:
    """Final val_acc of one quiet fit per seed (``on_result`` sees each as it finishes)."""
    accs = []
    for seed in seeds:
        result = train_seed(args, seed)
        accs.append(result.val_acc)
        if on_result is not None:
            on_result(seed, result)
    return accs
