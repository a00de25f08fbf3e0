"""BERT-base end to end with block-sparse MLP layers: compiled sparse model vs compiled dense model.

Every encoder layer's intermediate.dense (768→3072) and output.dense (3072→768) is made
block-sparse at each density (magnitude blocks, random weights), converted with
`sparsefx.sparsify` and compiled with `sparsefx.compile`; the compiled output is checked against
the masked dense model with sparsefx.capture.compare (relative L2, reference checked O(1) and
input-dependent). All models are built first, then timed side by side: eager dense, TVM dense and
every TVM sparse model in alternating rounds, medians. The speedup that counts is against TVM
dense (same compiler, same host, same rounds); eager dense is shown beside it.
Writes results/sparse_bert.{json,md} stamped with date, commit, host, threads and load.

    nice -n 10 flock /tmp/sparsefx-bench.lock .venv/bin/python benchmarks/sparse_bert.py --threads 1
"""

from __future__ import annotations

import argparse
import copy
import os
import sys
import time
from pathlib import Path

import torch
from common import RunRecord

import sparsefx
from sparsefx.backends.eager import measure_latencies
from sparsefx.capture.compare import check_reference, first_tensor, output_error
from sparsefx.capture.models import load_model
from sparsefx.sparse.masks import Sparsity, apply_masks, compute_masks


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="hf:bert-base")
    parser.add_argument("--densities", default="0.2,0.1", help="kept fractions (0.2 = 80%% sparse)")
    parser.add_argument("--block", default="16x1")
    parser.add_argument("--threads", type=int, default=None, help="PyTorch and TVM threads (default: their choice)")
    parser.add_argument("--repeat", type=int, default=40, help="timed calls per model, split over the rounds")
    parser.add_argument("--rounds", type=int, default=8)
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "results")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
        os.environ["TVM_NUM_THREADS"] = str(args.threads)  # read when TVM's pool first starts
    threads = torch.get_num_threads()  # TVM runs on eager's thread count (compile's default is every core)
    record = RunRecord(sys.argv)
    block = tuple(int(v) for v in args.block.split("x"))
    model, inputs = load_model(args.model)
    names = [n for n, _ in model.named_modules() if n.endswith(("intermediate.dense", "output.dense"))
             and "attention" not in n]
    timed = {"eager dense": model, "tvm dense": sparsefx.compile(model, inputs, verbose=False, threads=threads)}
    rows = []
    for density in (float(d) for d in args.densities.split(",")):
        specs = dict.fromkeys(names, Sparsity(density, "block", block=block))
        masked = copy.deepcopy(model)
        apply_masks(masked, compute_masks(masked, specs))
        expected = check_reference(masked, inputs)
        started = time.perf_counter()
        compiled = sparsefx.compile(sparsefx.sparsify(model, specs), inputs, verbose=False, threads=threads)
        compile_s = time.perf_counter() - started
        with torch.no_grad():
            error = output_error(expected, first_tensor(compiled(*inputs)))
        timed[f"tvm sparse {density}"] = compiled
        rows.append({"density": density, "sparsity": 1 - density, "block": list(block), "layers": len(names),
                     "rel_l2_err_vs_masked": error.relative_l2, "compile_s": round(compile_s, 1),
                     "import_route": compiled.manifest["import_route"]})
        print(rows[-1], file=sys.stderr, flush=True)
    ms = measure_latencies(timed, inputs, repeat=args.repeat, rounds=args.rounds)
    for row in rows:
        row.update(eager_dense_ms=ms["eager dense"], tvm_dense_ms=ms["tvm dense"],
                   tvm_sparse_ms=ms[f"tvm sparse {row['density']}"])
        row["speedup_vs_tvm_dense"] = row["tvm_dense_ms"] / row["tvm_sparse_ms"]
        row["speedup_vs_eager_dense"] = row["eager_dense_ms"] / row["tvm_sparse_ms"]
    record.write_report(args.out / "sparse_bert.json", {"model": args.model, "inputs": list(inputs[0].shape),
                                                        "latency_ms": ms, "rows": rows})
    lines = [f"# {args.model}, input {tuple(inputs[0].shape)}, {len(names)} MLP linears block-sparse ({args.block} blocks)",
             "", record.markdown_line(), "",
             f"Median ms of alternating rounds ({args.rounds} rounds, {args.repeat} calls per model), every model "
             "in the same rounds. Error: relative L2 of the compiled sparse model against the masked eager model.", "",
             "| sparsity | eager dense ms | TVM dense ms | TVM sparse ms | speedup vs TVM dense | speedup vs eager dense "
             "| rel L2 err vs masked | compile s |", "|---|---|---|---|---|---|---|---|"]
    lines += [f"| {r['sparsity']:.0%} | {r['eager_dense_ms']:.1f} | {r['tvm_dense_ms']:.1f} | {r['tvm_sparse_ms']:.1f} | "
              f"{r['speedup_vs_tvm_dense']:.2f}x | {r['speedup_vs_eager_dense']:.2f}x | {r['rel_l2_err_vs_masked']:.1e} | "
              f"{r['compile_s']} |" for r in rows]
    (args.out / "sparse_bert.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
