"""Compiled artifacts kept for reuse: compiling a model again (the same code and weights, the same
input shapes, options and target, the same sparsefx, PyTorch and TVM) takes the artifact the first
compile exported instead of compiling again, as ccache does for C and torch.compile's FX graph cache
for inductor. A warm compile of ResNet-50 spent 4 s in TVM's passes and LLVM and 2 s exporting the
library with its weights, on top of 4 s of imports; a hit needs neither TVM nor the export.

The key hashes what decides the compiled code: every parameter and buffer (values, dtypes,
shapes), the module tree (its repr, every module's class and the source file that defines it, the
plain attributes a forward may read), the input shapes and dtypes, the options, the target, and the
sources of sparsefx itself. A model changed anywhere (fine-tuned weights, an edited forward) misses.
What it cannot see: the dispatch tables the first compile decided from (an artifact keeps the
decisions it was compiled with) and globals a forward reads; `cache=False` compiles afresh.

Artifacts live in `cache_dir()/artifacts/<key>.sfx`, written by `CompiledModel.export`; the least
recently used go beyond `SPARSEFX_ARTIFACTS_GB` (default 4) GB. One that cannot be loaded is
deleted and the model compiled again. Nothing here imports TVM.
"""

from __future__ import annotations

import functools
import hashlib
import inspect
import json
import os
import shutil
import tarfile
from pathlib import Path

import torch
from torch import nn

from sparsefx.cache import cache_dir
from sparsefx.log import get_logger
from sparsefx.target import Target, tvm_version

LOG = get_logger("artifacts")
PLAIN = (bool, int, float, str, type(None))


def compile_key(model: nn.Module, inputs: tuple, target: Target, threads: int, precision: str, dispatch: bool | str,
                tune: int) -> str | None:
    """The key `model` compiled from `inputs` with these (checked) options is kept under; None where the
    model's state cannot be read as bytes (packed quantized weights, the meta device): it is not kept."""
    measured = ("peak_gflops", "bandwidth_gbs")  # filled in once measured: the same target before and after
    options = {"target": {k: v for k, v in target.as_dict().items() if k not in measured}, "threads": threads,
               "precision": precision, "dispatch": dispatch, "tune": tune}
    digest = hashlib.sha256()
    head = {"options": options, "inputs": [(tuple(x.shape), str(x.dtype)) for x in inputs],
            "versions": [_sources_digest(), torch.__version__, tvm_version()], "tree": _tree(model)}
    digest.update(json.dumps(head, sort_keys=True, default=str).encode())
    try:
        for name, tensor in model.state_dict().items():
            if not isinstance(tensor, torch.Tensor):  # extra state: a plain value or a dtype stands for itself
                if not isinstance(tensor, (*PLAIN, torch.dtype)):
                    return None  # packed parameters (quantized modules): their repr elides values
                digest.update(f"{name}|{tensor!r}".encode())
                continue
            tensor = tensor.detach().cpu()
            tensor = (tensor.to_dense() if tensor.layout != torch.strided else tensor).contiguous()
            digest.update(f"{name}|{tensor.dtype}|{tuple(tensor.shape)}".encode())
            digest.update(tensor.reshape(-1).view(torch.uint8).numpy())
    except (RuntimeError, NotImplementedError, TypeError):
        return None
    return digest.hexdigest()[:32]


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


def _tree(model: nn.Module) -> list:
    """The module tree as far as it decides the code: repr, classes and their source, plain attributes."""
    modules = [[name, type(m).__module__, type(m).__qualname__, _file_digest(type(m)),
                {k: v for k, v in vars(m).items() if not k.startswith("_") and isinstance(v, PLAIN)}]
               for name, m in model.named_modules()]
    return [repr(model), modules]


@functools.cache
def _file_digest(cls: type) -> str:
    try:
        return hashlib.sha256(Path(inspect.getfile(cls)).read_bytes()).hexdigest()
    except (TypeError, OSError):  # defined in a notebook or at the prompt: its name stands for it
        return ""


@functools.cache
def _sources_digest() -> str:
    """sparsefx's own code: an edit to a pass changes what compiling produces."""
    digest = hashlib.sha256()
    package = Path(__file__).resolve().parents[1]
    for path in sorted(package.rglob("*.py")):
        digest.update(str(path.relative_to(package)).encode())
        digest.update(path.read_bytes())
    return digest.hexdigest()
