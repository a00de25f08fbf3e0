"""Command line for the cost-driven path: `sparsefx plan|apply|optimize`."""

from __future__ import annotations

import argparse
import json
import shutil
import tempfile
import time
from pathlib import Path

import torch

import sparsefx
from sparsefx.backends.eager import measure_latencies
from sparsefx.cli import recipe
from sparsefx.cli.calibration import add_calibration_args, read_calibration
from sparsefx.cli.common import (
    LOG,
    add_model_args,
    add_precision_arg,
    add_threads_arg,
    check_out,
    load,
    model_spec,
    progress_bars,
    save,
)
from sparsefx.cost.model import table_paths
from sparsefx.errors import SparsefxError
from sparsefx.planning.measured import plan_measured
from sparsefx.planning.plan import GRANULARITIES, Plan
from sparsefx.planning.planner import apply, plan
from sparsefx.planning.pricing import cost_model
from sparsefx.recovery.data import fashion_mnist
from sparsefx.target import Target, resolve_target, with_precision, with_threads


def add_commands(commands: argparse._SubParsersAction) -> None:
    p = commands.add_parser("plan", help="choose what to prune from a cost model to meet a budget; write plan JSON")
    add_model_args(p)
    _add_plan_args(p)
    p.add_argument("--out", type=Path, required=True, help="plan file to write (.json)")
    p.add_argument("--rpc", metavar="HOST:PORT", help="time kernels on the device this TVM RPC tracker serves "
                   "(pure TIR, as a dispatch=False build runs there; needs --rpc-key)")
    p.add_argument("--rpc-key", help="the device's key at the tracker")
    add_threads_arg(p)
    p.set_defaults(handler=_plan)

    a = commands.add_parser("apply", help="carry out a plan (possibly hand-edited) and save the model")
    add_model_args(a)
    a.add_argument("plan", type=Path, help="plan file written by `sparsefx plan`")
    a.add_argument("--out", type=Path, required=True,
                   help="directory to save the rewritten model to (model.safetensors + sparsefx.json)")
    a.set_defaults(handler=_apply)

    o = commands.add_parser("optimize", help="trace, plan, apply, (fine-tune), compile and measure, in one go")
    add_model_args(o)
    _add_plan_args(o)
    o.add_argument("--data", choices=("fashion-mnist",), default=None,
                   help="fine-tune and evaluate on this dataset after pruning (distilled from the dense model)")
    o.add_argument("--epochs", type=int, default=2, help="fine-tuning epochs when --data is given")
    o.add_argument("--repeat", type=int, default=20, help="timed forward passes per model")
    o.add_argument("--rounds", type=int, default=3,
                   help="CPU, --speedup/--latency-ms: plans tried until the compiled model measures within "
                        "--tolerance of the budget (1: trust the cost model's prediction)")
    o.add_argument("--tolerance", type=float, default=0.05, help="relative miss accepted by --rounds (default 0.05)")
    o.add_argument("--out", type=Path, required=True, help="directory to create with plan.json, model/ (the optimized "
                   "model, sparsefx.save: safetensors + JSON), model.sfx (compiled) and report.json")
    add_threads_arg(o)
    o.set_defaults(handler=_optimize)


def _add_plan_args(parser: argparse.ArgumentParser) -> None:
    budget = parser.add_mutually_exclusive_group(required=True)
    budget.add_argument("--speedup", type=float, help="speedup to reach on the target, e.g. 2.0 (predicted; "
                        "measured by optimize on the CPU)")
    budget.add_argument("--latency-ms", type=float, help="latency to reach on the target (as --speedup)")
    budget.add_argument("--macs-ratio", type=float, help="fraction of MACs to keep")
    parser.add_argument("--target", default="cpu", help="cpu (host CPU via LLVM) or cuda[:sm_XX] (default: cpu)")
    parser.add_argument("--granularity", default="channel", help=f"comma list from {', '.join(GRANULARITIES)}")
    parser.add_argument("--importance", default="l1", help="channel importance criterion (default: l1): l1, l2, "
                        "wanda or taylor (data-aware, see --calibration)")
    add_calibration_args(parser)
    parser.add_argument("--max-ratio", type=float, default=0.9, help="most of one group that may be removed")
    add_precision_arg(parser)  # priced and compiled at it
    parser.add_argument("--ignore", nargs="+", action="extend", default=[], metavar="NAME",
                        help="module names whose channels must not be pruned")
    parser.add_argument("--no-cache", dest="cache", action="store_false",
                        help="plan afresh even if this model was planned with these options on the same cost tables")


def _target(args: argparse.Namespace) -> Target:
    """The target; on the CPU, --threads also sets the cores kernels are measured and compiled for,
    --precision what they compute in."""
    target = with_threads(resolve_target(args.target), getattr(args, "threads", None))
    return with_precision(target, args.precision) if getattr(args, "precision", None) else target


