"""Command line: `sparsefx inspect|prune|export|compile|bench|plan|apply|optimize|finetune|evaluate|demo`. Run `sparsefx -h` for usage."""

from __future__ import annotations

import argparse
import importlib.util
import logging
import os
import sys
import time
from collections.abc import Sequence
from pathlib import Path

import torch
from torch import nn

import sparsefx
from sparsefx import log
from sparsefx.backends import artifacts
from sparsefx.backends.eager import measure_latencies
from sparsefx.backends.export import FORMATS, onnx_error
from sparsefx.backends.peers import RUNTIMES, PeerError, Peers, available, check
from sparsefx.capture.compare import VacuousComparisonError
from sparsefx.capture.identity import compile_key
from sparsefx.capture.models import load_model
from sparsefx.capture.trace import as_inputs
from sparsefx.cli import recipe
from sparsefx.cli.calibration import add_calibration_args, read_calibration
from sparsefx.cli.common import (
    LOG,
    add_arch_arg,
    add_model_args,
    add_precision_arg,
    add_threads_arg,
    add_verbosity_args,
    check_out,
    load,
    parse_ratio,
    progress_bars,
    save,
    saved_model,
)
from sparsefx.cli.plan import add_commands
from sparsefx.errors import SparsefxError
from sparsefx.io import is_saved_model
from sparsefx.recovery.data import fashion_mnist
from sparsefx.target import check_threads, compile_target


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    args.command_line = list(sys.argv[1:] if argv is None else argv)  # `plan` and `compile` keep their results for it (`recipe`)
    try:
        if getattr(args, "threads", None) is not None:  # 0 or too many: a one-line error, not torch's
            torch.set_num_threads(check_threads(args.threads))
        with log.to_stderr(args.log_level):
            return args.handler(args)
    except SparsefxError as error:
        message = " ".join(str(error).split())  # user errors are promised to be one line
        print(f"sparsefx: error: {message}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("sparsefx: interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:  # `sparsefx inspect ... | head` closed stdout early; that is not an error
        sys.stdout = open(os.devnull, "w")  # else shutdown flushes and raises again
        return 0


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="sparsefx", description="Structured channel pruning for PyTorch.")
    add_verbosity_args(parser, logging.INFO)
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    inspect = commands.add_parser("inspect", help="show channel groups and per-layer MACs/params")
    add_model_args(inspect)
    inspect.set_defaults(handler=_inspect)

    prune = commands.add_parser("prune", help="prune a model and save it with sparsefx.save (safetensors + JSON)")
    add_model_args(prune)
    prune.add_argument("--ratio", type=parse_ratio, default=0.5,
                       help="fraction of channels to remove: 0.5, or per module prefix: layer1=0.3,layer2=0.5")
    prune.add_argument("--importance", default="l1",
                       help="channel importance: l1 (default), l2, bn_scale, random, or data-aware wanda (weights "
                       "times input activation norms) and taylor (|weight x gradient|), see --calibration")
    add_calibration_args(prune)
    prune.add_argument("--experts", type=int, default=0, metavar="N",
                       help="first remove N experts, with their router rows, from every mixture-of-experts layer "
                       "(Mixtral, Qwen-MoE), ranked by --importance (l1, l2, wanda, taylor or random)")
    prune.add_argument("--round-to", type=int, default=1, help="keep channel counts a multiple of N")
    prune.add_argument("--global", dest="global_ranking", action="store_true",
                       help="rank channels across all groups instead of within each group")
    prune.add_argument("--ignore", nargs="+", action="extend", default=[], metavar="NAME",
                       help="module names whose channels must not be pruned")
    prune.add_argument("--out", type=Path, required=True,
                       help="directory to save the pruned model to (model.safetensors + sparsefx.json)")
    prune.add_argument("--repeat", type=int, default=20, help="forward passes per latency measurement")
    add_threads_arg(prune)
    prune.set_defaults(handler=_prune)

    export = commands.add_parser("export", help="export a model (optionally pruned first) to ONNX or torch.export")
    add_model_args(export)
    export.add_argument("--format", choices=FORMATS, default="onnx", help="file format (default: onnx)")
    export.add_argument("--ratio", type=parse_ratio, default=0.0,
                        help="prune with this ratio before exporting (default 0: export the model as it is)")
    export.add_argument("--out", type=Path, required=True, help="file to write (.onnx, or .pt2 for torch.export)")
    export.set_defaults(handler=_export)

    compile_ = commands.add_parser("compile", help="compile a model with TVM (optionally pruned first) and export it")
    add_model_args(compile_)
    _add_compile_args(compile_)
    compile_.add_argument("--out", type=Path, required=True, help="artifact to write (.sfx)")
    compile_.add_argument("--threads", type=int, default=None,
                          help="cores the compiled model runs on, recorded in the artifact (default: all)")
    compile_.add_argument("--no-cache", dest="cache", action="store_false",
                          help="compile afresh even if this model was compiled with these options before")
    compile_.add_argument("--bundle", type=Path, metavar="PATH",
                          help="also write a runtime-only bundle (directory, or .tar.gz) for a host with no TVM "
                          "compiler and Python 3.12; CPU targets need --no-dispatch")
    compile_.set_defaults(handler=_compile)

    bench = commands.add_parser("bench", help="eager vs TVM latency, dense and pruned, measured side by side")
    add_model_args(bench)
    _add_compile_args(bench)
    bench.add_argument("--repeat", type=int, default=20, help="timed forward passes per model")
    bench.add_argument("--profile", action="store_true",
                       help="also time every call of the TVM builds: ms per kind of kernel, and the slowest calls")
    bench.add_argument("--vs", type=_runtimes, default=[], metavar="RUNTIMES",
                       help="also time these runtimes on the same models, in the same rounds, where installed: "
                       f"comma-separated, of {', '.join(r for r in RUNTIMES if r not in ('eager', 'sparsefx'))}")
    bench.add_argument("--rpc", metavar="HOST:PORT", help="measure the TVM builds on a device behind this RPC tracker")
    bench.add_argument("--rpc-key", default="sparsefx", help="the device's key at the tracker (default: sparsefx)")
    add_threads_arg(bench)
    bench.set_defaults(handler=_bench)

    finetune = commands.add_parser("finetune", help="fine-tune a saved model on Fashion-MNIST (optionally distilled)")
    finetune.add_argument("model", type=Path, help="model saved by `sparsefx prune` (a directory) or with torch.save")
    finetune.add_argument("--epochs", type=int, default=3)
    finetune.add_argument("--lr", type=float, default=1e-3)
    finetune.add_argument("--distill-from", type=Path, default=None, metavar="DENSE.pt",
                          help="teacher model for knowledge distillation (usually the dense model)")
    finetune.add_argument("--train-limit", type=int, default=None, help="use only the first N training images")
    finetune.add_argument("--out", type=Path, required=True,
                          help="directory to save the fine-tuned model to (sparsefx.save: safetensors + JSON, no pickle; "
                          "give --arch for a .pt MODEL so it loads unaided); a name ending in .pt writes a torch.save "
                          "pickle instead, for a .pt MODEL only")
    add_arch_arg(finetune)
    add_threads_arg(finetune)
    finetune.set_defaults(handler=_finetune)

    evaluate = commands.add_parser("evaluate", help="accuracy overall, per class and on corrupted data")
    evaluate.add_argument("model", type=Path, help="model saved by `sparsefx prune` (a directory) or with torch.save")
    add_arch_arg(evaluate)
    evaluate.add_argument("--reference", type=Path, default=None, metavar="DENSE.pt",
                          help="model to compare per-class accuracy with (largest drops first)")
    evaluate.add_argument("--corruptions", default="noise,blur,contrast",
                          help="corrupted copies of the test set to score (empty: none)")
    add_threads_arg(evaluate)
    evaluate.set_defaults(handler=_evaluate)

    add_commands(commands)

    demo = commands.add_parser("demo", help="prune the built-in model at 0.5 and report the change")
    demo.add_argument("--ratio", type=parse_ratio, default=0.5, help="fraction of channels to remove")
    demo.add_argument("--repeat", type=int, default=50, help="forward passes per latency measurement")
    demo.add_argument("--no-compile", dest="compile", action="store_false", help="skip the TVM compile step")
    add_threads_arg(demo)
    demo.set_defaults(handler=_demo)
    for command in commands.choices.values():
        add_verbosity_args(command, argparse.SUPPRESS)
    return parser


