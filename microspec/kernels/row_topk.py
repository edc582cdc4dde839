"""The ids of the k largest entries of each row of a wide tensor: the target's top-k over its vocabulary,
and each depth's top-k of a draft tree (`drafting/tree.py`).

    row_topk(x [..., V], k) -> int64 [..., k]: per row, the indices of the k largest values, largest first;
                               equal values in index order (smallest first); NaN counts as -inf

Why a kernel: in-context policies take the target's top-3 at every verification position, k tiny and V
262k wide. `torch.topk` over [17, 262144] bf16 logits takes 82 µs on the H200 (5 % of a Gemma-3-270M
step), ~20x the 4 µs its 9 MB read needs; this kernel takes 16 µs (365 -> 82 µs at batch 8; run 17,
`benchmarks/bench_policy_step.py`). It is two passes:

    1. grid (rows, V / CHUNK): each program keeps its chunk's top-k (k rounds of max, then the smallest
       index holding it) -> candidates [rows, chunks, k] (values float32, indices; index BIG = none)
    2. grid (rows,): the same k rounds over the row's chunks * k candidates -> [rows, k]

Exact because the order (value desc, index asc) restricted to a chunk is the same order, so each global
top-k entry is in its chunk's top-k. The selection never reads a NaN: NaN becomes -inf on load. A row
always yields k distinct in-range ids when V >= k (each chunk offers min(k, its width) real ids).

`row_topk_ref` is the pure-torch twin with the same tie rule (through the k-th largest value: the ids above
it, then the first ids equal to it), so the two agree id for id, ties included. `row_topk` is the
registered op (`microspec::row_topk`): Triton on CUDA for k <= MAX_K; elsewhere `torch.topk`, which
returns the same ids but may order tied values its own way (the twin takes ~15x longer on the CPU, where
the evaluation harness runs float32 targets whose logits rarely tie).
"""
from __future__ import annotations

import torch
from torch import Tensor

from ._triton import HAS_TRITON, next_pow2, tl, triton, triton_available_for

MAX_K = 16             # the kernel unrolls k rounds; a policy asks for 3 (MicroSpec) or 10, a tree its top_k
CHUNK = 4096           # ids per first-pass program: 64 chunks x 17 rows = 1,088 programs for a Gemma block
_NONE = 2**31 - 1      # "no candidate" index (a chunk narrower than k)


def check_args(x: Tensor, k: int) -> None:
    if not isinstance(k, int) or isinstance(k, bool) or k < 1:
        raise ValueError(f"k must be a positive int, got {k!r}")
    if x.dim() < 1 or not x.is_floating_point():
        raise TypeError(f"x must be a floating tensor [..., V], got {x.dtype} of shape {tuple(x.shape)}")
    if k > x.shape[-1]:
        raise ValueError(f"cannot take the top-{k} of rows of {x.shape[-1]} entries")


def row_topk_ref(x: Tensor, k: int) -> Tensor:
    """Pure-torch twin of the kernel: x [..., V] -> int64 [..., k] (largest first, ties by index)."""
    check_args(x, k)
    x = x.float() if x.dtype in (torch.bfloat16, torch.float16) else x
    x = x.nan_to_num(nan=float("-inf"), posinf=float("inf"), neginf=float("-inf"))
    V = x.shape[-1]
    kth = torch.topk(x, k, dim=-1).values[..., -1:]              # [..., 1]: the k-th largest value
    # Fewer than k ids lie above it; the rest of the k are the first ids equal to it. One top-k of int32
    # keys picks exactly those (above: 2V - id, equal: V - id, else 0), cheaper on the CPU than a cumsum.
    rev = V - torch.arange(V, dtype=torch.int32, device=x.device)
    key = torch.where(x > kth, rev + V, torch.where(x == kth, rev, 0))
    ids = torch.topk(key, k, dim=-1).indices.sort(-1).values                     # the k ids, in id order
    order = torch.sort(x.gather(-1, ids), dim=-1, descending=True, stable=True).indices
    return ids.gather(-1, order)


