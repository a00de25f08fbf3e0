"""Own kernels built in forked workers are the kernels built here; a failing worker falls back."""

from __future__ import annotations

import numpy as np
import torch
import tvm

from sparsefx.backends.tvm.build_config import build_context
from sparsefx.backends.tvm.kernels import blocked, blocked_depthwise, direct, pointwise, workers
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


def test_window_convs_are_dealt_evenly_and_each_kernel_once() -> None:
    # in model order a window conv every other kernel: dealt round-robin, all of them went to one worker
    pairs = [("blocked", blocked.BlockedSpec(1, 16 * (i + 1), 32, 14, 14, k, 1, k // 2)) for i, k in enumerate((3, 1) * 4)]
    shares = workers.dealt(pairs, 2)
    assert sorted(spec.name for share in shares for _, spec in share) == sorted(spec.name for _, spec in pairs)
    assert [sum(spec.kernel > 1 for _, spec in share) for share in shares] == [2, 2]
    assert [len(share) for share in shares] == [4, 4]
    depthwise = blocked_depthwise.BlockedDepthwiseSpec(1, 32, 14, 14, 3, 1, 1)
    assert workers.build_weight(depthwise) == 1 < workers.build_weight(pairs[0][1])  # as cheap to build as a 1x1


def test_cpu_builds_leave_out_tir_cse_and_gpu_builds_are_tvms_own() -> None:
    assert build_context(resolve_target("cpu").to_tvm()).config["tirx.disable_cse_tir"]
    assert "tirx.disable_cse_tir" not in build_context(tvm.target.Target({"kind": "cuda", "arch": "sm_90"})).config
