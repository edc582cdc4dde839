"""Draft-tree construction (`microspec.drafting.tree`): EAGLE-2 dynamic trees and static trees.

  A. `TreeSpec`: defaults, the total_tokens bound, clear errors for bad parameters.
  B. `TreeBuilder` against a literal Python EAGLE-2 reference (per-node top-k, frontier = best k by
     cumulative log-prob in float32, final re-rank) on a toy Markov drafter, plus the structure every tree
     must have: parents precede children, depth = parent's + 1, tree_mask = ancestor closure, a selected
     node's parent is selected and valid only if the parent is (also under heavy score ties), N = total - 1.
  C. The frontier masks follow the backend's tree-call rule (`models.base.visible_slots`): each frontier node
     sees the history, its ancestors among the earlier frontiers and itself.
  D. top_k = 1 is chain drafting (greedy `draft_sample`, ties included); a tree drafted by the target itself
     and verified greedily commits the target's greedy continuation.
  E. Static trees: structure of vLLM-style paths, bad paths, j-th best child drafting, a static chain equals
     the dynamic top_k = 1 tree.
  F. Static shapes, no host syncs: build -> greedy and sampling verification traces as one graph
     (`torch.compile(fullgraph=True)`, eager backend: any `.item()` or data-dependent shape would break it).
"""
from __future__ import annotations

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from microspec.drafting.tree import StaticTree, TreeBuilder, TreeSpec, ancestor_mask, static_tree
from microspec.models.base import visible_slots
from microspec.sampling import SamplingConfig, draft_sample
from microspec.verification.tree import verify_tree_greedy, verify_tree_sampling

NEG_INF = float("-inf")
V = 16


