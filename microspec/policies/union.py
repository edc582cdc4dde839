"""`UnionPolicy`: the active set of several policies at once, e.g. in-context ∪ a learned router's clusters.

Why: each policy misses a different kind of token. The in-context set misses open-vocabulary words that are
in neither the prompt nor the target's top-k; a frequency or cluster set misses rare prompt-specific ids. A
union covers both without editing either policy: the children keep their own state and hooks, and this
class only merges their published sets into one slot-stable set.

Merge rule (every hook, after the children ran): the candidates are the children's valid ids, first child
first, [R, W] with W = sum of the children's capacities. An id that any child holds is *live* and keeps its
slot. A new id takes a free slot (the tail [n, C)), or else the slot of the least recently live *stale* id
(one no child holds any more). Stale ids linger until their slot is needed: an extra row costs a little
head work, an evicted row a re-gather, and lingering keeps the valid slots a prefix without moving any id.
With capacity >= W the set is always a superset of every child's; below that, at most C ids, live ids of
earlier children first.

Per step at most `max_new` new ids are installed (a static `topk` width; ids beyond it arrive in the next
steps, since the children still hold them); the prefill installs up to W.

Shapes: R rows (1 when every child is shared), C = capacity, V vocabulary, W candidates. The set lives in a
`microspec.policies.slots.SlotTable` (slot <-> id, with sink columns); `_stamp` int64 [R, C+1] is the last
step each slot's id was live. No host sync, no data-dependent shape: the hooks can run inside a CUDA graph.
"""
from __future__ import annotations

import torch
from torch import Tensor

from ..inputs import check_int
from .base import VocabPolicy
from .slots import SlotTable


