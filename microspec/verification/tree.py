"""Lossless verification of a draft tree, with no host synchronisation and static shapes.

Block layout (`microspec.drafting.base`): block index 0 is the root (the row's last committed token) and node
i (0-based in the `Drafts` tensors) sits at block index i + 1; `parents` and `depth` are in block indices and
`tree_mask` is the ancestor closure the target attended with, so target_logits[:, j] is the target's
prediction after the path root -> ... -> block j.

Greedy (`verify_tree_greedy`): node i is correct iff it is valid and its token is the target's argmax at its
parent; a node is accepted iff it and all its ancestors are correct; the deepest accepted node wins (ties:
the smallest block index). The committed tokens are the target's argmaxes along the accepted path (the last
one is the bonus / corrected token), so a tree emits exactly the target's greedy continuation. A chain is
the tree with parents i (node i hangs from block i), and then this is `verify_greedy` (tested).

Sampling (`verify_tree_sampling`): the recursive rejection test for deterministic (top-k) drafts, EAGLE's
sibling test. Standing on node c with the target's processed distribution p, try c's valid children in block
order; child x is accepted with probability p'(x) / Σp', where p' is p with every earlier rejected sibling's
token set to 0; the first accepted child becomes c and the walk repeats; if every child is rejected the
committed token is drawn from p' (the exponential race), and at a leaf it is drawn from p (the bonus token).

Why it is exact. Let Y be the token committed after node c, and x_1..x_m its children's tokens. Induction on
m: with m = 0, Y ~ p. With m >= 1, P(Y = x_1) = p(x_1); with probability 1 - p(x_1) x_1 is rejected, and what
follows is the same procedure with the m - 1 later children on p' = p(. | Y != x_1), which by induction
yields Y ~ p'; so for y != x_1, P(Y = y) = (1 - p(x_1)) p'(y) = p(y). A repeated token has p'(x) = 0 and is
never accepted, so duplicates change nothing. When Y is a child's token the walk moves into the first child
carrying it, whose target distribution is the law of the next token given Y, and the argument repeats; the
committed sequence therefore has the target's law position by position. No proposal q enters the test because
top-k drafts are deterministic given the prefix (a point mass). The randomness is independent across tests:
one uniform per node, read only while its parent is the current node, and one exponential-race noise row,
read once for the single drawn token.

Each verifier has a reference twin (`*_ref`): plain Python loops over rows and nodes, used by the tests.
"""
from __future__ import annotations

import torch
from torch import Tensor

from ..drafting.base import Drafts, Verdict
from ..drafting.tree import ancestor_mask
from ..sampling import (SamplingConfig, exponential_race, process_logits, safe_softmax, softmax_apply,
                        softmax_stats)


def _max_depth(N: int, max_depth: int | None) -> int:
    if max_depth is None:
        return N
    if isinstance(max_depth, bool) or not isinstance(max_depth, int) or max_depth < 0:
        raise ValueError(f"max_depth must be an int >= 0 or None, got {max_depth!r}")
    return max_depth


def _check(drafts: Drafts, target_logits: Tensor) -> tuple[int, int, int]:
    B, N = drafts.tokens.shape
    if target_logits.dim() != 3 or tuple(target_logits.shape[:2]) != (B, N + 1):
        raise ValueError(f"target_logits must be [B, N+1, V] = [{B}, {N + 1}, V], "
                         f"got {tuple(target_logits.shape)}")
    return B, N, target_logits.shape[-1]


