"""Writers of small FashionMNIST-format data sets (gzip'd IDX files, as Debian ships them), for the tests.

A module of its own (not conftest.py), so tests can import it under a name no other conftest shadows.
"""

from __future__ import annotations

import gzip
import struct
from dataclasses import dataclass
from pathlib import Path

import torch

from experiments.data import RAW_FILES

N_TRAIN, N_TEST = 64, 32


def idx_bytes(array: torch.Tensor) -> bytes:
    """The IDX encoding of a uint8 tensor: 0, 0, type 0x08 (ubyte), ndim, big-endian int32 dims, data."""
    assert array.dtype == torch.uint8
    header = bytes([0, 0, 0x08, array.dim()]) + struct.pack(f">{array.dim()}I", *array.shape)
    return header + array.contiguous().numpy().tobytes()


@dataclass(frozen=True)
class FakeFashionMNIST:
    """A fake system directory (like /usr/share/datasets/fashion-mnist) and the tensors written into it."""

    system_dir: Path
    train_images: torch.Tensor  # uint8 N,28,28
    train_labels: torch.Tensor  # uint8 N
    test_images: torch.Tensor
    test_labels: torch.Tensor

    def raw_bytes(self) -> dict[str, bytes]:
        """The decompressed IDX bytes of each file, by torchvision's file name."""
        tensors = (self.train_images, self.train_labels, self.test_images, self.test_labels)
        return {name: idx_bytes(t) for name, t in zip(RAW_FILES, tensors, strict=True)}


def write_fake_fashion_mnist(directory: Path, n_train: int = N_TRAIN, n_test: int = N_TEST) -> FakeFashionMNIST:
    """Random images (all 256 grey levels occur) and labels cycling through 0..9, gzip'd as Debian ships."""
    gen = torch.Generator().manual_seed(1234)
    data = FakeFashionMNIST(
        system_dir=directory,
        train_images=torch.randint(0, 256, (n_train, 28, 28), generator=gen, dtype=torch.uint8),
        train_labels=(torch.arange(n_train) % 10).to(torch.uint8),
        test_images=torch.randint(0, 256, (n_test, 28, 28), generator=gen, dtype=torch.uint8),
        test_labels=((torch.arange(n_test) + 3) % 10).to(torch.uint8),
    )
    directory.mkdir(parents=True, exist_ok=True)
    for name, payload in data.raw_bytes().items():
        (directory / f"{name}.gz").write_bytes(gzip.compress(payload))
    return data
