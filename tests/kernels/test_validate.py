"""Bad inputs (TESTING section 4, rows 3, 15, 16): clear errors, raised before anything is launched.

  * `check_args` of both kernels (through the Triton launchers, with the kernel replaced by a tripwire that
    fails the test if it is ever launched): wrong dims, mismatched hidden size, dtype mismatch, non-integer
    ids, mismatched active-set rows R, inputs on different devices;
  * the registered ops reject the same inputs (they are the production entry points);
  * `check_active_set`: accepts valid sets; rejects duplicates, ids outside [0, V), padding other than -1,
    n_active outside [0, C], and malformed shapes, naming the offending row.
"""
from __future__ import annotations

import importlib

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

pytest.importorskip("triton")

import microspec.kernels as K
from microspec.kernels import check_active_set

# NOTE: `microspec.kernels.sparse_logits` the attribute is the registered op, which shadows the submodule.
sl_mod = importlib.import_module("microspec.kernels.sparse_logits")
dg_mod = importlib.import_module("microspec.kernels.delta_gather")

requires_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA required")
B, T, C, D, V = 2, 1, 8, 16, 31


class _Tripwire:
    """Stands in for a @triton.jit kernel: launching it fails the test."""

    def __getitem__(self, grid):
        raise AssertionError("kernel launched before the inputs were validated")


@pytest.fixture
def no_launch(monkeypatch):
    monkeypatch.setattr(sl_mod, "_sparse_logits_kernel", _Tripwire())
    monkeypatch.setattr(dg_mod, "_delta_gather_kernel", _Tripwire())


def good(**kw):
    """Valid gather-path inputs for a per-row set, with fields overridden by `kw`."""
    args = {"hidden": torch.randn(B, T, D), "weight": torch.randn(V, D),
                "active_ids": torch.tensor([[0, 5, 30] + [-1] * (C - 3), [1, 2] + [-1] * (C - 2)]),
                "n_active": torch.tensor([3, 2])}
    args.update(kw)
    return args


def rows_of(args):
    return args["weight"][args["active_ids"].long().clamp(min=0)].contiguous()


# (id, overrides, expected error, message fragment)
SPARSE_BAD = [
    ("hidden-2d", {"hidden": torch.randn(B, D)}, ValueError, "hidden must be"),
    ("hidden-4d", {"hidden": torch.randn(B, T, 1, D)}, ValueError, "hidden must be"),
    ("hidden-size", {"hidden": torch.randn(B, T, D + 1)}, ValueError, "hidden size"),
    ("dtype-mismatch", {"hidden": torch.randn(B, T, D, dtype=torch.bfloat16)}, TypeError, "float dtype"),
    ("int-hidden", {"hidden": torch.ones(B, T, D, dtype=torch.int64),
                        "weight": torch.ones(V, D, dtype=torch.int64)}, TypeError, "float dtype"),
    ("float-ids", {"active_ids": torch.zeros(B, C)}, TypeError, "active_ids"),
    ("int16-ids", {"active_ids": torch.zeros(B, C, dtype=torch.int16)}, TypeError, "active_ids"),
    ("float-n", {"n_active": torch.tensor([3.0, 2.0])}, TypeError, "n_active"),
    ("R-not-1-or-B", {"active_ids": torch.full((3, C), -1), "n_active": torch.zeros(3, dtype=torch.int64)},
     ValueError, "rows"),
    # per-row ids with a shared n_active (the kernel would read row 0 only, the reference every row)
    ("ids-R-vs-n-R", {"n_active": torch.tensor([2])}, ValueError, None),
    # shared ids with per-row n_active (the kernel would read active_ids[1]: past the end of the tensor)
    ("shared-ids-per-row-n", {"active_ids": torch.tensor([[0, 5] + [-1] * (C - 2)])}, ValueError, None),
    ("device-mix", {"weight": torch.randn(V, D, device="meta")}, ValueError, "one device"),
]


@pytest.mark.parametrize("over, err, match", [c[1:] for c in SPARSE_BAD], ids=[c[0] for c in SPARSE_BAD])
def test_sparse_logits_triton_rejects_bad_inputs(no_launch, over, err, match):
    with pytest.raises(err, match=match):
        K.sparse_logits_triton(**good(**over))