def _make_plan(args: argparse.Namespace, model: torch.nn.Module, inputs: tuple, rounds: int = 1) -> Plan:
    """The plan from the cost model; with `rounds` > 1, re-planned until it measures as asked
    (speedup or latency budgets on the CPU, see sparsefx/planning/measured.py)."""
    target = _target(args)
    LOG.info(f"planning for {target} (kernel latencies are measured once and cached)")
    started = time.perf_counter()
    options = dict(granularities=[g.strip() for g in args.granularity.split(",") if g.strip()],
                   importance=args.importance, ignore=tuple(args.ignore), max_ratio=args.max_ratio, cache=args.cache)
    calibration = read_calibration(args, model, inputs)
    if calibration is not None:
        options["calibration"] = calibration
    if getattr(args, "rpc", None):
        if not args.rpc_key:
            raise SparsefxError("--rpc needs --rpc-key, the key the device registered with at the tracker")
        from sparsefx.backends.tvm.remote import parse_tracker

        parse_tracker(args.rpc)
        options["cost"] = cost_model(target, rpc=(args.rpc, args.rpc_key))
        LOG.info(f"kernels are timed on device {args.rpc_key!r} through {args.rpc}")
    if rounds != 1 and args.macs_ratio is None and not target.is_gpu:
        LOG.info(f"re-planning until the compiled model measures within {100 * args.tolerance:g}% of the budget "
                f"(at most {rounds} plans, each compiled and timed)")
        result = plan_measured(model, inputs, target=target, speedup=args.speedup, latency_ms=args.latency_ms,
                               rounds=rounds, tolerance=args.tolerance, verbose=progress_bars(args), **options)
    else:
        result = plan(model, inputs, target=target, speedup=args.speedup, latency_ms=args.latency_ms,
                      macs_ratio=args.macs_ratio, verbose=progress_bars(args), **options)
    LOG.info(f"planned in {time.perf_counter() - started:.1f} s")
    return result


def _plan(args: argparse.Namespace) -> int:

    check_out(args.out)
    model, inputs = load(args)
    result = _make_plan(args, model, inputs)
    recipe.keep(args.command_line, result, table_paths(_target(args)))
    recipe.report(result, args.model, args.out)
    return 0


def _apply(args: argparse.Namespace) -> int:

    check_out(args.out)
    the_plan = Plan.load(args.plan)  # a bad plan fails before the model is even built
    model, inputs = load(args)
    rewritten = apply(model, the_plan, inputs)
    before, after = sparsefx.count_macs(model, inputs), sparsefx.count_macs(rewritten, inputs)
    print(f"MACs {before / 1e6:.1f} M -> {after / 1e6:.1f} M ({after / before:.2f}), "
          f"params {sparsefx.count_params(model) / 1e6:.2f} M -> {sparsefx.count_params(rewritten) / 1e6:.2f} M")
    save(rewritten, args.out, args.model, args.arch)
    return 0


def _optimize(args: argparse.Namespace) -> int:

    if args.out.exists():
        raise SparsefxError(f"{args.out} already exists; choose a new --out directory (nothing is overwritten)")
    check_out(args.out)
    model, inputs = load(args)
    result = _make_plan(args, model, inputs, args.rounds)
    print(result.explain())
    LOG.info("applying the plan")
    optimized = apply(model, result, inputs)
    report: dict = {"plan": result.predicted, "measured_planning": result.measured}
    if args.data:
        report["accuracy"] = _finetune(model, optimized, args.epochs)
    LOG.info(f"compiling dense and optimized models with TVM for {args.target}")
    compiled = {label: sparsefx.compile(m, inputs, target=_target(args), verbose=False)
                for label, m in (("dense", model), ("optimized", optimized))}
    if not compiled["dense"].target.is_gpu:
        LOG.info("measuring (alternating rounds)")
        latency = measure_latencies({"eager dense": model, "tvm dense": compiled["dense"],
                                     "tvm optimized": compiled["optimized"]}, inputs, repeat=args.repeat)
        report["latency_ms"] = latency
        report["measured_speedup"] = latency["tvm dense"] / latency["tvm optimized"]
        print(f"measured on this CPU: eager dense {latency['eager dense']:.3f} ms, TVM dense {latency['tvm dense']:.3f} "
              f"ms, TVM optimized {latency['tvm optimized']:.3f} ms: {report['measured_speedup']:.2f}x "
              f"(predicted {result.predicted['speedup']:.2f}x)")
    with tempfile.TemporaryDirectory(dir=args.out.parent) as tmp:  # all or nothing: no half-written --out
        staging = Path(tmp) / "out"
        staging.mkdir()
        result.save(staging / "plan.json")
        spec = model_spec(args.model, args.arch)
        sparsefx.save(optimized, staging / "model", spec=spec)
        compiled["optimized"].export(staging / "model.sfx")
        (staging / "report.json").write_text(json.dumps(report, indent=1, default=float) + "\n")
        shutil.move(str(staging), args.out)
    how = f"sparsefx.load('{args.out / 'model'}'{'' if spec else ', model=<its dense architecture>'})"
    print(f"wrote {args.out}/: plan.json, model/ (safetensors + JSON, no pickle: {how}), model.sfx, report.json")
    return 0


def _finetune(dense: torch.nn.Module, model: torch.nn.Module, epochs: int) -> dict:
    data = fashion_mnist()
    LOG.info(f"fine-tuning {epochs} epoch(s) on Fashion-MNIST, distilled from the dense model")
    sparsefx.finetune(model, data.train, epochs=epochs, distill_from=dense)
    model.eval()
    report = sparsefx.evaluate(model, data.test, reference=dense, class_names=list(data.class_names))
    print(f"accuracy {100 * report.accuracy:.2f}% (dense {100 * report.reference_accuracy:.2f}%)")
    print(report.table())
    return {"optimized": report.accuracy, "dense": report.reference_accuracy}
