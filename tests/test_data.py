"""Fashion-MNIST loading from IDX files: tiny files written here, and a clear error when absent."""

from __future__ import annotations

import gzip
import struct
from pathlib import Path

import numpy as np
import pytest
import torch

from sparsefx import SparsefxError
from sparsefx.recovery.data import (
    CLASS_NAMES,
    DEFAULT_ROOT,
    FILES,
    MEAN,
    STD,
    fashion_mnist,
    load_split,
    read_idx,
)


def _write_idx(path: Path, array: np.ndarray) -> None:
    header = struct.pack(">BBBB", 0, 0, 0x08, array.ndim) + struct.pack(f">{array.ndim}i", *array.shape)
    with gzip.open(path, "wb") as f:
        f.write(header + array.astype(np.uint8).tobytes())


@pytest.fixture
def root(tmp_path: Path) -> Path:
    rng = np.random.default_rng(0)
    for split, n in (("train", 12), ("test", 5)):
        images, labels = FILES[split]
        _write_idx(tmp_path / images, rng.integers(0, 256, (n, 28, 28)))
        _write_idx(tmp_path / labels, np.arange(n) % 10)
    return tmp_path


def test_reads_idx_and_normalises(root):
    raw = read_idx(root / FILES["train"][0])
    dataset = load_split("train", root)
    x, y = dataset.tensors
    assert x.shape == (12, 1, 28, 28) and x.dtype == torch.float32 and y.dtype == torch.int64
    torch.testing.assert_close(x[3, 0], (torch.tensor(raw[3]).float() / 255 - MEAN) / STD)
    assert y.tolist() == [i % 10 for i in range(12)]
    assert len(load_split("test", root, limit=3)) == 3


def test_loaders_batch_and_shuffle(root):
    data = fashion_mnist(root, batch_size=5, seed=1)
    sizes = [len(y) for _, y in data.train]
    assert sizes == [5, 5, 2] and len(data.train) == 3 and data.class_names == CLASS_NAMES
    assert sorted(torch.cat([y for _, y in data.train]).tolist()) == sorted(i % 10 for i in range(12))
    assert torch.cat([y for _, y in data.test]).tolist() == [0, 1, 2, 3, 4]  # test order is fixed


def test_missing_dataset_says_how_to_install(tmp_path):
    with pytest.raises(SparsefxError, match="sudo apt-get install dataset-fashion-mnist") as info:
        load_split("train", tmp_path)
    assert "\n" not in str(info.value)


def test_bad_files_and_arguments(root):
    (root / FILES["test"][1]).write_bytes(gzip.compress(b"\x00\x00\x99\x01"))
    with pytest.raises(SparsefxError, match="not an IDX file"):
        load_split("test", root)
    with pytest.raises(SparsefxError, match="split must be"):
        load_split("validation", root)


@pytest.mark.skipif(not DEFAULT_ROOT.exists(), reason="dataset-fashion-mnist is not installed")
def test_the_installed_dataset():
    x, y = load_split("test", limit=2000).tensors
    assert x.shape == (2000, 1, 28, 28) and set(y.tolist()) == set(range(10))
    assert abs(float(x.mean())) < 0.1 and abs(float(x.std()) - 1) < 0.1
