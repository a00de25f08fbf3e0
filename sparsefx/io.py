"""`sparsefx.save` / `sparsefx.load`: pruned and sparse models on disk without pickle.

A saved model is a directory: `model.safetensors` (the weights) and `sparsefx.json` (what was
removed: the removal record of `channels.record`, the sparse format of each sparse layer, the
architecture fingerprint, the names, shapes and dtypes of the weights, the sparsefx version and
the format version). Loading builds a fresh dense instance of the architecture, replays the
removal on it (`channels.persist`), swaps in the sparse layers and only then reads the weights,
so every check (architecture, version, indices, weights against the JSON) runs before a weight
is loaded, and nothing is ever unpickled. A compiled artifact (`CompiledModel.export`, a tar)
keeps its own format; `load` tells the two apart and imports TVM only for an artifact.
"""

from __future__ import annotations

import collections
import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import TYPE_CHECKING

import safetensors
import safetensors.torch
import torch
from torch import nn
from torch.nn.utils import parametrize

from sparsefx.capture.models import load_model
from sparsefx.channels.persist import PersistError, replay
from sparsefx.channels.record import fingerprint, removal_of
from sparsefx.errors import SparsefxError, one_line
from sparsefx.sparse.formats import BSR, NM
from sparsefx.sparse.layers import SparseConv2d, SparseLinear
from sparsefx.sparse.sparsify import dense_equivalent
from sparsefx.version import __version__

if TYPE_CHECKING:  # the annotation only: TVM loads for compiled artifacts alone
    from sparsefx.backends.tvm.compiler import CompiledModel

FORMAT = "sparsefx-pruned"
FORMAT_VERSION = 1
DESCRIPTION, WEIGHTS = "sparsefx.json", "model.safetensors"
# Specs a file may name for itself: they build a model from a library. A file spec
# (path/to/file.py:FUNC) runs code, so only the caller may pass one.
SELF_BUILDING_SPECS = ("default", "torchvision:", "hf:")


def save(model: nn.Module, path: str | Path, spec: str | None = None) -> Path:
    """Write `model` (pruned by sparsefx, sparse layers allowed) to the directory `path`.

    `spec` (a model spec such as 'torchvision:resnet50') is stored so `load(path)` can build the
    architecture by itself. All or nothing: a failed save leaves `path` as it was."""
    if not isinstance(model, nn.Module):
        raise PersistError(f"sparsefx.save takes a torch.nn.Module, got {type(model).__name__}")
    masked = [name for name, m in model.named_modules() if parametrize.is_parametrized(m)]
    if masked:
        raise PersistError(f"layer {masked[0]!r} is in masked training; end it first with sparsefx.to_sparse(model) "
                           "or sparsefx.remove_masks(model)")
    path = Path(path)
    if not path.parent.is_dir():
        raise PersistError(f"directory {str(path.parent)!r} does not exist: create it or save elsewhere")
    if path.exists() and not is_saved_model(path):
        raise PersistError(f"{path} exists and is not a sparsefx save; choose a new path (nothing is overwritten)")
    record = removal_of(model)
    if record is None:  # never pruned: saved as it is, sparse layers swapped in on load
        record = {"class": type(model).__name__, "fingerprint": fingerprint(dense_equivalent(model)), "steps": []}
    tensors, aliases = _unique_tensors(model.state_dict())
    description = {
        "format": FORMAT, "format_version": FORMAT_VERSION, "sparsefx_version": __version__,
        "model": {"class": record["class"], "fingerprint": record["fingerprint"], "spec": spec,
                  "saved_class": type(model).__name__},
        "removal": record["steps"],
        "sparse": [describe_sparse(name, m) for name, m in model.named_modules()
                   if isinstance(m, (SparseLinear, SparseConv2d))],
        "tensors": {name: {"shape": list(t.shape), "dtype": _dtype_name(t.dtype)} for name, t in tensors.items()},
        "aliases": aliases,
    }
    staging = Path(tempfile.mkdtemp(prefix=f".{path.name}-", dir=path.parent))
    try:
        safetensors.torch.save_file(tensors, staging / WEIGHTS, metadata={"format": FORMAT})
        (staging / DESCRIPTION).write_text(json.dumps(description))
        _readable(staging)
        _replace_dir(staging, path)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return path


def load(path: str | Path, model: nn.Module | str | None = None, threads: int | None = None) -> nn.Module | CompiledModel:
    """Load what `save` wrote (a pruned model; `model` is its dense architecture: an instance
    or a model spec, by default the spec stored at save time) or a compiled artifact (run with
    the threads it was compiled for unless `threads` says otherwise)."""
    path = Path(path)
    if path.is_dir():
        return load_pruned(path, model)
    if not path.exists():
        raise PersistError(f"nothing at {path}; write a pruned model with sparsefx.save(model, path)")
    from sparsefx.backends import tvm as backend  # TVM loads for compiled artifacts only

    return backend.load(path, threads)


def is_saved_model(path: str | Path) -> bool:
    return (Path(path) / DESCRIPTION).is_file()


