"""The PyTorch kernels dispatched convolutions and matmuls call, registered as TVM global functions.

Convolutions with constant weights run on oneDNN with the weights reordered once into its blocked
layout (`mkldnn._reorder_convolution_weight`, what TorchInductor's freezing does) instead of on every
call as `F.conv2d` does: at batch 1 that reorder costs as much as the convolution itself in the 7x7
stages (ResNet-18 256->256 3x3 at 7x7: 0.72 ms plain, 0.21 ms prepacked, one thread). The timer
(`measure.host`) times both per kernel, as "torch" and "torch_prepacked", and the faster is kept
(float32 matmuls with a constant weight too: oneDNN's linear on the prepacked weight, or MKL's):
prepacked convs output channels-last, and the copy back to NCHW costs more than the weight reorder
it saves where activations are large and weights small. The compiler names each prepacked
weight by a hash of its contents, so it is packed once per process and input shape, also when the
artifact is loaded elsewhere. The kernels return the tensor PyTorch allocated (shared
through DLPack, no copy) rather than writing into a buffer TVM allocated.

In bf16 (`Target.precision`, CPUs with AVX512-BF16 or AMX) a kernel computes in bf16 on oneDNN:
the input is cast (channels-last) once per call, the weight once per process (prepacked, or kept as
a bf16 copy under its key), accumulation is float32 inside oneDNN, and the output comes back as
compact float32 in one pass, or as bf16 where only other bf16 convs read it (`bf16_chain`).
Everything outside the dispatched convs and matmuls (norms, softmax, element-wise) stays float32.
"""

from __future__ import annotations

import hashlib
import time

import numpy as np
import torch
import torch.nn.functional as F
import tvm_ffi

from sparsefx.cost.kernel import EPILOGUE_ACTIVATIONS as ACTIVATIONS  # the codes dispatched convs take

CONV = "sparsefx.torch.conv2d"
CONV_EPILOGUE = "sparsefx.torch.conv2d_bias"
CONV_RESIDUAL = "sparsefx.torch.conv2d_bias_residual"
CONV_RESIDUAL_IN_PLACE = "sparsefx.torch.conv2d_bias_residual_"  # the result written into the residual (`residual_in_place`)
MATMUL = "sparsefx.torch.matmul"
MATMUL_EPILOGUE = "sparsefx.torch.matmul_bias"
MATMUL_ACTIVATIONS = ("none", "relu", "gelu", "gelu_tanh")  # codes in fused matmuls' calls
MAX_POOL = "sparsefx.torch.max_pool2d"  # a max-pool between bf16 convs, in bf16 (`bf16_chain`)
TORCH_IMPLEMENTATIONS = ("torch", "torch_prepacked")  # as the timer and the dispatch table name them
# what the kernels compute in; the compiled calls pass the index. "bf16-out": bf16 returned as bf16, for a
# conv whose result only feeds other bf16 convs (`dispatch.bf16_chain`)
PRECISIONS = ("fp32", "bf16", "bf16-out")

_ONEDNN_ACT = {"none": ("none", []), "relu": ("relu", []), "relu6": ("hardtanh", [0.0, 6.0]), "silu": ("swish", [])}
_EAGER_ACT = {"none": lambda t: t, "relu": torch.relu_, "relu6": lambda t: t.clamp_(0, 6),
              "silu": lambda t: F.silu(t, inplace=True), "gelu": F.gelu,
              "gelu_tanh": lambda t: F.gelu(t, approximate="tanh")}
_ONEDNN_LINEAR_ACT = {"none": ("none", ""), "relu": ("relu", ""), "gelu": ("gelu", "none"), "gelu_tanh": ("gelu", "tanh")}
PREPACK = torch.backends.mkldnn.is_available()
_packed: dict[tuple, torch.Tensor] = {}  # (weight key, input shape, dtype) or (key, "linear", dtype) -> oneDNN-blocked weight
_converted: dict[tuple, torch.Tensor] = {}  # (weight key, dtype) -> a matmul weight in that dtype


def weight_key(weight: np.ndarray) -> int:
    """A 62-bit content hash naming a constant weight (0 means: not constant, do not prepack)."""
    return int.from_bytes(hashlib.sha1(weight.tobytes() + str(weight.shape).encode()).digest()[:8], "little") >> 2 or 1


