"""Writes tests/data/legacy_v0.pt with the sparsefx of commit 60834cf (before the package moved).

The file pickles three modules whose classes and graph functions lived at the old paths
(`sparsefx.sparse_ops.SparseLinear`, `sparsefx.passes.split_attention.HeadAttention`,
`sparsefx.passes.remove_channels.patched_shape`); test_legacy_pickle.py loads it with today's code.
Kept for the record: it only runs against that old layout."""

import torch
import torch.fx
from torch import nn

import sparsefx
from sparsefx.passes.remove_channels import patched_shape

torch.manual_seed(0)
x = torch.randn(2, 5, 16)


class Attend(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(16, 32)
        self.attn = nn.MultiheadAttention(32, 4, batch_first=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.fc(x)
        return self.attn(h, h, h)[0]


heads = sparsefx.prune(Attend().eval(), (x,), ratio=0.5).attn  # only the class sparsefx defines
h = torch.randn(2, 5, heads.q_proj.in_features)
sparse = sparsefx.sparsify(nn.Sequential(nn.Linear(16, 32), nn.ReLU(), nn.Linear(32, 8)).eval(),
                           {"0": sparsefx.Sparsity(0.5, "block", block=(8, 8))})
graph = torch.fx.Graph()
inp = graph.placeholder("x")
size = graph.call_method("size", (inp,))
shape = graph.call_function(patched_shape, (size, ((2, 8),)))
graph.output(graph.call_method("reshape", (graph.call_method("narrow", (inp, 2, 0, 8)), shape)))
reshape = torch.fx.GraphModule(nn.Module(), graph)
modules = {"heads": heads, "sparse": sparse, "reshape": reshape}
outputs = {"heads": heads(h, h, h)[0], "sparse": sparse(x), "reshape": reshape(x)}
torch.save({"input": x, "hidden": h, "modules": modules, "outputs": outputs}, "tests/data/legacy_v0.pt")
print({k: type(m).__name__ for k, m in modules.items()}, [type(m).__name__ for m in heads.modules()])
