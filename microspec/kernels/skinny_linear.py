"""y = x W^T + b for a few rows of x: a decoder layer's projections at decode shapes.

    skinny_linear(x [..., K], weight [N, K], bias [N] | None) -> [..., N]
        in x's dtype; float32 accumulation, the bias added before the one rounding

Why a kernel: a small model's batch-1 decode step multiplies one row by weights of 1-5 MB (Gemma-3-270M:
qkv 1536 x 640, o 640 x 1024, gate+up 4096 x 640, down 640 x 2048). Moving such a weight takes 0.3-1.2 µs
at the H200's copy bandwidth; cuBLAS took 4.2-6.3 µs per call in a CUDA graph (its kernels' names give
tiles 64 wide in N: a 640-wide output on 10 of the 132 SMs, each streaming a long K). This kernel gives
each program two rows of the weight and all of K, so every projection spreads over 300-2,000 programs:
2.2-4.0 µs, a Gemma step's projections 350 -> ~206 µs (`benchmarks/bench_linear.py`, run 18). Two paths:

    elementwise (<= 8 rows):  each program accumulates x * w over [rows, block_n, block_k] tiles in float32
                              and reduces once at the end (no tensor cores: a GEMV has nothing to reuse)
    tensor cores (more rows): each program holds the rows, padded to a power of two >= 16 (tl.dot's
                              minimum), and runs dots over [rows, block_k] x [block_k, block_n] tiles

`skinny_linear_ref` is the pure-torch twin (float32 product, bias, one rounding). `skinny_linear` is the
registered op (`microspec::skinny_linear`): Triton for half-precision CUDA inputs of at most `MAX_ROWS` rows,
`F.linear` otherwise (float32 and float64 runs, CPUs, prefill chunks). The two differ by float32 summation
order, so by at most one rounding step of the output dtype.
"""
from __future__ import annotations

import os

import torch
import torch.nn.functional as F
from torch import Tensor

from ._triton import HAS_TRITON, INTERPRETER, next_pow2, tl, triton, triton_available_for

# Rows (product of x's leading dims) up to which `skinny_linear` runs the kernel. One: a batch-1 decode step
# and a batch-1 chain drafter. At 1 row the kernel took 0.46-0.87x cuBLAS's time on every Gemma-3-270M and
# SmolLM2 projection (H200, run 18); at 4 rows 0.8-1.0x when tuned, and from 8 rows (tree verification, the
# drafter's tree levels, batch 8) no configuration beat cuBLAS by more than noise.
# MICROSPEC_SKINNY_ROWS=0 turns the kernel off (F.linear everywhere), for A/B runs; read once, at import.
MAX_ROWS = int(os.environ.get("MICROSPEC_SKINNY_ROWS", "1"))
HALF = (torch.bfloat16, torch.float16)
# Past this many weight entries cuBLAS has enough tiles to spread: Qwen2.5-1.5B's gate+up (17920 x 1536)
# took 19.0 µs with cuBLAS and 22.9 with the kernel, its down (1536 x 8960) 12.7 and 12.4 (run 18).
MAX_WEIGHT_ENTRIES = 1 << 23
MAX_TILE_ROWS = 64         # rows per tensor-core program; more rows (past MAX_ROWS) take more programs
ELEMENTWISE_MAX_ROWS = 8   # rows per elementwise program (its float32 accumulator grows with them)


def check_args(x: Tensor, weight: Tensor, bias: Tensor | None) -> None:
    """Raise a clear error for inputs no linear layer takes (host metadata only, no sync)."""
    if x.dim() < 1 or weight.dim() != 2:
        raise ValueError(f"x [..., K] and weight [N, K] expected, got {tuple(x.shape)} and "
                         f"{tuple(weight.shape)}")
    if x.shape[-1] != weight.shape[1]:
        raise ValueError(f"x has {x.shape[-1]} features but weight takes {weight.shape[1]}")
    if bias is not None and tuple(bias.shape) != (weight.shape[0],):
        raise ValueError(f"bias of shape {tuple(bias.shape)} for a weight of {weight.shape[0]} outputs")
    if x.dtype != weight.dtype or (bias is not None and bias.dtype != x.dtype):
        raise TypeError(f"x, weight and bias must share a dtype, got {x.dtype}, {weight.dtype}"
                        f"{'' if bias is None else ', ' + str(bias.dtype)}")
    if x.device != weight.device or (bias is not None and bias.device != x.device):
        raise ValueError("x, weight and bias must be on one device")