class UnionPolicy(VocabPolicy):
    """Slot-stable union of child policies.

    Args:
        children:  two or more policies (fresh instances; this policy sets them up and drives their hooks).
        capacity:  slots of the union (default: the sum of the children's capacities, never full).
        max_new:   new ids installed per decode step at most (default 512).

    Example:
        >>> from microspec.policies import InContextPolicy, StaticFrequencyPolicy
        >>> union = UnionPolicy(InContextPolicy(8, topk=0), StaticFrequencyPolicy(torch.arange(100), 4))
        >>> union.setup(1, 100, [0], "cpu")
        >>> union.on_prefill(torch.tensor([[50, 51]]), torch.ones(1, 2, dtype=torch.bool))
        >>> sorted(union.active()[0][0, : int(union.n_active[0])].tolist())
        [0, 1, 2, 3, 50, 51]
    """

    def __init__(self, *children: VocabPolicy, capacity: int | None = None, max_new: int = 512):
        if len(children) < 2 or not all(isinstance(c, VocabPolicy) for c in children):
            raise TypeError("UnionPolicy needs two or more VocabPolicy children")
        if len({id(c) for c in children}) != len(children):
            raise ValueError("UnionPolicy children must be distinct instances")
        super().__init__(sum(c.capacity for c in children) if capacity is None else capacity)
        self.children = tuple(children)
        self.max_new = check_int("max_new", max_new, minimum=1)
        self.shared = all(c.shared for c in children)
        self.target_topk = max(c.target_topk for c in children)
        self.wants_hidden = any(c.wants_hidden for c in children)
        self.wants_block = any(c.wants_block for c in children)

    # ------------------------------------------------------------------ host side
    def setup(self, batch_size: int, vocab_size: int, special_ids, device) -> None:
        for child in self.children:           # before our own `_reset`, which publishes their sets
            child.setup(batch_size, vocab_size, special_ids, device)
        super().setup(batch_size, vocab_size, special_ids, device)

    def _allocate(self, rows: int, vocab_size: int, device: torch.device) -> None:
        C = self.capacity
        self._table = SlotTable(rows, C, vocab_size, device)
        self._stamp = torch.zeros((rows, C + 1), dtype=torch.long, device=device)
        self._clock = torch.zeros(1, dtype=torch.long, device=device)
        self._slots = torch.arange(C, device=device)

    def _reset(self) -> None:
        self._table.reset(self._slots[:0])
        self._stamp.zero_()
        self._clock.zero_()
        self.n_active.zero_()
        self._merge(self.capacity)
        self._check_specials_fit()

    def _check_specials_fit(self) -> None:
        """Host side, at setup: every special id must be in the merged set (it is when C >= W, or when the
        first child pins them; a tiny capacity could otherwise drop one)."""
        live = self.active_ids[:, : self.capacity]
        if not bool(torch.isin(self.special_ids, live).all()):
            raise ValueError(f"UnionPolicy capacity={self.capacity} cannot hold the special ids with the "
                             f"children's initial sets; raise the capacity")

    # ------------------------------------------------------------------ device side
    def _child_topk(self, child: VocabPolicy, topk: Tensor | None) -> Tensor | None:
        return None if topk is None or not child.target_topk else topk[..., : child.target_topk]

    def on_prefill(self, prompt_ids: Tensor, prompt_mask: Tensor, target_topk: Tensor | None = None,
                   hidden: Tensor | None = None) -> None:
        for c in self.children:
            c.on_prefill(prompt_ids, prompt_mask, self._child_topk(c, target_topk),
                         hidden if c.wants_hidden else None)
        self._merge(self.capacity)

    def on_block(self, block_ids: Tensor, block_mask: Tensor, target_topk: Tensor | None = None) -> None:
        for c in self.children:
            if c.wants_block:
                c.on_block(block_ids, block_mask, self._child_topk(c, target_topk))
        # no merge here: on_commit follows in the same step and merges once

    def on_commit(self, committed_ids: Tensor, committed_mask: Tensor, target_topk: Tensor | None = None,
                  hidden: Tensor | None = None) -> None:
        for c in self.children:
            c.on_commit(committed_ids, committed_mask, self._child_topk(c, target_topk),
                        hidden if c.wants_hidden else None)
        self._merge(self.max_new)

    def on_step(self, committed_ids: Tensor, committed_mask: Tensor, target_topk: Tensor | None = None,
                hidden: Tensor | None = None, *, block_ids: Tensor | None = None,
                block_mask: Tensor | None = None, block_topk: Tensor | None = None) -> None:
        """Each child's own `on_step` (a child may fuse its two hooks), then one merge."""
        for c in self.children:
            block = (dict(block_ids=block_ids, block_mask=block_mask,
                          block_topk=self._child_topk(c, block_topk)) if c.wants_block else {})
            c.on_step(committed_ids, committed_mask, self._child_topk(c, target_topk),
                      hidden if c.wants_hidden else None, **block)
        self._merge(self.max_new)

    def _merge(self, max_new: int) -> None:
        """Publish the union of the children's current sets; at most `max_new` new ids enter."""
        C, table = self.capacity, self._table
        R = self._stamp.shape[0]
        cand = torch.cat([c.active_ids.expand(R, -1) for c in self.children], dim=1)     # [R, W], -1 pad
        W = cand.shape[1]
        self._clock.add_(1)
        x, is_first = table.first_occurrences(cand, cand >= 0)                           # -1 -> sink id
        slot = table.lookup(x)
        hit, new = is_first & (slot >= 0), is_first & (slot < 0)
        self._stamp.scatter_(1, torch.where(hit, slot, C), self._clock.expand(R, W))     # live this step
        live = self._stamp[:, :C] == self._clock                                         # [R, C]
        occupied = self._slots < self.n_active.unsqueeze(1)
        # free slots first (slot order), then stale ones from the oldest; live ones never
        width = min(max_new, W, C)
        order, room = table.oldest_first(self._stamp[:, :C], self.n_active, occupied & live, width)
        dest, ok = table.take(new, order, room.clamp(max=width))                         # C = sink slot
        evicted = table.install(x, dest, ok)
        self._stamp.scatter_(1, dest, self._clock.expand(R, W))
        self.n_active.copy_(torch.clamp(self.n_active + ok.sum(1) - (evicted >= 0).sum(1), max=C))
        self.active_ids.copy_(table.ids[:, :C])

    def extra_repr(self) -> str:
        kids = ", ".join(repr(c) for c in self.children)
        return f"capacity={self.capacity}, max_new={self.max_new}, children=[{kids}]"
