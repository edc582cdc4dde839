"""LM-head latency: the dense head against every way of scoring only C active rows.

Providers (hidden [B, D] bf16, one token per row, as when drafting a chain):
  dense          h @ W.T over the whole vocabulary (cuBLAS GEMV)               reads V·D·2 bytes
  index_select   h @ W.index_select(0, ids).T (gathers every call)             reads 2·C·D·2, writes C·D·2
  pregathered    h @ rows.T with rows = W[ids] kept contiguous (cuBLAS)       reads C·D·2
  triton_gather  microspec fused gather-GEMV, rows read by index              reads C·D·2
  triton_packed  microspec GEMV over the repack buffer                        reads C·D·2
The floor of every sparse provider is C·D·2 bytes / measured copy bandwidth; the shared set (a static
policy) is used, so B rows read the same C rows once. Per-row sets read B·C·D·2 bytes: `--per-row`.

    python benchmarks/bench_lm_head.py                 # the issue's grid, table + JSON in benchmarks/results
    python benchmarks/bench_lm_head.py --quick         # the headline sizes only
    python benchmarks/bench_lm_head.py --tune          # search Triton launch configs at the headline sizes
"""
from __future__ import annotations

import argparse
import itertools
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from benchmarks.common import copy_bandwidth, environment, save, time_us  # noqa: E402
from microspec.kernels import packed_logits_triton, sparse_logits_triton  # noqa: E402

PROVIDERS = ("dense", "index_select", "pregathered", "triton_gather", "triton_packed")
GRID = dict(batch=(1, 4, 8), hidden=(896, 1536, 2048, 4096), capacity=(1024, 2048, 3072, 4096, 8192, 32768),
            vocab=(32000, 128256, 151936))
HEADLINE = dict(batch=(1, 8), hidden=(896, 2048, 4096), capacity=(1024, 2048, 3072, 4096, 32768),
                vocab=(128256,))


class Case:
    """Tensors of one size. The weight is freshly random (never zeros: they can run faster)."""

    def __init__(self, B, D, C, V, per_row=False, dtype=torch.bfloat16, device="cuda", seed=0):
        g = torch.Generator(device=device).manual_seed(seed)
        self.B, self.D, self.C, self.V, self.per_row = B, D, C, V, per_row
        self.weight = torch.randn(V, D, generator=g, device=device, dtype=dtype)
        self.hidden = torch.randn(B, 1, D, generator=g, device=device, dtype=dtype)
        R = B if per_row else 1
        self.ids = torch.stack([torch.randperm(V, generator=g, device=device)[:C] for _ in range(R)])
        self.n = torch.full((R,), C, device=device)
        self.rows = self.weight[self.ids].contiguous()                               # [R, C, D]
        self.flat_ids = self.ids[0]

    def provider(self, name, **cfg):
        h, W = self.hidden, self.weight
        if name == "dense":
            return lambda: torch.matmul(h, W.T)
        if name == "index_select":
            return lambda: torch.matmul(h, W.index_select(0, self.flat_ids).T)
        if name == "pregathered":
            rows = self.rows[0]
            return lambda: torch.matmul(h, rows.T)
        if name == "triton_gather":
            return lambda: sparse_logits_triton(h, W, self.ids, self.n, **cfg)
        if name == "triton_packed":
            return lambda: packed_logits_triton(h, self.rows, self.n, **cfg)
        raise ValueError(name)

    def bytes_moved(self, name) -> int:
        rows = (self.B if self.per_row else 1) * self.C * self.D * 2
        if name == "dense":
            return self.V * self.D * 2
        if name == "index_select":
            return 3 * rows
        return rows

    def floor_bytes(self) -> int:
        return (self.B if self.per_row else 1) * self.C * self.D * 2


def check(case: Case) -> None:
    """Every provider computes the same logits on the live slots (bf16 tolerance) before it is timed."""
    ref = (case.hidden.float() @ case.weight[case.flat_ids].float().T).squeeze(1)        # [B, C]
    for name in PROVIDERS[1:]:
        out = case.provider(name)().float().reshape(case.B, -1)
        err = (out - ref).norm() / ref.norm()
        assert err < 1e-2, f"{name}: relative error {err:.2e} at B={case.B} D={case.D} C={case.C}"


