"""The offline-first FashionMNIST lookup, its error, and the in-memory batch loader, on self-written IDX files."""

from __future__ import annotations

import gzip
import math
import os
from collections.abc import Callable
from pathlib import Path
from urllib.error import URLError

import pytest
import torch
import torchvision.datasets.mnist
from exp_fake_data import FakeFashionMNIST, write_fake_fashion_mnist
from lightning.pytorch import seed_everything

from experiments.data import (
    RAW_FILES,
    SYSTEM_DIR,
    SYSTEM_DIR_ENV,
    FashionMNISTDataModule,
    FashionMNISTUnavailableError,
    TensorBatchLoader,
    ensure_fashion_mnist,
    install_from_system,
    load_split,
    raw_dir,
    system_dir,
)


def test_system_dir_resolution(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(SYSTEM_DIR_ENV, raising=False)
    assert system_dir() == SYSTEM_DIR == Path("/usr/share/datasets/fashion-mnist")
    monkeypatch.setenv(SYSTEM_DIR_ENV, str(tmp_path / "env"))
    assert system_dir() == tmp_path / "env"
    assert system_dir(tmp_path / "arg") == tmp_path / "arg"  # an explicit argument beats the variable


def test_decompressed_files_are_the_originals(fake_fashion_mnist: FakeFashionMNIST, tmp_path: Path) -> None:
    assert install_from_system(tmp_path / "data", fake_fashion_mnist.system_dir)
    raw = raw_dir(tmp_path / "data")
    assert raw == tmp_path / "data" / "FashionMNIST" / "raw"
    assert sorted(p.name for p in raw.iterdir()) == sorted(RAW_FILES)  # no leftover .partial files
    for name, expected in fake_fashion_mnist.raw_bytes().items():
        written = (raw / name).read_bytes()
        assert written == expected
        assert written == gzip.decompress((fake_fashion_mnist.system_dir / f"{name}.gz").read_bytes())


def test_loaded_tensors_match_written_pixels(fake_system_env: FakeFashionMNIST, tmp_path: Path) -> None:
    ensure_fashion_mnist(tmp_path)  # finds the files through $FASHION_MNIST_SYSTEM_DIR
    for train, images, labels in (
        (True, fake_system_env.train_images, fake_system_env.train_labels),
        (False, fake_system_env.test_images, fake_system_env.test_labels),
    ):
        x, y = load_split(tmp_path, train=train)
        assert x.shape == (len(images), 1, 28, 28) and x.dtype == torch.float32
        assert y.dtype == torch.int64 and y.tolist() == labels.tolist()
        torch.testing.assert_close(x[:, 0], images.float() / 255.0, rtol=0, atol=0)
    assert float(x.min()) == 0.0 and float(x.max()) == 1.0  # grey levels 0 and 255 both occur


def test_incomplete_system_dir_is_not_used(fake_fashion_mnist: FakeFashionMNIST, tmp_path: Path) -> None:
    partial = tmp_path / "partial"
    partial.mkdir()
    for name in RAW_FILES[:3]:
        (partial / f"{name}.gz").write_bytes((fake_fashion_mnist.system_dir / f"{name}.gz").read_bytes())
    assert not install_from_system(tmp_path / "data", partial)
    assert not (tmp_path / "data").exists()


def test_existing_raw_files_are_kept(fake_fashion_mnist: FakeFashionMNIST, tmp_path: Path) -> None:
    """A second lookup uses the decompressed copy even when the system files are gone."""
    install_from_system(tmp_path, fake_fashion_mnist.system_dir)
    first = raw_dir(tmp_path) / RAW_FILES[0]
    mtime = first.stat().st_mtime_ns
    assert ensure_fashion_mnist(tmp_path, tmp_path / "nowhere") == raw_dir(tmp_path)
    assert first.stat().st_mtime_ns == mtime


def _refuse_download(calls: list[str]) -> Callable[..., None]:
    """A stand-in for torchvision's ``download_and_extract_archive`` that fails like a machine offline."""

    def fail(url: str, download_root: str, **kwargs: object) -> None:
        calls.append(url)
        raise URLError("network disabled in this test")

    return fail


def test_no_data_anywhere_gives_clear_error(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    calls: list[str] = []
    # Only the network is cut: torchvision's own mirror loop runs, and fails as it would offline.
    monkeypatch.setattr(torchvision.datasets.mnist, "download_and_extract_archive", _refuse_download(calls))
    empty = tmp_path / "empty-system-dir"
    empty.mkdir()
    monkeypatch.setenv(SYSTEM_DIR_ENV, str(empty))
    with pytest.raises(FashionMNISTUnavailableError) as info:
        ensure_fashion_mnist(tmp_path / "data")
    message = str(info.value)
    assert calls and all(url.startswith("http") for url in calls)  # the download was really attempted
    assert "apt-get install dataset-fashion-mnist" in message
    assert "network" in message
    assert str(empty) in message and str(raw_dir(tmp_path / "data")) in message
    assert isinstance(info.value.__cause__, RuntimeError)  # torchvision's error is chained, not lost


def test_datamodule_without_data_raises(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(torchvision.datasets.mnist, "download_and_extract_archive", _refuse_download([]))
    monkeypatch.setenv(SYSTEM_DIR_ENV, str(tmp_path / "missing"))
    with pytest.raises(FashionMNISTUnavailableError, match="apt-get install dataset-fashion-mnist"):
        FashionMNISTDataModule(data_dir=str(tmp_path / "data")).prepare_data()


def test_loader_epoch_covers_every_sample_once() -> None:
    x = torch.arange(10, dtype=torch.float32).view(10, 1)
    y = torch.arange(10) * 10
    loader = TensorBatchLoader(x, y, batch_size=4, shuffle=True, generator=torch.Generator().manual_seed(0))
    assert len(loader) == 3
    batches = list(loader)
    assert [len(bx) for bx, _ in batches] == [4, 4, 2]
    seen = torch.cat([bx[:, 0] for bx, _ in batches])
    assert sorted(seen.tolist()) == list(range(10)) and seen.tolist() != list(range(10))
    for bx, by in batches:  # features and labels stay paired
        assert torch.equal(by, bx[:, 0].long() * 10)
    second = torch.cat([bx[:, 0] for bx, _ in loader])
    assert second.tolist() != seen.tolist()  # a fresh permutation each epoch


def test_loader_order_and_length_options() -> None:
    x, y = torch.arange(10.0).view(10, 1), torch.arange(10)
    plain = TensorBatchLoader(x, y, batch_size=4)
    assert [b.tolist() for _, b in plain] == [[0, 1, 2, 3], [4, 5, 6, 7], [8, 9]]
    assert len(TensorBatchLoader(x, y, batch_size=4, drop_last=True)) == 2
    orders = [
        [b.tolist() for _, b in TensorBatchLoader(x, y, 4, True, torch.Generator().manual_seed(7))] for _ in range(2)
    ]
    assert orders[0] == orders[1]
    with pytest.raises(ValueError):
        TensorBatchLoader(x, y[:5], batch_size=4)


def test_datamodule_batches(fake_system_env: FakeFashionMNIST, tmp_path: Path) -> None:
    dm = FashionMNISTDataModule(data_dir=str(tmp_path), batch_size=16)
    dm.prepare_data()
    dm.setup("fit")
    train, val = dm.train_dataloader(), dm.val_dataloader()
    assert len(train) == math.ceil(64 / 16) and len(val) == 2
    vx, vy = next(iter(val))  # validation = the test split, in file order
    torch.testing.assert_close(vx[:, 0], fake_system_env.test_images[:16].float() / 255, rtol=0, atol=0)
    assert vy.tolist() == fake_system_env.test_labels[:16].tolist()
    labels = torch.cat([by for _, by in train])
    assert sorted(labels.tolist()) == sorted(fake_system_env.train_labels.tolist())


def test_datamodule_order_follows_seed_everything(fake_system_env: FakeFashionMNIST, tmp_path: Path) -> None:
    def first_labels(seed: int) -> list[int]:
        seed_everything(seed, verbose=False)
        dm = FashionMNISTDataModule(data_dir=str(tmp_path), batch_size=16)
        dm.setup("fit")
        return next(iter(dm.train_dataloader()))[1].tolist()

    assert first_labels(3) == first_labels(3)
    assert first_labels(3) != first_labels(4)


def test_fake_writer_roundtrip(tmp_path: Path) -> None:
    """The fixture itself: its files decompress to IDX headers with the right magic and sizes."""
    data = write_fake_fashion_mnist(tmp_path, n_train=5, n_test=3)
    header = gzip.decompress((tmp_path / "train-images-idx3-ubyte.gz").read_bytes())[:16]
    assert header == bytes([0, 0, 8, 3]) + (5).to_bytes(4, "big") + (28).to_bytes(4, "big") * 2
    assert os.path.getsize(tmp_path / "t10k-labels-idx1-ubyte.gz") > 0 and len(data.test_labels) == 3
