"""The plan: what to do to each coupled group or layer of one model, as versioned JSON.

It is the one data structure that flows from analysis (the planner) to rewrite (`apply`)
to backend, and the file a person reads and edits. Editable fields:
- channel entries: ``ratio``, the fraction of the group's channels removed (0 <= ratio < 1),
  lowest-importance channels first;
- block / N:M entries: ``density`` (fraction of weights kept, 0 < density <= 1), ``block``
  ([rows, cols]) or ``m`` (N = round(density * m));
- delete an entry to leave that group or layer dense.
Everything else (importance lost, predicted latency) is a record of why the planner chose
it; `apply` ignores it.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path

from sparsefx.errors import SparsefxError

SCHEMA = "sparsefx-plan"
VERSION = 1
GRANULARITIES = ("channel", "block", "nm")


class PlanError(SparsefxError):
    """A plan file that cannot be read or does not fit the model."""


@dataclass
class Entry:
    name: str  # channel: the group's first producing layer; block/nm: the layer
    granularity: str
    layers: list[str] = field(default_factory=list)
    channels: int = 0  # channel entries: the group's channel count before removal
    ratio: float = 0.0
    density: float = 1.0
    block: list[int] | None = None
    m: int | None = None
    importance_lost: float = 0.0
    latency_ms: list[float] = field(default_factory=list)  # [before, after] of the nodes it touches

    def check(self) -> None:
        where = f"plan entry {self.name!r}"
        if self.granularity not in GRANULARITIES:
            raise PlanError(f"{where}: unknown granularity {self.granularity!r}; use one of {', '.join(GRANULARITIES)}")
        if self.granularity == "channel" and not (isinstance(self.ratio, (int, float)) and 0 <= self.ratio < 1):
            raise PlanError(f"{where}: ratio {self.ratio!r} is out of range; it is the fraction of channels "
                            "removed, 0 <= ratio < 1")
        if self.granularity != "channel" and not (isinstance(self.density, (int, float)) and 0 < self.density <= 1):
            raise PlanError(f"{where}: density {self.density!r} is out of range; it is the fraction of weights "
                            "kept, 0 < density <= 1")
        if self.granularity == "block" and not (isinstance(self.block, list) and len(self.block) == 2
                                                and all(isinstance(b, int) and b > 0 for b in self.block)):
            raise PlanError(f"{where}: block must be [rows, cols] of positive integers, got {self.block!r}")
        if self.granularity == "nm" and not (isinstance(self.m, int) and self.m >= 2):
            raise PlanError(f"{where}: N:M needs an integer m >= 2, got {self.m!r}")

    @property
    def keep(self) -> int:
        return self.channels - round(self.ratio * self.channels)

    def describe(self) -> str:
        if self.granularity == "channel":
            return f"channel {self.channels}->{self.keep}"
        if self.granularity == "block":
            return f"block {self.block[0]}x{self.block[1]} density {self.density:.2f}"
        return f"{round(self.density * self.m)}:{self.m}"


@dataclass
class Plan:
    model: dict  # class, fingerprint, inputs
    target: dict
    budget: dict
    importance: str
    entries: list[Entry]
    predicted: dict = field(default_factory=dict)
    measured: dict = field(default_factory=dict)  # measured planning's record (see planning/measured.py)
    version: int = VERSION

    def to_dict(self) -> dict:
        data = asdict(self)
        data["entries"] = [{k: v for k, v in asdict(e).items() if v is not None} for e in self.entries]
        return {"schema": SCHEMA, **data}

    def save(self, path: str | Path) -> Path:
        path = Path(path)
        path.write_text(json.dumps(self.to_dict(), indent=1) + "\n")
        return path

    @classmethod
    def from_dict(cls, data: object, source: str = "plan") -> Plan:
        if not isinstance(data, dict) or data.get("schema") != SCHEMA:
            raise PlanError(f"{source} is not a sparsefx plan (no \"schema\": \"{SCHEMA}\"); make one with sparsefx plan")
        version = data.get("version")
        if not isinstance(version, int) or version > VERSION:
            raise PlanError(f"{source} has plan version {version!r}, newer than the {VERSION} this sparsefx reads; "
                            "upgrade sparsefx or re-plan with this version")
        missing = [k for k in ("model", "target", "budget", "importance", "entries") if k not in data]
        if missing:
            raise PlanError(f"{source} lacks {', '.join(missing)}; re-create it with sparsefx plan")
        known = set(Entry.__dataclass_fields__)
        entries = []
        for raw in data["entries"]:
            if not isinstance(raw, dict) or "name" not in raw or "granularity" not in raw:
                raise PlanError(f"{source}: every entry needs a name and a granularity, got {raw!r}")
            unknown = sorted(set(raw) - known)
            if unknown:
                raise PlanError(f"{source}: entry {raw['name']!r} has unknown field(s) {', '.join(unknown)}; "
                                f"fields are {', '.join(sorted(known))}")
            entry = Entry(**raw)
            entry.check()
            entries.append(entry)
        names = [e.name for e in entries]
        twice = sorted({n for n in names if names.count(n) > 1})
        if twice:
            raise PlanError(f"{source}: {', '.join(twice)} planned twice; keep one entry per group or layer")
        return cls(data["model"], data["target"], data["budget"], data["importance"], entries,
                   data.get("predicted", {}), data.get("measured", {}), version)

    @classmethod
    def load(cls, path: str | Path) -> Plan:
        path = Path(path)
        try:
            data = json.loads(path.read_text())
        except FileNotFoundError:
            raise PlanError(f"plan file {path} does not exist; make one with sparsefx plan") from None
        except json.JSONDecodeError as error:
            raise PlanError(f"plan file {path} is not valid JSON ({error.msg} at line {error.lineno}); "
                            "fix the edit or re-plan") from None
        return cls.from_dict(data, f"plan file {path}")

    def explain(self) -> str:
        """A per-entry table: what is done, importance lost, predicted latency of what it touches."""
        rows = [f"{'entry':44} {'action':28} {'lost':>8} {'before ms':>10} {'after ms':>9}"]
        for e in sorted(self.entries, key=lambda e: -(e.latency_ms[0] - e.latency_ms[1]) if e.latency_ms else 0):
            before, after = (e.latency_ms + [0.0, 0.0])[:2]
            rows.append(f"{e.name[:44]:44} {e.describe():28} {e.importance_lost:8.3f} {before:10.3f} {after:9.3f}")
        p = self.predicted
        if p:
            rows.append(f"predicted on {self.target.get('name', '?')}: {p.get('dense_ms', 0):.3f} ms -> "
                        f"{p.get('planned_ms', 0):.3f} ms ({p.get('speedup', 0):.2f}x), MACs kept "
                        f"{p.get('macs_ratio', 1):.2f}, importance retained {p.get('importance_retained', 1):.3f}")
        m = self.measured
        if m:
            rows.append(f"measured on this host: {m['dense_ms']:.3f} ms -> {m['planned_ms']:.3f} ms "
                        f"({m['measured_speedup']:.2f}x, asked {m['asked_speedup']:.2f}x) after {len(m['rounds'])} round(s)")
        return "\n".join(rows)

    def __str__(self) -> str:
        return self.explain()
