"""Tests of microspec/sparse_head.py: `SparseLMHead` and the in-place swap `sparsify_lm_head_`.

  * every mode ("repack", "gather", "dense") gives the logits of a float64 dense head restricted to the active
    slots (STYLE lesson 8 tolerance), -inf on padding, for shared (R = 1) and per-row (R = B) sets;
  * after an in-place policy update + `refresh()` the logits follow the new set, and the repack buffer
    recopies only the slots whose id changed (checked through `resident` and by poisoning the buffer);
  * `token_ids` maps slots to ids; `bind` rejects bad shapes and devices; forward before `bind` raises;
  * `sparsify_lm_head_` swaps a Hugging Face head in place, keeps the weight Parameter (tied embeddings stay
    tied), `restore()` undoes it, and it refuses models without a bias-free linear head or already swapped.
"""
from __future__ import annotations

import contextlib
import importlib
import math
import os
from dataclasses import dataclass

import numpy as np
import pytest
import torch
from hypothesis import example, given, settings
from hypothesis import strategies as st
from torch import nn

from microspec.kernels import HAS_TRITON
from microspec.sparse_head import HeadSwap, SparseLMHead, sparsify_lm_head_

# The registered ops run their torch reference on CPU; with the Triton interpreter on (tests/conftest.py) the
# head can also be driven through the Triton kernels, as it is on CUDA.
INTERPRETED = HAS_TRITON and os.environ.get("TRITON_INTERPRET") == "1"

DTYPES = (torch.float32, torch.bfloat16, torch.float16, torch.float64)
CAPS, DIMS, VOCABS = (8, 64, 100), (24, 64), (65, 111, 989)


@dataclass(frozen=True)
class Case:
    mode: str
    dtype: torch.dtype
    B: int
    T: int
    C: int
    D: int
    V: int
    n_active: tuple     # R entries: R = 1 shared, R = B per-row
    seed: int = 0

    @property
    def R(self):
        return len(self.n_active)


@st.composite
def cases(draw, modes=("repack", "gather")):
    C, D, V = draw(st.sampled_from(CAPS)), draw(st.sampled_from(DIMS)), draw(st.sampled_from(VOCABS))
    B, T = draw(st.integers(1, 3)), draw(st.integers(1, 3))
    R = 1 if draw(st.booleans()) else B
    n_active = tuple(draw(st.lists(st.integers(0, min(C, V)), min_size=R, max_size=R)))
    return Case(draw(st.sampled_from(modes)), draw(st.sampled_from(DTYPES)), B, T, C, D, V, n_active,
                draw(st.integers(0, 2**32 - 1)))


def random_ids(rng, n, V, exclude=()):
    """n unique ids in [0, V) \\ exclude, unsorted, with 0 and V-1 first in line when allowed."""
    pool = np.setdiff1d(np.arange(V), np.asarray(exclude, dtype=np.int64))
    edges = [e for e in (0, V - 1) if e in pool]
    rest = rng.permutation(np.setdiff1d(pool, edges))
    ids = np.concatenate([rng.permutation(edges), rest])[:n].astype(np.int64)
    rng.shuffle(ids)
    return ids


def make(case: Case):
    rng = np.random.default_rng(case.seed)
    hidden = rng.standard_normal((case.B, case.T, case.D)) / math.sqrt(case.D)          # logits O(1)
    hidden = torch.from_numpy(hidden).to(case.dtype)
    weight = nn.Parameter(torch.from_numpy(rng.standard_normal((case.V, case.D))).to(case.dtype),
                          requires_grad=False)
    ids = torch.full((case.R, case.C), -1, dtype=torch.int64)
    for r, n in enumerate(case.n_active):
        ids[r, :n] = torch.from_numpy(random_ids(rng, n, case.V))
    return rng, hidden, weight, ids, torch.tensor(case.n_active, dtype=torch.int64)