# ================================================================================== helpers
def toy_drafter(seed: int, C: int, n_pad: int = 0, ties: bool = False, masked: float = 0.0, R: int = 1):
    """(logp table float32 [V, C] over slots, slot_ids [R, C] with -1 on the last n_pad slots).

    Row t of the table is the drafter's log-probs after token t (a Markov drafter); masked slots are -inf;
    ties=True uses integer logits, so equal scores are common."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.stack([torch.randperm(V, generator=g)[:C] for _ in range(R)])
    ids[:, C - n_pad:] = -1
    logits = torch.randint(-2, 2, (V, C), generator=g).float() if ties else torch.randn(V, C, generator=g) * 2
    logits[torch.rand(V, C, generator=g) < masked] = NEG_INF
    logits[:, C - n_pad:] = NEG_INF
    logp = logits.log_softmax(-1)
    return torch.where(torch.isnan(logp), NEG_INF, logp), ids                # all -inf rows stay -inf


def build(spec: TreeSpec, table: torch.Tensor, ids: torch.Tensor, root_tokens: torch.Tensor):
    """Drive the builder like a drafter does. Returns (states by depth, Drafts)."""
    builder = TreeBuilder(spec)
    states = [builder.root(table[root_tokens], ids)]
    for _ in range(spec.depth - 1):
        states.append(builder.expand(states[-1], table[states[-1].tokens]))
    return states, builder.finish(states[-1])


def node_paths(drafts, b: int) -> list[tuple]:
    """Token path from the root of every node of row b (via parent pointers; parents precede children)."""
    paths = [()]
    for i in range(drafts.tokens.shape[1]):
        paths.append(paths[int(drafts.parents[b, i])] + (int(drafts.tokens[b, i]),))
    return paths[1:]


def eagle_reference(spec: TreeSpec, table: np.ndarray, ids: list[int], root: int) -> set[tuple]:
    """EAGLE-2 tree selection written literally (float32 scores). Returns the token paths of the selected
    candidates that are valid (finite score)."""
    k = spec.top_k

    def children(path, score):
        lp = table[path[-1] if path else root]
        order = [c for c in np.argsort(-lp, kind="stable") if ids[c] >= 0 and lp[c] > NEG_INF][:k]
        return [(np.float32(score + lp[c]), path + (ids[c],)) for c in order]

    frontier = children((), np.float32(0.0))
    cands = list(frontier)
    for _ in range(spec.depth - 1):
        new = [c for s, path in frontier for c in children(path, s)]
        cands += new
        frontier = sorted(new, key=lambda c: -c[0])[:k]
    return {path for _, path in sorted(cands, key=lambda c: -c[0])[: spec.num_nodes]}


def check_structure(drafts, spec: TreeSpec, B: int):
    N = spec.num_nodes
    for name in ("tokens", "parents", "depth", "valid", "slots"):
        assert getattr(drafts, name).shape == (B, N), name
    assert drafts.tree_mask.shape == (B, N + 1, N + 1)
    blocks = torch.arange(1, N + 1)
    assert (drafts.parents < blocks).all() and (drafts.parents >= 0).all(), "parents must precede children"
    par_depth = torch.cat([torch.zeros(B, 1, dtype=torch.long), drafts.depth], 1).gather(1, drafts.parents)
    assert torch.equal(drafts.depth, par_depth + 1)
    assert (drafts.depth <= spec.depth).all() and (drafts.depth >= 1).all()
    par_valid = torch.cat([torch.ones(B, 1, dtype=torch.bool), drafts.valid], 1).gather(1, drafts.parents)
    assert not (drafts.valid & ~par_valid).any(), "a valid node under an invalid parent"
    for b in range(B):                                                  # ancestor closure, by walking
        for i in range(N + 1):
            anc, c = {i, 0}, i
            while c:
                c = int(drafts.parents[b, c - 1])
                anc.add(c)
            assert set(torch.nonzero(drafts.tree_mask[b, i]).flatten().tolist()) == anc, (b, i)


# ================================================================================== A. TreeSpec
def test_tree_spec_defaults_and_bound():
    spec = TreeSpec()
    assert (spec.top_k, spec.depth, spec.total_tokens, spec.num_nodes) == (10, 6, 60, 59)
    assert TreeSpec(2, 2, 7).num_candidates == 6                        # 2 + 1 * 4
    assert TreeSpec(1, 6, 7).num_nodes == 6
    assert TreeSpec(3, 1, 1).num_nodes == 0


@pytest.mark.parametrize(("kwargs", "exc", "match"), [
    ({"top_k": 0}, ValueError, "top_k must be >= 1"),
    ({"depth": 0}, ValueError, "depth must be >= 1"),
    ({"total_tokens": 0}, ValueError, r"total_tokens must be in \[1, 511\]"),
    ({"top_k": 2, "depth": 2, "total_tokens": 8}, ValueError, r"total_tokens must be in \[1, 7\]"),
    ({"top_k": 1, "depth": 6, "total_tokens": 60}, ValueError, r"\[1, 7\].*got 60"),
    ({"top_k": 2.0}, TypeError, "top_k must be an int"),
    ({"depth": True}, TypeError, "depth must be an int"),
    ({"total_tokens": "60"}, TypeError, "total_tokens must be an int"),
])
def test_tree_spec_rejects_bad_params(kwargs, exc, match):
    with pytest.raises(exc, match=match):
        TreeSpec(**kwargs)


def test_builder_call_order_errors():
    spec = TreeSpec(2, 2, 7)
    table, ids = toy_drafter(0, 6)
    builder = TreeBuilder(spec)
    state = builder.root(table[torch.tensor([1])], ids)
    with pytest.raises(ValueError, match="needs 6 candidates but only 2"):
        builder.finish(state)
    state = builder.expand(state, table[state.tokens])
    with pytest.raises(ValueError, match="expand past TreeSpec.depth=2"):
        builder.expand(state, table[state.tokens])


# ========================================================================= B. builder vs reference
@settings(max_examples=max(40, settings.default.max_examples), deadline=None)
@given(seed=st.integers(0, 2**31 - 1), top_k=st.integers(1, 4), depth=st.integers(1, 4), B=st.integers(1, 3),
       C=st.sampled_from([1, 3, 8, 16]), n_pad=st.integers(0, 2), per_row=st.booleans(), data=st.data())
def test_builder_matches_eagle_reference(seed, top_k, depth, B, C, n_pad, per_row, data):
    n_pad = min(n_pad, C - 1)
    total = data.draw(st.integers(1, 1 + top_k + (depth - 1) * top_k ** 2), label="total_tokens")
    spec = TreeSpec(top_k, depth, total)
    table, ids = toy_drafter(seed, C, n_pad, masked=0.2, R=B if per_row else 1)
    roots = torch.randint(0, V, (B,), generator=torch.Generator().manual_seed(seed))
    states, drafts = build(spec, table, ids, roots)
    check_structure(drafts, spec, B)
    for b in range(B):
        row_ids = ids[b if per_row else 0].tolist()
        expected = eagle_reference(spec, table.numpy(), row_ids, int(roots[b]))
        got = [p for p, ok in zip(node_paths(drafts, b), drafts.valid[b].tolist()) if ok]
        assert len(got) == len(set(got)), f"row {b}: duplicate paths {sorted(got)}"
        assert set(got) == expected, f"row {b}: {sorted(got)} vs {sorted(expected)}"
        live = drafts.valid[b]
        assert torch.equal(torch.tensor(row_ids)[drafts.slots[b][live]], drafts.tokens[b][live])


@pytest.mark.parametrize("top_k", [2, 3, 5])
def test_parents_selected_and_deterministic_under_ties(top_k):
    """Integer logits (many equal cumulative scores), masked and padding slots, a dry row: the structure
    holds and two builds agree exactly."""
    spec = TreeSpec(top_k, 4, 1 + top_k + 3 * top_k ** 2)               # every candidate kept
    table, ids = toy_drafter(3, 8, n_pad=2, ties=True, masked=0.25)
    table[5] = NEG_INF                                                   # after token 5 the drafter is dry
    roots = torch.tensor([0, 5, 7, 11])
    _, d1 = build(spec, table, ids, roots)
    _, d2 = build(spec, table, ids, roots)
    check_structure(d1, spec, 4)
    assert not d1.valid[1].any(), "a dry root must give no valid node"
    for name in ("tokens", "parents", "depth", "valid", "slots", "tree_mask"):
        assert torch.equal(getattr(d1, name), getattr(d2, name)), name
    small = TreeSpec(top_k, 4, 1 + 2 * top_k)                            # a cut through tied scores
    check_structure(build(small, table, ids, roots)[1], small, 4)


@pytest.mark.parametrize("top_k", [2, 3, 4])
@pytest.mark.parametrize("depth", [3, 4])
@pytest.mark.parametrize("cut", [0.5, 1.0])
def test_builder_matches_eagle_reference_grid(top_k, depth, cut):
    """Deep and wide trees (Hypothesis favours small ones): the frontier choice matters from depth 3."""
    spec = TreeSpec(top_k, depth, 1 + int(cut * (top_k + (depth - 1) * top_k ** 2)))
    table, ids = toy_drafter(top_k * 10 + depth, 12, n_pad=2, masked=0.1)
    roots = torch.arange(4)
    _, drafts = build(spec, table, ids, roots)
    check_structure(drafts, spec, 4)
    for b in range(4):
        expected = eagle_reference(spec, table.numpy(), ids[0].tolist(), int(roots[b]))
        got = {p for p, ok in zip(node_paths(drafts, b), drafts.valid[b].tolist()) if ok}
        assert got == expected, f"row {b}: {sorted(got ^ expected)}"


def test_padding_slots_are_never_drafted():
    """A sloppy drafter that gives padding slots (id -1) the best log-probs: they become invalid nodes, and
    so does everything under them."""
    table, ids = toy_drafter(12, 8, n_pad=3)
    table = torch.randn(V, 8, generator=torch.Generator().manual_seed(1)).log_softmax(-1)
    table[:, 5:] = table[:, 5:].abs().neg() * 0.01                          # padding slots: the best scores
    spec = TreeSpec(4, 3, 30)
    _, d = build(spec, table, ids, torch.arange(3))
    check_structure(d, spec, 3)
    assert not (d.valid & (d.slots >= 5)).any(), "a padding slot was drafted"
    assert d.valid.any()


def test_total_tokens_one_drafts_nothing():
    spec = TreeSpec(3, 2, 1)
    table, ids = toy_drafter(1, 8)
    _, d = build(spec, table, ids, torch.tensor([2, 3]))
    assert d.tokens.shape == (2, 0) and d.tree_mask.shape == (2, 1, 1) and d.tree_mask.all()


# ========================================================================= C. frontier masks
def test_frontier_masks_follow_the_backend_tree_rule():
    spec = TreeSpec(3, 4, 20)
    k, B, start = spec.top_k, 2, 5
    table, ids = toy_drafter(4, 8)
    states, _ = build(spec, table, ids, torch.tensor([1, 9]))
    tree_start = torch.full((B,), start)
    max_len = start + spec.depth * k + 3
    for d, state in enumerate(states, start=1):
        assert state.depth == d and state.mask.shape == (B, k, d * k)
        slots = start + (d - 1) * k + torch.arange(k).expand(B, -1)
        vis = visible_slots(torch.full((B, k), 10 + d), slots, state.mask, max_len, None, tree_start)
        for b in range(B):
            for j in range(k):
                anc, r = {(d, j)}, j
                for dd in range(d, 1, -1):
                    r = int(states[dd - 1].parent_row[b, r])
                    anc.add((dd - 1, r))
                want = set(range(start)) | {start + (dd - 1) * k + rr for dd, rr in anc}
                assert set(torch.nonzero(vis[b, j]).flatten().tolist()) == want, (d, b, j)


# ========================================================================= D. chains and greedy
@pytest.mark.parametrize("ties", [False, True])
def test_top_k_1_is_chain_drafting(ties):
    depth = 5
    spec = TreeSpec(1, depth, depth + 1)
    table, ids = toy_drafter(6, 8, n_pad=1, ties=ties)
    roots = torch.arange(6)
    _, d = build(spec, table, ids, roots)
    assert torch.equal(d.parents, torch.arange(depth).expand(6, -1))
    assert torch.equal(d.depth, torch.arange(1, depth + 1).expand(6, -1))
    assert torch.equal(d.tree_mask, ancestor_mask(d.parents)) and torch.equal(
        d.tree_mask[0], torch.ones(depth + 1, depth + 1, dtype=torch.bool).tril())
    tok, chain = roots, []
    for _ in range(depth):                                               # the engine's greedy chain draft
        slot, _, ok = draft_sample(table[tok], SamplingConfig())
        tok = ids[0, slot]
        chain.append(tok)
    assert torch.equal(d.tokens, torch.stack(chain, 1))


@pytest.mark.parametrize("peaked", [False, True])
def test_self_drafted_tree_commits_target_greedy(peaked):
    """Drafter = target (a Markov model over the full vocabulary): greedy tree verification commits exactly
    the target's greedy continuation; with a peaked target every step accepts the full depth."""
    g = torch.Generator().manual_seed(8)
    logits = torch.randn(V, V, generator=g)
    if peaked:
        logits[torch.arange(V), torch.randperm(V, generator=g)] += 30.0
    spec = TreeSpec(4, 5, 40)
    roots = torch.arange(V)
    _, drafts = build(spec, logits.log_softmax(-1), torch.arange(V).unsqueeze(0), roots)
    block = torch.cat([roots.unsqueeze(1), drafts.tokens], 1)            # [B, N+1]
    v = verify_tree_greedy(drafts, logits[block], max_depth=spec.depth)
    for b in range(V):
        tok, greedy = int(roots[b]), []
        for _ in range(int(v.n_accepted[b]) + 1):
            tok = int(logits[tok].argmax())
            greedy.append(tok)
        assert v.tokens[b, : len(greedy)].tolist() == greedy
    if peaked:
        assert (v.n_accepted == spec.depth).all()
    else:
        assert (v.n_accepted >= 1).any()


