"""Targets: the device a model is compiled for and what it can do.

A `Target` names the device (host CPU through LLVM, an NVIDIA GPU through CUDA), its
architecture, core count, SIMD width, and peak compute / memory bandwidth: measured on
the host CPU (cached on disk), nominal data-sheet figures for GPUs. The cost model reads
the peaks; the TVM backend reads `to_tvm()`.
"""

from __future__ import annotations

import functools
import hashlib
import importlib.metadata
import os
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path

from sparsefx.cache import Table, cache_dir
from sparsefx.errors import SparsefxError

# Nominal FP32 (non-tensor-core) TFLOP/s and HBM GB/s of common data-centre parts, by arch.
CUDA_ARCHS = {
    "sm_70": ("V100", 15.7, 900), "sm_75": ("T4", 8.1, 320), "sm_80": ("A100", 19.5, 2039),
    "sm_86": ("A10", 31.2, 600), "sm_89": ("L4", 30.3, 300), "sm_90": ("H100", 67.0, 3350),
    "sm_90a": ("H100", 67.0, 3350), "sm_100": ("B200", 80.0, 8000), "sm_120": ("RTX 5090", 104.8, 1792),
}
PEAKS_VERSION = 1  # bumped when how the peaks are measured changes
HOST_CPU_VERSION = 1  # bumped when what `_host_cpu` keeps changes


@dataclass(frozen=True)
class Target:
    name: str  # "cpu" or "cuda"
    kind: str  # TVM target kind: "llvm" or "cuda"
    arch: str  # LLVM CPU name (e.g. znver5) or CUDA compute capability (e.g. sm_90)
    cores: int
    vector_bits: int  # SIMD register width; 0 when unknown
    peak_gflops: float | None = None
    bandwidth_gbs: float | None = None
    device_name: str = ""
    # what dispatched convs and matmuls compute in on a CPU ("bf16": PyTorch's bf16 kernels, fp32
    # accumulation): the dispatch and the cost model time, price and decide at it (`with_precision`)
    precision: str = "fp32"

    def to_tvm(self) -> object:
        import tvm

        if self.kind == "llvm":
            config = {"kind": "llvm", "mcpu": self.arch, "num-cores": self.cores}
            if self.precision == "bf16" and has_bf16():  # LLVM may not name the CPU (this Xeon: "rocketlake")
                config["mattr"] = list(TILE_MATTR if has_tiles() else BF16_MATTR)
            return tvm.target.Target(config)
        return tvm.target.Target({"kind": "cuda", "arch": self.arch},
                                 host={"kind": "llvm", "mcpu": _host_cpu(), "num-cores": host_cores()})

    @property
    def is_gpu(self) -> bool:
        return self.kind == "cuda"

    def as_dict(self) -> dict:
        return asdict(self)

    def as_key(self) -> dict:
        """`as_dict` without the peaks filled in once measured: the same target before and after (what
        keys kept work, `backends.artifacts` and `planning.kept`)."""
        return {k: v for k, v in self.as_dict().items() if k not in ("peak_gflops", "bandwidth_gbs")}

    @classmethod
    def from_dict(cls, data: dict) -> Target:
        return cls(**data)

    def __str__(self) -> str:
        peaks = ""
        if self.peak_gflops:
            peaks = f", {self.peak_gflops:.0f} GFLOP/s, {self.bandwidth_gbs:.0f} GB/s"
        bf16 = f", {self.precision}" if self.precision != "fp32" else ""
        return (f"{self.name} ({self.device_name or self.arch}, {self.cores} cores, {self.vector_bits}-bit SIMD"
                f"{peaks}{bf16})")


def resolve_target(spec: object = "cpu", measure: bool = False) -> Target:
    """'cpu' (the host), 'cuda' (sm_80), 'cuda:sm_90', a Target, or a dict of Target fields."""
    if isinstance(spec, Target):
        return spec
    if isinstance(spec, dict):
        return Target.from_dict(spec)
    if not isinstance(spec, str):
        raise SparsefxError(f"target must be a name like 'cpu' or 'cuda:sm_90', got {type(spec).__name__}")
    name, _, arch = spec.strip().lower().partition(":")
    if name in ("cpu", "llvm"):
        target = host_cpu()
        return with_measured_peaks(target) if measure else target
    if name == "cuda":
        arch = arch or "sm_80"
        if arch not in CUDA_ARCHS:
            raise SparsefxError(f"CUDA arch {arch!r} does not exist or is not supported; use one of "
                                f"{', '.join(CUDA_ARCHS)} (e.g. target='cuda:sm_90')")
        device, tflops, bandwidth = CUDA_ARCHS[arch]
        return Target("cuda", "cuda", arch, 0, 1024, tflops * 1e3, bandwidth, device)
    raise SparsefxError(f"unknown target {spec!r}; use 'cpu' (host CPU via LLVM) or 'cuda[:sm_XX]'")


