"""Rewrite pass: replace planned Linear / Conv2d layers by sparse-kernel layers.

`sparsify(model, specs)` converts the named layers with the pattern and density their
`Sparsity` asks for; a layer already in masked training (`masks.apply_masks`) keeps the
mask it was trained with. `to_sparse(model)` ends masked training: every masked layer
becomes its sparse layer, with the format read off its mask (`formats.detect`).
Both return a new model and leave the input untouched. `dense_equivalent(model)` goes the
other way for runtimes with no sparse kernel: each sparse layer as the dense layer it stands for.
"""

from __future__ import annotations

import copy

from torch import nn
from torch.nn.utils import parametrize

from sparsefx.errors import SparsefxError
from sparsefx.sparse.formats import detect, from_dense
from sparsefx.sparse.layers import SparseConv2d, SparseLinear
from sparsefx.sparse.masks import Sparsity, current_masks


def _check(name: str, layer: nn.Module) -> None:
    if isinstance(layer, nn.Linear):
        return
    if not isinstance(layer, nn.Conv2d):
        raise SparsefxError(f"layer {name!r} is a {type(layer).__name__}; sparse kernels replace nn.Linear "
                            "and nn.Conv2d only")
    if layer.groups != 1 or layer.padding_mode != "zeros" or isinstance(layer.padding, str):
        raise SparsefxError(f"conv {name!r} has groups={layer.groups}, padding={layer.padding!r}, padding_mode="
                            f"{layer.padding_mode!r}; sparse convs need groups=1 and numeric zero padding "
                            "(remove channels from this layer instead)")


def sparse_layer(layer: nn.Linear | nn.Conv2d, sparsity: Sparsity, mask: object = None) -> SparseLinear | SparseConv2d:
    """The sparse layer holding `layer`'s weight under `mask` (or the mask `sparsity` picks)."""
    weight = from_dense(layer.weight.detach(), sparsity, mask)
    if isinstance(layer, nn.Linear):
        return SparseLinear(weight, layer.bias)
    return SparseConv2d(weight, layer.bias, layer.kernel_size, layer.stride, layer.padding, layer.dilation)


def _layer(model: nn.Module, name: str) -> nn.Module:
    try:
        return model.get_submodule(name)
    except AttributeError:
        raise SparsefxError(f"no layer named {name!r} in {type(model).__name__}; name a Linear or Conv2d "
                            "as model.named_modules() lists it") from None


def sparsify(model: nn.Module, specs: dict[str, Sparsity]) -> nn.Module:
    """A copy of `model` whose named layers run sparse kernels (`SparseLinear` / `SparseConv2d`)."""
    if not isinstance(model, nn.Module):
        raise SparsefxError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    for name, sparsity in specs.items():
        _check(name, _layer(model, name))
        if not isinstance(sparsity, Sparsity):
            raise SparsefxError(f"the spec for {name!r} must be a sparsefx.Sparsity, got {type(sparsity).__name__}")
    model = copy.deepcopy(model)
    masks = current_masks(model)
    for name, sparsity in specs.items():
        model.set_submodule(name, sparse_layer(_layer(model, name), sparsity, masks.get(name)))
    return model


def to_sparse(model: nn.Module) -> nn.Module:
    """End masked training: a copy where each masked Linear / Conv2d is its sparse layer.

    Masked layers a sparse kernel cannot run (other convs, grouped convs) and fully dense
    masks get their zeros baked into plain weights instead."""
    model = copy.deepcopy(model)
    for name, mask in current_masks(model).items():
        layer = _layer(model, name)
        try:
            _check(name, layer)
            sparsity = detect(mask)
        except SparsefxError:
            sparsity = None
        if sparsity is None or sparsity.density == 1:
            parametrize.remove_parametrizations(layer, "weight", leave_parametrized=True)
        else:
            model.set_submodule(name, sparse_layer(layer, sparsity, mask))
    return model


def dense_equivalent(model: nn.Module) -> nn.Module:
    """`model` with each sparse layer as the nn.Linear / nn.Conv2d it stands for (pruned weights
    zero), or `model` itself when it has none. Every other tensor is shared with `model`, not
    copied: the copy is for exporting, not for training on its own."""
    sparse = [name for name, m in model.named_modules() if isinstance(m, (SparseLinear, SparseConv2d))]
    if not sparse:
        return model
    shared = {id(t): t for t in (*model.parameters(), *model.buffers())}  # deepcopy's memo: kept as they are
    copied = copy.deepcopy(model, shared)
    for name in sparse:
        copied.set_submodule(name, copied.get_submodule(name).dense_layer())
    return copied