def load_pruned(path: Path, model: nn.Module | str | None = None) -> nn.Module:
    """Rebuild and load a `save` directory; every check runs before the first weight is read."""
    description = read_description(path)
    weights = path / WEIGHTS
    if not weights.is_file():
        raise PersistError(f"{path} has no {WEIGHTS}; the save is incomplete, save the model again")
    header = _header(weights)
    declared = {name: (spec["shape"], spec["dtype"]) for name, spec in description["tensors"].items()}
    if header != declared:
        raise PersistError(f"{weights} does not hold the weights {DESCRIPTION} lists ({_first_difference(declared, header)}); "
                           "the files do not belong together, save the model again")
    dense = build_model(model, description["model"].get("spec"), path)
    record = {**description["model"], "steps": description["removal"]}
    pruned = replay(dense, record, str(path))
    for entry in description["sparse"]:
        _put_sparse(pruned, entry, header, path)
    floats = {dtype for _, dtype in declared.values() if getattr(torch, dtype).is_floating_point}
    if len(floats) == 1:  # a model saved in half precision loads in half precision
        pruned.to(getattr(torch, floats.pop()))
    expected = {name: list(t.shape) for name, t in pruned.state_dict().items()}
    stored = {name: declared[description["aliases"].get(name, name)][0] for name in expected
              if description["aliases"].get(name, name) in declared}
    if stored != expected or set(declared) - set(expected):
        raise PersistError(f"{path}: the rebuilt model's weights differ from the saved ones "
                           f"({_first_difference(expected, stored)}); the JSON does not match the weights")
    state = collections.OrderedDict(safetensors.torch.load_file(weights))
    state.update({name: state[target] for name, target in description["aliases"].items()})
    # the per-module versions a state_dict carries beside its tensors, which safetensors does not
    # store: taken from the rebuilt model (torchvision's MNASNet refuses a state without them)
    state._metadata = getattr(pruned.state_dict(), "_metadata", None)
    pruned.load_state_dict(state, strict=True)
    return pruned


def read_description(path: Path) -> dict:
    """The parsed sparsefx.json, refused when it is not one this version can read."""
    try:
        description = json.loads((path / DESCRIPTION).read_text())
    except FileNotFoundError:
        raise PersistError(f"{path} has no {DESCRIPTION}: it was not written by sparsefx.save") from None
    except (OSError, ValueError) as error:
        raise PersistError(f"{path / DESCRIPTION} is not readable JSON ({one_line(error)}); save the model again") from None
    if not isinstance(description, dict) or description.get("format") != FORMAT:
        raise PersistError(f"{path / DESCRIPTION} is not a sparsefx pruned-model description; save the model again")
    version = description.get("format_version")
    if not isinstance(version, int) or version > FORMAT_VERSION:
        raise PersistError(f"{path} has format version {version!r}, newer than this sparsefx reads "
                           f"({FORMAT_VERSION}); upgrade sparsefx (saved by {description.get('sparsefx_version')})")
    if not _well_formed(description):
        raise PersistError(f"{path / DESCRIPTION} is missing fields or has fields of the wrong type; "
                           "the file is corrupt or edited")
    return description


def _well_formed(description: dict) -> bool:
    """The fields load reads, with the types it reads them as (indices are checked by the replay)."""
    model, tensors, aliases = description.get("model"), description.get("tensors"), description.get("aliases")
    steps, sparse = description.get("removal"), description.get("sparse")
    return (isinstance(model, dict) and isinstance(model.get("fingerprint"), str)
            and isinstance(steps, list) and all(_well_formed_step(step) for step in steps)
            and isinstance(sparse, list) and all(isinstance(e, dict) for e in sparse)
            and isinstance(aliases, dict) and all(isinstance(t, str) for t in aliases.values())
            and isinstance(tensors, dict) and all(
                isinstance(t, dict) and isinstance(t.get("shape"), list) and t.get("dtype") in DTYPES
                for t in tensors.values()))


def _well_formed_step(step: object) -> bool:
    return (isinstance(step, dict) and isinstance(step.get("kept"), list) and isinstance(step.get("inputs"), list)
            and all(isinstance(x, dict) and x.get("dtype") in DTYPES and isinstance(x.get("shape"), list)
                    for x in step["inputs"]))


def build_model(model: nn.Module | str | None, saved_spec: str | None, path: Path) -> nn.Module:
    """The fresh dense model to replay on: the caller's instance or spec, else the stored spec."""
    if isinstance(model, nn.Module):
        return model
    if model is None:
        if saved_spec is None:
            raise PersistError(f"{path} names no model spec; pass model= an instance or a spec of its architecture "
                               "(sparsefx CLI: --arch SPEC)")
        if not saved_spec.startswith(SELF_BUILDING_SPECS):
            raise PersistError(f"{path} names the model file spec {saved_spec!r}, which runs code; pass it "
                               "yourself as model= (sparsefx CLI: --arch) if you trust it")
        model = saved_spec
    if not isinstance(model, str):
        raise PersistError(f"model= must be a torch.nn.Module or a model spec string, got {type(model).__name__}")
    try:
        return load_model(model, need_inputs=False)[0]
    except SparsefxError as error:
        raise PersistError(f"model spec {model!r} cannot be built: {error}") from None
    except Exception as error:  # a user's factory or a library may raise anything
        raise PersistError(f"model spec {model!r} cannot be built: {one_line(error)}") from None


