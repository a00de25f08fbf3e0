"""Lower sparse layers (`torch.ops.sparsefx.*`) to `call_tir` of the sparse kernels in Relax.

`CONVERT_MAP` plugs into both TVM importers (`from_fx` sees `bsr_linear`, `from_exported_program`
sees `bsr_linear.default`). Each layer becomes layout ops on its input (reshape, transpose,
im2col), one `call_tir` and a reshape. The kernel is emitted for the CPU with a
`sparsefx.kernel` attribute; `sparse_kernel_pass` swaps in the kernel for the build target.
The calls are `call_tir`, not Relax ops, so the torch dispatch and epilogue passes, which
match `relax.nn.conv2d` / `relax.matmul`, leave them alone.

A 2:4 `nm_linear` on float16 input with constant weights and shapes the `mma.sp` kernel tiles
(rows, tokens % 64, cols % 64) is lowered instead to the operands of `sparse_mma`
(`formats.mma24_pack`'s layout, computed in TE and folded to constants), with `sparse_mma.reference_kernel` for the CPU
and the sparse-tensor-core kernel swapped in on CUDA (`MMA_ATTR`). That CUDA kernel is compiled
and its layout checked in numpy, but has not run on a GPU yet; float32 models keep the existing
N:M kernels.
"""

from __future__ import annotations

import json
from collections.abc import Callable

import numpy as np
import tvm
from tvm import relax, te, tirx

from sparsefx.backends.tvm.sparse import mma as sparse_mma
from sparsefx.backends.tvm.sparse.kernels import KernelSpec, kernel, transposed_operands
from sparsefx.backends.tvm.tvmscript import parse

ATTR = "sparsefx.kernel"
MMA_ATTR = "sparsefx.mma_kernel"
_CPU = tvm.target.Target({"kind": "llvm"})


def _shape(expr: relax.Expr) -> list[int]:
    return [int(d) for d in expr.ty.shape]


def _emit(importer: object, spec: KernelSpec, d: relax.Expr, operands: list[relax.Expr],
          bias: relax.Expr | None) -> relax.Expr:
    bb = importer.block_builder
    if bias is None:
        bias = relax.const(np.zeros(spec.rows, "float32"))
    if transposed_operands(spec):
        operands = [bb.emit(relax.op.permute_dims(v)) for v in operands]
    func = parse(kernel, spec, _CPU).with_attr(ATTR, json.dumps(spec.__dict__))
    gvar = bb.add_func(func, spec.name)
    return bb.emit(relax.call_tir(gvar, [d, *operands, bias], relax.TensorType(spec.out_shape, "float32")))


def _matmul(importer: object, fmt: str, x: relax.Expr, operands: list[relax.Expr], bias: relax.Expr | None,
            rows: int, block: tuple[int, int], nnz: int) -> relax.Expr:
    """out (..., rows) = x (..., cols) @ Wᵀ + bias."""
    bb = importer.block_builder
    *lead, cols = _shape(x)
    tokens = int(np.prod(lead))
    if tokens == 1:
        d = bb.emit(relax.op.reshape(x, (1, cols, 1)))
    else:
        flat = bb.emit(relax.op.reshape(x, (tokens, cols)))
        d = bb.emit(relax.op.reshape(relax.op.permute_dims(flat), (1, cols, tokens)))
    spec = KernelSpec(fmt, rows, cols, block, nnz, 1, tokens, transpose_out=tokens > 1)
    return bb.emit(relax.op.reshape(_emit(importer, spec, d, operands, bias), (*lead, rows)))


def _im2col(x: te.Tensor, kernel_size: list[int], stride: list[int], padding: list[int], dilation: list[int],
            out_hw: tuple[int, int]) -> te.Tensor:
    """(batch, C·kh·kw, oh·ow), rows in the weight's (c, kh, kw) order, zero padding."""
    batch, channels, height, width = (int(d) for d in x.shape)
    (kh, kw), (oh, ow) = kernel_size, out_hw

    def at(b: tirx.Var, k: tirx.Var, p: tirx.Var) -> tirx.PrimExpr:
        c, dy, dx = k // (kh * kw), k // kw % kh, k % kw
        y = p // ow * stride[0] - padding[0] + dy * dilation[0]
        xx = p % ow * stride[1] - padding[1] + dx * dilation[1]
        inside = tirx.all(y >= 0, y < height, xx >= 0, xx < width)
        return tirx.if_then_else(inside, x[b, c, tirx.max(tirx.min(y, height - 1), 0),
                                           tirx.max(tirx.min(xx, width - 1), 0)], tirx.const(0, x.dtype))

    return te.compute((batch, channels * kh * kw, oh * ow), at, name="im2col")


def _conv(importer: object, fmt: str, x: relax.Expr, operands: list[relax.Expr], bias: relax.Expr | None,
          rows: int, block: tuple[int, int], nnz: int, geometry: tuple[list[int], ...]) -> relax.Expr:
    bb = importer.block_builder
    kernel_size, stride, padding, dilation = geometry
    batch, channels, height, width = _shape(x)
    oh, ow = ((size + 2 * p - d * (k - 1) - 1) // s + 1 for size, k, s, p, d in
              zip((height, width), kernel_size, stride, padding, dilation, strict=True))
    if list(kernel_size) == [1, 1] and not any(padding):
        if list(stride) != [1, 1]:
            x = bb.emit(relax.op.strided_slice(x, [2, 3], [0, 0], [height, width], list(stride)))
        d = bb.emit(relax.op.reshape(x, (batch, channels, oh * ow)))
    else:
        d = bb.emit_te(_im2col, x, list(kernel_size), list(stride), list(padding), list(dilation), (oh, ow))
    cols = channels * kernel_size[0] * kernel_size[1]
    spec = KernelSpec(fmt, rows, cols, block, nnz, batch, oh * ow)
    return bb.emit(relax.op.reshape(_emit(importer, spec, d, operands, bias), (batch, rows, oh, ow)))


