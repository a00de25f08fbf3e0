"""Sparse layers: `SparseLinear` and `SparseConv2d` hold a BSR or N:M weight (`sparsefx.formats`).

Their forward calls one `torch.ops.sparsefx.*` operator per layer, so `torch.fx` and
`torch.export` both record the layer as one node the TVM importer lowers to a TIR kernel
(`backends/tvm/sparse_relax.py`). In PyTorch the operators are a reference implementation:
expand the weight to dense, then the dense op (exact, not fast; nothing here trains).
`dense_layer()` hands back the plain nn.Linear / nn.Conv2d a sparse layer stands for, for
runtimes that have no sparse kernel (ONNX) and for the fingerprint of the dense architecture
(`sparsify.dense_equivalent`).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from sparsefx.sparse.formats import BSR, NM, SparseFormat
from sparsefx.sparse.masks import Sparsity


def _bsr_weight(values: torch.Tensor, indices: torch.Tensor, indptr: torch.Tensor, cols: int) -> torch.Tensor:
    return BSR(values, indices, indptr, ((indptr.numel() - 1) * values.shape[1], cols)).to_dense()


def _nm_weight(values: torch.Tensor, indices: torch.Tensor, m: int, cols: int) -> torch.Tensor:
    return NM(values, indices, values.shape[1] * m // cols, m, (values.shape[0], cols)).to_dense()


@torch.library.custom_op("sparsefx::bsr_linear", mutates_args=())
def bsr_linear(x: torch.Tensor, values: torch.Tensor, indices: torch.Tensor, indptr: torch.Tensor,
               bias: torch.Tensor | None) -> torch.Tensor:
    return F.linear(x, _bsr_weight(values, indices, indptr, x.shape[-1]), bias)


@torch.library.custom_op("sparsefx::nm_linear", mutates_args=())
def nm_linear(x: torch.Tensor, values: torch.Tensor, indices: torch.Tensor, bias: torch.Tensor | None,
              m: int) -> torch.Tensor:
    return F.linear(x, _nm_weight(values, indices, m, x.shape[-1]), bias)


@torch.library.custom_op("sparsefx::bsr_conv2d", mutates_args=())
def bsr_conv2d(x: torch.Tensor, values: torch.Tensor, indices: torch.Tensor, indptr: torch.Tensor,
               bias: torch.Tensor | None, kernel: list[int], stride: list[int], padding: list[int],
               dilation: list[int]) -> torch.Tensor:
    weight = _bsr_weight(values, indices, indptr, x.shape[1] * kernel[0] * kernel[1])
    return F.conv2d(x, weight.reshape(-1, x.shape[1], *kernel), bias, stride, padding, dilation)


@torch.library.custom_op("sparsefx::nm_conv2d", mutates_args=())
def nm_conv2d(x: torch.Tensor, values: torch.Tensor, indices: torch.Tensor, bias: torch.Tensor | None, m: int,
              kernel: list[int], stride: list[int], padding: list[int], dilation: list[int]) -> torch.Tensor:
    weight = _nm_weight(values, indices, m, x.shape[1] * kernel[0] * kernel[1])
    return F.conv2d(x, weight.reshape(-1, x.shape[1], *kernel), bias, stride, padding, dilation)


def _conv_size(size: int, k: int, s: int, p: int, d: int) -> int:
    return (size + 2 * p - d * (k - 1) - 1) // s + 1


@bsr_linear.register_fake
def _(x, values, indices, indptr, bias):  # noqa: ANN001, ANN202
    return x.new_empty(*x.shape[:-1], (indptr.shape[0] - 1) * values.shape[1])


@nm_linear.register_fake
def _(x, values, indices, bias, m):  # noqa: ANN001, ANN202
    return x.new_empty(*x.shape[:-1], values.shape[0])


def _conv_fake(x: torch.Tensor, rows: int, kernel: list[int], stride: list[int], padding: list[int],
               dilation: list[int]) -> torch.Tensor:
    size = [_conv_size(x.shape[2 + i], kernel[i], stride[i], padding[i], dilation[i]) for i in range(2)]
    return x.new_empty(x.shape[0], rows, *size)


@bsr_conv2d.register_fake
def _(x, values, indices, indptr, bias, kernel, stride, padding, dilation):  # noqa: ANN001, ANN202
    return _conv_fake(x, (indptr.shape[0] - 1) * values.shape[1], kernel, stride, padding, dilation)


@nm_conv2d.register_fake
def _(x, values, indices, bias, m, kernel, stride, padding, dilation):  # noqa: ANN001, ANN202
    return _conv_fake(x, values.shape[0], kernel, stride, padding, dilation)


class _SparseWeight(nn.Module):
    """The stored format (buffers: saved with the model, moved by .to()) and the bias."""

    def __init__(self, weight: SparseFormat, bias: torch.Tensor | None) -> None:
        super().__init__()
        self.format = "bsr" if isinstance(weight, BSR) else "nm"
        self.rows, self.cols = weight.shape
        self.register_buffer("values", weight.values.detach().clone())
        self.register_buffer("indices", weight.indices.clone())
        if isinstance(weight, BSR):
            self.register_buffer("indptr", weight.indptr.clone())
        else:
            self.m = weight.m
        self.bias = None if bias is None else nn.Parameter(bias.detach().clone(), requires_grad=False)

    @property
    def weight_format(self) -> SparseFormat:
        if self.format == "bsr":
            return BSR(self.values, self.indices, self.indptr, (self.rows, self.cols))
        return NM(self.values, self.indices, self.values.shape[1] * self.m // self.cols, self.m, (self.rows, self.cols))

    @property
    def sparsity(self) -> Sparsity:
        w = self.weight_format
        if isinstance(w, NM):
            return Sparsity(w.density, "nm", m=w.m)
        return Sparsity(w.density, "block", block=w.block) if w.block != (1, 1) else Sparsity(w.density)

    def dense_weight(self) -> torch.Tensor:
        """The weight as a dense (rows, cols) matrix, pruned entries zero."""
        return self.weight_format.to_dense()

    @property
    def dense_shape(self) -> tuple[int, ...]:
        return (self.rows, self.cols)

    def _dense_weight_parameter(self) -> nn.Parameter:
        return nn.Parameter(self.dense_weight().reshape(self.dense_shape), requires_grad=False)


class SparseLinear(_SparseWeight):
    """nn.Linear with a BSR or N:M weight."""

    def __init__(self, weight: SparseFormat, bias: torch.Tensor | None) -> None:
        super().__init__(weight, bias)
        self.in_features, self.out_features = self.cols, self.rows

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.format == "bsr":
            return torch.ops.sparsefx.bsr_linear(x, self.values, self.indices, self.indptr, self.bias)
        return torch.ops.sparsefx.nm_linear(x, self.values, self.indices, self.bias, self.m)

    def dense_layer(self) -> nn.Linear:
        """The nn.Linear this layer stands for, pruned weights zero (the bias is shared)."""
        layer = nn.Linear(self.in_features, self.out_features, bias=False, device="meta")
        layer.weight, layer.bias = self._dense_weight_parameter(), self.bias
        return layer

    def extra_repr(self) -> str:
        return f"{self.in_features}, {self.out_features}, {self.format}, density={self.sparsity.density:.3f}"


class SparseConv2d(_SparseWeight):
    """nn.Conv2d (groups 1, zero padding) with a BSR or N:M weight over in_channels × kh × kw."""

    def __init__(self, weight: SparseFormat, bias: torch.Tensor | None, kernel_size: tuple[int, int],
                 stride: tuple[int, int], padding: tuple[int, int], dilation: tuple[int, int]) -> None:
        super().__init__(weight, bias)
        self.kernel_size, self.stride = list(kernel_size), list(stride)
        self.padding, self.dilation = list(padding), list(dilation)
        self.out_channels = self.rows
        self.in_channels = self.cols // (kernel_size[0] * kernel_size[1])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        geometry = (self.kernel_size, self.stride, self.padding, self.dilation)
        if self.format == "bsr":
            return torch.ops.sparsefx.bsr_conv2d(x, self.values, self.indices, self.indptr, self.bias, *geometry)
        return torch.ops.sparsefx.nm_conv2d(x, self.values, self.indices, self.bias, self.m, *geometry)

    @property
    def dense_shape(self) -> tuple[int, ...]:
        return (self.out_channels, self.in_channels, *self.kernel_size)

    def dense_layer(self) -> nn.Conv2d:
        """The nn.Conv2d this layer stands for, pruned weights zero (the bias is shared)."""
        layer = nn.Conv2d(self.in_channels, self.out_channels, tuple(self.kernel_size), tuple(self.stride),
                          tuple(self.padding), tuple(self.dilation), bias=False, device="meta")
        layer.weight, layer.bias = self._dense_weight_parameter(), self.bias
        return layer

    def extra_repr(self) -> str:
        return (f"{self.in_channels}, {self.out_channels}, kernel_size={tuple(self.kernel_size)}, "
                f"stride={tuple(self.stride)}, {self.format}, density={self.sparsity.density:.3f}")
