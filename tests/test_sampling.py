"""Exactness and distributional tests of `microspec.sampling` (TESTING.md §1, R1, R2; §4 rows 10-14, 17).

  A. R1: the closed forms a = min(1, p/q), r = (p - q)+ / (1 - β) satisfy q·a + (1 - β)·r == p
     (float64, 1e-12).
  B. `process_logits` equals Hugging Face's Temperature -> TopK -> TopP warpers (masks exactly, values 1e-6).
  C. `draft_sample`: q is exactly 0 off the active/unmasked slots, sums to 1, greedy q is one-hot of the
     first argmax, dry rows have has_mass False, and the drawn slot follows q (goodness of fit).
  D. `verify_greedy`: vLLM-style exact cases.
  E. R2: one verification step emits tokens distributed exactly as p, for many (p, q, S) shapes and with
     temperature / top-k / top-p; a deliberately wrong q fails the same test (the test has power).
  F. Edge rows: zero residual, u == 0.0 with p(x) = 0, all -inf rows under processors.
  plus a fixed-noise exactness check of `verify_sampling` against a literal reference of §1 (tier a).
"""
from __future__ import annotations

import numpy as np
import pytest
import torch
from hypothesis import example, given, settings
from hypothesis import strategies as st
from hypothesis.extra.numpy import arrays
from transformers.generation.logits_process import (TemperatureLogitsWarper, TopKLogitsWarper,
                                                    TopPLogitsWarper)

from microspec.sampling import (SamplingConfig, acceptance_and_residual, draft_sample, exponential_race,
                                process_logits, safe_softmax)
from microspec.verification import verify_greedy, verify_sampling

from stats import assert_fits

NEG_INF = float("-inf")
ALPHA = 1e-4
N_GOF = 200_000
MANY = max(200, settings.default.max_examples)  # R1 and B run in milliseconds: more examples than the profile


def exp_noise(shape, g: torch.Generator, dtype=torch.float32) -> torch.Tensor:
    """-log(U), U ~ U[0, 1): the engine's noise for the exponential race."""
    return torch.rand(shape, generator=g, dtype=dtype).log_().neg_()


def softmax64(logits) -> np.ndarray:
    """Reference softmax in float64 (all -inf -> zeros)."""
    x = np.asarray(torch.as_tensor(logits).double().numpy(), dtype=np.float64)
    m = x.max(-1, keepdims=True)
    e = np.where(np.isneginf(x), 0.0, np.exp(x - np.where(np.isfinite(m), m, 0.0)))
    s = e.sum(-1, keepdims=True)
    return e / np.where(s > 0, s, 1.0)


def hf_process(logits: torch.Tensor, cfg: SamplingConfig) -> torch.Tensor:
    """Hugging Face's warpers, added the way `generate` adds them (TopP only when top_p < 1)."""
    scores = logits.clone()
    ids = torch.zeros(scores.shape[0], 1, dtype=torch.long)
    if cfg.temperature != 1.0:
        scores = TemperatureLogitsWarper(float(cfg.temperature))(ids, scores)
    if cfg.top_k is not None:
        scores = TopKLogitsWarper(cfg.top_k)(ids, scores)
    if cfg.top_p is not None and cfg.top_p < 1.0:
        scores = TopPLogitsWarper(cfg.top_p)(ids, scores)
    return scores


# ============================================================================ A. R1 deterministic identity
def check_identity(p: torch.Tensor, q: torch.Tensor) -> None:
    """q·a + (1 - β)·r == p elementwise (1e-12), plus the side conditions of a and r."""
    a, r = acceptance_and_residual(p, q)
    beta = torch.minimum(p, q).sum(-1, keepdim=True)
    lhs = q * a + (1.0 - beta) * r
    err = (lhs - p).abs()
    assert torch.isfinite(a).all() and torch.isfinite(r).all(), "NaN/inf in a or r"
    where = torch.nonzero(err > 1e-12)[:5].tolist()
    assert err.max() <= 1e-12, f"identity off by {err.max().item():.3e} at {where}"
    assert ((a >= 0) & (a <= 1)).all()
    assert (r >= 0).all()
    torch.testing.assert_close(r.sum(-1), torch.ones_like(r.sum(-1)), atol=1e-12, rtol=0)
    assert (a[q == 0] == 1).all(), "a must be 1 where q = 0"
    assert (a[(p == 0) & (q > 0)] == 0).all(), "a token with p = 0 must have acceptance 0"
    assert (r[p == 0] == 0).all(), "the residual must not put mass where p = 0"