def _add_compile_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--target", default="cpu", help="cpu (host CPU via LLVM) or cuda[:sm_XX] (default: cpu)")
    parser.add_argument("--tune", type=int, default=0, metavar="TRIALS",
                        help="MetaSchedule trials per new TIR workload (0: default schedules; records persist)")
    parser.add_argument("--no-dispatch", dest="dispatch", action="store_false",
                        help="never run convs, matmuls or math ops on PyTorch kernels, even where they measure faster")
    parser.add_argument("--prune", type=parse_ratio, default=None, metavar="RATIO", help="prune channels first")
    add_precision_arg(parser)


def _inspect(args: argparse.Namespace) -> int:
    model, inputs = load(args)
    LOG.info("tracing and finding channel groups")
    analysis = sparsefx.analyze(model, inputs, method=args.method)
    prunable = sum(group.prunable for group in analysis.groups)
    print(f"channel groups: {len(analysis.groups)} ({prunable} prunable)")
    for group in analysis.groups:
        print(f"  {group}")
    print()
    print(_layer_table(analysis.gm))
    return 0


def _layer_table(gm: torch.fx.GraphModule) -> str:
    """One row per node that does arithmetic or holds weights, then totals over the whole graph."""
    modules = dict(gm.named_modules())
    rows = [("node", "op", "output shape", "MACs", "params")]
    total_macs = total_params = 0
    for node in gm.graph.nodes:
        macs, params = node.meta.get("sfx_macs", 0), node.meta.get("sfx_params", 0)
        total_macs, total_params = total_macs + macs, total_params + params
        if macs or params:
            shape = node.meta.get("sfx_shape")
            rows.append((node.name, _op_name(node, modules), _shape_text(shape), f"{macs:,}", f"{params:,}"))
    rows.append(("total", "", "", f"{total_macs:,}", f"{total_params:,}"))
    widths = [max(len(row[i]) for row in rows) for i in range(5)]
    lines = [
        "  ".join(cell.ljust(w) if i < 3 else cell.rjust(w) for i, (cell, w) in enumerate(zip(row, widths)))
        for row in rows
    ]
    lines.insert(1, "-" * len(lines[0]))
    lines.insert(-1, "-" * len(lines[0]))
    return "\n".join(lines)


