"""`--calibration PATH`: the data that data-aware importance (wanda, taylor) runs, from a file.

A text file is tokenised as benchmarks/train_tiny_llama.py tokenises its corpus: every byte is a
token id (vocabulary 256), so a model trained that way sees its own tokens; the bytes are cut,
from the start, into consecutive batches shaped like the example input (N x T token ids). A
`.pt` file holds the batches themselves: a tensor (one batch) or a list of tensors or of tuples
of tensors, written with torch.save and read with weights_only=True (no code is unpickled).
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch
from torch import nn

from sparsefx.channels.calibration import MAX_BATCHES
from sparsefx.errors import SparsefxError, one_line

BYTE_VOCABULARY = 256
DATA_AWARE = ("wanda", "taylor")


def add_calibration_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--calibration", type=Path, default=None, metavar="PATH",
                        help="data for --importance wanda or taylor (default: the example input): a text file, whose "
                        "bytes are the token ids (vocabulary 256, as benchmarks/train_tiny_llama.py tokenises) cut "
                        "into batches shaped like the example input (--batch-size x --input-shape's length), or a "
                        ".pt file of a tensor or a list of input batches (torch.save)")
    parser.add_argument("--calibration-batches", type=int, default=8, metavar="N",
                        help=f"batches cut from a text --calibration file (default 8, at most {MAX_BATCHES})")


def read_calibration(args: argparse.Namespace, model: nn.Module, inputs: tuple) -> object | None:
    """The calibration data `args` name, or None without --calibration."""
    path = args.calibration
    if path is None:
        return None
    if args.importance not in DATA_AWARE:
        raise SparsefxError(f"--calibration feeds data-aware importance; add --importance {' or '.join(DATA_AWARE)} "
                            f"(--importance {args.importance} reads only the weights)")
    if not path.is_file():
        raise SparsefxError(f"--calibration {path}: no such file; pass a text file or a .pt file of input batches")
    if path.suffix == ".pt":
        try:
            return torch.load(path, weights_only=True, map_location="cpu")
        except Exception as error:  # not a torch.save file, or one holding objects weights_only refuses
            raise SparsefxError(f"--calibration {path} is not a torch.save file of tensors ({one_line(error)}); "
                                "save a tensor or a list of input batches") from None
    if not 1 <= args.calibration_batches <= MAX_BATCHES:
        raise SparsefxError(f"--calibration-batches must be 1..{MAX_BATCHES}, got {args.calibration_batches}")
    return text_batches(path.read_bytes(), inputs, model, args.calibration_batches, str(path))


def text_batches(text: bytes, inputs: tuple, model: nn.Module, count: int, name: str) -> list[torch.Tensor]:
    """Up to `count` consecutive (N, T) batches of byte token ids, N x T from the example input."""
    ids = inputs[0] if inputs else None
    if not isinstance(ids, torch.Tensor) or ids.is_floating_point() or ids.dim() != 2:
        raise SparsefxError(f"--calibration {name} is text, but the model takes "
                            f"{'no input' if ids is None else f'{ids.dtype} {tuple(ids.shape)}'}, not (N, T) token ids; "
                            "pass a .pt file of input batches")
    vocab = getattr(getattr(model, "config", None), "vocab_size", None)
    if isinstance(vocab, int) and vocab < BYTE_VOCABULARY:
        raise SparsefxError(f"--calibration {name} is text, read as byte tokens 0..255, but the model's vocabulary "
                            f"has {vocab} tokens; pass a .pt file of token ids")
    size = ids.numel()
    tokens = torch.frombuffer(bytearray(text), dtype=torch.uint8).to(ids.dtype) if text else ids.new_zeros(0)
    count = min(count, len(tokens) // size)
    if count == 0:
        raise SparsefxError(f"--calibration {name} holds {len(tokens)} bytes; one batch of {ids.shape[0]} x "
                            f"{ids.shape[1]} tokens needs {size}: use a longer file or a shorter --input-shape")
    return [tokens[i * size:(i + 1) * size].view_as(ids) for i in range(count)]
