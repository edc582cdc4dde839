"""`InContextPolicy` (MicroSpec / NanoSpec): the vocabulary the context itself suggests.

The set of a request is
    prompt ids  ∪  the target's top-k ids at every prompt position            (prefill)
    ∪  committed ids  ∪  the target's top-k ids at every verified position    (after each verification)
which reaches a few thousand ids where the full vocabulary has 128k-262k (NanoSpec reports < 3k).

What the released MicroSpec code lacks and this policy adds:
  * batch > 1 (one set per row) with all set operations on device state: a `SlotTable` (id -> slot map
    [B, V], slot -> id buffer [B, C]) and per-slot time stamps; no Python sets, no `.tolist()`, no host sync;
  * an eviction rule at the cap ("lru": least recently committed or predicted, "fifo": oldest insertion)
    instead of silently no longer growing (`eviction=None` keeps MicroSpec's grow-only behaviour);
  * an optional static core (`core_ids`, e.g. the most frequent ids) pinned next to the special ids, so a
    short prompt does not start from an almost empty set;
  * optional successors (`successors`, from `microspec.lab.frequency.successor_table`): with every prompt or
    committed id, its most frequent next ids in a corpus enter too, so the later pieces of a multi-token
    word, which the target's top-k at earlier positions cannot predict, are in the set when drafted.

Drafted-but-rejected tokens never enter: the policy sees committed tokens only. (Drafted tokens come from the
set, so "drafted ids" add nothing MicroSpec's set did not already hold; accepted ones refresh their stamp.)

Slot layout (a `SlotTable`): [0, n_pinned) special + core ids, never evicted; [n_pinned, n_active) context
ids. A new id takes the first free slot, or at the cap the slot of the evicted id, so a resident id never
moves.
"""
from __future__ import annotations

import torch
from torch import Tensor

from ..inputs import as_token_ids, check_bool, check_int, unique_stable
from .base import VocabPolicy
from .slots import SlotTable



