"""Which models can sparsefx prune? Prune every torchvision classifier plus three HF transformers.

A model passes at a ratio when pruning succeeds, the forward pass runs, every output keeps its
shape and MACs fall. A model passes overall when it passes at every ratio. Every pruned model is
also saved and loaded again (`sparsefx.save` / `sparsefx.load` from its spec: outputs must be
bitwise equal) and exported to ONNX (checked in ONNX Runtime within TOLERANCE of eager); those
two get their own columns, with the failing step or op where they fail.

    python benchmarks/coverage.py                       # all models (hours on a laptop CPU)
    python benchmarks/coverage.py --models resnet18,hf:bert-base --out results
    python benchmarks/coverage.py --detection            # YOLO, torchvision detectors and segmenters
    python benchmarks/coverage.py --timm                 # one timm model per family (--families a,b)
"""

from __future__ import annotations

import argparse
import gc
import sys
import tempfile
import time
from pathlib import Path

import torch
import torchvision
from common import RunRecord
from coverage_sets import detection_models, run_detection, run_timm

import sparsefx
from sparsefx.backends.export import onnx_error
from sparsefx.capture.compare import TOLERANCE, calibrate_norm_statistics, first_tensor
from sparsefx.capture.models import load_model
from sparsefx.errors import one_line

RATIOS = (0.3, 0.5)
HF_MODELS = ("hf:bert-base", "hf:gpt2", "hf:vit-base")


def default_models() -> list[str]:
    return [*torchvision.models.list_models(module=torchvision.models), *HF_MODELS]


def spec_of(name: str) -> str:
    return name if ":" in name or name == "default" else f"torchvision:{name}"


def output_shapes(output: object) -> list[tuple[int, ...]]:
    """Shapes of every tensor in an output (tensor, tuple, dict or HF ModelOutput) in a fixed order."""
    leaves = torch.utils._pytree.tree_leaves(output)
    return [tuple(leaf.shape) for leaf in leaves if isinstance(leaf, torch.Tensor)]


def check_model(name: str, ratios: tuple[float, ...]) -> list[dict]:
    """One result row per ratio; any exception becomes a failed row instead of ending the run."""
    try:
        model, inputs = load_model(spec_of(name))
        calibrate_norm_statistics(model, inputs)  # random-init outputs near zero would make the ONNX check vacuous
        with torch.inference_mode():
            dense_shapes = output_shapes(model(*inputs))
        dense_macs, dense_params = sparsefx.count_macs(model, inputs), sparsefx.count_params(model)
    except Exception as error:
        return [{"model": name, "ratio": r, "status": "fail", "reason": f"dense model: {one_line(error)}"}
                for r in ratios]
    rows = []
    for ratio in ratios:
        row = {"model": name, "ratio": ratio, "dense_macs": dense_macs, "dense_params": dense_params}
        try:
            started = time.perf_counter()
            pruned = sparsefx.prune(model, inputs, ratio=ratio, importance="l1")
            row["prune_s"] = round(time.perf_counter() - started, 3)
            with torch.inference_mode():
                pruned_shapes = output_shapes(pruned(*inputs))
            row["pruned_macs"] = sparsefx.count_macs(pruned, inputs)
            row["pruned_params"] = sparsefx.count_params(pruned)
            row["reason"] = failure_reason(row, dense_shapes, pruned_shapes)
            row.update(persistence(spec_of(name), pruned, inputs))
            if sparsefx.count_params(model) != dense_params:
                row["reason"] = row["reason"] or "prune() modified the input model"
            del pruned
        except Exception as error:
            row["reason"] = one_line(error)
        row["status"] = "fail" if row["reason"] else "pass"
        rows.append(row)
    return rows


def persistence(spec: str, pruned: torch.nn.Module, inputs: tuple) -> dict:
    """Save/load round trip and ONNX export of a pruned model: 'ok' or why not, per column."""
    result = {}
    with tempfile.TemporaryDirectory() as tmp:
        try:
            sparsefx.save(pruned, Path(tmp) / "saved", spec=spec)
            loaded = sparsefx.load(Path(tmp) / "saved")  # a fresh dense model from the spec, removal replayed
            with torch.inference_mode():
                same = torch.equal(first_tensor(loaded(*inputs)), first_tensor(pruned(*inputs)))
            result["save_load"] = "ok" if same else "outputs differ after loading"
        except Exception as error:
            result["save_load"] = one_line(error)
        try:
            error = onnx_error(sparsefx.export(pruned, inputs, Path(tmp) / "model.onnx"), pruned, inputs)
            result["onnx_error"] = error
            result["onnx"] = "ok" if error <= TOLERANCE else f"ONNX Runtime differs from eager by {error:.1e}"
        except Exception as error:
            result["onnx"] = one_line(error)
    return result


