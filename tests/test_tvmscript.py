"""cheap_frames: TVM's parser gets FrameInfo records equal to inspect's in what it reads, and its
own `inspect` back afterwards, also when uses nest or overlap in threads."""

from __future__ import annotations

import importlib
import inspect
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
