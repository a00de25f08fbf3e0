"""2:4 sparse tensor-core GEMM (`backends/tvm/sparse_mma.py`) vs dense fp16 matmul, on a GPU.

For each size, random fp16 x (tokens × cols) and a random 2:4 weight (rows × cols, magnitude
2:4), packed with `formats.mma24_pack`: the TVM `mma.sp` kernel's output (fp16, fp32 accumulation)
is checked against the same product in fp32 (relative max error below 1e-2: fp16 inputs and an
fp16 output), then timed against PyTorch's dense fp16 `x @ Wᵀ + b` (cuBLAS): fastest of
--repeat runs, TVM by `time_evaluator`, PyTorch by CUDA events. Sizes: 4096³ and BERT-base's
MLP linears (768→3072, 3072→768) at 128 and 4096 tokens. Writes results/sparse_mma_gpu.{json,md}.
Without a GPU it prints one line and exits with status 1.

    .venv/bin/python benchmarks/sparse_mma_gpu.py
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np
import torch
import tvm

from sparsefx.backends.tvm import sparse_mma
from sparsefx.formats import NM, mma24_pack

SIZES = [  # (name, rows = out features, cols = in features, tokens)
    ("square 4096", 4096, 4096, 4096),
    ("bert 768->3072 t128", 3072, 768, 128),
    ("bert 3072->768 t128", 768, 3072, 128),
    ("bert 768->3072 t4096", 3072, 768, 4096),
    ("bert 3072->768 t4096", 768, 3072, 4096),
]


def _gpu_arch() -> str | None:
    if not torch.cuda.is_available() or not tvm.cuda(0).exist:
        return None
    major, minor = torch.cuda.get_device_capability(0)
    return f"sm_{major}{minor}"


def _torch_best(run: object, repeat: int) -> float:
    """Fastest of `repeat` runs in ms, each bracketed by CUDA events."""
    for _ in range(3):
        run()
    times = []
    for _ in range(repeat):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        run()
        end.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(end))
    return min(times)


def measure(name: str, rows: int, cols: int, tokens: int, arch: str, repeat: int) -> dict:
    torch.manual_seed(0)
    nm = NM.from_dense(torch.randn(rows, cols), 2, 4)
    values, meta = mma24_pack(nm)
    weight = nm.to_dense().half().cuda()
    x = torch.randn(tokens, cols).half().cuda()
    bias = torch.randn(rows).cuda()
    spec = sparse_mma.MmaSpec(rows, cols, tokens, "float16")
    lib = sparse_mma.build([spec], tvm.target.Target({"kind": "cuda", "arch": arch}))
    dev = tvm.cuda(0)
    args = [tvm.runtime.tensor(a, dev) for a in (x.cpu().numpy(), values, meta, bias.cpu().numpy())]
    out = tvm.runtime.empty((tokens, rows), "float16", dev)
    lib[spec.name](*args, out)
    dev.sync()
    want = (x.float() @ weight.float().T + bias).cpu().numpy()
    got = out.numpy().astype(np.float32)
    error = float(np.abs(got - want).max() / max(np.abs(want).max(), 1e-12))
    timer = lib.mod.time_evaluator(spec.name, dev, number=10, repeat=repeat, min_repeat_ms=50)
    sparse_ms = float(np.min(timer(*args, out).results)) * 1e3
    bias16 = bias.half()
    dense_ms = _torch_best(lambda: torch.addmm(bias16, x, weight.T), repeat)
    flops = 2 * rows * cols * tokens
    return {"name": name, "rows": rows, "cols": cols, "tokens": tokens, "max_rel_error": error,
            "correct": error < 1e-2, "dense_ms": dense_ms, "sparse_ms": sparse_ms,
            "speedup": dense_ms / sparse_ms, "dense_tflops": flops / dense_ms / 1e9,
            "sparse_dense_equiv_tflops": flops / sparse_ms / 1e9}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeat", type=int, default=20)
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "results")
    args = parser.parse_args()
    arch = _gpu_arch()
    if arch is None:
        print("sparse_mma_gpu: no CUDA GPU visible (torch.cuda / tvm.cuda(0)); nothing measured", file=sys.stderr)
        return 1
    rows = [measure(*size, arch, args.repeat) for size in SIZES]
    device = torch.cuda.get_device_name(0)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "sparse_mma_gpu.json").write_text(json.dumps(
        {"device": device, "arch": arch, "instruction": sparse_mma.instruction(), "rows": rows}, indent=1) + "\n")
    lines = [f"# 2:4 mma.sp (TVM TIR) vs dense fp16 (PyTorch/cuBLAS) on {device} ({arch})", "",
             "| size | rows x cols | tokens | max rel error | dense ms | 2:4 ms | speedup | dense TFLOP/s |",
             "|---|---|---|---|---|---|---|---|"]
    lines += [f"| {r['name']} | {r['rows']}x{r['cols']} | {r['tokens']} | {r['max_rel_error']:.1e}"
              f"{'' if r['correct'] else ' WRONG'} | {r['dense_ms']:.3f} | {r['sparse_ms']:.3f} | "
              f"{r['speedup']:.2f}x | {r['dense_tflops']:.0f} |" for r in rows]
    (args.out / "sparse_mma_gpu.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    return 0 if all(r["correct"] for r in rows) else 2


if __name__ == "__main__":
    sys.exit(main())
