"""`sparsefx plan` answered from a plan kept for the same command, without importing PyTorch.

A warm plan of ResNet-50 gave its kept plan back (`planning.kept`) in 0.1-0.2 s, but the command took
5-6.5 s: importing PyTorch (1.8-2.1 s on a 2-core AMD EPYC) and torchvision (1.4-1.7 s more: its
`ops.roi_align` imports `torch._dynamo`) to build the model whose weights key that plan. A model named
by its recipe (`default`, `torchvision:NAME`, `hf:NAME`: random weights from a fixed seed,
`capture.models.load_model`) is the same model wherever the recipe, the libraries that build it and
sparsefx's sources are the same, so a plan command over one is keyed without building it: the
command's words (all but `--out`'s path), those libraries' versions, sparsefx's sources, the host CPU
(model, flags, cores) and the cache directory. A full `plan` run keeps its plan under that key with a
digest of each cost table it was priced from, as the tables were when it finished; a later identical
command whose tables still match writes that plan and prints what `plan` prints. Anything else (a
table that changed, `--no-cache`, calibration data, sparse granularities, a file or a saved model,
options before the model name, a damaged entry) runs the full command.
"""

from __future__ import annotations

import hashlib
import importlib.metadata
import json
import logging
import os
import sys
from collections.abc import Sequence
from pathlib import Path

from sparsefx.cache import Table, cache_dir
from sparsefx.log import get_logger, to_stderr
from sparsefx.planning.plan import Plan, PlanError
from sparsefx.target import cpu_flags, cpu_model, host_cores, tvm_version
from sparsefx.version import sources_digest

LOG = get_logger("plans")
VERSION = 1
KEPT = 256  # commands kept, the most recently used
NAMED = ("default", "torchvision:", "hf:")  # specs `load_model` builds from a recipe and a fixed seed
LIBRARIES = ("torch", "torchvision", "transformers", "numpy")
UNKEPT = ("--no-cache", "--calibration", "--rpc")  # options whose plans are not kept (prefixes)
LEVELS = {"-q": logging.WARNING, "--quiet": logging.WARNING, "-v": logging.DEBUG, "--verbose": logging.DEBUG}


def command_of(argv: Sequence[str]) -> tuple[list[str], Path, str] | None:
    """(the words that key it, --out's path, the model spec) of a `plan` command whose plan can be
    kept by recipe, else None."""
    words = list(argv)
    flags = [w for w in words[:2] if w in LEVELS]
    rest = words[len(flags):]
    if len(rest) < 2 or rest[0] != "plan" or not rest[1].startswith(NAMED):
        return None
    if any(w.startswith(UNKEPT) for w in rest) or "-h" in rest or "--help" in rest:
        return None
    granularity = [rest[i + 1] for i, w in enumerate(rest[:-1]) if w == "--granularity"]
    if any(w.startswith("--granularity=") for w in rest) or granularity not in ([], ["channel"]):
        return None
    outs = [i for i, w in enumerate(rest) if w == "--out"]
    if len(outs) != 1 or outs[0] + 1 >= len(rest) or any(w.startswith("--out=") for w in rest):
        return None
    out = Path(rest[outs[0] + 1])
    return [*flags, *rest[:outs[0] + 1], *rest[outs[0] + 2:]], out, rest[1]


def key_of(words: list[str]) -> str:
    versions = {}
    for library in LIBRARIES:
        try:
            versions[library] = importlib.metadata.version(library)
        except importlib.metadata.PackageNotFoundError:
            versions[library] = None
    head = {"words": words, "versions": versions, "python": sys.version, "tvm": tvm_version(),
            "sparsefx": sources_digest(), "cache": str(cache_dir()),
            # the host CPU as the target is made from it (LLVM's name for it is asked of TVM: not here)
            "cpu": [cpu_model(), sorted(cpu_flags()), host_cores()]}
    return hashlib.sha256(json.dumps(head, sort_keys=True).encode()).hexdigest()[:32]


def digests(paths: Sequence[Path]) -> dict[str, str]:
    return {str(p): hashlib.sha256(p.read_bytes()).hexdigest() if p.is_file() else "absent" for p in paths}


def keep(argv: Sequence[str], plan: Plan, tables: Sequence[Path]) -> None:
    """Keep `plan`, made by the `plan` command `argv` on the cost tables `tables`, for that command."""
    command = command_of(argv)
    if command is None:
        return
    table = Table(_root() / f"{key_of(command[0])}.json", VERSION)
    table.entries.update({"tables": digests(tables), "plan": plan.to_dict()})
    table.save()
    for old in sorted(_root().glob("*.json"), key=lambda p: p.stat().st_mtime, reverse=True)[KEPT:]:
        old.unlink(missing_ok=True)
        old.with_name(f"{old.name}.lock").unlink(missing_ok=True)


def kept(argv: Sequence[str]) -> tuple[Plan, str, Path] | None:
    """(the plan kept for this command, the model spec, --out's path) where one is kept and the cost
    tables it was priced from are unchanged, else None."""
    command = command_of(argv)
    if command is None or not command[1].parent.is_dir():
        return None
    path = _root() / f"{key_of(command[0])}.json"
    if not path.is_file():
        return None
    entries = Table(path, VERSION).entries
    recorded = entries.get("tables")
    if not isinstance(recorded, dict) or digests([Path(p) for p in recorded]) != recorded:
        return None
    try:
        plan = Plan.from_dict(entries.get("plan"), f"kept plan {path}")
    except (PlanError, TypeError) as error:
        LOG.warning(f"a kept plan could not be read ({error}); planning again")
        path.unlink(missing_ok=True)
        return None
    os.utime(path)
    return plan, command[2], command[1]


def report(plan: Plan, model: str, out: Path) -> None:
    """What `sparsefx plan` prints: the plan's table and where it was written."""
    print(plan.explain())
    print(f"wrote {plan.save(out)} (edit ratios/densities, then `sparsefx apply {model} {out}`)")


def answer(argv: Sequence[str]) -> int | None:
    """Run `argv` from a kept plan (exit code 0), or None where the full command must run."""
    found = kept(argv)
    if found is None:
        return None
    level = next((LEVELS[w] for w in reversed(argv) if w in LEVELS), logging.INFO)
    with to_stderr(level):
        LOG.info("this command was planned before on the same cost tables: its plan is given back "
                 "(--no-cache plans afresh)")
        report(*found)
    return 0


def _root() -> Path:
    root = cache_dir() / "plans" / "commands"
    root.mkdir(parents=True, exist_ok=True)
    return root
