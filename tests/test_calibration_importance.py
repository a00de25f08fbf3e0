"""Data-aware channel importance: Wanda (|W| * ||X||) and Taylor scores over calibration batches."""

import pytest
import torch
from torch import nn
from transformers import LlamaConfig, LlamaForCausalLM

import sparsefx


class MLP(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc1, self.fc2 = nn.Linear(4, 8), nn.Linear(8, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(torch.relu(self.fc1(x)))


def quiet_but_loud() -> MLP:
    """Hidden unit 0 has the smallest weights but reads input 0, which is huge in the data;
    units 1-7 read inputs 1-3 with larger weights."""
    model = MLP().eval()
    with torch.no_grad():
        model.fc1.weight.zero_()
        model.fc1.weight[0, 0] = 0.05
        model.fc1.weight[1:, 1:] = torch.linspace(0.2, 1.0, 7).unsqueeze(1)
        model.fc1.bias.fill_(0.1)
        model.fc2.weight.fill_(0.3)
    return model


def data(n: int = 3) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    batches = []
    for _ in range(n):
        x = torch.rand(16, 4, generator=g) + 0.5
        x[:, 0] *= 1000.0
        batches.append(x)
    return batches


def kept_rows(model: nn.Module) -> torch.Tensor:
    return model.fc1.weight[:, 0] != 0  # which kept units are unit 0 (the only reader of input 0)


def test_wanda_keeps_the_unit_with_small_weights_and_huge_activations():
    model = quiet_but_loud()
    example = (torch.rand(2, 4),)
    by_l1 = sparsefx.prune(model, example, ratio=0.25, importance="l1")
    by_wanda = sparsefx.prune(model, example, ratio=0.25, importance="wanda", calibration=data())
    assert by_l1.fc1.out_features == by_wanda.fc1.out_features == 6
    assert not kept_rows(by_l1).any() and kept_rows(by_wanda).sum() == 1
    x = data(1)[0]
    with torch.no_grad():  # and keeping it is what keeps the output close to the dense model's
        dense = model(x)
        assert (by_wanda(x) - dense).norm() < 0.1 * (by_l1(x) - dense).norm()


def test_taylor_runs_every_calibration_batch():
    model = quiet_but_loud()
    example = (torch.rand(2, 4),)
    by_taylor = sparsefx.prune(model, example, ratio=0.25, importance="taylor", calibration=data())
    assert kept_rows(by_taylor).sum() == 1  # its gradient-weighted contribution is large too


def test_wanda_on_a_language_model_with_token_batches():
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                      num_attention_heads=2, num_key_value_heads=1, use_cache=False)
    model = LlamaForCausalLM(cfg).eval()
    ids = torch.randint(0, 64, (1, 8))
    calibration = [torch.randint(0, 64, (3, 8)) for _ in range(2)]  # split into batches of 1 if need be
    for importance in ("wanda", "taylor"):
        pruned = sparsefx.prune(model, (ids,), ratio={"model.layers.0.mlp.up_proj": 0.5}, importance=importance,
                                calibration=calibration)
        assert pruned.model.layers[0].mlp.up_proj.out_features == 32


@pytest.mark.parametrize("bad", [torch.rand(16, 5), [torch.rand(16, 4), torch.rand(16, 3)],
                                 torch.randint(0, 3, (16, 4)), [(torch.rand(16, 4), torch.rand(16, 4))], "data", [],
                                 torch.rand(15, 4)])
def test_calibration_of_the_wrong_shape_is_one_line(bad):
    model = quiet_but_loud()
    before = model.fc1.weight.clone()
    with pytest.raises(sparsefx.CalibrationError) as info:
        sparsefx.prune(model, (torch.rand(2, 4),), ratio=0.25, importance="wanda", calibration=bad)
    assert "\n" not in str(info.value)
    assert torch.equal(model.fc1.weight, before) and model.fc1.out_features == 8


def test_plan_and_apply_take_calibration():
    model = quiet_but_loud()
    example = (torch.rand(2, 4),)
    by_l1 = sparsefx.apply(model, sparsefx.plan(model, example, macs_ratio=0.7, verbose=False), example)
    chosen = sparsefx.plan(model, example, macs_ratio=0.7, importance="wanda", calibration=data(), verbose=False)
    by_wanda = sparsefx.apply(model, chosen, example, calibration=data())
    assert by_l1.fc1.out_features == by_wanda.fc1.out_features < 8
    assert not kept_rows(by_l1).any() and kept_rows(by_wanda).sum() == 1
