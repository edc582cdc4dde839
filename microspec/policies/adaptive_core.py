"""`AdaptiveCorePolicy`: a per-row frequency core that grows only where the context keeps surprising.

Why: a fixed frequency core is a guess made for every task at once. Code and math rarely leave the prompt's
and the target's vocabulary, so a 1k core there is wasted rows; translation and creative writing keep
producing words that were in neither, and a small core there is not enough. This policy watches for those
*novel* tokens and grows the row's core only when they happen.

A committed token is novel when the context had not shown it (prompt ids, earlier commits, the target's
top-`topk` ids at every verified position and, with `block=True`, at every drafted node of earlier blocks:
what an in-context policy such as `InContextPolicy(tree_ids=True)` holds) and the row's core does not hold
it yet. Each novel token grows the row's core by `grow` ids, the next ones of a frequency ranking, up to
`max_core`. The core never shrinks within a request (no slot ever moves: a grown core only appends slots).

The set on its own is: special ids ∪ ranking[:n_r] (n_r = `start` + grown). It is meant as the second child
of a `UnionPolicy` after an in-context policy with the same `topk` / `block` (so that "the context had shown
it" means "the in-context set holds it"); `adaptive_recipe` builds that pair.

Shapes: R = B rows, V vocabulary, P pinned special ids, C = P + max_core slots.
    _seen     bool  [R, V+1]  ids the context has shown (column V: sink)
    _pending  bool  [R, V+1]  this step's block top-k (merged into _seen after the novelty test)
    _rank     int64 [V+1]     id -> its position in the core ranking (V: absent)
    _n_core   int64 [R]       the row's core size
No host sync, no data-dependent shape: the hooks can run inside a CUDA graph.
"""
from __future__ import annotations

import torch
from torch import Tensor

from ..inputs import as_token_ids, check_bool, check_int, unique_stable
from .base import VocabPolicy


