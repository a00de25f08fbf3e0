"""The coverage run's extra model sets: detectors and segmenters (`--detection`), one timm model per
architecture family (`--timm`). Ultralytics and timm are dev-only (ultralytics is AGPL): imported
here, never by sparsefx.

Detection rows: MACs and parameters dense vs pruned, eager latency dense vs pruned (median of
LATENCY_RUNS calls after a warm-up), the class that comes back. A detector whose whole forward
cannot be captured (torchvision's data-dependent box post-processing) has its `backbone`
(ResNet/MobileNet + FPN) pruned instead and put back; the row says so. A model that does not prune
names what freezes it (the widest frozen groups' reasons, as `sparsefx inspect` prints them).
At the largest ratio the pruned part (the whole model, or the backbone) is also compiled with
`sparsefx.compile` on this process's threads: its output checked against eager (`output_error`)
and its latency taken as the eager one is, or the importer's or compiler's error named.
"""

from __future__ import annotations

import copy
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

import timm
import torch
import torchvision
from common import RunRecord
from ultralytics.nn.tasks import DetectionModel

import sparsefx
from sparsefx.capture.compare import calibrate_norm_statistics, check_reference, first_tensor, output_error
from sparsefx.channels.prune import frozen_summary
from sparsefx.errors import one_line

YOLO_SIZE = 640
IMAGE_SIZE = 320  # torchvision detectors and segmenters: big enough for every stride, small for a CPU sweep
LATENCY_RUNS = 5
YOLO = ("yolov8n", "yolov8s", "yolo11n", "yolo11s")
# C2PSA splits by its own `self.c` and its Attention views by the input's width: kept so the pruned
# model stays an Ultralytics DetectionModel (pruned through, the exact rewritten graph comes back).
YOLO_IGNORE = {"yolo11n": ["model.10"], "yolo11s": ["model.10"]}
TORCHVISION_DETECTION = ("fasterrcnn_resnet50_fpn", "retinanet_resnet50_fpn", "ssdlite320_mobilenet_v3_large",
                         "fcos_resnet50_fpn")
SEGMENTATION = ("deeplabv3_resnet50", "deeplabv3_mobilenet_v3_large", "fcn_resnet50", "lraspp_mobilenet_v3_large")


def detection_models() -> list[str]:
    return [f"yolo:{n}" for n in YOLO] + [f"detection:{n}" for n in TORCHVISION_DETECTION] + \
        [f"segmentation:{n}" for n in SEGMENTATION]


def build_detection(name: str) -> tuple[torch.nn.Module, tuple, list[str]]:
    """(model, example inputs, ignore) for 'yolo:NAME', 'detection:NAME' or 'segmentation:NAME'."""
    kind, _, model_name = name.partition(":")
    if kind == "yolo":
        model = DetectionModel(f"{model_name}.yaml", verbose=False)
        return model.eval(), (torch.randn(1, 3, YOLO_SIZE, YOLO_SIZE),), YOLO_IGNORE.get(model_name, [])
    family = {"detection": torchvision.models.detection, "segmentation": torchvision.models.segmentation}[kind]
    model = getattr(family, model_name)(weights=None, weights_backbone=None).eval()
    image = torch.randn(3, IMAGE_SIZE, IMAGE_SIZE)
    return model, (([image],) if kind == "detection" else (image[None],)), []


def eager_ms(model: torch.nn.Module, inputs: tuple) -> float:
    # no_grad, not inference_mode: YOLO's Detect caches anchors from a call, and inference tensors
    # cached that way break the torch.export capture of the next prune
    with torch.no_grad():
        model(*inputs)
        times = []
        for _ in range(LATENCY_RUNS):
            started = time.perf_counter()
            model(*inputs)
            times.append(time.perf_counter() - started)
    return round(statistics.median(times) * 1e3, 2)


def tvm_check(model: torch.nn.Module, inputs: tuple) -> dict:
    """Compile the pruned part with sparsefx: 'ok' with its ms, or why not. Batch norms are
    re-estimated on the input first (changing the model, timed already): random-init YOLO heads
    output anchors and ~1e-5 class scores that barely move with the input, a vacuous comparison."""
    try:
        calibrate_norm_statistics(model, inputs)
        expected = check_reference(model, inputs)
        compiled = sparsefx.compile(model, inputs, verbose=False, threads=torch.get_num_threads())
        error = output_error(expected, first_tensor(compiled(*inputs)))
        return {"tvm": "ok" if error.ok() else f"output differs: {error}", "tvm_ms": eager_ms(compiled, inputs)}
    except Exception as error:
        return {"tvm": one_line(error)[:300]}