class InContextPolicy(VocabPolicy):
    """Per-request in-context vocabulary with an eviction rule.

    Args:
        capacity:  slots per row (NanoSpec hard-codes 3072).
        topk:      the target's top-k ids added per position (NanoSpec: 3); 0 adds only the tokens themselves.
        eviction:  "lru" (default), "fifo", or None (grow-only: ids that do not fit are dropped).
        core_ids:  ids pinned in every row for the whole request, e.g. `load_token_map(path)[:512]`: ints in
                   [0, vocab_size) (checked at `setup`); a repeated id counts once (its first position).
        tree_ids:  also admit every drafted node of each verification block (rejected ones too) and the
                   target's top-k at every block position (MicroSpec's tree construction; see `on_block`).
        successors: int64 [V, m] (-1 = none): ids added with each prompt or committed id, e.g.
                   `successor_table(corpus_ids, V, 4)`; rows beyond a model's vocabulary must be absent.

    Example:
        >>> policy = InContextPolicy(capacity=8, topk=0)
        >>> policy.setup(batch_size=1, vocab_size=100, special_ids=[0], device="cpu")
        >>> policy.on_prefill(torch.tensor([[5, 7, 5]]), torch.ones(1, 3, dtype=torch.bool))
        >>> policy.active()[0][0, :policy.n_active[0]].tolist()   # EOS, then newest prompt tokens first
        [0, 5, 7]
    """

    def __init__(self, capacity: int = 3072, topk: int = 3, eviction: str | None = "lru", core_ids=None,
                 successors=None, tree_ids: bool = False):
        super().__init__(capacity)
        self.wants_block = check_bool("tree_ids", tree_ids)
        if eviction not in ("lru", "fifo", None):
            raise ValueError(f"eviction must be 'lru', 'fifo' or None, got {eviction!r}")
        self.target_topk = check_int("topk", topk, minimum=0)
        self.eviction = eviction
        # NOTE(reliability): a repeated core id would occupy two slots; the verifier's residual then sums
        # both slots' q while acceptance reads one, over-accepting that token (not lossless). Dedupe here.
        self.core_ids = None if core_ids is None else unique_stable(as_token_ids(core_ids, "core_ids",
                                                                                 allow_empty=True))
        self.successors = None if successors is None else _successor_table(successors)
        self._n_pinned = 0

    # ------------------------------------------------------------------ host side
    def _allocate(self, rows: int, vocab_size: int, device: torch.device) -> None:
        C, V = self.capacity, vocab_size
        # Each buffer has one extra "sink" column: masked-out scatters write there, so every scatter keeps a
        # static shape without ever clobbering a live entry.
        self._table = SlotTable(rows, C, V, device)                                      # slot <-> id
        self._stamp = torch.zeros((rows, C + 1), dtype=torch.long, device=device)        # slot -> last use
        self._clock = torch.zeros(1, dtype=torch.long, device=device)
        self._slots = torch.arange(C, device=device)
        if self.core_ids is not None and self.core_ids.numel() and int(self.core_ids.max()) >= V:
            raise ValueError(f"core_ids has id {int(self.core_ids.max())} >= vocab_size {V}: built for "
                             f"another tokenizer or model?")
        self._succ = None
        if self.successors is not None:
            succ = self.successors
            if succ.shape[0] > V or int(succ.max()) >= V or int(succ.min()) < -1:
                raise ValueError(f"successors table [{succ.shape[0]}, {succ.shape[1]}] does not fit a "
                                 f"vocabulary of {V} (ids must be -1 or in [0, {V})): wrong tokenizer?")
            # one row per id plus the sink id V, all -1 where there is no successor
            self._succ = torch.full((V + 1, succ.shape[1]), -1, dtype=torch.long, device=device)
            self._succ[: succ.shape[0]] = succ.to(device)

    def _reset(self) -> None:
        pinned = self.special_ids
        if self.core_ids is not None:
            core = self.core_ids.to(self.device)
            core = core[~torch.isin(core, pinned)]
            pinned = torch.cat([pinned, core[: self.capacity - pinned.numel()]])
        n = self._n_pinned = pinned.numel()
        self._table.reset(pinned)
        self._stamp.zero_()
        self._clock.zero_()
        self.n_active.fill_(n)
        self.active_ids.copy_(self._table.ids[:, : self.capacity])

    # ------------------------------------------------------------------ device side
    def on_prefill(self, prompt_ids: Tensor, prompt_mask: Tensor, target_topk: Tensor | None = None,
                   hidden: Tensor | None = None) -> None:
        # Newest positions first: when the prompt alone overflows the capacity, the recent context wins.
        cand = prompt_ids.unsqueeze(-1)
        if target_topk is not None and self.target_topk:
            cand = torch.cat([cand, target_topk[..., : self.target_topk]], dim=-1)      # [B, L, 1+k]
        valid = prompt_mask.unsqueeze(-1).expand_as(cand)
        if self._succ is not None:
            succ = self._successors_of(prompt_ids, prompt_mask)                           # [B, L, m]
            cand, valid = torch.cat([cand, succ], -1), torch.cat([valid, succ >= 0], -1)  # [B, L, 1+k+m]
        self._insert(cand.flip(1).flatten(1), valid.flip(1).flatten(1))

    def on_block(self, block_ids: Tensor, block_mask: Tensor, target_topk: Tensor | None = None) -> None:
        """With `tree_ids`: every drafted node and the target's top-k at every block position enter
        (MicroSpec's tree construction: up to N+1 + (N+1)k candidates per step)."""
        self._insert(*self._candidates(block_ids, block_mask, target_topk))

    def on_commit(self, committed_ids: Tensor, committed_mask: Tensor, target_topk: Tensor | None = None,
                  hidden: Tensor | None = None) -> None:
        self._insert(*self._candidates(committed_ids, committed_mask, target_topk))

    def on_step(self, committed_ids: Tensor, committed_mask: Tensor, target_topk: Tensor | None = None,
                hidden: Tensor | None = None, *, block_ids: Tensor | None = None,
                block_mask: Tensor | None = None, block_topk: Tensor | None = None) -> None:
        """With `tree_ids`, one insertion where `on_block` + `on_commit` make two (each a dozen small
        kernels): the committed tokens first (they win at the cap), then the block's nodes and top-k. The
        committed tokens' own top-k is left out: those are rows of the block's top-k (the path is in the
        block)."""
        if not self.wants_block:
            super().on_step(committed_ids, committed_mask, target_topk, hidden)
            return
        cand, valid = self._candidates(committed_ids, committed_mask, None)
        block_cand, block_valid = self._candidates(block_ids, block_mask, block_topk)
        self._insert(torch.cat([cand, block_cand], 1), torch.cat([valid, block_valid], 1))

    def _candidates(self, ids: Tensor, mask: Tensor, target_topk: Tensor | None) -> tuple[Tensor, Tensor]:
        """ids [B, M] where mask, then their top-k [B, M, k] and successors [B, M, m] -> (cand, valid)
        [B, M * (1 + k + m)], in that priority order."""
        cand, valid = ids, mask
        if target_topk is not None and self.target_topk:
            top = target_topk[..., : self.target_topk]                                   # [B, M, k]
            cand = torch.cat([cand, top.flatten(1)], dim=1)
            valid = torch.cat([valid, mask.unsqueeze(-1).expand_as(top).flatten(1)], dim=1)
        if self._succ is not None:
            succ = self._successors_of(ids, mask).flatten(1)                              # [B, M*m]
            cand, valid = torch.cat([cand, succ], dim=1), torch.cat([valid, succ >= 0], dim=1)
        return cand, valid

    def _successors_of(self, ids: Tensor, mask: Tensor) -> Tensor:
        """ids [B, L] -> their successors [B, L, m], -1 where none or where mask is False."""
        return self._succ[torch.where(mask, ids, self.vocab_size)]

    def _insert(self, cand: Tensor, valid: Tensor) -> None:
        """Add ids cand [B, M] where valid [B, M], in priority order (earlier entries first). No host sync."""
        C = self.capacity
        R, M = cand.shape
        self._clock.add_(1)
        clock = self._clock.expand(R, M)
        # 1. Keep the first occurrence of each id (invalid entries become the sink id V).
        x, is_first = self._table.first_occurrences(cand, valid)
        # 2. Split into ids already resident (hits) and new ids.
        slot = self._table.lookup(x)
        hit, new = is_first & (slot >= 0), is_first & (slot < 0)
        if self.eviction == "lru":
            self._stamp.scatter_(1, torch.where(hit, slot, C), clock)
        # 3. Rank the slots a new id may take: free slots first (in slot order), then occupied unpinned
        #    slots from the oldest stamp; pinned slots (and, without eviction, occupied ones) never.
        order, room = self._free_first(M) if self.eviction is None else self._oldest_first(M)
        dest, ok = self._table.take(new, order, room)                                    # [B, M], C = sink
        # 4. Evict what lived in the destination slots, then install the new ids.
        self._table.install(x, dest, ok)
        self._stamp.scatter_(1, dest, clock)
        self.n_active.copy_(torch.clamp(self.n_active + ok.sum(1), max=C))
        self.active_ids.copy_(self._table.ids[:, :C])

    def _free_first(self, M: int) -> tuple[Tensor, Tensor]:
        """Grow-only ranking: the free slots n_active, n_active + 1, ... -> (order [B, min(M, C)], room
        [B, 1]). No sort: the free slots are exactly [n_active, C)."""
        C = self.capacity
        order = (self.n_active.unsqueeze(1) + self._slots[: min(M, C)]).clamp(max=C - 1)
        return order, (C - self.n_active).unsqueeze(1)

    def _oldest_first(self, M: int) -> tuple[Tensor, Tensor]:
        """Evicting ranking: free slots in slot order, then occupied unpinned slots from the oldest stamp ->
        (order [B, min(M, C)], room [B, 1])."""
        C = self.capacity
        pinned = (self._slots < self._n_pinned).expand(self._stamp.shape[0], -1)
        return self._table.oldest_first(self._stamp[:, :C], self.n_active, pinned, min(M, C))

    def extra_repr(self) -> str:
        core = 0 if self.core_ids is None else self.core_ids.numel()
        return (f"capacity={self.capacity}, topk={self.target_topk}, eviction={self.eviction!r}, core={core}"
                + (", tree_ids=True" if self.wants_block else ""))


def _successor_table(value) -> Tensor:
    """int64 [V, m] (m >= 1) of ids >= -1 (-1: none); floats and bools are refused, never truncated."""
    if not isinstance(value, Tensor):
        raise TypeError(f"successors must be an int64 tensor [V, m], got {type(value).__name__}")
    if value.is_floating_point() or value.is_complex() or value.dtype == torch.bool:
        raise TypeError(f"successors must be an integer tensor [V, m], got {value.dtype}")
    if value.dim() != 2 or value.shape[1] < 1:
        raise ValueError(f"successors must be [V, m] with m >= 1, got shape {tuple(value.shape)}")
    return value.long()
