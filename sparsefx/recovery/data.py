"""Fashion-MNIST from Debian's `dataset-fashion-mnist` package (gzip IDX files), as torch datasets.

Nothing is downloaded: the files come from apt, or from any folder holding the same four
files (tests write tiny ones). Images are normalised with the training set's mean and std.
"""

from __future__ import annotations

import gzip
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import BatchSampler, DataLoader, RandomSampler, SequentialSampler, TensorDataset

from sparsefx.errors import SparsefxError

DEFAULT_ROOT = Path("/usr/share/datasets/fashion-mnist")
INSTALL_HINT = "install it with `sudo apt-get install dataset-fashion-mnist` or pass root= to a folder with the IDX files"
CLASS_NAMES = ("T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot")
FILES = {"train": ("train-images-idx3-ubyte.gz", "train-labels-idx1-ubyte.gz"),
         "test": ("t10k-images-idx3-ubyte.gz", "t10k-labels-idx1-ubyte.gz")}
# Pixel statistics of the 60k training images (in [0, 1]); fixed so that a subset or the
# test split is normalised exactly like the data the model was trained on.
MEAN, STD = 0.2860, 0.3530
# IDX type codes (the third byte of the magic number) -> numpy dtype, big-endian as stored.
IDX_DTYPES = {0x08: np.uint8, 0x09: np.int8, 0x0B: ">i2", 0x0C: ">i4", 0x0D: ">f4", 0x0E: ">f8"}


@dataclass
class FashionMNIST:
    """Train and test loaders plus what a report needs to name the classes."""

    train: DataLoader
    test: DataLoader
    class_names: tuple[str, ...] = CLASS_NAMES


def read_idx(path: Path) -> np.ndarray:
    """Parse one IDX file (gzip or plain): magic 0x0000TTDD, then DD big-endian int32 sizes."""
    opener = gzip.open if path.suffix == ".gz" else open
    try:
        with opener(path, "rb") as f:
            raw = f.read()
    except (OSError, EOFError) as exc:
        raise SparsefxError(f"cannot read IDX file {path}: {exc}") from None
    if len(raw) < 4 or raw[0] or raw[1] or raw[2] not in IDX_DTYPES:
        raise SparsefxError(f"{path} is not an IDX file (bad magic number {raw[:4].hex()})")
    ndim = raw[3]
    dims = tuple(int(d) for d in np.frombuffer(raw, ">i4", count=ndim, offset=4))
    dtype = np.dtype(IDX_DTYPES[raw[2]])
    offset = 4 + 4 * ndim
    if len(raw) - offset != int(np.prod(dims)) * dtype.itemsize:
        raise SparsefxError(f"{path} is truncated: header says {dims}, data has {len(raw) - offset} bytes")
    return np.frombuffer(raw, dtype, offset=offset).reshape(dims)


def load_split(split: str = "train", root: str | Path | None = None, limit: int | None = None) -> TensorDataset:
    """One split as a TensorDataset of (N×1×28×28 float32 normalised images, int64 labels)."""
    if split not in FILES:
        raise SparsefxError(f"split must be 'train' or 'test', got {split!r}")
    folder = Path(root) if root is not None else DEFAULT_ROOT
    paths = [folder / name for name in FILES[split]]
    missing = [p.name for p in paths if not p.exists()]
    if missing:
        raise SparsefxError(f"Fashion-MNIST not found in {folder} (missing {', '.join(missing)}); {INSTALL_HINT}")
    images, labels = read_idx(paths[0]), read_idx(paths[1])
    if images.ndim != 3 or labels.ndim != 1 or len(images) != len(labels):
        raise SparsefxError(f"{folder}: images {images.shape} and labels {labels.shape} do not match")
    if limit is not None:
        images, labels = images[:limit], labels[:limit]
    x = (torch.from_numpy(images.astype(np.float32) / 255.0) - MEAN) / STD
    return TensorDataset(x.unsqueeze(1), torch.from_numpy(labels.astype(np.int64)))


def batches(dataset: TensorDataset, batch_size: int, shuffle: bool = False, seed: int = 0) -> DataLoader:
    """A DataLoader that indexes the tensors once per batch rather than once per sample,
    which is several times faster than per-sample collation for in-memory data."""
    if batch_size < 1:
        raise SparsefxError(f"batch_size must be at least 1, got {batch_size}")
    order = RandomSampler(dataset, generator=torch.Generator().manual_seed(seed)) if shuffle else SequentialSampler(dataset)
    return DataLoader(dataset, sampler=BatchSampler(order, batch_size, drop_last=False), batch_size=None)


def fashion_mnist(root: str | Path | None = None, batch_size: int = 128, train_limit: int | None = None,
                  test_limit: int | None = None, seed: int = 0) -> FashionMNIST:
    """Shuffled train loader and ordered test loader; `*_limit` keeps the first N samples."""
    train = load_split("train", root, train_limit)
    test = load_split("test", root, test_limit)
    return FashionMNIST(batches(train, batch_size, shuffle=True, seed=seed), batches(test, 1000))