def check_logits(out, hidden, weight, ids, n, what=""):
    """out [B, T, C] against a float64 dense head restricted to the active slots; tolerance: 2x the error of
    plain torch in the input dtype (+1e-6); padding exactly -inf."""
    B, T, _ = hidden.shape
    dense64 = hidden.double() @ weight.double().T                                       # [B, T, V]
    idx = ids.clamp(min=0).expand(B, -1)                                                # [B, C]
    oracle = dense64.gather(-1, idx.unsqueeze(1).expand(-1, T, -1))                     # [B, T, C]
    base = (hidden @ weight.T).gather(-1, idx.unsqueeze(1).expand(-1, T, -1)).double()  # input-dtype math
    live = (torch.arange(ids.shape[1]) < n.unsqueeze(-1)).expand(B, -1).unsqueeze(1).expand(-1, T, -1)
    assert out.shape == oracle.shape, f"{what}: shape {tuple(out.shape)}"
    assert out.dtype == torch.promote_types(hidden.dtype, torch.float32), f"{what}: dtype {out.dtype}"
    bad_pad = ~live & ~out.isneginf()
    assert not bad_pad.any(), f"{what}: padding slot {bad_pad.nonzero()[0].tolist()} is not -inf"
    if live.any():
        err = ((out.double() - oracle).abs() * live).nan_to_num(0.0)
        err_base = ((base - oracle).abs() * live).nan_to_num(0.0)
        worst = tuple(int(i) for i in np.unravel_index(int(err.argmax()), err.shape))
        assert err.max() <= 2 * err_base.max() + 1e-6, (
            f"{what}: err={err.max().item():.3g} err_base={err_base.max().item():.3g}, "
            f"worst (b, t, s)={worst}: out={out[worst].item()!r} oracle={oracle[worst].item()!r}")


@contextlib.contextmanager
def dispatch(triton: bool):
    """Route the registered ops to the Triton kernels (interpreted, CPU tensors) when `triton` is set."""
    with pytest.MonkeyPatch.context() as mp:
        if triton and INTERPRETED:
            for name in ("microspec.kernels.sparse_logits", "microspec.kernels.delta_gather"):
                mp.setattr(importlib.import_module(name), "triton_available_for", lambda t: True)
        yield


def bound_head(case, weight, ids, n):
    head = SparseLMHead(weight, mode=case.mode)
    head.bind(ids, n)
    head.refresh()
    return head


# ---------------------------------------------------------------- logits


@settings(deadline=None)
@example(case=Case("repack", torch.float32, 1, 1, 64, 24, 65, (64,)), triton=True)
@example(case=Case("gather", torch.bfloat16, 3, 2, 100, 64, 111, (0, 1, 100)), triton=True)
@example(case=Case("repack", torch.float16, 2, 3, 8, 24, 989, (0,)), triton=False)
@given(case=cases(), triton=st.booleans())
def test_sparse_modes_match_dense_oracle(case, triton):
    _, hidden, weight, ids, n = make(case)
    with dispatch(triton):
        head = bound_head(case, weight, ids, n)
        check_logits(head(hidden), hidden, weight, ids, n, case.mode)
        flat = head(hidden[:, 0])                                               # [B, D] -> [B, C]
        assert torch.equal(flat, head(hidden[:, :1])[:, 0])


@settings(deadline=None)
@given(case=cases(modes=("dense",)), full=st.booleans())
def test_dense_mode_matches_dense_oracle(case, full):
    """Dense mode is `FullVocab`'s: slot s is token s, the active set is arange(C) and full."""
    C = case.V if full else min(case.C, case.V)
    _, hidden, weight, _, _ = make(case)
    ids, n = torch.arange(C).expand(case.R, -1).contiguous(), torch.full((case.R,), C)
    head = bound_head(case, weight, ids, n)
    assert head.rows is None
    check_logits(head(hidden), hidden, weight, ids, n, "dense")


# ---------------------------------------------------------------- policy updates


def mutate_in_place(rng, ids, n, V):
    """A policy update in place: keep some live ids in their slots, replace others by ids not in the row,
    shrink or grow n_active (padding back to -1)."""
    R, C = ids.shape
    for r in range(R):
        old_n = int(n[r])
        new_n = int(rng.integers(0, min(C, V) + 1))
        keep = rng.random(C) < 0.5
        keep[min(old_n, new_n):] = False
        row = np.full(C, -1, dtype=np.int64)
        row[keep] = ids[r].numpy()[keep]
        fresh = random_ids(rng, int((~keep[:new_n]).sum()), V, exclude=row[keep])
        row[np.flatnonzero(~keep[:new_n])] = fresh
        ids[r] = torch.from_numpy(row)
        n[r] = new_n