def verify_tree_greedy(drafts: Drafts, target_logits: Tensor, max_depth: int | None = None) -> Verdict:
    """Greedy verification of a tree or a chain (`drafts.tree_mask` None: the mask is derived from parents).

    drafts         tokens / parents / depth int64 [B, N], valid bool [B, N], tree_mask bool [B, N+1, N+1]
    target_logits  float [B, N+1, V]   the target's logits over [root, node 0..N-1]
    max_depth      int | None          static bound on the depth of an accepted node (default N); M =
                                       max_depth + 1. A bound below the tree's depth truncates losslessly.
    Returns Verdict(n_accepted int64 [B], tokens int64 [B, M], path int64 [B, M]): path[:, 0] = 0, path[:, d]
    = the accepted node at depth d (block index); past n_accepted, path repeats the deepest accepted node and
    tokens repeat the bonus token (valid ids and indices, meaningless).

    >>> from microspec.drafting.base import Drafts
    >>> t = torch.tensor([[5, 6]]); p = torch.tensor([[0, 0]])           # two children of the root
    >>> d = Drafts(t, p, torch.ones(1, 2, dtype=torch.long), torch.ones(1, 2, dtype=torch.bool))
    >>> logits = torch.nn.functional.one_hot(torch.tensor([[6, 1, 2]]), 8).float()
    >>> v = verify_tree_greedy(d, logits, max_depth=1)
    >>> v.n_accepted.tolist(), v.tokens.tolist(), v.path.tolist()
    ([1], [[6, 2]], [[0, 2]])
    """
    B, N, _ = _check(drafts, target_logits)
    D = _max_depth(N, max_depth)
    dev = drafts.tokens.device
    best = torch.argmax(target_logits, dim=-1)                                           # [B, N+1]
    correct = (drafts.tokens == best.gather(1, drafts.parents)) & drafts.valid & (drafts.depth <= D)
    ok = torch.cat([torch.ones(B, 1, dtype=torch.bool, device=dev), correct], 1)         # [B, N+1], root ok
    anc = drafts.tree_mask if drafts.tree_mask is not None else ancestor_mask(drafts.parents, D)
    accepted = (~anc.bool() | ok.unsqueeze(1)).all(-1)                                   # [B, N+1]
    depth = torch.cat([torch.zeros(B, 1, dtype=torch.long, device=dev), drafts.depth], 1)
    deepest = torch.where(accepted, depth, -1).argmax(1)                 # first maximum: the smallest index
    n_acc = depth.gather(1, deepest.unsqueeze(1)).squeeze(1)                             # [B]
    # The path = the deepest node's ancestors, each written at the column of its depth (column D+1 collects
    # the non-ancestors and is dropped).
    on_path = anc.bool().gather(1, deepest.view(B, 1, 1).expand(B, 1, N + 1)).squeeze(1)   # [B, N+1]
    col = torch.where(on_path, depth, D + 1)
    blocks = torch.arange(N + 1, device=dev).expand(B, -1)
    path = torch.zeros(B, D + 2, dtype=torch.long, device=dev).scatter(1, col, blocks)[:, : D + 1]
    path = torch.where(torch.arange(D + 1, device=dev) <= n_acc.unsqueeze(1), path, deepest.unsqueeze(1))
    return Verdict(n_acc, best.gather(1, path), path)


def _at(x: Tensor, node: Tensor) -> Tensor:
    """x[b, node[b]]: x [B, N+1, ...] at block index node [B] -> [B, ...]."""
    B = x.shape[0]
    idx = node.view(B, 1, *([1] * (x.dim() - 2))).expand(B, 1, *x.shape[2:])
    return x.gather(1, idx).squeeze(1)


def _sibling_test(p_tokens: Tensor, total: Tensor, child: Tensor, same_before: Tensor,
                  uniforms: Tensor) -> Tensor:
    """bool [B, N]: child i passes its test given that every earlier child was rejected.

    p_tokens float64 [B, N] (p at node i's token, p the distribution at the current node), total float64 [B]
    (Σp over the vocabulary), child bool [B, N], uniforms float64 [B, N], same_before bool [B, N, N]
    (same_before[b, i, j]: j < i and tokens equal).
    """
    dup = (same_before & child.unsqueeze(1)).any(-1)                 # an earlier child carries the same token
    first = child & ~dup
    mass = p_tokens * first                                          # p(x_i) while still in play   [B, N]
    remaining = total.unsqueeze(1) - (mass.cumsum(1) - mass)         # Σp' when child i is tried
    return first & (uniforms * remaining < mass)                     # strict: p'(x) = 0 never passes


