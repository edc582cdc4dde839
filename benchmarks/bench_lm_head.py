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
from benchmarks.common import copies_beyond_l2, copy_bandwidth, environment, save, time_us, time_us_rotating
from microspec.cli.progress import echo, progress_bar
from microspec.kernels import packed_logits_triton, sparse_logits_triton

PROVIDERS = ("dense", "index_select", "pregathered", "triton_gather", "triton_packed")
GRID = dict(batch=(1, 4, 8), hidden=(896, 1536, 2048, 4096), capacity=(1024, 2048, 3072, 4096, 8192, 32768),
            vocab=(32000, 128256, 151936))
HEADLINE = dict(batch=(1, 8), hidden=(896, 2048, 4096), capacity=(1024, 2048, 3072, 4096, 32768),
                vocab=(128256,))


class Case:
    """Tensors of one size. The weight is freshly random (never zeros: they can run faster). `copies`
    distinct active sets (and repack buffers) let graph timing rotate past the L2 cache."""

    def __init__(self, B, D, C, V, per_row=False, dtype=torch.bfloat16, device="cuda", seed=0, copies=1):
        g = torch.Generator(device=device).manual_seed(seed)
        self.B, self.D, self.C, self.V, self.per_row = B, D, C, V, per_row
        self.weight = torch.randn(V, D, generator=g, device=device, dtype=dtype)
        self.hidden = torch.randn(B, 1, D, generator=g, device=device, dtype=dtype)
        R = B if per_row else 1
        self.n = torch.full((R,), C, device=device)
        self.ids = [torch.stack([torch.randperm(V, generator=g, device=device)[:C] for _ in range(R)])
                    for _ in range(copies)]
        self.rows = [self.weight[ids].contiguous() for ids in self.ids]                  # [R, C, D] each

    def providers(self, name, **cfg) -> list:
        """One callable per input copy."""
        h, W = self.hidden, self.weight
        if name == "dense":
            return [lambda: torch.matmul(h, W.T)]
        if name == "index_select":
            return [lambda i=i: torch.matmul(h, W.index_select(0, i[0]).T) for i in self.ids]
        if name == "pregathered":
            return [lambda r=r: torch.matmul(h, r[0].T) for r in self.rows]
        if name == "triton_gather":
            return [lambda i=i: sparse_logits_triton(h, W, i, self.n, validate=False, **cfg)
                    for i in self.ids]
        if name == "triton_packed":
            return [lambda r=r: packed_logits_triton(h, r, self.n, validate=False, **cfg) for r in self.rows]
        raise ValueError(name)

    def provider(self, name, **cfg):
        return self.providers(name, **cfg)[0]

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
    ref = (case.hidden.float() @ case.weight[case.ids[0][0]].float().T).squeeze(1)       # [B, C]
    for name in PROVIDERS[1:]:
        out = case.provider(name)().float().reshape(case.B, -1)
        err = (out - ref).norm() / ref.norm()
        assert err < 1e-2, f"{name}: relative error {err:.2e} at B={case.B} D={case.D} C={case.C}"


def run_grid(grid: dict, per_row: bool, bandwidth: float, quiet: bool = False) -> list[dict]:
    """Every provider at every size, timed twice: `us` = do_bench median (cold L2, one call with its launch),
    `graph_us` = per call in a CUDA graph rotating over input copies beyond L2 (as inside a captured step)."""
    rows, dense_cache = [], {}
    sizes = list(itertools.product(grid["batch"], grid["hidden"], grid["capacity"], grid["vocab"]))
    for B, D, C, V in progress_bar(quiet, sizes, unit="size", desc="lm head"):
        if C > V:
            continue
        floor_bytes = (B if per_row else 1) * C * D * 2
        case = Case(B, D, C, V, per_row, copies=copies_beyond_l2(floor_bytes, cap=16))
        check(case)
        floor_us = case.floor_bytes() / bandwidth * 1e6
        for name in PROVIDERS:
            if name == "dense" and (B, D, V) in dense_cache:
                us, graph_us = dense_cache[(B, D, V)]
            else:
                us = time_us(case.provider(name), rep_ms=100)
                graph_us = time_us_rotating(case.providers(name))
                if name == "dense":
                    dense_cache[(B, D, V)] = us, graph_us
            rows.append(dict(provider=name, batch=B, hidden=D, capacity=C, vocab=V, per_row=per_row, us=us,
                             graph_us=graph_us, bytes=case.bytes_moved(name), floor_us=floor_us,
                             gbps=case.bytes_moved(name) / graph_us * 1e-3, x_floor=graph_us / floor_us))
        del case
    return rows


