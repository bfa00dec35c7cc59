"""The LightningCLI entry points: every config instantiates, and short end-to-end runs on fake IDX data."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from exp_fake_data import FakeFashionMNIST
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from experiments import param_table, seeds, shared_mlp
from experiments.cli import QUIET_TRAINER_ARGS, build_cli, with_subcommand
from experiments.data import RAW_FILES, SYSTEM_DIR, SYSTEM_DIR_ENV, raw_dir
from experiments.models import SharedMLP
from experiments.plain import Splits, train_plain
from experiments.seeds import spread, train_seed
from param_monitor import ParameterMonitor

REPO_ROOT = Path(__file__).resolve().parents[2]
# the FashionMNIST experiment's LightningCLI configs (tied_lm*.yaml are the language-model experiment's own
# format, read by experiments/tied_lm.py and tested in test_exp_tied_lm.py)
CONFIGS = sorted(p for p in (REPO_ROOT / "configs").glob("*.yaml") if not p.name.startswith("tied_lm"))
# Fake data: 64 train / 32 test images, so batch 16 gives 4 training steps per epoch.
SMALL = ("--data.batch_size=16", "--trainer.log_every_n_steps=1")


def tags(log_dir: Path) -> set[str]:
    acc = EventAccumulator(str(log_dir), size_guidance={"scalars": 0})
    acc.Reload()
    return set(acc.Tags()["scalars"])


def test_with_subcommand() -> None:
    assert with_subcommand([]) == ["fit"]
    assert with_subcommand(["--config", "c.yaml"]) == ["fit", "--config", "c.yaml"]
    assert with_subcommand(["--config", "c.yaml", "validate"]) == ["--config", "c.yaml", "validate"]
    assert with_subcommand(["--help"]) == ["--help"]


def test_configs_exist() -> None:
    assert {p.name for p in CONFIGS} >= {"shared_mlp.yaml", "untied_mlp.yaml", "quick.yaml", "failed_init.yaml"}


def test_overlays_state_only_what_differs_and_stack(in_tmp_cwd: Path) -> None:
    """An overlay alone applies to the defaults; after shared_mlp.yaml it gives the same run."""
    base = str(REPO_ROOT / "configs/shared_mlp.yaml")
    for overlay in ("untied_mlp.yaml", "quick.yaml", "failed_init.yaml"):
        text = (REPO_ROOT / "configs" / overlay).read_text()
        assert len([line for line in text.splitlines() if line and not line.startswith("#")]) <= 10, overlay
        alone = build_cli(["--config", str(REPO_ROOT / "configs" / overlay)], run=False).config
        stacked = build_cli(["--config", base, "--config", str(REPO_ROOT / "configs" / overlay)], run=False).config
        for key in ("trainer.max_epochs", "trainer.limit_train_batches", "model.init_seed", "seed_everything"):
            assert alone[key] == stacked[key], (overlay, key)
        assert alone["model.model.init_args.tied"] == stacked["model.model.init_args.tied"]
    stack = [base, str(REPO_ROOT / "configs/untied_mlp.yaml"), str(REPO_ROOT / "configs/quick.yaml")]
    cli = build_cli([arg for path in stack for arg in ("--config", path)], run=False)
    assert not cli.model.model.tied and cli.trainer.limit_train_batches == 100 and cli.trainer.logger.name == "quick"


@pytest.mark.parametrize("config", CONFIGS, ids=[p.name for p in CONFIGS])
def test_config_parses_and_instantiates(config: Path, in_tmp_cwd: Path) -> None:
    cli = build_cli(["--config", str(config), "--trainer.max_steps=2"], run=False)
    assert cli.trainer.max_steps == 2
    net = cli.model.model
    assert isinstance(net, SharedMLP) and net.num_hiddens == 8 and net.num_shared_uses == 2
    assert (net.net[3] is net.net[6]) == (config.name != "untied_mlp.yaml")
    assert cli.model.lr == 0.1 and cli.datamodule.batch_size == 256
    assert cli.model.init_seed == (7 if config.name == "failed_init.yaml" else None)
    (monitor,) = [cb for cb in cli.trainer.callbacks if isinstance(cb, ParameterMonitor)]
    assert monitor.log_update_ratio and monitor.log_dead_units  # the diagnostics of a failed run
    assert cli.trainer.logger.save_dir == "lightning_logs"
    if config.name == "quick.yaml":
        assert (cli.trainer.max_epochs, cli.trainer.limit_train_batches) == (1, 100)
        assert cli.trainer.checkpoint_callback is None
    else:
        assert cli.trainer.max_epochs == 10 and cli.config["seed_everything"] == 0
        assert cli.config["torch_threads"] == 1


def test_defaults_are_the_textbook_run(in_tmp_cwd: Path) -> None:
    cli = build_cli([], run=False)
    assert cli.config["seed_everything"] == 0 and cli.trainer.max_epochs == 10
    assert cli.trainer.logger.name == "shared_mlp" and cli.trainer.logger.save_dir == "lightning_logs"
    (monitor,) = [cb for cb in cli.trainer.callbacks if isinstance(cb, ParameterMonitor)]
    assert monitor.log_update_ratio and monitor.log_dead_units
    assert cli.trainer.progress_bar_callback is not None
    assert isinstance(cli.model.model, SharedMLP) and cli.model.model.tied and cli.model.lr == 0.1
    assert cli.config["torch_threads"] == 1 and torch.get_num_threads() == 1
    quiet = build_cli(list(QUIET_TRAINER_ARGS), run=False)
    assert quiet.trainer.logger is None and not any(isinstance(c, ParameterMonitor) for c in quiet.trainer.callbacks)


def test_end_to_end_fake_data(
    fake_system_env: FakeFashionMNIST, in_tmp_cwd: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """No subcommand = fit; the offline lookup decompresses the fake files; the monitor's tags land in
    the run's event file; summary.png and the tensorboard command are reported."""
    data_dir = in_tmp_cwd / "data"
    result = shared_mlp.main(
        [
            "--config",
            str(REPO_ROOT / "configs/quick.yaml"),
            f"--data.data_dir={data_dir}",
            "--trainer.max_steps=3",
            *SMALL,
        ]
    )
    assert result is not None and result.cli.trainer.global_step == 3
    assert sorted(p.name for p in raw_dir(data_dir).iterdir()) == sorted(RAW_FILES)
    # the final model was validated on the 32 fake test images: accuracy is a multiple of 1/32
    assert 0.0 <= result.val_acc <= 1.0 and (result.val_acc * 32) == pytest.approx(round(result.val_acc * 32))
    assert result.log_dir == Path("lightning_logs/quick/version_0")
    logged = tags(result.log_dir)
    name = "model.net.3.weight"
    assert {
        "train_loss",
        "val_acc",
        "val_loss",
        f"weight_mean/{name}",
        f"grad_norm/{name}",
        "grad_norm_total",
    } <= logged
    assert {f"shared_grad/{name}/model.net.3", f"shared_grad/{name}/model.net.6"} <= logged
    assert {f"update_ratio/{name}", f"dead_units/{name}", "dead_units/model.net.1.weight"} <= logged
    assert {"num_parameters"} <= logged and "num_parameters: 6442" in (result.log_dir / "hparams.yaml").read_text()
    assert (result.log_dir / "summary.png").read_bytes()[:4] == b"\x89PNG"
    out = capsys.readouterr().out
    assert "6442" in out and "6514" in out
    # the printed TensorBoard command works as printed: this venv's own executable, on 127.0.0.1
    (command,) = [line.split(":  ", 1)[1] for line in out.splitlines() if line.startswith("to browse the run")]
    executable, *args = command.split()
    assert Path(executable).is_file() and Path(executable).name == "tensorboard"
    assert args == ["--logdir", str(result.log_dir), "--host", "127.0.0.1"]