def _bsr_geometry(values: relax.Expr, indptr: relax.Expr) -> tuple[int, tuple[int, int], int]:
    nnz, br, bc = _shape(values)
    return (_shape(indptr)[0] - 1) * br, (br, bc), nnz


def _nm_geometry(values: relax.Expr, m: int, cols: int) -> tuple[int, tuple[int, int], int]:
    rows, nnz = _shape(values)
    return rows, (nnz * m // cols, m), nnz


def _bsr_linear(node: object, importer: object) -> relax.Expr:
    x, values, indices, indptr, bias = importer.retrieve_args(node)
    return _matmul(importer, "bsr", x, [values, indices, indptr], bias, *_bsr_geometry(values, indptr))


def _mma24_meta(indices: te.Tensor) -> te.Tensor:
    """`formats.mma24_pack`'s metadata words from N:M indices (rows, cols/2), in TE so that
    FoldConstant turns it into a constant once the weights are bound (the fields do not
    overlap, so their sum is their bitwise or)."""
    rows, half = (int(d) for d in indices.shape)
    rh, j = te.reduce_axis((0, 2), "rh"), te.reduce_axis((0, 8), "j")

    def word(tile: tirx.Var, step: tirx.Var, w: tirx.Var) -> tirx.PrimExpr:
        position = indices[tile * 16 + rh * 8 + w // 2, step * 16 + w % 2 * 8 + j].astype("uint32")
        return te.sum(tirx.shift_left(position, (rh * 16 + j * 2).astype("uint32")), axis=[rh, j])

    return te.compute((rows // 16, half // 16, 16), word, name="mma24_meta")


def _mma_linear(importer: object, x: relax.Expr, values: relax.Expr, indices: relax.Expr, bias: relax.Expr | None,
                rows: int) -> relax.Expr | None:
    """The 2:4 fp16 linear on the sparse-tensor-core operands, or None where it does not apply."""
    *lead, cols = _shape(x)
    tokens = int(np.prod(lead))
    if x.ty.dtype != "float16" or not sparse_mma.supported(rows, cols, tokens):
        return None
    bb = importer.block_builder
    meta = bb.emit_te(_mma24_meta, indices)
    packed = bb.emit(relax.op.astype(values, "float16"))
    bias = relax.const(np.zeros(rows, "float32")) if bias is None else bb.emit(relax.op.astype(bias, "float32"))
    spec = sparse_mma.MmaSpec(rows, cols, tokens, "float16")
    func = parse(sparse_mma.reference_kernel, spec).with_attr(MMA_ATTR, json.dumps(spec.__dict__))
    gvar = bb.add_func(func, spec.name)
    flat = bb.emit(relax.op.reshape(x, (tokens, cols)))
    out = bb.emit(relax.call_tir(gvar, [flat, packed, meta, bias], relax.TensorType((tokens, rows), "float16")))
    return bb.emit(relax.op.reshape(out, (*lead, rows)))


def _nm_linear(node: object, importer: object) -> relax.Expr:
    x, values, indices, bias, m = importer.retrieve_args(node)
    rows, block, nnz = _nm_geometry(values, m, _shape(x)[-1])
    if block == (2, 4) and (lowered := _mma_linear(importer, x, values, indices, bias, rows)) is not None:
        return lowered
    return _matmul(importer, "nm", x, [values, indices], bias, rows, block, nnz)


def _bsr_conv2d(node: object, importer: object) -> relax.Expr:
    x, values, indices, indptr, bias, *geometry = importer.retrieve_args(node)
    return _conv(importer, "bsr", x, [values, indices, indptr], bias, *_bsr_geometry(values, indptr), geometry)


def _nm_conv2d(node: object, importer: object) -> relax.Expr:
    x, values, indices, bias, m, *geometry = importer.retrieve_args(node)
    cols = _shape(x)[1] * geometry[0][0] * geometry[0][1]
    return _conv(importer, "nm", x, [values, indices], bias, *_nm_geometry(values, m, cols), geometry)


_CONVERTERS = {"bsr_linear": _bsr_linear, "nm_linear": _nm_linear, "bsr_conv2d": _bsr_conv2d,
               "nm_conv2d": _nm_conv2d}
CONVERT_MAP: dict[str, Callable] = {**_CONVERTERS, **{f"{k}.default": v for k, v in _CONVERTERS.items()}}


def sparse_kernel_pass(target: tvm.target.Target) -> tvm.transform.Pass:
    """Replace every sparse kernel by the one scheduled for `target` (CPU ones stay as they are)."""

    @tvm.transform.module_pass(opt_level=0, name="SparseKernels")
    def _pass(mod: tvm.IRModule, _ctx: object) -> tvm.IRModule:
        if "gpu" not in target.keys:
            return mod
        for gvar, func in list(mod.functions.items()):
            if isinstance(func, tirx.PrimFunc) and func.attrs is not None and ATTR in func.attrs:
                spec = json.loads(str(func.attrs[ATTR]))
                spec = KernelSpec(**{**spec, "block": tuple(spec["block"])})
                mod[gvar] = parse(kernel, spec, target).with_attr(ATTR, func.attrs[ATTR])
            elif isinstance(func, tirx.PrimFunc) and func.attrs is not None and MMA_ATTR in func.attrs:
                spec = sparse_mma.MmaSpec(**json.loads(str(func.attrs[MMA_ATTR])))
                mod[gvar] = parse(sparse_mma.kernel, spec).with_attr(MMA_ATTR, func.attrs[MMA_ATTR])
        return mod

    return _pass
