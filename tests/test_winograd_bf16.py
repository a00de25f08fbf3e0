"""bf16 3x3 convs as Winograd F(2x2, 3x3) on AVX512-BF16 (`kernels.winogradbf16`), in the tile layout:
the kernel against PyTorch on the same bf16 inputs (bias, residual written over, activations, maps that
are not whole tiles, padded channels, register blocks of 4, 5 and 3 vectors), and which convs the
registry gives it."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
import tvm

from sparsefx.backends.tvm.kernels import registry, tile_layout, winogradbf16
from sparsefx.target import has_bf16, host_cpu, with_precision

from .test_amx import ACT, bits, from_bits

pytestmark = [pytest.mark.usefixtures("private_cache"),
              pytest.mark.skipif(not has_bf16(), reason="this CPU has no AVX512-BF16")]
BOUND = 1e-2  # relative L2: F(2x2, 3x3)'s transforms rounded to bf16 (3.9e-3 at 256 channels), the output's rounding


@pytest.mark.parametrize(("batch", "cin", "cout", "size", "residual", "act"), [
    (1, 64, 64, 8, False, "none"),  # 4 vectors, whole tiles
    (2, 48, 80, 7, True, "relu"),  # 5 vectors; 7x7: the last tiles half outside; residual written over
    (1, 40, 48, (9, 6), False, "relu6"),  # 40 stored as 48; 3 vectors; not square
    (3, 256, 256, 14, True, "relu"),  # 3 images
])
def test_kernel_matches_pytorch(batch: int, cin: int, cout: int, size: int | tuple[int, int], residual: bool,
                                act: str) -> None:
    height, width = size if isinstance(size, tuple) else (size, size)
    assert winogradbf16.supported((1, 1, 1, 1, 1, 1, 1), ((batch, cin, height, width), (cout, cin, 3, 3)))
    step = tile_layout.HALF_STEP  # the layout's on CPUs without tiles, where the kernel runs
    spec = winogradbf16.WinogradBf16Spec(batch, cin, cout, height, width, activation=act, residual=residual, step=step)
    library = tvm.compile(tvm.IRModule({"main": winogradbf16.kernel(spec).with_attr("global_symbol", "main")}),
                          with_precision(host_cpu(), "bf16").to_tvm())
    torch.manual_seed(0)
    x, w, b = torch.randn(batch, cin, height, width), torch.randn(cout, cin, 3, 3) / (9 * cin) ** 0.5, torch.randn(cout)
    add = torch.randn(batch, cout, height, width)
    x, w, add = (t.bfloat16().float() for t in (x, w, add))  # the kernel's inputs are exactly these
    want = F.conv2d(x.double(), w.double(), b.double(), 1, 1)
    want = ACT[act](want + add.double() if residual else want)
    out = tvm.runtime.tensor(bits(add, step)) if residual else tvm.runtime.empty(spec.out_shape, "uint16")
    args = [bits(x, step), winogradbf16.pack_weight(spec, w.numpy()), winogradbf16.pack_bias(spec, b.numpy())]
    library["main"](*[tvm.runtime.tensor(a) for a in args], out)
    stored = from_bits(out.numpy())
    assert not stored[:, cout:].any()  # the layout's channels past the conv's stay zero
    error = float((stored[:, :cout].double() - want).norm() / want.norm())
    assert 1e-4 < error < BOUND, error  # bf16's rounding, within its bound


def test_registry_gives_it_unstrided_3x3_convs_in_bf16_without_tiles(monkeypatch: pytest.MonkeyPatch) -> None:
    conv = ((1, 1, 1, 1, 1, 1, 1), ((1, 64, 14, 14), (64, 64, 3, 3), (1, 64, 14, 14)))
    monkeypatch.setattr(registry, "has_bf16", lambda: True)
    monkeypatch.setattr(registry, "has_tiles", lambda: False)
    assert registry.kind_of(*conv, precision="bf16") == "winogradbf16"
    assert registry.kind_of((2, 2, 1, 1, 1, 1, 1), conv[1], precision="bf16") == "dpbf16"  # strided
    tiny = ((1, 1, 1, 1, 1, 1, 1), ((1, 64, 4, 4), (64, 64, 3, 3), (1, 64, 4, 4)))
    assert registry.kind_of(*tiny, precision="bf16") == "dpbf16"  # 4 tiles
    assert registry.kind_of(*conv) == "winograd"  # float32
    monkeypatch.setattr(registry, "has_tiles", lambda: True)
    assert registry.kind_of(*conv, precision="bf16") == "amx"  # AMX tiles run the direct conv