def check_detection(name: str, ratios: tuple[float, ...], output_shapes: Callable[[object], list]) -> list[dict]:
    """One row per ratio for a detection/segmentation model; failures become rows with a reason."""
    try:
        model, inputs, ignore = build_detection(name)
        with torch.no_grad():
            dense_shapes = output_shapes(model(*inputs))
        dense_params, dense_ms = sparsefx.count_params(model), eager_ms(model, inputs)
    except Exception as error:
        return [{"model": name, "ratio": r, "status": "fail", "reason": f"dense model: {one_line(error)}"} for r in ratios]
    target, target_inputs, part = model, inputs, "whole model"
    try:
        sparsefx.analyze(model, inputs)
    except Exception as error:  # the whole detector does not capture: prune its backbone + FPN
        if not hasattr(model, "backbone"):
            return [{"model": name, "ratio": r, "status": "fail", "reason": one_line(error)} for r in ratios]
        why = one_line(error).split("torch.export also failed: ")[-1]  # fx's failure is the less telling one
        target, part = model.backbone, f"backbone only; whole model: {why[:200]}"
        target_inputs = (torch.randn(1, 3, IMAGE_SIZE, IMAGE_SIZE),)
    try:
        dense_macs = sparsefx.count_macs(target, target_inputs)
    except Exception as error:
        return [{"model": name, "ratio": r, "status": "fail", "reason": one_line(error)} for r in ratios]
    rows = []
    for ratio in ratios:
        row = {"model": name, "ratio": ratio, "pruned_part": part, "dense_macs": dense_macs,
               "dense_params": dense_params, "dense_ms": dense_ms}
        try:
            pruned = sparsefx.prune(target, target_inputs, ratio=ratio, ignore=ignore)
            row["result_class"] = type(pruned).__name__
            row["pruned_macs"] = sparsefx.count_macs(pruned, target_inputs)
            if target is not model:  # the pruned backbone goes back into a copy of the detector
                pruned, whole = copy.deepcopy(model), pruned
                pruned.backbone = whole
            with torch.no_grad():
                shapes = output_shapes(pruned(*inputs))
            expected = dense_shapes
            if name.startswith("detection:"):  # how many boxes survive is data-dependent: compare per-box shapes
                shapes, expected = [s[1:] for s in shapes], [s[1:] for s in dense_shapes]
            row.update(pruned_params=sparsefx.count_params(pruned), pruned_ms=eager_ms(pruned, inputs))
            if ratio == ratios[-1]:
                row.update(tvm_check(whole if target is not model else pruned, target_inputs),
                           tvm_part="backbone" if target is not model else "whole")
            row["reason"] = (f"output shapes changed: {expected} -> {shapes}" if shapes != expected else
                             "" if row["pruned_macs"] < dense_macs else
                             f"nothing pruned{frozen_summary(sparsefx.analyze(target, target_inputs).groups)}")
        except Exception as error:
            row["reason"] = one_line(error)
        row["status"] = "fail" if row["reason"] else "pass"
        rows.append(row)
    return rows


def timm_families(families: list[str] | None = None) -> dict[str, str]:
    """Family (the timm module that defines the model) -> its smallest model by parameter count,
    counted on the meta device so that nothing is allocated; models that cannot be built are skipped."""
    smallest: dict[str, str] = {}
    for family in families or timm.list_modules():
        sizes = {}
        for name in timm.list_models(module=family, exclude_filters="test_*"):  # test_*: tiny CI configurations
            try:
                with torch.device("meta"):
                    sizes[name] = sparsefx.count_params(timm.create_model(name))
            except Exception:  # a model whose init needs real tensors: the family has others
                continue
        if sizes:
            smallest[family] = min(sizes, key=sizes.get)
    return smallest


def check_timm(family: str, name: str, ratio: float, output_shapes: Callable[[object], list]) -> dict:
    """Prune one timm model (random weights, its default input size): forward, output shape, parameters cut."""
    row = {"family": family, "model": name, "ratio": ratio}
    try:
        model = timm.create_model(name, pretrained=False).eval()
        size = model.pretrained_cfg.get("input_size", (3, 224, 224))
        inputs = (torch.randn(1, *size),)
        with torch.no_grad():
            dense_shapes = output_shapes(model(*inputs))
        row.update(input_size=list(size), dense_params=sparsefx.count_params(model))
    except Exception as error:
        return {**row, "status": "fail", "reason": f"dense model: {one_line(error)}"}
    try:
        pruned = sparsefx.prune(model, inputs, ratio=ratio)
        with torch.no_grad():
            shapes = output_shapes(pruned(*inputs))
        row.update(result_class=type(pruned).__name__, pruned_params=sparsefx.count_params(pruned))
        row["reason"] = (f"output shapes changed: {dense_shapes} -> {shapes}" if shapes != dense_shapes else
                         "" if row["pruned_params"] < row["dense_params"] else
                         f"nothing pruned{frozen_summary(sparsefx.analyze(model, inputs).groups)}")
    except Exception as error:
        row["reason"] = one_line(error)
    row["status"] = "fail" if row["reason"] else "pass"
    return row


