"""Does the output side dominate a tied embedding's gradient early in training? A small GPT, measured.

    python -m experiments.tied_lm                                   # configs/tied_lm.yaml's defaults: 3 seeds
    python experiments/tied_lm.py                                   # the same, run as a file
    python -m experiments.tied_lm --config configs/tied_lm_quick.yaml   # seconds (the tests' run)
    python -m experiments.tied_lm --seeds 0 1 2 3 4 --steps 1000 --out-dir lightning_logs/tied_lm_long

A GPT-style language model (``TinyGPT``: token + position embeddings, pre-LayerNorm blocks of causal
self-attention and an MLP, a final LayerNorm) whose output projection reads the token embedding's
matrix (``tied``), beside its untied twin (same initial weights, the output matrix a separate copy of
the embedding's), trained with AdamW on the running interpreter's standard-library sources with a
byte-level BPE tokenizer trained on them (``experiments.corpus``; nothing to download).

``ParameterMonitor`` logs, for the tied model, the two uses of ``model.wte.weight``:
``shared_grad/model.wte.weight/model.wte`` (the input embedding's gradient) and
``shared_grad/model.wte.weight/model.head`` (the output projection's), and their shares
``shared_grad_share/...``; for the twin, ``grad_norm/model.wte.weight`` and ``grad_norm/model.head.weight``.
Read back from the event files, they give the ratio ``‖g_out‖ / ‖g_in‖`` over steps per seed:
``tied_lm.png`` and ``tied_lm_table.md`` in ``--out-dir`` (docs/tied_lm.md shows a run of them).

Configuration: YAML files (``--config``, later ones override earlier ones) whose keys are the fields
of :class:`Config`; the command-line flags below override both.
"""

from __future__ import annotations

import argparse
import math
import statistics
import sys
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

import torch
import yaml
from lightning.pytorch import LightningModule, Trainer, seed_everything
from lightning.pytorch.loggers import TensorBoardLogger
from torch import Tensor, nn
from torch.nn import functional as F
from torch.utils.data import DataLoader, Dataset

if __package__ in (None, ""):  # run as a file (`python experiments/tied_lm.py`): the root first, as `-m` does
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from experiments.corpus import BytePairEncoding, read_corpus  # noqa: E402
from param_monitor import ParameterMonitor  # noqa: E402

VARIANTS = ("tied", "untied")
EMBEDDING = "model.wte.weight"
HEAD = "model.head.weight"
IN_SITE, OUT_SITE = "model.wte", "model.head"


@dataclass
class Config:
    """Every setting of a run (the YAML keys)."""

    corpus_dir: str | None = None  # a directory of text files; None: the standard library's sources
    corpus_suffixes: list[str] = field(default_factory=lambda: [".py"])
    corpus_bytes: int = 2_000_000
    vocab_size: int = 4096
    val_fraction: float = 0.05  # the corpus's last tokens, never trained on
    seq_len: int = 64
    d_model: int = 128
    n_layer: int = 2
    n_head: int = 4
    batch_size: int = 32
    steps: int = 500
    lr: float = 3e-3
    warmup_steps: int = 50  # linear warm-up, then cosine decay to 10% of lr
    weight_decay: float = 0.01
    log_every: int = 1  # ParameterMonitor's and train_loss's logging interval (optimizer steps)
    early_steps: int = 50  # "early in training": logged steps up to this one
    val_batches: int = 20
    seeds: list[int] = field(default_factory=lambda: [0, 1, 2])
    variants: list[str] = field(default_factory=lambda: list(VARIANTS))
    threads: int = 1  # torch intra-op threads (a busy 2-core machine: extra threads only spin)
    out_dir: str = "lightning_logs/tied_lm"
    monitor: dict[str, Any] = field(default_factory=dict)  # extra ParameterMonitor arguments

    def __post_init__(self) -> None:
        wrong = [v for v in self.variants if v not in VARIANTS]
        if wrong:
            raise ValueError(f"variants must be among {list(VARIANTS)}, got {wrong}")
        if self.d_model % self.n_head:
            raise ValueError(f"d_model ({self.d_model}) must be a multiple of n_head ({self.n_head})")


