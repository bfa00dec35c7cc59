"""The tied-embedding language-model experiment, on a small corpus the test writes itself."""

from __future__ import annotations

import textwrap
from pathlib import Path

import pytest
import torch

from experiments import tied_lm
from experiments.corpus import BytePairEncoding, read_corpus

REPO = Path(__file__).resolve().parents[2]
QUICK = REPO / "configs" / "tied_lm_quick.yaml"


def _write_corpus(root: Path) -> Path:
    """Forty small Python modules: enough text for a 512-token BPE and 40 steps."""
    root.mkdir()
    for i in range(40):
        body = textwrap.dedent(
            f'''
            """Module {i}: helpers for counting words in lines of text."""

            def count_{i}(lines, minimum={i % 7}):
                """Return how many words of each line are longer than minimum."""
                total = 0
                for line in lines:
                    for word in line.split():
                        if len(word) > minimum:
                            total += {i + 1}
                return total


            class Counter{i}:
                def __init__(self, step={i}):
                    self.step = step
                    self.values = [value * step for value in range({i + 3})]
            '''
        )
        (root / f"module_{i:02d}.py").write_text(body * 3)
    (root / "notes.txt").write_text("not read: the suffix is .py only")
    return root


@pytest.fixture(scope="module")
def quick_run(tmp_path_factory: pytest.TempPathFactory) -> tuple[list[tied_lm.Curves], str, Path, Path]:
    tmp = tmp_path_factory.mktemp("tied_lm")
    corpus = _write_corpus(tmp / "corpus")
    out = tmp / "out"
    curves, table, figure = tied_lm.main(
        ["--config", str(QUICK), "--corpus-dir", str(corpus), "--out-dir", str(out)]
    )
    return curves, table, figure, out


def test_quick_run_writes_the_figure_the_table_and_both_variants(quick_run) -> None:
    curves, table, figure, out = quick_run
    assert figure.exists() and figure.stat().st_size > 10_000
    assert (out / "tied_lm_table.md").read_text() == table
    assert [c.variant for c in curves] == ["tied", "untied"]
    assert "| tied | 0 |" in table and "| untied | 0 |" in table and "**tied, mean (min–max)**" in table
    tied = curves[0]
    assert tied.steps == list(range(40))  # every step logged, read back from the event files
    assert len(tied.share_out) == 40 and curves[1].share_out == []  # shares: of the tied matrix only


def test_per_use_norms_of_the_tied_model_equal_the_untied_twins_matrices_at_step_0(quick_run) -> None:
    # At step 0 the twin has the very same weights (its head a copy of wte) and the same batch, so the
    # gradient of its head is the tied matrix's output use, and that of its wte the input use.
    tied, untied = quick_run[0]
    assert tied.steps[0] == untied.steps[0] == 0
    assert tied.g_in[0] == pytest.approx(untied.g_in[0], rel=1e-4)
    assert tied.g_out[0] == pytest.approx(untied.g_out[0], rel=1e-4)
    assert tied.g_out[0] > tied.g_in[0]  # the dense output side: every token's row gets a gradient
    assert tied.ratio[0] == pytest.approx(untied.ratio[0], rel=1e-4)


def test_tokenizer_round_trips_the_corpus_and_has_the_asked_vocabulary(tmp_path: Path) -> None:
    corpus = _write_corpus(tmp_path / "c")
    text = read_corpus(corpus, max_bytes=50_000)
    assert "not read" not in text and len(text.encode()) <= 50_000 + 40  # joined with newlines
    bpe = BytePairEncoding.train(text, 400)
    assert bpe.vocab_size == 400
    ids = bpe.encode(text)
    assert bpe.decode(ids) == text and len(ids) < len(text.encode()) / 2
    bpe.save(tmp_path / "bpe.json")
    assert BytePairEncoding.load(tmp_path / "bpe.json").encode(text) == ids


def test_twin_starts_from_the_same_weights_with_one_more_matrix() -> None:
    cfg = tied_lm.load_config([QUICK])
    tied, twin = tied_lm.make_model(cfg, 300, True, seed=3), tied_lm.make_model(cfg, 300, False, seed=3)
    assert torch.equal(twin.head.weight, tied.wte.weight) and twin.head.weight is not twin.wte.weight
    n = sum(p.numel() for p in tied.parameters())
    assert sum(p.numel() for p in twin.parameters()) == n + 300 * cfg.d_model
    idx = torch.randint(0, 300, (2, 8))
    assert torch.equal(tied(idx), twin(idx))


def test_both_configs_load_and_the_quick_one_overlays_the_default() -> None:
    default = tied_lm.load_config([REPO / "configs" / "tied_lm.yaml"])
    assert (default.steps, default.vocab_size, default.seeds, default.log_every) == (500, 4096, [0, 1, 2], 1)
    stacked = tied_lm.load_config([REPO / "configs" / "tied_lm.yaml", QUICK])
    assert stacked == tied_lm.load_config([QUICK])  # the overlay states everything that differs


def test_config_refuses_unknown_keys_and_variants(tmp_path: Path) -> None:
    bad = tmp_path / "bad.yaml"
    bad.write_text("stepz: 3\n")
    with pytest.raises(ValueError, match="unknown config keys \\['stepz'\\]; allowed"):
        tied_lm.load_config([bad])
    with pytest.raises(ValueError, match="variants must be among"):
        tied_lm.load_config([QUICK], {"variants": ["both"]})


def test_report_only_rebuilds_the_same_table_from_the_event_files(quick_run) -> None:
    _, table, _, out = quick_run
    cfg = tied_lm.load_config([QUICK], {"out_dir": str(out)})
    assert tied_lm.report_only(cfg)[1] == table


def test_runs_as_a_file_from_the_repository_root_without_pythonpath(tmp_path: Path) -> None:
    import os
    import subprocess
    import sys

    corpus = _write_corpus(tmp_path / "corpus")
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    args = ["--config", str(QUICK), "--corpus-dir", str(corpus), "--out-dir", str(tmp_path / "out"), "--steps", "4"]
    done = subprocess.run(
        [sys.executable, "experiments/tied_lm.py", *args], cwd=REPO, env=env, capture_output=True, text=True
    )
    assert done.returncode == 0, done.stderr[-2000:]
    assert (tmp_path / "out" / "tied_lm.png").exists() and "| tied | 0 |" in done.stdout


def test_quick_run_logs_the_opt_in_statistics_of_a_transformer(quick_run) -> None:
    _, _, _, out = quick_run
    scalars = tied_lm.read_scalars(out / "tied" / "seed0")
    # leaf modules of the GPT, each called once per forward pass: their paths are the sites
    for site in ("model.wte", "model.blocks.0.act", "model.ln_f", "model.head"):
        assert sorted(scalars[f"activation_std/{site}"]) == list(range(40))
    assert max(scalars["activation_zero_frac/model.blocks.0.act"].values()) < 0.01  # GELU: almost no exact zeros
    assert scalars["activation_std/model.ln_f"][0] == pytest.approx(1.0, rel=0.01)  # LayerNorm at init: unit std
    assert {"optimizer_state_norm/model.wte.weight/exp_avg", "optimizer_state_norm/model.wte.weight/exp_avg_sq"} <= set(
        scalars
    )
    assert "optimizer_state_norm/model.head.weight/exp_avg" not in scalars  # tied: the head owns no parameter
