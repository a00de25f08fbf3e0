"""Where the time goes: sparsefx's kernels per op class against ONNX Runtime's and OpenVINO's profilers.

One model at a time, dense, at one thread count: sparsefx's `CompiledModel.profile` (each call of a
run, fastest of `--repeat`), ONNX Runtime's profiler (CPU EP, all graph optimisations; each node's
median over the runs) and OpenVINO's performance counters in fp32 (each node's time of the last run),
all on the same ONNX export and inputs. Each call is put in an op class: k x k convolution, 1x1
convolution, depthwise convolution, pooling, matmul (Linear layers), and everything else (element-wise
kernels, layout reorders, the VM's own calls). Convolutions are classed by their weight's shape:
sparsefx's and ONNX Runtime's profiles carry it; OpenVINO's names the node, whose weight is looked up
in the ONNX graph. Fusion moves work between classes (EfficientNet's squeeze-excite scale runs inside
sparsefx's 1x1 conv, as a separate Mul in ONNX Runtime: "other"). sparsefx's per-call times are the
fastest of the runs (`profile`), ONNX Runtime's the median, OpenVINO's the last run's; the
uninstrumented run's median is given beside the sums. Writes benchmarks/results/<name>.json and .md.

    python benchmarks/op_profile.py                                   # ResNet-18, ResNet-50, MobileNetV2
    python benchmarks/op_profile.py --models mobilenet_v2 --threads 2
"""

from __future__ import annotations

import argparse
import collections
import json
import statistics
import sys
import tempfile
from pathlib import Path

import onnx
import torch
from common import RunRecord

import sparsefx
from sparsefx.backends.eager import measure_latency
from sparsefx.backends.peers import Peers
from sparsefx.capture.compare import calibrate_norm_statistics
from sparsefx.capture.models import load_model

MODELS = {"resnet18": "torchvision:resnet18", "resnet50": "torchvision:resnet50",
          "mobilenet_v2": "torchvision:mobilenet_v2", "efficientnet_b0": "torchvision:efficientnet_b0"}
CLASSES = ("conv kxk", "conv 1x1", "conv depthwise", "pool", "matmul", "other")


def conv_class(weight: list[int], in_channels: int | None) -> str:
    """The class of a conv by its weight (out, in / groups, kh, kw) and input channel count."""
    out, per_group, kh, kw = weight
    if per_group == 1 and out > 1 and (in_channels is None or in_channels == out):
        return "conv depthwise"
    return "conv 1x1" if kh == kw == 1 else "conv kxk"


def sparsefx_class(call: dict) -> str:
    name, shapes = call["name"], call["shapes"]
    weights = [s for s in shapes[1:2] if len(s) == 4]  # a conv's second argument is its weight
    if "pool" in name and "avg_pool" not in name:
        return "pool"
    if call["kind"] in ("pointwise", "depthwise"):  # their weights may be repacked (`pack_weight`)
        return "conv 1x1" if call["kind"] == "pointwise" else "conv depthwise"
    if weights and ("conv" in name or call["kind"] in ("direct", "pointwise", "depthwise")):
        return conv_class(weights[0], shapes[0][1])
    if "matmul" in name or "dense" in name:
        return "matmul"
    return "other"


def profile_sparsefx(model: torch.nn.Module, inputs: tuple, threads: int, repeat: int) -> tuple[dict, float]:
    compiled = sparsefx.compile(model, inputs, threads=threads, verbose=False)
    run_ms = median_ms(lambda: compiled(*inputs), repeat)
    per = collections.Counter()
    for call in compiled.profile(*inputs, repeat=repeat):
        per[sparsefx_class(call)] += call["ms"]
    return dict(per), run_ms


def profile_onnxruntime(path: Path, inputs: tuple, threads: int, repeat: int) -> tuple[dict, float]:
    import onnxruntime as ort

    with tempfile.TemporaryDirectory() as tmp:
        options = ort.SessionOptions()
        options.intra_op_num_threads, options.inter_op_num_threads = threads, 1
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        plain = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
        feed_of = {i.name: x.numpy() for i, x in zip(plain.get_inputs(), inputs, strict=True)}
        run_ms = median_ms(lambda: plain.run(None, feed_of), repeat)
        options.enable_profiling, options.profile_file_prefix = True, str(Path(tmp) / "ort")
        session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
        for _ in range(3 + repeat):
            session.run(None, feed_of)
        events = json.loads(Path(session.end_profiling()).read_text())
    times: dict[str, list[float]] = collections.defaultdict(list)
    classes: dict[str, str] = {}
    for event in events:
        if event.get("cat") != "Node" or not event["name"].endswith("_kernel_time"):
            continue
        args, node = event["args"], event["name"]
        shapes = [next(iter(s.values())) for s in args.get("input_type_shape", [])]
        if args.get("op_name") in ("Conv", "FusedConv") and len(shapes) > 1 and len(shapes[1]) == 4:
            classes[node] = conv_class(shapes[1], shapes[0][1] if len(shapes[0]) == 4 else None)
        elif "Pool" in args.get("op_name", "") and "Global" not in args.get("op_name", ""):
            classes[node] = "pool"
        elif args.get("op_name") in ("Gemm", "MatMul", "FusedMatMul"):
            classes[node] = "matmul"
        else:
            classes[node] = "other"
        times[node].append(event["dur"] / 1e3)
    per = collections.Counter()
    for node, durations in times.items():
        per[classes[node]] += statistics.median(durations[3:] or durations)
    return dict(per), run_ms


