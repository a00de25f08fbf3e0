"""sparsefx.export: pruned models to ONNX (checked in ONNX Runtime) and to torch.export archives."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import sparsefx
from sparsefx.backends.export import ExportError, onnx_error
from sparsefx.capture.compare import TOLERANCE, calibrate_norm_statistics, check_reference, first_tensor
from sparsefx.capture.models import load_model
from sparsefx.cli.main import main
from sparsefx.sparse.layers import SparseConv2d, SparseLinear
from tests import persist_models


def _torchvision(name: str):
    model, _ = load_model(f"torchvision:{name}")
    inputs = (torch.randn(1, 3, 64, 64),)
    calibrate_norm_statistics(model, inputs)  # random init: MobileNetV2's output is 1e-11 without it
    return sparsefx.prune(model, inputs, 0.5), inputs


PRUNED = {"resnet18": lambda: _torchvision("resnet18"), "mobilenet_v2": lambda: _torchvision("mobilenet_v2"),
          "vit": lambda: (lambda m, x: (sparsefx.prune(m, x, 0.5), x))(*persist_models.vit()),
          "bert": lambda: (lambda m, x: (sparsefx.prune(m, x, 0.5), x))(*persist_models.bert())}


@pytest.mark.parametrize("name", PRUNED)
def test_pruned_model_exports_to_onnx_and_matches_onnx_runtime(name, tmp_path):
    pytest.importorskip("onnxruntime")
    pruned, inputs = PRUNED[name]()
    check_reference(pruned, inputs)  # the output depends on the input and is not near zero
    path = sparsefx.export(pruned, inputs, tmp_path / f"{name}.onnx")
    assert onnx_error(path, pruned, inputs) < TOLERANCE
    assert [p.name for p in tmp_path.iterdir()] == [f"{name}.onnx"]  # no staging file left


def test_torch_export_archive_round_trip(tmp_path):
    pruned, inputs = persist_models.vit()
    pruned = sparsefx.prune(pruned, inputs, 0.5)
    path = sparsefx.export(pruned, inputs, tmp_path / "vit.pt2", format="torch.export")
    program = torch.export.load(path)
    with torch.no_grad():
        assert torch.equal(first_tensor(program.module()(*inputs)), check_reference(pruned, inputs))


def _sparse_model():
    """Block-sparse (BSR) and 2:4 (N:M) convs and linears, the way masked training ends (to_sparse)."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(4, 8, 3, padding=1), nn.ReLU(), nn.Conv2d(8, 8, 3, stride=2), nn.Flatten(),
                          nn.Linear(72, 16), nn.ReLU(), nn.Linear(16, 4)).eval()
    plan = {"0": sparsefx.Sparsity(0.5, "nm", m=4), "2": sparsefx.Sparsity(0.5, "block", (4, 1)),
            "4": sparsefx.Sparsity(0.5, "block", (4, 1)), "6": sparsefx.Sparsity(0.5, "nm", m=4)}
    sparsefx.apply_masks(model, sparsefx.compute_masks(model, plan))
    sparse = sparsefx.to_sparse(model)
    assert {(type(m).__name__, m.format) for m in sparse.modules() if hasattr(m, "format")} == {
        ("SparseConv2d", "nm"), ("SparseConv2d", "bsr"), ("SparseLinear", "bsr"), ("SparseLinear", "nm")}
    return sparse, (torch.randn(2, 4, 8, 8),)


def test_sparse_layers_export_to_onnx_as_their_dense_equivalent(tmp_path):
    pytest.importorskip("onnxruntime")
    onnx = pytest.importorskip("onnx")
    sparse, inputs = _sparse_model()
    expected = check_reference(sparse, inputs)
    path = sparsefx.export(sparse, inputs, tmp_path / "sparse.onnx")
    assert onnx_error(path, sparse, inputs) < TOLERANCE
    ops = {node.op_type for node in onnx.load(path).graph.node}
    assert {"Conv", "Gemm"} <= ops or {"Conv", "MatMul"} <= ops
    with torch.no_grad():  # the model exported is left as it was: sparse layers, same output
        assert sum(isinstance(m, (SparseConv2d, SparseLinear)) for m in sparse.modules()) == 4
        assert torch.equal(sparse(*inputs), expected)


def test_sparse_layers_keep_their_kernels_in_a_torch_export_archive(tmp_path):
    sparse, inputs = _sparse_model()
    program = torch.export.load(sparsefx.export(sparse, inputs, tmp_path / "sparse.pt2", format="torch.export"))
    targets = {str(node.target) for node in program.graph.nodes if node.op == "call_function"}
    assert {"sparsefx.bsr_conv2d.default", "sparsefx.nm_conv2d.default", "sparsefx.bsr_linear.default",
            "sparsefx.nm_linear.default"} <= targets
    with torch.no_grad():
        assert torch.equal(program.module()(*inputs), check_reference(sparse, inputs))


@pytest.mark.parametrize(("kwargs", "match"), [
    ({"format": "tflite"}, "unknown export format 'tflite'"),
    ({"path": "/no/such/dir/m.onnx"}, "does not exist"),
])
def test_bad_export_requests_are_one_line_errors(tmp_path, kwargs, match):
    model, inputs = load_model("default")
    arguments = {"path": tmp_path / "m.onnx", **kwargs}
    with pytest.raises(ExportError, match=match) as error:
        sparsefx.export(model, inputs, **arguments)
    assert "\n" not in str(error.value)


def test_cli_exports_a_saved_pruned_model_and_a_spec(tmp_path, capsys):
    assert main(["prune", "default", "--repeat", "2", "--out", str(tmp_path / "pruned")]) == 0
    # a sparsefx.save directory: rebuilt from its stored spec, example input from its removal record
    assert main(["export", str(tmp_path / "pruned"), "--out", str(tmp_path / "pruned.onnx")]) == 0
    report = capsys.readouterr().out
    assert float(report.split("relative L2 error ")[1].split()[0]) < TOLERANCE
    assert main(["export", "default", "--ratio", "0.5", "--format", "torch.export",
                 "--out", str(tmp_path / "pruned.pt2")]) == 0
    model, inputs = load_model("default")
    exported = torch.export.load(tmp_path / "pruned.pt2").module()
    assert sparsefx.count_params(exported) < sparsefx.count_params(model)
    assert exported(*inputs).shape == model(*inputs).shape
