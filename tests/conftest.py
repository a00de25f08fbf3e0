"""Keep tests hermetic: measurements and tuning records go to a per-session cache."""

from __future__ import annotations

from collections.abc import Iterator

import pytest


@pytest.fixture(autouse=True, scope="session")
def _session_cache(tmp_path_factory: pytest.TempPathFactory) -> Iterator[None]:
    mp = pytest.MonkeyPatch()
    mp.setenv("SPARSEFX_CACHE", str(tmp_path_factory.mktemp("sparsefx-cache")))
    # the dispatch's duels flush 64 MiB before each timed run; tests assert decisions, not their timing,
    # and a 1 MiB flush runs the same code for a fiftieth of the cost
    from sparsefx.backends.tvm.dispatch import table as dispatch

    mp.setattr(dispatch, "EVICT_BYTES", 1 << 20)
    yield
    mp.undo()


@pytest.fixture
def private_cache(tmp_path: object, monkeypatch: pytest.MonkeyPatch) -> None:
    """A cache of the test's own, for tests that must start from empty dispatch and cost tables
    (`pytestmark = pytest.mark.usefixtures("private_cache")`)."""
    monkeypatch.setenv("SPARSEFX_CACHE", str(tmp_path / "cache"))