@functools.cache
def _host_cpu() -> str:
    """LLVM's name for the host CPU (what TVM compiles for), asked of TVM once per CPU model, flags
    and TVM version and kept on disk (`cache_dir()/host_cpu.json`): importing TVM to ask took 2.1 s
    of a 6.3 s warm plan of ResNet-50 that otherwise needs no TVM."""
    key = hashlib.sha1(f"{cpu_model()}|{' '.join(sorted(cpu_flags()))}|{tvm_version()}".encode()).hexdigest()[:16]
    table = Table(cache_dir() / "host_cpu.json", HOST_CPU_VERSION)
    if not isinstance(table.entries.get(key), str):
        import tvm.target.codegen

        table.entries[key] = str(tvm.target.codegen.llvm_get_system_cpu())
        table.save()
    return table.entries[key]


@functools.cache
def tvm_version() -> str:
    """The installed apache-tvm's version, read without importing TVM ("unknown" where it is not installed)."""
    try:
        return importlib.metadata.version("apache-tvm")
    except importlib.metadata.PackageNotFoundError:
        return "unknown"


def host_cores() -> int:
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


def _vector_bits() -> int:
    flags = cpu_flags()
    for flag, bits in (("avx512f", 512), ("avx2", 256), ("avx", 256), ("sse2", 128), ("asimd", 128)):
        if flag in flags:
            return bits
    return 0


def cpu_model() -> str:
    """The host CPU's model name (/proc/cpuinfo); empty where the file has none."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return ""


def host_cpu() -> Target:
    return Target("cpu", "llvm", _host_cpu(), host_cores(), _vector_bits(), device_name=cpu_model())


def with_measured_peaks(target: Target) -> Target:
    """Fill peak GFLOP/s (large fp32 matmul) and bandwidth (large copy), measured once per host."""
    if target.kind != "llvm":
        return target
    table = peaks_table()
    key = f"{target.arch}/{target.cores}/{target.device_name}"
    if key not in table.entries:
        table.entries[key] = measure_cpu_peaks()
        table.save()
    gflops, bandwidth = table.entries[key]
    return replace(target, peak_gflops=gflops, bandwidth_gbs=bandwidth)


def peaks_table() -> Table:
    """Peak GFLOP/s and GB/s per host CPU, keyed by arch/cores/model name."""
    return Table(cache_dir() / "peaks.json", PEAKS_VERSION)


def measure_cpu_peaks() -> tuple[float, float]:
    import torch  # here only: targets are resolved without PyTorch (`cli.recipe`)

    a, b = torch.randn(1024, 1024), torch.randn(1024, 1024)
    src, dst = torch.randn(32 * 2**20 // 4), torch.empty(32 * 2**20 // 4)
    flops, copies = [], []
    for _ in range(5):
        start = time.perf_counter()
        torch.mm(a, b)
        flops.append(2 * 1024**3 / (time.perf_counter() - start) / 1e9)
        start = time.perf_counter()
        dst.copy_(src)
        copies.append(2 * src.numel() * 4 / (time.perf_counter() - start) / 1e9)
    return max(flops), max(copies)


def with_threads(target: Target, threads: int | None) -> Target:
    """`target` seen as having `threads` cores (1 on a busy machine): the count its kernels are timed,
    priced and compiled for. Changes nothing process-wide: the timers and compiled models set PyTorch's
    and TVM's pools to it for each call (`backends.tvm.threads.running_with`)."""
    if not threads or target.is_gpu:
        return target
    return replace(target, cores=threads)


def with_precision(target: Target, precision: str) -> Target:
    """`target` computing its convs and matmuls in `precision` (checked by `check_precision`): CPU
    targets time, price and dispatch at it; CUDA targets take it from `compile`'s argument."""
    check_precision(precision, target)
    return target if target.is_gpu else replace(target, precision=precision)


