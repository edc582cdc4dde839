"""Property tests of microspec/kernels/row_topk.py (the target's top-k over a wide vocabulary).

Invariants checked:
  * the Triton kernel and `row_topk_ref` return the same ids, id for id, ties included (rows drawn from a
    few integer values tie everywhere), with NaN, +-inf, -0.0, chunk tails and chunks narrower than k;
  * the reference is a top-k: its values equal `torch.topk`'s values, largest first, and its ids are distinct;
  * the registered op traces under `torch.compile(fullgraph=True)` and gives the ids of `torch.topk` on CPU;
  * bad arguments raise before any work.
"""
from __future__ import annotations

import pytest
import torch
from hypothesis import example, given
from hypothesis import strategies as st

pytest.importorskip("triton")

from microspec.kernels import row_topk, row_topk_ref, row_topk_triton  # noqa: E402

DTYPES = (torch.float32, torch.bfloat16, torch.float16)
DEV = "cuda" if torch.cuda.is_available() else "cpu"       # the CPU runs the kernel under TRITON_INTERPRET
CHUNKS = (4, 16, 64)      # small powers of two: many chunks, tails, chunks narrower than k


@st.composite
def cases(draw):
    V = draw(st.integers(1, 300))
    return dict(dtype=draw(st.sampled_from(DTYPES)), lead=draw(st.sampled_from(((1,), (3,), (2, 3)))), V=V,
                k=draw(st.integers(1, min(V, 16))), chunk=draw(st.sampled_from(CHUNKS)),
                ties=draw(st.booleans()), specials=draw(st.booleans()), seed=draw(st.integers(0, 2**31)))


def make_rows(dtype, lead, V, ties, specials, seed, **_):
    g = torch.Generator().manual_seed(seed)
    x = (torch.randint(-2, 3, (*lead, V), generator=g).float() if ties
         else torch.randn((*lead, V), generator=g))
    if specials:   # NaN, infinities and a negative zero at random places
        flat = x.view(-1)
        where = torch.randint(0, flat.numel(), (4,), generator=g)
        flat[where] = torch.tensor([float("nan"), float("inf"), float("-inf"), -0.0])
    return x.to(dtype).to(DEV)


@given(cases())
@example(dict(dtype=torch.bfloat16, lead=(2, 3), V=7, k=7, chunk=4, ties=True, specials=True, seed=0))
@example(dict(dtype=torch.float32, lead=(1,), V=1, k=1, chunk=4, ties=False, specials=True, seed=1))
def test_kernel_matches_reference_id_for_id(case):
    x = make_rows(**case)
    want = row_topk_ref(x, case["k"])
    got = row_topk_triton(x, case["k"], chunk=case["chunk"])
    assert got.dtype == torch.long and got.shape == (*case["lead"], case["k"])
    assert torch.equal(got, want), (x, got, want)


@given(cases())
def test_reference_is_a_topk(case):
    x = make_rows(**case)
    ids = row_topk_ref(x, case["k"])
    clean = x.float().nan_to_num(nan=float("-inf"))
    assert torch.equal(clean.gather(-1, ids), torch.topk(clean, case["k"], dim=-1).values)
    assert (ids.sort(-1).values.diff(dim=-1) > 0).all(), "an id twice"


def test_ties_go_to_the_smallest_ids():
    x = torch.tensor([[1.0, 3.0, 3.0, 2.0, 3.0, 2.0], [0.0, -0.0, 0.0, 0.0, 0.0, 0.0]], device=DEV)
    assert row_topk_ref(x, 4).tolist() == [[1, 2, 4, 3], [0, 1, 2, 3]]
    assert row_topk_triton(x, 4, chunk=4).tolist() == [[1, 2, 4, 3], [0, 1, 2, 3]]


def test_sliced_vocabulary_is_read_through_its_stride():
    """The engine passes t_logits[..., :V] of a target with a wider vocabulary: a view, never copied."""
    x = torch.randn(2, 3, 50, device=DEV)
    assert torch.equal(row_topk_triton(x[..., :37], 5, chunk=16), row_topk_ref(x[..., :37].contiguous(), 5))


def test_registered_op_traces_in_one_graph():
    x = torch.randn(2, 5, 40)
    traced = torch.compile(lambda t: row_topk(t, 3), fullgraph=True, backend="eager")
    assert torch.equal(traced(x), torch.topk(x, 3, dim=-1).indices)


@pytest.mark.parametrize("call", [
    lambda: row_topk_ref(torch.randn(2, 4), 5),                       # k > V
    lambda: row_topk_ref(torch.randn(2, 4), 0),
    lambda: row_topk_ref(torch.arange(4), 1),                         # not floating
    lambda: row_topk_triton(torch.randn(2, 40), 17),                  # k > MAX_K
    lambda: row_topk_triton(torch.randn(2, 40), 3, chunk=12),         # chunk not a power of 2
    lambda: row_topk_triton(torch.randn(2, 40, dtype=torch.float64), 3),
])
def test_bad_arguments_raise(call):
    with pytest.raises((ValueError, TypeError)):
        call()
