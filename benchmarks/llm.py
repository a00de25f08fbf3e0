"""Structured pruning of a real small language model: held-out perplexity against the fraction of
parameters removed, magnitude against calibration-aware importance, before and after recovery,
and prefill latency dense against pruned (eager, and compiled through sparsefx.compile).

The model is benchmarks/train_tiny_llama.py's byte-level Llama trained on the Python stdlib
(loaded from the cache, trained first if absent). What is pruned, each at every ratio:
- mlp:    the SwiGLU hidden units of every layer (ratio keyed on mlp.up_proj);
- heads:  attention heads of every layer (keyed on self_attn.q_proj; GQA kept by the rules);
- hidden: the residual-stream width (keyed on model.embed_tokens);
- all:    every prunable group at the same ratio;
- layers: whole decoder layers by block influence (sparsefx.prune_layers), n = ratio * layers.
Importance: l1 (magnitude), wanda and taylor (calibration batches of training text) for the
width modes; layers are chosen by calibration (block influence) only. Recovery: distillation
from the dense model (benchmarks/llm_recovery.recover) of the calibration-aware model at the
ratios in --recover-ratios. A mode the analysis cannot prune is reported with its error.
The planner: `sparsefx.plan(speedup=2)` on prefill of a training window (128 tokens) (Wanda importance, priced by the
cost model at --threads), and `sparsefx.plan_measured` (re-planned until the compiled model
measures as asked); each is applied, recovered like the width modes, and its compiled prefill
timed against the dense compiled build. Decode: one token after a 128- and 512-token context,
eager (transformers' KV cache) and compiled (`sparsefx.capture.decode_step.DecodeStep`, the cache
as tensors), dense and pruned.

    .venv/bin/python benchmarks/llm.py            # full: ~1 h of 2 idle cores after the ~15 min training
    .venv/bin/python benchmarks/llm.py --quick    # smoke test on the --quick model (a few minutes)

Writes benchmarks/results/llm{_quick}.json, .md and .png.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import torch  # noqa: E402
from common import RunRecord  # noqa: E402
from llm_recovery import recover  # noqa: E402
from train_tiny_llama import (  # noqa: E402
    add_settings_arguments,
    corpus,
    load_or_train,
    perplexity,
    random_batch,
    settings_from,
    validation_windows,
)

import sparsefx  # noqa: E402
from sparsefx.backends.eager import measure_latencies  # noqa: E402
from sparsefx.capture.decode_step import DecodeStep, cache_tensors  # noqa: E402
from sparsefx.errors import one_line  # noqa: E402
from sparsefx.target import resolve_target, with_threads  # noqa: E402

log = logging.getLogger("sparsefx.bench.llm")
RESULTS = Path(__file__).resolve().parent / "results"
WIDTH_MODES = ("mlp", "heads", "hidden", "all")
KEYS = {"mlp": "mlp.up_proj", "heads": "self_attn.q_proj"}


def width_ratio(mode: str, ratio: float, layers: int) -> float | dict[str, float]:
    if mode == "all":
        return ratio
    if mode == "hidden":
        return {"model.embed_tokens": ratio}
    return {f"model.layers.{i}.{KEYS[mode]}": ratio for i in range(layers)}


def pruned(model: torch.nn.Module, mode: str, ratio: float, importance: str, calibration: list[torch.Tensor],
           example: tuple) -> torch.nn.Module:
    layers = len(model.model.layers)
    if mode == "layers":
        return sparsefx.prune_layers(model, calibration, n=max(1, round(ratio * layers)))
    options = {} if importance == "l1" else {"calibration": calibration}
    return sparsefx.prune(model, example, ratio=width_ratio(mode, ratio, layers), importance=importance, **options)


def prefill_latency(models: dict[str, torch.nn.Module], lengths: list[int], compile_models: bool) -> list[dict]:
    """Median prefill ms at batch 1 for each model, eager and (if it compiles) through sparsefx.compile."""
    rows = []
    for length in lengths:
        ids = (torch.randint(0, 256, (1, length), generator=torch.Generator().manual_seed(length)),)
        runners = runners_for(models, lambda model: model, ids, compile_models, rows, {"tokens": length})
        rows += timed(runners, ids, {"tokens": length}, per_token=length)
    return rows


def decode_latency(models: dict[str, torch.nn.Module], contexts: list[int], compile_models: bool) -> list[dict]:
    """Median ms of one decoding step (batch 1, one new token) after a context of each length: eager
    is transformers' KV-cache step, compiled is `DecodeStep` (the same step, cache as tensors)."""
    rows = []
    for context in contexts:
        prompt = torch.randint(0, 256, (1, context), generator=torch.Generator().manual_seed(context))
        token = torch.tensor([[ord("e")]])
        runners: dict[str, object] = {}
        inputs: dict[str, tuple] = {}
        for name, model in models.items():
            model.config.use_cache = True
            with torch.no_grad():
                inputs[name] = (token, *cache_tensors(model(prompt, use_cache=True)))
            runners.update(runners_for({name: model}, DecodeStep, inputs[name], compile_models, rows,
                                       {"context": context}))
            model.config.use_cache = False
        for key, runner in runners.items():  # each model has its own cache shapes: one model at a time
            rows += timed({key: runner}, inputs[key.rsplit(" ", 1)[0]], {"context": context}, per_token=1)
    return rows