def _op_name(node: torch.fx.Node, modules: dict[str, nn.Module]) -> str:
    if node.op == "call_module":
        return type(modules[node.target]).__name__
    if node.op in ("call_function", "call_method"):
        return getattr(node.target, "__name__", str(node.target))
    return node.op


def _shape_text(shape: object) -> str:
    if isinstance(shape, torch.Size | tuple | list) and all(isinstance(d, int) for d in shape):
        return "x".join(map(str, shape)) or "scalar"
    return str(shape) if shape is not None else "-"


def _prune(args: argparse.Namespace) -> int:
    check_out(args.out)
    model, inputs = load(args)
    calibration = read_calibration(args, model, inputs)
    data = {} if calibration is None else {"calibration": calibration}
    started = time.perf_counter()
    source = model
    if args.experts:  # prune_experts logs what it removes
        source = sparsefx.prune_experts(model, args.experts, importance=args.importance, example_inputs=inputs, **data)
    LOG.info(f"pruning with ratio {args.ratio}" + (f" ({args.importance} on --calibration {args.calibration})"
                                                   if data else ""))
    pruned = sparsefx.prune(
        source, inputs, ratio=args.ratio, importance=args.importance, round_to=args.round_to,
        global_ranking=args.global_ranking, ignore=tuple(args.ignore), method=args.method, **data,
    )
    LOG.info(f"pruned in {time.perf_counter() - started:.2f} s; measuring")
    print(_compare(model, pruned, inputs, repeat=args.repeat))
    save(pruned, args.out, args.model, args.arch)
    return 0


def _maybe_pruned(args: argparse.Namespace, model: nn.Module, inputs: tuple) -> nn.Module:
    if args.prune is None:
        return model
    LOG.info(f"pruning with ratio {args.prune}")
    return sparsefx.prune(model, inputs, ratio=args.prune, method=args.method)