def failure_reason(row: dict, dense_shapes: list, pruned_shapes: list) -> str:
    if pruned_shapes != dense_shapes:
        return f"output shapes changed: {dense_shapes} -> {pruned_shapes}"
    if row["pruned_macs"] >= row["dense_macs"]:
        return f"MACs did not fall ({row['dense_macs']:,} -> {row['pruned_macs']:,})"
    return ""


def write_reports(rows: list[dict], models: list[str], out_dir: Path, record: RunRecord) -> str:
    out_dir.mkdir(parents=True, exist_ok=True)
    passed = [m for m in models if all(r["status"] == "pass" for r in rows if r["model"] == m)]
    pruned = [r for r in rows if r["status"] == "pass"]
    summary = (f"{len(passed)}/{len(models)} models pass; of {len(pruned)} pruned models "
               f"{sum(r.get('save_load') == 'ok' for r in pruned)} save/load bitwise, "
               f"{sum(r.get('onnx') == 'ok' for r in pruned)} match in ONNX Runtime within {TOLERANCE:g}")
    record.write_report(out_dir / "coverage.json",
                        {"ratios": list(RATIOS), "importance": "l1", "summary": summary, "results": rows})
    (out_dir / "coverage.md").write_text(markdown(rows, summary))
    return summary


def markdown(rows: list[dict], summary: str) -> str:
    lines = [
        "# sparsefx coverage (importance=l1, MACs from sparsefx.count_macs)",
        "",
        "| model | ratio | status | MACs dense | MACs pruned | MACs kept | params dense | params pruned | prune s "
        "| save/load | ONNX | reason |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        kept = f"{r['pruned_macs'] / r['dense_macs']:.0%}" if r.get("pruned_macs") and r.get("dense_macs") else ""
        cells = [r["model"], r["ratio"], r["status"], _count(r.get("dense_macs")), _count(r.get("pruned_macs")), kept,
                 _count(r.get("dense_params")), _count(r.get("pruned_params")), r.get("prune_s", ""),
                 r.get("save_load", ""), r.get("onnx", ""), r.get("reason", "")]
        cells = [str(c).replace("|", "/") for c in cells]
        lines.append("| " + " | ".join(str(c) for c in cells) + " |")
    return "\n".join([*lines, "", summary, ""])


def _count(value: int | None) -> str:
    return "" if value is None else f"{value / 1e6:,.1f}M"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", help="comma-separated names (torchvision names or hf:NAME); default: all")
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results"), help="output directory (default: benchmarks/results)")
    parser.add_argument("--detection", action="store_true", help="the detection/segmentation set instead "
                        "(YOLOv8/YOLO11 n,s; torchvision detectors and segmenters): MACs, parameters, eager latency")
    parser.add_argument("--timm", action="store_true", help="one timm model per architecture family instead, at 0.5")
    parser.add_argument("--families", help="with --timm: comma-separated timm families (default: all)")
    args = parser.parse_args(argv)
    torch.manual_seed(0)
    record = RunRecord(sys.argv)
    if args.detection or args.timm:
        summary = (run_timm(args.families.split(",") if args.families else None, 0.5, args.out, record, output_shapes)
                   if args.timm else run_detection(args.models.split(",") if args.models else detection_models(),
                                                   RATIOS, args.out, record, output_shapes))
        print(summary, file=sys.stderr)
        return 0
    models = args.models.split(",") if args.models else default_models()
    rows: list[dict] = []
    summary = ""
    for i, name in enumerate(models, 1):
        print(f"[{i}/{len(models)}] {name} ...", file=sys.stderr, flush=True)
        started = time.perf_counter()
        model_rows = check_model(name, RATIOS)
        rows.extend(model_rows)
        verdicts = ", ".join(f"{r['ratio']}: {r['status']}" for r in model_rows)
        print(f"    {verdicts} ({time.perf_counter() - started:.1f} s)", file=sys.stderr, flush=True)
        for r in model_rows:
            if r["reason"]:
                print(f"    {r['ratio']}: {r['reason']}", file=sys.stderr)
        gc.collect()  # big models (regnet_y_128gf, vit_h_14) must not pile up
        # Rewrite reports after every model so a crash or Ctrl-C still leaves partial results.
        summary = write_reports(rows, models[:i], args.out, record)
    print(summary, file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
