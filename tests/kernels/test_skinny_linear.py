"""Property tests of microspec/kernels/skinny_linear.py (a decoder layer's projections at decode shapes).

Invariants checked:
  * the Triton kernel (both branches: one row elementwise, several rows on tensor cores) and
    `skinny_linear_ref` are each within float32 summation error plus one rounding of the exact product,
    and within one rounding step of each other, at any shape, launch configuration, bias or none, tails
    in N and K;
  * the registered op is `F.linear` exactly where it does not run the kernel, and traces under
    `torch.compile(fullgraph=True)`;
  * the dispatch rule: the kernel only for half-precision CUDA inputs of 1..MAX_ROWS rows;
  * bad arguments raise before any work.
"""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from hypothesis import example, given
from hypothesis import strategies as st

pytest.importorskip("triton")

from microspec.kernels import skinny_linear, skinny_linear_ref, skinny_linear_triton  # noqa: E402
from microspec.kernels.skinny_linear import MAX_ROWS, MAX_WEIGHT_ENTRIES, uses_kernel  # noqa: E402

DTYPES = (torch.float32, torch.bfloat16, torch.float16)
DEV = "cuda" if torch.cuda.is_available() else "cpu"       # the CPU runs the kernel under TRITON_INTERPRET


@st.composite
def cases(draw):
    return dict(dtype=draw(st.sampled_from(DTYPES)), lead=draw(st.sampled_from(((1,), (1, 1), (3,), (2, 5),
                                                                                 (17,), (2, 17)))),
                N=draw(st.integers(1, 70)), K=draw(st.integers(1, 200)), bias=draw(st.booleans()),
                dot=draw(st.sampled_from((None, False, True))),
                block_n=draw(st.sampled_from((None, 1, 2, 16))),
                block_k=draw(st.sampled_from((None, 16, 32, 128))), seed=draw(st.integers(0, 2**31)))


def make(dtype, lead, N, K, bias, seed, **_):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn((*lead, K), generator=g).to(dtype).to(DEV)
    w = (torch.randn((N, K), generator=g) / K ** 0.5).to(dtype).to(DEV)
    b = torch.randn((N,), generator=g).to(dtype).to(DEV) if bias else None
    return x, w, b


def error_bound(x, w, b):
    """Exact result (float64) and a bound on |computed - exact|: float32 summation over K terms plus one
    rounding to the output dtype (a unit of its precision, relative)."""
    x64, w64 = x.double().cpu(), w.double().cpu()
    exact = x64 @ w64.t() + (0 if b is None else b.double().cpu())
    magnitude = x64.abs() @ w64.abs().t() + (0 if b is None else b.double().cpu().abs())
    K = x.shape[-1]
    return exact, (K + 2) * 2.0 ** -23 * magnitude + torch.finfo(x.dtype).eps * exact.abs() + 1e-30


@given(cases())
@example(dict(dtype=torch.bfloat16, lead=(1,), N=7, K=33, bias=True, dot=None, block_n=2, block_k=16, seed=0))
@example(dict(dtype=torch.bfloat16, lead=(17,), N=33, K=65, bias=True, dot=True, block_n=16, block_k=32,
              seed=1))
@example(dict(dtype=torch.float16, lead=(2, 17), N=1, K=1, bias=False, dot=False, block_n=None, block_k=None,
              seed=2))
@example(dict(dtype=torch.float32, lead=(17,), N=20, K=100, bias=False, dot=True, block_n=None, block_k=None,
              seed=3))
def test_kernel_and_reference_are_each_within_rounding_of_the_exact_product(case):
    x, w, b = make(**case)
    got = skinny_linear_triton(x, w, b, dot=case["dot"], block_n=case["block_n"], block_k=case["block_k"])
    want = skinny_linear_ref(x, w, b)
    assert got.dtype == x.dtype and got.shape == (*case["lead"], case["N"])
    exact, bound = error_bound(x, w, b)
    assert ((got.double().cpu() - exact).abs() <= bound).all()
    assert ((want.double().cpu() - exact).abs() <= bound).all()
    step = torch.finfo(x.dtype).eps * torch.maximum(got.double().abs(), want.double().abs()).cpu()
    assert ((got.double() - want.double()).abs().cpu() <= step + 2 * bound).all()


