"""The proposer contract: who drafts, and the typed state that flows between drafting and verification.

One decode step of the engine, per batch row (static shapes, no host sync):

    drafts  = proposer.propose(DraftRequest)       # N draft nodes: a chain (parent = previous node) or a tree
    verdict = verifier(drafts, target_logits, ...) # the target scores [last committed, node 1..N]
                                                   # in one forward
    proposer.observe(Commit)                       # what was committed, with the target's hidden states

Node 0 of a verification block is the row's last committed token (the root); drafted node i (1..N) sits at
block index i. Parents and depths are expressed in block indices, so a chain is the tree with parent(i) = i-1.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol, runtime_checkable

from torch import Tensor

from ..sampling import SamplingConfig


@dataclass
class DraftRequest:
    """What a proposer gets for one step.

    tokens      int64 [B, S]  every row's committed tokens (slot = position), live buffer: read, never write
    n           int64 [B]     committed length per row (the newest committed token is at n - 1)
    active_ids  int64 [R, C]  the policy's set for this block (R = 1 or B; -1 on padding)
    n_active    int64 [R]
    cfg         SamplingConfig
    noise       float64 [B, N, C] exponential-race noise for sampled chain drafts, or None (greedy / trees)
    """

    tokens: Tensor
    n: Tensor
    active_ids: Tensor
    n_active: Tensor
    cfg: SamplingConfig
    noise: Tensor | None = None


@dataclass
class Drafts:
    """One block of draft nodes per row (N nodes; block index i + 1 holds node i).

    tokens   int64 [B, N]      drafted global ids
    parents  int64 [B, N]      block index of each node's parent (0 = the root, the last committed token)
    depth    int64 [B, N]      depth of each node (1 = child of the root); its position is n - 1 + depth
    valid    bool  [B, N]      False where a node must never be accepted (its drafter row had no mass)
    q        float [B, N, C] | None   sampled chains: the proposal distribution over slots that drew node i
    slots    int64 [B, N] | None      sampled chains: the active-set slot of each drafted id
    tree_mask bool [B, N+1, N+1] | None  ancestor mask of the block (self included); None for a chain
    max_depth int | None      a tree's depth bound (static): verification walks at most that many levels
    """

    tokens: Tensor
    parents: Tensor
    depth: Tensor
    valid: Tensor
    q: Tensor | None = None
    slots: Tensor | None = None
    tree_mask: Tensor | None = None
    max_depth: int | None = None

    @property
    def is_chain(self) -> bool:
        return self.tree_mask is None


@dataclass
class Verdict:
    """Outcome of verifying one block per row.

    n_accepted  int64 [B]        drafts accepted (0..depth of the deepest node)
    tokens      int64 [B, M]     tokens[:, :n_accepted+1] are committed: the accepted path's tokens, then the
                                 corrected or bonus token (M = longest path + 1; later entries are
                                 meaningless)
    path        int64 [B, M]     block index of each committed token's *input* position: path[:, 0] = 0 (the
                                 root), path[:, i] = the i-th accepted node. The target's hidden state at
                                 path[:, i] is the feature that predicted tokens[:, i]. None for chains
                                 (path = arange).
    """

    n_accepted: Tensor
    tokens: Tensor
    path: Tensor | None = None


@dataclass
class Commit:
    """What one step committed, for proposers and observers (all tensors are live step buffers).

    n_before       int64 [B]        committed length before this step
    tokens         int64 [B, M]     committed tokens (first n_commit of each row are real)
    n_commit       int64 [B]        tokens committed this step (0 for finished rows)
    mask           bool  [B, M]     tokens[:, i] committed
    path           int64 [B, M]     block index of each committed token's input (see `Verdict.path`)
    target_hidden  float [B, N+1, D] | None  the target's final hidden states over the verification block
    """

    n_before: Tensor
    tokens: Tensor
    n_commit: Tensor
    mask: Tensor
    path: Tensor
    target_hidden: Tensor | None = None


@runtime_checkable
class Proposer(Protocol):
    """Drafts tokens over the policy's active set. Implementations: `ModelDrafter` (a standalone or early-exit
    Hugging Face drafter, chain), `EagleDrafter` (feature drafter, chain or EAGLE-2 tree)."""

    head: object                  # the drafter's `SparseLMHead`, bound by the engine to the policy's set
    wants_target_hidden: bool     # True: `prefill` and `observe` receive the target's final hidden states
    draws_noise: bool             # True: sampled drafts use `DraftRequest.noise` [B, N, C] (chains)
    num_nodes: int                # N, draft nodes per step

    def plan(self, max_nodes: int) -> int:
        """Nodes to draft per step in a request that can commit at most `max_nodes` more tokens after its
        first; sets and returns `num_nodes` (a chain drafts min(K, max_nodes))."""

    def allocate(self, batch_size: int, max_len: int) -> None: ...

    def prefill(self, tokens: Tensor, positions: Tensor, target_hidden: Tensor | None) -> None:
        """Observe one prompt chunk (host-driven, before the first step): tokens/positions [B, T]."""

    def propose(self, request: DraftRequest) -> Drafts: ...

    def observe(self, commit: Commit) -> None: ...

    def snapshot(self) -> object:
        """The proposer's request state after a prefill (its caches), for lab tools that reuse one prefill."""

    def restore(self, state: object) -> None: ...
