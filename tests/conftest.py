"""Keep tests hermetic: measurements and tuning records go to a per-session cache."""

from __future__ import annotations

from collections.abc import Iterator

import pytest


@pytest.fixture(autouse=True, scope="session")
def _session_cache(tmp_path_factory: pytest.TempPathFactory) -> Iterator[None]:
    mp = pytest.MonkeyPatch()
    mp.setenv("SPARSEFX_CACHE", str(tmp_path_factory.mktemp("sparsefx-cache")))
    # timed weights are cycled through 256 MiB of copies; tests assert decisions, not their timing, and
    # 8 MiB of copies runs the same code for a thirty-second of the memory and copying
    from sparsefx.cost import timing

    mp.setattr(timing, "COLD_BYTES", 8 << 20)
    yield
    mp.undo()


@pytest.fixture
def private_cache(tmp_path: object, monkeypatch: pytest.MonkeyPatch) -> None:
    """A cache of the test's own, for tests that must start from empty dispatch and cost tables
    (`pytestmark = pytest.mark.usefixtures("private_cache")`)."""
    monkeypatch.setenv("SPARSEFX_CACHE", str(tmp_path / "cache"))