def test_fit_subcommand_and_untied(fake_system_env: FakeFashionMNIST, in_tmp_cwd: Path) -> None:
    result = shared_mlp.main(
        ["fit", "--config", str(REPO_ROOT / "configs/untied_mlp.yaml"), "--trainer.max_steps=2",
         "--trainer.enable_progress_bar=false", *SMALL]
    )  # fmt: skip
    assert result is not None and result.num_parameters == 6514
    assert result.cli.model.model.net[3] is not result.cli.model.model.net[6]
    logged = tags(result.log_dir)
    assert "weight_mean/model.net.6.weight" in logged  # untied: its own tensor
    assert not any(t.startswith("shared_grad/") for t in logged)  # and nothing is shared


def test_seeds_runner_variants_and_both_loops(
    fake_system_env: FakeFashionMNIST, in_tmp_cwd: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """Variants x seeds x loops from one runner; the plain twin reads the same parsed configuration."""
    args = ["--seeds", "2", "--first-seed", "5", "--variants", "tied", "untied", "--loops", "lightning", "plain"]
    runs = seeds.main([*args, "--trainer.max_epochs=1", f"--data.data_dir={in_tmp_cwd / 'data'}", *SMALL])
    assert runs.seeds == [5, 6]
    assert runs.num_parameters == {"tied": 6442, "untied": 6514}
    assert set(runs.accs) == {(v, loop) for v in ("tied", "untied") for loop in ("lightning", "plain")}
    for variant in ("tied", "untied"):  # same seed, same tensors: the same accuracy in both loops
        assert runs.accs[(variant, "lightning")] == pytest.approx(runs.accs[(variant, "plain")], abs=1e-6)
    out = capsys.readouterr().out
    assert "seed    5:" in out and "seed    6:" in out and "| tied | plain | 6,442 |" in out
    assert "tied: Lightning and plain agree on 2/2 seeds" in out


def test_seeds_runner_reference_loop_is_seeded_its_own_way(
    fake_system_env: FakeFashionMNIST, in_tmp_cwd: Path
) -> None:
    """The reference loop: manual_seed(s) before building, the same s for the shuffling generator."""
    from experiments.data import TensorBatchLoader
    from experiments.plain import evaluate, train_reference

    args = ["--seeds", "1", "--first-seed", "3", "--loops", "reference", "plain", "--trainer.max_epochs=1"]
    runs = seeds.main([*args, f"--data.data_dir={in_tmp_cwd / 'data'}", "--data.batch_size=16"])
    splits = Splits.load(str(in_tmp_cwd / "data"))
    # oracle: the reference's recipe written out (lazy layers materialized by the first batch)
    generator = torch.Generator().manual_seed(3)
    torch.manual_seed(3)
    net = SharedMLP()
    optimizer = None
    for x, y in TensorBatchLoader(splits.train_x, splits.train_y, 16, shuffle=True, generator=generator):
        loss = torch.nn.functional.cross_entropy(net(x), y)
        optimizer = optimizer or torch.optim.SGD(net.parameters(), lr=0.1)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    expected = evaluate(net, TensorBatchLoader(splits.val_x, splits.val_y, 16))
    assert runs.accs[("config", "reference")] == [pytest.approx(expected, abs=1e-9)]
    reference = train_reference(splits, 3, max_epochs=1, batch_size=16).model
    for (name, a), (_, b) in zip(net.named_parameters(), reference.named_parameters(), strict=True):
        assert torch.equal(a, b), name


def test_seeds_runner_config_variant_follows_the_config_and_logs(
    fake_system_env: FakeFashionMNIST, in_tmp_cwd: Path
) -> None:
    config = str(REPO_ROOT / "configs/untied_mlp.yaml")
    runs = seeds.main(["--seeds", "1", "--tensorboard", "--config", config, "--trainer.max_steps=2", *SMALL])
    assert runs.num_parameters == {"config": 6514}  # the default variant is what the config says
    (run_dir,) = (in_tmp_cwd / "lightning_logs/seeds").iterdir()
    assert {"val_acc", "num_parameters"} <= tags(run_dir / "config_seed0")
    with pytest.raises(SystemExit, match="plain loop"):  # whole epochs only: never two different runs compared
        seeds.main(["--seeds", "1", "--loops", "plain", "--trainer.max_steps=2", *SMALL])


def test_spread_statistics() -> None:
    s = spread([0.1, 0.8, 0.82, 0.84, 0.9])
    assert (s.median, s.minimum, s.maximum, s.q1, s.q3, s.failed) == (0.82, 0.1, 0.9, 0.8, 0.84, 1)
    assert s.iqr == pytest.approx(0.04) and "failed 1/5" in s.line("x")
    assert spread([0.5]).median == 0.5 and spread([0.5]).iqr == 0.0
    assert spread([0.49, 0.5]).failed == 1  # failed: below 0.5


def test_param_table_script(capsys: pytest.CaptureFixture[str]) -> None:
    param_table.main()
    out = capsys.readouterr().out
    assert "['0.weight', '0.bias', '2.weight', '2.bias']" in out
    assert "| net.0.weight | 64×20 | 1280 |" in out and "**3952**" in out
    assert "| net.3.weight | 8×8 | 64 | True | net.6.weight | net.3, net.6 |" in out and "**6442**" in out


@pytest.mark.slow
@pytest.mark.skipif(not SYSTEM_DIR.is_dir(), reason=f"needs Debian's dataset-fashion-mnist ({SYSTEM_DIR})")
def test_real_data_one_epoch(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """One epoch on the real FashionMNIST (from the Debian files): a sane accuracy, the real sizes."""
    monkeypatch.delenv(SYSTEM_DIR_ENV, raising=False)
    monkeypatch.chdir(tmp_path)
    result = train_seed(["--trainer.max_epochs=1", f"--data.data_dir={tmp_path / 'data'}"], seed=0)
    dm = result.cli.datamodule
    assert dm.train_x.shape == (60_000, 1, 28, 28) and dm.val_x.shape == (10_000, 1, 28, 28)
    assert result.cli.trainer.global_step == 235  # ceil(60000 / 256)
    assert result.val_acc > 0.5


def test_lightning_run_equals_plain_loop(fake_system_env: FakeFashionMNIST, in_tmp_cwd: Path) -> None:
    """Same seed, same tensors: Lightning's run and the plain loop end with bit-identical weights."""
    data_dir = str(in_tmp_cwd / "data")
    args = ["--trainer.max_epochs=2", f"--data.data_dir={data_dir}", "--data.batch_size=16"]
    lightning_run = train_seed(args, seed=11)
    plain = train_plain(Splits.load(data_dir), seed=11, max_epochs=2, batch_size=16)
    assert lightning_run.cli.trainer.global_step == 8
    for (name, a), (_, b) in zip(
        plain.model.named_parameters(), lightning_run.cli.model.model.named_parameters(), strict=True
    ):
        assert torch.equal(a, b), name
    assert lightning_run.val_acc == pytest.approx(plain.val_acc, abs=1e-6)


# Crashes of the process launch on a busy CPU machine, not of the training or the monitor: gloo aborting a
# worker at teardown (pytorch/pytorch#190489), a rendezvous port taken between its choice and its bind, a
# peer gone before the store connected. A collective mismatch (what a monitor bug would cause) is not one.
LAUNCH_CRASHES = (
    "terminate called without an active exception",
    "Address already in use",
    "Connection reset by peer",
    "Connection refused",
    "Broken pipe",
)


def _launch_crash(stderr: str) -> bool:
    return any(sign in stderr for sign in LAUNCH_CRASHES) and "mismatch" not in stderr


@pytest.mark.distributed
@pytest.mark.parametrize("strategy", ["ddp", "ddp_spawn"])
def test_script_runs_under_ddp_on_cpu(fake_system_env: FakeFashionMNIST, in_tmp_cwd: Path, strategy: str) -> None:
    """The README's distributed commands. ``ddp`` re-runs the script for rank 1 from ``sys.argv`` (both
    ranks must parse the same arguments); ``ddp_spawn`` trains in workers (the parent only gets metrics
    and weights back). One report; the monitor's tags written once (rank 0)."""
    import os
    import subprocess
    import sys

    cmd = [
        sys.executable, "-m", "experiments.shared_mlp", "--config", str(REPO_ROOT / "configs/quick.yaml"),
        f"--data.data_dir={in_tmp_cwd / 'data'}", "--trainer.max_steps=2", *SMALL,
        "--trainer.devices=2", f"--trainer.strategy={strategy}", "--trainer.accelerator=cpu",
    ]  # fmt: skip
    failures: list[str] = []
    for attempt in range(3):
        run_dir = in_tmp_cwd / f"try{attempt}"
        run_dir.mkdir()
        env = {**os.environ, "PYTHONPATH": str(REPO_ROOT)}  # `python -m experiments.…` from another folder
        done = subprocess.run(cmd, capture_output=True, text=True, timeout=240, cwd=run_dir, env=env)
        if done.returncode == 0 or not _launch_crash(done.stderr):
            break
        failures.append(done.stderr[-1500:])  # a crash of the launch itself, not of the monitor: tried again
    assert done.returncode == 0, "\n---\n".join([*failures, done.stderr[-3000:]])
    assert done.stdout.count("final val_acc") == 1
    log_dir = run_dir / "lightning_logs/quick/version_0"
    assert {"shared_grad/model.net.3.weight/model.net.6", "grad_norm/model.net.3.weight"} <= tags(log_dir)
    assert not (run_dir / "lightning_logs/quick/version_1").exists()
    assert (log_dir / "summary.png").exists()  # the report points at the run that has the events


@pytest.mark.parametrize("script", ["shared_mlp", "failed_run", "seeds", "param_table"])
def test_scripts_run_as_files_from_the_repository_root(script: str) -> None:
    """``python experiments/<script>.py`` works like ``python -m experiments.<script>``, without PYTHONPATH."""
    import os
    import subprocess
    import sys

    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}  # a fresh clone's shell sets none
    args = [] if script == "param_table" else ["--help"]
    done = subprocess.run(
        [sys.executable, f"experiments/{script}.py", *args], capture_output=True, text=True, timeout=120,
        cwd=REPO_ROOT, env=env,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr[-2000:]
    assert "total (unique)" in done.stdout if script == "param_table" else "usage:" in done.stdout


def test_shared_mlp_as_a_file_trains_with_the_quick_config(fake_system_env: FakeFashionMNIST, in_tmp_cwd: Path) -> None:
    """The design's own command, ``python experiments/shared_mlp.py --config configs/quick.yaml``, on fake data."""
    import os
    import subprocess
    import sys

    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    cmd = [
        sys.executable, str(REPO_ROOT / "experiments/shared_mlp.py"), "--config", str(REPO_ROOT / "configs/quick.yaml"),
        f"--data.data_dir={in_tmp_cwd / 'data'}", "--trainer.max_steps=2", *SMALL,
    ]  # fmt: skip
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=240, cwd=in_tmp_cwd, env=env)
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stdout.count("final val_acc") == 1
    assert "grad_norm/model.net.3.weight" in tags(in_tmp_cwd / "lightning_logs/quick/version_0")


def test_pictures_named_in_configs_and_experiments_exist() -> None:
    import re

    sources = [*CONFIGS, *sorted((REPO_ROOT / "experiments").glob("*.py"))]
    named = {m for p in sources for m in re.findall(r"docs/[\w*.-]+\.png", p.read_text())}
    assert named and all((REPO_ROOT / path).is_file() for path in named), sorted(named)