PRECISIONS = ("fp32", "fp16", "bf16")  # what compile accepts by name
# the first CUDA compute capability with fp16 tensor cores (Volta) and with bf16 arithmetic (Ampere)
MIN_CUDA_SM = {"fp16": 70, "bf16": 80}
BF16_FLAGS = ("avx512_bf16", "amx_bf16")  # /proc/cpuinfo flags of the instructions bf16 kernels need
TILE_FLAGS = ("amx_tile", "amx_bf16")  # AMX with bf16 tiles (`kernels.amx`)
BF16_MATTR = ("+avx512bf16",)  # what LLVM needs enabled to emit AVX512-BF16 (`kernels.dpbf16`)
TILE_MATTR = ("+amx-tile", "+amx-bf16", *BF16_MATTR)  # and AMX's tiles


class TargetError(SparsefxError):
    """A thread count or precision the target cannot run."""


def cpu_flags() -> frozenset[str]:
    """The host CPU's feature flags (/proc/cpuinfo); empty where the file has none."""
    try:
        return frozenset(Path("/proc/cpuinfo").read_text().split("flags", 1)[1].split("\n", 1)[0].split(":", 1)[1].split())
    except (OSError, IndexError):
        return frozenset()


def has_tiles() -> bool:
    """Whether this CPU has AMX with bf16 tiles."""
    return set(TILE_FLAGS) <= cpu_flags()


def has_bf16() -> bool:
    """Whether this CPU has AVX512-BF16 (every CPU with AMX bf16 tiles has it too)."""
    return "avx512_bf16" in cpu_flags()


def check_threads(threads: int | None, target: Target | None = None) -> int:
    """The thread count a model for `target` runs with: `threads`, or all of the target's cores when None
    (of the host's for a GPU target, whose host code runs on them, or no target)."""
    if threads is None:
        return (target.cores if target else 0) or host_cores()
    if isinstance(threads, bool) or not isinstance(threads, int) or threads < 1:
        raise TargetError(f"threads must be a whole number of cores >= 1, got {threads!r}; "
                          f"use 1..{host_cores()} or None (all cores)")
    if threads > host_cores():
        raise TargetError(f"threads={threads} is more than the {host_cores()} cores this process may use; "
                          f"use 1..{host_cores()} or None (all cores)")
    return threads


def compile_target(target: object, threads: int | None, precision: str | None) -> tuple[Target, int, str]:
    """What `sparsefx.compile` builds for: the target as it measures and records it (a CPU target's cores
    are the threads the model runs with: dispatch and tuning tables are per core count), the thread
    count and the precision, each checked."""
    spec = resolve_target(target)
    threads = check_threads(threads, spec)
    precision = precision or spec.precision
    spec = with_precision(spec, precision)
    return (spec if spec.is_gpu else replace(spec, cores=threads)), threads, precision


def check_precision(precision: str, target: Target, flags: frozenset[str] | None = None) -> str:
    """`precision` if `target` can run it and sparsefx builds it, else a one-line TargetError."""
    if precision not in PRECISIONS:
        raise TargetError(f"unknown precision {precision!r}; use one of {', '.join(map(repr, PRECISIONS))}")
    if target.is_gpu:
        sm = sm_version(target.arch)
        if precision in MIN_CUDA_SM and sm < MIN_CUDA_SM[precision]:
            raise TargetError(f"precision={precision!r} needs a CUDA arch of sm_{MIN_CUDA_SM[precision]} or newer and "
                              f"{target.arch} is older; use precision='fp32' or a newer target (e.g. 'cuda:sm_90')")
        return precision
    if precision == "fp16":
        raise TargetError("precision='fp16' is for CUDA targets (tensor cores); compile for CPU with precision='fp32'")
    if precision == "bf16" and not set(BF16_FLAGS) & (cpu_flags() if flags is None else flags):
        raise TargetError(f"precision='bf16' needs a CPU with AVX512-BF16 or AMX ({' or '.join(BF16_FLAGS)} in "
                          "/proc/cpuinfo) and this one has neither; use precision='fp32'")
    return precision


def sm_version(arch: str) -> int:
    """The compute capability of a CUDA arch name as a number: 'sm_90a' -> 90; 0 where it has none."""
    digits = "".join(ch for ch in arch.removeprefix("sm_") if ch.isdigit())
    return int(digits) if digits else 0
