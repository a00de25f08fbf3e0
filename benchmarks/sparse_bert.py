"""BERT-base end to end with block-sparse MLP layers: compiled sparse model vs torch eager dense.

Every encoder layer's intermediate.dense (768→3072) and output.dense (3072→768) is made
block-sparse at each density (magnitude blocks, random weights), converted with
`sparsefx.sparsify` and compiled with `sparsefx.compile`; the compiled output is checked
against the masked dense model. Timings: best of 10 calls through Python for every model.
Writes results/sparse_bert.{json,md}.

    nice -n 10 flock /tmp/sparsefx-bench.lock .venv/bin/python benchmarks/sparse_bert.py
"""

from __future__ import annotations

import argparse
import copy
import json
import sys
import time
from pathlib import Path

import torch

import sparsefx
from sparsefx.backends.tvm.dispatch.torch_kernels import best_time
from sparsefx.capture.models import load_model
from sparsefx.sparse.masks import Sparsity, apply_masks, compute_masks
from sparsefx.target import resolve_target


def _best(run: object, repeat: int = 10) -> float:
    return best_time(run, repeat)


def _hidden(output: object) -> torch.Tensor:
    return output if isinstance(output, torch.Tensor) else (output[0] if isinstance(output, (tuple, list))
                                                             else output.last_hidden_state)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="hf:bert-base")
    parser.add_argument("--densities", default="0.2,0.1", help="kept fractions (0.2 = 80%% sparse)")
    parser.add_argument("--block", default="16x1")
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "results")
    args = parser.parse_args()
    torch.set_num_threads(resolve_target("cpu").cores)
    block = tuple(int(v) for v in args.block.split("x"))
    model, inputs = load_model(args.model)
    names = [n for n, _ in model.named_modules() if n.endswith(("intermediate.dense", "output.dense"))
             and "attention" not in n]
    with torch.no_grad():
        eager_ms = _best(lambda: model(*inputs))
    rows = []
    for density in (float(d) for d in args.densities.split(",")):
        specs = dict.fromkeys(names, Sparsity(density, "block", block=block))
        masked = copy.deepcopy(model)
        apply_masks(masked, compute_masks(masked, specs))
        sparse = sparsefx.sparsify(model, specs)
        started = time.perf_counter()
        compiled = sparsefx.compile(sparse, inputs, verbose=False)
        compile_s = time.perf_counter() - started
        with torch.no_grad():
            want, got = _hidden(masked(*inputs)), _hidden(compiled(*inputs))
            masked_eager_ms = _best(lambda masked=masked: masked(*inputs))
        rel = float((got - want).abs().max() / want.abs().max())
        tvm_ms = _best(lambda compiled=compiled: compiled(*inputs))
        rows.append({"density": density, "sparsity": 1 - density, "block": list(block), "layers": len(names),
                     "rel_error_vs_masked": rel, "eager_dense_ms": eager_ms, "eager_masked_ms": masked_eager_ms,
                     "tvm_sparse_ms": tvm_ms, "speedup_vs_eager_dense": eager_ms / tvm_ms,
                     "compile_s": round(compile_s, 1), "import_route": compiled.manifest["import_route"]})
        print(rows[-1], file=sys.stderr, flush=True)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "sparse_bert.json").write_text(json.dumps({"model": args.model, "inputs": list(inputs[0].shape),
                                                           "target": str(resolve_target("cpu")), "rows": rows},
                                                          indent=1))
    lines = [f"{args.model}, input {tuple(inputs[0].shape)}, {len(names)} MLP linears block-sparse "
             f"({args.block} blocks); best of 10 calls.", "",
             "| sparsity | eager dense ms | TVM sparse ms | speedup | rel. error vs masked | compile s |",
             "|---|---|---|---|---|---|"]
    lines += [f"| {r['sparsity']:.0%} | {r['eager_dense_ms']:.1f} | {r['tvm_sparse_ms']:.1f} | "
              f"{r['speedup_vs_eager_dense']:.2f}x | {r['rel_error_vs_masked']:.1e} | {r['compile_s']} |" for r in rows]
    (args.out / "sparse_bert.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
