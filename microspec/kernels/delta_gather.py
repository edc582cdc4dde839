"""Delta gather: copy into the repack buffer only the LM-head rows whose slot changed.

    for every (r, s) with want[r, s] >= 0 and want[r, s] != have[r, s]:  rows[r, s] = weight[want[r, s]]
    then have = want

`want` is the policy's active_ids [R, C] (-1 on padding), `have` [R, C] records which id each slot of `rows`
[R, C, D] currently holds. Because policies keep resident ids in their slots, a verification step that adds
a handful of ids costs a handful of row copies, not C. The kernel decides on the device which slots changed:
no host sync, fixed grid, so it can be captured in a CUDA graph and run on a side stream while the drafter
computes its layers (`SparseLMHead` does that).

`delta_gather_ref` is the torch twin: a full `where` over all slots (same result, C rows read).

Id checks: with `validate=True` (the default of the public launcher and op) every `want` entry must be -1 or
in [0, V), checked on the host before anything runs (one sync: not for a captured step; `SparseLMHead`
passes `validate=False`). Unchecked, an id outside [0, V) is never read: its slot is not copied.
"""
from __future__ import annotations

import torch
from torch import Tensor

from ._triton import HAS_TRITON, next_pow2, tl, triton, triton_available_for
from .validate import check_slot_ids


def delta_gather_ref(weight: Tensor, want: Tensor, have: Tensor, rows: Tensor) -> None:
    V = weight.shape[0]
    changed = (want >= 0) & (want < V) & (want != have)                               # [R, C]
    rows.copy_(torch.where(changed.unsqueeze(-1), weight[want.clamp(0, V - 1)], rows))
    have.copy_(want)


def check_args(weight: Tensor, want: Tensor, have: Tensor, rows: Tensor, validate: bool = False) -> None:
    if rows.dim() != 3 or want.shape != rows.shape[:2] or have.shape != want.shape:
        raise ValueError(f"expected rows [R, C, D] with want/have [R, C]; got rows {tuple(rows.shape)}, "
                         f"want {tuple(want.shape)}, have {tuple(have.shape)}")
    if weight.dim() != 2 or weight.shape[1] != rows.shape[2]:
        raise ValueError(f"weight {tuple(weight.shape)} does not match rows {tuple(rows.shape)}")
    if weight.dtype != rows.dtype:
        raise TypeError(f"weight dtype {weight.dtype} does not match rows dtype {rows.dtype}")
    if want.dtype not in (torch.int32, torch.int64) or have.dtype != want.dtype:
        raise TypeError(f"want/have must share an int32/int64 dtype, got {want.dtype}/{have.dtype}")
    if not (rows.is_contiguous() and want.is_contiguous() and have.is_contiguous()) or weight.stride(-1) != 1:
        raise ValueError("rows, want and have must be contiguous, and weight rows unit-stride")
    devices = {t.device for t in (weight, want, have, rows)}
    if len(devices) != 1:
        raise ValueError(f"all inputs must be on one device, got {sorted(map(str, devices))}")
    if not isinstance(validate, bool):
        raise TypeError(f"validate must be True or False, got {validate!r}")
    if validate:
        check_slot_ids(want, weight.shape[0], "want")


if HAS_TRITON:

    @triton.jit
    def _delta_gather_kernel(
        w_ptr, want_ptr, have_ptr, rows_ptr,
        C, D, V, stride_w, stride_ids_r, stride_rows_r, stride_rows_s,
        BLOCK_S: tl.constexpr, BLOCK_D: tl.constexpr,
    ):
        # Program (r, slot block, d block) copies the changed rows of its slot block, one d block wide.
        r = tl.program_id(0).to(tl.int64)
        slots = tl.program_id(1) * BLOCK_S + tl.arange(0, BLOCK_S)
        ds = tl.program_id(2) * BLOCK_D + tl.arange(0, BLOCK_D)
        s_ok = slots < C
        want = tl.load(want_ptr + r * stride_ids_r + slots, mask=s_ok, other=-1).to(tl.int64)
        have = tl.load(have_ptr + r * stride_ids_r + slots, mask=s_ok, other=-1).to(tl.int64)
        changed = s_ok & (want >= 0) & (want < V) & (want != have)      # an id outside the table: not read
        m = changed[:, None] & (ds < D)[None, :]
        vals = tl.load(w_ptr + want[:, None] * stride_w + ds[None, :], mask=m)
        tl.store(rows_ptr + r * stride_rows_r + slots[:, None].to(tl.int64) * stride_rows_s + ds[None, :],
                 vals, mask=m)


def delta_gather_triton(weight: Tensor, want: Tensor, have: Tensor, rows: Tensor, validate: bool = True,
                        block_s: int = 16, block_d: int = 256, num_warps: int = 4) -> None:
    """Triton delta gather; same contract as `delta_gather_ref`. `validate`: check `want` on the host first
    (one sync; see the module docstring)."""
    check_args(weight, want, have, rows, validate)
    R, C, D = rows.shape
    block_d = min(block_d, next_pow2(D))
    grid = (R, triton.cdiv(C, block_s), triton.cdiv(D, block_d))
    _delta_gather_kernel[grid](
        weight, want, have, rows, C, D, weight.shape[0],
        weight.stride(0), want.stride(0), rows.stride(0), rows.stride(1),
        BLOCK_S=block_s, BLOCK_D=block_d, num_warps=num_warps,
    )
    have.copy_(want)  # after the kernel: every program must compare against the old `have`


@torch.library.custom_op("microspec::delta_gather_", mutates_args=("have", "rows"))
def delta_gather_(weight: Tensor, want: Tensor, have: Tensor, rows: Tensor, validate: bool = True) -> None:
    """Refresh `rows` from `weight` where `want` differs from `have`; Triton on CUDA, torch elsewhere.
    `validate=False` skips the host-side id check (for captured steps; ids must then be trusted)."""
    check_args(weight, want, have, rows, validate)
    if triton_available_for(rows):
        delta_gather_triton(weight, want, have, rows, validate=False)
    else:
        delta_gather_ref(weight, want, have, rows)
