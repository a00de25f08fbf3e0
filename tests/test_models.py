"""Model specs: the embedded default, file factories, HF configs and the errors for bad specs."""

import pytest
import torch

from sparsefx.capture.models import TinyResNet, load_model
from sparsefx.errors import SparsefxError

FACTORY_SOURCE = """
import torch
from torch import nn

def with_inputs():
    return nn.Sequential(nn.Conv2d(3, 8, 3), nn.ReLU()), torch.randn(2, 3, 16, 16)

def model_only():
    return nn.Linear(4, 2)

def not_a_model():
    return 42
"""


def one_line_error(spec: str, **kwargs) -> str:
    with pytest.raises(SparsefxError) as info:
        load_model(spec, **kwargs)
    message = str(info.value)
    assert "\n" not in message
    return message


def test_default_model_runs_and_is_about_a_million_params():
    model, (x,) = load_model("default")
    assert isinstance(model, TinyResNet) and not model.training
    assert x.shape == (1, 3, 32, 32)
    assert 0.5e6 < sum(p.numel() for p in model.parameters()) < 2e6
    with torch.inference_mode():
        assert model(x).shape == (1, 10)


def test_default_model_is_reproducible_and_batch_size_applies():
    first, _ = load_model("default")
    second, (x,) = load_model("default", batch_size=4)
    assert x.shape[0] == 4
    for a, b in zip(first.state_dict().values(), second.state_dict().values()):
        assert torch.equal(a, b)


def test_input_shape_overrides_default():
    _, (x,) = load_model("default", input_shape=(2, 3, 64, 64))
    assert x.shape == (2, 3, 64, 64)


def test_torchvision_spec_builds_random_weights_in_eval_mode():
    model, (x,) = load_model("torchvision:squeezenet1_1")
    assert not model.training and x.shape == (1, 3, 224, 224)


def test_hf_spec_accepts_config_fields():
    spec = "hf:bert-base?layers=1&hidden_size=64&intermediate_size=128&num_attention_heads=2"
    model, (ids,) = load_model(spec, batch_size=2)
    assert model.config.num_hidden_layers == 1 and model.config.hidden_size == 64
    assert ids.shape == (2, 128) and ids.dtype == torch.long
    with torch.inference_mode():
        assert model(ids).last_hidden_state.shape == (2, 128, 64)


@pytest.mark.parametrize(
    ("spec", "expected"),
    [
        ("nonsense", "torchvision:NAME"),
        ("resnet18", "did you mean 'torchvision:resnet18'"),
        ("torchvision:resnet81", "did you mean 'torchvision:resnet18'"),
        ("hf:bertt", "did you mean 'hf:bert"),
        ("hf:bert-base?nonexistent_field=1", "no config field"),
        ("hf:bert-base?layers", "key=value"),
        ("missing_file.py:build", "not found"),
    ],
)
def test_bad_specs_raise_one_line_errors_naming_the_fix(spec, expected):
    assert expected in one_line_error(spec)


def test_file_factory_returning_model_and_inputs(tmp_path):
    path = tmp_path / "factory.py"
    path.write_text(FACTORY_SOURCE)
    model, (x,) = load_model(f"{path}:with_inputs")
    assert not model.training and x.shape == (2, 3, 16, 16)


def test_file_factory_returning_only_a_model_needs_an_input_shape(tmp_path):
    path = tmp_path / "factory.py"
    path.write_text(FACTORY_SOURCE)
    assert "--input-shape" in one_line_error(f"{path}:model_only")
    model, (x,) = load_model(f"{path}:model_only", input_shape=(3, 4))
    assert model(x).shape == (3, 2)


def test_file_factory_errors(tmp_path):
    path = tmp_path / "factory.py"
    path.write_text(FACTORY_SOURCE)
    assert "no function" in one_line_error(f"{path}:absent")
    assert "return (model, example_inputs)" in one_line_error(f"{path}:not_a_model")
