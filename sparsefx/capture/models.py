"""Model specs for the CLI and benchmarks: turn a string into (model, example_inputs).

Specs:
  default                 a small residual CNN defined here (what `sparsefx demo` prunes)
  torchvision:NAME        any torchvision classification model, random weights
  hf:NAME                 a Hugging Face model built from its default config, random weights;
                          NAME is bert-base, gpt2, vit-base or a model_type such as bert;
                          `hf:bert-base?layers=2` shrinks the layer count (any config field works)
  path/to/file.py:FUNC    FUNC() returns (model, example_inputs) or a model plus --input-shape
"""

from __future__ import annotations

import difflib
import importlib.util
import sys
from collections.abc import Sequence
from pathlib import Path

import torch
import torchvision.models
from torch import nn

from sparsefx.errors import SparsefxError

SPEC_HELP = ("use 'default', 'torchvision:NAME', 'hf:NAME', 'path/to/file.py:FUNC', a directory written by "
             "`sparsefx prune` (sparsefx.save) or a torch.save'd 'model.pt'")
DEFAULT_SEED = 0

# Models whose architecture fixes the input size; everything else runs at 224 to stay cheap.
TORCHVISION_INPUT_SIZE = {"inception_v3": 299}

HF_ALIASES = {"bert-base": "bert", "gpt2": "gpt2", "vit-base": "vit"}
HF_CONFIG_DEFAULTS = {"gpt2": {"use_cache": False}}  # no KV cache: one plain tensor in, tensors out
HF_TEXT_SEQ_LEN = 128


