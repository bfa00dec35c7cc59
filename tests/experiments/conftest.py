"""Fixtures: small FashionMNIST-format data sets the tests write themselves (gzip'd IDX files)."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
import torch

# `experiments` is not an installed package: pyproject's `pythonpath = ["."]` puts the root on sys.path.
from exp_fake_data import FakeFashionMNIST, write_fake_fashion_mnist

from experiments.data import SYSTEM_DIR_ENV

REPO_ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="session")
def fake_fashion_mnist(tmp_path_factory: pytest.TempPathFactory) -> FakeFashionMNIST:
    """One fake system directory per test session (read-only use)."""
    return write_fake_fashion_mnist(tmp_path_factory.mktemp("fake-system") / "fashion-mnist")


@pytest.fixture
def fake_system_env(fake_fashion_mnist: FakeFashionMNIST, monkeypatch: pytest.MonkeyPatch) -> FakeFashionMNIST:
    """``$FASHION_MNIST_SYSTEM_DIR`` pointing at the fake files, as a user would set it."""
    monkeypatch.setenv(SYSTEM_DIR_ENV, str(fake_fashion_mnist.system_dir))
    return fake_fashion_mnist


@pytest.fixture
def in_tmp_cwd(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """Run in an empty directory, so nothing a run writes by default lands in the repository."""
    monkeypatch.chdir(tmp_path)
    return tmp_path


@pytest.fixture(autouse=True)
def _restore_torch_threads() -> Iterator[None]:
    """The CLI sets torch's process-wide thread count (``--torch_threads``): give other tests theirs back."""
    threads = torch.get_num_threads()
    yield
    torch.set_num_threads(threads)
