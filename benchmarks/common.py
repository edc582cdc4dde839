"""Timing helpers shared by the benchmarks: honest GPU timing and the physical floor.

* `time_us(fn)`: median microseconds of `fn`. On CUDA, `triton.testing.do_bench` (CUDA events around each
  repetition, L2 flushed between repetitions, so weights never come from cache) or, with `graph=True`, the
  mean of many replays of a CUDA graph holding `fn` N times (no launch gaps: the steady state of a captured
  decode step). On CPU, a plain wall-clock median (only for smoke tests: CPU numbers mean nothing here).
* `time_us_rotating(fns)`: per-call microseconds of a CUDA graph that calls `fns[0], fns[1], ...` round
  robin, back to back: the steady state inside a captured decode step. Give enough copies of the inputs that
  their footprint exceeds the L2 cache (`copies_beyond_l2`), so no call finds its data in cache.
* `copy_bandwidth()`: measured device-to-device copy bandwidth in bytes/s (read + write), the ceiling that
  every memory-bound kernel is compared with.
"""
from __future__ import annotations

import datetime
import json
import platform
import statistics
import time
from pathlib import Path

import torch

RESULTS = Path(__file__).parent / "results"


def time_us(fn, *, graph: bool = False, reps: int = 100, warmup_ms: int = 25, rep_ms: int = 200) -> float:
    if not torch.cuda.is_available():
        fn()
        samples = []
        for _ in range(max(3, min(reps, 10))):
            t0 = time.perf_counter()
            fn()
            samples.append(time.perf_counter() - t0)
        return statistics.median(samples) * 1e6
    if not graph:
        import triton.testing
        return triton.testing.do_bench(fn, warmup=warmup_ms, rep=rep_ms, return_mode="median") * 1e3
    return time_us_rotating([fn], calls=20, reps=max(5, reps // 20))


def copies_beyond_l2(nbytes: int, cap: int = 64) -> int:
    """How many copies of an input of `nbytes` make a round robin whose footprint is twice the L2 cache."""
    l2 = torch.cuda.get_device_properties(0).L2_cache_size if torch.cuda.is_available() else 50 << 20
    return max(2, min(cap, -(-2 * l2 // max(nbytes, 1)) + 1))


def time_us_rotating(fns, calls: int = 64, reps: int = 20) -> float:
    if not torch.cuda.is_available():
        return time_us(fns[0])
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):                       # warm-up (compilation, autotuning) off the capture
        for _ in range(3):
            for fn in fns:
                fn()
    torch.cuda.current_stream().wait_stream(side)
    calls = max(calls, len(fns))
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        for i in range(calls):
            fns[i % len(fns)]()
    g.replay()
    torch.cuda.synchronize()
    times = []
    for _ in range(reps):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        g.replay()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) * 1e3 / calls)
    del g
    return statistics.median(times)


def copy_bandwidth(nbytes: int = 1 << 30) -> float:
    """Bytes per second of a large device-to-device copy, counting bytes read plus bytes written."""
    if not torch.cuda.is_available():
        return float("nan")
    src = torch.randn(nbytes // 4, device="cuda")
    dst = torch.empty_like(src)
    us = time_us(lambda: dst.copy_(src))
    return 2 * nbytes / (us * 1e-6)


def environment() -> dict:
    """Device, software versions and date, stored with every result file."""
    import transformers
    env = {"date": datetime.date.today().isoformat(), "torch": torch.__version__,
           "transformers": transformers.__version__, "python": platform.python_version(),
           "device": (torch.cuda.get_device_name() if torch.cuda.is_available()
                      else platform.processor() or "cpu")}
    try:
        import triton
        env["triton"] = triton.__version__
    except ImportError:
        env["triton"] = None
    if torch.cuda.is_available():
        props = torch.cuda.get_device_properties(0)
        env.update(sm_count=props.multi_processor_count, memory_gb=round(props.total_memory / 2**30, 1),
                   l2_mb=round(getattr(props, "L2_cache_size", 0) / 2**20, 1))
    return env


def run_stamp() -> str:
    return datetime.datetime.now().strftime("%Y-%m-%d_%H%M%S")


def save(name: str, payload: dict, out_dir: Path | None = None, stamp: str | None = None) -> Path:
    """Write one JSON result file per run: benchmarks/results/<name>_<date>_<time>.json (`stamp`, from
    `run_stamp()`, rewrites the same file: a run that saves after every row keeps what it measured when
    a time limit stops it)."""
    out_dir = out_dir or RESULTS
    out_dir.mkdir(parents=True, exist_ok=True)
    stamp = stamp or run_stamp()
    path = out_dir / f"{name}_{stamp}.json"
    path.write_text(json.dumps(payload, indent=1))
    return path
