"""Draft trees as tensor bookkeeping around a drafter's model calls: EAGLE-2 dynamic trees and static trees.

The drafter owns its model calls; this module picks tokens, records candidates and builds the masks, with
static shapes (fixed by `TreeSpec` or the static tree) and no host syncs. A dynamic tree, per batch row:

    state = builder.root(logp_root, slot_ids)           # top_k children of the root: the depth-1 frontier
    for d in 1 .. depth-1:                              # drafter runs the frontier: tokens state.tokens at
        logp = drafter(state.tokens, ..., state.mask)   #   positions n-1+d, region slots [(d-1)k, dk)
        state = builder.expand(state, logp)             # k*k candidates; the best k form the next frontier
    drafts = builder.finish(state)                      # best total_tokens-1 candidates -> `Drafts`

`total_tokens` counts the root, as EAGLE's does: a tree has N = total_tokens - 1 drafted nodes.

Why every selected node's parent is selected: a child's cumulative score is its parent's plus a log-prob
<= 0 (inputs are clamped to <= 0, NaN -> -inf), and candidates are ranked by (score descending, creation
index ascending) with a stable sort; a parent is created before its children, so it ranks strictly before
each of them, and the best N candidates are closed under taking parents. Candidates of score -inf (padding
slots, rows without mass, and their descendants) rank last and are marked invalid.

Ties between slots of one row's log-probs are broken by `kernels.row_topk`: by slot order on CUDA, by
`torch.topk` elsewhere (deterministic on a given device); with top_k = 1 by `torch.argmax`, first index, as
chain drafting does. Ties between candidates are broken by creation order.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, replace

import torch
import torch.nn.functional as F
from torch import Tensor

from ..compiling import compiled
from ..kernels.row_topk import row_topk
from .base import Drafts


def ancestor_mask(parents: Tensor, max_depth: int | None = None) -> Tensor:
    """bool [B, N+1, N+1]: mask[b, i, j] iff block j is block i or one of its ancestors (the root included).

    parents int64 [B, N] (block index of node i's parent, block i + 1); max_depth bounds the tree's depth
    (default N): pointer jumping covers distances up to 2**ceil(log2(max_depth)).
    """
    B, N = parents.shape
    dev = parents.device
    jump = torch.cat([torch.zeros(B, 1, dtype=torch.long, device=dev), parents], 1)   # root: its own parent
    mask = torch.eye(N + 1, dtype=torch.bool, device=dev).expand(B, N + 1, N + 1)
    mask = mask | (jump.unsqueeze(-1) == torch.arange(N + 1, device=dev))              # distances 0..1
    D = N if max_depth is None else max(1, min(max_depth, N))
    for _ in range(math.ceil(math.log2(D)) if D > 1 else 0):                            # 0..2^s -> 0..2^(s+1)
        mask = mask | mask.gather(1, jump.unsqueeze(-1).expand(B, N + 1, N + 1))
        jump = jump.gather(1, jump)
    return mask


def _top_slots(logp: Tensor, k: int) -> tuple[Tensor, Tensor]:
    """The k best slots of logp [..., C >= k], best first: (values, slots) [..., k].

    `row_topk` (Triton on CUDA): `torch.topk` over a dense 262k-slot row takes ~80 us per depth on the H200,
    most of EAGLE-2's tree bookkeeping, and ~11 us over a few hundred active slots; the kernel's two passes
    take a few us either way, and break ties by slot order (elsewhere `row_topk` is `torch.topk`)."""
    if k == 1:                                                          # first index on ties, like chains
        slot = logp.argmax(-1, keepdim=True)
    else:
        slot = row_topk(logp, k)
    return logp.gather(-1, slot), slot


def _prepare(logp: Tensor, k: int) -> Tensor:
    """float32+ log-probs with NaN -> -inf, clamped to <= 0, padded with -inf to at least k slots."""
    lp = logp.to(torch.promote_types(logp.dtype, torch.float32))
    lp = torch.where(torch.isnan(lp), float("-inf"), lp).clamp(max=0.0)
    return F.pad(lp, (0, k - lp.shape[-1]), value=float("-inf")) if lp.shape[-1] < k else lp


def _lookup(slot_ids: Tensor, slots: Tensor) -> tuple[Tensor, Tensor]:
    """Global ids of slots [B, ...] through slot_ids [R, C'] (R = 1 or B, -1 on padding): (ids >= 0, ok)."""
    B = slots.shape[0]
    ids = slot_ids.expand(B, -1).gather(1, slots.reshape(B, -1)).view_as(slots)
    return ids.clamp(min=0), ids >= 0


@dataclass(frozen=True)
class TreeSpec:
    """EAGLE-2 dynamic tree shape: frontier width `top_k`, `depth` levels, `total_tokens` incl. the root."""

    top_k: int = 10
    depth: int = 6
    total_tokens: int = 60

    def __post_init__(self):
        for name in ("top_k", "depth", "total_tokens"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int):
                raise TypeError(f"TreeSpec.{name} must be an int, got {type(v).__name__} {v!r}")
        if self.top_k < 1:
            raise ValueError(f"TreeSpec.top_k must be >= 1, got {self.top_k}")
        if self.depth < 1:
            raise ValueError(f"TreeSpec.depth must be >= 1, got {self.depth}")
        if not 1 <= self.total_tokens <= 1 + self.num_candidates:
            raise ValueError(f"TreeSpec.total_tokens must be in [1, {1 + self.num_candidates}] (the root "
                             f"plus at most top_k + (depth-1)*top_k**2 candidates) for top_k={self.top_k}, "
                             f"depth={self.depth}; got {self.total_tokens}")

    @property
    def num_nodes(self) -> int:
        """N, drafted nodes per row (the root is the last committed token, not drafted)."""
        return self.total_tokens - 1

    @property
    def num_candidates(self) -> int:
        """Candidates recorded by a full build: top_k root children + top_k**2 per expansion."""
        return self.top_k + (self.depth - 1) * self.top_k ** 2


@dataclass
class TreeState:
    """A dynamic tree after its frontier at depth `depth` (k = top_k, L = k + (depth-1)*k*k candidates).

    depth        int               depth of the frontier nodes (1 = children of the root)
    tokens       int64 [B, k]      frontier tokens (global ids; 0 where invalid)
    slots        int64 [B, k]      their active-set slots
    scores       float [B, k]      cumulative log-probs (-inf: invalid; its whole subtree stays -inf)
    parent_row   int64 [B, k]      row of the previous frontier each node hangs from (0 at depth 1: the root);
                                   gather the previous call's hidden states with it to feed this frontier
    mask         bool  [B, k, depth*k]  the frontier's attention over the drafter's tree region, which holds
                                   the frontiers of depths 1..depth in order (k slots each): ancestors + self
    cand_scores  float [B, L]      every recorded candidate, in creation order (root children first)
    cand_tokens  int64 [B, L]
    cand_slots   int64 [B, L]
    cand_parent  int64 [B, L]      candidate index of the parent, -1 for the root's children
    frontier     int64 [B, k]      candidate indices of the frontier nodes
    slot_ids     int64 [R, C']     the slot -> id map (padded with -1 to at least k slots)
    """

    depth: int
    tokens: Tensor
    slots: Tensor
    scores: Tensor
    parent_row: Tensor
    mask: Tensor
    cand_scores: Tensor
    cand_tokens: Tensor
    cand_slots: Tensor
    cand_parent: Tensor
    frontier: Tensor
    slot_ids: Tensor


class TreeBuilder:
    """EAGLE-2 dynamic tree construction (module docstring); stateless apart from the spec.

    >>> b = TreeBuilder(TreeSpec(top_k=2, depth=2, total_tokens=4))
    >>> s = b.root(torch.tensor([[0.6, 0.3, 0.1]]).log(), torch.tensor([[7, 8, 9]]))   # children 7, 8
    >>> s = b.expand(s, torch.tensor([[[0.1, 0.7, 0.2], [0.5, 0.3, 0.2]]]).log())     # 7 -> 8 scores .42
    >>> d = b.finish(s)
    >>> d.tokens.tolist(), d.parents.tolist(), d.depth.tolist()
    ([[7, 8, 8]], [[0, 0, 1]], [[1, 1, 2]])
    """

    def __init__(self, spec: TreeSpec, compile: bool | str = False):
        """compile: run `root`, `expand` and `finish` through `torch.compile(fullgraph=True, dynamic=False)`
        (a string names the backend, e.g. "aot_eager"): each is ~30 small ops (top-k, gathers, a sort, masks)
        that Inductor fuses into a few kernels, and inside a CUDA graph each kernel costs a few us whatever
        its size. One graph per depth (the candidate arrays grow), compiled on the first tree."""
        self.spec = spec
        if compile:
            self.root, self.expand, self.finish = (compiled(f, compile)
                                                   for f in (self.root, self.expand, self.finish))

    def root(self, logp: Tensor, slot_ids: Tensor) -> TreeState:
        """The depth-1 frontier from the drafter's log-probs over slots at the root.

        logp      float [B, C]     log_softmax of the drafter's restricted logits (padding slots -inf)
        slot_ids  int64 [R, C]     slot -> global id (R = 1 or B), -1 on padding
        """
        k = self.spec.top_k
        B, C = logp.shape
        lp = _prepare(logp, k)
        slot_ids = F.pad(slot_ids, (0, k - C), value=-1) if C < k else slot_ids
        score, slot = _top_slots(lp, k)                                               # [B, k]
        tokens, ok = _lookup(slot_ids, slot)
        score = score.masked_fill(~ok, float("-inf"))
        eye = torch.eye(k, dtype=torch.bool, device=logp.device).expand(B, k, k)
        frontier = torch.arange(k, device=logp.device).expand(B, k)
        return TreeState(1, tokens, slot, score, torch.zeros_like(slot), eye, score, tokens, slot,
                         torch.full_like(slot, -1), frontier, slot_ids)

    def expand(self, state: TreeState, logp: Tensor) -> TreeState:
        """Record the frontier's k*k children and move to the best k of them (depth + 1).

        logp  float [B, k, C]  the drafter's log-probs over slots after each frontier node (same row order)
        """
        k = self.spec.top_k
        if state.depth >= self.spec.depth:
            raise ValueError(f"expand past TreeSpec.depth={self.spec.depth}")
        B = logp.shape[0]
        child_lp, child_slot = _top_slots(_prepare(logp, k), k)                      # [B, k, k]
        child_tok, ok = _lookup(state.slot_ids, child_slot)
        cu = (state.scores.unsqueeze(-1) + child_lp.masked_fill(~ok, float("-inf"))).flatten(1)   # [B, k*k]
        child_tok, child_slot = child_tok.flatten(1), child_slot.flatten(1)
        order = torch.sort(cu, dim=1, descending=True, stable=True).indices[:, :k]   # ties: creation order
        parent_row = order // k
        d = state.depth
        mask = torch.cat([state.mask.gather(1, parent_row.unsqueeze(-1).expand(B, k, d * k)),
                          torch.eye(k, dtype=torch.bool, device=logp.device).expand(B, k, k)], -1)
        L = state.cand_scores.shape[1]
        rows = (torch.arange(k * k, device=logp.device) // k).expand(B, -1)            # each one's parent row
        return TreeState(d + 1, child_tok.gather(1, order), child_slot.gather(1, order), cu.gather(1, order),
                         parent_row, mask,
                         torch.cat([state.cand_scores, cu], 1), torch.cat([state.cand_tokens, child_tok], 1),
                         torch.cat([state.cand_slots, child_slot], 1),
                         torch.cat([state.cand_parent, state.frontier.gather(1, rows)], 1), L + order,
                         state.slot_ids)

    def finish(self, state: TreeState) -> Drafts:
        """The best N = total_tokens - 1 candidates as `Drafts`, parents before children (creation order).

        Returns Drafts(tokens, parents, depth int64 [B, N], valid bool [B, N], slots int64 [B, N],
        tree_mask bool [B, N+1, N+1]) with parents in block indices (0 = the root) and q None.
        """
        k, N = self.spec.top_k, self.spec.num_nodes
        B, L = state.cand_scores.shape
        if N > L:
            raise ValueError(f"TreeSpec.total_tokens={self.spec.total_tokens} needs {N} candidates but only "
                             f"{L} were recorded (depth {state.depth}); expand up to depth {self.spec.depth}")
        dev = state.cand_scores.device
        best = torch.sort(state.cand_scores, dim=1, descending=True, stable=True).indices[:, :N]
        sel = best.sort(dim=1).values                                                 # creation order
        block = torch.arange(1, N + 1, device=dev).expand(B, -1)
        to_block = torch.zeros(B, L + 1, dtype=torch.long, device=dev).scatter(1, sel, block)  # col L: root
        par = state.cand_parent.gather(1, sel)
        parents = to_block.gather(1, torch.where(par < 0, L, par))
        # depth from the creation index: the root's k children, then k*k per expansion. Computed on `sel`
        # itself: a gather from an arange-derived floor division fails Inductor's CPU codegen (torch 2.13)
        level = torch.where(sel < k, 1, 2 + (sel - k).clamp(min=0) // (k * k))
        return Drafts(tokens=state.cand_tokens.gather(1, sel), parents=parents, depth=level,
                      valid=state.cand_scores.gather(1, sel) > float("-inf"),
                      slots=state.cand_slots.gather(1, sel),
                      tree_mask=ancestor_mask(parents, state.depth), max_depth=state.depth)


# ------------------------------------------------------------------------------------------ static trees
@dataclass(frozen=True)
class StaticTree:
    """A fixed tree given as node paths (vLLM's `speculative_token_tree`): path (j1, .., jd) is the node
    reached from the root by taking its j1-th best child, then that node's j2-th best child, and so on.

    Nodes are ordered by (depth, path), so parents precede children and each depth is a contiguous range.
    paths      tuple[tuple[int, ...], ...]   the N paths in node order
    parents    int64 [N]   block index of each node's parent (0 = root)
    depth      int64 [N]
    rank       int64 [N]   the child rank j each node takes from its parent's best children
    tree_mask  bool [N+1, N+1]  ancestor closure (self and root included)
    levels     tuple[(start, end), ...]  node range of depth 1, 2, ... (0-based node indices)

    Drafting: the drafter runs depth d's nodes (region slots [start_d, end_d), mask `level_mask(d)`) and
    passes the log-probs to `pick(d + 1, ...)`; `drafts(...)` assembles the block.
    """

    paths: tuple
    parents: Tensor
    depth: Tensor
    rank: Tensor
    tree_mask: Tensor
    levels: tuple

    @property
    def num_nodes(self) -> int:
        return len(self.paths)

    @property
    def max_depth(self) -> int:
        return len(self.levels)

    def to(self, device) -> StaticTree:
        """The same tree with its tensors on `device` (do this once, outside any captured graph)."""
        return replace(self, parents=self.parents.to(device), depth=self.depth.to(device),
                       rank=self.rank.to(device), tree_mask=self.tree_mask.to(device))

    def level_mask(self, d: int) -> Tensor:
        """bool [n_d, end_d]: depth d's nodes over the drafter's region, which holds nodes 0..end_d-1."""
        start, end = self.levels[d - 1]
        return self.tree_mask[1 + start: 1 + end, 1: 1 + end]

    def pick(self, d: int, logp: Tensor, slot_ids: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """The depth-d nodes: each takes the rank-j best slot of its parent's log-probs.

        logp  float [B, C] at the root (d = 1), else [B, n_{d-1}, C] over depth d-1's nodes in node order
        slot_ids int64 [R, C] (-1 on padding). Returns (tokens, slots int64 [B, n_d], ok bool [B, n_d]);
        ok is the node's own mass; `drafts` closes it over ancestors.
        """
        start, end = self.levels[d - 1]
        k = 1 + max(p[-1] for p in self.paths[start:end])                            # static: best k children
        lp = _prepare(logp if d > 1 else logp.unsqueeze(1), k)                        # [B, n_{d-1}, C']
        C = slot_ids.shape[-1]
        slot_ids = F.pad(slot_ids, (0, lp.shape[-1] - C), value=-1) if lp.shape[-1] > C else slot_ids
        val, slot = _top_slots(lp, k)                                                 # [B, n_{d-1}, k]
        row = self.parents[start:end] - 1 - (self.levels[d - 2][0] if d > 1 else -1)  # parent's row in logp
        flat = (row * k + self.rank[start:end]).expand(logp.shape[0], -1)             # [B, n_d]
        val, slot = val.flatten(1).gather(1, flat), slot.flatten(1).gather(1, flat)
        tokens, ok = _lookup(slot_ids, slot)
        return tokens, slot, ok & (val > float("-inf"))

    def drafts(self, tokens: Tensor, ok: Tensor, slots: Tensor | None = None) -> Drafts:
        """The block as `Drafts`: tokens int64 [B, N], ok bool [B, N] (a node is valid iff it and all its
        ancestors had mass), slots int64 [B, N] | None."""
        B, dev = tokens.shape[0], tokens.device
        mask = self.tree_mask.expand(B, -1, -1)
        ok_block = torch.cat([torch.ones(B, 1, dtype=torch.bool, device=dev), ok], 1)
        valid = (~mask | ok_block.unsqueeze(1)).all(-1)[:, 1:]
        return Drafts(tokens, self.parents.expand(B, -1), self.depth.expand(B, -1), valid,
                      slots=slots, tree_mask=mask, max_depth=self.max_depth)


def static_tree(paths) -> StaticTree:
    """A `StaticTree` from a list of paths, e.g. [[0], [1], [0, 0], [0, 1]] (child rank per level).

    Every path must be a non-empty sequence of ints >= 0, paths must be distinct, and every proper prefix of a
    path must be a path too (a node's parent is in the tree).

    >>> t = static_tree([[0], [1], [0, 0]])
    >>> t.parents.tolist(), t.depth.tolist(), t.rank.tolist()
    ([0, 0, 1], [1, 1, 2], [0, 1, 0])
    """
    if not isinstance(paths, (list, tuple)) or len(paths) == 0:
        raise ValueError(f"static tree paths must be a non-empty list of paths, got {paths!r}")
    norm = []
    for p in paths:
        if (not isinstance(p, (list, tuple)) or len(p) == 0
                or any(isinstance(j, bool) or not isinstance(j, int) or j < 0 for j in p)):
            raise ValueError(f"static tree path {p!r} must be a non-empty list of ints >= 0")
        norm.append(tuple(p))
    if len(set(norm)) != len(norm):
        dup = next(p for p in norm if norm.count(p) > 1)
        raise ValueError(f"static tree path {list(dup)} appears more than once")
    have = set(norm)
    for p in norm:
        if len(p) > 1 and p[:-1] not in have:
            raise ValueError(f"static tree path {list(p)} has no parent: add {list(p[:-1])}")
    order = sorted(norm, key=lambda p: (len(p), p))
    index = {p: i + 1 for i, p in enumerate(order)}                                  # path -> block index
    parents = torch.tensor([index[p[:-1]] if len(p) > 1 else 0 for p in order], dtype=torch.long)
    depth = torch.tensor([len(p) for p in order], dtype=torch.long)
    levels, start = [], 0
    for d in range(1, len(order[-1]) + 1):
        end = start + sum(1 for p in order if len(p) == d)
        levels.append((start, end))
        start = end
    return StaticTree(tuple(order), parents, depth, torch.tensor([p[-1] for p in order], dtype=torch.long),
                      ancestor_mask(parents.unsqueeze(0), len(levels))[0], tuple(levels))