def skinny_linear_ref(x: Tensor, weight: Tensor, bias: Tensor | None = None) -> Tensor:
    """Pure-torch twin: the product and the bias in float32 (float64 stays), one rounding to x's dtype."""
    check_args(x, weight, bias)
    f = torch.promote_types(x.dtype, torch.float32)
    y = torch.matmul(x.to(f), weight.to(f).t())
    if bias is not None:
        y = y + bias.to(f)
    return y.to(x.dtype)


if HAS_TRITON:

    @triton.jit
    def _skinny_linear_kernel(x_ptr, w_ptr, b_ptr, y_ptr, M, N, K, stride_xm, stride_wn, stride_ym,
                              HAS_BIAS: tl.constexpr, DOT: tl.constexpr, ROWS: tl.constexpr,
                              BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, PRECISION: tl.constexpr,
                              DOT_IN_F32: tl.constexpr):
        # Program (n, m): outputs [m*ROWS : (m+1)*ROWS, n*BLOCK_N : (n+1)*BLOCK_N], the whole of K.
        ns = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
        n_ok = ns < N
        w_rows = w_ptr + ns.to(tl.int64)[:, None] * stride_wn                         # [BLOCK_N, 1]
        ms = tl.program_id(1) * ROWS + tl.arange(0, ROWS)
        m_ok = ms < M
        x_rows = x_ptr + ms.to(tl.int64)[:, None] * stride_xm                         # [ROWS, 1]
        if DOT:
            acc = tl.zeros((ROWS, BLOCK_N), dtype=tl.float32)
            for k0 in range(0, K, BLOCK_K):
                ks = k0 + tl.arange(0, BLOCK_K)
                k_ok = ks < K
                w = tl.load(w_rows + ks[None, :], mask=n_ok[:, None] & k_ok[None, :], other=0.0,
                            eviction_policy="evict_first")                              # [BLOCK_N, BLOCK_K]
                xk = tl.load(x_rows + ks[None, :], mask=m_ok[:, None] & k_ok[None, :], other=0.0)
                if DOT_IN_F32:  # Triton's CPU interpreter mis-computes half-precision dots
                    xk, w = xk.to(tl.float32), w.to(tl.float32)
                acc = tl.dot(xk, tl.trans(w), acc, input_precision=PRECISION)         # [ROWS, BLOCK_N]
        else:
            # Elementwise products, reduced once at the end: no tensor-core tile minimum, so programs stay
            # narrow in N (a GEMV has nothing to reuse across rows of W).
            acc3 = tl.zeros((ROWS, BLOCK_N, BLOCK_K), dtype=tl.float32)
            for k0 in range(0, K, BLOCK_K):
                ks = k0 + tl.arange(0, BLOCK_K)
                k_ok = ks < K
                w = tl.load(w_rows + ks[None, :], mask=n_ok[:, None] & k_ok[None, :], other=0.0,
                            eviction_policy="evict_first").to(tl.float32)             # [BLOCK_N, BLOCK_K]
                xk = tl.load(x_rows + ks[None, :], mask=m_ok[:, None] & k_ok[None, :],
                             other=0.0).to(tl.float32)                                 # [ROWS, BLOCK_K]
                acc3 += xk[:, None, :] * w[None, :, :]
            acc = tl.sum(acc3, axis=2)                                                 # [ROWS, BLOCK_N]
        if HAS_BIAS:
            acc += tl.load(b_ptr + ns, mask=n_ok, other=0.0).to(tl.float32)[None, :]
        tl.store(y_ptr + ms.to(tl.int64)[:, None] * stride_ym + ns[None, :], acc.to(y_ptr.dtype.element_ty),
                 mask=m_ok[:, None] & n_ok[None, :])


