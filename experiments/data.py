"""FashionMNIST as in-memory tensors, found offline first (Debian's files), downloaded only as a last resort.

The whole data set (70k 28x28 images, ~220 MB as float32) is loaded into tensors once and batched by
indexing: a per-sample ``DataLoader`` with PIL transforms spends most of a 10-epoch run of this tiny
MLP collating samples, while indexing a tensor costs microseconds per batch.
"""

from __future__ import annotations

import gzip
import os
import shutil
from collections.abc import Iterator
from pathlib import Path

import torch
from lightning.pytorch import LightningDataModule
from torchvision.datasets import FashionMNIST

#: Where Debian's ``dataset-fashion-mnist`` package puts the original gzip'd IDX files.
SYSTEM_DIR = Path("/usr/share/datasets/fashion-mnist")
#: Environment variable that points the offline lookup somewhere else (tests use it).
SYSTEM_DIR_ENV = "FASHION_MNIST_SYSTEM_DIR"
#: Anything naming a path.
PathArg = str | os.PathLike[str]
#: The decompressed IDX file names torchvision expects under ``<root>/FashionMNIST/raw/``.
RAW_FILES = (
    "train-images-idx3-ubyte",
    "train-labels-idx1-ubyte",
    "t10k-images-idx3-ubyte",
    "t10k-labels-idx1-ubyte",
)


class FashionMNISTUnavailableError(RuntimeError):
    """Neither a local copy, nor Debian's package, nor torchvision's download gave the data."""


def system_dir(override: PathArg | None = None) -> Path:
    """The directory searched for Debian's gzip'd files: the argument, else ``$FASHION_MNIST_SYSTEM_DIR``,
    else :data:`SYSTEM_DIR`."""
    if override is not None:
        return Path(override)
    env = os.environ.get(SYSTEM_DIR_ENV)
    return Path(env) if env else SYSTEM_DIR


def raw_dir(data_dir: PathArg) -> Path:
    """Where torchvision's ``FashionMNIST(root=data_dir)`` reads the decompressed IDX files."""
    return Path(data_dir) / "FashionMNIST" / "raw"


def _have_raw(data_dir: PathArg) -> bool:
    return all((raw_dir(data_dir) / name).is_file() for name in RAW_FILES)


def install_from_system(data_dir: PathArg, source: PathArg | None = None) -> bool:
    """Decompress the system's ``*.gz`` files into ``<data_dir>/FashionMNIST/raw/``.

    Debian's gzip files differ byte-wise from the ones torchvision checks md5 sums of, so they cannot be
    handed to torchvision as downloads; their decompressed IDX contents are the same data, and torchvision
    does not check sums of the decompressed files. Returns False (and writes nothing) unless all four exist.
    """
    src = system_dir(source)
    gz_files = [src / f"{name}.gz" for name in RAW_FILES]
    if not all(path.is_file() for path in gz_files):
        return False
    dest = raw_dir(data_dir)
    dest.mkdir(parents=True, exist_ok=True)
    for gz_path, name in zip(gz_files, RAW_FILES, strict=True):
        target = dest / name
        if target.is_file():
            continue
        # Write then rename, so an interrupted run never leaves a truncated file that looks complete.
        partial = target.with_suffix(".partial")
        with gzip.open(gz_path, "rb") as fin, open(partial, "wb") as fout:
            shutil.copyfileobj(fin, fout)
        partial.replace(target)
    return True


def ensure_fashion_mnist(data_dir: PathArg, source: PathArg | None = None) -> Path:
    """Make sure the raw IDX files exist under ``data_dir``; return their directory.

    Order: files already there, then the system's (Debian) copy, then torchvision's download.
    Raises :class:`FashionMNISTUnavailableError` saying where it looked and how to get the data.
    """
    if _have_raw(data_dir) or install_from_system(data_dir, source):
        return raw_dir(data_dir)
    try:
        for train in (True, False):
            FashionMNIST(root=str(data_dir), train=train, download=True)
    except Exception as err:  # any failure (no network, bad checksum, ...) gets the same advice
        raise FashionMNISTUnavailableError(_unavailable_message(data_dir, source, err)) from err
    return raw_dir(data_dir)