def _export(args: argparse.Namespace) -> int:
    check_out(args.out)
    model, inputs = load(args)
    if args.ratio:
        model = sparsefx.prune(model, inputs, ratio=args.ratio, method=args.method)
    sparsefx.export(model, inputs, args.out, format=args.format)
    print(f"wrote {args.out}")
    if args.format == "onnx" and importlib.util.find_spec("onnxruntime") is not None:
        try:
            print(f"ONNX Runtime vs eager: relative L2 error {onnx_error(args.out, model, inputs):.1e}")
        except VacuousComparisonError as error:  # a random-init model whose output is near zero
            LOG.warning(f"not checked in ONNX Runtime: {error}")
    return 0


def _compile(args: argparse.Namespace) -> int:
    check_out(args.out)
    model, inputs = load(args)
    model = _maybe_pruned(args, model, inputs)
    key = _compile_key(model, inputs, args) if args.cache else None
    kept = artifacts.cached(key) if key and not args.bundle else None  # a bundle is made from a compiled model
    if kept is not None:  # compiled before: copied, without importing TVM
        recipe.keep(args.command_line, artifact=kept)
        recipe.copy_artifact(kept, args.out)
        return 0
    compiled = sparsefx.compile(model, inputs, target=args.target, tune=args.tune, dispatch=args.dispatch,
                                threads=args.threads, precision=args.precision, verbose=progress_bars(args),
                                cache=False)  # looked up above: the weights are hashed once
    compiled.cache_key = key  # the export below keeps it
    print(recipe.compile_summary(compiled.manifest, compiled.threads))
    print(f"wrote {compiled.export(args.out)} (load with sparsefx.load(path))")
    if key and (kept := artifacts.cached(key)) is not None:  # the export kept it
        recipe.keep(args.command_line, artifact=kept)
    if args.bundle:
        print(f"wrote {compiled.export_bundle(args.bundle)} (run it with: python run.py [inputs.npy])")
    return 0


def _compile_key(model: nn.Module, inputs: tuple, args: argparse.Namespace) -> str | None:
    """The key `sparsefx.compile` keeps this model's artifact under, for these arguments (`backends.artifacts`)."""
    spec, threads, precision = compile_target(args.target, args.threads, args.precision)
    return compile_key(model, as_inputs(inputs), spec, threads, precision, args.dispatch, args.tune)


def _bench(args: argparse.Namespace) -> int:
    if args.rpc:
        return _bench_remote(args)
    model, inputs = load(args)
    models = {"eager dense": model}
    pruned = _maybe_pruned(args, model, inputs)
    if pruned is not model:
        models["eager pruned"] = pruned
    for name, source in list(models.items()):
        LOG.info(f"compiling {name.split()[1]} model for {args.target}")
        compiled = sparsefx.compile(source, inputs, target=args.target, tune=args.tune, dispatch=args.dispatch,
                                    threads=args.threads, precision=args.precision)
        if compiled.target.is_gpu:
            raise SparsefxError("bench runs on this host's CPU; benchmark a CUDA build on the GPU host instead")
        models[name.replace("eager", "tvm")] = compiled
    models.update(_peer_runners(args.vs, {name.split()[1]: models[name] for name in ("eager dense", "eager pruned")
                                          if name in models}, inputs, compiled.threads))
    LOG.info("measuring (alternating rounds)")
    # beside other runtimes, each turn first wakes its runtime's threads (the peers' pools sleep between turns)
    latency = measure_latencies(models, inputs, repeat=args.repeat, warmup=3 if args.vs else 1)
    base = latency["eager dense"]
    width = max(14, *map(len, latency))
    print(f"{'model':<{width}} {'median ms':>10} {'vs eager dense':>15}")
    for name, ms in latency.items():
        print(f"{name:<{width}} {ms:>10.3f} {base / ms:>14.2f}x")
    if args.profile:
        print_profiles({name: m.profile(*inputs) for name, m in models.items() if name.startswith("tvm")})
    return 0


