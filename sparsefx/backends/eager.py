"""Eager-mode PyTorch latency: the baseline every other backend is compared with."""

from __future__ import annotations

import time
from collections.abc import Callable

import numpy as np
import torch
from torch import nn


def measure_latency(
    model: nn.Module | Callable[..., object],
    example_inputs: tuple[torch.Tensor, ...],
    warmup: int = 3,
    repeat: int = 20,
    min_time_s: float = 0.0,
) -> dict[str, float]:
    """Time forward passes; returns median/p10/p90 in milliseconds and the number of runs.

    Runs at least `repeat` times and keeps going until `min_time_s` has passed, so fast models
    get enough samples for a stable median. Thread settings are left alone on purpose: callers
    compare models under the same settings, whatever they are.
    """
    if isinstance(model, nn.Module):  # compiled models are plain callables
        model.eval()
    times_ms: list[float] = []
    with torch.inference_mode():
        for _ in range(warmup):
            model(*example_inputs)
        started = time.perf_counter()
        while len(times_ms) < repeat or time.perf_counter() - started < min_time_s:
            t0 = time.perf_counter()
            model(*example_inputs)
            times_ms.append((time.perf_counter() - t0) * 1e3)
    p10, median, p90 = np.percentile(times_ms, [10, 50, 90])
    return {"median_ms": float(median), "p10_ms": float(p10), "p90_ms": float(p90), "runs": len(times_ms)}


def measure_latencies(
    models: dict[str, nn.Module | Callable[..., object]], example_inputs: tuple[torch.Tensor, ...], repeat: int = 20, rounds: int = 5,
    warmup: int = 1,
) -> dict[str, float]:
    """Median latency in ms per model, measured in alternating rounds so that load from other
    processes (common on shared CPUs) hits every model alike instead of whichever ran during it.
    Each model's turn runs `warmup` untimed calls first: a runtime whose threads went to sleep while
    another one ran pays the wake-up there, not in its timed calls."""
    per_round: dict[str, list[float]] = {name: [] for name in models}
    for _ in range(rounds):
        for name, model in models.items():
            stats = measure_latency(model, example_inputs, warmup=warmup, repeat=max(1, repeat // rounds))
            per_round[name].append(stats["median_ms"])
    return {name: float(np.median(times)) for name, times in per_round.items()}
