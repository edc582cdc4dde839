"""`SlotTable`: per-row id sets in fixed-capacity slots, where an id that stays in the set never moves.

Why slot-stable: the sparse head gathers only the LM-head rows whose slot changed (`delta_gather_`), so a
policy whose set changes must leave every resident id in the slot it already has; re-sorting would force a
full re-gather every step. `InContextPolicy` (adds ids, evicts at the cap) and `ClusterPolicy` (replaces
its routed slots whole) keep their sets here, so the bookkeeping below exists once.

Buffers, R rows, S slots, V ids; each has one extra "sink" column where masked-out scatters land, so every
scatter keeps a static shape without ever clobbering a live entry:

    ids      int64 [R, S+1]   slot -> id (-1: empty); column S is the sink slot
    slot_of  int64 [R, V+1]   id -> slot (-1: absent); column V is the sink id (its value is meaningless)

Everything but `reset` runs on device with fixed shapes: no host sync, no Python branch on a tensor value,
so the policy hooks that call it can be captured in a CUDA graph.
"""
from __future__ import annotations

import torch
from torch import Tensor

_NEVER = torch.iinfo(torch.long).max   # the rank key of a slot that may not be taken


class SlotTable:
    """Slot-stable id sets, one per row: `reset` fills them, `take` + `install` add ids (evicting what the
    chosen slots held), `replace` swaps a prefix of slots for a new id set."""

    def __init__(self, rows: int, slots: int, vocab_size: int, device: torch.device):
        self.slots, self.vocab_size = slots, vocab_size
        self.ids = torch.full((rows, slots + 1), -1, dtype=torch.long, device=device)
        self.slot_of = torch.full((rows, vocab_size + 1), -1, dtype=torch.long, device=device)
        self._first = torch.zeros((rows, vocab_size + 1), dtype=torch.long, device=device)  # dedupe scratch

    def reset(self, ids: Tensor) -> None:
        """Empty every row, then put the distinct ids [n] (every row alike) or [R, n] in slots [0, n), n <= S.
        Host side, once per request."""
        rows, n = self.ids.shape[0], ids.shape[-1]
        ids = ids.expand(rows, n)
        self.ids.fill_(-1)
        self.slot_of.fill_(-1)
        self.ids[:, :n] = ids
        self.slot_of.scatter_(1, ids, torch.arange(n, device=ids.device).expand(rows, n))

    def first_occurrences(self, cand: Tensor, valid: Tensor) -> tuple[Tensor, Tensor]:
        """Candidates cand [R, M] where valid -> (x: cand with invalid entries as the sink id V; is_first:
        valid and the first occurrence of its id in the row) [R, M]. An order-preserving dedupe through a
        [R, V+1] scratch (entries a call does not write keep stale values but are never read)."""
        x = torch.where(valid, cand, self.vocab_size)
        pos = torch.arange(cand.shape[1], device=cand.device).expand_as(cand)
        self._first.scatter_reduce_(1, x, pos, "amin", include_self=False)
        return x, valid & (self._first.gather(1, x) == pos)

    def lookup(self, x: Tensor) -> Tensor:
        """Slots of ids x [R, M] (each in [0, V]; V, the sink id, reads a meaningless value) -> [R, M],
        -1 where the id is absent."""
        return self.slot_of.gather(1, x)

    def take(self, new: Tensor, order: Tensor, room: Tensor | None = None) -> tuple[Tensor, Tensor]:
        """Destinations for the entries marked new [R, M]: the r-th new entry of a row takes slot
        order[:, r] (order [R, W]: slots ranked best first) when r < room [R, 1] (None: every new entry fits,
        i.e. W >= the count of new entries). -> (dest [R, M], the sink S where nothing is taken; ok bool
        [R, M])."""
        rank = new.cumsum(1) - 1
        ok = new if room is None else new & (rank < room)
        dest = torch.where(ok, order.gather(1, rank.clamp(0, order.shape[1] - 1)), self.slots)
        return dest, ok

    def install(self, x: Tensor, dest: Tensor, ok: Tensor) -> Tensor:
        """Write ids x [R, M] into slots dest [R, M] where ok (dest is the sink elsewhere); the ids that lived
        there leave the set. The ids where ok must be distinct and absent, their slots distinct. Returns the
        ids each entry evicted [R, M] (-1: none, or not ok)."""
        V = self.vocab_size
        old = self.ids.gather(1, dest)
        self.slot_of.scatter_(1, torch.where(ok & (old >= 0), old, V), -1)
        self.slot_of.scatter_(1, torch.where(ok, x, V), dest)
        self.ids.scatter_(1, dest, x)
        return torch.where(ok, old, -1)

    def oldest_first(self, stamp: Tensor, n_active: Tensor, never: Tensor,
                     width: int) -> tuple[Tensor, Tensor]:
        """Slots ranked for new ids: free ones ([n_active, S), in slot order), then occupied ones from the
        oldest stamp; slots marked never [R, S] rank last and never count. stamp int64 [R, S] (>= 0),
        n_active [R] -> (order int64 [R, width], room int64 [R, 1]: how many ranked slots may be taken).
        One sort of [R, S] keys (distinct but for the never-taken slots): a top-k of int64 keys with k in
        the hundreds runs eight radix passes (~45 us on the H200)."""
        S = self.slots
        slots = torch.arange(S, device=stamp.device)
        occupied = slots < n_active.unsqueeze(1)                                          # [R, S]
        key = torch.where(occupied, stamp * (S + 1) + slots, slots - (S + 1))
        key = torch.where(never, _NEVER, key)
        order = torch.sort(key, dim=1).indices[:, :width]
        return order, (key != _NEVER).sum(1, keepdim=True)

    def vacated(self, leave: Tensor) -> Tensor:
        """The slots [0, n) marked by leave [R, n], in slot order, then the sink: int64 [R, n+1] (entries past
        a row's count of marked slots are meaningless). A cumsum compaction, no sort."""
        rows, n = leave.shape
        free = torch.full((rows, n + 1), self.slots, dtype=torch.long, device=leave.device)
        at = torch.where(leave, leave.cumsum(1) - 1, n)
        free.scatter_(1, at, torch.arange(n, device=leave.device).expand(rows, n))
        return free

    def replace(self, cand: Tensor) -> None:
        """Make slots [0, n) hold exactly the distinct ids cand [R, n] (only those slots may be in use): a
        resident id of cand keeps its slot, the r-th new id takes the r-th slot whose id is not in cand (as
        many as there are new ids, since both sets have n ids)."""
        rows, n = cand.shape
        slot = self.lookup(cand)
        new = slot < 0
        stay = torch.zeros((rows, n + 1), dtype=torch.bool, device=cand.device)
        stay.scatter_(1, torch.where(new, n, slot), True)                  # column n: sink
        dest, ok = self.take(new, self.vacated(~stay[:, :n]))
        self.install(cand, dest, ok)
