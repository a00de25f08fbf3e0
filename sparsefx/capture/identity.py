"""What identifies a model to the caches that keep work done on it (`backends.artifacts` keeps
compiled artifacts, `planning.kept` plans): every parameter and buffer (values, dtypes, shapes), the
module tree (its repr, every module's class and the source file that defines it, the plain attributes
a forward may read) and the sources of sparsefx itself. A model changed anywhere (fine-tuned weights,
an edited forward) is another model. What it cannot see: globals a forward reads.
"""

from __future__ import annotations

import functools
import hashlib
import inspect
import json
from pathlib import Path

import torch
from torch import nn

from sparsefx.target import Target, tvm_version
from sparsefx.version import sources_digest

PLAIN = (bool, int, float, str, type(None))


def model_key(model: nn.Module, head: dict) -> str | None:
    """A key for `model` with `head` (what else decides the work: options, inputs, versions; JSON-able),
    sparsefx's sources and PyTorch's version; None where the model's state cannot be read as bytes
    (packed quantized weights, the meta device): nothing is kept for it."""
    digest = hashlib.sha256()
    head = {**head, "sparsefx_sources": sources_digest(), "torch": torch.__version__, "tree": tree(model)}
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


def compile_key(model: nn.Module, inputs: tuple, target: Target, threads: int, precision: str, dispatch: bool | str,
                tune: int) -> str | None:
    """The key `model` compiled from `inputs` with these (checked) options is kept under
    (`model_key`; `backends.artifacts` keeps it); None where the model cannot be keyed: it is not kept."""
    options = {"target": target.as_key(), "threads": threads, "precision": precision, "dispatch": dispatch,
               "tune": tune}
    return model_key(model, {"options": options, "inputs": [(tuple(x.shape), str(x.dtype)) for x in inputs],
                             "tvm": tvm_version()})


def tree(model: nn.Module) -> list:
    """The module tree as far as it decides the code: repr, classes and their source, plain attributes."""
    modules = [[name, type(m).__module__, type(m).__qualname__, file_digest(type(m)),
                {k: v for k, v in vars(m).items() if not k.startswith("_") and isinstance(v, PLAIN)}]
               for name, m in model.named_modules()]
    return [repr(model), modules]


@functools.cache
def file_digest(cls: type) -> str:
    try:
        return hashlib.sha256(Path(inspect.getfile(cls)).read_bytes()).hexdigest()
    except (TypeError, OSError):  # defined in a notebook or at the prompt: its name stands for it
        return ""