@settings(deadline=None)
@example(case=Case("repack", torch.bfloat16, 3, 1, 100, 24, 111, (50, 100, 0)), triton=True)
@given(case=cases(), triton=st.booleans())
def test_logits_follow_in_place_policy_updates(case, triton):
    rng, hidden, weight, ids, n = make(case)
    with dispatch(triton):
        head = bound_head(case, weight, ids, n)
        for step in range(2):
            mutate_in_place(rng, ids, n, case.V)              # same tensors: the head reads them at each call
            head.refresh()
            check_logits(head(hidden), hidden, weight, ids, n, f"{case.mode} after update {step}")


@settings(deadline=None)
@given(case=cases(modes=("repack",)), triton=st.booleans())
def test_repack_recopies_only_changed_slots(case, triton):
    with dispatch(triton):
        _check_repack_delta(case)


def _check_repack_delta(case):
    rng, hidden, weight, ids, n = make(case)
    head = bound_head(case, weight, ids, n)
    rows, resident = head.rows, head.resident
    assert rows.shape == (case.R, case.C, case.D) and rows.dtype == weight.dtype
    assert torch.equal(resident, ids), "after refresh every slot holds its id"
    live = ids >= 0
    assert torch.equal(rows[live], weight[ids[live]])

    old = ids.clone()
    mutate_in_place(rng, ids, n, case.V)
    changed = (ids >= 0) & (ids != old)
    poison = torch.full_like(rows, 1234.0)
    rows.copy_(poison)                                        # any slot the refresh writes loses the poison
    head.refresh()
    assert head.rows is rows and head.resident is resident, "buffers must be persistent"
    assert torch.equal(resident, ids)
    assert torch.equal(rows[changed], weight[ids[changed]]), "changed slots must hold their new rows"
    assert torch.equal(rows[~changed], poison[~changed]), "unchanged slots were recopied"

    head.bind(ids, n)                                         # a new request: every slot is stale again
    assert head.rows is rows and (head.resident == -1).all()
    head.refresh()
    live = ids >= 0
    assert torch.equal(rows[live], weight[ids[live]])
    check_logits(head(hidden), hidden, weight, ids, n, "repack after rebind")


# ---------------------------------------------------------------- token_ids, bind, forward


@settings(deadline=None)
@given(case=cases(modes=("gather",)), k=st.integers(1, 4), extra=st.booleans())
def test_token_ids_maps_slots_to_ids(case, k, extra):
    rng, _, weight, ids, n = make(case)
    head = bound_head(case, weight, ids, n)
    shape = (case.B, k, 2) if extra else (case.B, k)
    slots = torch.from_numpy(rng.integers(0, case.C, size=shape))
    got = head.token_ids(slots)
    assert got.shape == slots.shape and got.dtype == ids.dtype
    for b, *rest in np.ndindex(*shape):
        s = int(slots[(b, *rest)])
        assert got[(b, *rest)] == ids[0 if case.R == 1 else b, s]


def test_bind_rejects_bad_shapes_and_devices():
    w = torch.randn(31, 8)
    ids, n = torch.full((2, 4), -1), torch.zeros(2, dtype=torch.int64)
    for mode in ("repack", "gather", "dense"):
        head = SparseLMHead(w, mode=mode)
        with pytest.raises(ValueError, match="active_ids must be"):
            head.bind(ids[0], n)                                          # ids not [R, C]
        with pytest.raises(ValueError, match="active_ids must be"):
            head.bind(ids, n[:1])                                         # R mismatch
        with pytest.raises(ValueError, match="active_ids must be"):
            head.bind(ids, n.view(2, 1))                                  # n_active not [R]
        with pytest.raises(ValueError, match="active set on"):
            head.bind(ids.to("meta"), n.to("meta"))                       # set and weight on two devices
        assert head.active_ids is None, "a failed bind must leave the head unbound"
    with pytest.raises(ValueError, match="dense head has 31 rows"):
        SparseLMHead(w, mode="dense").bind(torch.arange(32).view(1, 32), torch.tensor([32]))
    with pytest.raises(ValueError, match="mode must be one of"):
        SparseLMHead(w, mode="sparse")


def test_bind_rejects_n_active_on_another_device():
    head = SparseLMHead(torch.randn(31, 8), mode="gather")
    with pytest.raises(ValueError):
        head.bind(torch.full((1, 4), -1), torch.zeros(1, dtype=torch.int64, device="meta"))