def verify_tree_sampling(drafts: Drafts, target_logits: Tensor, cfg: SamplingConfig, uniforms: Tensor,
                         exp_noise: Tensor, max_depth: int | None = None) -> Verdict:
    """Lossless multi-candidate verification of a tree of deterministic (top-k) drafts (module docstring).

    drafts         tokens / parents / depth int64 [B, N], valid bool [B, N] (tree_mask unused: parents rule)
    target_logits  float [B, N+1, V]   raw target logits; p = safe_softmax(process_logits(., cfg)) per node
    uniforms       float64 [B, N]      U[0, 1), one per node, used for the node's own sibling test
    exp_noise      float64 [B, V]      -log(U) noise for the one drawn token (corrected or bonus)
    max_depth      int | None          static walk length (default N); M = max_depth + 1. A smaller bound than
                                       the tree's depth stops the walk there and draws from p: still exact.
    Returns Verdict(n_accepted [B], tokens [B, M], path [B, M]) laid out as in `verify_tree_greedy` (past
    n_accepted, path repeats the last accepted node and tokens repeat the drawn token).
    """
    if not cfg.do_sample:
        raise ValueError("verify_tree_sampling needs cfg.do_sample=True; greedy rows use verify_tree_greedy")
    B, N, V = _check(drafts, target_logits)
    if tuple(uniforms.shape) != (B, N) or tuple(exp_noise.shape) != (B, V):
        raise ValueError(f"uniforms must be [B, N] = [{B}, {N}] and exp_noise [B, V] = [{B}, {V}], got "
                         f"{tuple(uniforms.shape)} and {tuple(exp_noise.shape)}")
    D = _max_depth(N, max_depth)
    dev = drafts.tokens.device
    uniforms = uniforms.double()
    tokens = drafts.tokens.clamp(0, V - 1)
    live = drafts.valid & (drafts.tokens >= 0) & (drafts.tokens < V)
    before = torch.ones(N, N, dtype=torch.bool, device=dev).tril(-1)                  # [i, j]: j < i
    same_before = (tokens.unsqueeze(2) == tokens.unsqueeze(1)) & before                # [B, N, N]
    # The target's distribution at every block index through per-row statistics, once: the walk needs each
    # row's total and the drafted tokens' entries, the draw one row; the vocabulary-wide work is one pass
    # over the block (no per-depth softmax), and a compiled step never writes the whole distribution out.
    x = process_logits(target_logits, cfg)                                             # [B, N+1, V]
    shift, denom, _ = softmax_stats(x)                                                 # [B, N+1, 1] each
    totals = softmax_apply(x, shift, denom).sum(-1, dtype=torch.float64)               # [B, N+1]
    x_tokens = x.gather(2, tokens.unsqueeze(1).expand(B, N + 1, N))                    # [B, N+1, N]
    p_tokens = softmax_apply(x_tokens, shift, denom).double()                          # p_j(x_i)
    cur = torch.zeros(B, dtype=torch.long, device=dev)                                 # where the walk is
    n_acc = torch.zeros(B, dtype=torch.long, device=dev)
    done = torch.zeros(B, dtype=torch.bool, device=dev)                      # stopped (leaf or all rejected)
    cols = [cur]
    for _ in range(min(D, N)):                                                         # static: one per depth
        child = (drafts.parents == cur.unsqueeze(1)) & live & ~done.unsqueeze(1)       # [B, N]
        acc = _sibling_test(_at(p_tokens, cur), _at(totals, cur), child, same_before, uniforms)
        moved = acc.any(1)
        done = done | ~moved
        cur = torch.where(moved, acc.long().argmax(1) + 1, cur)                        # first accepted child
        n_acc = n_acc + moved.long()
        cols.append(cur)
    cols += [cur] * (D + 1 - len(cols))
    path = torch.stack(cols, 1)                                                        # [B, D+1]
    p = softmax_apply(_at(x, cur), _at(shift, cur), _at(denom, cur))                   # [B, V]
    # A row that stopped has tried (and rejected) every child of cur; one that ran out of depth has not.
    tried = (drafts.parents == cur.unsqueeze(1)) & live & done.unsqueeze(1)
    removed = torch.zeros_like(p).scatter_add(1, tokens, tried.to(p.dtype)) > 0
    residual = p.masked_fill(removed, 0.0)
    residual = torch.where(residual.sum(-1, keepdim=True) > 0, residual, p)             # never a zero row
    drawn = exponential_race(residual, exp_noise)                                      # [B]
    block_tokens = torch.cat([torch.zeros_like(cur).unsqueeze(1), tokens], 1)          # [B, N+1]
    walked = torch.cat([block_tokens.gather(1, path[:, 1:]), drawn.unsqueeze(1)], 1)   # [B, D+1]
    out = torch.where(torch.arange(D + 1, device=dev) < n_acc.unsqueeze(1), walked, drawn.unsqueeze(1))
    return Verdict(n_acc, out, path)