PACKED_BAD = [
    ("hidden-size", {"hidden": torch.randn(B, T, D + 1)}, ValueError, "hidden size"),
    ("dtype-mismatch", {"hidden": torch.randn(B, T, D, dtype=torch.float16)}, TypeError, "float dtype"),
    ("float-n", {"n_active": torch.tensor([3.0, 2.0])}, TypeError, "n_active"),
    ("R-not-1-or-B", {"n_active": torch.zeros(3, dtype=torch.int64)}, ValueError, "rows"),
    # shared rows [1, C, D] with per-row n_active: the kernel would read rows[1], past the end of the buffer
    ("rows-R-vs-n-R", {"rows": torch.randn(1, C, D)}, ValueError, None),
    ("device-mix", {"rows": torch.randn(B, C, D, device="meta")}, ValueError, "one device"),
]


@pytest.mark.parametrize("over, err, match", [c[1:] for c in PACKED_BAD], ids=[c[0] for c in PACKED_BAD])
def test_packed_logits_triton_rejects_bad_inputs(no_launch, over, err, match):
    args = good()
    args = {"hidden": args["hidden"], "rows": rows_of(args), "n_active": args["n_active"]}
    args.update(over)
    with pytest.raises(err, match=match):
        K.packed_logits_triton(**args)


@requires_cuda
@pytest.mark.parametrize("which", ["hidden", "weight", "active_ids", "n_active"])
def test_sparse_logits_triton_rejects_cpu_cuda_mix(which):
    args = {k: v.cuda() for k, v in good().items()}
    args[which] = args[which].cpu()
    with pytest.raises(ValueError, match="one device"):
        K.sparse_logits_triton(**args)


@pytest.mark.parametrize("name", ["hidden-size", "dtype-mismatch", "float-ids", "shared-ids-per-row-n"])
def test_registered_ops_reject_bad_inputs(name):
    """The ops are what `SparseLMHead` calls: they must validate too (on CUDA they launch the kernel directly,
    where a wrong hidden size reads past the weight rows)."""
    over, err, match = next(c[1:] for c in SPARSE_BAD if c[0] == name)
    args = good(**over)
    with pytest.raises(err, match=match):
        K.sparse_logits(**args)


# ---------------------------------------------------------------- delta gather


def good_delta(**kw):
    w = torch.randn(V, D)
    want = torch.tensor([[0, 5, 30, -1], [1, 2, -1, -1]])
    args = {"weight": w, "want": want, "have": torch.full_like(want, -1), "rows": torch.zeros(2, 4, D)}
    args.update(kw)
    return args


DELTA_BAD = [
    ("rows-2d", {"rows": torch.zeros(2, 4 * D)}, ValueError, "expected rows"),
    ("want-shape", {"want": torch.zeros(2, 5, dtype=torch.int64)}, ValueError, "expected rows"),
    ("have-shape", {"have": torch.zeros(1, 4, dtype=torch.int64)}, ValueError, "expected rows"),
    ("weight-size", {"weight": torch.randn(V, D + 1)}, ValueError, "does not match"),
    ("weight-3d", {"weight": torch.randn(1, V, D)}, ValueError, "does not match"),
    ("weight-dtype", {"weight": torch.randn(V, D, dtype=torch.bfloat16)}, (TypeError, ValueError), "match"),
    ("float-want", {"want": torch.zeros(2, 4), "have": torch.zeros(2, 4)}, TypeError, "int32/int64"),
    ("have-dtype", {"have": torch.full((2, 4), -1, dtype=torch.int32)}, TypeError, "int32/int64"),
    ("rows-strided", {"rows": torch.zeros(2, 4, 2 * D)[..., ::2]}, ValueError, "contiguous"),
    ("weight-strided", {"weight": torch.randn(V, 2 * D)[:, ::2]}, ValueError, "unit-stride"),
    ("device-mix", {"weight": torch.randn(V, D, device="meta")}, ValueError, "device"),
]


@pytest.mark.parametrize("over, err, match", [c[1:] for c in DELTA_BAD], ids=[c[0] for c in DELTA_BAD])
def test_delta_gather_triton_rejects_bad_inputs(no_launch, over, err, match):
    args = good_delta(**over)
    have0, rows0 = args["have"].clone(), args["rows"].clone()
    with pytest.raises(err, match=match):
        K.delta_gather_triton(**args)
    assert torch.equal(args["have"], have0), "have written before raising"
    assert torch.equal(args["rows"], rows0), "rows written before raising"


