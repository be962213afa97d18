"""Timing one call: CUDA events after a synchronize on a GPU, perf_counter elsewhere."""

from __future__ import annotations

import time
from collections.abc import Callable

import torch


def time_call_ms(fn: Callable[[], object], device: torch.device | str) -> float:
    """Milliseconds of ``fn()``; on CUDA the device is idle before and after, and events time it."""
    device = torch.device(device)
    if device.type == "cuda":
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        torch.cuda.synchronize(device)
        start.record()
        fn()
        end.record()
        torch.cuda.synchronize(device)
        return start.elapsed_time(end)
    t0 = time.perf_counter()
    fn()
    return (time.perf_counter() - t0) * 1e3
