"""Op registries: what sparsefx knows about each op, one table per concern, one lookup rule.

Four concerns keep a table of ops: MACs (`capture.annotate.MACS`), coupling rules
(`channels.rules.RULES`), module attributes to refresh after channel removal
(`channels.remove.ATTRIBUTES`) and the kernels the cost model prices (`cost.latency.KERNELS`,
`cost.latency.EPILOGUE`). Each is an `OpRegistry`, and all of them find a node's entry the same way:

- a module (fx ``call_module``): the first class of ``type(module).__mro__`` with an entry, so a
  subclass of ``nn.Linear`` (torch's ``NonDynamicallyQuantizableLinear``) is an ``nn.Linear``
  unless it has entries of its own; a class registered ``like=`` another is looked up as that one
  after its own bases;
- a function, tensor method name or aten overload: the alias set it belongs to, the one `Op` all
  spellings of an operation share (``torch.add``, ``operator.add``, the ``"add"`` method and
  ``aten.add.Tensor`` are `ADD`). A spelling in no alias set is its own key (an aten overload
  counts as its packet). Entries are filed under the same key, so registering one spelling
  registers them all.

Adding an op of your own::

    from sparsefx.capture import ops
    ops.register(MyLinear, like=nn.Linear)          # every concern treats it as nn.Linear
    ops.register(MyOp, macs=count, coupling=rule)   # or one entry per concern, by name

A module class registered in any concern is a leaf of the fx trace, so its calls stay one
node. Module entries serve fx graphs only: torch.export graphs hold aten ops.
"""

from __future__ import annotations

import operator
from collections.abc import Callable, Iterator
from typing import Generic, TypeVar

import torch
import torch.fx
import torch.nn.functional as F
from torch import nn

from sparsefx.errors import SparsefxError

aten = torch.ops.aten
T = TypeVar("T")


class Op:
    """An alias set: the spellings (functions, method names, aten packets) of one operation."""

    def __init__(self, name: str) -> None:
        self.name = name

    def __repr__(self) -> str:
        return f"Op({self.name})"


ALIAS_OF: dict[object, object] = {}  # spelling -> key it is filed under (an Op, or a spelling it was made like)
LIKE: dict[type, type] = {}  # module class -> the class it is looked up as after its own bases
CONCERNS: dict[str, OpRegistry] = {}  # concern name -> its registry, for `register(op, name=entry)`


def alias(name: str, *spellings: object) -> Op:
    op = Op(name)
    for spelling in spellings:
        if ALIAS_OF.setdefault(spelling, op) is not op:
            raise ValueError(f"{spelling!r} is already a spelling of {ALIAS_OF[spelling]!r}")
    return op


def op_key(target: object) -> object:
    """The key every registry files a call target under: its alias set, else the target itself."""
    if isinstance(target, torch._ops.OpOverload):
        target = target.overloadpacket
    return ALIAS_OF.get(target, target)


def lookup_order(cls: type) -> Iterator[type]:
    """Classes a module of class `cls` is looked up as, most specific first."""
    for base in cls.__mro__:
        yield base
        if base in LIKE:
            yield from lookup_order(LIKE[base])


class OpRegistry(Generic[T]):
    """One concern's entries (a MAC counter, a coupling rule, ...) and the one way to find them."""

    def __init__(self, concern: str) -> None:
        if concern in CONCERNS:
            raise ValueError(f"an op registry named {concern!r} exists already")
        self.concern = concern
        self.entries: dict[object, T] = {}
        CONCERNS[concern] = self

    def add(self, entry: T, *ops: object) -> T:
        """File `entry` under each op: module classes, alias sets or any of their spellings."""
        for op in ops:
            self.entries[op if isinstance(op, type) else op_key(op)] = entry
        return entry

    def register(self, *ops: object) -> Callable[[T], T]:
        """Decorator form of `add`."""
        return lambda entry: self.add(entry, *ops)

    def for_module(self, module: nn.Module) -> T | None:
        return next((self.entries[c] for c in lookup_order(type(module)) if c in self.entries), None)

    def for_target(self, target: object) -> T | None:
        return self.entries.get(op_key(target))

    def lookup(self, node: torch.fx.Node, root: nn.Module) -> T | None:
        """The entry for a call node of a graph whose modules live under `root` (None if none)."""
        if node.op == "call_module":
            return self.for_module(root.get_submodule(node.target))
        if node.op in ("call_function", "call_method"):
            return self.for_target(node.target)
        return None