def runners_for(models: dict[str, torch.nn.Module], wrap: object, inputs: tuple, compile_models: bool,
                errors: list[dict], where: dict) -> dict[str, object]:
    runners: dict[str, object] = {}
    for name, model in models.items():
        model.config.use_cache = False
        runners[f"{name} eager"] = wrap(model).eval()
        if compile_models:
            try:
                runners[f"{name} compiled"] = sparsefx.compile(wrap(model).eval(), inputs, verbose=False,
                                                               threads=torch.get_num_threads())
            except Exception as error:  # report, do not stop: the eager numbers still stand
                errors.append({**where, "model": name, "runtime": "compiled", "error": one_line(error)})
    return runners


def timed(runners: dict[str, object], inputs: tuple, where: dict, per_token: int) -> list[dict]:
    with torch.no_grad():
        times = measure_latencies(runners, inputs, repeat=10, rounds=5)
    rows = []
    for key, ms in times.items():
        name, runtime = key.rsplit(" ", 1)
        rows.append({**where, "model": name, "runtime": runtime, "ms": round(ms, 3),
                     "tokens_per_s": round(per_token / ms * 1000, 1)})
    return rows


def torchrun_recovery(steps: int = 6) -> dict:
    """llm_recovery.py on the --quick model in one process and under `torchrun --nproc-per-node 2`
    (DDP, gloo): the two loss curves, which should agree up to float summation order."""
    here, curves = Path(__file__).resolve().parent, {}
    torchrun = Path(sys.executable).with_name("torchrun")
    with tempfile.TemporaryDirectory() as tmp:
        for processes in (1, 2):
            out = Path(tmp) / f"{processes}.json"
            launch = [sys.executable] if processes == 1 else [str(torchrun), "--nproc-per-node", "2"]
            done = subprocess.run([*launch, str(here / "llm_recovery.py"), "--quick", "--recover-steps", str(steps),
                                   "--out", str(out)], capture_output=True, text=True)
            if done.returncode or not out.exists():
                tail = (done.stderr.strip().splitlines() or ["no output"])[-1]
                return {"error": f"{processes} process(es): exit {done.returncode}: {tail[:200]}"}
            curves[processes] = json.loads(out.read_text())["loss"]
    gap = max(abs(a - b) for a, b in zip(curves[1], curves[2], strict=True))
    return {"steps": steps, "loss_1_process": curves[1], "loss_2_processes": curves[2], "max_abs_diff": gap,
            "matches": gap <= 1e-3}