# ========================================================================= E. static trees
def test_static_tree_structure():
    t = static_tree([[1, 2], [0], [1], [0, 0], [0, 1]])
    assert t.paths == ((0,), (1,), (0, 0), (0, 1), (1, 2))
    assert t.parents.tolist() == [0, 0, 1, 1, 2]
    assert t.depth.tolist() == [1, 1, 2, 2, 2] and t.rank.tolist() == [0, 1, 0, 1, 2]
    assert t.levels == ((0, 2), (2, 5)) and t.num_nodes == 5 and t.max_depth == 2
    assert torch.equal(t.tree_mask, ancestor_mask(t.parents.unsqueeze(0))[0])
    assert t.level_mask(2).tolist() == [[True, False, True, False, False], [True, False, False, True, False],
                                        [False, True, False, False, True]]


@pytest.mark.parametrize(("paths", "match"), [
    ([], "non-empty list of paths"),
    ([[0], []], "non-empty list of ints"),
    ([[0], [-1]], "ints >= 0"),
    ([[0], [0.0]], "ints >= 0"),
    ([[0], [0]], "appears more than once"),
    ([[0], [0, 1, 0]], r"has no parent: add \[0, 1\]"),
    ("[[0]]", "non-empty list of paths"),
])
def test_static_tree_rejects_bad_paths(paths, match):
    with pytest.raises(ValueError, match=match):
        static_tree(paths)