def describe_sparse(name: str, layer: SparseLinear | SparseConv2d) -> dict:
    entry = {"layer": name, "class": type(layer).__name__, "format": layer.format, "rows": layer.rows,
             "cols": layer.cols}
    if layer.format == "nm":
        entry["m"] = layer.m
    return entry


def _put_sparse(model: nn.Module, entry: dict, header: dict, path: Path) -> None:
    """Swap the dense layer `entry` names for its sparse layer, tensors sized from the header
    (their values are loaded with the rest of the weights)."""
    name = entry.get("layer", "")
    try:
        dense = model.get_submodule(name)
    except AttributeError:
        dense = None
    kind = {"SparseLinear": nn.Linear, "SparseConv2d": nn.Conv2d}.get(entry.get("class"))
    if kind is None or not isinstance(dense, kind) or dense.weight.shape[0] != entry["rows"] \
            or dense.weight[0].numel() != entry["cols"] or entry.get("format") not in ("bsr", "nm"):
        raise PersistError(f"{path}: sparse layer {name!r} does not fit this model; the file is corrupt or edited")

    def empty(part: str) -> torch.Tensor:
        if f"{name}.{part}" not in header:
            raise PersistError(f"{path}: the weights hold no {name}.{part} for sparse layer {name!r}; save the model again")
        shape, dtype = header[f"{name}.{part}"]
        return torch.zeros(shape, dtype=getattr(torch, dtype))

    shape = (entry["rows"], entry["cols"])
    if entry["format"] == "bsr":
        weight = BSR(empty("values"), empty("indices"), empty("indptr"), shape)
    else:
        values = empty("values")
        weight = NM(values, empty("indices"), values.shape[1] * entry["m"] // entry["cols"], entry["m"], shape)
    if kind is nn.Linear:
        sparse = SparseLinear(weight, dense.bias)
    else:
        sparse = SparseConv2d(weight, dense.bias, dense.kernel_size, dense.stride, dense.padding, dense.dilation)
    model.set_submodule(name, sparse)


def _unique_tensors(state: dict[str, torch.Tensor]) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """Each tensor once (safetensors refuses shared memory); tied names become aliases."""
    tensors: dict[str, torch.Tensor] = {}
    aliases: dict[str, str] = {}
    seen: dict[tuple, str] = {}
    for name, tensor in state.items():
        key = (tensor.data_ptr(), tuple(tensor.shape), tuple(tensor.stride()), tensor.dtype)
        if tensor.numel() and key in seen:
            aliases[name] = seen[key]
            continue
        seen[key] = name
        tensors[name] = tensor.detach().cpu().contiguous().clone()
    return tensors, aliases


def _header(weights: Path) -> dict[str, tuple[list[int], str]]:
    """Names, shapes and dtypes of the stored tensors, read without loading any of them."""
    try:
        with safetensors.safe_open(str(weights), "pt") as f:
            return {name: (list(f.get_slice(name).get_shape()), _dtype_name(f.get_slice(name).get_dtype()))
                    for name in f.keys()}  # noqa: SIM118 (safe_open is not a mapping)
    except Exception as error:  # safetensors raises its own error types for a damaged file
        raise PersistError(f"{weights} is not a readable safetensors file ({one_line(error)}); save the model again") from None


DTYPES = ("float64", "float32", "float16", "bfloat16", "int64", "int32", "int16", "int8", "uint8", "bool")
SAFETENSORS_DTYPES = {"F64": "float64", "F32": "float32", "F16": "float16", "BF16": "bfloat16", "I64": "int64",
                      "I32": "int32", "I16": "int16", "I8": "int8", "U8": "uint8", "BOOL": "bool"}


def _dtype_name(dtype: torch.dtype | str) -> str:
    """One spelling for torch and safetensors dtypes ('float32')."""
    if isinstance(dtype, torch.dtype):
        return str(dtype).removeprefix("torch.")
    return SAFETENSORS_DTYPES.get(dtype, dtype.lower())


def _first_difference(expected: dict, actual: dict) -> str:
    for name in sorted(set(expected) | set(actual)):
        if expected.get(name) != actual.get(name):
            return f"{name}: {expected.get(name, 'missing')} vs {actual.get(name, 'missing')}"
    return "none"


def _readable(staging: Path) -> None:
    """mkdtemp makes a private directory; give it the permissions a plain mkdir would (umask)."""
    umask = os.umask(0)
    os.umask(umask)
    staging.chmod(0o777 & ~umask)
    for file in staging.iterdir():
        file.chmod(0o666 & ~umask)


def _replace_dir(staging: Path, path: Path) -> None:
    """Move the finished `staging` to `path`; an earlier save there goes only once the new one is in place."""
    if not path.exists():
        os.rename(staging, path)
        return
    old = path.with_name(f".{path.name}-old-{os.getpid()}")
    os.rename(path, old)
    os.rename(staging, path)
    shutil.rmtree(old, ignore_errors=True)

