"""Tree verification (`microspec.verification.tree`): the three tiers of TESTING.md, for trees.

  A. Greedy: `verify_tree_greedy` == its loop reference on random trees (Hypothesis), hand-built cases
     (deepest path, ties, invalid nodes, duplicate siblings, truncation), and a chain == `verify_greedy`.
  B. Sampling, fixed noise: `verify_tree_sampling` == its loop reference bit for bit on random trees, and a
     chain with one-hot proposals == the chain verifier `verify_sampling`.
  C. Sampling, exact identity (tier a): the real verifier is driven through every accept/reject branch of
     the sibling tests and every drawn token (representative uniforms and noise), each branch weighted by its
     probability in float64; the law of the committed sequence must equal the target's law (product of the
     processed p along the sequence) to 1e-12, for several trees, sibling orders and processed
     distributions. The branch thresholds themselves are checked against p'(x) / Σp' to 1e-9.
  D. Sampling, goodness of fit (tier b): 200k rows of fresh noise, G-test of the committed sequences.
"""
from __future__ import annotations

import itertools

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from microspec.drafting.base import Drafts
from microspec.drafting.tree import ancestor_mask
from microspec.sampling import SamplingConfig, process_logits, safe_softmax
from microspec.verification import verify_greedy, verify_sampling
from microspec.verification.tree import (verify_tree_greedy, verify_tree_greedy_ref, verify_tree_sampling,
                                         verify_tree_sampling_ref)

from stats import assert_fits

NEG_INF = float("-inf")
CFGS = {"plain": SamplingConfig(True), "temp0.6": SamplingConfig(True, 0.6),
        "topk2": SamplingConfig(True, 1.0, 2), "topk1": SamplingConfig(True, 1.0, 1),
        "topp0.7": SamplingConfig(True, 1.0, None, 0.7), "all": SamplingConfig(True, 1.3, 3, 0.85)}


def exp_noise(shape, g: torch.Generator) -> torch.Tensor:
    return torch.rand(shape, generator=g, dtype=torch.float64).log_().neg_()


def make_drafts(parents, tokens, valid=None) -> Drafts:
    """Drafts [B, N] from per-row lists or tensors (parents in block indices; depth and mask derived)."""
    parents = torch.as_tensor(parents, dtype=torch.long)
    tokens = torch.as_tensor(tokens, dtype=torch.long)
    valid = torch.ones_like(tokens, dtype=torch.bool) if valid is None else \
        torch.as_tensor(valid, dtype=torch.bool)
    mask = ancestor_mask(parents)
    depth = mask[:, 1:].sum(-1) - 1                                         # ancestors incl. root, minus 1
    return Drafts(tokens, parents, depth, valid, tree_mask=mask)


def random_tree(g: torch.Generator, B: int, N: int, V: int, p_valid: float = 0.9) -> Drafts:
    """Random trees in block order: node i hangs from a block index in [0, i]; tokens in [0, V)."""
    parents = torch.zeros(B, N, dtype=torch.long)
    for i in range(N):
        parents[:, i] = torch.randint(0, i + 1, (B,), generator=g)
    tokens = torch.randint(0, V, (B, N), generator=g)
    return make_drafts(parents, tokens, torch.rand(B, N, generator=g) < p_valid)


def matching_logits(g: torch.Generator, drafts: Drafts, V: int, p_match: float = 0.75) -> torch.Tensor:
    """Greedy target logits [B, N+1, V] whose argmax at a block is often the token of one of its children."""
    B, N = drafts.tokens.shape
    logits = torch.randn(B, N + 1, V, generator=g, dtype=torch.float64)
    for b in range(B):
        for j in range(N + 1):
            kids = [i for i in range(N) if int(drafts.parents[b, i]) == j]
            if kids and torch.rand(1, generator=g).item() < p_match:
                pick = kids[int(torch.randint(len(kids), (1,), generator=g))]
                logits[b, j, drafts.tokens[b, pick]] = 10.0
    return logits


def assert_verdicts_equal(got, ref):
    assert torch.equal(got.n_accepted, ref.n_accepted), f"n_accepted {got.n_accepted} vs {ref.n_accepted}"
    assert torch.equal(got.path, ref.path), f"path\n{got.path}\nvs\n{ref.path}"
    assert torch.equal(got.tokens, ref.tokens), f"tokens\n{got.tokens}\nvs\n{ref.tokens}"


# ===================================================================================== A. greedy
@settings(max_examples=max(60, settings.default.max_examples), deadline=None)
@given(seed=st.integers(0, 2**31 - 1), B=st.integers(1, 6), N=st.integers(0, 14),
       V=st.sampled_from([2, 3, 7, 50]), max_depth=st.one_of(st.none(), st.integers(0, 6)))
