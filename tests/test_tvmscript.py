"""cheap_frames: TVM's parser gets FrameInfo records equal to inspect's in what it reads, and its
own `inspect` back afterwards, also when uses nest or overlap in threads; parsed kernels kept on disk."""

from __future__ import annotations

import importlib
import inspect
import json
import threading

import tvm
from tvm.script import tirx as T

from sparsefx.backends.tvm.tvmscript import PARSER_MODULES, cheap_frames, frame_infos, parse


def _installed() -> list[bool]:
    return [importlib.import_module(name).inspect is not inspect for name in PARSER_MODULES]


def test_frame_infos_match_inspect() -> None:
    frame = inspect.currentframe()
    ours, theirs = frame_infos(frame), inspect.getouterframes(frame)
    assert [(i.frame, i.filename, i.lineno, i.function) for i in ours] == \
        [(i.frame, i.filename, i.lineno, i.function) for i in theirs]
    assert ours[0].code_context == theirs[0].code_context  # the line TVM reads to tell a class scope


def test_cheap_frames_nest_and_restore() -> None:
    assert not any(_installed())
    with cheap_frames():
        assert all(_installed())
        with cheap_frames():
            assert all(_installed())
        assert all(_installed())  # the outer use still holds it
    assert not any(_installed())


def test_overlapping_threads_restore() -> None:
    inside, leave = threading.Barrier(2), threading.Event()

    def hold() -> None:
        with cheap_frames():
            inside.wait()
            leave.wait()

    worker = threading.Thread(target=hold)
    worker.start()
    with cheap_frames():
        inside.wait()
    assert all(_installed())  # the worker's use outlives ours
    leave.set()
    worker.join()
    assert not any(_installed())


def test_a_macro_kernel_parses_the_same() -> None:
    def build(n: int) -> tvm.tirx.PrimFunc:
        @T.macro
        def double(a, b, i):  # noqa: ANN001, ANN202
            b[i] = a[i] * T.float32(2)

        @T.prim_func(private=True)
        def f(a: T.Buffer((n,), "float32"), b: T.Buffer((n,), "float32")):
            for i in range(n):
                double(a, b, i)

        return f

    tvm.ir.assert_structural_equal(parse(build, 8), build(8))


def test_a_parsed_kernel_is_kept_on_disk_and_reparsed_when_damaged(private_cache, caplog) -> None:
    from sparsefx.backends.tvm.kernels import pointwise
    from sparsefx.backends.tvm.tvmscript import backend_source_version, parsed
    from sparsefx.cache import cache_dir

    spec = pointwise.PointwiseSpec(1, 8, 16, 4, 8, "relu", True)
    first = parsed(pointwise.kernel, spec)
    (stored,) = (cache_dir() / "tvmscript").glob("*.json")
    parsed.cache_clear()  # a new process: only the disk copy is left
    tvm.ir.assert_structural_equal(parsed(pointwise.kernel, spec), first)
    stored.write_text(json.dumps({"version": backend_source_version(), "entries": {"func": "not TVM JSON"}}))
    parsed.cache_clear()
    with caplog.at_level("WARNING", logger="sparsefx.cache"):
        tvm.ir.assert_structural_equal(parsed(pointwise.kernel, spec), first)
    assert "parsing it again" in caplog.text
    parsed.cache_clear()
    tvm.ir.assert_structural_equal(parsed(pointwise.kernel, spec), first)  # and stored again, whole


def test_a_kernel_parsed_by_other_sources_is_parsed_again_quietly(private_cache, caplog) -> None:
    """Every backend change re-versions each kept kernel: expected, so no warning (damage still warns)."""
    from sparsefx.backends.tvm.kernels import pointwise
    from sparsefx.backends.tvm.tvmscript import parsed
    from sparsefx.cache import cache_dir

    spec = pointwise.PointwiseSpec(1, 8, 16, 4, 8, "relu", True)
    parsed.cache_clear()  # kept in memory by an earlier test: parse it into this test's cache
    first = parsed(pointwise.kernel, spec)
    (stored,) = (cache_dir() / "tvmscript").glob("*.json")
    stored.write_text(json.dumps({"version": "older sources", "entries": {"func": "not TVM JSON"}}))
    parsed.cache_clear()
    with caplog.at_level("DEBUG", logger="sparsefx.cache"):
        tvm.ir.assert_structural_equal(parsed(pointwise.kernel, spec), first)
    stale = [r for r in caplog.records if "older sources" in r.getMessage()]
    assert stale and all(r.levelname == "DEBUG" for r in stale)
    stored.write_text("{")
    parsed.cache_clear()
    caplog.clear()
    with caplog.at_level("WARNING", logger="sparsefx.cache"):
        parsed(pointwise.kernel, spec)
    assert "truncated or corrupt" in caplog.text
