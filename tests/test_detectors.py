"""Detectors and segmenters prune: Ultralytics YOLO (split/concat blocks, SPPF, the Detect head's
DFL and anchors) and a torchvision segmentation model keep their output shapes."""

from __future__ import annotations

import pytest
import torch
import torchvision

import sparsefx
from sparsefx.capture.compare import calibrate_norm_statistics, check_reference, output_error

from .test_exactness import zero_lowest_classes

tasks = pytest.importorskip("ultralytics.nn.tasks", reason="ultralytics (dev extra) is not installed")


def leaf_shapes(output: object) -> list[tuple[int, ...]]:
    return [tuple(t.shape) for t in torch.utils._pytree.tree_leaves(output) if isinstance(t, torch.Tensor)]


def test_yolov8n_pruned_equals_dense_with_those_channels_zeroed() -> None:
    torch.manual_seed(0)
    model, inputs = tasks.DetectionModel("yolov8n.yaml", verbose=False).eval(), (torch.randn(1, 3, 160, 160),)
    calibrate_norm_statistics(model, inputs)  # random BN statistics would leave the class scores near constant
    assert zero_lowest_classes(model, inputs, 0.3, "auto") > 0
    with torch.no_grad():
        dense = model(*inputs)
    expected = check_reference(model, inputs)  # boxes and class scores (1, 4 + 80, anchors), input-dependent
    pruned = sparsefx.prune(model, inputs, ratio=0.3, importance="l1")
    assert type(pruned) is tasks.DetectionModel  # back in the Ultralytics object, not a bare graph
    assert sparsefx.count_params(pruned) < 0.75 * sparsefx.count_params(model)
    with torch.no_grad():
        output = pruned(*inputs)
    assert leaf_shapes(output) == leaf_shapes(dense)
    error = output_error(expected, output[0])
    assert error.ok(), error


def test_yolo11n_prunes_into_the_ultralytics_object_with_its_attention_block_kept() -> None:
    # C2PSA's forward splits by its own `self.c` and its Attention views by the input's width, so the
    # module can only hold equal halves and an attention as wide as its input: leaving model.10
    # alone keeps the Ultralytics class (otherwise the exact rewritten graph comes back).
    torch.manual_seed(0)
    model, inputs = tasks.DetectionModel("yolo11n.yaml", verbose=False).eval(), (torch.randn(1, 3, 160, 160),)
    with torch.no_grad():
        dense = model(*inputs)
    pruned = sparsefx.prune(model, inputs, ratio=0.5, ignore=["model.10"])
    assert type(pruned) is tasks.DetectionModel
    assert sparsefx.count_params(pruned) < 0.5 * sparsefx.count_params(model)
    with torch.no_grad():
        assert leaf_shapes(pruned(*inputs)) == leaf_shapes(dense)


def test_segmentation_model_prunes_with_its_output_shape() -> None:
    torch.manual_seed(0)
    model = torchvision.models.segmentation.lraspp_mobilenet_v3_large(weights=None, weights_backbone=None).eval()
    inputs = (torch.randn(1, 3, 96, 96),)
    with torch.no_grad():
        dense = model(*inputs)["out"]
    pruned = sparsefx.prune(model, inputs, ratio=0.5)
    with torch.no_grad():
        assert pruned(*inputs)["out"].shape == dense.shape == (1, 21, 96, 96)
    assert sparsefx.count_macs(pruned, inputs) < 0.6 * sparsefx.count_macs(model, inputs)