def test_greedy_matches_reference(seed, B, N, V, max_depth):
    g = torch.Generator().manual_seed(seed)
    drafts = random_tree(g, B, N, V)
    logits = matching_logits(g, drafts, V)
    got = verify_tree_greedy(drafts, logits, max_depth)
    assert_verdicts_equal(got, verify_tree_greedy_ref(drafts, logits, max_depth))
    assert got.tokens.shape == (B, (N if max_depth is None else max_depth) + 1)
    # Without the precomputed mask (parents only) the verdict is the same.
    no_mask = Drafts(drafts.tokens, drafts.parents, drafts.depth, drafts.valid)
    assert_verdicts_equal(verify_tree_greedy(no_mask, logits, max_depth), got)


def test_greedy_hand_built_tree():
    # block: 1:a(5)@0  2:b(6)@0  3:c(7)@1  4:d(8)@2  5:e(6)@0 (duplicate of b)  6:f(9)@5  7:g(4)@6
    parents = [[0, 0, 1, 2, 0, 5, 6]] * 5
    tokens = [[5, 6, 7, 8, 6, 9, 4]] * 5
    valid = [[True] * 7, [True] * 7, [True, True, True, True, True, False, True], [True] * 7, [True] * 7]
    drafts = make_drafts(parents, tokens, valid)
    best = torch.tensor([          # the target's argmax at each block
        [6, 7, 8, 0, 1, 9, 4, 2],   # b -> d (depth 2), but the duplicate e -> f -> g goes 3 deep and wins
        [5, 7, 0, 0, 1, 0, 0, 0],   # a -> c accepted, bonus = argmax at c
        [6, 7, 0, 0, 1, 9, 4, 2],   # d wrong, f invalid: b and e both reach depth 1 -> tie: b (block 2)
        [0, 7, 8, 0, 1, 9, 4, 2],   # nothing accepted: the corrected token is the argmax at the root
        [6, 7, 8, 3, 1, 9, 0, 2],   # g wrong: b -> d and e -> f tie at depth 2 -> d (block 4)
    ])
    logits = torch.nn.functional.one_hot(best, 12).double()
    v = verify_tree_greedy(drafts, logits)
    assert v.n_accepted.tolist() == [3, 2, 1, 0, 2]
    assert v.path[:, :4].tolist() == [[0, 5, 6, 7], [0, 1, 3, 3], [0, 2, 2, 2], [0, 0, 0, 0], [0, 2, 4, 4]]
    assert v.tokens[:, :4].tolist() == [[6, 9, 4, 2], [5, 7, 0, 0], [6, 0, 0, 0], [0, 0, 0, 0], [6, 8, 1, 1]]
    assert_verdicts_equal(v, verify_tree_greedy_ref(drafts, logits))
    # Truncation: with max_depth 1 only depth-1 nodes can be accepted; M = 2.
    t = verify_tree_greedy(drafts, logits, max_depth=1)
    assert t.n_accepted.tolist() == [1, 1, 1, 0, 1] and t.tokens.shape == (5, 2)
    assert t.tokens.tolist() == [[6, 8], [5, 7], [6, 0], [0, 0], [6, 8]]


def test_greedy_ties_between_equal_depths_take_smallest_block():
    drafts = make_drafts([[0, 0, 1, 2]], [[3, 3, 1, 1]])               # two identical branches
    logits = torch.nn.functional.one_hot(torch.tensor([[3, 1, 1, 0, 0]]), 5).float()
    v = verify_tree_greedy(drafts, logits)
    assert v.n_accepted.tolist() == [2] and v.path[0, :3].tolist() == [0, 1, 3]


@settings(max_examples=max(40, settings.default.max_examples), deadline=None)
@given(seed=st.integers(0, 2**31 - 1), B=st.integers(1, 6), K=st.integers(1, 8),
       V=st.sampled_from([2, 5, 40]))
def test_chain_is_a_special_case_of_greedy(seed, B, K, V):
    g = torch.Generator().manual_seed(seed)
    draft = torch.randint(0, V, (B, K), generator=g)
    valid = torch.rand(B, K, generator=g) < 0.9
    chain = make_drafts([list(range(K))] * B, draft.tolist(), valid.tolist())
    assert torch.equal(chain.depth, torch.arange(1, K + 1).expand(B, K))
    logits = matching_logits(g, chain, V, p_match=0.8)
    ref = verify_greedy(draft, valid, logits)
    for d in (chain, Drafts(draft, chain.parents, chain.depth, valid)):           # with / without tree_mask
        v = verify_tree_greedy(d, logits, max_depth=K)
        assert torch.equal(v.n_accepted, ref.n_accepted)
        committed = torch.arange(K + 1) <= ref.n_accepted.unsqueeze(1)
        assert torch.equal(v.tokens[committed], ref.tokens[committed])
        assert torch.equal(v.path[committed], torch.arange(K + 1).expand(B, -1)[committed])