def _runtimes(text: str) -> list[str]:
    """--vs: peer runtime names, checked (argparse shows PeerError's line naming the known ones)."""
    try:
        return [check(name.strip()) for name in text.split(",") if name.strip()]
    except PeerError as error:
        raise argparse.ArgumentTypeError(str(error)) from None


def _peer_runners(runtimes: list[str], sources: dict[str, nn.Module], inputs: tuple, threads: int) -> dict:
    """'RUNTIME dense' / 'RUNTIME pruned' runners of each installed peer runtime, at `threads`."""
    runners = {}
    peers = {variant: Peers(source, inputs, threads) for variant, source in sources.items()}  # one ONNX export each
    for runtime in runtimes:
        if not available(runtime):
            LOG.warning(f"--vs {runtime}: not installed, skipped (pip install -e '.[dev]')")
            continue
        for variant in sources:
            LOG.info(f"building {runtime} ({variant}, {threads} threads)")
            try:
                runners[f"{runtime} {variant}"] = peers[variant].build(runtime)
            except PeerError as error:  # a peer that cannot take the model is reported, not fatal
                LOG.warning(f"--vs {runtime}: {error}")
    return runners


def print_profiles(profiles: dict[str, list[dict]], top: int = 10) -> None:
    """ms per kind of kernel, side by side (where a pruned model's time did not shrink), then the slowest calls."""
    from sparsefx.backends.tvm.compiler import ms_by_kind

    totals = {name: ms_by_kind(rows) for name, rows in profiles.items()}
    kinds = sorted({k for t in totals.values() for k in t}, key=lambda k: -max(t.get(k, 0.0) for t in totals.values()))
    print(f"\n{'kind (ms, summed calls)':<24}" + "".join(f"{name:>14}" for name in profiles))
    for kind in [*kinds, "total"]:
        print(f"{kind:<24}" + "".join(f"{t.get(kind, 0.0) if kind != 'total' else sum(t.values()):>14.3f}"
                                      for t in totals.values()))
    for name, rows in profiles.items():
        print(f"\nslowest calls, {name}:")
        for row in sorted(rows, key=lambda r: -r["ms"])[:top]:
            print(f"  {row['ms']:8.3f} ms  {row['name']}  {' '.join('x'.join(map(str, s)) for s in row['shapes'])}")


def _bench_remote(args: argparse.Namespace) -> int:
    from sparsefx.backends.tvm.remote import measure_remote

    model, inputs = load(args)
    print(f"{'model':<12} {'median ms':>10}  (on {args.rpc_key} via {args.rpc})")
    for name, source in (("tvm dense", model), ("tvm pruned", _maybe_pruned(args, model, inputs))):
        if name == "tvm pruned" and source is model:
            continue
        compiled = sparsefx.compile(source, inputs, target=args.target, tune=args.tune, dispatch=False)
        result = measure_remote(compiled, args.rpc, args.rpc_key, repeat=args.repeat)
        print(f"{name:<12} {result['median_ms']:>10.3f}")
    return 0


def _finetune(args: argparse.Namespace) -> int:
    model = saved_model(args.model, args.arch)
    teacher = saved_model(args.distill_from, args.arch) if args.distill_from else None
    data = fashion_mnist(train_limit=args.train_limit)
    history = sparsefx.finetune(model, data.train, epochs=args.epochs, lr=args.lr, distill_from=teacher,
                                val_loader=data.test)
    for epoch, loss in enumerate(history.loss, 1):
        accuracy = f", test accuracy {100 * history.val_accuracy[epoch - 1]:.2f}%" if history.val_accuracy else ""
        print(f"epoch {epoch}: loss {loss:.4f}{accuracy}")
    tuned = history.model or model
    if is_saved_model(args.model) or args.out.suffix != ".pt":  # sparsefx.save (a directory in: its spec carried over)
        save(tuned, args.out, str(args.model), args.arch)
    else:  # a .pt asked for by name: a pickle, which runs code when it is loaded
        torch.save(tuned, args.out)
        LOG.warning(f"saved {args.out} with torch.save: a pickle, loaded with torch.load(weights_only=False), which "
                    "runs code; give a directory --out for safetensors + JSON that load without pickle")
    return 0