def _probs(logits: np.ndarray) -> torch.Tensor:
    return safe_softmax(torch.from_numpy(np.asarray(logits, dtype=np.float64)))[0]


@st.composite
def p_q_pairs(draw):
    V = draw(st.integers(1, 64))
    elem = st.one_of(st.just(NEG_INF), st.floats(-30, 30), st.sampled_from([0.0, 1.0, -1.0]))
    p_logits = draw(arrays(np.float64, V, elements=elem))
    q_logits = draw(arrays(np.float64, V, elements=elem))
    in_s = draw(arrays(np.bool_, V))
    p_logits[draw(st.integers(0, V - 1))] = draw(st.floats(-5, 5))        # p has some mass
    j = draw(st.integers(0, V - 1))
    in_s[j], q_logits[j] = True, draw(st.floats(-5, 5))                     # S non-empty, q has some mass
    q_logits[~in_s] = NEG_INF                                              # q is exactly 0 outside S
    return p_logits, q_logits


@settings(max_examples=MANY)
@given(p_q_pairs())
@example((np.array([0.0, NEG_INF, 1.0]), np.array([0.0, 2.0, NEG_INF])))   # p zero on part of S
@example((np.array([0.0]), np.array([0.0])))                                # V = 1
def test_r1_identity_hypothesis(pq):
    p_logits, q_logits = pq
    check_identity(_probs(p_logits), _probs(q_logits))