def register(op: object, *, like: object = None, **entries: object) -> None:
    """Teach sparsefx an op: a module class, a function, or a tensor method's name.

    `like=` an op sparsefx knows makes every concern treat `op` as that one (a module class as
    another class, a function or method name as one more spelling of an alias set). Keyword
    entries set one concern each, by registry name: ``macs=fn(node, gm) -> int``,
    ``coupling=fn(ctx, node) -> layout``, ``attributes=fn(module)`` (refresh attributes after
    removal), ``latency=fn(node, gm, shape_of, lanes) -> kernels``."""
    unknown = sorted(set(entries) - set(CONCERNS))
    if unknown:
        raise SparsefxError(f"no op registry named {unknown[0]!r}; use one of {', '.join(sorted(CONCERNS))}")
    if like is not None:
        if isinstance(op, type) != isinstance(like, type):
            raise SparsefxError(f"register({op!r}, like={like!r}) pairs a module class with a function; "
                                "make both module classes or both functions/method names")
        if isinstance(op, type):
            LIKE[op] = like
        else:
            ALIAS_OF[op] = op_key(like)
    for concern, entry in entries.items():
        CONCERNS[concern].add(entry, op)


def is_registered_module(cls: type) -> bool:
    """True for a module class with an entry (or a `like=`) of its own: the fx trace keeps it a leaf."""
    return cls in LIKE or any(cls in registry.entries for registry in CONCERNS.values())


# --- alias sets: every spelling of one operation -----------------------------------------------
# aten.convolution also spells transposed convolutions (its `transposed` argument): entries check it.
CONV = alias("conv", F.conv1d, F.conv2d, F.conv3d, aten.conv1d, aten.conv2d, aten.conv3d, aten.convolution)
CONV_TRANSPOSE = alias("conv_transpose", F.conv_transpose1d, F.conv_transpose2d, F.conv_transpose3d,
                       aten.conv_transpose1d, aten.conv_transpose2d, aten.conv_transpose3d)
LINEAR = alias("linear", F.linear, aten.linear)
ADDMM = alias("addmm", torch.addmm, "addmm", aten.addmm)
MATMUL = alias("matmul", torch.matmul, operator.matmul, "matmul", "__matmul__", aten.matmul,
               torch.bmm, "bmm", aten.bmm, torch.mm, "mm", aten.mm)
ATTENTION = alias("scaled_dot_product_attention", F.scaled_dot_product_attention, aten.scaled_dot_product_attention)
ATTENTION_ARGS = ("query", "key", "value", "attn_mask", "dropout_p", "is_causal")  # positional; scale, enable_gqa by keyword


def attention_args(node: torch.fx.Node) -> dict:
    """An ATTENTION call's arguments by name, positional or keyword (its fx node, or the same node
    in an exported program as TVM's importer hands it over)."""
    return {**dict(zip(ATTENTION_ARGS, node.args, strict=False)), **node.kwargs}
EMBEDDING = alias("embedding", F.embedding, aten.embedding)

BATCH_NORM = alias("batch_norm", F.batch_norm, aten.batch_norm, aten._native_batch_norm_legit_no_training)
GROUP_NORM = alias("group_norm", F.group_norm, aten.group_norm)
LAYER_NORM = alias("layer_norm", F.layer_norm, aten.layer_norm)
SOFTMAX = alias("softmax", F.softmax, torch.softmax, "softmax", aten.softmax, aten._softmax)
LOG_SOFTMAX = alias("log_softmax", F.log_softmax, torch.log_softmax, "log_softmax", aten.log_softmax,
                    aten._log_softmax)
MEAN = alias("mean", torch.mean, "mean", aten.mean)
SUM = alias("sum", torch.sum, "sum", aten.sum)
AMAX = alias("amax", torch.amax, "amax", aten.amax)

MAX_POOL = alias("max_pool", F.max_pool1d, F.max_pool2d, F.max_pool3d, torch.max_pool1d, torch.max_pool2d,
                 torch.max_pool3d, aten.max_pool2d, aten.max_pool2d_with_indices)
AVG_POOL = alias("avg_pool", F.avg_pool1d, F.avg_pool2d, F.avg_pool3d, aten.avg_pool2d)
ADAPTIVE_AVG_POOL = alias("adaptive_avg_pool", F.adaptive_avg_pool1d, F.adaptive_avg_pool2d, F.adaptive_avg_pool3d,
                          torch.adaptive_avg_pool1d, torch._C._nn.adaptive_avg_pool2d, aten.adaptive_avg_pool1d,
                          aten.adaptive_avg_pool2d, aten._adaptive_avg_pool2d)
ADAPTIVE_MAX_POOL = alias("adaptive_max_pool", F.adaptive_max_pool2d, aten.adaptive_max_pool2d)
INTERPOLATE = alias("interpolate", F.interpolate, aten.upsample_nearest2d, aten.upsample_bilinear2d)
PAD = alias("pad", F.pad, aten.constant_pad_nd, aten.pad)

