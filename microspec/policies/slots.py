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


class SlotTable:
    """Slot-stable id sets, one per row: `reset` fills them, `take` + `install` add ids (evicting what the
    chosen slots held), `replace` swaps a prefix of slots for a new id set."""

    def __init__(self, rows: int, slots: int, vocab_size: int, device: torch.device):
        self.slots, self.vocab_size = slots, vocab_size
        self.ids = torch.full((rows, slots + 1), -1, dtype=torch.long, device=device)
        self.slot_of = torch.full((rows, vocab_size + 1), -1, dtype=torch.long, device=device)

    def reset(self, ids: Tensor) -> None:
        """Empty every row, then put the distinct ids [n] (every row alike) or [R, n] in slots [0, n), n <= S.
        Host side, once per request."""
        rows, n = self.ids.shape[0], ids.shape[-1]
        ids = ids.expand(rows, n)
        self.ids.fill_(-1)
        self.slot_of.fill_(-1)
        self.ids[:, :n] = ids
        self.slot_of.scatter_(1, ids, torch.arange(n, device=ids.device).expand(rows, n))

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

    def install(self, x: Tensor, dest: Tensor, ok: Tensor) -> None:
        """Write ids x [R, M] into slots dest [R, M] where ok (dest is the sink elsewhere); the ids that lived
        there leave the set. The ids where ok must be distinct and absent, their slots distinct."""
        V = self.vocab_size
        old = self.ids.gather(1, dest)
        self.slot_of.scatter_(1, torch.where(ok & (old >= 0), old, V), -1)
        self.slot_of.scatter_(1, torch.where(ok, x, V), dest)
        self.ids.scatter_(1, dest, x)

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
