"""Compiled artifacts kept for reuse: compiling a model again (the same code and weights, the same
input shapes, options and target, the same sparsefx, PyTorch and TVM) takes the artifact the first
compile exported instead of compiling again, as ccache does for C and torch.compile's FX graph cache
for inductor. A warm compile of ResNet-50 spent 4 s in TVM's passes and LLVM and 2 s exporting the
library with its weights, on top of 4 s of imports; a hit needs neither TVM nor the export.

The key hashes what decides the compiled code: the model as `capture.identity` sees it (weights,
module tree, sparsefx's sources), the input shapes and dtypes, the options, the target and TVM's
version. A model changed anywhere (fine-tuned weights, an edited forward) misses. What it cannot
see: the dispatch tables the first compile decided from (an artifact keeps the decisions it was
compiled with) and globals a forward reads; `cache=False` compiles afresh.

Artifacts live in `cache_dir()/artifacts/<key>.sfx`, written by `CompiledModel.export`; the least
recently used go beyond `SPARSEFX_ARTIFACTS_GB` (default 4) GB. One that cannot be loaded is
deleted and the model compiled again. Nothing here imports TVM or PyTorch (the key is
`capture.identity.compile_key`).
"""

from __future__ import annotations

import json
import os
import shutil
import tarfile
from pathlib import Path

from sparsefx.cache import cache_dir
from sparsefx.log import get_logger

LOG = get_logger("artifacts")


def cached(key: str) -> Path | None:
    """The artifact kept under `key`, marked as just used; None when there is none, or when it is
    damaged (then it is dropped with a warning)."""
    path = _root() / f"{key}.sfx"
    if not path.is_file():
        return None
    if not is_whole(path):
        LOG.warning(f"a kept compiled artifact is damaged ({path}); compiling again")
        forget(key)
        return None
    os.utime(path)  # least recently used goes first
    return path


def keep(key: str, artifact: Path) -> None:
    """Keep a copy of the exported `artifact` under `key` (atomically), then trim the cache."""
    root = _root()
    part = root / f"{key}.{os.getpid()}.part"
    try:
        shutil.copyfile(artifact, part)
        os.replace(part, root / f"{key}.sfx")
    except OSError as error:  # a full disk costs the reuse, never the compile
        LOG.warning(f"compiled artifact not kept for reuse ({error.strerror or error})")
        part.unlink(missing_ok=True)
        return
    _trim(root, float(os.environ.get("SPARSEFX_ARTIFACTS_GB", "4")) * 1e9)


def forget(key: str) -> None:
    """Drop the artifact kept under `key` (it could not be loaded)."""
    (_root() / f"{key}.sfx").unlink(missing_ok=True)


def is_whole(path: Path) -> bool:
    """Whether an artifact file holds its manifest and all of its library (not truncated, not another file)."""
    try:
        with tarfile.open(path) as tar:
            members = {m.name: m for m in tar.getmembers()}
        last = max(members.values(), key=lambda m: m.offset_data)
        return {"manifest.json", "model.so"} <= members.keys() and path.stat().st_size >= last.offset_data + last.size
    except (tarfile.TarError, OSError, ValueError):
        return False


def manifest_of(path: Path) -> dict:
    """The manifest of an exported artifact, read without loading its library."""
    with tarfile.open(path) as tar:
        member = tar.extractfile("manifest.json")
        if member is None:
            raise tarfile.TarError("no manifest.json")
        return json.loads(member.read())


def _root() -> Path:
    root = cache_dir() / "artifacts"
    root.mkdir(parents=True, exist_ok=True)
    return root


def _trim(root: Path, budget: float) -> None:
    files = sorted(root.glob("*.sfx"), key=lambda p: p.stat().st_mtime, reverse=True)
    total = 0
    for path in files:
        total += path.stat().st_size
        if total > budget and path != files[0]:  # the newest stays, however large
            path.unlink(missing_ok=True)
