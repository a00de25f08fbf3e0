"""Runtime-only bundle: a compiled model plus just what a host without TVM's compiler needs to run it.

Layout of the bundle directory (and of the .tar.gz made from it when the path ends so):
    model.so, manifest.json   the compiled library and what it was compiled for
    kernels/<sha256>.cubin    CUDA only: TVM 0.27 stores CUDA kernels as source and compiles them when
                              the library loads; run.py hands the runtime these cubins (compiled here
                              for the target arch) instead, so the host needs no NVRTC or nvcc
    lib/                      libtvm_runtime.so (and for CUDA libtvm_runtime_cuda.so + libcudart)
                              copied from the installed apache-tvm: they do not depend on the Python version
    wheels/                   apache-tvm-ffi (and numpy) built for the deployment host's Python
    run.py                    loads and runs the model with those pieces only
The deployment host needs Python of that version and, for CUDA, an NVIDIA driver (libcuda.so.1).
Half-precision (fp16/bf16) models take and return float32 and cast inside (`half`), so run.py's numpy
arrays serve them unchanged (numpy has no bfloat16); `numpy=False` leaves numpy to the host.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
import subprocess
import sys
import tarfile
import tempfile
from collections.abc import Iterator
from pathlib import Path

import tvm
import tvm_ffi

from sparsefx.cache import cache_dir
from sparsefx.errors import SparsefxError, one_line

RUN_SCRIPT = Path(__file__).with_name("bundle_run.py")


def export_bundle(compiled: object, path: str | Path, python: str = "3.12", numpy: bool = True) -> Path:
    """Write `compiled` as a runtime-only bundle at `path` (a directory, or a .tar.gz file)."""
    manifest = compiled.manifest
    on_torch = [k for k, d in manifest["dispatch"].items() if d["impl"] == "torch"]
    if on_torch:
        raise SparsefxError(f"{len(on_torch)} workloads run on PyTorch kernels, which a runtime-only host lacks; "
                            "compile with dispatch='own' (sparsefx's kernels and TIR) to bundle")
    path = Path(path)
    archive = path.name.endswith(".tar.gz")
    root = Path(tempfile.mkdtemp(prefix="sparsefx-bundle-")) / "bundle" if archive else path
    if root.exists() and any(root.iterdir()):
        raise SparsefxError(f"bundle directory {root} is not empty; remove it or choose another path")
    (root / "lib").mkdir(parents=True, exist_ok=True)
    libs = runtime_libraries(compiled.target.is_gpu)
    for lib in libs:
        shutil.copy2(lib, root / "lib" / lib.name)
    # apache-tvm-ffi needs typing-extensions; numpy carries inputs and outputs in run.py
    wheels = [_wheel("apache-tvm-ffi", tvm_ffi.__version__, python), _wheel("typing-extensions", None, python)]
    if numpy:
        wheels.append(_wheel("numpy", None, python))
    (root / "wheels").mkdir(exist_ok=True)
    for wheel in wheels:
        shutil.copy2(wheel, root / "wheels" / wheel.name)
    compiled.export_library(root / "model.so")
    kernels = precompile_cuda(compiled.executable.mod, compiled.target.arch, root / "kernels") \
        if compiled.target.is_gpu else []
    bundle = {"python": python, "runtime_libs": [lib.name for lib in libs], "wheels": [w.name for w in wheels],
              "cuda_kernels": kernels, "tvm": tvm.__version__}
    (root / "manifest.json").write_text(json.dumps({**manifest, "bundle": bundle}, indent=1))
    shutil.copy2(RUN_SCRIPT, root / "run.py")
    if not archive:
        return root
    with tarfile.open(path, "w:gz") as tar:
        tar.add(root, path.name.removesuffix(".tar.gz"))
    shutil.rmtree(root.parent)
    return path


def precompile_cuda(library: object, arch: str, out_dir: Path) -> list[str]:
    """Compile each CUDA source module of `library` to a cubin for `arch`, saved as <sha256 of source>.cubin."""
    import tvm.support.nvcc as nvcc

    sources = [m.inspect_source("cuda") for m in _modules(library) if m.kind == "cuda"]
    out_dir.mkdir(exist_ok=True)
    names = []
    with _cuda_toolkit(), tvm.target.Target({"kind": "cuda", "arch": arch}):
        for source in sources:
            digest = hashlib.sha256(source.encode()).hexdigest()
            try:
                cubin = nvcc.compile_cuda(source, target_format="cubin", arch=arch, compiler="nvrtc")
            except Exception as error:
                raise SparsefxError(f"cannot compile the CUDA kernels for {arch} ({one_line(error)}); install the "
                                    "CUDA toolkit or set CUDA_PATH to it") from None
            (out_dir / f"{digest}.cubin").write_bytes(bytes(cubin))
            names.append(digest)
    return names


def _modules(library: object) -> list:
    return [library, *(m for child in library.imports for m in _modules(child))]


@contextlib.contextmanager
def _cuda_toolkit() -> Iterator[None]:
    """TVM finds CUDA headers through CUDA_PATH or nvcc's location, which a wrapper script hides."""
    if "CUDA_PATH" in os.environ:
        yield
        return
    homes = sorted(Path("/usr/local").glob("cuda*/include/cuda_runtime.h"))
    os.environ["CUDA_PATH"] = str(homes[-1].parent.parent) if homes else "/usr/local/cuda"
    try:
        yield
    finally:
        del os.environ["CUDA_PATH"]


