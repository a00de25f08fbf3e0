"""Exports of a (pruned) model for other runtimes: ONNX and `torch.export`.

ONNX goes through the `torch.onnx` dynamo exporter (torch.export, then onnxscript), which
handles the rewritten graphs `prune` hands back (patched shape constants, split attention)
like any other module. `onnx` and `onnxscript` are optional dependencies, imported by
torch.onnx on first use; `onnx_error` runs the file in ONNX Runtime against eager PyTorch.
Sparse layers (`SparseLinear`, `SparseConv2d`) call sparsefx's own operators, which ONNX has
no op for: in ONNX they become the dense layer they stand for (pruned weights stored as zeros,
so the file is as large and as fast as the dense layer); format="torch.export" keeps the
sparse operators and their compressed weights.
"""

from __future__ import annotations

import contextlib
import importlib.util
import io
import os
from pathlib import Path

import torch
from torch import nn

from sparsefx.capture.compare import first_tensor, output_error
from sparsefx.capture.trace import as_inputs
from sparsefx.errors import SparsefxError, one_line
from sparsefx.log import quiet
from sparsefx.sparse.sparsify import dense_equivalent

FORMATS = ("onnx", "torch.export")
ONNX_PACKAGES = ("onnx", "onnxscript")
EXTERNAL_DATA_BYTES = 1 << 30  # protobuf caps a file at 2 GiB: larger weights go to a side file


class ExportError(SparsefxError):
    """A model that cannot be exported in the asked format."""


def export(model: nn.Module, example_inputs: object, path: str | Path, format: str = "onnx") -> Path:
    """Write `model` as an ONNX file or a `torch.export.save` archive traced on `example_inputs`."""
    if not isinstance(model, nn.Module):
        raise ExportError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    if format not in FORMATS:
        raise ExportError(f"unknown export format {format!r}; use one of {', '.join(FORMATS)}")
    path = Path(path)
    if not path.parent.is_dir():
        raise ExportError(f"directory {str(path.parent)!r} does not exist: create it or export elsewhere")
    inputs = as_inputs(example_inputs)
    model = model.eval()
    staging = path.with_name(f".{path.stem}.{os.getpid()}.partial{path.suffix}")  # the suffix tells the format
    try:
        if format == "onnx":
            _export_onnx(model, inputs, staging)
        else:
            _export_program(model, inputs, staging)
        os.replace(staging, path)
    finally:
        staging.unlink(missing_ok=True)
    return path


def _export_program(model: nn.Module, inputs: tuple, path: Path) -> None:
    try:
        program = torch.export.export(model, inputs, strict=False)
    except Exception as error:  # torch.export names the construct it cannot capture
        raise ExportError(f"torch.export cannot capture the model: {one_line(error)}") from None
    torch.export.save(program, path)


def _export_onnx(model: nn.Module, inputs: tuple, path: Path) -> None:
    missing = [name for name in ONNX_PACKAGES if importlib.util.find_spec(name) is None]
    if missing:
        raise ExportError(f"ONNX export needs {' and '.join(missing)}: pip install {' '.join(missing)}")
    model = dense_equivalent(model)  # ONNX has no op for sparsefx's sparse kernels
    large = sum(t.numel() * t.element_size() for t in model.state_dict().values()) > EXTERNAL_DATA_BYTES
    try:
        # the exporter prints its progress; its optimizer logs constant folds it skipped (not actionable)
        with contextlib.redirect_stdout(io.StringIO()), quiet("onnxscript", "torch.onnx"):
            torch.onnx.export(model, inputs, str(path), dynamo=True, external_data=large, verbose=False)
    except Exception as error:  # the exporter's errors name the op it could not translate
        raise ExportError(f"ONNX export failed: {one_line(error)}") from None


def onnx_error(path: str | Path, model: nn.Module, example_inputs: object) -> float:
    """Relative L2 error of the ONNX file's first output in ONNX Runtime against `model` in eager."""
    if importlib.util.find_spec("onnxruntime") is None:
        raise ExportError("checking an ONNX file needs onnxruntime: pip install onnxruntime")
    import onnxruntime  # optional dependency: only this check needs it

    inputs = as_inputs(example_inputs)
    session = onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    feed = {arg.name: x.detach().cpu().numpy() for arg, x in zip(session.get_inputs(), inputs)}
    actual = torch.from_numpy(session.run(None, feed)[0])
    with torch.no_grad():
        expected = first_tensor(model.eval()(*inputs))
    return output_error(expected, actual).relative_l2
