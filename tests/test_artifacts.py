"""Kept compiled artifacts: a model compiled and exported before is reused only when nothing that
decides its code changed, and a damaged one is compiled again, never a crash."""

from __future__ import annotations

import copy
import subprocess
import sys
from dataclasses import replace

import pytest
import torch

from sparsefx.backends import artifacts
from sparsefx.backends.tvm import compile
from sparsefx.capture.compare import check_reference, output_error
from sparsefx.capture.identity import compile_key
from sparsefx.capture.models import TinyResNet
from sparsefx.cli.main import main
from sparsefx.target import compile_target

pytestmark = pytest.mark.usefixtures("private_cache")


def _model() -> tuple[torch.nn.Module, tuple[torch.Tensor]]:
    torch.manual_seed(0)
    return TinyResNet(widths=(8, 16), blocks=1).eval(), (torch.randn(1, 3, 16, 16),)


def _key(model: torch.nn.Module, inputs: tuple, threads: int = 1, dispatch: bool | str = "own") -> str:
    spec, threads, precision = compile_target("cpu", threads, None)
    return compile_key(model, inputs, spec, threads, precision, dispatch, 0)


def test_the_key_follows_weights_buffers_attributes_inputs_and_options():
    model, inputs = _model()
    key = _key(model, inputs)
    assert _key(copy.deepcopy(model), inputs) == key  # the same model, another object
    tuned = copy.deepcopy(model)
    with torch.no_grad():
        tuned.fc.weight[0, 0] += 1e-3
    stats = copy.deepcopy(model)
    stats.stem[1].running_var[0] += 1.0
    eps = copy.deepcopy(model)
    eps.stem[1].eps = 1e-3  # a plain attribute the forward reads
    changed = [_key(tuned, inputs), _key(stats, inputs), _key(eps, inputs),
               _key(model, (torch.randn(2, 3, 16, 16),)), _key(model, inputs, dispatch=True)]
    assert key not in changed and len(set(changed)) == len(changed)
    spec, threads, precision = compile_target("cpu", 1, None)
    peaks = replace(spec, peak_gflops=100.0, bandwidth_gbs=10.0)  # measured later in the process: the same CPU
    assert compile_key(model, inputs, peaks, threads, precision, "own", 0) == key


def test_state_that_cannot_be_read_as_bytes_is_never_kept_and_sparse_buffers_are():
    spec, threads, precision = compile_target("cpu", 1, None)
    key = lambda m: compile_key(m, (torch.randn(1, 4),), spec, threads, precision, True, 0)  # noqa: E731
    assert key(torch.nn.Linear(4, 4, device="meta")) is None
    torch.manual_seed(0)
    sparse = [torch.nn.Linear(4, 4)]
    sparse.append(copy.deepcopy(sparse[0]))
    for i, m in enumerate(sparse):
        m.register_buffer("mask", (torch.eye(4) * (i + 1)).to_sparse())  # only the sparse buffer differs
    assert None not in (key(sparse[0]), key(sparse[1])) and key(sparse[0]) != key(sparse[1])


def test_a_model_compiled_and_exported_before_is_reused_and_runs_the_same(tmp_path):
    model, inputs = _model()
    expected = check_reference(model, inputs)
    first = compile(model, inputs, threads=1, dispatch="own", verbose=False)
    assert first.reused is None
    first.export(tmp_path / "first.sfx")
    again = compile(copy.deepcopy(model), inputs, threads=1, dispatch="own", verbose=False)
    assert again.reused is not None
    assert output_error(expected, again(*inputs)).ok()
    assert again.export(tmp_path / "again.sfx").read_bytes() == (tmp_path / "first.sfx").read_bytes()
    assert compile(model, inputs, threads=1, dispatch="own", verbose=False, cache=False).reused is None
    with torch.no_grad():
        model.fc.bias += 1.0  # fine-tuned: compiled afresh
    assert compile(model, inputs, threads=1, dispatch="own", verbose=False).reused is None


def test_a_damaged_kept_artifact_is_compiled_again(tmp_path, caplog):
    model, inputs = _model()
    compile(model, inputs, threads=1, dispatch="own", verbose=False).export(tmp_path / "m.sfx")
    kept = artifacts.cached(_key(model, inputs))
    kept.write_bytes(kept.read_bytes()[: kept.stat().st_size // 2])
    again = compile(model, inputs, threads=1, dispatch="own", verbose=False)
    assert again.reused is None and "compiling again" in caplog.text
    assert output_error(check_reference(model, inputs), again(*inputs)).ok()
    assert artifacts.cached(_key(model, inputs)) is None  # dropped
    again.export(tmp_path / "m2.sfx")
    assert artifacts.is_whole(artifacts.cached(_key(model, inputs)))


def test_the_cli_copies_a_kept_artifact_without_loading_the_compiler(tmp_path):
    first = ["compile", "default", "--threads", "1", "--out", str(tmp_path / "a.sfx")]
    assert main(first) == 0
    script = ("import sys; from sparsefx.cli.main import main; "
              f"code = main(['compile', 'default', '--threads', '1', '--out', {str(tmp_path / 'b.sfx')!r}]); "
              "assert code == 0 and 'sparsefx.backends.tvm.compiler' not in sys.modules, code")
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    assert "reused the artifact" in done.stdout
    assert (tmp_path / "b.sfx").read_bytes() == (tmp_path / "a.sfx").read_bytes()
    assert main([*first[:-1], str(tmp_path / "c.sfx"), "--no-cache"]) == 0