def draft_static(tree: StaticTree, table, ids, roots):
    """Drive a static tree like a drafter: run each depth's nodes, pick the next depth's."""
    toks, slots, oks = [], [], []
    logp = table[roots]                                                  # [B, C] at the root
    for d in range(1, tree.max_depth + 1):
        tok, slot, ok = tree.pick(d, logp, ids)
        toks.append(tok), slots.append(slot), oks.append(ok)
        logp = table[tok]                                                # [B, n_d, C]
    return tree.drafts(torch.cat(toks, 1), torch.cat(oks, 1), torch.cat(slots, 1))


def test_static_tree_drafts_jth_best_children():
    tree = static_tree([[0], [1], [2], [0, 0], [0, 1], [2, 0], [0, 1, 3]])
    table, ids = toy_drafter(9, 8, n_pad=2, masked=0.3)
    roots = torch.arange(10)
    d = draft_static(tree, table, ids, roots)
    check_structure(d, TreeSpec(4, 3, 8), 10)
    for b in range(10):
        for i, path in enumerate(tree.paths):
            tok, ok = int(roots[b]), True
            for j in path:
                order = torch.sort(table[tok], descending=True, stable=True)
                slot = int(order.indices[j])
                ok = ok and bool(order.values[j] > NEG_INF) and int(ids[0, slot]) >= 0
                tok = max(int(ids[0, slot]), 0)
            assert bool(d.valid[b, i]) == ok, (b, path)
            if ok:
                assert int(d.tokens[b, i]) == tok, (b, path)


