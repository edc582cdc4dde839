"""Issue 10, item 5: the kernels and their references never read outside the LM-head weight.

  * `validate=True`, the default of every public launcher (`*_triton`) and registered op: an id outside
    [0, V) in a live slot (V, V + 10**5, -5), a `want` below -1, or n_active outside [0, C] raises a one-line
    ValueError before anything is launched (the kernel is replaced by a tripwire);
  * `validate=False` (what `SparseLMHead` passes inside a captured step: no host sync): such an id is never
    read. The gather path gives its slot a -inf logit, exactly like padding, in the Triton kernel (CPU
    interpreter) and in the torch reference; the delta gather leaves its slot untouched. Before, id = V
    returned a garbage logit, V + 10**5 segfaulted and the reference read row 0 for ids < -1;
  * `SparseLMHead.bind` checks the policy's set once (ids in range, unique, -1 padding), so the unchecked
    per-step calls only ever see ids a policy produced from a valid set.
"""
from __future__ import annotations

import importlib

import pytest
import torch

pytest.importorskip("triton")

import microspec.kernels as K
from microspec.kernels import delta_gather_ref, delta_gather_triton, sparse_logits_ref, sparse_logits_triton
from microspec.sparse_head import SparseLMHead

sl_mod = importlib.import_module("microspec.kernels.sparse_logits")
dg_mod = importlib.import_module("microspec.kernels.delta_gather")

B, T, C, D, V = 2, 1, 8, 16, 31
BAD_IDS = [V, V + 1, V + 10**5, -5, -2]


class _Tripwire:
    def __getitem__(self, grid):
        raise AssertionError("kernel launched before the ids were validated")


def _inputs(bad: int):
    g = torch.Generator().manual_seed(0)
    hidden, weight = torch.randn(B, T, D, generator=g), torch.randn(V, D, generator=g)
    ids = torch.tensor([[0, 5, bad, 30] + [-1] * (C - 4), [1, 2] + [-1] * (C - 2)])
    return hidden, weight, ids, torch.tensor([4, 2])


@pytest.mark.parametrize("bad", BAD_IDS)
def test_validated_gather_calls_refuse_ids_outside_the_vocabulary(bad, monkeypatch):
    monkeypatch.setattr(sl_mod, "_sparse_logits_kernel", _Tripwire())
    hidden, weight, ids, n = _inputs(bad)
    for call in (sparse_logits_triton, K.sparse_logits):
        with pytest.raises(ValueError, match=rf"active_ids\[0, 2\] = {bad} .*outside \[0, {V}\)") as err:
            call(hidden, weight, ids, n)
        assert "\n" not in str(err.value)


@pytest.mark.parametrize("n_active", [[9, 2], [-1, 2]])
def test_validated_calls_refuse_n_active_outside_the_capacity(n_active, monkeypatch):
    monkeypatch.setattr(sl_mod, "_sparse_logits_kernel", _Tripwire())
    hidden, weight, ids, _ = _inputs(3)
    rows = weight[ids.clamp(min=0)]
    n = torch.tensor(n_active)
    for call in (lambda: sparse_logits_triton(hidden, weight, ids, n),
                 lambda: K.packed_logits(hidden, rows, n), lambda: K.packed_logits_triton(hidden, rows, n)):
        with pytest.raises(ValueError, match="n_active"):
            call()


@pytest.mark.parametrize("bad", BAD_IDS)
def test_unchecked_gather_never_reads_a_bad_id(bad):
    """validate=False: the bad slot scores -inf (never drafted); every other slot is the reference's."""
    hidden, weight, ids, n = _inputs(bad)
    good_ids = ids.clone()
    good_ids[0, 2] = 7
    expect = sparse_logits_ref(hidden, weight, good_ids, n)
    expect[0, :, 2] = float("-inf")
    for out in (sparse_logits_ref(hidden, weight, ids, n),
                sparse_logits_triton(hidden, weight, ids, n, validate=False),
                K.sparse_logits(hidden, weight, ids, n, validate=False)):
        assert torch.isneginf(out[0, :, 2]).all(), f"id {bad} produced logit {out[0, :, 2]}"
        torch.testing.assert_close(out, expect)


@pytest.mark.parametrize("bad", [V, V + 10**5, -2, -7])
def test_delta_gather_refuses_or_skips_bad_ids(bad, monkeypatch):
    weight = torch.randn(V, D)
    want = torch.tensor([[0, bad, 30, -1], [1, 2, -1, -1]])
    poison = torch.full((2, 4, D), 123.0)
    with monkeypatch.context() as m:
        m.setattr(dg_mod, "_delta_gather_kernel", _Tripwire())
        for call in (delta_gather_triton, K.delta_gather_):
            have, rows = torch.full_like(want, -1), poison.clone()
            with pytest.raises(ValueError, match=rf"want\[0, 1\] = {bad}"):
                call(weight, want, have, rows)
            assert torch.equal(rows, poison) and (have == -1).all(), "written before raising"
    for call in (delta_gather_ref, lambda *a: delta_gather_triton(*a, validate=False),
                 lambda *a: K.delta_gather_(*a, validate=False)):
        have, rows = torch.full_like(want, -1), poison.clone()
        call(weight, want, have, rows)
        assert torch.equal(rows[0, 1], poison[0, 1]), "a bad id's slot was written"
        assert torch.equal(rows[0, 0], weight[0]) and torch.equal(rows[1, 1], weight[2])


def test_bind_checks_the_set_once():
    head = SparseLMHead(torch.randn(V, D), mode="gather")
    for ids, n, match in [(torch.tensor([[0, V, -1]]), torch.tensor([2]), "ids must be in"),
                          (torch.tensor([[4, 4, -1]]), torch.tensor([2]), "duplicate ids"),
                          (torch.tensor([[4, 5, 9]]), torch.tensor([2]), "padding slots")]:
        with pytest.raises(ValueError, match=match):
            head.bind(ids, n)
    head.bind(torch.tensor([[4, 5, -1]]), torch.tensor([2]))