@pytest.mark.parametrize("mode", ["repack", "gather", "dense"])
def test_forward_before_bind_raises(mode):
    head = SparseLMHead(torch.randn(31, 8), mode=mode)
    with pytest.raises(RuntimeError, match="bind"):
        head(torch.randn(1, 1, 8))
    assert head.in_features == 8 and "capacity=None" in repr(head)


# ---------------------------------------------------------------- sparsify_lm_head_


def tiny_llama(tied: bool):
    from transformers import LlamaConfig, LlamaForCausalLM
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=131, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                      num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=tied)
    return LlamaForCausalLM(cfg).double().eval()


@pytest.mark.parametrize("mode", ["repack", "gather"])
@pytest.mark.parametrize("tied", [False, True], ids=["untied", "tied"])
def test_sparsify_swaps_in_place_and_restores(tied, mode):
    model = tiny_llama(tied)
    original = model.lm_head
    weight = original.weight
    embed = model.get_input_embeddings().weight
    assert (weight is embed) == tied
    n_params = sum(p.numel() for p in model.parameters())
    x = torch.tensor([[1, 5, 130, 0, 7]])
    with torch.no_grad():
        full = model(x).logits                                                          # [1, 5, 131]

    handle = sparsify_lm_head_(model, mode=mode)
    assert isinstance(handle, HeadSwap) and handle.original is original
    assert model.lm_head is handle.head and model.get_output_embeddings() is handle.head
    assert isinstance(handle.head, SparseLMHead) and handle.head.mode == mode
    assert handle.head.weight is weight, "the head must keep the weight Parameter itself (no copy)"
    assert (model.lm_head.weight is model.get_input_embeddings().weight) == tied, "tied embeddings untied"
    assert sum(p.numel() for p in model.parameters()) == n_params, "parameters were duplicated or lost"

    ids = torch.tensor([[130, 0, 17, 5, -1, -1]])
    n = torch.tensor([4])
    handle.head.bind(ids, n)
    handle.head.refresh()
    with torch.no_grad():
        sparse = model(x).logits                                                        # [1, 5, 6]
    assert sparse.shape == (1, 5, 6)
    torch.testing.assert_close(sparse[..., :4], full[..., ids[0, :4]], rtol=1e-12, atol=1e-12)
    assert torch.isneginf(sparse[..., 4:]).all()

    handle.restore()
    assert model.lm_head is original and original.weight is weight
    assert (model.lm_head.weight is model.get_input_embeddings().weight) == tied
    with torch.no_grad():
        assert torch.equal(model(x).logits, full), "the restored model must score the full vocabulary again"


def test_restore_refuses_when_someone_else_swapped_the_head():
    model = tiny_llama(False)
    handle = sparsify_lm_head_(model)
    model.set_output_embeddings(nn.Linear(32, 131, bias=False))
    with pytest.raises(RuntimeError, match="replaced by someone else"):
        handle.restore()


class _HeadlessModel(nn.Module):
    def __init__(self, head):
        super().__init__()
        self.lm_head = head

    def get_output_embeddings(self):
        return self.lm_head

    def set_output_embeddings(self, new):
        self.lm_head = new


@pytest.mark.parametrize("model, match", [
    (_HeadlessModel(None), "no nn.Linear output head"),                                 # returns None
    (_HeadlessModel(nn.Embedding(131, 32)), "no nn.Linear output head"),                # not a Linear
    (nn.Sequential(nn.Linear(4, 4)), "no nn.Linear output head"),                       # no accessor at all
    (_HeadlessModel(nn.Linear(32, 131, bias=True)), "bias"),
], ids=["none", "embedding", "no-accessor", "bias"])
def test_sparsify_rejects_models_without_a_plain_linear_head(model, match):
    before = getattr(model, "lm_head", None)
    with pytest.raises(TypeError, match=match):
        sparsify_lm_head_(model)
    assert getattr(model, "lm_head", None) is before, "a failed swap must leave the model untouched"


def test_sparsify_twice_raises():
    model = tiny_llama(True)
    handle = sparsify_lm_head_(model)
    with pytest.raises(TypeError, match="already a SparseLMHead"):
        sparsify_lm_head_(model)
    assert model.lm_head is handle.head
    handle.restore()
    handle2 = sparsify_lm_head_(model)          # after restore a new swap works again
    assert handle2.head.weight is handle.original.weight