# ============================================================================ B. sampling, fixed noise
@settings(max_examples=max(40, settings.default.max_examples), deadline=None)
@given(seed=st.integers(0, 2**31 - 1), B=st.integers(1, 6), N=st.integers(0, 12),
       V=st.sampled_from([3, 6, 30]), cfg=st.sampled_from(sorted(CFGS)),
       max_depth=st.one_of(st.none(), st.integers(0, 5)),
       dtype=st.sampled_from([torch.float32, torch.float64]))
def test_sampling_matches_reference(seed, B, N, V, cfg, max_depth, dtype):
    g = torch.Generator().manual_seed(seed)
    drafts = random_tree(g, B, N, V)
    logits = (matching_logits(g, drafts, V, p_match=0.5) * 0.3).to(dtype)       # flat-ish: accepts happen
    uniforms = torch.rand(B, N, generator=g, dtype=torch.float64)
    uniforms[:, ::3] = 0.0                                                      # u = 0 accepts iff p'(x) > 0
    noise = exp_noise((B, V), g)
    got = verify_tree_sampling(drafts, logits, CFGS[cfg], uniforms, noise, max_depth)
    ref = verify_tree_sampling_ref(drafts, logits, CFGS[cfg], uniforms, noise, max_depth)
    assert_verdicts_equal(got, ref)


@pytest.mark.parametrize("cfg", ["plain", "all"])
def test_sampling_chain_equals_chain_verifier_with_one_hot_q(cfg):
    """A greedy-drafted chain (q one-hot) under sampling: the sibling test is speculative sampling."""
    g = torch.Generator().manual_seed(5)
    B, K, V, C = 3000, 3, 6, 6
    ids = torch.arange(C).unsqueeze(0)
    slots = torch.randint(0, C, (B, K), generator=g)
    valid = torch.rand(B, K, generator=g) < 0.95
    q = torch.nn.functional.one_hot(slots, C).double() * valid.unsqueeze(-1)       # a dry drafter row: q = 0
    logits = torch.randn(B, K + 1, V, generator=g, dtype=torch.float64)
    uniforms = torch.rand(B, K, generator=g, dtype=torch.float64)
    noise = exp_noise((B, V), g)
    ref = verify_sampling(slots, valid, q, slots, ids, logits, CFGS[cfg], uniforms, noise)
    chain = make_drafts([list(range(K))] * B, slots, valid)
    v = verify_tree_sampling(chain, logits, CFGS[cfg], uniforms, noise, max_depth=K)
    assert torch.equal(v.n_accepted, ref.n_accepted)
    committed = torch.arange(K + 1) <= ref.n_accepted.unsqueeze(1)
    assert torch.equal(v.tokens[committed], ref.tokens[committed])
    assert set(ref.n_accepted.tolist()) == set(range(K + 1))


def test_bad_inputs_are_rejected():
    d = make_drafts([[0, 1]], [[1, 2]])
    with pytest.raises(ValueError, match=r"target_logits must be \[B, N\+1, V\]"):
        verify_tree_greedy(d, torch.zeros(1, 2, 5))
    with pytest.raises(ValueError, match="do_sample"):
        verify_tree_sampling(d, torch.zeros(1, 3, 5), SamplingConfig(), torch.zeros(1, 2), torch.ones(1, 5))
    with pytest.raises(ValueError, match="uniforms must be"):
        verify_tree_sampling(d, torch.zeros(1, 3, 5), CFGS["plain"], torch.zeros(1, 3), torch.ones(1, 5))
    with pytest.raises(ValueError, match="max_depth"):
        verify_tree_greedy(d, torch.zeros(1, 3, 5), max_depth=-1)


# ======================================================================== C. exact identity (enumeration)
# Trees over V = 5 (parents in block indices, tokens, valid): siblings in different orders, a duplicate
# sibling token, an invalid node, a depth-3 path, and a star whose children cover the whole vocabulary.
TREES = {
    "mixed": ([0, 0, 0, 1, 1, 2, 4, 2], [1, 3, 1, 2, 0, 4, 2, 0], [1, 1, 1, 1, 1, 1, 1, 0]),
    "mixed_reordered": ([0, 0, 0, 2, 2, 1, 4, 1], [3, 1, 1, 4, 0, 2, 2, 0], [1, 1, 1, 1, 0, 1, 1, 1]),
    "star": ([0, 0, 0, 0, 0], [4, 2, 0, 3, 1], [1, 1, 1, 1, 1]),
    "chain": ([0, 1, 2, 3], [2, 2, 0, 1], [1, 1, 1, 1]),
}
V5 = 5


