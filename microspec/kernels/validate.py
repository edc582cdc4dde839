"""Host-side validation of an active set, for debug checks and tests (it synchronises: never per step)."""
from __future__ import annotations

from torch import Tensor


def check_active_set(active_ids: Tensor, n_active: Tensor, vocab_size: int) -> None:
    """Raise ValueError unless every row r has unique ids in [0, vocab_size) in slots [0, n_active[r]) and
    -1 in every other slot.  active_ids int [R, C], n_active int [R]."""
    if active_ids.dim() != 2 or n_active.dim() != 1 or n_active.shape[0] != active_ids.shape[0]:
        raise ValueError(f"expected active_ids [R, C] and n_active [R], got {tuple(active_ids.shape)}, "
                         f"{tuple(n_active.shape)}")
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
