"""One way to time a piece of work: `timed(fn) -> (seconds, fn())`.

On a CUDA device the time is taken with CUDA events around the queued work (everything queued before is
finished first, the host waits at the end), so it measures the GPU, not the launch loop; elsewhere it is the
wall clock, which on a CPU says little about GPU speed and is labelled as such by the callers.
"""
from __future__ import annotations

import time
from collections.abc import Callable
from typing import TypeVar

import torch

T = TypeVar("T")


def timed(fn: Callable[[], T], cuda: bool | None = None) -> tuple[float, T]:
    """(seconds, fn()) with CUDA events when `cuda` (default: a CUDA device is available), else wall clock."""
    if cuda is None:
        cuda = torch.cuda.is_available()
    if not cuda:
        t0 = time.perf_counter()
        out = fn()
        return time.perf_counter() - t0, out
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    torch.cuda.synchronize()
    start.record()
    out = fn()
    end.record()
    end.synchronize()
    return start.elapsed_time(end) / 1e3, out