def goals(report: dict) -> list[str]:
    """The issue's goals, each judged from this run's rows."""
    dense, rows, lines = report["dense"]["perplexity"], [r for r in report["rows"] if "error" not in r], []
    half = [r for r in rows if abs(r["removed"] - 0.5) <= 0.05 and "recovered_perplexity" in r]
    for r in half:
        ok = r["recovered_perplexity"] <= 1.15 * dense
        lines.append(f"- {'met' if ok else 'missed'}: {r['mode']} {r['importance']} removes {r['removed']:.1%}, perplexity "
                     f"after recovery {r['recovered_perplexity']:.3f} vs dense {dense:.3f} (goal within 15%)")
    for mode in dict.fromkeys(r["mode"] for r in rows if r["importance"] == "l1"):
        for ratio in sorted({r["ratio"] for r in rows if r["mode"] == mode}):
            at = {r["importance"]: r["perplexity"] for r in rows if r["mode"] == mode and r["ratio"] == ratio}
            aware = {k: v for k, v in at.items() if k in ("wanda", "taylor")}
            if "l1" in at and aware:
                best = min(aware, key=aware.get)
                verdict = "met" if aware[best] < at["l1"] else "missed"
                lines.append(f"- {verdict}: {mode} at {ratio}, {best} {aware[best]:.3f} vs magnitude {at['l1']:.3f} "
                             f"before recovery (wanda {aware.get('wanda', float('nan')):.3f}, taylor "
                             f"{aware.get('taylor', float('nan')):.3f})")
    for r in report["plans"]:
        if "measured_speedup" in r:
            lines.append(f"- {'met' if r['within_10pct'] else 'missed'}: {r['plan']} measured {r['measured_speedup']}x "
                         f"(goal within 10% of {r['asked_speedup']:g}x)")
    ddp = report.get("torchrun", {})
    if "matches" in ddp:
        lines.append(f"- {'met' if ddp['matches'] else 'missed'}: torchrun with 2 processes vs 1, recovery loss curves "
                     f"differ by at most {ddp['max_abs_diff']:.1e} over {ddp['steps']} steps")
    elif ddp:
        lines.append(f"- missed: torchrun recovery: {ddp['error']}")
    return lines


def planned(dense: torch.nn.Module, speedup: float, calibration: list[torch.Tensor], tokens: int,
            measured: bool) -> tuple[torch.nn.Module, dict]:
    """`dense` planned for `speedup` of compiled prefill at `tokens` (Wanda on the calibration
    batches), applied; and what the plan predicted."""
    ids = (torch.randint(0, 256, (1, tokens), generator=torch.Generator().manual_seed(tokens)),)
    target = with_threads(resolve_target("cpu"), torch.get_num_threads())
    options = {"target": target, "speedup": speedup, "importance": "wanda", "calibration": calibration,
               "verbose": False}
    plan = sparsefx.plan_measured(dense, ids, **options) if measured else sparsefx.plan(dense, ids, **options)
    model = sparsefx.apply(dense, plan, ids, calibration=calibration)
    return model, {"asked_speedup": speedup, "predicted": plan.predicted, "entries": len(plan.entries),
                   "rounds": getattr(plan, "measured", None)}


def markdown(record: RunRecord, report: dict) -> str:
    dense = report["dense"]
    lines = ["# Pruning a small language model (benchmarks/llm.py)", "", record.markdown_line(), "",
             f"Model: byte-level Llama, {dense['parameters']:,} parameters, trained {report['training']['steps']} steps "
             f"on the Python stdlib; held-out perplexity {dense['perplexity']:.3f} "
             f"({math.log2(dense['perplexity']):.3f} bits/byte) on {report['eval_tokens']:,} bytes.", "",
             "| mode | importance | ratio | params removed | perplexity | vs dense | after recovery |",
             "|---|---|---|---|---|---|---|"]
    for r in report["rows"]:
        if "error" in r:
            lines.append(f"| {r['mode']} | {r['importance']} | {r['ratio']} | - | error: {r['error']} | | |")
            continue
        after = f"{r['recovered_perplexity']:.3f}" if "recovered_perplexity" in r else ""
        lines.append(f"| {r['mode']} | {r['importance']} | {r['ratio']} | {r['removed']:.1%} | {r['perplexity']:.3f} "
                     f"| {r['perplexity'] / dense['perplexity'] - 1:+.1%} | {after} |")
    lines += ["", "Goals:", "", *goals(report)]
    lines += ["", f"The planner asked for a prefill speedup ({report['plan_tokens']} tokens, compiled, {report['threads']} thread(s)); "
              "measured = dense compiled ms / planned compiled ms in the prefill table below:", "",
              "| plan | params removed | predicted | measured | within 10% | perplexity | after recovery |",
              "|---|---|---|---|---|---|---|"]
    for r in report["plans"]:
        if "error" in r:
            lines.append(f"| {r['plan']} | error: {r['error']} | | | | | |")
            continue
        p = r["predicted"]
        predicted = f"{p['dense_ms'] / p['planned_ms']:.2f}x" if p.get("planned_ms") else "-"
        after = f"{r['recovered_perplexity']:.3f}" if "recovered_perplexity" in r else ""
        lines.append(f"| {r['plan']} | {r['removed']:.1%} | {predicted} | {r.get('measured_speedup', '-')}x | "
                     f"{'yes' if r.get('within_10pct') else 'no'} | {r['perplexity']:.3f} | {after} |")
    for title, key, where in (("Prefill latency, batch 1", "latency", "tokens"),
                              ("Decode latency, one token after the context, batch 1", "decode", "context")):
        lines += ["", f"{title} (median of alternating rounds):", "",
                  f"| {where} | model | runtime | ms | tokens/s |", "|---|---|---|---|---|"]
        for r in report[key]:
            lines.append(f"| {r[where]} | {r['model']} | {r['runtime']} | {r.get('ms', '-')} | "
                         f"{r.get('tokens_per_s', r.get('error', ''))} |")
    return "\n".join(lines) + "\n"


