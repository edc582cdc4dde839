"""pytest-benchmark: the LM-head providers of bench_lm_head.py at the headline sizes.

Each benchmark round replays a CUDA graph of `CALLS` calls rotating over input copies beyond L2 and
synchronises; extra_info gives the per-call time, GB/s and the share of the floor (C·D·2 B / copy BW)."""
import pytest
import torch

from benchmarks.bench_lm_head import PROVIDERS, Case
from benchmarks.common import copies_beyond_l2, copy_bandwidth

CUDA = torch.cuda.is_available()
SIZES = ([(1, 4096, 3072), (1, 4096, 2048), (1, 2048, 3072), (1, 896, 3072), (8, 4096, 3072)] if CUDA
         else [(2, 64, 40)])
VOCAB = 128256 if CUDA else 500
CALLS = 32


@pytest.fixture(scope="module")
def bandwidth():
    return copy_bandwidth() if CUDA else float("nan")


@pytest.mark.parametrize("size", SIZES, ids=[f"B{b}-D{d}-C{c}" for b, d, c in SIZES])
@pytest.mark.parametrize("provider", PROVIDERS)
def test_lm_head(benchmark, bandwidth, provider, size):
    if provider.startswith("triton") and not CUDA:
        pytest.skip("Triton providers are timed on CUDA (the CPU interpreter tests them for correctness)")
    B, D, C = size
    case = Case(B, D, C, VOCAB, device="cuda" if CUDA else "cpu",
                dtype=torch.bfloat16 if CUDA else torch.float32,
                copies=copies_beyond_l2(C * D * 2, cap=16) if CUDA else 1)
    fns = case.providers(provider)
    if CUDA:
        for fn in fns:
            fn()
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            for i in range(CALLS):
                fns[i % len(fns)]()

        def run():
            graph.replay()
            torch.cuda.synchronize()
        calls = CALLS
    else:
        run, calls = fns[0], 1
    benchmark.group = f"lm-head B={B} D={D} C={C}"
    benchmark.pedantic(run, rounds=20 if CUDA else 1, iterations=1, warmup_rounds=2 if CUDA else 0)
    if benchmark.stats is not None:                      # None under --benchmark-disable
        us = benchmark.stats.stats.median / calls * 1e6
        floor_us = case.floor_bytes() / bandwidth * 1e6
        benchmark.extra_info.update(us_per_call=us, bytes=case.bytes_moved(provider),
                                    gbps=case.bytes_moved(provider) / us * 1e-3,
                                    pct_of_floor=100 * floor_us / us)
