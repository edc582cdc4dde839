"""Property tests of microspec/kernels/delta_gather.py (the repack buffer's delta copy).

Invariants checked, bit for bit (a copy does no arithmetic, so there is no tolerance):
  * slots with want >= 0 and want != have now hold weight[want];
  * every other slot (want == have, or want == -1) is not written: a poison value there survives;
  * have == want afterwards, and a second call with the same `want` writes nothing (the "delta" property);
  * the Triton kernel and `delta_gather_ref` leave identical `rows` and `have`; so does the registered op.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pytest
import torch
from hypothesis import example, given, settings
from hypothesis import strategies as st

pytest.importorskip("triton")

import microspec.kernels as K
from microspec.kernels import delta_gather_ref, delta_gather_triton

DTYPES = (torch.float32, torch.bfloat16, torch.float16)
CAPS = (8, 64, 100)     # BLOCK_S = 16: below one tile, whole tiles, a tail tile
DIMS = (24, 64, 160)    # BLOCK_D = min(256, next_pow2(D)): tails inside the tile, exact
VOCABS = (15, 17, 111, 989)
KINDS = ("same", "changed", "want_pad", "have_pad")   # per slot: what the policy update did to it


@dataclass(frozen=True)
class Case:
    dtype: torch.dtype
    R: int
    C: int
    D: int
    V: int
    seed: int = 0
    id_dtype: torch.dtype = torch.int64


@st.composite
def cases(draw):
    return Case(draw(st.sampled_from(DTYPES)), draw(st.integers(1, 3)), draw(st.sampled_from(CAPS)),
                draw(st.sampled_from(DIMS)), draw(st.sampled_from(VOCABS)), draw(st.integers(0, 2**32 - 1)),
                draw(st.sampled_from((torch.int64, torch.int32))))


def bits(t: torch.Tensor) -> torch.Tensor:
    """Integer view for bitwise comparison (NaN == NaN, -0.0 != 0.0)."""
    return t.view({2: torch.int16, 4: torch.int32, 8: torch.int64}[t.element_size()])


def make_inputs(case: Case):
    """weight [V, D] inside NaN guard rows (a read of id -1 or V would copy NaN), want/have [R, C], poisoned
    rows [R, C, D] whose values never occur in weight."""
    rng = np.random.default_rng(case.seed)
    big = np.full((case.V + 2, case.D), np.nan)
    big[1:-1] = rng.standard_normal((case.V, case.D))
    big_t = torch.from_numpy(big).to(case.dtype)
    weight = big_t[1:-1]
    ids = np.concatenate([[0, case.V - 1], rng.integers(0, case.V, size=(case.R, case.C)).ravel()])
    ids = rng.permutation(ids)[: case.R * case.C].reshape(case.R, case.C)               # 0 and V-1 likely
    kind = rng.integers(0, len(KINDS), size=(case.R, case.C))
    want, have = ids.copy(), ids.copy()
    other = (ids + rng.integers(1, case.V, size=ids.shape)) % case.V                    # != ids
    have[kind == 1] = np.where(rng.random(ids.shape) < 0.5, other, -1)[kind == 1]
    want[kind == 2] = -1
    want[kind == 3] = have[kind == 3] = -1
    rows = torch.from_numpy(rng.standard_normal((case.R, case.C, case.D)) + 100.0).to(case.dtype)
    to = {"dtype": case.id_dtype}
    return big_t, weight, torch.tensor(want, **to), torch.tensor(have, **to), rows


def expected_rows(weight, want, have, rows):
    changed = (want >= 0) & (want != have)
    out = rows.clone()
    out[changed] = weight[want[changed].long()]
    return out, changed


@settings(deadline=None)
@example(case=Case(torch.float32, R=1, C=8, D=24, V=15))
@example(case=Case(torch.bfloat16, R=3, C=100, D=160, V=17, seed=3, id_dtype=torch.int32))
@example(case=Case(torch.float16, R=2, C=64, D=64, V=989, seed=4))
@given(case=cases())
def test_delta_gather_triton_matches_ref_and_copies_only_changed_slots(case):
    _, weight, want, have, rows = make_inputs(case)
    expect, changed = expected_rows(weight, want, have, rows)
    want0 = want.clone()
    have_ref, rows_ref = have.clone(), rows.clone()
    delta_gather_ref(weight, want, have_ref, rows_ref)
    delta_gather_triton(weight, want, have, rows)

    assert torch.equal(want, want0), "want must not be modified"
    assert torch.equal(have, want) and torch.equal(have_ref, want), "have must equal want afterwards"
    assert have.dtype == want.dtype
    diff = (bits(rows) != bits(expect)).any(-1)
    assert not diff.any(), (f"slot (r, s)={diff.nonzero()[0].tolist()} wrong: changed="
                            f"{changed[tuple(diff.nonzero()[0])].item()}")
    assert torch.equal(bits(rows), bits(rows_ref)), "Triton and reference disagree"


@settings(deadline=None)
@given(case=cases())
def test_second_call_with_same_want_writes_nothing(case):
    _, weight, want, have, rows = make_inputs(case)
    delta_gather_triton(weight, want, have, rows)
    poison = torch.full_like(rows, -7.0)
    rows.copy_(poison)
    delta_gather_triton(weight, want, have, rows)
    assert torch.equal(bits(rows), bits(poison)), "a slot already holding its id was rewritten"
    assert torch.equal(have, want)


@settings(deadline=None)
@given(case=cases())
def test_registered_op_matches_ref_on_cpu(case):
    _, weight, want, have, rows = make_inputs(case)
    have_ref, rows_ref = have.clone(), rows.clone()
    delta_gather_ref(weight, want, have_ref, rows_ref)
    K.delta_gather_(weight, want, have, rows)
    assert torch.equal(have, have_ref) and torch.equal(bits(rows), bits(rows_ref))


def test_repack_then_logits_equal_gather_logits():
    """The two paths compose: packed logits over delta-gathered rows == fused gather logits (bit for bit)."""
    case = Case(torch.bfloat16, R=2, C=100, D=64, V=111, seed=5)
    _, weight, want, _, _ = make_inputs(case)
    rows = torch.zeros(case.R, case.C, case.D, dtype=case.dtype)
    have = torch.full_like(want, -1)
    # a valid active set: unique ids first, -1 padding after n_active
    n = torch.tensor([37, 100])
    for r in range(case.R):
        want[r] = -1
        want[r, : n[r]] = torch.randperm(case.V)[: n[r]]
    delta_gather_triton(weight, want, have, rows)
    hidden = torch.randn(case.R, 2, case.D).to(case.dtype)
    packed = K.packed_logits_triton(hidden, rows, n)
    gathered = K.sparse_logits_triton(hidden, weight, want, n)
    assert torch.equal(packed, gathered)


def test_strided_want_and_have_views():
    """`want`/`have` handed over as strided views are either rejected or handled like contiguous copies."""
    case = Case(torch.float32, R=2, C=16, D=24, V=111, seed=7)
    _, weight, want, have, rows = make_inputs(case)
    have_ref, rows_ref = have.clone(), rows.clone()
    delta_gather_ref(weight, want, have_ref, rows_ref)
    big = torch.full((case.R, 2 * case.C), 3, dtype=want.dtype)
    big[:, ::2] = want
    try:
        delta_gather_triton(weight, big[:, ::2], have, rows)                  # want.stride(-1) == 2
    except (ValueError, TypeError):
        return
    assert torch.equal(bits(rows), bits(rows_ref)) and torch.equal(have, have_ref), "strided want misread"