if HAS_TRITON:

    @triton.jit
    def _take_k(vals, ids, out_vals, out_ids, K: tl.constexpr, NONE: tl.constexpr):
        """k rounds over one block: the largest value not yet taken, the smallest id holding it."""
        taken = ids == NONE
        for j in tl.static_range(K):
            best = tl.max(tl.where(taken, float("-inf"), vals), axis=0)
            pick = tl.min(tl.where((~taken) & (vals == best), ids, NONE), axis=0)
            if out_vals is not None:
                tl.store(out_vals + j, best)
            tl.store(out_ids + j, pick)
            taken = taken | (ids == pick)

    @triton.jit
    def _chunk_topk_kernel(x_ptr, cand_vals, cand_ids, V, stride_x, n_chunks,
                           K: tl.constexpr, CHUNK_: tl.constexpr, NONE: tl.constexpr):
        r = tl.program_id(0).to(tl.int64)
        c = tl.program_id(1)
        ids = c * CHUNK_ + tl.arange(0, CHUNK_)
        inside = ids < V
        vals = tl.load(x_ptr + r * stride_x + ids, mask=inside, other=float("-inf")).to(tl.float32)
        vals = tl.where(vals != vals, float("-inf"), vals)                   # NaN -> -inf
        out = (r * n_chunks + c) * K
        _take_k(vals, tl.where(inside, ids, NONE), cand_vals + out, cand_ids + out, K, NONE)

    @triton.jit
    def _merge_topk_kernel(cand_vals, cand_ids, out_ptr, W, K: tl.constexpr, BLOCK_W: tl.constexpr,
                           NONE: tl.constexpr):
        r = tl.program_id(0).to(tl.int64)
        w = tl.arange(0, BLOCK_W)
        vals = tl.load(cand_vals + r * W + w, mask=w < W, other=float("-inf"))
        ids = tl.load(cand_ids + r * W + w, mask=w < W, other=NONE)
        _take_k(vals, ids, None, out_ptr + r * K, K, NONE)


def row_topk_triton(x: Tensor, k: int, chunk: int = CHUNK, num_warps: int = 4) -> Tensor:
    """Triton top-k; same contract as `row_topk_ref`. `chunk`: ids per first-pass program (a power of 2)."""
    check_args(x, k)
    if k > MAX_K:
        raise ValueError(f"row_topk_triton takes k <= {MAX_K}, got {k}")
    if x.dtype == torch.float64:
        raise TypeError("row_topk_triton compares in float32; float64 rows take row_topk_ref")
    if chunk < 1 or chunk & (chunk - 1):
        raise ValueError(f"chunk must be a power of 2, got {chunk}")
    lead, V = x.shape[:-1], x.shape[-1]
    rows = x.reshape(-1, V)                          # a view for a sliced vocabulary [..., :V] of logits
    if rows.stride(-1) != 1:
        rows = rows.contiguous()
    R, n_chunks = rows.shape[0], triton.cdiv(V, chunk)
    cand_vals = torch.empty((R, n_chunks * k), dtype=torch.float32, device=x.device)
    cand_ids = torch.empty((R, n_chunks * k), dtype=torch.int32, device=x.device)
    out = torch.empty((R, k), dtype=torch.int32, device=x.device)
    if R:
        _chunk_topk_kernel[(R, n_chunks)](rows, cand_vals, cand_ids, V, rows.stride(0), n_chunks,
                                          K=k, CHUNK_=chunk, NONE=_NONE, num_warps=num_warps)
        _merge_topk_kernel[(R,)](cand_vals, cand_ids, out, n_chunks * k, K=k,
                                 BLOCK_W=next_pow2(n_chunks * k), NONE=_NONE, num_warps=num_warps)
    return out.long().view(*lead, k)


@torch.library.custom_op("microspec::row_topk", mutates_args=())
def row_topk(x: Tensor, k: int) -> Tensor:
    """Top-k ids per row, largest first: Triton on CUDA for k <= MAX_K (ties by index), else `torch.topk`."""
    check_args(x, k)
    if triton_available_for(x) and k <= MAX_K and x.dtype != torch.float64:
        return row_topk_triton(x, k)
    return torch.topk(x, k, dim=-1).indices


@row_topk.register_fake
def _(x, k):
    return x.new_empty((*x.shape[:-1], k), dtype=torch.long)