def _target_probs(logits: torch.Tensor, cfg: SamplingConfig) -> np.ndarray:
    return safe_softmax(process_logits(logits, cfg))[0].double().numpy()             # [N+1, V]


def _kids(parents, valid, c):
    return [i + 1 for i, (par, ok) in enumerate(zip(parents, valid)) if par == c and ok]


def _thresholds(parents, tokens, valid, p):
    """a[i]: probability that node i passes its test given that it is tested (earlier siblings rejected)."""
    a = np.zeros(len(parents))
    for c in range(len(parents) + 1):
        rest = p[c].copy()
        for i in _kids(parents, valid, c):
            x = tokens[i - 1]
            a[i - 1] = rest[x] / rest.sum() if rest.sum() > 0 else 0.0
            rest[x] = 0.0
    return a


def _target_law(parents, tokens, valid, p, D) -> dict:
    """Law of the committed sequence under the target: Π p along it; stop at a token no child carries."""
    law = {}

    def walk(c, prefix, prob, d):
        kids = _kids(parents, valid, c) if d < D else []
        first = {}
        for i in kids:
            first.setdefault(tokens[i - 1], i)
        for y in range(V5):
            if p[c, y] == 0:
                continue
            if y in first:
                walk(first[y], prefix + (y,), prob * p[c, y], d + 1)
            else:
                law[prefix + (y,)] = law.get(prefix + (y,), 0.0) + prob * p[c, y]

    walk(0, (), 1.0, 0)
    return law


@pytest.mark.parametrize("max_depth", [None, 1])
@pytest.mark.parametrize("cfg", sorted(CFGS))
@pytest.mark.parametrize("tree", sorted(TREES))
def test_sampling_exact_identity(tree, cfg, max_depth):
    parents, tokens, valid = TREES[tree]
    N, cfg_ = len(parents), CFGS[cfg]
    D = N if max_depth is None else max_depth
    drafts1 = make_drafts([parents], [tokens], [[bool(v) for v in valid]])
    g = torch.Generator().manual_seed(sum(map(ord, tree + cfg)))
    logits = torch.randn(N + 1, V5, generator=g, dtype=torch.float64) * 1.5
    logits[1, 3] = NEG_INF                                                      # a zero-probability token
    p = _target_probs(logits, cfg_)
    a = _thresholds(parents, tokens, valid, p)
    depth = drafts1.depth[0].tolist()
    # The thresholds the verifier uses are p'(x) / Σp' (checked at a·(1 ∓ 1e-9) on every reachable node).
    rows = []
    for i in range(N):
        if not (0 < a[i] < 1 - 1e-8) or depth[i] > D:
            continue
        u = np.full(N, 1 - 1e-12)
        anc, c = [], i + 1
        while c:
            anc.append(c)
            c = parents[c - 1]
        if any(a[j - 1] == 0 for j in anc[1:]):
            continue
        for j in anc[1:]:
            u[j - 1] = 0.0
        for s in (1 - 1e-9, 1 + 1e-9):
            u[i] = a[i] * s
            rows.append((i, s < 1, u.copy()))
    if rows:
        B = len(rows)
        v = verify_tree_sampling(Drafts(*(t.expand(B, -1) for t in (drafts1.tokens, drafts1.parents,
                                                                     drafts1.depth, drafts1.valid)),
                                        tree_mask=drafts1.tree_mask.expand(B, -1, -1)),
                                 logits.expand(B, -1, -1), cfg_, torch.tensor(np.stack([r[2] for r in rows])),
                                 torch.ones(B, V5, dtype=torch.float64), max_depth)
        for r, (i, expect, _) in enumerate(rows):
            assert (i + 1 in v.path[r].tolist()) == expect, f"node {i}: threshold is not a = {a[i]:.6f}"
    # Every accept/reject combination of the nodes that can go either way, times every drawn token.
    free = [i for i in range(N) if 0 < a[i] < 1]
    boxes = list(itertools.product([0, 1], repeat=len(free)))
    B = len(boxes) * V5
    u = np.tile(np.where(a >= 1, 0.0, 1 - 1e-12), (B, 1))
    weight = np.ones(B)
    for bi, box in enumerate(boxes):
        for i, acc in zip(free, box):
            u[bi * V5: (bi + 1) * V5, i] = 0.0 if acc else 1 - 1e-12
            weight[bi * V5: (bi + 1) * V5] *= a[i] if acc else 1 - a[i]
    y = np.tile(np.arange(V5), len(boxes))
    noise = np.ones((B, V5))
    noise[np.arange(B), y] = 1e-300                                             # y wins iff its weight > 0
    d = Drafts(*(t.expand(B, -1) for t in (drafts1.tokens, drafts1.parents, drafts1.depth, drafts1.valid)),
               tree_mask=drafts1.tree_mask.expand(B, -1, -1))
    v = verify_tree_sampling(d, logits.expand(B, -1, -1), cfg_, torch.tensor(u), torch.tensor(noise),
                             max_depth)
    law = {}
    for r in range(B):
        n = int(v.n_accepted[r])
        final = int(v.path[r, n])
        kids = _kids(parents, valid, final) if depth_of(final, depth) < D else []
        resid = p[final].copy()
        for i in kids:
            resid[tokens[i - 1]] = 0.0
        resid = resid if resid.sum() > 0 else p[final].copy()
        q_y = resid[y[r]] / resid.sum()
        drawn = int(v.tokens[r, n])
        assert (drawn == y[r]) == (q_y > 0), f"row {r}: drew {drawn}, forced {y[r]} with residual {q_y}"
        if weight[r] * q_y > 0:
            seq = tuple(v.tokens[r, : n + 1].tolist())
            law[seq] = law.get(seq, 0.0) + weight[r] * q_y
    target = _target_law(parents, tokens, valid, p, D)
    keys = sorted(set(law) | set(target))
    diff = max(abs(law.get(k, 0.0) - target.get(k, 0.0)) for k in keys)
    table = [(k, law.get(k), target.get(k)) for k in keys]
    assert diff <= 1e-12, f"committed-sequence law off by {diff:.3e}: {table}"
    first = np.zeros(V5)
    for k, w in law.items():
        first[k[0]] += w
    np.testing.assert_allclose(first, p[0], atol=1e-12, rtol=0)
    assert len(free) >= 1 or cfg == "topk1", "no sibling test can go either way: the case tests nothing"


