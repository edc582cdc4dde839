"""A decoder layer's projections at decode shapes: cuBLAS (`F.linear`) against `skinny_linear`'s kernel.

    python benchmarks/bench_linear.py --out DIR                 # H200: every model's projections, rows 1..64
    python benchmarks/bench_linear.py --tune --out DIR          # and a launch-parameter search per case
    python benchmarks/bench_linear.py --smoke                   # CPU: checks the script and the kernel only

A lean layer makes four projections (qkv, o, gate+up, down). At decode shapes (rows = batch x tokens per
row: 1 for plain decoding, 17 for a (4, 4, 16) tree's verification, a drafter level's frontier) each moves
1-5 MB of weight (small models) and should take about its bytes / bandwidth. Each case is timed as CUDA-graph
replays over enough weight copies to exceed the L2 cache (in a real step the 18-30 layers' weights do not
fit it either), so launch gaps count as they do in a step:

    cublas   F.linear (what the lean layers called until 2026-12-01, and still call off the kernel's shapes)
    kernel   microspec.kernels.skinny_linear_triton with `default_config`
    tuned    the best of a small launch-parameter grid (--tune: elementwise products at every row count,
             tensor-core tiles from 2 rows), with its parameters

`floor` is the weight's bytes / the measured copy bandwidth (the activations are a few KB). Per model, the
table ends with the sum over the four projections times the layer count: what one step's projections cost.
"""
from __future__ import annotations

import argparse
import itertools
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from benchmarks.common import copies_beyond_l2, copy_bandwidth, environment, save, time_us_rotating  # noqa: E402
from microspec.kernels.skinny_linear import skinny_linear_ref, skinny_linear_triton  # noqa: E402

# model: (layers, {projection: (N, K, bias)}) of the lean fused blocks
MODELS = {
    "gemma3-270m": (18, {"qkv": (1536, 640, False), "o": (640, 1024, False), "gate_up": (4096, 640, False),
                         "down": (640, 2048, False)}),
    "smollm2-135m": (30, {"qkv": (960, 576, False), "o": (576, 576, False), "gate_up": (3072, 576, False),
                          "down": (576, 1536, False)}),
    "qwen2.5-1.5b": (28, {"qkv": (2048, 1536, True), "o": (1536, 1536, False),
                          "gate_up": (17920, 1536, False), "down": (1536, 8960, False)}),
}
ROWS = (1, 4, 8, 17, 32, 64)
ELEMENTWISE_GRID = [dict(dot=False, block_n=n, block_k=k, num_warps=4, num_stages=s)
                    for n, k, s in itertools.product((1, 2, 4), (256, 512, 1024), (3, 4))]
DOT_GRID = [dict(dot=True, block_n=n, block_k=k, num_warps=4, num_stages=s)
            for n, k, s in itertools.product((16, 32), (256, 512, 1024), (2, 3))]


def measure(M: int, N: int, K: int, bias: bool, dev, dtype, bandwidth: float, tune: bool) -> dict:
    nbytes = N * K * dtype.itemsize
    copies = copies_beyond_l2(nbytes) if dev.type == "cuda" else 2
    g = torch.Generator().manual_seed(M * 7 + N)
    weights = [(torch.randn(N, K, generator=g) / K ** 0.5).to(dev, dtype) for _ in range(copies)]
    b = torch.randn(N, generator=g).to(dev, dtype) if bias else None
    x = torch.randn(M, K, generator=g).to(dev, dtype)

    def rotating(fn) -> float:
        return time_us_rotating([lambda w=w: fn(x, w, b) for w in weights], calls=len(weights), reps=20)

    want = skinny_linear_ref(x, weights[0], b).float()
    got = skinny_linear_triton(x, weights[0], b).float()
    row = dict(rows=M, N=N, K=K, bias=bias, bytes=nbytes, floor_us=nbytes / bandwidth * 1e6,
               max_rel_err=float(((got - want).abs() / want.abs().clamp_min(1e-2)).max()))
    row["cublas_us"] = rotating(F.linear)
    row["kernel_us"] = rotating(skinny_linear_triton)
    if tune:
        best = None
        for cfg in ELEMENTWISE_GRID + (DOT_GRID if M > 1 else []):
            try:
                us = rotating(lambda x, w, b, cfg=cfg: skinny_linear_triton(x, w, b, **cfg))
            except Exception as e:                  # e.g. a tile beyond shared memory: skipped, reported
                print(f"  config {cfg} failed: {type(e).__name__}", file=sys.stderr)
                continue
            if best is None or us < best[0]:
                best = (us, cfg)
        row["tuned_us"], row["tuned_config"] = best
    return row


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--models", nargs="+", default=list(MODELS), choices=list(MODELS))
    ap.add_argument("--rows", type=int, nargs="+", default=list(ROWS))
    ap.add_argument("--tune", action="store_true", help="search launch parameters per case")
    ap.add_argument("--smoke", action="store_true", help="CPU, one small case: checks the script only")
    ap.add_argument("--out", type=Path, default=None)
    args = ap.parse_args(argv)
    if args.smoke:
        dev, dtype, bandwidth = torch.device("cpu"), torch.float32, 1e11
        models = {"smoke": (2, {"qkv": (24, 40, True), "down": (16, 72, False)})}
        args.rows = [1, 5]
    elif not torch.cuda.is_available():
        print("bench_linear needs CUDA (or --smoke)", file=sys.stderr)
        return 1
    else:
        dev, dtype, bandwidth = torch.device("cuda"), torch.bfloat16, copy_bandwidth()
        models = {m: MODELS[m] for m in args.models}
    results = []
    cols = ("floor_us", "cublas_us", "kernel_us") + (("tuned_us",) if args.tune else ())
    with torch.inference_mode():
        for model, (layers, projections) in models.items():
            print(f"\n{model} ({layers} layers)   " + " ".join(f"{c[:-3]:>8}" for c in cols) + "  (µs)")
            for M in args.rows:
                total = dict.fromkeys(cols, 0.0)
                for proj, (N, K, bias) in projections.items():
                    r = measure(M, N, K, bias, dev, dtype, bandwidth, args.tune)
                    r = dict(model=model, proj=proj, **r)
                    results.append(r)
                    for c in cols:
                        total[c] += r[c] * layers
                    print(f"  rows {M:3d} {proj:8s} {N:5d}x{K:<5d} " + " ".join(f"{r[c]:8.1f}" for c in cols)
                          + (f"  {r['tuned_config']}" if args.tune else "")
                          + (f"  REL ERR {r['max_rel_err']:.1e}" if r["max_rel_err"] > 2e-2 else ""))
                print(f"  rows {M:3d} step ({layers} layers) " + " ".join(f"{total[c]:8.0f}" for c in cols))
    if not args.smoke:
        payload = dict(env=environment(), command=" ".join(sys.argv), copy_bandwidth_Bps=bandwidth,
                       rows=results)
        print(f"wrote {save('linear', payload, args.out)}")
    return 0 if all(r["max_rel_err"] <= 2e-2 for r in results) else 1


if __name__ == "__main__":
    sys.exit(main())