def plot(report: dict, path: Path) -> None:
    """One panel per mode: perplexity against parameters removed, a colour per importance,
    circles before recovery and squares after."""
    modes = list(dict.fromkeys(r["mode"] for r in report["rows"] if "error" not in r))
    colours = {"l1": "tab:blue", "wanda": "tab:orange", "taylor": "tab:green", "influence": "tab:purple"}
    fig, axes = plt.subplots(1, max(1, len(modes)), figsize=(3.2 * max(1, len(modes)), 3.4), sharey=True, squeeze=False)
    for ax, mode in zip(axes[0], modes):
        ax.axhline(report["dense"]["perplexity"], color="black", lw=0.8, label="dense")
        for importance in colours:
            rows = sorted((r for r in report["rows"] if r["mode"] == mode and r["importance"] == importance
                           and "error" not in r), key=lambda r: r["removed"])
            if not rows:
                continue
            ax.plot([r["removed"] for r in rows], [r["perplexity"] for r in rows], marker="o",
                    color=colours[importance], label=importance)
            rec = [r for r in rows if "recovered_perplexity" in r]
            if rec:
                ax.plot([r["removed"] for r in rec], [r["recovered_perplexity"] for r in rec], marker="s", ls="--",
                        color=colours[importance], label=f"{importance}, recovered")
        ax.set_title(mode)
        ax.set_xlim(0, 1)
        ax.set_xlabel("fraction of parameters removed")
        ax.legend(fontsize=7)
    axes[0][0].set_ylabel("held-out perplexity (per byte)")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add_settings_arguments(parser)
    parser.add_argument("--ratios", type=float, nargs="+", default=None, help="default 0.25 0.5 0.75 (--quick 0.5)")
    parser.add_argument("--importances", nargs="+", default=["l1", "wanda", "taylor"])
    parser.add_argument("--modes", nargs="+", default=[*WIDTH_MODES, "layers"])
    parser.add_argument("--recover-ratios", type=float, nargs="*", default=[0.5])
    parser.add_argument("--recover-steps", type=int, default=None, help="default 150 (--quick 5)")
    parser.add_argument("--eval-tokens", type=int, default=None, help="default 32768 (--quick 4096)")
    parser.add_argument("--no-compile", action="store_true", help="time eager only")
    parser.add_argument("--speedup", type=float, default=2.0, help="prefill speedup asked of the planner (0: none)")
    parser.add_argument("--threads", type=int, default=None, help="torch and TVM threads (default: all cores)")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    if args.threads:
        torch.set_num_threads(args.threads)
    record = RunRecord()
    s = settings_from(args)
    ratios = args.ratios or ([0.5] if args.quick else [0.25, 0.5, 0.75])
    steps = args.recover_steps or (5 if args.quick else 150)
    eval_tokens = args.eval_tokens or (4096 if args.quick else 32768)
    dense, training = load_or_train(s)
    dense.config.use_cache = False
    train_data, val_data = corpus()
    windows = validation_windows(val_data, s.seq, eval_tokens)
    g = torch.Generator().manual_seed(1)
    calibration = [random_batch(train_data, s.seq, 8, g)[:, :-1] for _ in range(4)]  # 4 x 8 training windows
    example = (calibration[0][:1],)
    dense_ppl, dense_params = perplexity(dense, windows), sparsefx.count_params(dense)
    log.info("dense: %d parameters, perplexity %.3f", dense_params, dense_ppl)
    rows, keep_for_latency = [], {}
    for mode in args.modes:
        for importance in (["influence"] if mode == "layers" else args.importances):
            for ratio in ratios:
                row = {"mode": mode, "importance": importance, "ratio": ratio}
                started = time.perf_counter()
                try:
                    model = pruned(dense, mode, ratio, importance, calibration, example)
                except Exception as error:  # one mode failing must not hide the others
                    rows.append({**row, "error": one_line(error)})
                    log.warning("%s/%s at %.2f: %s", mode, importance, ratio, one_line(error))
                    continue
                model.config.use_cache = False
                row.update(parameters=sparsefx.count_params(model), removed=1 - sparsefx.count_params(model) / dense_params,
                           perplexity=perplexity(model, windows), prune_seconds=round(time.perf_counter() - started, 1))
                if ratio in args.recover_ratios and importance != "l1" and steps:
                    curve = recover(model, dense, train_data, steps, batch=s.batch, seq=s.seq)
                    row.update(recovered_perplexity=perplexity(model, windows), recovery_steps=steps,
                               recovery_loss=[round(curve[0], 4), round(curve[-1], 4)])
                if ratio == 0.5 and importance in ("wanda", "influence") and mode in ("all", "layers"):
                    keep_for_latency[f"{mode} 0.5"] = model
                rows.append(row)
                log.info("%s", {k: (round(v, 4) if isinstance(v, float) else v) for k, v in row.items()})
    width = calibration[0].shape[1]  # the plan's prefill length: Wanda's calibration batches match its example
    plans = []
    log.info("timing from here on (planning, measured planning, latency)")  # a sweep beside this run can pause now
    for measured in (False, True) if args.speedup else ():
        name = f"planned {args.speedup:g}x" + (", measured" if measured else "")
        started = time.perf_counter()
        try:
            model, row = planned(dense, args.speedup, calibration, width, measured)
        except Exception as error:
            plans.append({"plan": name, "error": one_line(error)})
            log.warning("%s: %s", name, one_line(error))
            continue
        model.config.use_cache = False
        row.update(plan=name, parameters=sparsefx.count_params(model),
                   removed=1 - sparsefx.count_params(model) / dense_params, perplexity=perplexity(model, windows),
                   plan_seconds=round(time.perf_counter() - started, 1))
        if steps:
            curve = recover(model, dense, train_data, steps, batch=s.batch, seq=s.seq)
            row.update(recovered_perplexity=perplexity(model, windows), recovery_steps=steps,
                       recovery_loss=[round(curve[0], 4), round(curve[-1], 4)])
        keep_for_latency[name] = model
        plans.append(row)
        log.info("%s", {k: v for k, v in row.items() if k != "rounds"})
    contexts = [width] if args.quick else [width, 4 * width]
    latency = prefill_latency({"dense": dense, **keep_for_latency}, contexts, compile_models=not args.no_compile)
    decode = decode_latency({"dense": dense, **keep_for_latency}, contexts, compile_models=not args.no_compile)
    for row in plans:
        ms = {r["model"]: r["ms"] for r in latency if r["tokens"] == width and r["runtime"] == "compiled" and "ms" in r}
        if row.get("plan") in ms and "dense" in ms:
            row["measured_speedup"] = round(ms["dense"] / ms[row["plan"]], 3)
            row["within_10pct"] = abs(row["measured_speedup"] / row["asked_speedup"] - 1) <= 0.10
    report = {"dense": {"parameters": dense_params, "perplexity": dense_ppl}, "training": training["settings"],
              "eval_tokens": int(windows[:, 1:].numel()), "calibration": "4 batches of 8 x seq training windows",
              "threads": torch.get_num_threads(), "plan_tokens": width, "rows": rows, "plans": plans, "latency": latency,
              "decode": decode, "torchrun": torchrun_recovery()}
    name = "llm_quick" if args.quick else "llm"
    record.write_report(RESULTS / f"{name}.json", report)
    (RESULTS / f"{name}.md").write_text(markdown(record, report))
    plot(report, RESULTS / f"{name}.png")
    log.info("wrote %s.{json,md,png}", RESULTS / name)


if __name__ == "__main__":
    main()