def run_detection(models: list[str], ratios: tuple[float, ...], out_dir: Path, record: RunRecord,
                  output_shapes: Callable[[object], list]) -> str:
    rows: list[dict] = []
    for i, name in enumerate(models, 1):
        print(f"[{i}/{len(models)}] {name} ...", file=sys.stderr, flush=True)
        rows.extend(check_detection(name, ratios, output_shapes))
        for r in rows[-len(ratios):]:
            print(f"    {r['ratio']}: {r['status']} {r['reason']}", file=sys.stderr, flush=True)
        passed = sum(all(r["status"] == "pass" for r in rows if r["model"] == m) for m in models[:i])
        summary = f"{passed}/{i} detection/segmentation models prune at every ratio ({', '.join(map(str, ratios))})"
        record.write_report(out_dir / "coverage_detection.json", {"summary": summary, "results": rows})
        (out_dir / "coverage_detection.md").write_text(detection_markdown(rows, summary, record))
    return summary


def detection_markdown(rows: list[dict], summary: str, record: RunRecord) -> str:
    lines = [record.markdown_line(), "", f"Ultralytics at {YOLO_SIZE}x{YOLO_SIZE}, torchvision at {IMAGE_SIZE}x{IMAGE_SIZE}; "
             f"eager latency: median of {LATENCY_RUNS} calls, batch 1", "",
             "| model | ratio | status | pruned | result | MACs dense -> pruned | params dense -> pruned "
             "| eager ms dense -> pruned | speedup | sparsefx.compile (pruned) | reason |",
             "|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        speedup = f"{r['dense_ms'] / r['pruned_ms']:.2f}x" if r.get("pruned_ms") else ""
        cells = [r["model"], r["ratio"], r["status"], r.get("pruned_part", ""), r.get("result_class", ""),
                 f"{_m(r.get('dense_macs'))} -> {_m(r.get('pruned_macs'))}",
                 f"{_m(r.get('dense_params'))} -> {_m(r.get('pruned_params'))}",
                 f"{r.get('dense_ms', '')} -> {r.get('pruned_ms', '')}", speedup, _tvm_cell(r), r.get("reason", "")]
        lines.append("| " + " | ".join(str(c).replace("|", "/") for c in cells) + " |")
    return "\n".join([*lines, "", summary, ""])


def _tvm_cell(r: dict) -> str:
    if "tvm" not in r:
        return ""
    return f"{r['tvm_part']}: {r['tvm_ms']} ms" if r["tvm"] == "ok" else f"{r['tvm_part']}: {r['tvm']}"


def run_timm(families: list[str] | None, ratio: float, out_dir: Path, record: RunRecord,
             output_shapes: Callable[[object], list]) -> str:
    chosen = timm_families(families)
    rows: list[dict] = []
    for i, (family, name) in enumerate(sorted(chosen.items()), 1):
        print(f"[{i}/{len(chosen)}] {family}: {name} ...", file=sys.stderr, flush=True)
        rows.append(check_timm(family, name, ratio, output_shapes))
        print(f"    {rows[-1]['status']} {rows[-1]['reason']}", file=sys.stderr, flush=True)
        passed = sum(r["status"] == "pass" for r in rows)
        summary = f"{passed}/{len(rows)} timm families ({passed / len(rows):.0%}) prune at {ratio}"
        record.write_report(out_dir / "coverage_timm.json", {"summary": summary, "results": rows})
        lines = [record.markdown_line(), "", "| family | model | input | status | params dense -> pruned | reason |",
                 "|---|---|---|---|---|---|"]
        lines += ["| " + " | ".join(str(c).replace("|", "/") for c in (
            r["family"], r["model"], r.get("input_size", ""), r["status"],
            f"{_m(r.get('dense_params'))} -> {_m(r.get('pruned_params'))}", r["reason"])) + " |" for r in rows]
        (out_dir / "coverage_timm.md").write_text("\n".join([*lines, "", summary, ""]))
    return summary


def _m(value: int | None) -> str:
    return "" if value is None else f"{value / 1e6:,.1f}M"