def load_config(paths: Sequence[str | Path], overrides: dict[str, Any] | None = None) -> Config:
    """A :class:`Config` from YAML files (later ones win) and ``overrides``; unknown keys are refused."""
    values: dict[str, Any] = {}
    for path in paths:
        values.update(yaml.safe_load(Path(path).read_text()) or {})
    values.update({k: v for k, v in (overrides or {}).items() if v is not None})
    known = {f.name for f in fields(Config)}
    unknown = sorted(set(values) - known)
    if unknown:
        raise ValueError(f"unknown config keys {unknown}; allowed: {sorted(known)}")
    return Config(**values)


# -- the model ------------------------------------------------------------------------------------
class Block(nn.Module):
    """Pre-LayerNorm transformer block: causal self-attention, then a 4x GELU MLP."""

    def __init__(self, d_model: int, n_head: int) -> None:
        super().__init__()
        self.n_head = n_head
        self.ln1 = nn.LayerNorm(d_model)
        self.qkv = nn.Linear(d_model, 3 * d_model)
        self.proj = nn.Linear(d_model, d_model)
        self.ln2 = nn.LayerNorm(d_model)
        self.fc = nn.Linear(d_model, 4 * d_model)
        self.act = nn.GELU()
        self.out = nn.Linear(4 * d_model, d_model)

    def forward(self, x: Tensor) -> Tensor:
        b, t, d = x.shape
        q, k, v = self.qkv(self.ln1(x)).split(d, dim=2)
        q, k, v = (z.view(b, t, self.n_head, d // self.n_head).transpose(1, 2) for z in (q, k, v))
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        x = x + self.proj(y.transpose(1, 2).reshape(b, t, d))
        return x + self.out(self.act(self.fc(self.ln2(x))))


class OutputHead(nn.Module):
    """Logits ``x @ W^T``: with ``weight`` given (tied: the embedding's matrix) it owns no parameter.

    A module of its own so that the tied matrix's output use has a name (``model.head``).
    """

    def __init__(self, vocab_size: int, d_model: int, own_weight: bool) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.empty(vocab_size, d_model)) if own_weight else None

    def forward(self, x: Tensor, weight: Tensor | None = None) -> Tensor:
        w = self.weight if weight is None else weight
        if w is None:
            raise ValueError("a tied OutputHead needs the embedding's weight")
        return F.linear(x, w)


class TinyGPT(nn.Module):
    """A GPT-2-style language model; ``tied``: the output projection is the token embedding's matrix."""

    def __init__(self, vocab_size: int, seq_len: int, d_model: int, n_layer: int, n_head: int, tied: bool) -> None:
        super().__init__()
        self.tied = tied
        self.wte = nn.Embedding(vocab_size, d_model)
        self.wpe = nn.Embedding(seq_len, d_model)
        self.blocks = nn.ModuleList(Block(d_model, n_head) for _ in range(n_layer))
        self.ln_f = nn.LayerNorm(d_model)
        self.head = OutputHead(vocab_size, d_model, own_weight=not tied)
        self.reset_parameters()

    @torch.no_grad()
    def reset_parameters(self) -> None:
        """GPT-2's initialization: N(0, 0.02) matrices and embeddings, zero biases, unit LayerNorm gains."""
        for module in self.modules():
            if isinstance(module, nn.Linear | nn.Embedding):
                nn.init.normal_(module.weight, std=0.02)
            if isinstance(module, nn.Linear) and module.bias is not None:
                nn.init.zeros_(module.bias)
        if self.head.weight is not None:
            self.head.weight.copy_(self.wte.weight)

    def forward(self, idx: Tensor) -> Tensor:
        pos = torch.arange(idx.shape[1], device=idx.device)
        x = self.wte(idx) + self.wpe(pos)
        for block in self.blocks:
            x = block(x)
        return self.head(self.ln_f(x), self.wte.weight if self.tied else None)


def make_model(cfg: Config, vocab_size: int, tied: bool, seed: int) -> TinyGPT:
    """The model of ``seed``; the untied twin starts from the very same weights (its head a copy of wte)."""
    torch.manual_seed(seed)
    reference = TinyGPT(vocab_size, cfg.seq_len, cfg.d_model, cfg.n_layer, cfg.n_head, tied=True)
    if tied:
        return reference
    twin = TinyGPT(vocab_size, cfg.seq_len, cfg.d_model, cfg.n_layer, cfg.n_head, tied=False)
    twin.load_state_dict(reference.state_dict(), strict=False)
    with torch.no_grad():
        twin.head.weight.copy_(reference.wte.weight)
    return twin


# -- data -----------------------------------------------------------------------------------------
class RandomWindows(Dataset):
    """``count`` windows of ``seq_len + 1`` tokens at starts drawn from ``seed`` (the same for both variants)."""

    def __init__(self, tokens: Tensor, seq_len: int, count: int, seed: int) -> None:
        self.tokens, self.seq_len = tokens, seq_len
        generator = torch.Generator().manual_seed(seed)
        self.starts = torch.randint(0, len(tokens) - seq_len - 1, (count,), generator=generator)

    def __len__(self) -> int:
        return len(self.starts)

    def __getitem__(self, i: int) -> tuple[Tensor, Tensor]:
        window = self.tokens[self.starts[i] : self.starts[i] + self.seq_len + 1]
        return window[:-1], window[1:]


def tokenize(cfg: Config, cache_dir: Path) -> tuple[Tensor, Tensor, int]:
    """Train and val token ids and the vocabulary size; the tokenizer is trained once per ``cache_dir``."""
    text = read_corpus(Path(cfg.corpus_dir) if cfg.corpus_dir else None, cfg.corpus_bytes, cfg.corpus_suffixes)
    path = cache_dir / f"bpe_{cfg.vocab_size}.json"
    if path.exists():
        bpe = BytePairEncoding.load(path)
    else:
        bpe = BytePairEncoding.train(text, cfg.vocab_size)
        cache_dir.mkdir(parents=True, exist_ok=True)
        bpe.save(path)
    ids = torch.tensor(bpe.encode(text), dtype=torch.long)
    n_val = max(int(len(ids) * cfg.val_fraction), cfg.seq_len + 2)
    return ids[:-n_val], ids[-n_val:], bpe.vocab_size


# -- training -------------------------------------------------------------------------------------
class LanguageModel(LightningModule):
    """Next-token cross-entropy on ``model``; AdamW with linear warm-up and cosine decay."""

    def __init__(self, model: TinyGPT, cfg: Config) -> None:
        super().__init__()
        self.model = model
        self.cfg = cfg

    def training_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> Tensor:
        x, y = batch
        logits = self.model(x)
        loss = F.cross_entropy(logits.flatten(0, 1), y.flatten())
        self.log("train_loss", loss)
        return loss

    def configure_optimizers(self) -> dict[str, Any]:
        cfg = self.cfg
        optimizer = torch.optim.AdamW(self.parameters(), lr=cfg.lr, betas=(0.9, 0.95), weight_decay=cfg.weight_decay)

        def factor(step: int) -> float:
            if step < cfg.warmup_steps:
                return (step + 1) / cfg.warmup_steps
            progress = (step - cfg.warmup_steps) / max(1, cfg.steps - cfg.warmup_steps)
            return 0.1 + 0.45 * (1 + math.cos(math.pi * min(progress, 1.0)))

        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, factor)
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}