def default_config(M: int, N: int, K: int) -> dict:
    """Launch parameters by shape, from the H200 search of `benchmarks/bench_linear.py --tune` (run 18).

    Up to 4 rows: elementwise products, two weight rows per program (320 programs for N = 640) and K in
    1,024-wide loads (Gemma's and SmolLM2's K in one memory round trip); the search's best at one row for
    every projection of both models, within 0.1 µs. More rows: 16-wide tensor-core tiles, 512 deep (about
    cuBLAS's time there, never much better: the dispatch rule leaves those shapes to cuBLAS)."""
    if M <= 4:
        return dict(dot=False, block_n=2, block_k=max(16, min(1024, next_pow2(K))), num_warps=4, num_stages=4)
    return dict(dot=True, block_n=16, block_k=max(16, min(512, next_pow2(K))), num_warps=4, num_stages=3)


def skinny_linear_triton(x: Tensor, weight: Tensor, bias: Tensor | None = None, dot: bool | None = None,
                         block_n: int | None = None, block_k: int | None = None, num_warps: int | None = None,
                         num_stages: int | None = None) -> Tensor:
    """The Triton kernel at any row count; same contract as `skinny_linear_ref`. Launch parameters (`dot`:
    tensor-core tiles, else elementwise products) default to `default_config`'s."""
    check_args(x, weight, bias)
    if x.dtype == torch.float64:
        raise TypeError("skinny_linear_triton accumulates in float32; float64 takes skinny_linear_ref")
    lead, K, N = x.shape[:-1], x.shape[-1], weight.shape[0]
    x2 = x.reshape(-1, K)
    x2 = x2 if x2.stride(-1) == 1 else x2.contiguous()
    weight = weight if weight.stride(-1) == 1 else weight.contiguous()
    M = x2.shape[0]
    cfg = default_config(M, N, K)
    dot = cfg["dot"] if dot is None else dot
    block_n, block_k = block_n or cfg["block_n"], block_k or cfg["block_k"]
    if dot:        # tl.dot needs 16 in every dimension
        rows = min(MAX_TILE_ROWS, max(16, next_pow2(M)))
        block_n, block_k = max(block_n, 16), max(block_k, 16)
    else:
        rows = min(ELEMENTWISE_MAX_ROWS, next_pow2(M))
    y = torch.empty((M, N), dtype=x.dtype, device=x.device)
    if M and N:
        grid = (triton.cdiv(N, block_n), triton.cdiv(M, rows))
        _skinny_linear_kernel[grid](
            x2, weight, bias if bias is not None else weight, y, M, N, K, x2.stride(0), weight.stride(0),
            y.stride(0), HAS_BIAS=bias is not None, DOT=dot, ROWS=rows, BLOCK_N=block_n, BLOCK_K=block_k,
            PRECISION="ieee" if x.dtype == torch.float32 else "tf32", DOT_IN_F32=INTERPRETER,
            num_warps=num_warps or cfg["num_warps"], num_stages=num_stages or cfg["num_stages"])
    return y.view(*lead, N)


def uses_kernel(x: Tensor, weight: Tensor) -> bool:
    """Whether `skinny_linear` runs the Triton kernel for these inputs (else `F.linear`)."""
    rows = x.numel() // max(x.shape[-1], 1)
    return (triton_available_for(x) and x.dtype in HALF and weight.dtype == x.dtype and 0 < rows <= MAX_ROWS
            and weight.numel() <= MAX_WEIGHT_ENTRIES)


@torch.library.custom_op("microspec::skinny_linear", mutates_args=())
def skinny_linear(x: Tensor, weight: Tensor, bias: Tensor | None = None) -> Tensor:
    """x W^T + b: the Triton kernel for half-precision CUDA inputs of at most MAX_ROWS rows, else F.linear."""
    check_args(x, weight, bias)
    if uses_kernel(x, weight):
        return skinny_linear_triton(x, weight, bias)
    return F.linear(x, weight, bias)


@skinny_linear.register_fake
def _(x, weight, bias=None):
    return x.new_empty((*x.shape[:-1], weight.shape[0]))
