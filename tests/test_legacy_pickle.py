"""Models pickled before the package moved (tests/data/legacy_v0.pt, written by the sparsefx of
60834cf with make_legacy_pickle.py) still load and compute what they computed then."""

from pathlib import Path

import torch

from sparsefx.channels.attention import HeadAttention
from sparsefx.sparse.layers import SparseLinear

DATA = Path(__file__).parent / "data" / "legacy_v0.pt"


def test_modules_pickled_at_the_old_paths_load_and_match_their_saved_outputs() -> None:
    saved = torch.load(DATA, weights_only=False)
    modules, x, h = saved["modules"], saved["input"], saved["hidden"]
    assert isinstance(modules["heads"], HeadAttention)  # the alias resolves to today's class
    assert any(isinstance(m, SparseLinear) for m in modules["sparse"].modules())
    with torch.no_grad():
        got = {"heads": modules["heads"](h, h, h)[0], "sparse": modules["sparse"](x), "reshape": modules["reshape"](x)}
    for name, expected in saved["outputs"].items():
        assert expected.abs().max() > 1e-3, name  # a comparison that can fail
        torch.testing.assert_close(got[name], expected, rtol=1e-5, atol=1e-6, msg=name)


def test_a_rewritten_graph_that_patches_shapes_round_trips_through_pickle(tmp_path: Path) -> None:
    saved = torch.load(DATA, weights_only=False)
    graph_module = saved["modules"]["reshape"]
    assert "patched_shape" in graph_module.code
    torch.save(graph_module, tmp_path / "m.pt")
    again = torch.load(tmp_path / "m.pt", weights_only=False)
    torch.testing.assert_close(again(saved["input"]), saved["outputs"]["reshape"])
