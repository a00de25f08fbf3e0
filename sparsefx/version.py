"""The package version, recorded in compiled artifacts (kept here so the backend need not import the
package root), and the digest of sparsefx's own sources, which keys the work the caches keep."""

from __future__ import annotations

import functools
import hashlib
import importlib.metadata
from collections.abc import Iterable
from pathlib import Path

__version__ = "0.1.0"


@functools.cache
def sources_digest() -> str:
    """sparsefx's own code: an edit to a pass changes what compiling or planning produces."""
    digest = hashlib.sha256()
    package = Path(__file__).resolve().parent
    for path in sorted(package.rglob("*.py")):
        digest.update(str(path.relative_to(package)).encode())
        digest.update(path.read_bytes())
    return digest.hexdigest()


def library_versions(names: Iterable[str]) -> dict[str, str | None]:
    """The installed versions of these distributions (None where one is not installed), read without importing them."""
    versions = {}
    for name in names:
        try:
            versions[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            versions[name] = None
    return versions