# ---------------------------------------------------------------- check_active_set


@st.composite
def active_sets(draw, min_live=0):
    """A valid set: ids [R, C] unique per row in [0, V), -1 padding after n_active[r]; n_active [R]."""
    R, C, V = draw(st.integers(1, 3)), draw(st.sampled_from([1, 8, 64])), draw(st.sampled_from([1, 31, 989]))
    ns = draw(st.lists(st.integers(min(min_live, C, V), min(C, V)), min_size=R, max_size=R))
    rng = np.random.default_rng(draw(st.integers(0, 2**32 - 1)))
    ids = np.full((R, C), -1)
    for r, n in enumerate(ns):
        ids[r, :n] = rng.permutation(V)[:n]
    dt = draw(st.sampled_from([torch.int64, torch.int32]))
    return torch.tensor(ids, dtype=dt), torch.tensor(ns, dtype=dt), V, rng


@settings(deadline=None)
@given(s=active_sets())
def test_check_active_set_accepts_valid_sets(s):
    ids, n, V, _ = s
    check_active_set(ids, n, V)
    check_active_set(ids.flip(0), n.flip(0), V)  # order of the ids inside a row does not matter either
    shuffled = ids.clone()
    for r in range(ids.shape[0]):
        shuffled[r, : n[r]] = ids[r, : n[r]].flip(0)
    check_active_set(shuffled, n, V)


def _row_with(n, cond):
    rows = [r for r in range(len(n)) if cond(int(n[r]))]
    return rows[0] if rows else None


@settings(deadline=None)
@given(s=active_sets(min_live=2), data=st.data())
def test_check_active_set_rejects_duplicates(s, data):
    ids, n, V, rng = s
    r = _row_with(n, lambda k: k >= 2)
    if r is None:  # V == 1 or C == 1: no room for a duplicate
        return
    i, j = rng.choice(int(n[r]), size=2, replace=False)
    ids[r, j] = ids[r, i]
    with pytest.raises(ValueError, match=rf"row {r}: duplicate ids \[{int(ids[r, i])}\]"):
        check_active_set(ids, n, V)


@settings(deadline=None)
@given(s=active_sets(min_live=1), bad=st.sampled_from(["neg", "minus_one", "V", "huge"]))
def test_check_active_set_rejects_out_of_range_ids(s, bad):
    ids, n, V, rng = s
    r = _row_with(n, lambda k: k >= 1)
    ids[r, int(rng.integers(0, int(n[r])))] = {"neg": -5, "minus_one": -1, "V": V, "huge": 2**31 - 1}[bad]
    with pytest.raises(ValueError, match=rf"row {r}: ids must be in \[0, {V}\)"):
        check_active_set(ids, n, V)


@settings(deadline=None)
@given(s=active_sets(), bad=st.sampled_from([0, -2, 10**6]))
def test_check_active_set_rejects_non_minus_one_padding(s, bad):
    ids, n, V, rng = s
    r = _row_with(n, lambda k: k < ids.shape[1])
    if r is None:  # every row is full: no padding slot to corrupt
        return
    ids[r, int(rng.integers(int(n[r]), ids.shape[1]))] = bad
    with pytest.raises(ValueError, match=rf"row {r}: padding slots"):
        check_active_set(ids, n, V)


@settings(deadline=None)
@given(s=active_sets(), delta=st.sampled_from([1, 1000]), negative=st.booleans())
def test_check_active_set_rejects_n_active_outside_capacity(s, delta, negative):
    ids, n, V, _ = s
    C = ids.shape[1]
    n[-1] = -delta if negative else C + delta
    with pytest.raises(ValueError, match=rf"row {len(n) - 1}: n_active={int(n[-1])} outside \[0, {C}\]"):
        check_active_set(ids, n, V)


@pytest.mark.parametrize("ids, n", [
    (torch.tensor([0, 1, -1]), torch.tensor([2])),                 # ids not [R, C]
    (torch.tensor([[0, 1, -1]]), torch.tensor(2)),                 # n_active not [R]
    (torch.tensor([[0, 1, -1]]), torch.tensor([2, 2])),            # R mismatch
], ids=["ids-1d", "n-0d", "R-mismatch"])
def test_check_active_set_rejects_bad_shapes(ids, n):
    with pytest.raises(ValueError, match="expected active_ids"):
        check_active_set(ids, n, 8)