def _unavailable_message(data_dir: PathArg, source: PathArg | None, err: BaseException) -> str:
    return (
        "FashionMNIST is not available. Looked for:\n"
        f"  - decompressed IDX files in {raw_dir(data_dir)}\n"
        f"  - Debian's gzip'd files in {system_dir(source)} (override with ${SYSTEM_DIR_ENV})\n"
        f"  - torchvision's download, which failed: {type(err).__name__}: {err}\n"
        "Get the data either way:\n"
        "  - sudo apt-get install dataset-fashion-mnist   (Debian/Ubuntu; no network needed afterwards)\n"
        "  - or run once with network access, so torchvision can download it into the data dir."
    )


def load_split(data_dir: PathArg, train: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """One split as ``(images float32 N,1,28,28 in [0, 1], labels int64 N)``; expects the raw files."""
    dataset = FashionMNIST(root=str(data_dir), train=train, download=False)
    images = dataset.data.unsqueeze(1).to(torch.float32).div_(255.0)
    return images, dataset.targets.to(torch.int64)


class TensorBatchLoader:
    """Batches of ``(x, y)`` cut from in-memory tensors; a Lightning-compatible dataloader (iterable + len).

    With ``shuffle`` each pass draws a fresh permutation from ``generator``, so the order is reproducible
    from the generator's seed and independent of how much the model draws from the global RNG.
    """

    def __init__(
        self,
        x: torch.Tensor,
        y: torch.Tensor,
        batch_size: int,
        shuffle: bool = False,
        generator: torch.Generator | None = None,
        drop_last: bool = False,
    ) -> None:
        if len(x) != len(y):
            raise ValueError(f"x and y differ in length: {len(x)} != {len(y)}")
        if batch_size < 1:
            raise ValueError(f"batch_size must be positive, got {batch_size}")
        self.x, self.y = x, y
        self.batch_size = batch_size
        self.shuffle = shuffle
        self.generator = generator
        self.drop_last = drop_last

    def __len__(self) -> int:
        n = len(self.x)
        return n // self.batch_size if self.drop_last else -(-n // self.batch_size)

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        n = len(self.x)
        order = torch.randperm(n, generator=self.generator) if self.shuffle else None
        for i in range(len(self)):
            start = i * self.batch_size
            if order is None:  # contiguous slices are views: no copy at all
                yield self.x[start : start + self.batch_size], self.y[start : start + self.batch_size]
            else:
                idx = order[start : start + self.batch_size]
                yield self.x[idx], self.y[idx]


class FashionMNISTDataModule(LightningDataModule):
    """FashionMNIST train (60k, shuffled) and test set as validation (10k), as :class:`TensorBatchLoader` s.

    Seed-free on purpose: the shuffling generator is seeded from torch's global RNG at ``setup``, so
    ``seed_everything`` (LightningCLI's ``--seed_everything``) fixes the order too.
    """

    def __init__(self, data_dir: str = "data", batch_size: int = 256) -> None:
        super().__init__()
        self.data_dir = data_dir
        self.batch_size = batch_size
        self.train_x: torch.Tensor | None = None
        self.train_y: torch.Tensor | None = None
        self.val_x: torch.Tensor | None = None
        self.val_y: torch.Tensor | None = None
        self.generator: torch.Generator | None = None

    def prepare_data(self) -> None:
        """Find or fetch the files (runs once, before ``setup``)."""
        ensure_fashion_mnist(self.data_dir)

    def setup(self, stage: str | None = None) -> None:
        """Load both splits into tensors (once) and seed the shuffling generator from the global RNG."""
        ensure_fashion_mnist(self.data_dir)  # also when setup() is called without prepare_data()
        if self.train_x is None:
            self.train_x, self.train_y = load_split(self.data_dir, train=True)
            self.val_x, self.val_y = load_split(self.data_dir, train=False)
        seed = int(torch.randint(0, 2**62, (1,)).item())
        self.generator = torch.Generator().manual_seed(seed)

    def train_dataloader(self) -> TensorBatchLoader:
        """Shuffled training batches."""
        assert self.train_x is not None and self.train_y is not None, "call setup() first"
        return TensorBatchLoader(self.train_x, self.train_y, self.batch_size, shuffle=True, generator=self.generator)

    def val_dataloader(self) -> TensorBatchLoader:
        """The 10k test images, in order."""
        assert self.val_x is not None and self.val_y is not None, "call setup() first"
        return TensorBatchLoader(self.val_x, self.val_y, self.batch_size)