class AdaptiveCorePolicy(VocabPolicy):
    """Special ids ∪ the first n_r ids of `ranking`, n_r growing by `grow` per novel committed token.

    Args:
        ranking:   ids, most frequent first (e.g. `microspec.lab.policy_labels.frequency_ranking`).
        max_core:  the largest core; capacity = max_core + 8 (room for up to 8 special ids beside it).
        start:     core size at the start of a request.
        grow:      ids added per novel token.
        topk:      the target's top-k per position that count as "shown by the context".
        block:     also count the drafted nodes and the target's top-k at every block position (`on_block`).
    """

    def __init__(self, ranking, max_core: int = 2048, start: int = 0, grow: int = 64, topk: int = 3,
                 block: bool = True):
        self.max_core = check_int("max_core", max_core, minimum=1)
        super().__init__(self.max_core + 8)
        self.ranking = unique_stable(as_token_ids(ranking, "ranking"))
        self.start = check_int("start", start, minimum=0)
        if self.start > self.max_core:
            raise ValueError(f"start={start} exceeds max_core={max_core}")
        self.grow = check_int("grow", grow, minimum=0)
        self.target_topk = check_int("topk", topk, minimum=0)
        self.wants_block = check_bool("block", block)

    # ------------------------------------------------------------------ host side
    def _allocate(self, rows: int, vocab_size: int, device: torch.device) -> None:
        V = vocab_size
        self._seen = torch.zeros((rows, V + 1), dtype=torch.bool, device=device)
        self._pending = torch.zeros((rows, V + 1), dtype=torch.bool, device=device)
        self._n_core = torch.zeros(rows, dtype=torch.long, device=device)

    def _reset(self) -> None:
        V, dev = self.vocab_size, self.device
        if self.special_ids.numel() > 8:
            raise ValueError(f"AdaptiveCorePolicy holds at most 8 special ids, got "
                             f"{self.special_ids.numel()}")
        ranking = self.ranking[self.ranking < V]                          # ids of a larger tokenizer drop out
        core = ranking[~torch.isin(ranking, self.special_ids.cpu())][: self.max_core].to(dev)
        self._P = P = self.special_ids.numel()
        self._core_len = core.numel()
        self._rank = torch.full((V + 1,), V, dtype=torch.long, device=dev)
        self._rank[core] = torch.arange(core.numel(), device=dev)
        self._rank[self.special_ids] = -1                                  # always held
        layout = torch.full((self.capacity,), -1, dtype=torch.long, device=dev)
        layout[:P] = self.special_ids
        layout[P: P + core.numel()] = core
        self._layout = layout                                               # slot -> id of a full core
        self._slot_pos = torch.arange(self.capacity, device=dev) - P        # core position of each slot
        self._seen.zero_()
        self._pending.zero_()
        self._n_core.fill_(min(self.start, core.numel()))
        self._publish()

    # ------------------------------------------------------------------ device side
    def on_prefill(self, prompt_ids: Tensor, prompt_mask: Tensor, target_topk: Tensor | None = None,
                   hidden: Tensor | None = None) -> None:
        self._mark(self._seen, prompt_ids, prompt_mask, target_topk)

    def on_block(self, block_ids: Tensor, block_mask: Tensor, target_topk: Tensor | None = None) -> None:
        """Drafted ids were in the set when drafted: seen now. The block's top-k arrived after drafting: a
        committed id found only there (the target's correction) was still a miss, so it is seen from the next
        step on."""
        self._mark(self._seen, block_ids, block_mask, None)
        self._mark(self._pending, block_ids, block_mask, target_topk)

    def on_commit(self, committed_ids: Tensor, committed_mask: Tensor, target_topk: Tensor | None = None,
                  hidden: Tensor | None = None) -> None:
        V = self.vocab_size
        x = torch.where(committed_mask, committed_ids, V)                                 # [R, M]
        novel = committed_mask & ~self._seen.gather(1, x) & (self._rank[x] >= self._n_core.unsqueeze(1))
        grown = self._n_core + self.grow * novel.sum(1)
        self._n_core.copy_(torch.clamp(grown, max=self._core_len))
        self._seen |= self._pending
        self._pending.zero_()
        self._mark(self._seen, committed_ids, committed_mask, target_topk)
        self._publish()

    def _mark(self, bitmap: Tensor, ids: Tensor, mask: Tensor, target_topk: Tensor | None) -> None:
        """bitmap[r, id] = True for ids [R, L] where mask, and their top-k [R, L, k] (the first `topk`)."""
        V = self.vocab_size
        bitmap.scatter_(1, torch.where(mask, ids, V), True)
        if target_topk is not None and self.target_topk:
            top = target_topk[..., : self.target_topk]
            bitmap.scatter_(1, torch.where(mask.unsqueeze(-1), top, V).flatten(1), True)

    def _publish(self) -> None:
        held = self._slot_pos < self._n_core.unsqueeze(1)                                 # [R, C]
        self.active_ids.copy_(torch.where(held, self._layout, -1))
        self.n_active.copy_(self._P + self._n_core)

    def extra_repr(self) -> str:
        return (f"max_core={self.max_core}, start={self.start}, grow={self.grow}, topk={self.target_topk}, "
                f"block={self.wants_block}")


def adaptive_recipe(ranking, capacity: int = 3072, topk: int = 3, max_core: int = 2048, start: int = 0,
                    grow: int = 64, max_new: int = 512) -> VocabPolicy:
    """MicroSpec's recipe (prompt ∪ committed ∪ target top-k ∪ tree ids, grow-only at `capacity`) ∪ an
    `AdaptiveCorePolicy` that grows where that recipe keeps missing."""
    from .in_context import InContextPolicy
    from .union import UnionPolicy
    context = InContextPolicy(capacity, topk, eviction=None, tree_ids=True)
    core = AdaptiveCorePolicy(ranking, max_core=max_core, start=start, grow=grow, topk=topk, block=True)
    return UnionPolicy(context, core, max_new=max_new)
