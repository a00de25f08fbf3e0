"""On-disk caches of measurements: where they live and the one file format they share.

Every cache (the dispatch decisions, the cost-model kernels and calibrations, the host's
peaks, the sparse-kernel latencies) is a `Table`: a JSON file `{"version": V, "entries": {...}}`
under `cache_dir()`. A table that cannot be used (truncated by a killed process or a full disk,
empty, not a table, written for another version) is reported in one warning and started
empty, so its entries are measured again; it never stops a compile or a plan. Saving writes a
temporary file and renames it over the table, under a lock, merged with what other processes
saved meanwhile: two processes measuring into one table keep both their entries.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import logging
import os
import tempfile
from pathlib import Path
from typing import Any

log = logging.getLogger("sparsefx.cache")
STALE = "has version"  # how a table of another version is reported


def cache_dir() -> Path:
    """Where sparsefx keeps measurements and tuning records (override: SPARSEFX_CACHE)."""
    root = Path(os.environ.get("SPARSEFX_CACHE", Path.home() / ".cache" / "sparsefx"))
    root.mkdir(parents=True, exist_ok=True)
    return root


class Table:
    """A versioned JSON cache of `entries` (key -> JSON value) at `path`.

    `version` is the one place a format or a measurement method is versioned: bump it and
    every table saved before is re-measured."""

    def __init__(self, path: Path, version: int | str, stale_is_routine: bool = False) -> None:
        """`stale_is_routine`: a table of another version is expected (one per parsed kernel, versioned
        by the sources that build it) and is started afresh without a warning; damage still warns."""
        self.path, self.version = Path(path), version
        entries, problem = self._read()
        if problem:
            stale = problem.startswith(STALE)
            log.log(logging.DEBUG if stale and stale_is_routine else logging.WARNING,
                    "cache %s %s: starting it empty, its entries will be re-measured", self.path, problem)
        self.entries: dict[str, Any] = entries

    def save(self) -> None:
        """Write the entries, merged with those another process saved since this table was read
        (on a key both have, this process's entry wins). A disk that cannot be written costs
        one warning; the run goes on with the entries in memory."""
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            with open(self.path.with_name(self.path.name + ".lock"), "a") as lock:
                fcntl.flock(lock, fcntl.LOCK_EX)  # held from the re-read to the rename: no save is lost
                for key, value in self._read()[0].items():
                    self.entries.setdefault(key, value)
                self._write({"version": self.version, "entries": self.entries})
        except OSError as error:
            log.warning("cache %s could not be saved (%s): its new entries will be measured again next run",
                        self.path, error.strerror or error)

    def _read(self) -> tuple[dict[str, Any], str | None]:
        """The entries on disk, and what is wrong with the file if it cannot be used."""
        try:
            text = self.path.read_text()
        except FileNotFoundError:
            return {}, None
        except (OSError, UnicodeDecodeError) as error:
            return {}, f"cannot be read ({error})"
        if not text.strip():
            return {}, "is empty"
        try:
            data = json.loads(text)
        except json.JSONDecodeError:
            return {}, "is truncated or corrupt"
        if not isinstance(data, dict) or not isinstance(data.get("entries"), dict):
            return {}, "is not a sparsefx table (written by an older sparsefx?)"
        if data.get("version") != self.version:
            return {}, f"{STALE} {data.get('version')!r}, this sparsefx reads version {self.version!r}"
        return data["entries"], None

    def _write(self, data: dict) -> None:
        # a unique name in the table's directory: a rename is atomic only within one file system,
        # and a fixed name would be shared by concurrent processes
        fd, tmp = tempfile.mkstemp(dir=self.path.parent, prefix=self.path.name + ".", suffix=".tmp")
        try:
            with os.fdopen(fd, "w") as file:
                json.dump(data, file, indent=1)
                file.flush()
                os.fsync(file.fileno())
            os.replace(tmp, self.path)
        except BaseException:
            with contextlib.suppress(OSError):
                os.unlink(tmp)
            raise
