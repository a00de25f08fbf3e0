"""`sparsefx plan` and `sparsefx compile` answered from what the same command kept, without importing PyTorch.

A warm plan of ResNet-50 gave its kept plan back (`planning.kept`) in 0.1-0.2 s and a warm compile its
kept artifact (`backends.artifacts`) without TVM, but each command took 5-6.5 s: importing PyTorch
(1.8-2.1 s on a 2-core AMD EPYC) and torchvision (1.4-1.7 s more: its `ops.roi_align` imports
`torch._dynamo`) to build the model whose weights key them. A model named by its recipe (`default`,
`torchvision:NAME`, `hf:NAME`: random weights from a fixed seed, `capture.models.load_model`) is the
same model wherever the recipe, the libraries that build it and sparsefx's sources are the same, so
such a command is keyed without building it: its words (all but `--out`'s path), those libraries'
versions, sparsefx's sources, the host CPU (model, flags, cores) and the cache directory. A full run
keeps what it made under that key: a plan with a digest of each cost table it was priced from (as
the tables were when it finished), a compile the path of the artifact it kept. A later identical
command writes the plan (if the tables still match) or copies the artifact (if it is still whole)
and prints what the full command prints. Anything else (a changed table, `--no-cache`, calibration
data, sparse granularities, `--bundle`, a file or a saved model, options before the model name, a
damaged entry) runs the full command.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import sys
from collections.abc import Sequence
from pathlib import Path

from sparsefx.backends import artifacts
from sparsefx.cache import Table, cache_dir
from sparsefx.log import get_logger, to_stderr
from sparsefx.planning.plan import Plan, PlanError
from sparsefx.target import Target, cpu_flags, cpu_model, host_cores, tvm_version
from sparsefx.version import library_versions, sources_digest

LOG = get_logger("cli")
VERSION = 1
KEPT = 256  # commands kept, the most recently used
NAMED = ("default", "torchvision:", "hf:")  # specs `load_model` builds from a recipe and a fixed seed
LIBRARIES = ("torch", "torchvision", "transformers", "numpy")
# options whose results are not kept (prefixes): calibration data is not keyed, a bundle is built from a compiled model
UNKEPT = {"plan": ("--no-cache", "--calibration", "--rpc"), "compile": ("--no-cache", "--bundle")}
LEVELS = {"-q": logging.WARNING, "--quiet": logging.WARNING, "-v": logging.DEBUG, "--verbose": logging.DEBUG}


def command_of(argv: Sequence[str]) -> tuple[list[str], Path, str] | None:
    """(the words that key it, --out's path, the model spec) of a `plan` or `compile` command whose result
    can be kept by recipe, else None."""
    words = list(argv)
    flags = [w for w in words[:2] if w in LEVELS]
    rest = words[len(flags):]
    if len(rest) < 2 or rest[0] not in UNKEPT or not rest[1].startswith(NAMED):
        return None
    if any(w.startswith(UNKEPT[rest[0]]) for w in rest) or "-h" in rest or "--help" in rest:
        return None
    granularity = [rest[i + 1] for i, w in enumerate(rest[:-1]) if w == "--granularity"]
    if any(w.startswith("--granularity=") for w in rest) or granularity not in ([], ["channel"]):
        return None  # sparse kernels are priced from tables of their own
    outs = [i for i, w in enumerate(rest) if w == "--out"]
    if len(outs) != 1 or outs[0] + 1 >= len(rest) or any(w.startswith("--out=") for w in rest):
        return None
    return [*flags, *rest[:outs[0] + 1], *rest[outs[0] + 2:]], Path(rest[outs[0] + 1]), rest[1]


def key_of(words: list[str]) -> str:
    head = {"words": words, "versions": library_versions(LIBRARIES), "python": sys.version, "tvm": tvm_version(),
            "sparsefx": sources_digest(), "cache": str(cache_dir()),
            # the host CPU as the target is made from it (LLVM's name for it is asked of TVM: not here)
            "cpu": [cpu_model(), sorted(cpu_flags()), host_cores()]}
    return hashlib.sha256(json.dumps(head, sort_keys=True).encode()).hexdigest()[:32]


def digests(paths: Sequence[Path]) -> dict[str, str]:
    return {str(p): hashlib.sha256(p.read_bytes()).hexdigest() if p.is_file() else "absent" for p in paths}


def keep(argv: Sequence[str], plan: Plan | None = None, tables: Sequence[Path] = (), artifact: Path | None = None) -> None:
    """Keep what the command `argv` made: a plan priced from the cost tables `tables`, or the path of
    the compiled artifact `backends.artifacts` keeps."""
    command = command_of(argv)
    if command is None:
        return
    table = Table(_root() / f"{key_of(command[0])}.json", VERSION)
    table.entries.update({"tables": digests(tables), "plan": plan.to_dict()} if plan else {"artifact": str(artifact)})
    table.save()
    for old in sorted(_root().glob("*.json"), key=lambda p: p.stat().st_mtime, reverse=True)[KEPT:]:
        old.unlink(missing_ok=True)
        old.with_name(f"{old.name}.lock").unlink(missing_ok=True)


def kept(argv: Sequence[str]) -> tuple[Plan | Path, str, Path] | None:
    """(the plan or artifact kept for this command, the model spec, --out's path) where one is kept
    and still stands (the plan's cost tables unchanged, the artifact whole), else None."""
    command = command_of(argv)
    if command is None or not command[1].parent.is_dir():
        return None
    path = _root() / f"{key_of(command[0])}.json"
    if not path.is_file():
        return None
    entries = Table(path, VERSION).entries
    found: Plan | Path | None = None
    if isinstance(entries.get("artifact"), str):
        found = Path(entries["artifact"]) if artifacts.is_whole(Path(entries["artifact"])) else None
    elif isinstance(entries.get("tables"), dict):
        recorded = entries["tables"]
        if digests([Path(p) for p in recorded]) != recorded:
            return None
        try:
            found = Plan.from_dict(entries.get("plan"), f"kept plan {path}")
        except (PlanError, TypeError) as error:
            LOG.warning(f"a kept plan could not be read ({error}); planning again")
    if found is None:
        path.unlink(missing_ok=True)
        return None
    os.utime(path)
    return found, command[2], command[1]


def report(plan: Plan, model: str, out: Path) -> None:
    """What `sparsefx plan` prints: the plan's table and where it was written."""
    print(plan.explain())
    print(f"wrote {plan.save(out)} (edit ratios/densities, then `sparsefx apply {model} {out}`)")


def copy_artifact(artifact: Path, out: Path) -> None:
    """What `sparsefx compile` does with an artifact compiled before: copied to `out`, summarised."""
    shutil.copyfile(artifact, out)
    manifest = artifacts.manifest_of(artifact)
    print(compile_summary(manifest, manifest["threads"], reused=True))
    print(f"wrote {out} (load with sparsefx.load(path))")


def compile_summary(manifest: dict, threads: int, reused: bool = False) -> str:
    m, tuning = manifest, manifest["tuning"]
    built = (f"reused the artifact compiled in {m['compile_seconds']:.1f} s (same model and options; --no-cache "
             "compiles afresh)" if reused else f"compile {m['compile_seconds']:.1f} s")
    return (f"target: {Target.from_dict(m['target'])}, {threads} thread(s)\nimport route: {m['import_route']}, {built}\n"
            f"{kernel_summary(m)}\n"
            f"tuning: {tuning['tuned_tasks']}/{tuning['tasks']} workloads tuned, {tuning['seconds']:.0f} s")


def kernel_summary(manifest: dict) -> str:
    on_torch = sum(d["impl"] == "torch" for d in manifest["dispatch"].values())
    return f"kernels: {on_torch}/{len(manifest['dispatch'])} conv/matmul/math-op workloads dispatched to PyTorch (measured faster)"


def answer(argv: Sequence[str]) -> int | None:
    """Run `argv` from what the same command kept (exit code 0), or None where the full command must run."""
    found = kept(argv)
    if found is None:
        return None
    level = next((LEVELS[w] for w in reversed(argv) if w in LEVELS), logging.INFO)
    with to_stderr(level):
        if isinstance(found[0], Plan):
            LOG.info("this command was planned before on the same cost tables: its plan is given back "
                     "(--no-cache plans afresh)")
            report(*found)
        else:
            copy_artifact(found[0], found[2])
    return 0


def _root() -> Path:
    root = cache_dir() / "commands"
    root.mkdir(parents=True, exist_ok=True)
    return root