def test_static_chain_equals_dynamic_top_k_1():
    table, ids = toy_drafter(10, 8, n_pad=1, ties=True)
    roots = torch.arange(V)
    s = draft_static(static_tree([[0], [0, 0], [0, 0, 0], [0, 0, 0, 0]]), table, ids, roots)
    _, d = build(TreeSpec(1, 4, 5), table, ids, roots)
    for name in ("tokens", "parents", "depth", "valid", "tree_mask"):
        assert torch.equal(getattr(s, name), getattr(d, name)), name


# ========================================================================= F. one graph
def test_tree_step_traces_as_one_graph():
    spec = TreeSpec(3, 3, 10)
    table, ids = toy_drafter(11, 8, n_pad=1)
    static = static_tree([[0], [1], [0, 0], [1, 0], [1, 1]])
    cfg = SamplingConfig(True, 0.8, 5, 0.9)

    def step(root_lp, ids, t_logits, t_static, uniforms, noise):
        builder = TreeBuilder(spec)
        state = builder.root(root_lp, ids)
        for _ in range(spec.depth - 1):
            state = builder.expand(state, table[state.tokens])
        d = builder.finish(state)
        tok1, slot1, ok1 = static.pick(1, root_lp, ids)
        tok2, slot2, ok2 = static.pick(2, table[tok1], ids)
        s = static.drafts(torch.cat([tok1, tok2], 1), torch.cat([ok1, ok2], 1))
        g = verify_tree_greedy(d, t_logits, spec.depth)
        v = verify_tree_sampling(d, t_logits, cfg, uniforms, noise)
        gs = verify_tree_greedy(s, t_static, static.max_depth)
        return d.tokens, d.tree_mask, g.tokens, g.path, v.tokens, v.path, s.tokens, gs.tokens

    g = torch.Generator().manual_seed(0)
    B = 4
    args = (table[torch.arange(B)], ids, torch.randn(B, 10, V, generator=g),
            torch.randn(B, 6, V, generator=g), torch.rand(B, 9, generator=g, dtype=torch.float64),
            torch.rand(B, V, generator=g, dtype=torch.float64).log_().neg_())
    torch._dynamo.reset()
    compiled = torch.compile(step, backend="eager", fullgraph=True)
    for got, want in zip(compiled(*args), step(*args)):
        assert torch.equal(got, want)