@pytest.mark.parametrize("dot", [False, True])
def test_many_rows_take_several_program_rows(dot):
    # rows beyond one program's tile (8 elementwise, 64 on tensor cores) are covered by more programs
    x, w, b = make(torch.bfloat16, (130,), 24, 48, True, 3)
    got = skinny_linear_triton(x, w, b, dot=dot)
    exact, bound = error_bound(x, w, b)
    assert ((got.double().cpu() - exact).abs() <= bound).all()


@pytest.mark.skipif(DEV != "cpu", reason="on CUDA half inputs take the kernel")
@pytest.mark.parametrize("dtype", DTYPES)
def test_op_is_f_linear_off_cuda(dtype):
    x, w, b = make(dtype, (3,), 10, 20, True, 4)
    assert not uses_kernel(x, w)
    assert torch.equal(skinny_linear(x, w, b), F.linear(x, w, b))
    assert torch.equal(skinny_linear(x, w), F.linear(x, w))


def test_dispatch_rule():
    w = torch.zeros(8, 4, dtype=torch.bfloat16, device=DEV)
    on_cuda = DEV == "cuda"
    assert uses_kernel(torch.zeros(1, 4, dtype=torch.bfloat16, device=DEV), w) == on_cuda
    sixteen = torch.zeros(2, 8, 4, dtype=torch.bfloat16, device=DEV)
    assert uses_kernel(sixteen, w) == (on_cuda and 16 <= MAX_ROWS)                 # one row by default
    assert not uses_kernel(torch.zeros(MAX_ROWS + 1, 4, dtype=torch.bfloat16, device=DEV), w)
    assert not uses_kernel(torch.zeros(1, 4, device=DEV), w.float())                 # float32: F.linear
    assert not uses_kernel(torch.zeros(0, 4, dtype=torch.bfloat16, device=DEV), w)   # no rows
    wide = torch.empty(MAX_WEIGHT_ENTRIES // 4 + 1, 4, dtype=torch.bfloat16, device=DEV)
    assert not uses_kernel(torch.zeros(1, 4, dtype=torch.bfloat16, device=DEV), wide)  # cuBLAS spreads


def test_op_traces_under_compile():
    x, w, b = make(torch.float32, (2, 3), 12, 20, True, 5)
    fn = torch.compile(lambda x, w, b: skinny_linear(x, w, b) * 2, fullgraph=True, backend="aot_eager")
    torch.testing.assert_close(fn(x, w, b), F.linear(x, w, b) * 2)


@pytest.mark.parametrize("args, error", [
    ((torch.zeros(2, 5), torch.zeros(3, 4), None), "features"),
    ((torch.zeros(2, 4), torch.zeros(3, 4), torch.zeros(2)), "bias of shape"),
    ((torch.zeros(2, 4), torch.zeros(3, 4, dtype=torch.float64), None), "share a dtype"),
    ((torch.zeros(2, 4), torch.zeros(3, 4, 1), None), "weight \\[N, K\\]"),
])
def test_bad_arguments_raise_before_work(args, error):
    for fn in (skinny_linear, skinny_linear_ref, skinny_linear_triton):
        with pytest.raises((ValueError, TypeError), match=error):
            fn(*args)


@pytest.mark.gpu
@pytest.mark.parametrize("rows", [1, 17])
def test_compiled_and_captured_on_cuda(rows):
    """Inside Inductor and a CUDA graph, as the lean layers run it: replays with new inputs match the twin."""
    x, w, b = make(torch.bfloat16, (rows,), 640, 2048, True, 6)
    fn = torch.compile(lambda x: skinny_linear(x, w, b) + 1, fullgraph=True)
    out = fn(x)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = fn(x)
    for seed in range(3):
        x.copy_(torch.randn(x.shape, generator=torch.Generator().manual_seed(seed)).to(x))
        graph.replay()
        exact, bound = error_bound(x, w, b)
        assert ((out.double().cpu() - 1 - exact).abs() <= 2 * bound + 2 ** -7 * (exact.abs() + 1)).all()