def onnx_conv_classes(path: Path) -> dict[str, str]:
    """ONNX node name -> conv class, from each Conv's weight initializer and group attribute."""
    graph = onnx.load(str(path)).graph
    weights = {t.name: list(t.dims) for t in graph.initializer}
    found = {}
    for node in graph.node:
        if node.op_type == "Conv" and len(node.input) > 1 and node.input[1] in weights:
            group = next((a.i for a in node.attribute if a.name == "group"), 1)
            weight = weights[node.input[1]]
            found[node.name] = conv_class(weight, weight[1] * group)
    return found


def profile_openvino(path: Path, inputs: tuple, threads: int, repeat: int) -> tuple[dict, float]:
    import openvino as ov

    core = ov.Core()
    config = {"INFERENCE_NUM_THREADS": threads, "PERFORMANCE_HINT": "LATENCY", "INFERENCE_PRECISION_HINT": "f32"}
    feed = [x.numpy() for x in inputs]
    plain = core.compile_model(core.read_model(str(path)), "CPU", config).create_infer_request()
    run_ms = median_ms(lambda: plain.infer(feed), repeat)
    request = core.compile_model(core.read_model(str(path)), "CPU", {**config, "PERF_COUNT": True}).create_infer_request()
    for _ in range(3 + repeat):
        request.infer(feed)
    convs = onnx_conv_classes(path)
    per = collections.Counter()
    for info in request.profiling_info:
        ms = info.real_time.total_seconds() * 1e3
        if info.node_type in ("Convolution", "GroupConvolution"):
            source = next((name for name in convs if info.node_name.startswith(name)), None)
            kind = convs[source] if source else "conv depthwise" if info.node_type == "GroupConvolution" else "conv kxk"
        elif "Pool" in info.node_type:
            kind = "pool"
        elif info.node_type in ("FullyConnected", "MatMul"):
            kind = "matmul"
        else:
            kind = "other"
        per[kind] += ms
    return dict(per), run_ms


def median_ms(run: object, repeat: int) -> float:
    return measure_latency(run, (), repeat=repeat)["median_ms"]


def markdown(rows: list[dict], record: RunRecord) -> str:
    lines = ["# Where the time goes: sparsefx against ONNX Runtime and OpenVINO, per op class", "",
             record.markdown_line(), "",
             __doc__.split("\n\n")[0].replace("\n", " ") + " ms per op class, dense, batch 1; `x` columns: sparsefx's "
             "time over the peer's.", "",
             "| model | threads | op class | sparsefx | onnxruntime | openvino-fp32 | x ORT | x OV |",
             "|---|---|---|---:|---:|---:|---:|---:|"]
    for row in rows:
        runtimes = ("sparsefx", "onnxruntime", "openvino-fp32")
        for kind in (*CLASSES, "profiled sum", "run (unprofiled)"):
            ms = [row[r].get(kind, 0.0) for r in runtimes]
            if not any(ms):
                continue
            ratios = [f"{ms[0] / m:.2f}" if m > 0.001 else "-" for m in ms[1:]]
            lines.append(f"| {row['model']} | {row['threads']} | {kind} | " + " | ".join(f"{m:.3f}" for m in ms)
                         + " | " + " | ".join(ratios) + " |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", default="resnet18,resnet50,mobilenet_v2", help=", ".join(MODELS))
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--repeat", type=int, default=20, help="runs per profile")
    parser.add_argument("--name", default="op_profile", help="results file stem")
    parser.add_argument("--out", type=Path, default=Path(__file__).resolve().parent / "results")
    args = parser.parse_args(argv)
    record = RunRecord(sys.argv if argv is None else argv)
    torch.set_num_threads(args.threads)
    rows = []
    for name in args.models.split(","):
        model, inputs = load_model(MODELS.get(name, name))
        calibrate_norm_statistics(model, inputs)
        path = Peers(model, inputs, args.threads).onnx()
        row = {"model": name, "threads": args.threads}
        for runtime, profile, subject in (("sparsefx", profile_sparsefx, model), ("onnxruntime", profile_onnxruntime, path),
                                          ("openvino-fp32", profile_openvino, path)):
            per, run_ms = profile(subject, inputs, args.threads, args.repeat)
            row[runtime] = {**{k: round(v, 4) for k, v in per.items()},
                            "profiled sum": round(sum(per.values()), 4), "run (unprofiled)": round(run_ms, 4)}
        rows.append(row)
        print(json.dumps(row), flush=True)
    args.out.mkdir(parents=True, exist_ok=True)
    record.write(args.out / f"{args.name}.json", rows)
    (args.out / f"{args.name}.md").write_text(markdown(rows, record))
    return 0


if __name__ == "__main__":
    sys.exit(main())