RELU = alias("relu", F.relu, torch.relu, "relu", "relu_", aten.relu, aten.relu_)
HARDTANH = alias("hardtanh", F.hardtanh, "hardtanh", "hardtanh_", aten.hardtanh, aten.hardtanh_)
GELU = alias("gelu", F.gelu, aten.gelu)
SILU = alias("silu", F.silu, aten.silu, aten.silu_)
HARDSWISH = alias("hardswish", F.hardswish, aten.hardswish, aten.hardswish_)
HARDSIGMOID = alias("hardsigmoid", F.hardsigmoid, aten.hardsigmoid)
SIGMOID = alias("sigmoid", F.sigmoid, torch.sigmoid, "sigmoid", "sigmoid_", aten.sigmoid)
TANH = alias("tanh", F.tanh, torch.tanh, "tanh", aten.tanh)
LEAKY_RELU = alias("leaky_relu", F.leaky_relu, aten.leaky_relu)
DROPOUT = alias("dropout", F.dropout, aten.dropout)
EXP = alias("exp", torch.exp, "exp", aten.exp)
SQRT = alias("sqrt", torch.sqrt, "sqrt", aten.sqrt)
RSQRT = alias("rsqrt", torch.rsqrt, "rsqrt", aten.rsqrt)
ABS = alias("abs", torch.abs, "abs", aten.abs)
ERF = alias("erf", torch.erf, aten.erf)
NEG = alias("neg", operator.neg, "neg", aten.neg)
CLAMP = alias("clamp", torch.clamp, "clamp", "clamp_", aten.clamp)
ZEROS_LIKE = alias("zeros_like", torch.zeros_like, aten.zeros_like)
ONES_LIKE = alias("ones_like", torch.ones_like, aten.ones_like)
FULL_LIKE = alias("full_like", torch.full_like, aten.full_like)
CLONE = alias("clone", torch.clone, "clone", aten.clone)
CONTIGUOUS = alias("contiguous", "contiguous", aten.contiguous)
CAST = alias("cast", "to", "type", "type_as", "float", "half", "double", aten.to, aten._to_copy)
DETACH = alias("detach", "detach", aten.detach)

ADD = alias("add", operator.add, operator.iadd, torch.add, "add", "add_", "__add__", aten.add, aten.add_)
SUB = alias("sub", operator.sub, torch.sub, "sub", "sub_", "__sub__", aten.sub)
MUL = alias("mul", operator.mul, operator.imul, torch.mul, "mul", "mul_", "__mul__", aten.mul, aten.mul_)
DIV = alias("div", operator.truediv, torch.div, "div", "div_", "__truediv__", aten.div)
POW = alias("pow", operator.pow, torch.pow, "pow", aten.pow)
RSUB = alias("rsub", torch.rsub, aten.rsub)
WHERE = alias("where", torch.where, "where", aten.where)
MAXIMUM = alias("maximum", torch.maximum, aten.maximum)
MINIMUM = alias("minimum", torch.minimum, aten.minimum)
MASKED_FILL = alias("masked_fill", torch.masked_fill, "masked_fill", "masked_fill_", aten.masked_fill)
EQ = alias("eq", operator.eq, torch.eq, "eq", aten.eq)
NE = alias("ne", operator.ne, torch.ne, "ne", aten.ne)
LT = alias("lt", operator.lt, torch.lt, "lt", aten.lt)
LE = alias("le", operator.le, torch.le, "le", aten.le)
GT = alias("gt", operator.gt, torch.gt, "gt", aten.gt)
GE = alias("ge", operator.ge, torch.ge, "ge", aten.ge)
AND = alias("and", operator.and_, aten.bitwise_and, aten.__and__, aten.logical_and)
OR = alias("or", operator.or_, aten.bitwise_or, aten.__or__, aten.logical_or)

RESHAPE = alias("reshape", "view", "reshape", torch.reshape, aten.view, aten.reshape, aten._unsafe_view)
UNFLATTEN = alias("unflatten", "unflatten", torch.unflatten, aten.unflatten)
FLATTEN = alias("flatten", torch.flatten, "flatten", aten.flatten)
SQUEEZE = alias("squeeze", torch.squeeze, "squeeze", aten.squeeze)
UNSQUEEZE = alias("unsqueeze", torch.unsqueeze, "unsqueeze", aten.unsqueeze)
PERMUTE = alias("permute", "permute", torch.permute, aten.permute)
TRANSPOSE = alias("transpose", "transpose", torch.transpose, aten.transpose, torch.swapaxes)
MATRIX_T = alias("t", "t", torch.t, aten.t)
EXPAND = alias("expand", "expand", aten.expand)
CAT = alias("cat", torch.cat, torch.concat, aten.cat, aten.concat)
STACK = alias("stack", torch.stack, aten.stack)
SPLIT = alias("split", torch.split, "split", aten.split, aten.split_with_sizes)
CHUNK = alias("chunk", torch.chunk, "chunk", aten.chunk)
TENSOR_SPLIT = alias("tensor_split", torch.tensor_split, "tensor_split")
SIZE = alias("size", "size", aten.sym_size)