def _evaluate(args: argparse.Namespace) -> int:
    model = saved_model(args.model, args.arch)
    reference = saved_model(args.reference, args.arch) if args.reference else None
    data = fashion_mnist()
    report = sparsefx.evaluate(model, data.test, reference=reference, class_names=list(data.class_names))
    reference_text = "" if report.reference_accuracy is None else f" (reference {100 * report.reference_accuracy:.2f}%)"
    print(f"accuracy {100 * report.accuracy:.2f}%{reference_text}")
    print(report.table())
    for kind in filter(None, args.corruptions.split(",")):
        corrupted = report.corrupted(kind)
        ref = "" if corrupted.reference_accuracy is None else f" (reference {100 * corrupted.reference_accuracy:.2f}%)"
        print(f"{kind}: accuracy {100 * corrupted.accuracy:.2f}%{ref}")
    return 0


def _demo(args: argparse.Namespace) -> int:
    model, inputs = load_model("default")
    LOG.info("analysing the built-in model (TinyResNet, input 1x3x32x32)")
    analysis = sparsefx.analyze(model, inputs)
    prunable = [group for group in analysis.groups if group.prunable]
    print(f"TinyResNet: {len(analysis.groups)} channel groups, {len(prunable)} prunable")
    for group in analysis.groups:
        print(f"  {group}")
    LOG.info(f"pruning {args.ratio} of the channels in each group")
    started = time.perf_counter()
    pruned = sparsefx.prune(model, inputs, ratio=args.ratio)
    print(f"pruned in {time.perf_counter() - started:.2f} s")
    LOG.info("measuring latency")
    print(_compare(model, pruned, inputs, repeat=args.repeat))
    with torch.inference_mode():
        dense_shape, pruned_shape = model(*inputs).shape, pruned(*inputs).shape
    if dense_shape != pruned_shape:
        print(f"FAIL: output shape changed {tuple(dense_shape)} -> {tuple(pruned_shape)}", file=sys.stderr)
        return 1
    if args.compile:
        LOG.info("compiling dense and pruned models with TVM for this CPU")
        timed = {"eager dense": model, "eager pruned": pruned}
        for label, source in (("dense", model), ("pruned", pruned)):
            compiled = sparsefx.compile(source, inputs, target="cpu", verbose=False)
            with torch.inference_mode():
                error = (compiled(*inputs) - source(*inputs)).abs().max().item()
            print(f"TVM {label}: {recipe.kernel_summary(compiled.manifest)}; max abs error vs eager {error:.1e}")
            timed[f"tvm {label}"] = compiled
        latency = measure_latencies(timed, inputs, repeat=args.repeat)
        base = latency["eager dense"]
        print("latency (median ms, alternating rounds): " + ", ".join(
            f"{name} {ms:.2f} ({base / ms:.2f}x)" for name, ms in latency.items()))
    print(f"forward check: output shape {tuple(pruned_shape)} unchanged")
    return 0


def _compare(dense: nn.Module, pruned: nn.Module, inputs: tuple[torch.Tensor, ...], repeat: int) -> str:
    """MACs, params and eager latency before -> after, measured the same way for both models."""
    macs = sparsefx.count_macs(dense, inputs), sparsefx.count_macs(pruned, inputs)
    params = sparsefx.count_params(dense), sparsefx.count_params(pruned)
    latency = measure_latencies({"dense": dense, "pruned": pruned}, inputs, repeat=repeat)
    return "\n".join([
        _before_after("MACs", *macs, _human),
        _before_after("params", *params, _human),
        _before_after("latency", latency["dense"], latency["pruned"], lambda ms: f"{ms:.2f} ms", suffix=" (eager CPU, median)"),
    ])


def _before_after(label: str, before: float, after: float, fmt, suffix: str = "") -> str:
    change = f"{(after - before) / before:+.1%}" if before else "n/a"
    return f"{label:<8} {fmt(before):>10} -> {fmt(after):>10}  ({change}){suffix}"


def _human(count: float) -> str:
    for unit, scale in (("G", 1e9), ("M", 1e6), ("K", 1e3)):
        if abs(count) >= scale:
            return f"{count / scale:.2f} {unit}"
    return f"{count:.0f}"


if __name__ == "__main__":
    sys.exit(main())