# ------------------------------------------------------------------------------- reference twins (tests)
def _children(parents: list[int], valid: list[bool], node: int) -> list[int]:
    """Block indices of the valid children of block index `node`, in block order."""
    return [i + 1 for i, (par, ok) in enumerate(zip(parents, valid)) if par == node and ok]


def _verdict(rows: list[tuple[int, list[int], list[int]]], M: int, dev) -> Verdict:
    """Pad each row's (n_accepted, tokens, path) to M columns by repeating the last entry."""
    n = torch.tensor([r[0] for r in rows], dtype=torch.long, device=dev)
    tok = torch.tensor([r[1] + r[1][-1:] * (M - len(r[1])) for r in rows], dtype=torch.long, device=dev)
    path = torch.tensor([r[2] + r[2][-1:] * (M - len(r[2])) for r in rows], dtype=torch.long, device=dev)
    return Verdict(n, tok.view(len(rows), M), path.view(len(rows), M))


def verify_tree_greedy_ref(drafts: Drafts, target_logits: Tensor, max_depth: int | None = None) -> Verdict:
    """`verify_tree_greedy` as Python loops over rows and nodes, following parent pointers only."""
    B, N, _ = _check(drafts, target_logits)
    D = _max_depth(N, max_depth)
    rows = []
    for b in range(B):
        best = target_logits[b].argmax(-1).tolist()
        parents, valid = drafts.parents[b].tolist(), drafts.valid[b].tolist()
        tokens = drafts.tokens[b].tolist()
        accepted, stack = {0: [0]}, [0]                                  # block index -> path from the root
        while stack:
            c = stack.pop()
            for i in _children(parents, valid, c):
                if tokens[i - 1] == best[c] and len(accepted[c]) <= D:
                    accepted[i] = accepted[c] + [i]
                    stack.append(i)
        deepest = min(accepted, key=lambda i: (-len(accepted[i]), i))
        path = accepted[deepest]
        rows.append((len(path) - 1, [best[j] for j in path], path))
    return _verdict(rows, D + 1, drafts.tokens.device)


def verify_tree_sampling_ref(drafts: Drafts, target_logits: Tensor, cfg: SamplingConfig, uniforms: Tensor,
                             exp_noise: Tensor, max_depth: int | None = None) -> Verdict:
    """`verify_tree_sampling` written literally: walk, renormalise, try each sibling, draw, in float64."""
    B, N, V = _check(drafts, target_logits)
    D = _max_depth(N, max_depth)
    rows = []
    for b in range(B):
        parents, tokens = drafts.parents[b].tolist(), drafts.tokens[b].tolist()
        valid = [bool(ok) and 0 <= t < V for ok, t in zip(drafts.valid[b].tolist(), tokens)]
        c, path, out = 0, [0], []
        while True:
            p = safe_softmax(process_logits(target_logits[b, c], cfg))[0].double()
            kids = _children(parents, valid, c) if len(path) <= D else []
            rest, nxt = p.clone(), None
            for i in kids:
                x = tokens[i - 1]
                if rest.sum() > 0 and float(uniforms[b, i - 1]) < float(rest[x] / rest.sum()):
                    nxt = i
                    break
                rest[x] = 0.0                                            # rejected: remove x, renormalise
            if nxt is None:
                dist = rest if rest.sum() > 0 else p
                out.append(int(exponential_race(dist, exp_noise[b].double())))
                break
            c = nxt
            path.append(c)
            out.append(tokens[c - 1])
        rows.append((len(path) - 1, out, path))
    return _verdict(rows, D + 1, drafts.tokens.device)