@torch.no_grad()
def validation_loss(model: nn.Module, tokens: Tensor, seq_len: int, batches: int, batch_size: int) -> float:
    """Mean next-token cross-entropy over consecutive windows of the held-out tokens."""
    model.eval()
    n = min(batches * batch_size, (len(tokens) - 1) // seq_len)
    x = tokens[: n * seq_len].view(n, seq_len)
    y = tokens[1 : n * seq_len + 1].view(n, seq_len)
    pairs = zip(x.split(batch_size), y.split(batch_size), strict=True)
    losses = [F.cross_entropy(model(xb).flatten(0, 1), yb.flatten()).item() for xb, yb in pairs]
    model.train()
    return statistics.fmean(losses)


@dataclass
class RunResult:
    variant: str
    seed: int
    log_dir: Path
    val_loss: float
    seconds: float


def train_one(cfg: Config, variant: str, seed: int, train_ids: Tensor, val_ids: Tensor, vocab: int) -> RunResult:
    """One run, logged to ``{out_dir}/{variant}/seed{seed}``."""
    start = time.perf_counter()
    seed_everything(seed, verbose=False)
    model = make_model(cfg, vocab, tied=variant == "tied", seed=seed)
    data = RandomWindows(train_ids, cfg.seq_len, cfg.steps * cfg.batch_size, seed)
    logger = TensorBoardLogger(cfg.out_dir, name=variant, version=f"seed{seed}", default_hp_metric=False)
    trainer = Trainer(
        accelerator="cpu",
        devices=1,
        max_steps=cfg.steps,
        log_every_n_steps=cfg.log_every,
        logger=logger,
        callbacks=[ParameterMonitor(log_every_n_steps=cfg.log_every, **cfg.monitor)],
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
    )
    trainer.fit(LanguageModel(model, cfg), DataLoader(data, batch_size=cfg.batch_size))
    val = validation_loss(model, val_ids, cfg.seq_len, cfg.val_batches, cfg.batch_size)
    logger.experiment.add_scalar("val_loss", val, cfg.steps)
    logger.experiment.flush()
    return RunResult(variant, seed, Path(logger.log_dir), val, time.perf_counter() - start)


# -- reading the runs back ------------------------------------------------------------------------
def read_scalars(log_dir: Path) -> dict[str, dict[int, float]]:
    """``{tag: {step: value}}`` from a run's event files (TensorBoard's own reader)."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(log_dir), size_guidance={"scalars": 0})
    events.Reload()
    return {tag: {e.step: e.value for e in events.Scalars(tag)} for tag in events.Tags()["scalars"]}


@dataclass
class Curves:
    """One run's per-step gradient norms of the embedding's two uses (tied) or two matrices (untied)."""

    variant: str
    seed: int
    steps: list[int]
    g_in: list[float]
    g_out: list[float]
    share_out: list[float]  # tied: shared_grad_share of the output use; untied: empty
    loss_steps: list[int]
    loss: list[float]
    val_loss: float

    @property
    def ratio(self) -> list[float]:
        return [o / i if i > 0 else math.inf for i, o in zip(self.g_in, self.g_out, strict=True)]

    @property
    def squared_fraction(self) -> list[float]:
        """‖g_out‖² / (‖g_in‖² + ‖g_out‖²): the output side's part of the two uses' squared norms."""
        return [o * o / (i * i + o * o) for i, o in zip(self.g_in, self.g_out, strict=True)]


def read_curves(run: RunResult) -> Curves:
    scalars = read_scalars(run.log_dir)
    if run.variant == "tied":
        g_in = scalars[f"shared_grad/{EMBEDDING}/{IN_SITE}"]
        g_out = scalars[f"shared_grad/{EMBEDDING}/{OUT_SITE}"]
        share = scalars[f"shared_grad_share/{EMBEDDING}/{OUT_SITE}"]
    else:
        g_in, g_out, share = scalars[f"grad_norm/{EMBEDDING}"], scalars[f"grad_norm/{HEAD}"], {}
    steps = sorted(set(g_in) & set(g_out))
    loss = scalars.get("train_loss", {})
    return Curves(
        run.variant,
        run.seed,
        steps,
        [g_in[s] for s in steps],
        [g_out[s] for s in steps],
        [share[s] for s in steps if s in share],
        sorted(loss),
        [loss[s] for s in sorted(loss)],
        run.val_loss,
    )


# -- the answer: a table and a picture -------------------------------------------------------------
#: step windows of the ratio's medians: the first steps, the transient, its decay, the rest of the run
WINDOWS: tuple[tuple[int, int | None], ...] = ((0, 10), (10, 30), (30, 100), (100, None))


def _between(curves: Curves, values: list[float], start: int, stop: int | None) -> list[float]:
    return [v for s, v in zip(curves.steps, values, strict=True) if s >= start and (stop is None or s < stop)]


def _median(values: list[float]) -> float | None:
    return statistics.median(values) if values else None


def summary_rows(all_curves: Sequence[Curves], early_steps: int) -> list[dict[str, Any]]:
    """One row per run: the ratio's medians per window, its peak and when it falls back below 2, the shares."""
    rows = []
    for c in all_curves:
        ratio = c.ratio
        peak = max(range(len(ratio)), key=ratio.__getitem__)
        back = next((c.steps[i] for i in range(peak, len(ratio)) if ratio[i] < 2), None)
        late = max(1, len(ratio) // 5)  # the last fifth of the logged steps
        row: dict[str, Any] = {"variant": c.variant, "seed": c.seed, "ratio_first": ratio[0]}
        for start, stop in WINDOWS:
            row[f"ratio_{start}"] = _median(_between(c, ratio, start, stop))
        row.update(
            peak=ratio[peak],
            peak_step=float(c.steps[peak]),
            below_2=None if back is None else float(back),
            sq_frac_early=_median(_between(c, c.squared_fraction, 0, early_steps)),
            share_early=_median(_between(c, c.share_out, 0, early_steps)) if c.share_out else None,
            share_late=_median(c.share_out[-late:]) if c.share_out else None,
            train_loss=c.loss[-1] if c.loss else math.nan,
            val_loss=c.val_loss,
        )
        rows.append(row)
    return rows


def _columns(early_steps: int) -> list[tuple[str, str, int]]:
    """(row key, header, decimals) of the table's value columns."""
    windows = [
        (f"ratio_{a}", f"median, steps {a}–{b - 1}" if b is not None else f"median, steps {a}–end", 2)
        for a, b in WINDOWS
    ]
    return [
        ("ratio_first", "‖g_out‖/‖g_in‖ at step 0", 2),
        *windows,
        ("peak", "peak", 1),
        ("peak_step", "at step", 0),
        ("below_2", "back below 2 at step", 0),
        ("sq_frac_early", f"‖g_out‖²/(‖g_in‖²+‖g_out‖²), median steps < {early_steps}", 3),
        ("share_early", f"output share, median steps < {early_steps}", 3),
        ("share_late", "output share, median last 20%", 3),
        ("train_loss", "final train loss", 3),
        ("val_loss", "val loss", 3),
    ]


def markdown_table(rows: Sequence[dict[str, Any]], early_steps: int, steps: int) -> str:
    """The rows (ratio ‖g_out‖/‖g_in‖ unless said otherwise), then per variant the mean over seeds (min–max)."""
    columns = _columns(early_steps)
    head = "| variant | seed | " + " | ".join(h for _, h, _ in columns) + " |\n"
    head += "|---" * (len(columns) + 2) + "|\n"
    lines = []
    for r in rows:
        cells = ["–" if r[k] is None else f"{r[k]:.{d}f}" for k, _, d in columns]
        lines.append(f"| {r['variant']} | {r['seed']} | " + " | ".join(cells) + " |")
    for variant in dict.fromkeys(r["variant"] for r in rows):
        mine = [r for r in rows if r["variant"] == variant]
        cells = []
        for k, _, d in columns:
            vals = [r[k] for r in mine if r[k] is not None]
            if not vals:
                cells.append("–")
                continue
            cells.append(f"{statistics.fmean(vals):.{d}f} ({min(vals):.{d}f}–{max(vals):.{d}f})")
        lines.append(f"| **{variant}, mean (min–max)** | {len(mine)} seeds | " + " | ".join(cells) + " |")
    return head + "\n".join(lines) + "\n"


def plot(all_curves: Sequence[Curves], path: Path) -> Path:
    """Three panels: the ratio over steps (log scale, published 5-10x band), the output's share, the loss."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 3, figsize=(16, 4.6))
    colors = {"tied": "tab:blue", "untied": "tab:orange"}
    seeds = sorted({c.seed for c in all_curves})
    n = f"{len(seeds)} seed{'s' if len(seeds) > 1 else ''}"

    def once(c: Curves, label: str) -> str | None:  # one legend entry per kind of line
        return label if c.seed == seeds[0] else None

    ax = axes[0]
    ax.axhspan(5, 10, color="0.9", label="published: typically 5-10x (1B model)")
    for c in all_curves:
        ax.plot([s + 1 for s in c.steps], c.ratio, color=colors[c.variant], ls="-" if c.variant == "tied" else "--",
                lw=1, label=once(c, f"{c.variant} ({n}): ‖g_out‖/‖g_in‖"))
    ax.axhline(1, color="k", lw=0.6)
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_title("output / input gradient norm of the embedding matrix")
    ax.set_xlabel("optimizer step + 1 (log scale: the early steps)")
    ax.set_ylabel("‖g_out‖ / ‖g_in‖")
    ax.legend(fontsize=7)
    ax = axes[1]
    for c in all_curves:
        x = [s + 1 for s in c.steps]
        if c.share_out:
            ax.plot(x, c.share_out, color=colors["tied"], lw=1, label=once(c, f"tied ({n}): output share"))
        ax.plot(x, c.squared_fraction, color=colors[c.variant], lw=0.8, ls=":",
                label=once(c, f"{c.variant}: ‖g_out‖²/(‖g_in‖²+‖g_out‖²)"))
    ax.axhline(0.95, color="0.5", lw=0.6, ls="--", label="published: 95% of the squared norm")
    ax.set_xscale("log")
    lowest = min([0.0, *(v for c in all_curves for v in c.share_out)])
    ax.set_ylim(max(lowest, -1.0) - 0.05, 1.05)  # a share below 0: the use pulled against the other
    ax.set_title("the output side's part (shared_grad_share; squared norms)")
    ax.set_xlabel("optimizer step + 1 (log scale)")
    ax.legend(fontsize=6)
    ax = axes[2]
    for c in all_curves:
        ax.plot(c.loss_steps, c.loss, color=colors[c.variant], ls="-" if c.variant == "tied" else "--", lw=1,
                label=once(c, f"{c.variant} ({n})"))
    ax.set_title("training loss")
    ax.set_xlabel("optimizer step")
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def run(cfg: Config) -> tuple[list[Curves], str, Path]:
    """Every variant x seed, then the table (printed and written) and the picture."""
    torch.set_num_threads(cfg.threads) if cfg.threads > 0 else None
    out = Path(cfg.out_dir)
    start = time.perf_counter()
    train_ids, val_ids, vocab = tokenize(cfg, out)
    print(f"corpus: {len(train_ids):,} train / {len(val_ids):,} val tokens, vocabulary {vocab} "
          f"({time.perf_counter() - start:.1f} s)")
    all_curves = []
    for seed in cfg.seeds:
        for variant in cfg.variants:
            result = train_one(cfg, variant, seed, train_ids, val_ids, vocab)
            curves = read_curves(result)
            all_curves.append(curves)
            print(f"{variant} seed {seed}: {result.seconds:.1f} s, val loss {result.val_loss:.3f}, "
                  f"ratio first {curves.ratio[0]:.2f} last {curves.ratio[-1]:.2f}")
    print(f"all runs: {time.perf_counter() - start:.0f} s")
    return _write_results(cfg, all_curves)


def report_only(cfg: Config) -> tuple[list[Curves], str, Path]:
    """The table and the picture again from the runs already in ``out_dir`` (no training)."""
    out = Path(cfg.out_dir)
    all_curves = []
    for seed in cfg.seeds:
        for variant in cfg.variants:
            log_dir = out / variant / f"seed{seed}"
            val = read_scalars(log_dir).get("val_loss", {})
            all_curves.append(read_curves(RunResult(variant, seed, log_dir, val.get(cfg.steps, math.nan), 0.0)))
    return _write_results(cfg, all_curves)


def _write_results(cfg: Config, all_curves: list[Curves]) -> tuple[list[Curves], str, Path]:
    out = Path(cfg.out_dir)
    table = markdown_table(summary_rows(all_curves, cfg.early_steps), cfg.early_steps, cfg.steps)
    (out / "tied_lm_table.md").write_text(table)
    (out / "tied_lm_config.yaml").write_text(yaml.safe_dump(asdict(cfg)))
    figure = plot(all_curves, out / "tied_lm.png")
    print(table)
    print(f"figure: {figure}\ntable: {out / 'tied_lm_table.md'}")
    return all_curves, table, figure


def main(argv: Sequence[str] | None = None) -> tuple[list[Curves], str, Path]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--config", action="append", default=[], help="YAML file(s) of Config fields")
    parser.add_argument("--seeds", type=int, nargs="+")
    parser.add_argument("--variants", nargs="+", choices=VARIANTS)
    parser.add_argument("--steps", type=int)
    parser.add_argument("--out-dir", dest="out_dir")
    parser.add_argument("--corpus-dir", dest="corpus_dir")
    parser.add_argument("--report-only", action="store_true", help="table and figure from the runs in --out-dir")
    args = vars(parser.parse_args(argv))
    paths = args.pop("config") or [Path(__file__).resolve().parents[1] / "configs" / "tied_lm.yaml"]
    only = args.pop("report_only")
    cfg = load_config(paths, args)
    return report_only(cfg) if only else run(cfg)


if __name__ == "__main__":
    main()