def conv(x: torch.Tensor, w: torch.Tensor, b: torch.Tensor | None, attrs: tuple[int, ...], key: int = 0,
         act: str = "none", residual: torch.Tensor | None = None, precision: str = "fp32",
         in_place: bool = False) -> torch.Tensor:
    """conv2d (+ bias, + residual, + activation) for a workload's attrs (stride, padding, dilation
    pairs, groups); with a weight key, on oneDNN with the weight prepacked and the activation fused;
    in `precision`: float32 out, except "bf16-out" (bf16, channels-last as oneDNN left it). `in_place`:
    the residual is free to take the result (it is returned then, where its dtype allows)."""
    s0, s1, p0, p1, d0, d1, groups = attrs
    dtype = torch.float32 if precision == "fp32" else torch.bfloat16
    in_place = in_place and residual is not None and residual.dtype == dtype \
        and (dtype is torch.float32 or residual.is_contiguous(memory_format=torch.channels_last))
    if dtype is torch.bfloat16:  # channels-last: oneDNN's bf16 convs run 2x faster on it than on NCHW (64->256
        # 1x1 + residual at 56x56: 0.6 vs 1.3 ms); a no-op on what a chained bf16 conv handed on
        x, residual = (t if t is None else t.to(dtype, memory_format=torch.channels_last) for t in (x, residual))
    b = b if b is None else b.to(dtype)
    # bf16-out hands oneDNN's layout (channels-last for most shapes) to the next conv as it is: DLPack carries
    # the strides and only PyTorch kernels read it (`bf16_chain`); TIR gets compact NCHW float32
    finish = (lambda t: t) if precision == "bf16-out" else _float32
    if not (key and PREPACK):
        out = F.conv2d(x, w.to(dtype), b, (s0, s1), (p0, p1), (d0, d1), groups)
        return finish(_EAGER_ACT[act](out if residual is None else out.add_(residual)))
    geometry = ([p0, p1], [s0, s1], [d0, d1], groups)
    packed = _packed.get((key, tuple(x.shape), dtype))
    if packed is None:
        packed = _packed[(key, tuple(x.shape), dtype)] = torch.ops.mkldnn._reorder_convolution_weight(
            w.to(dtype), *geometry, list(x.shape))
    if residual is None:
        out = torch.ops.mkldnn._convolution_pointwise(x, packed, b, *geometry, *_ONEDNN_ACT[act], "")
    else:  # oneDNN's sum post-op takes ReLU after it; other activations run in place afterwards
        fused = "relu" if act == "relu" else None
        if in_place:  # no copy of the residual into a fresh output for the sum post-op to add to
            out = torch.ops.mkldnn._convolution_pointwise_.binary(residual, x, packed, b, *geometry, "add", None,
                                                                  fused, [], None)
        else:
            out = torch.ops.mkldnn._convolution_pointwise.binary(x, residual, packed, b, *geometry, "add", None,
                                                                 fused, [], None)
        out = out if fused else _EAGER_ACT[act](out)
    return finish(out)  # oneDNN picks channels-last output for some shapes; TIR expects compact NCHW


def matmul(a: torch.Tensor, b: torch.Tensor, key: int = 0, precision: str = "fp32", bias: torch.Tensor | None = None,
           act: str = "none") -> torch.Tensor:
    """act(a @ b + bias) in `precision`; a constant `b` named by `key` is prepacked once per process
    for oneDNN's linear, which then applies the bias and activation too: in float32 (PyTorch's matmul
    calls MKL, which on the AMD EPYC here ran BERT's 768 -> 3072 projection at 28-44 GMAC/s against
    oneDNN's 55 with its weight prepacked) and in bf16 (against `torch.matmul` on a bf16 copy, one
    thread of the AMX Xeon: ViT-B/16's 768 -> 3072 0.84 vs 1.49 ms, a classifier's 1024 -> 1000 at
    batch 1 0.084 vs 0.145 ms). Otherwise `b` is converted (once, where it is named)."""
    dtype = torch.float32 if precision == "fp32" else torch.bfloat16
    if key and PREPACK and b.dim() == 2:
        packed = _packed.get((key, "linear", dtype))
        if packed is None:  # oneDNN takes the weight as (out, in), like nn.Linear's
            packed = _packed[(key, "linear", dtype)] = torch.ops.mkldnn._reorder_linear_weight(
                b.t().contiguous().to(dtype), None)
        out = torch.ops.mkldnn._linear_pointwise(a.to(dtype), packed, bias if bias is None else bias.to(dtype),
                                                 _ONEDNN_LINEAR_ACT[act][0], [], _ONEDNN_LINEAR_ACT[act][1])
        return out if dtype is torch.float32 else _float32(out)
    if precision == "fp32":
        out = torch.matmul(a, b)
    else:
        weight = _converted.get((key, dtype)) if key else None
        if weight is None:
            weight = b.to(dtype)
            if key:
                _converted[(key, dtype)] = weight
        out = _float32(torch.matmul(a.to(dtype), weight))
    out = out if bias is None else out.add_(bias)
    return _EAGER_ACT[act](out).contiguous()


