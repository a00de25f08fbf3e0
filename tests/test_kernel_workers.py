"""Own kernels built in forked workers are the kernels built here; a failing worker falls back."""

from __future__ import annotations

import numpy as np
import torch
import tvm

from sparsefx.backends.tvm.kernels import direct, pointwise, workers
from sparsefx.target import resolve_target

PAIRS = [("pointwise", pointwise.PointwiseSpec(1, 16 + 8 * i, 32, 8, 8, "relu")) for i in range(3)] + \
        [("direct", direct.DirectSpec(1, 8, 16 + 8 * i, 10, 10, 3, 1, 1, "none")) for i in range(3)]


def _outputs(kernels: dict) -> dict[str, np.ndarray]:
    outs = {}
    for _, spec in PAIRS:
        torch.manual_seed(0)
        args = [tvm.runtime.from_dlpack(torch.randn(shape)) for shape in spec.arg_shapes]
        kernels[spec.name](*args)
        outs[spec.name] = args[-1].numpy()
    return outs


def test_kernels_built_in_workers_compute_what_kernels_built_here_do(monkeypatch) -> None:
    target = resolve_target("cpu").to_tvm()
    monkeypatch.setattr(workers, "usable_cores", lambda: 2)
    used = []
    real = workers.build_in_workers
    monkeypatch.setattr(workers, "build_in_workers", lambda *a: used.append(a[2]) or real(*a))
    in_workers = _outputs(workers.build_kernels(PAIRS, target))
    assert used == [2]
    monkeypatch.setattr(workers, "usable_cores", lambda: 1)
    here = _outputs(workers.build_kernels(PAIRS, target))
    assert len(used) == 1
    for name, out in here.items():
        assert np.abs(out).max() > 0.1  # relu of a random conv: not all zero
        np.testing.assert_array_equal(in_workers[name], out)


def test_a_failing_worker_means_building_here(monkeypatch, caplog) -> None:
    monkeypatch.setattr(workers, "usable_cores", lambda: 2)
    monkeypatch.setattr(workers, "build_share", _broken_share)
    kernels = workers.build_kernels(PAIRS, resolve_target("cpu").to_tvm())
    assert set(kernels) == {spec.name for _, spec in PAIRS}
    assert "building them here" in caplog.text


def _broken_share(pairs: list, target: dict, path: str) -> str:
    raise RuntimeError("no C compiler")