class BasicBlock(nn.Module):
    """Two 3x3 convs with a residual add; a 1x1 projection when the shape changes."""

    def __init__(self, in_ch: int, out_ch: int, stride: int = 1) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(in_ch, out_ch, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(out_ch)
        self.conv2 = nn.Conv2d(out_ch, out_ch, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(out_ch)
        self.shortcut = nn.Identity()
        if stride != 1 or in_ch != out_ch:
            self.shortcut = nn.Sequential(nn.Conv2d(in_ch, out_ch, 1, stride, bias=False), nn.BatchNorm2d(out_ch))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = torch.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return torch.relu(out + self.shortcut(x))


class TinyResNet(nn.Module):
    """CIFAR-sized ResNet (3 stages, about 1M params): residual adds couple channels across blocks,
    which is exactly what a channel pruner must get right."""

    def __init__(self, widths: Sequence[int] = (40, 80, 160), blocks: int = 2, num_classes: int = 10) -> None:
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, widths[0], 3, 1, 1, bias=False), nn.BatchNorm2d(widths[0]), nn.ReLU())
        stages, in_ch = [], widths[0]
        for i, width in enumerate(widths):
            layers = [BasicBlock(in_ch if j == 0 else width, width, 2 if (i > 0 and j == 0) else 1) for j in range(blocks)]
            stages.append(nn.Sequential(*layers))
            in_ch = width
        self.stages = nn.Sequential(*stages)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(in_ch, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.pool(self.stages(self.stem(x)))
        return self.fc(torch.flatten(x, 1))


def load_model(
    spec: str, batch_size: int = 1, input_shape: Sequence[int] | None = None, need_inputs: bool = True
) -> tuple[nn.Module, tuple[torch.Tensor, ...]]:
    """Build the model a spec names, in eval mode, with example inputs for it.

    `input_shape` replaces the default input shape (for HF text models it is (batch, seq_len));
    a file factory's own example inputs win over it, since they may not be a single random tensor.
    With `need_inputs=False` (rebuilding an architecture to load weights into) a file factory may
    return the model alone; its inputs are then (). Weights are random but seeded, so the same spec
    gives the same model every time.
    """
    if batch_size < 1:
        raise SparsefxError(f"batch size must be at least 1, got {batch_size}")
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(DEFAULT_SEED)
        shape = tuple(input_shape) if input_shape is not None else None
        if spec == "default":
            model, inputs = TinyResNet(), (torch.randn(shape or (batch_size, 3, 32, 32)),)
        elif spec.startswith("torchvision:"):
            model, inputs = _load_torchvision(spec.removeprefix("torchvision:"), batch_size, shape)
        elif spec.startswith("hf:"):
            model, inputs = _load_hf(spec.removeprefix("hf:"), batch_size, shape)
        elif ":" in spec and spec.rsplit(":", 1)[0].endswith(".py"):
            path, func = spec.rsplit(":", 1)
            model, inputs = _load_from_file(Path(path), func, shape, need_inputs)
        else:
            raise SparsefxError(f"unknown model spec {spec!r}{_bare_name_hint(spec)}: {SPEC_HELP}")
    return model.eval(), inputs


def _bare_name_hint(spec: str) -> str:
    """Point at the prefix when someone types a torchvision name on its own."""
    if spec in torchvision.models.list_models(module=torchvision.models):
        return f" (did you mean 'torchvision:{spec}'?)"
    return ""


def _load_torchvision(
    name: str, batch_size: int, shape: tuple[int, ...] | None
) -> tuple[nn.Module, tuple[torch.Tensor, ...]]:
    names = torchvision.models.list_models(module=torchvision.models)
    if name not in names:
        close = difflib.get_close_matches(name, names, n=1)
        hint = f"did you mean 'torchvision:{close[0]}'?" if close else "see torchvision.models.list_models()"
        raise SparsefxError(f"unknown torchvision model {name!r}: {hint}")
    # aux_logits would add a second output that only exists in training mode.
    kwargs = {"aux_logits": False, "init_weights": True} if name in ("inception_v3", "googlenet") else {}
    model = torchvision.models.get_model(name, weights=None, **kwargs)
    for layer in model.modules():  # ViT heads start at zero: every output 0, every comparison of outputs vacuous
        if isinstance(layer, nn.Linear) and not layer.weight.any():
            nn.init.normal_(layer.weight, std=0.02)
    size = TORCHVISION_INPUT_SIZE.get(name, 224)
    return model, (torch.randn(shape or (batch_size, 3, size, size)),)


def _load_hf(
    name: str, batch_size: int, shape: tuple[int, ...] | None
) -> tuple[nn.Module, tuple[torch.Tensor, ...]]:
    from transformers import CONFIG_MAPPING, AutoConfig, AutoModel

    base, _, query = name.partition("?")
    model_type = HF_ALIASES.get(base, base)
    if model_type not in CONFIG_MAPPING:
        close = difflib.get_close_matches(base, [*HF_ALIASES, *CONFIG_MAPPING.keys()], n=1)
        hint = f"did you mean 'hf:{close[0]}'?" if close else f"use one of {', '.join(HF_ALIASES)} or a model_type"
        raise SparsefxError(f"unknown Hugging Face model {base!r}: {hint}")
    config = AutoConfig.for_model(model_type, **HF_CONFIG_DEFAULTS.get(model_type, {}))
    for key, value in _parse_query(query).items():
        field = "num_hidden_layers" if key == "layers" else key
        if not hasattr(config, field):
            raise SparsefxError(f"hf:{base} has no config field {key!r}: use layers=N or a {type(config).__name__} field")
        setattr(config, field, value)
    model = AutoModel.from_config(config)
    if hasattr(config, "image_size") and hasattr(config, "num_channels"):
        size = config.image_size
        inputs = (torch.randn(shape or (batch_size, config.num_channels, size, size)),)
    else:
        inputs = (torch.randint(0, config.vocab_size, shape or (batch_size, HF_TEXT_SEQ_LEN)),)
    return model, inputs


def _parse_query(query: str) -> dict[str, int | float | str]:
    """`layers=2&hidden_size=128` -> {"layers": 2, "hidden_size": 128}."""
    fields: dict[str, int | float | str] = {}
    for item in filter(None, query.split("&")):
        key, sep, raw = item.partition("=")
        if not sep:
            raise SparsefxError(f"bad option {item!r} in model spec: write it as key=value, e.g. layers=2")
        for cast in (int, float):
            try:
                fields[key] = cast(raw)
                break
            except ValueError:
                continue
        else:
            fields[key] = raw
    return fields


def _load_from_file(
    path: Path, func: str, shape: tuple[int, ...] | None, need_inputs: bool
) -> tuple[nn.Module, tuple[torch.Tensor, ...]]:
    if not path.is_file():
        raise SparsefxError(f"model file {str(path)!r} not found: pass an existing path/to/file.py:FUNC")
    # Register under the file's own name so a torch.save'd model unpickles wherever that file is
    # importable (e.g. from its directory); fall back to a private name rather than shadow a module.
    module_name = path.stem
    if not module_name.isidentifier() or module_name in sys.modules:
        module_name = f"_sparsefx_user_{abs(hash(path.resolve()))}"
    spec = importlib.util.spec_from_file_location(module_name, path)
    assert spec is not None and spec.loader is not None  # a .py path always has a source loader
    module = importlib.util.module_from_spec(spec)
    sys.modules[module_name] = module
    spec.loader.exec_module(module)
    factory = getattr(module, func, None)
    if not callable(factory):
        raise SparsefxError(f"{path} has no function {func!r}: define {func}() returning (model, example_inputs)")
    result = factory()
    if isinstance(result, tuple) and len(result) == 2 and isinstance(result[0], nn.Module):
        model, inputs = result
        inputs = (inputs,) if isinstance(inputs, torch.Tensor) else tuple(inputs)
    elif isinstance(result, nn.Module) and shape is None and not need_inputs:
        model, inputs = result, ()
    elif isinstance(result, nn.Module):
        if shape is None:
            raise SparsefxError(
                f"{path}:{func} returned only a model: return (model, example_inputs) or pass --input-shape"
            )
        model, inputs = result, (torch.randn(shape),)
    else:
        raise SparsefxError(f"{path}:{func} returned {type(result).__name__}: return (model, example_inputs)")
    if not all(isinstance(t, torch.Tensor) for t in inputs):
        raise SparsefxError(f"{path}:{func} example inputs must be tensors: return a tensor or a tuple of tensors")
    return model, inputs