def _float32(out: torch.Tensor) -> torch.Tensor:
    """Compact NCHW float32 in one pass, whatever dtype and memory format oneDNN returned."""
    return out.to(torch.float32, memory_format=torch.contiguous_format)


def _t(value: object) -> torch.Tensor:
    return torch.from_dlpack(value)


# each call ends in the weight key and the precision index (and the activation's for the epilogues)
@tvm_ffi.register_global_func(CONV, override=True)
def _torch_conv2d(x: object, w: object, *attrs_key: int) -> object:
    *attrs, key, precision = attrs_key
    return tvm_ffi.from_dlpack(conv(_t(x), _t(w), None, tuple(attrs), key, precision=PRECISIONS[precision]))


@tvm_ffi.register_global_func(CONV_EPILOGUE, override=True)
def _torch_conv2d_epilogue(x: object, w: object, b: object, *attrs_key_act: int) -> object:
    """conv + per-channel bias (+ activation): one oneDNN call with the activation as its post-op."""
    *attrs, key, act, precision = attrs_key_act
    return tvm_ffi.from_dlpack(conv(_t(x), _t(w), _t(b).reshape(-1), tuple(attrs), key, ACTIVATIONS[act],
                                    precision=PRECISIONS[precision]))


@tvm_ffi.register_global_func(CONV_RESIDUAL, override=True)
def _torch_conv2d_residual(x: object, w: object, b: object, residual: object, *attrs_key_act: int) -> object:
    """conv + bias + residual (+ activation): the ResNet block tail, without leaving oneDNN."""
    return _conv2d_residual(x, w, b, residual, attrs_key_act, in_place=False)


@tvm_ffi.register_global_func(CONV_RESIDUAL_IN_PLACE, override=True)
def _torch_conv2d_residual_in_place(x: object, w: object, b: object, residual: object, *attrs_key_act: int) -> object:
    """The same, written into the residual, which nothing reads afterwards."""
    return _conv2d_residual(x, w, b, residual, attrs_key_act, in_place=True)


def _conv2d_residual(x: object, w: object, b: object, residual: object, attrs_key_act: tuple[int, ...],
                     in_place: bool) -> object:
    *attrs, key, act, precision = attrs_key_act
    return tvm_ffi.from_dlpack(conv(_t(x), _t(w), _t(b).reshape(-1), tuple(attrs), key, ACTIVATIONS[act],
                                    _t(residual), PRECISIONS[precision], in_place=in_place))


@tvm_ffi.register_global_func(MATMUL, override=True)
def _torch_matmul(a: object, b: object, key: int, precision: int) -> object:
    return tvm_ffi.from_dlpack(matmul(_t(a), _t(b), key, PRECISIONS[precision]))


@tvm_ffi.register_global_func(MATMUL_EPILOGUE, override=True)
def _torch_matmul_bias(a: object, b: object, bias: object, key: int, act: int, precision: int) -> object:
    """a @ b + bias (+ activation): a Linear layer, one oneDNN call where its weight is prepacked."""
    return tvm_ffi.from_dlpack(matmul(_t(a), _t(b), key, PRECISIONS[precision], _t(bias).reshape(-1),
                                      MATMUL_ACTIVATIONS[act]))


@tvm_ffi.register_global_func(MAX_POOL, override=True)
def _torch_max_pool2d(x: object, *window: int) -> object:
    """max_pool2d on what a bf16 conv handed on (bf16, channels-last), returned as it comes out:
    window (kh, kw), stride, padding and dilation pairs, then ceil_mode."""
    kh, kw, sh, sw, ph, pw, dh, dw, ceil = window
    return tvm_ffi.from_dlpack(F.max_pool2d(_t(x), (kh, kw), (sh, sw), (ph, pw), (dh, dw), bool(ceil)))


def forget_packed(keys: list[int]) -> None:
    """Drop the prepacked copies of the weights named `keys` (random ones, timed once)."""
    dropped = set(keys)
    for cache in (_packed, _converted):
        for entry in [e for e in cache if e[0] in dropped]:
            del cache[entry]


def best_time(run: object, repeat: int) -> float:
    """Fastest of `repeat` runs in ms: on a shared CPU the minimum is what the kernel can do,
    the median is what the neighbours let it do."""
    run()
    times = []
    for _ in range(repeat):
        start = time.perf_counter()
        run()
        times.append(time.perf_counter() - start)
    return float(np.min(times)) * 1e3
