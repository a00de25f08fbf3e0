"""What every command shares: the model arguments and loading, the thread and verbosity flags,
argument parsers, and the `sparsefx.cli` logger for status lines (stderr; stdout is the report)."""

from __future__ import annotations

import argparse
import logging
from pathlib import Path

import torch
from torch import nn

from sparsefx.capture.models import SPEC_HELP, load_model
from sparsefx.channels.record import recorded_inputs
from sparsefx.errors import SparsefxError
from sparsefx.io import is_saved_model, read_description
from sparsefx.io import load as sparsefx_load
from sparsefx.io import save as sparsefx_save
from sparsefx.log import get_logger
from sparsefx.target import PRECISIONS

LOG = get_logger("cli")


def add_model_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("model", metavar="MODEL", help=SPEC_HELP.removeprefix("use "))
    parser.add_argument("--batch-size", type=int, default=1, help="batch size of the example input")
    parser.add_argument("--input-shape", type=parse_shape, default=None, metavar="N,C,H,W",
                        help="example input shape, e.g. 1,3,224,224 (needed for factories that return no inputs)")
    parser.add_argument("--method", choices=("auto", "fx", "export"), default="auto",
                        help="graph capture: torch.fx, torch.export, or fx with export as fallback")
    add_arch_arg(parser)


def add_arch_arg(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--arch", metavar="SPEC", default=None,
                        help="architecture of a saved model directory (default: the spec stored in it; a file spec "
                        "such as mymodel.py:build runs code, so it is only used when given here); for a torch.save'd "
                        ".pt MODEL, the spec a saved directory written from it stores")


def add_threads_arg(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--threads", type=int, default=None,
                        help="torch CPU threads for latency (default: torch's choice; use 1 on a busy machine, "
                        "where spinning worker threads can make timings 10-100x slower)")


def add_precision_arg(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--precision", choices=PRECISIONS, default=None,
                        help="what convs and matmuls compute in (default fp32): bf16 on CPUs with AVX512-BF16 or "
                        "AMX (PyTorch's bf16 kernels where they measure faster), fp16/bf16 on CUDA")


def add_verbosity_args(parser: argparse.ArgumentParser, default: object) -> None:
    """-v/--verbose and -q/--quiet; before the command with `default` INFO, after it with SUPPRESS
    (so a flag given in either place wins and the command's parser does not reset it)."""
    group = parser.add_mutually_exclusive_group()
    group.add_argument("-v", "--verbose", dest="log_level", action="store_const", const=logging.DEBUG,
                       default=default, help="also print debug lines (e.g. the compiler's steps)")
    group.add_argument("-q", "--quiet", dest="log_level", action="store_const", const=logging.WARNING,
                       default=default, help="print warnings and results only, no status lines or progress bars")


def parse_ratio(text: str) -> float | dict[str, float]:
    try:
        if "=" not in text:
            return float(text)
        pairs = (item.split("=", 1) for item in text.split(",") if item)
        return {prefix.strip(): float(value) for prefix, value in pairs}
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a ratio: write 0.5 or layer1=0.3,layer2=0.5") from None


def parse_shape(text: str) -> tuple[int, ...]:
    try:
        return tuple(int(dim) for dim in text.replace("x", ",").split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a shape: write e.g. 1,3,224,224") from None


def load(args: argparse.Namespace) -> tuple[nn.Module, tuple[torch.Tensor, ...]]:
    """The model and example inputs the model arguments name (a spec, a sparsefx.save directory, or a
    saved .pt with --input-shape)."""
    LOG.info("loading %s", args.model)
    if is_saved_model(args.model):  # sparsefx.save: the removal record knows the inputs it was traced on
        model = saved_model(Path(args.model), args.arch)
        inputs = recorded_inputs(model) if args.input_shape is None else (torch.randn(args.input_shape),)
        if inputs is None:
            raise SparsefxError(f"{args.model} is a saved unpruned model; give its example input with --input-shape")
        return model, inputs
    if args.model.endswith(".pt"):  # a model saved with torch.save: it says nothing of its inputs
        if args.input_shape is None:
            raise SparsefxError(f"{args.model} is a saved model; give its example input with --input-shape, e.g. 1,1,28,28")
        return saved_model(Path(args.model)).eval(), (torch.randn(args.input_shape),)
    return load_model(args.model, batch_size=args.batch_size, input_shape=args.input_shape)


def saved_model(path: Path, arch: str | None = None) -> nn.Module:
    """A model written by `sparsefx.save` (rebuilt from `arch` or its stored spec, never unpickled),
    or a torch.save'd .pt the user names (which unpickles: only for files one trusts)."""
    if is_saved_model(path):
        return sparsefx_load(path, model=arch).eval()
    if not path.is_file():
        raise SparsefxError(f"no saved model at {path}; save one with sparsefx.save(model, path) or `sparsefx prune`")
    try:
        model = torch.load(path, weights_only=False, map_location="cpu")
    except Exception as error:  # truncated file, not a pickle, missing class
        raise SparsefxError(f"cannot load {path} ({type(error).__name__}); it must be a torch.save'd nn.Module") from None
    if not isinstance(model, nn.Module):
        raise SparsefxError(f"{path} holds a {type(model).__name__}, not an nn.Module; save the model itself")
    return model


def save(model: nn.Module, out: Path, model_arg: str, arch: str | None = None) -> None:
    """Write `model` with sparsefx.save, storing the spec it was built from so `sparsefx.load(out)`
    (and every command that takes a saved model) rebuilds it unaided."""
    spec = model_spec(model_arg, arch)
    sparsefx_save(model, out, spec=spec)
    how = "`sparsefx.load(path)`" if spec else "`sparsefx.load(path, model=<its dense architecture>)` (or --arch)"
    print(f"saved {out} (safetensors + JSON; load with {how}, no pickle involved)")


def model_spec(model_arg: str, arch: str | None = None) -> str | None:
    """The spec of the dense architecture a model from the MODEL argument was built from: the
    argument itself, --arch, the spec a saved directory stores, or None (a .pt without --arch)."""
    if is_saved_model(model_arg):
        return arch or read_description(Path(model_arg))["model"].get("spec")
    return arch if model_arg.endswith(".pt") else model_arg


def check_out(path: Path) -> None:
    if not path.parent.is_dir():
        raise SparsefxError(f"output directory {str(path.parent)!r} does not exist: create it or change --out")


def progress_bars(args: argparse.Namespace) -> bool:
    """Whether long steps show progress bars: not under --quiet."""
    return getattr(args, "log_level", logging.INFO) <= logging.INFO
