"""Timing and size measurements shared by the quickstart report and the benchmark scripts."""

from __future__ import annotations

import os
import statistics
import time
from typing import Any, Callable

import torch
from torch import nn


@torch.inference_mode()
def median_latency_ms(fn: Callable[[], Any], warmup: int = 3, repeats: int = 20) -> float:
    """Median wall time of `fn()` in milliseconds (CUDA-synchronised when a GPU is in use)."""
    cuda = torch.cuda.is_available() and torch.cuda.is_initialized()
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        if cuda:
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            torch.cuda.synchronize()
            times.append(start.elapsed_time(end))
        else:
            start_time = time.perf_counter()
            fn()
            times.append((time.perf_counter() - start_time) * 1e3)
    return statistics.median(times)


def parameter_count(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def weights_size_mb(directory: str) -> float:
    """Size on disk of the weight files (*.safetensors) in a saved model directory."""
    total = sum(os.path.getsize(os.path.join(directory, f)) for f in os.listdir(directory) if f.endswith(".safetensors"))
    return total / 2**20
