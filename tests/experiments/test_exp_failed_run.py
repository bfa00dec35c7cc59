"""``python -m experiments.failed_run``: both runs, the four rows of the picture, the printed numbers."""

from __future__ import annotations

from pathlib import Path

import pytest
from exp_fake_data import FakeFashionMNIST

from experiments import failed_run
from param_monitor.report import read_scalars


def test_failed_run_trains_both_and_draws_the_diagnostics(
    fake_system_env: FakeFashionMNIST, in_tmp_cwd: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = in_tmp_cwd / "failed.png"
    args = ["--out", str(out), f"--data.data_dir={in_tmp_cwd / 'data'}", "--data.batch_size=16"]
    assert failed_run.main([*args, "--trainer.max_steps=3", "--trainer.log_every_n_steps=1"]) == out
    assert out.read_bytes()[:4] == b"\x89PNG"
    printed = capsys.readouterr().out
    assert "healthy (seed 0): final val_acc" in printed and "failed (init seed 7, data seed 0)" in printed
    failed_dir = in_tmp_cwd / "lightning_logs/failed_init/version_0"
    healthy_dir = in_tmp_cwd / "lightning_logs/healthy_run/version_0"
    for log_dir in (healthy_dir, failed_dir):
        rows = failed_run.panels(read_scalars(log_dir))
        assert [len(lines) > 0 for _, lines in rows] == [True] * 4  # every row has its curves
        (_, dead), (_, shared), (_, ratio), _ = rows
        assert set(dead) == {"model.net.1.weight", "model.net.3.weight", "model.net.9.weight"}
        assert set(shared) == {"model.net.3", "model.net.6", "total (grad_norm)"}
        assert not any(label.endswith(".bias") for label in ratio)
    # the failed run's initial weights are init seed 7's, the healthy run's seed 0's: they differ
    assert read_scalars(healthy_dir)["weight_norm/model.net.3.weight"].values[0] != pytest.approx(
        read_scalars(failed_dir)["weight_norm/model.net.3.weight"].values[0]
    )
    failed_run.main(["--out", str(out), "--healthy", str(healthy_dir), "--failed", str(failed_dir)])  # replot only
    with pytest.raises(SystemExit):
        failed_run.main(["--healthy", str(healthy_dir)])