def runtime_libraries(gpu: bool) -> list[Path]:
    """The TVM runtime libraries to ship, in load order (dependencies first)."""
    lib_dir = Path(tvm.__file__).parent / "lib"
    libs = [lib_dir / "libtvm_runtime.so"]
    if gpu:
        cuda = lib_dir / "libtvm_runtime_cuda.so"
        libs = [_needed(cuda, "libcudart.so"), *libs, cuda]
    missing = [str(lib) for lib in libs if not lib.is_file()]
    if missing:
        raise SparsefxError(f"TVM runtime library missing: {missing[0]}; reinstall apache-tvm")
    return libs


def _needed(library: Path, prefix: str) -> Path:
    """Where the dynamic linker finds the dependency of `library` whose name starts with `prefix`."""
    listing = subprocess.run(["ldd", str(library)], capture_output=True, text=True).stdout
    for line in listing.splitlines():
        name, _, found = line.strip().partition(" => ")
        if name.startswith(prefix) and found.startswith("/"):
            return Path(found.split(" (")[0])
    raise SparsefxError(f"{library.name} needs {prefix}* and it is not installed; install the CUDA runtime "
                        "(or put it on LD_LIBRARY_PATH) to bundle for CUDA")


def _wheel(package: str, version: str | None, python: str) -> Path:
    """A wheel of `package` that installs on CPython `python` here (binary or pure), downloaded once into the cache."""
    store = cache_dir() / "wheels"
    spec = f"{package}=={version}" if version else package
    found = _matching(store, package, version, python)
    if found:
        return found
    done = subprocess.run([sys.executable, "-m", "pip", "download", "--quiet", "--no-deps", "--only-binary=:all:",
                           "--python-version", python, "-d", str(store), spec], capture_output=True, text=True)
    found = _matching(store, package, version, python)
    if done.returncode or not found:
        error = (done.stderr.strip().splitlines() or ["not found"])[-1]
        raise SparsefxError(f"no {spec} wheel for Python {python} ({error}); put one in {store} or run where "
                            "the package index is reachable")
    return found


def _matching(store: Path, package: str, version: str | None, python: str) -> Path | None:
    tag = "cp" + python.replace(".", "")
    prefix = package.replace("-", "_") + (f"-{version}-" if version else "-")
    wheels = [*store.glob(f"{prefix}*{tag}-{tag}-*.whl"), *store.glob(f"{prefix}*py3-none-any.whl")]
    return sorted(wheels)[-1] if wheels else None