def _r1_case(name: str, V: int, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    s = max(1, V // 4)
    S = rng.permutation(V)[:s]
    p = rng.normal(0, 2, V)
    q = np.full(V, NEG_INF)
    q[S] = rng.normal(0, 2, s)
    if name == "p_mass_outside_S":
        pass
    elif name == "p_eq_q":
        p = q.copy()
    elif name == "q_onehot":
        q = np.full(V, NEG_INF)
        q[S[0]] = 0.0
    elif name == "p_onehot":
        p = np.full(V, NEG_INF)
        p[rng.integers(V)] = 0.0
    elif name == "p_zero_on_part_of_S":
        p[S[: max(1, s // 2)]] = NEG_INF
        if np.isneginf(p).all():
            p[rng.integers(V)] = 0.0
    elif name == "S_full":
        q = rng.normal(0, 2, V)
    elif name == "S_size_1":
        q = np.full(V, NEG_INF)
        q[S[0]] = 3.0
    else:
        raise ValueError(name)
    return p, q


R1_CASES = ["p_mass_outside_S", "p_eq_q", "q_onehot", "p_onehot", "p_zero_on_part_of_S", "S_full", "S_size_1"]


@pytest.mark.parametrize("V", [1, 2, 16, 64])
@pytest.mark.parametrize("name", R1_CASES)
def test_r1_identity_named_cases(name, V):
    rng = np.random.default_rng(1000 + V + 17 * R1_CASES.index(name))
    rows = [_r1_case(name, V, rng) for _ in range(32)]
    p = _probs(np.stack([r[0] for r in rows]))
    q = _probs(np.stack([r[1] for r in rows]))
    check_identity(p, q)
    if name == "p_eq_q":   # p == q: the residual is all zero and the closed form falls back to p, no NaN
        a, r = acceptance_and_residual(p, p)
        assert (a == 1).all() and torch.equal(r, p)


# ============================================================================ B. process_logits == HF warpers
@st.composite
def logits_and_cfg(draw):
    rows, V = draw(st.integers(1, 6)), draw(st.integers(1, 40))
    grid = st.sampled_from([NEG_INF, -3.0, -1.0, -0.5, 0.0, 0.5, 1.0, 2.0])           # ties
    elem = st.one_of(grid, st.floats(-20, 20, width=32))
    logits = draw(arrays(np.float32, (rows, V), elements=elem))
    cfg = SamplingConfig(
        do_sample=True,
        temperature=draw(st.sampled_from([0.3, 0.7, 1.0, 1.5])),
        top_k=draw(st.one_of(st.none(), st.integers(1, V + 3))),
        top_p=draw(st.one_of(st.none(), st.sampled_from([1.0, 0.95]), st.floats(0.01, 1.0))),
    )
    return logits, cfg


def _compare_with_hf(logits: torch.Tensor, cfg: SamplingConfig) -> None:
    ours, ref = process_logits(logits, cfg), hf_process(logits, cfg)
    assert ours.dtype == logits.dtype and ours.shape == logits.shape
    rows = torch.ones(logits.shape[0], dtype=torch.bool)
    if cfg.top_k == 1:
        # Top-k = 1 with a tied maximum: HF keeps every tied token, TESTING.md §8 wants the first argmax
        # only; that case is tested on its own (test_top_k_1_with_tied_max_is_greedy). Compare the rest.
        rows = (logits == logits.amax(-1, keepdim=True)).sum(-1) == 1
    ours, ref = ours[rows], ref[rows]
    mask_ours, mask_ref = torch.isneginf(ours), torch.isneginf(ref)
    bad = torch.nonzero(mask_ours != mask_ref)
    assert bad.numel() == 0, f"-inf masks differ at {bad[:5].tolist()} for {cfg}"
    assert not torch.isnan(ours).any()
    torch.testing.assert_close(ours[~mask_ours], ref[~mask_ref], atol=1e-6, rtol=1e-6)


@settings(max_examples=MANY)
@given(logits_and_cfg())
@example((np.array([[1.0, 3.0, 3.0, 0.0, 3.0]], np.float32), SamplingConfig(True, 1.0, 2, None)))  # ties at k
@example((np.array([[NEG_INF, NEG_INF]], np.float32), SamplingConfig(True, 0.7, 1, 0.5)))         # dry row
@example((np.array([[0.0, -200.0, 1.0]], np.float32), SamplingConfig(True, 1.0, None, 1.0)))      # top_p = 1
def test_process_logits_matches_hf_warpers(case):
    logits, cfg = case
    _compare_with_hf(torch.from_numpy(logits), cfg)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("temperature,top_k,top_p", [(1.0, None, None), (0.7, None, None), (1.0, 5, None),
                                                     (1.0, None, 0.9), (0.6, 10, 0.8), (1.3, 64, 0.5),
                                                     (1.0, 1, None), (2.0, 3, 0.99)])
def test_process_logits_matches_hf_on_wide_rows(dtype, temperature, top_k, top_p):
    g = torch.Generator().manual_seed(11)
    logits = (torch.randn(64, 257, generator=g, dtype=torch.float64) * 3).to(dtype)
    logits[:, ::7] = logits[:, ::7].round()                      # ties
    logits[torch.rand(64, 257, generator=g) < 0.1] = NEG_INF
    _compare_with_hf(logits, SamplingConfig(True, temperature, top_k, top_p))


def test_process_logits_greedy_is_identity_and_promotes():
    logits = torch.tensor([[1.0, NEG_INF, 2.0]], dtype=torch.bfloat16)
    out = process_logits(logits, SamplingConfig(do_sample=False, temperature=0.5, top_k=1))
    assert out.dtype == torch.float32 and torch.equal(out, logits.float())
    out64 = process_logits(logits.double(), SamplingConfig(True, 0.5))
    assert out64.dtype == torch.float64


def test_top_k_1_keeps_only_argmax_without_ties():
    g = torch.Generator().manual_seed(3)
    logits = torch.randn(500, 33, generator=g)
    out = process_logits(logits, SamplingConfig(True, 0.8, 1, 0.7))
    finite = torch.isfinite(out)
    assert (finite.sum(-1) == 1).all()
    assert torch.equal(finite.float().argmax(-1), logits.argmax(-1))


def test_top_k_1_with_tied_max_is_greedy():
    """TESTING.md §8: top_k = 1 picks the temperature-0 token (the first argmax), even with tied logits."""
    logits = torch.tensor([[1.0, 3.0, 0.0, 3.0, 3.0], [NEG_INF, 2.0, 2.0, NEG_INF, 1.0]])
    cfg = SamplingConfig(do_sample=True, temperature=1.0, top_k=1)
    out = process_logits(logits, cfg)
    kept = torch.isfinite(out).sum(-1).tolist()
    assert kept == [1, 1], f"top_k=1 kept {kept} tokens per row (ties at the maximum survive)"
    g = torch.Generator().manual_seed(0)
    N = 2000
    slot, q, ok = draft_sample(logits.repeat(N, 1), cfg, exp_noise((2 * N, 5), g))
    assert ok.all()
    assert torch.equal(slot, torch.argmax(logits, -1).repeat(N)), "top_k=1 drafted a non-first tied token"
    assert torch.equal(q, torch.nn.functional.one_hot(torch.argmax(logits, -1), 5).float().repeat(N, 1))


# ============================================================================ C. draft_sample
@pytest.mark.parametrize("cfg", [SamplingConfig(True), SamplingConfig(True, 0.5, 4, None),
                                 SamplingConfig(True, 1.4, None, 0.6)], ids=["plain", "temp_topk", "topp"])
def test_draft_sample_q_support_and_normalisation(cfg):
    g = torch.Generator().manual_seed(5)
    B, C = 256, 24
    logits = torch.randn(B, C, generator=g) * 2
    n_active = torch.randint(1, C + 1, (B,), generator=g)
    pad = torch.arange(C) >= n_active[:, None]
    logits[pad] = NEG_INF
    logits[torch.rand(B, C, generator=g) < 0.15] = NEG_INF                 # masked active slots
    logits[:7] = NEG_INF                                                     # dry rows
    slot, q, ok = draft_sample(logits, cfg, exp_noise((B, C), g))
    assert q.dtype == torch.float32 and slot.dtype == torch.int64
    assert torch.equal(ok, torch.isfinite(logits).any(-1))
    assert not ok[:7].any() and (q[:7] == 0).all()
    assert (q[torch.isneginf(logits)] == 0).all(), "q must be exactly 0 on -inf (padding / masked) slots"
    assert (q[pad] == 0).all()
    processed = process_logits(logits, cfg)
    assert (q[torch.isneginf(processed)] == 0).all(), "q must be 0 where the processors removed a token"
    torch.testing.assert_close(q[ok].sum(-1), torch.ones(int(ok.sum())), atol=1e-6, rtol=0)
    ref = torch.from_numpy(softmax64(hf_process(logits, cfg))).float()
    torch.testing.assert_close(q, ref, atol=1e-6, rtol=1e-5)
    assert (q[ok].gather(1, slot[ok, None]) > 0).all(), "drafted a slot with q = 0"


def test_draft_sample_greedy_one_hot_first_argmax():
    logits = torch.tensor([[0.0, 2.0, 2.0, NEG_INF], [NEG_INF, NEG_INF, NEG_INF, NEG_INF],
                           [5.0, NEG_INF, 5.0, 1.0], [-1.0, -1.0, -1.0, -1.0]])
    slot, q, ok = draft_sample(logits, SamplingConfig(do_sample=False))
    assert slot.tolist()[0] == 1 and slot.tolist()[2] == 0 and slot.tolist()[3] == 0
    assert ok.tolist() == [True, False, True, True]
    for b in (0, 2, 3):
        assert torch.equal(q[b], torch.nn.functional.one_hot(slot[b], 4).float())


@pytest.mark.parametrize("cfg", [SamplingConfig(True, 0.8, 2, 0.5), SamplingConfig(True, 1.0, None, 0.01)])
def test_draft_sample_all_neg_inf_rows_under_processors(cfg):
    logits = torch.full((3, 6), NEG_INF)
    logits[2, 4] = -1e30
    slot, q, ok = draft_sample(logits, cfg, exp_noise((3, 6), torch.Generator().manual_seed(0)))
    assert ok.tolist() == [False, False, True]
    assert not torch.isnan(q).any()
    assert (q[:2] == 0).all() and q[2, 4] == 1.0 and slot[2] == 4


@pytest.mark.parametrize("cfg", [SamplingConfig(True), SamplingConfig(True, 0.6, 6, 0.9)],
                         ids=["plain", "processed"])
def test_draft_sample_slot_follows_q(cfg):
    """The drawn slot is a sample of the returned q (N = 200k identical rows, independent noise)."""
    g = torch.Generator().manual_seed(21)
    C = 20
    row = torch.randn(C, generator=g) * 1.5
    row[[3, 11]] = NEG_INF                                                   # masked slots
    row[16:] = NEG_INF                                                       # padding slots
    slot, q, ok = draft_sample(row.expand(N_GOF, C), cfg, exp_noise((N_GOF, C), g))
    assert ok.all() and torch.equal(q, q[:1].expand_as(q))
    ref = softmax64(hf_process(row[None], cfg))[0]
    np.testing.assert_allclose(q[0].double().numpy(), ref, atol=1e-6)
    assert_fits(np.bincount(slot.numpy(), minlength=C), ref, ALPHA, label=f"draft_sample {cfg}")


def test_exponential_race_zero_weights_never_win():
    g = torch.Generator().manual_seed(2)
    w = torch.tensor([0.0, 0.3, 0.0, 0.7, 0.0]).expand(50_000, 5)
    noise = exp_noise((50_000, 5), g)
    noise[:, 0] = torch.finfo(torch.float32).tiny                           # 0 / tiny = 0 still loses
    idx = exponential_race(w, noise)
    assert set(idx.unique().tolist()) <= {1, 3}


# ============================================================================ D. verify_greedy exact cases
def _greedy_logits(targets: torch.Tensor, V: int, seed: int = 0) -> torch.Tensor:
    """Random target logits [B, K+1, V] whose argmax at each position is `targets` [B, K+1]."""
    g = torch.Generator().manual_seed(seed)
    logits = torch.randn(*targets.shape, V, generator=g)
    return logits.scatter(-1, targets.unsqueeze(-1), 10.0)


def test_verify_greedy_cases():
    V, K = 50, 4
    tgt = torch.tensor([[5, 6, 7, 8, 9]] * 6)
    drafts = torch.tensor([
        [5, 6, 7, 8],     # perfect match: K accepted + bonus
        [1, 6, 7, 8],     # mismatch at 0
        [5, 6, 1, 8],     # mismatch at 2 (later matches do not count)
        [0, 0, 0, 0],     # all mismatch
        [5, 6, 7, 8],     # matches, but the drafter ran dry from position 2
        [5, 6, 7, 1],     # mismatch at the last draft
    ])
    valid = torch.ones(6, K, dtype=torch.bool)
    valid[4, 2:] = False
    logits = _greedy_logits(tgt, V)
    v = verify_greedy(drafts, valid, logits)
    assert v.n_accepted.tolist() == [4, 0, 2, 0, 2, 3]
    assert v.tokens.shape == (6, K + 1)
    assert torch.equal(v.tokens, tgt), "committed tokens must be the target argmaxes (incl. the bonus token)"


def test_verify_greedy_ties_take_first_index():
    logits = torch.zeros(1, 2, 6)
    logits[0, 0, [2, 4]] = 1.0
    logits[0, 1, [1, 5]] = 3.0
    v = verify_greedy(torch.tensor([[4]]), torch.tensor([[True]]), logits)
    assert v.n_accepted.tolist() == [0] and v.tokens[0, 0] == 2
    v = verify_greedy(torch.tensor([[2]]), torch.tensor([[True]]), logits)
    assert v.n_accepted.tolist() == [1] and v.tokens[0].tolist() == [2, 1]


# ====================================================================== tier (a): verify_sampling exactness
def _reference_verify(draft, valid, q_slots, active_ids, target_logits, cfg, uniforms, noise):
    """TESTING.md §1 written literally, one row at a time, float64."""
    B, K = draft.shape
    p_all = safe_softmax(process_logits(target_logits.double(), cfg))[0]
    n_acc, out = [], []
    for b in range(B):
        ids = active_ids[b if active_ids.shape[0] > 1 else 0]
        q_full = torch.zeros(K, p_all.shape[-1], dtype=torch.float64)
        live = ids >= 0
        q_full[:, ids[live]] = q_slots[b][:, live].double()
        j = 0
        while j < K and bool(valid[b, j]):
            x = int(draft[b, j])
            if not float(uniforms[b, j]) * float(q_full[j, x]) < float(p_all[b, j, x]):
                break
            j += 1
        if j < K:
            res = (p_all[b, j] - q_full[j]).clamp_min(0)
            dist = res if res.sum() > 0 else p_all[b, j]
        else:
            dist = p_all[b, K]
        tok = int(torch.argmax(dist / noise[b].double()))
        n_acc.append(j)
        out.append(draft[b, :j].tolist() + [tok])
    return n_acc, out


@pytest.mark.parametrize("K", [1, 2, 3])
@pytest.mark.parametrize("shared", [True, False])
@pytest.mark.parametrize("cfg", [SamplingConfig(True), SamplingConfig(True, 0.7, 8, 0.9)],
                         ids=["plain", "processed"])
def test_verify_sampling_matches_literal_reference(K, shared, cfg):
    g = torch.Generator().manual_seed(100 + K)
    B, V, C = 400, 40, 12
    R = 1 if shared else B
    active_ids = torch.stack([torch.randperm(V, generator=g)[:C] for _ in range(R)])
    n_act = torch.randint(1, C + 1, (R,), generator=g)
    active_ids[torch.arange(C) >= n_act[:, None]] = -1
    # Target logits close to the drafter's on S, so every acceptance count 0..K occurs.
    t_logits = torch.randn(B, K + 1, V, generator=g) * 2
    d_logits = t_logits[:, :K].gather(-1, active_ids.clamp(min=0).expand(B, -1)[:, None].expand(B, K, C))
    d_logits = d_logits + 0.5 * torch.randn(B, K, C, generator=g)
    d_logits = d_logits.masked_fill((active_ids < 0).expand(B, -1)[:, None], NEG_INF)
    d_logits[:5] = NEG_INF                                                   # dry rows draft nothing
    slots, qs, oks = zip(*(draft_sample(d_logits[:, i], cfg, exp_noise((B, C), g)) for i in range(K)))
    slots, q_slots = torch.stack(slots, 1), torch.stack(qs, 1)
    valid = torch.stack(oks, 1).long().cumprod(1).bool()
    valid[5:20, -1] = False                                                  # drafter ran dry late
    draft = active_ids.expand(B, -1).gather(1, slots).clamp(min=0)
    uniforms = torch.rand(B, K, generator=g, dtype=torch.float64)
    uniforms[20:30] = 0.0                                                    # u = 0: accept iff p(x) > 0
    noise = exp_noise((B, V), g)
    v = verify_sampling(draft, valid, q_slots, slots, active_ids, t_logits, cfg, uniforms, noise)
    n_ref, tok_ref = _reference_verify(draft, valid, q_slots, active_ids, t_logits, cfg, uniforms, noise)
    assert v.n_accepted.tolist() == n_ref
    got = [v.tokens[b, : n + 1].tolist() for b, n in enumerate(n_ref)]
    assert got == tok_ref
    assert set(n_ref) == set(range(K + 1)), f"acceptance counts seen: {sorted(set(n_ref))}"


# ========================================================================= E. R2 single-step goodness of fit
def _r2_case(name: str, V: int, seed: int):
    """(target logits [V], drafter slot logits [C], active_ids [1, C]) for one named R2 case.
    The slot order is a random permutation (slot-stable policies are not sorted); 3 padding slots follow."""
    rng = np.random.default_rng(seed)
    s = max(1, V // 4)
    if name == "S_full":
        s = V
    if name == "S_size_1":
        s = 1
    S = rng.permutation(V)[:s]
    C = s + (0 if name == "S_full" else 3)
    ids = np.full(C, -1)
    ids[:s] = S
    p = rng.normal(0, 1.5, V).astype(np.float32)
    d = np.full(C, NEG_INF, np.float32)
    d[:s] = rng.normal(0, 1.5, s)
    if name == "p_eq_q":
        p[:] = NEG_INF
        p[S] = d[:s]
    elif name == "q_onehot":
        d[:s] = NEG_INF
        d[rng.integers(s)] = 0.0
    elif name == "p_onehot_in_S":
        p[:] = NEG_INF
        p[S[rng.integers(s)]] = 0.0
    elif name == "p_onehot_outside_S":
        p[:] = NEG_INF
        p[rng.choice(np.setdiff1d(np.arange(V), S))] = 0.0
    elif name == "p_zero_on_part_of_S":
        p[S[: max(1, s // 2)]] = NEG_INF
        p[rng.choice(np.setdiff1d(np.arange(V), S), V // 8, replace=False)] = NEG_INF
    elif name == "p_near_q_on_S":                   # high acceptance, small residual, p mass outside S
        p[S] = d[:s] + 1.0
    return torch.from_numpy(p), torch.from_numpy(d), torch.from_numpy(ids)[None]


def single_step(p_logits, d_logits, active_ids, cfg, N, seed, bonus_logits=None, wrong_q=None):
    """One K = 1 verification step on N identical rows with independent noise. Returns the Verdict."""
    g = torch.Generator().manual_seed(seed)
    V, C = p_logits.shape[-1], d_logits.shape[-1]
    slot, q, ok = draft_sample(d_logits.expand(N, C), cfg, exp_noise((N, C), g))
    if wrong_q is not None:
        q = wrong_q(q)
    draft = active_ids[0, slot].clamp(min=0)
    if bonus_logits is None:
        bonus_logits = p_logits.flip(-1)
    t_logits = torch.stack([p_logits, bonus_logits]).expand(N, 2, V)
    uniforms = torch.rand(N, 1, generator=g, dtype=torch.float64)
    return verify_sampling(draft[:, None], ok[:, None], q[:, None], slot[:, None], active_ids, t_logits, cfg,
                           uniforms, exp_noise((N, V), g))


R2_CASES = ["p_mass_outside_S", "p_eq_q", "q_onehot", "p_onehot_in_S", "p_onehot_outside_S",
            "p_zero_on_part_of_S", "S_size_1", "S_full", "p_near_q_on_S"]
R2_CFGS = {"plain": SamplingConfig(True), "temp0.7": SamplingConfig(True, 0.7),
           "topk5_temp1.3": SamplingConfig(True, 1.3, 5), "topp0.8": SamplingConfig(True, 1.0, None, 0.8),
           "all": SamplingConfig(True, 0.8, 12, 0.9)}


def _check_step(p_logits, d_logits, ids, cfg, seed, label):
    V = p_logits.shape[-1]
    bonus = p_logits.flip(-1)
    v = single_step(p_logits, d_logits, ids, cfg, N_GOF, seed, bonus_logits=bonus)
    p = softmax64(hf_process(p_logits[None], cfg))[0]
    emitted = v.tokens[:, 0].numpy()
    assert_fits(np.bincount(emitted, minlength=V), p, ALPHA, label=f"R2 {label}")
    acc = v.n_accepted.numpy() == 1
    if acc.sum() >= 1000:            # the bonus token after an accepted draft follows the next position's p
        p2 = softmax64(hf_process(bonus[None], cfg))[0]
        assert_fits(np.bincount(v.tokens[acc, 1].numpy(), minlength=V), p2, ALPHA, label=f"R2 bonus {label}")
    return v


@pytest.mark.parametrize("V", [16, 64])
@pytest.mark.parametrize("name", R2_CASES)
def test_r2_single_step_fits_target(name, V):
    p_logits, d_logits, ids = _r2_case(name, V, seed=7 * V + R2_CASES.index(name))
    v = _check_step(p_logits, d_logits, ids, R2_CFGS["plain"], 1 + R2_CASES.index(name), f"{name} V={V}")
    rate = v.n_accepted.double().mean().item()
    if name == "p_eq_q":
        assert rate > 0.999, f"p == q must accept (almost) always, got {rate}"
    if name == "p_onehot_outside_S":
        assert rate == 0.0


@pytest.mark.parametrize("cfg_name", ["temp0.7", "topk5_temp1.3", "topp0.8", "all"])
@pytest.mark.parametrize("name", ["p_mass_outside_S", "p_near_q_on_S"])
def test_r2_single_step_with_processors(name, cfg_name):
    V = 64
    p_logits, d_logits, ids = _r2_case(name, V, seed=500 + R2_CASES.index(name))
    _check_step(p_logits, d_logits, ids, R2_CFGS[cfg_name], 40 + len(cfg_name), f"{name} {cfg_name}")


@pytest.mark.parametrize("bug", ["q_before_processors", "q_misaligned_slots", "q_uniform"])
def test_r2_has_power_against_wrong_q(bug):
    """HF #32867 / #47932-style bugs (q is not the distribution the draft was sampled from) must FAIL R2."""
    V = 16
    p_logits, d_logits, ids = _r2_case("p_near_q_on_S", V, seed=3)
    cfg = SamplingConfig(True, 0.5)
    C = d_logits.shape[-1]
    wrong = {
        "q_before_processors": lambda q: safe_softmax(d_logits.float())[0].expand_as(q),     # T not applied
        "q_misaligned_slots": lambda q: torch.cat([q[:, 1:V // 4], q[:, :1], q[:, V // 4:]], 1),
        "q_uniform": lambda q: (torch.arange(C) < V // 4).float().div(V // 4).expand_as(q),
    }[bug]
    v = single_step(p_logits, d_logits, ids, cfg, N_GOF, seed=9, wrong_q=wrong)
    p = softmax64(hf_process(p_logits[None], cfg))[0]
    with pytest.raises(AssertionError, match="pval"):
        assert_fits(np.bincount(v.tokens[:, 0].numpy(), minlength=V), p, ALPHA, label=f"wrong q: {bug}")
    # ... while the correct q passes with the very same noise.
    v = single_step(p_logits, d_logits, ids, cfg, N_GOF, seed=9)
    assert_fits(np.bincount(v.tokens[:, 0].numpy(), minlength=V), p, ALPHA, label="right q (power control)")


# ============================================================================ F. edge rows
def test_zero_residual_falls_back_to_p():
    """p == q exactly with a rejection forced (drafter dry at position 0): the residual (p - q)+ is all zero;
    no division by zero, and the token is drawn from p."""
    g = torch.Generator().manual_seed(8)
    V, N = 16, N_GOF
    ids = torch.arange(V)[None]
    p_logits = torch.randn(V, generator=g)
    p_logits[[2, 9]] = NEG_INF
    p = safe_softmax(p_logits)[0]
    q = p.expand(N, 1, V)                                                    # q == p over the full vocabulary
    draft = torch.zeros(N, 1, dtype=torch.long)
    valid = torch.zeros(N, 1, dtype=torch.bool)
    v = verify_sampling(draft, valid, q, draft, ids, p_logits.expand(N, 2, V), SamplingConfig(True),
                        torch.rand(N, 1, generator=g, dtype=torch.float64), exp_noise((N, V), g))
    assert (v.n_accepted == 0).all()
    assert_fits(np.bincount(v.tokens[:, 0].numpy(), minlength=V), p.double().numpy(), ALPHA,
                label="zero residual")
    a, r = acceptance_and_residual(p.double(), p.double())
    assert not torch.isnan(r).any() and torch.equal(r, p.double()) and (a == 1).all()


def test_p_equal_q_via_separate_softmaxes_no_nan():
    """p over V and q over S computed from the same logits (rounding differences only): no NaN, accepts."""
    V, N = 64, 50_000
    p_logits, d_logits, ids = _r2_case("p_eq_q", V, seed=77)
    v = single_step(p_logits, d_logits, ids, SamplingConfig(True), N, seed=4)
    assert (v.tokens >= 0).all() and (v.tokens < V).all()
    assert v.n_accepted.double().mean() > 0.999


def test_uniform_zero_never_accepts_zero_probability_token():
    """u = 0.0 exactly (possible with U[0, 1)): accept iff 0 < p(x), so a draft with p(x) = 0 is rejected."""
    V, K, B = 12, 3, 64
    g = torch.Generator().manual_seed(6)
    t_logits = torch.randn(B, K + 1, V, generator=g)
    t_logits[..., 0] = NEG_INF                                               # p(0) = 0 everywhere
    ids = torch.tensor([[0, 1, 2, 3]])
    d_logits = torch.zeros(B, 4)
    d_logits[:, 0] = 5.0                                                     # q(0) large
    draft = torch.tensor([[0, 1, 2]] * (B // 2) + [[1, 0, 2]] * (B // 2))
    slots = draft.clone()
    q = safe_softmax(d_logits)[0][:, None].expand(B, K, 4)
    u = torch.zeros(B, K, dtype=torch.float64)
    v = verify_sampling(draft, torch.ones(B, K, dtype=torch.bool), q, slots, ids, t_logits,
                        SamplingConfig(True), u, exp_noise((B, V), g))
    assert v.n_accepted[: B // 2].tolist() == [0] * (B // 2)                 # token 0 first: rejected at once
    assert v.n_accepted[B // 2:].tolist() == [1] * (B // 2)                  # 1 accepted, then 0 rejected
    committed_next = v.tokens.gather(1, v.n_accepted[:, None]).squeeze(1)
    assert (committed_next != 0).all(), "the residual drew a token with p = 0"


def test_verify_sampling_dry_row_draws_from_p():
    """draft_valid False at position 0 (the drafter had no mass): nothing is accepted, token ~ p."""
    V, N = 16, N_GOF
    g = torch.Generator().manual_seed(12)
    p_logits = torch.randn(V, generator=g) * 1.3
    p_logits[5] = NEG_INF
    ids = torch.tensor([[3, 4, -1]])
    d_logits = torch.full((N, 3), NEG_INF)
    slot, q, ok = draft_sample(d_logits, SamplingConfig(True), exp_noise((N, 3), g))
    assert not ok.any() and (q == 0).all()
    draft = ids[0, slot].clamp(min=0)
    v = verify_sampling(draft[:, None], ok[:, None], q[:, None], slot[:, None], ids, p_logits.expand(N, 2, V),
                        SamplingConfig(True), torch.rand(N, 1, generator=g, dtype=torch.float64),
                        exp_noise((N, V), g))
    assert (v.n_accepted == 0).all()
    assert_fits(np.bincount(v.tokens[:, 0].numpy(), minlength=V), softmax64(p_logits), ALPHA, label="dry row")
