"""Sparse training that never holds a dense weight: SET on Linear layers stored as their kept weights.

Masked training (`regrowth`) keeps every layer's dense weight, its dense gradient and both Adam
moments, so it takes more memory than dense training. SET (random regrowth) needs none of them:
`CompactLinear` stores a Linear layer's kept weights as `values`, the parameter the optimizer sees,
with their row and column indices (int32). Its forward multiplies by the CSR matrix they make; its
backward computes the input's gradient through the transposed CSR matrix and the kept weights'
gradient only, as a product sampled at the kept positions (`torch.sparse.sampled_addmm`). Weight,
gradient and Adam's two moments are all nnz long. `CompactSET` drops the weakest kept weights and
regrows as many at random positions it samples (no dense mask is built); regrown weights and their
Adam moments start at zero. RigL regrows by the dense gradient and cannot train this way.
Unstructured only: block and N:M patterns keep training masked (`regrowth.SET`).
"""

from __future__ import annotations

import warnings

import torch
from torch import nn

from sparsefx.recovery.regrowth import RegrowthError, check_kept, check_schedule


def _csr_tensor(crow: torch.Tensor, col: torch.Tensor, values: torch.Tensor, shape: tuple[int, int]) -> torch.Tensor:
    """A CSR matrix built from indices this module derived (valid by construction: not checked), without
    PyTorch's once-per-process notice that its CSR support is in beta."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="Sparse CSR tensor support is in beta")
        return torch.sparse_csr_tensor(crow, col, values, shape, check_invariants=False)


class _SparseLinearFunction(torch.autograd.Function):
    """y = x @ W.T with W a CSR matrix of `values` at (rows, cols), differentiable in both."""

    @staticmethod
    def forward(ctx: object, values: torch.Tensor, x: torch.Tensor, layer: CompactLinear) -> torch.Tensor:
        crow, col, order, crow_t, col_t, order_t = layer.layout()
        weight = _csr_tensor(crow, col, values[order], (layer.out_features, layer.in_features))
        ctx.layer, ctx.layout = layer, (crow, col, order, crow_t, col_t, order_t)
        ctx.save_for_backward(values, x)
        return (weight @ x.T).T

    @staticmethod
    def backward(ctx: object, grad: torch.Tensor) -> tuple:
        values, x = ctx.saved_tensors
        crow, col, order, crow_t, col_t, order_t = ctx.layout
        layer, grad_values, grad_x = ctx.layer, None, None
        if ctx.needs_input_grad[1]:
            transposed = _csr_tensor(crow_t, col_t, values[order_t], (layer.in_features, layer.out_features))
            grad_x = (transposed @ grad.T).T
        if ctx.needs_input_grad[0]:
            pattern = _csr_tensor(crow, col, torch.zeros_like(values), (layer.out_features, layer.in_features))
            sampled = torch.sparse.sampled_addmm(pattern, grad.T.contiguous(), x, beta=0.0).values()
            grad_values = torch.empty_like(values).index_copy_(0, order, sampled)  # CSR order back to slot order
        return grad_values, grad_x, None


class CompactLinear(nn.Module):
    """A Linear layer holding only its kept weights: `values[i]` sits at (`rows[i]`, `cols[i]`).
    Slots keep their place when regrowth moves a weight (the optimizer's state follows the slot);
    the CSR order is derived from the indices when they change."""

    def __init__(self, in_features: int, out_features: int, rows: torch.Tensor, cols: torch.Tensor,
                 values: torch.Tensor, bias: torch.Tensor | None = None) -> None:
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        self.values = nn.Parameter(values.detach().clone().float())
        self.bias = None if bias is None else nn.Parameter(bias.detach().clone())
        self.register_buffer("rows", rows.to(torch.int32))
        self.register_buffer("cols", cols.to(torch.int32))
        self._layout: tuple | None = None

    @classmethod
    def from_linear(cls, linear: nn.Linear, kept: float, init: str = "random",
                    generator: torch.Generator | None = None) -> CompactLinear:
        """`linear` at `kept` of its weights: the largest ones ("magnitude") or random ones with
        their values ("random", training from scratch)."""
        numel = linear.weight.numel()
        count = max(1, round(kept * numel))
        if init == "magnitude":
            flat = linear.weight.detach().abs().flatten().topk(count).indices
        else:
            flat = torch.randperm(numel, generator=generator)[:count]
        values = linear.weight.detach().flatten()[flat]
        return cls(linear.in_features, linear.out_features, flat // linear.in_features, flat % linear.in_features,
                   values, linear.bias)

    @property
    def kept(self) -> float:
        return self.values.numel() / (self.in_features * self.out_features)

    def moved(self) -> None:
        """The indices changed: the CSR layout is derived again on the next forward."""
        self._layout = None

    def layout(self) -> tuple[torch.Tensor, ...]:
        """(crow, col, order) of W in CSR and the same of W.T; `order` maps CSR position to slot."""
        if self._layout is None:
            self._layout = (*_csr(self.rows, self.cols, self.in_features, self.out_features),
                            *_csr(self.cols, self.rows, self.out_features, self.in_features))
        return self._layout

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        flat = x.reshape(-1, self.in_features)
        y = _SparseLinearFunction.apply(self.values, flat, self).reshape(*x.shape[:-1], self.out_features)
        return y if self.bias is None else y + self.bias

    @torch.no_grad()
    def to_linear(self) -> nn.Linear:
        """The dense nn.Linear with zeros where nothing is kept (to deploy: `to_sparse`, `sparsefx.compile`)."""
        linear = nn.Linear(self.in_features, self.out_features, bias=self.bias is not None)
        linear.weight.zero_()
        linear.weight[self.rows.long(), self.cols.long()] = self.values
        if self.bias is not None:
            linear.bias.copy_(self.bias)
        return linear

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, kept={self.kept:.4f}"


def _csr(rows: torch.Tensor, cols: torch.Tensor, width: int, height: int) -> tuple[torch.Tensor, ...]:
    order = torch.argsort(rows.long() * width + cols.long())
    crow = torch.zeros(height + 1, dtype=torch.int32)
    crow[1:] = torch.bincount(rows.long(), minlength=height).cumsum(0)
    return crow, cols[order].contiguous(), order


def densify(model: nn.Module) -> nn.Module:
    """`model` with every CompactLinear replaced by its dense nn.Linear (in place; returned)."""
    for name, module in list(model.named_modules()):
        if isinstance(module, CompactLinear):
            model.set_submodule(name, module.to_linear())
    return model


class CompactSET:
    """SET (Mocanu et al. 2018) on the layers of `kept` stored compact: the named nn.Linear layers are
    replaced by CompactLinear at construction (`init` "random": sparse from scratch; "magnitude": from
    a trained model), then every `every` steps up to `end` the `fraction` of each layer's kept weights
    with the smallest magnitude move to random positions not kept, at zero. A pruner for
    `finetune(pruner=...)`, which hands it the optimizer (`bind`) so the moved slots' moments reset."""

    def __init__(self, model: nn.Module, kept: dict[str, float], every: int = 100, end: int = 1000,
                 fraction: float = 0.3, init: str = "random", seed: int = 0) -> None:
        check_schedule(every, end, fraction, init)
        if not kept:
            raise RegrowthError("CompactSET needs {layer: kept fraction} for at least one nn.Linear layer")
        layers = dict(model.named_modules())
        for name, fraction_kept in kept.items():
            check_kept(fraction_kept, f"kept fraction of {name}")
            if not isinstance(layers.get(name), nn.Linear):
                found = type(layers[name]).__name__ if name in layers else "no such layer"
                raise RegrowthError(f"CompactSET stores nn.Linear layers only and {name!r} is {found}; train "
                                    "other layers with SET (masked) or leave them out of `kept`")
        self.model, self.every, self.end, self.fraction, self.changed = model, every, end, float(fraction), False
        self.generator, self.optimizer, self.updates = torch.Generator().manual_seed(seed), None, 0
        self.layers: dict[str, CompactLinear] = {}
        for name, fraction_kept in kept.items():
            compact = CompactLinear.from_linear(layers[name], fraction_kept, init, self.generator)
            model.set_submodule(name, compact)
            self.layers[name] = compact

    def bind(self, optimizer: torch.optim.Optimizer) -> None:
        self.optimizer = optimizer

    def step(self, t: int) -> nn.Module:
        if t > 0 and t % self.every == 0 and t < self.end:
            self.update()
        return self.model

    @torch.no_grad()
    def update(self) -> None:
        for layer in self.layers.values():
            count = min(round(self.fraction * layer.values.numel()),
                        layer.in_features * layer.out_features - layer.values.numel())
            if count == 0:
                continue
            slots = layer.values.abs().topk(count, largest=False).indices
            flat = self.free_positions(layer, count)
            layer.rows[slots] = (flat // layer.in_features).to(torch.int32)
            layer.cols[slots] = (flat % layer.in_features).to(torch.int32)
            layer.values[slots] = 0
            state = self.optimizer.state.get(layer.values, {}) if self.optimizer is not None else {}
            for value in state.values():  # Adam's moments of the moved slots: the new weight has no history
                if torch.is_tensor(value) and value.shape == layer.values.shape:
                    value[slots] = 0
            layer.moved()
        self.updates += 1

    def free_positions(self, layer: CompactLinear, count: int) -> torch.Tensor:
        """`count` distinct random flat positions none of the layer's weights holds now: drawn by
        rejection while at most half are kept; above that from the free ones, found with a bool mask
        (a byte per position, for the moment of the update)."""
        numel = layer.in_features * layer.out_features
        taken = layer.rows.long() * layer.in_features + layer.cols.long()
        if 2 * taken.numel() > numel:
            free = torch.ones(numel, dtype=torch.bool).index_fill_(0, taken, False).nonzero().flatten()
            return free[torch.randperm(free.numel(), generator=self.generator)[:count]]
        found = torch.empty(0, dtype=torch.long)
        while found.numel() < count:
            draw = torch.unique(torch.randint(numel, (2 * count + 16,), generator=self.generator))
            draw = draw[~torch.isin(draw, taken) & ~torch.isin(draw, found)]
            found = torch.cat([found, draw[torch.randperm(draw.numel(), generator=self.generator)]])
        return found[:count]