def tune(bandwidth: float, quiet: bool = False) -> list[dict]:
    """Time Triton launch configs (graph replay, inputs beyond L2) at the headline sizes; print the best."""
    one_token = [dict(block_c=bc, block_d=bd, num_warps=w, num_stages=s)
                 for bc, bd, w, s in itertools.product((2, 4, 8), (256, 512, 1024), (4, 8), (2, 3, 4))]
    dot = [dict(block_c=bc, block_d=bd, num_warps=w, num_stages=s)
           for bc, bd, w, s in itertools.product((16, 32, 64), (64, 128, 256), (4, 8), (2, 3, 4))]
    results = []
    sizes = list(itertools.product((1, 8), (2048, 4096), (3072, 32768)))
    for B, D, C in progress_bar(quiet, sizes, desc="tune"):
        case = Case(B, D, C, 128256, copies=copies_beyond_l2(C * D * 2, cap=16))
        floor_us = case.floor_bytes() / bandwidth * 1e6
        for name in ("triton_gather", "triton_packed"):
            timed = []
            for cfg in (one_token if B == 1 else dot):
                try:
                    timed.append((time_us_rotating(case.providers(name, **cfg), calls=32, reps=5), cfg))
                except Exception as err:  # noqa: BLE001 - a config may not compile (resources)
                    print(f"skip {cfg}: {type(err).__name__}", file=sys.stderr)
            best_us, best = min(timed, key=lambda x: x[0])
            default_us = time_us_rotating(case.providers(name))
            results.append(dict(provider=name, batch=B, hidden=D, capacity=C, best_us=best_us, best=best,
                                default_us=default_us, floor_us=floor_us))
            echo(f"{name:14s} B={B} D={D:5d} C={C:6d}  best {best_us:7.1f} us {best}  default "
                 f"{default_us:7.1f} us  floor {floor_us:6.1f} us")
    return results


def table(rows: list[dict]) -> str:
    """Graph-replay microseconds per provider (do_bench in brackets for the two sparse Triton paths)."""
    lines = [f"{'B':>2} {'D':>5} {'C':>6} {'V':>6} | " + " ".join(f"{p:>13s}" for p in PROVIDERS)
             + " | floor  best/floor dense/best (graph replay, us)"]
    keyed = {}
    for r in rows:
        keyed.setdefault((r["batch"], r["hidden"], r["capacity"], r["vocab"]), {})[r["provider"]] = r
    for (B, D, C, V), by in keyed.items():
        best = min(by[p]["graph_us"] for p in ("triton_gather", "triton_packed"))
        floor = by["dense"]["floor_us"]
        cells = " ".join(f"{by[p]['graph_us']:>13.1f}" for p in PROVIDERS)
        lines.append(f"{B:>2} {D:>5} {C:>6} {V:>6} | " + cells
                     + f" | {floor:5.1f}  {best / floor:6.2f}x  {by['dense']['graph_us'] / best:7.1f}x")
    return "\n".join(lines)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="headline sizes only")
    ap.add_argument("--tune", action="store_true", help="search Triton launch configs")
    ap.add_argument("--per-row", action="store_true", help="one active set per batch row")
    ap.add_argument("--out", type=Path, default=None, help="results folder (default benchmarks/results)")
    ap.add_argument("-q", "--quiet", action="store_true",
                    help="no progress bar (off anyway when stderr is not a terminal)")
    args = ap.parse_args(argv)
    if not torch.cuda.is_available():
        print("bench_lm_head needs a CUDA device", file=sys.stderr)
        return 1
    bw = copy_bandwidth()
    print(f"device copy bandwidth: {bw / 1e12:.2f} TB/s (read + write)", flush=True)
    env = environment()
    if args.tune:
        path = save("lm_head_tune", dict(env=env, copy_bandwidth=bw, results=tune(bw, args.quiet)), args.out)
    else:
        rows = run_grid(HEADLINE if args.quick else GRID, args.per_row, bw, args.quiet)
        print(table(rows))
        path = save("lm_head", dict(env=env, copy_bandwidth=bw, command=" ".join(sys.argv), rows=rows),
                    args.out)
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