def run_grid(grid: dict, per_row: bool, bandwidth: float) -> list[dict]:
    rows, dense_cache = [], {}
    for B, D, C, V in itertools.product(grid["batch"], grid["hidden"], grid["capacity"], grid["vocab"]):
        if C > V:
            continue
        case = Case(B, D, C, V, per_row)
        check(case)
        floor_us = case.floor_bytes() / bandwidth * 1e6
        for name in PROVIDERS:
            if name == "dense" and (B, D, V) in dense_cache:
                us = dense_cache[(B, D, V)]
            else:
                us = time_us(case.provider(name))
                if name == "dense":
                    dense_cache[(B, D, V)] = us
            rows.append(dict(provider=name, batch=B, hidden=D, capacity=C, vocab=V, per_row=per_row, us=us,
                             bytes=case.bytes_moved(name), floor_us=floor_us,
                             gbps=case.bytes_moved(name) / us * 1e-3, x_floor=us / floor_us))
        del case
    return rows


def tune(bandwidth: float) -> list[dict]:
    """Time Triton launch configs at the headline sizes; print the best per size."""
    space = [dict(block_c=bc, block_d=bd, num_warps=w, num_stages=s)
             for bc, bd, w, s in itertools.product((4, 8, 16, 32), (128, 256, 512), (4, 8), (2, 3, 4))]
    results = []
    for B, D, C in itertools.product((1, 8), (2048, 4096), (3072, 32768)):
        case = Case(B, D, C, 128256)
        floor_us = case.floor_bytes() / bandwidth * 1e6
        for name in ("triton_gather", "triton_packed"):
            timed = []
            for cfg in space:
                try:
                    timed.append((time_us(case.provider(name, **cfg), rep_ms=50), cfg))
                except Exception as err:  # noqa: BLE001 - a config may not compile (resources)
                    print(f"skip {cfg}: {type(err).__name__}", file=sys.stderr)
            best_us, best = min(timed, key=lambda x: x[0])
            default_us = time_us(case.provider(name))
            results.append(dict(provider=name, batch=B, hidden=D, capacity=C, best_us=best_us, best=best,
                                default_us=default_us, floor_us=floor_us))
            print(f"{name:14s} B={B} D={D:5d} C={C:6d}  best {best_us:7.1f} us {best}  default "
                  f"{default_us:7.1f} us  floor {floor_us:6.1f} us", flush=True)
    return results


def table(rows: list[dict]) -> str:
    lines = [f"{'B':>2} {'D':>5} {'C':>6} {'V':>6} | " + " ".join(f"{p:>14s}" for p in PROVIDERS)
             + " | floor   best/floor  dense/best"]
    keyed = {}
    for r in rows:
        keyed.setdefault((r["batch"], r["hidden"], r["capacity"], r["vocab"]), {})[r["provider"]] = r
    for (B, D, C, V), by in keyed.items():
        best = min(by[p]["us"] for p in ("triton_gather", "triton_packed"))
        lines.append(f"{B:>2} {D:>5} {C:>6} {V:>6} | " + " ".join(f"{by[p]['us']:>11.1f} us" for p in PROVIDERS)
                     + f" | {by['dense']['floor_us']:5.1f}   {best / by['dense']['floor_us']:6.2f}x"
                     f"   {by['dense']['us'] / best:7.1f}x")
    return "\n".join(lines)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="headline sizes only")
    ap.add_argument("--tune", action="store_true", help="search Triton launch configs")
    ap.add_argument("--per-row", action="store_true", help="one active set per batch row")
    ap.add_argument("--out", type=Path, default=None, help="results folder (default benchmarks/results)")
    args = ap.parse_args(argv)
    if not torch.cuda.is_available():
        print("bench_lm_head needs a CUDA device", file=sys.stderr)
        return 1
    bw = copy_bandwidth()
    print(f"device copy bandwidth: {bw / 1e12:.2f} TB/s (read + write)", flush=True)
    env = environment()
    if args.tune:
        path = save("lm_head_tune", dict(env=env, copy_bandwidth=bw, results=tune(bw)), args.out)
    else:
        rows = run_grid(HEADLINE if args.quick else GRID, args.per_row, bw)
        print(table(rows))
        path = save("lm_head", dict(env=env, copy_bandwidth=bw, command=" ".join(sys.argv), rows=rows), args.out)
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
