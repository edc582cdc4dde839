"""Decode-shaped attention over a static KV cache: which implementation a lean layer should call.

A lean layer attends the folded queries of one KV group (G*T rows, `microspec.models.lean.layers.attend`) over
the whole static cache of S slots with an additive mask. With batch 1 and few KV heads that is one or a few
(batch, KV head) pairs: kernels that give each pair one thread block (cuDNN's and the memory-efficient SDPA
kernels) run on one or three of the H200's 132 SMs and take time proportional to S. Each variant is compiled
with Inductor (as the layers are) and timed inside a CUDA graph, `LAYERS` calls over different caches per
replay (`benchmarks.common.time_us_rotating`: per call, median of 20 replays; the committed 2026-12-01 table
used the mean), so launch gaps count as they do in a decode step:

    sdpa        F.scaled_dot_product_attention (default backend choice; cuDNN on the H200)
    sdpa-mem    the same, memory-efficient backend forced
    math        explicit: fp32 scores = q k^T * scale + mask, softmax, p v (Inductor: two GEMMs + a fused
                softmax, spread over many thread blocks)
    lean        what the lean layers call (`microspec.models.lean.layers.attend`): as math, scores in the
                model dtype (transformers' eager attention), float32 softmax
    flex        FlexAttention with the mask as a score_mod (its decoding kernel splits the keys)

    python benchmarks/bench_attention.py --out DIR          # H200
    python benchmarks/bench_attention.py --smoke            # CPU: checks every variant against sdpa
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from benchmarks.common import environment, save, time_us_rotating  # noqa: E402

LAYERS = 18
GEOMETRY = {"gemma3-270m": (4, 1, 256), "smollm2-135m": (9, 3, 64), "qwen2.5-1.5b": (12, 2, 128)}


def sdpa(qf, k, v, mask, scale):
    return F.scaled_dot_product_attention(qf, k, v, attn_mask=mask, scale=scale)


def sdpa_mem(qf, k, v, mask, scale):
    from torch.nn.attention import SDPBackend, sdpa_kernel
    with sdpa_kernel([SDPBackend.EFFICIENT_ATTENTION]):
        return F.scaled_dot_product_attention(qf, k, v, attn_mask=mask, scale=scale)


def math(qf, k, v, mask, scale):
    s = torch.matmul(qf.float(), k.float().transpose(-1, -2)) * scale + mask
    return torch.matmul(torch.softmax(s, dim=-1).to(v.dtype), v)


def lean(qf, k, v, mask, scale):
    from microspec.models.lean.layers import attend
    B, Hkv, GT, Dh = qf.shape          # one query head per KV head (G = 1): attend's own folding is a no-op
    q = qf.transpose(1, 2)                                                      # [B, T, Hq, Dh]
    return attend(q, k, v, mask, scale).view(B, GT, Hkv, Dh).transpose(1, 2)


def flex(qf, k, v, mask, scale):
    from torch.nn.attention.flex_attention import flex_attention

    def add_mask(score, b, h, q_idx, kv_idx):
        return score + mask[b, 0, q_idx, kv_idx]
    return flex_attention(qf, k, v, score_mod=add_mask, scale=scale)


VARIANTS = {"sdpa": sdpa, "sdpa-mem": sdpa_mem, "math": math, "flex": flex, "lean": lean}


def inputs(B, T, geometry, S, device, dtype, layers):
    Hq, Hkv, Dh = geometry
    G = Hq // Hkv
    qf = torch.randn(B, Hkv, G * T, Dh, device=device, dtype=dtype)
    caches = [(torch.randn(B, Hkv, S, Dh, device=device, dtype=dtype),
               torch.randn(B, Hkv, S, Dh, device=device, dtype=dtype)) for _ in range(layers)]
    visible = torch.arange(S, device=device) < S - 64                      # the tail: not written yet
    mask = torch.zeros(B, 1, G * T, S, device=device, dtype=dtype).masked_fill_(~visible, float("-inf"))
    return qf, caches, mask, Dh ** -0.5


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--smoke", action="store_true")
    p.add_argument("--variants", nargs="+", default=list(VARIANTS))
    p.add_argument("--out", type=Path, default=None)
    args = p.parse_args(argv)
    device, dtype = ("cpu", torch.float32) if args.smoke else ("cuda", torch.bfloat16)
    cases = ([(1, 1, "gemma3-270m", 128), (1, 5, "smollm2-135m", 96)] if args.smoke else
             [(1, 1, "gemma3-270m", 1344), (1, 17, "gemma3-270m", 1344), (1, 61, "gemma3-270m", 1344),
              (8, 1, "gemma3-270m", 1344), (1, 1, "gemma3-270m", 4096), (1, 1, "smollm2-135m", 1344),
              (1, 61, "smollm2-135m", 1344), (1, 1, "qwen2.5-1.5b", 1344)])
    rows = []
    for B, T, g, S in cases:
        layers = 2 if args.smoke else LAYERS
        qf, caches, mask, scale = inputs(B, T, GEOMETRY[g], S, device, dtype, layers)
        ref = sdpa(qf, *caches[0], mask, scale).float()
        row = {"geometry": g, "B": B, "T": T, "S": S}
        for name in args.variants:
            fn = torch.compile(VARIANTS[name], dynamic=False, fullgraph=True,
                               backend="aot_eager" if args.smoke else "inductor")
            try:
                out = fn(qf, *caches[0], mask, scale).float()
                row[f"{name}_err"] = float((out - ref).abs().max())
                if not args.smoke:
                    every_layer = [lambda k=k, v=v: fn(qf, k, v, mask, scale) for k, v in caches]
                    row[f"{name}_us"] = time_us_rotating(every_layer, calls=len(every_layer), reps=20)
            except Exception as e:              # a variant a backend cannot run: reported, not fatal
                row[f"{name}_error"] = f"{type(e).__name__}: {str(e)[:120]}"
        rows.append(row)
        cells = "  ".join(f"{n} FAILED" if f"{n}_error" in row else
                          f"{n} {row.get(f'{n}_us', float('nan')):7.1f} us (err {row.get(f'{n}_err'):.1e})"
                          for n in args.variants)
        print(f"{g:<13} B={B} T={T:<3} S={S:<5} {cells}", flush=True)
        if not args.smoke:
            save("attention", {"env": environment(), "command": " ".join(sys.argv), "layers": LAYERS,
                               "rows": rows}, args.out)
    errors = [r for r in rows for k in r if k.endswith("_error")]
    for r in errors:
        print({k: v for k, v in r.items() if k.endswith("_error")})
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
