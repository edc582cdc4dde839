"""Host-side validation of active sets and kernel ids (each synchronises once: never inside a decode step).

`check_active_set` is the full check (unique ids, -1 padding) used by `SparseLMHead.bind` and tests.
`check_live_ids` / `check_slot_ids` are the cheap range checks behind the kernels' `validate=True` default:
the public launchers and ops run them on direct calls; the decoder calls the ops with `validate=False` (no
host sync in the captured step), its ids coming from a set checked at `bind` and kept valid by the policy
contract. Unchecked or not, the kernels never read outside the weight: an out-of-range id in a live slot
scores -inf (gather path) or is not copied (delta gather).
"""
from __future__ import annotations

import torch
from torch import Tensor


def check_active_set(active_ids: Tensor, n_active: Tensor, vocab_size: int) -> None:
    """Raise ValueError unless every row r has unique ids in [0, vocab_size) in slots [0, n_active[r]) and
    -1 in every other slot.  active_ids int [R, C], n_active int [R]."""
    if active_ids.dim() != 2 or n_active.dim() != 1 or n_active.shape[0] != active_ids.shape[0]:
        raise ValueError(f"expected active_ids [R, C] and n_active [R], got {tuple(active_ids.shape)}, "
                         f"{tuple(n_active.shape)}")
    if _active_set_ok(active_ids, n_active, vocab_size):     # vectorised, one sync; the loop names the fault
        return
    C = active_ids.shape[1]
    for r, (row, n) in enumerate(zip(active_ids.cpu(), n_active.cpu().tolist())):
        if not 0 <= n <= C:
            raise ValueError(f"row {r}: n_active={n} outside [0, {C}]")
        live, pad = row[:n], row[n:]
        if live.numel() and (live.min() < 0 or live.max() >= vocab_size):
            raise ValueError(f"row {r}: ids must be in [0, {vocab_size}), got min {int(live.min())}, "
                             f"max {int(live.max())}")
        if live.unique().numel() != live.numel():
            dup = live[live.bincount().gt(1)[live]].unique().tolist()[:5]
            raise ValueError(f"row {r}: duplicate ids {dup}")
        if (pad != -1).any():
            raise ValueError(f"row {r}: padding slots [{n}, {C}) must hold -1")


def _active_set_ok(active_ids: Tensor, n_active: Tensor, vocab_size: int) -> bool:
    C = active_ids.shape[1]
    slots = torch.arange(C, device=active_ids.device)
    live = slots < n_active.unsqueeze(1)                                                  # [R, C]
    in_range = ~live | ((active_ids >= 0) & (active_ids < vocab_size))
    padded = live | (active_ids == -1)
    key = torch.where(live, active_ids, vocab_size + slots).sort(dim=1).values   # padding: distinct keys
    dup = (key[:, 1:] == key[:, :-1]).any() if C > 1 else torch.zeros((), dtype=torch.bool)
    n_ok = ((n_active >= 0) & (n_active <= C)).all()
    return bool(n_ok & in_range.all() & padded.all() & ~dup.to(n_ok.device))


def check_live_ids(active_ids: Tensor, n_active: Tensor, vocab_size: int) -> None:
    """Raise ValueError unless every live slot s < n_active[r] of active_ids [R, C] holds an id in
    [0, vocab_size) and 0 <= n_active[r] <= C. One host sync."""
    C = active_ids.shape[-1]
    check_n_active(n_active, C)
    live = torch.arange(C, device=active_ids.device) < n_active.unsqueeze(-1)            # [R, C]
    bad = live & ((active_ids < 0) | (active_ids >= vocab_size))
    if bool(bad.any()):
        r, s = (int(v) for v in bad.nonzero()[0])
        raise ValueError(f"active_ids[{r}, {s}] = {int(active_ids[r, s])} (a live slot, < n_active[{r}] = "
                         f"{int(n_active[r])}) outside [0, {vocab_size})")


def check_n_active(n_active: Tensor, capacity: int) -> None:
    """Raise ValueError unless 0 <= n_active[r] <= capacity for every row. One host sync."""
    bad = (n_active < 0) | (n_active > capacity)
    if bool(bad.any()):
        r = int(bad.nonzero()[0, 0])
        raise ValueError(f"n_active[{r}] = {int(n_active[r])} outside [0, {capacity}]")


def check_slot_ids(ids: Tensor, vocab_size: int, name: str = "want") -> None:
    """Raise ValueError unless every entry of ids [R, C] is -1 (an empty slot) or in [0, vocab_size)."""
    bad = (ids < -1) | (ids >= vocab_size)
    if bool(bad.any()):
        r, s = (int(v) for v in bad.nonzero()[0])
        raise ValueError(f"{name}[{r}, {s}] = {int(ids[r, s])}: slot ids must be -1 (empty) or in "
                         f"[0, {vocab_size})")