def depth_of(block: int, depth: list[int]) -> int:
    return 0 if block == 0 else depth[block - 1]


# ============================================================================== D. goodness of fit
@pytest.mark.parametrize(("tree", "cfg"), [("mixed", "plain"), ("mixed", "all"), ("star", "topp0.7")])
def test_sampling_goodness_of_fit(tree, cfg):
    parents, tokens, valid = TREES[tree]
    N, cfg_, rows = len(parents), CFGS[cfg], 200_000
    g = torch.Generator().manual_seed(sum(map(ord, tree + cfg)) + 1)
    logits = torch.randn(N + 1, V5, generator=g) * 1.5
    d1 = make_drafts([parents], [tokens], [[bool(v) for v in valid]])
    d = Drafts(*(t.expand(rows, -1) for t in (d1.tokens, d1.parents, d1.depth, d1.valid)),
               tree_mask=d1.tree_mask.expand(rows, -1, -1))
    v = verify_tree_sampling(d, logits.expand(rows, -1, -1), cfg_,
                             torch.rand(rows, N, generator=g, dtype=torch.float64), exp_noise((rows, V5), g))
    target = _target_law(parents, tokens, valid, _target_probs(logits, cfg_), N)
    keys = sorted(target)
    M = v.tokens.shape[1]
    radix = (V5 + 1) ** torch.arange(M - 1, -1, -1)                  # sequence -> int, V5 pads the tail

    def code(tok, n):
        return (torch.where(torch.arange(M) <= n.unsqueeze(-1), tok, V5) * radix).sum(-1)

    key_codes, order = torch.stack([code(torch.tensor(list(k) + [0] * (M - len(k))), torch.tensor(len(k) - 1))
                                    for k in keys]).sort()
    keys = [keys[i] for i in order.tolist()]
    got = code(v.tokens, v.n_accepted)
    pos = torch.searchsorted(key_codes, got).clamp(max=len(keys) - 1)
    unknown = got[key_codes[pos] != got]
    assert unknown.numel() == 0, f"{unknown.numel()} committed sequences the target cannot produce"
    counts = np.bincount(pos.numpy(), minlength=len(keys))
    assert_fits(counts, np.array([target[k] for k in keys]), 1e-4, label=f"tree {tree} {cfg}")
    assert (v.n_accepted > 0).float().mean() > 0.2
