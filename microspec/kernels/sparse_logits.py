"""Logits over an active set of LM-head rows: the fused gather-GEMV, and the GEMV over a repack buffer.

    gather path:  logits[b, t, s] = hidden[b, t] · weight[active_ids[r, s]]     (rows read by index)
    packed path:  logits[b, t, s] = hidden[b, t] · rows[r, s]                   (rows pre-gathered)

with r = b for per-row sets (R = B) or r = 0 for a shared set (R = 1), and logits = -inf on padding slots
s >= n_active[r], so padding can never be drafted. Accumulation is float32 (float64 inputs stay float64 in
the reference).

Shapes: hidden [B, T, D] (T small: the tokens scored per row, 1 when drafting a chain), weight [V, D],
rows [R, C, D], active_ids int64 [R, C] (-1 on padding), n_active int64 [R]  ->  logits [B, T, C].

Each entry point is a `torch.library.custom_op` (`microspec::sparse_logits`, `microspec::packed_logits`)
with a fake implementation, so `torch.compile(fullgraph=True)` traces through it without a graph break.

Id checks: with `validate=True` (the default of every public launcher and op) the live ids are checked
against [0, V) and n_active against [0, C] on the host before anything runs: one sync, so not for a
captured step. `SparseLMHead` passes `validate=False` (its set was checked at `bind`). Either way an id
outside [0, V) in a live slot is never read: the kernel and the reference give it a -inf logit.
"""
from __future__ import annotations

import torch
from torch import Tensor

from ._triton import HAS_TRITON, INTERPRETER, next_pow2, tl, triton, triton_available_for
from .validate import check_live_ids, check_n_active


def _out_dtype(hidden: Tensor) -> torch.dtype:
    return torch.promote_types(hidden.dtype, torch.float32)


def _pad_mask(n_active: Tensor, capacity: int) -> Tensor:
    """[R, 1, C] True on padding slots."""
    return (torch.arange(capacity, device=n_active.device) >= n_active.unsqueeze(-1)).unsqueeze(1)


def packed_logits_ref(hidden: Tensor, rows: Tensor, n_active: Tensor) -> Tensor:
    """Reference of the packed path: [B, T, D] x [R, C, D] -> [B, T, C] (R in {1, B})."""
    dt = _out_dtype(hidden)
    logits = torch.matmul(hidden.to(dt), rows.to(dt).transpose(-1, -2))                # [B, T, C]
    return logits.masked_fill(_pad_mask(n_active, rows.shape[-2]), float("-inf"))


def sparse_logits_ref(hidden: Tensor, weight: Tensor, active_ids: Tensor, n_active: Tensor) -> Tensor:
    """Reference of the gather path: logits of weight[active_ids]; padding slots and ids outside [0, V) are
    -inf (their reads are clamped into the table and the results discarded, so no row is ever used)."""
    V = weight.shape[0]
    logits = packed_logits_ref(hidden, weight[active_ids.clamp(0, V - 1)], n_active)    # [B, T, C]
    outside = ((active_ids < 0) | (active_ids >= V)).unsqueeze(1)                        # [R, 1, C]
    return logits.masked_fill(outside, float("-inf"))


def check_args(hidden: Tensor, table: Tensor, active_ids: Tensor | None, n_active: Tensor,
               validate: bool = False) -> None:
    """Raise a clear error for inputs the kernels cannot take, before any launch.

    `table` is the LM-head weight [V, D] (gather path, with `active_ids`) or the repack buffer [R, C, D]
    (packed path, `active_ids` None). Shapes, dtypes and devices are host metadata (no sync); with
    `validate` the values are checked too (live ids in [0, V), n_active in [0, C]: one host sync).
    """
    if hidden.dim() != 3:
        raise ValueError(f"hidden must be [B, T, D], got shape {tuple(hidden.shape)}")
    if hidden.shape[-1] != table.shape[-1]:
        raise ValueError(f"hidden size {hidden.shape[-1]} != LM-head row size {table.shape[-1]}")
    if not hidden.is_floating_point() or hidden.dtype != table.dtype:
        raise TypeError(f"hidden ({hidden.dtype}) and LM-head rows ({table.dtype}) must share a float dtype")
    for name, t in (("active_ids", active_ids), ("n_active", n_active)):
        if t is not None and t.dtype not in (torch.int32, torch.int64):
            raise TypeError(f"{name} must be int32 or int64, got {t.dtype}")
    if n_active.dim() != 1:
        raise ValueError(f"n_active must be [R], got shape {tuple(n_active.shape)}")
    rows = n_active.shape[0]
    if rows not in (1, hidden.shape[0]):
        raise ValueError(f"active set has {rows} rows; expected 1 (shared) or the batch size "
                         f"{hidden.shape[0]}")
    if active_ids is not None:
        if table.dim() != 2:
            raise ValueError(f"weight must be [V, D], got shape {tuple(table.shape)}")
        if active_ids.dim() != 2 or active_ids.shape[0] != rows:
            raise ValueError(f"active_ids must be [R, C] with R = {rows} (as n_active), got "
                             f"{tuple(active_ids.shape)}")
    elif table.dim() != 3 or table.shape[0] != rows:
        raise ValueError(f"rows must be [R, C, D] with R = {rows} (as n_active), got {tuple(table.shape)}")
    devices = {t.device for t in (hidden, table, active_ids, n_active) if t is not None}
    if len(devices) != 1:
        raise ValueError(f"all inputs must be on one device, got {sorted(map(str, devices))}")
    if not isinstance(validate, bool):
        raise TypeError(f"validate must be True or False, got {validate!r}")
    if validate and active_ids is not None:
        check_live_ids(active_ids, n_active, table.shape[0])
    elif validate:
        check_n_active(n_active, table.shape[-2])


if HAS_TRITON:

    @triton.jit
    def _sparse_logits_kernel(
        h_ptr, table_ptr, ids_ptr, n_ptr, out_ptr,
        T, C, D, V,
        stride_hb, stride_ht, stride_table_r, stride_table_row, stride_ids_r, stride_ob, stride_ot,
        SHARED: tl.constexpr, PACKED: tl.constexpr, USE_DOT: tl.constexpr, DOT_IN_F32: tl.constexpr,
        T_PAD: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_D: tl.constexpr,
    ):
        # One program scores BLOCK_C slots of one batch row for all T tokens of that row.
        b = tl.program_id(0).to(tl.int64)
        slots = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)
        r = 0 if SHARED else b
        live = (slots < tl.load(n_ptr + r)) & (slots < C)   # padding slots: never read, logit -inf
        if PACKED:
            row_off = r * stride_table_r + slots.to(tl.int64) * stride_table_row
        else:
            ids = tl.load(ids_ptr + r * stride_ids_r + slots, mask=live, other=0).to(tl.int64)
            live = live & (ids >= 0) & (ids < V)             # an id outside the table: never read, -inf
            row_off = ids * stride_table_row
        ts = tl.arange(0, T_PAD)
        t_ok = ts < T
        if T_PAD == 1:
            # One token: accumulate products elementwise and reduce once at the end (no per-step shuffles).
            acc2 = tl.zeros((BLOCK_C, BLOCK_D), dtype=tl.float32)
            for d0 in range(0, D, BLOCK_D):
                ds = d0 + tl.arange(0, BLOCK_D)
                d_ok = ds < D
                w = tl.load(table_ptr + row_off[:, None] + ds[None, :], mask=live[:, None] & d_ok[None, :],
                            other=0.0, eviction_policy="evict_first").to(tl.float32)  # [BLOCK_C, BLOCK_D]
                h = tl.load(h_ptr + b * stride_hb + ds, mask=d_ok, other=0.0).to(tl.float32)  # [BLOCK_D]
                acc2 += w * h[None, :]
            acc = tl.sum(acc2, axis=1)[None, :]                                               # [1, BLOCK_C]
        elif USE_DOT:
            # Many tokens per row (a shared set serving a whole batch), half precision: tensor cores.
            acc = tl.zeros((T_PAD, BLOCK_C), dtype=tl.float32)
            for d0 in range(0, D, BLOCK_D):
                ds = d0 + tl.arange(0, BLOCK_D)
                d_ok = ds < D
                w = tl.load(table_ptr + row_off[:, None] + ds[None, :], mask=live[:, None] & d_ok[None, :],
                            other=0.0, eviction_policy="evict_first")
                h = tl.load(h_ptr + b * stride_hb + ts[:, None] * stride_ht + ds[None, :],
                            mask=t_ok[:, None] & d_ok[None, :], other=0.0)
                if DOT_IN_F32:  # Triton's CPU interpreter mis-computes half-precision dots
                    h, w = h.to(tl.float32), w.to(tl.float32)
                acc = tl.dot(h, tl.trans(w), acc)
        else:
            acc = tl.zeros((T_PAD, BLOCK_C), dtype=tl.float32)
            for d0 in range(0, D, BLOCK_D):
                ds = d0 + tl.arange(0, BLOCK_D)
                d_ok = ds < D
                w = tl.load(table_ptr + row_off[:, None] + ds[None, :], mask=live[:, None] & d_ok[None, :],
                            other=0.0, eviction_policy="evict_first").to(tl.float32)  # [BLOCK_C, BLOCK_D]
                h = tl.load(h_ptr + b * stride_hb + ts[:, None] * stride_ht + ds[None, :],
                            mask=t_ok[:, None] & d_ok[None, :], other=0.0).to(tl.float32)  # [T_PAD, BLOCK_D]
                acc += tl.sum(h[:, None, :] * w[None, :, :], axis=2)
        acc = tl.where(live[None, :], acc, float("-inf"))
        tl.store(out_ptr + b * stride_ob + ts[:, None] * stride_ot + slots[None, :], acc,
                 mask=t_ok[:, None] & (slots < C)[None, :])


FOLD_MAX_TOKENS = 32  # a shared set scores at most this many batch-row tokens in one program


def default_config(C: int, D: int, T: int, use_dot: bool) -> dict:
    """Launch parameters by shape, from the H100 search in docs/benchmarks.md (graph replay, inputs beyond
    L2). One token: two rows per program and 1024-wide loads keep ~1.5k programs in flight, which a GEMV
    needs to reach bandwidth; several tokens: tensor-core tiles, wider in C for large sets."""
    if use_dot:
        if T > 32:   # the [T_PAD, BLOCK_D] hidden tile grows with T: narrower, shallower (shared memory)
            return dict(block_c=32, block_d=64, num_warps=4, num_stages=2)
        if C > 8192:
            return dict(block_c=64, block_d=128, num_warps=4, num_stages=3)
        return dict(block_c=32, block_d=256, num_warps=4, num_stages=4)
    if T == 1:
        return dict(block_c=2, block_d=1024, num_warps=4, num_stages=3)
    return dict(block_c=16, block_d=128, num_warps=4, num_stages=3)


def _launch(hidden: Tensor, table: Tensor, active_ids: Tensor | None, n_active: Tensor, packed: bool,
            block_c: int | None = None, block_d: int | None = None, num_warps: int | None = None,
            num_stages: int | None = None) -> Tensor:
    B, T, D = hidden.shape
    C = table.shape[-2] if packed else active_ids.shape[-1]
    shared = n_active.shape[0] == 1
    if shared and B > 1 and B * T <= FOLD_MAX_TOKENS:
        # One set for the batch: read its rows once, batch rows become extra tokens (while the token tile
        # stays small: 8 rows x a 10-node tree frontier = 80 tokens would not fit shared memory).
        out = _launch(hidden.reshape(1, B * T, D), table, active_ids, n_active, packed, block_c, block_d,
                      num_warps, num_stages)
        return out.view(B, T, C)
    # The kernel indexes ids and n_active with unit inner stride: views are copied (a no-op when contiguous).
    hidden = hidden.contiguous() if hidden.stride(-1) != 1 else hidden
    table = table.contiguous() if table.stride(-1) != 1 else table
    n_active = n_active.contiguous()
    active_ids = active_ids.contiguous() if active_ids is not None else None
    # Several tokens in half precision: tensor cores, with the token dim padded to tl.dot's minimum of 16.
    use_dot = T >= 2 and hidden.dtype in (torch.bfloat16, torch.float16)
    t_pad = max(next_pow2(T), 16) if use_dot else next_pow2(T)
    cfg = default_config(C, D, T, use_dot)
    block_c, block_d = block_c or cfg["block_c"], min(block_d or cfg["block_d"], next_pow2(D))
    if use_dot:
        block_c, block_d = max(block_c, 16), max(block_d, 16)
    out = torch.empty((B, T, C), dtype=torch.float32, device=hidden.device)
    ids = active_ids if active_ids is not None else n_active          # unused by the packed kernel
    grid = (B, triton.cdiv(C, block_c))
    _sparse_logits_kernel[grid](
        hidden, table, ids, n_active, out,
        T, C, D, table.shape[0] if not packed else 0,
        hidden.stride(0), hidden.stride(1),
        table.stride(0) if packed else 0, table.stride(-2), ids.stride(0) if ids.dim() == 2 else 0,
        out.stride(0), out.stride(1),
        SHARED=shared, PACKED=packed, USE_DOT=use_dot, DOT_IN_F32=INTERPRETER, T_PAD=t_pad,
        BLOCK_C=block_c, BLOCK_D=block_d,
        num_warps=num_warps or cfg["num_warps"], num_stages=num_stages or cfg["num_stages"],
    )
    return out


def sparse_logits_triton(hidden: Tensor, weight: Tensor, active_ids: Tensor, n_active: Tensor,
                         validate: bool = True, **cfg) -> Tensor:
    """Triton fused gather-GEMV. Same contract as `sparse_logits_ref` (float32 output). `validate`: check
    the ids on the host first (one sync; see the module docstring)."""
    check_args(hidden, weight, active_ids, n_active, validate)
    return _launch(hidden, weight, active_ids, n_active, packed=False, **cfg)


def packed_logits_triton(hidden: Tensor, rows: Tensor, n_active: Tensor, validate: bool = True,
                         **cfg) -> Tensor:
    """Triton GEMV over a repack buffer rows [R, C, D]. Same contract as `packed_logits_ref`."""
    check_args(hidden, rows, None, n_active, validate)
    return _launch(hidden, rows, None, n_active, packed=True, **cfg)


@torch.library.custom_op("microspec::sparse_logits", mutates_args=())
def sparse_logits(hidden: Tensor, weight: Tensor, active_ids: Tensor, n_active: Tensor,
                  validate: bool = True) -> Tensor:
    """Gather-GEMV over the active rows of `weight`; Triton on CUDA, the torch reference elsewhere.
    `validate=False` skips the host-side id check (for captured steps; ids must then be trusted)."""
    check_args(hidden, weight, active_ids, n_active, validate)
    if triton_available_for(hidden) and hidden.dtype != torch.float64:
        return _launch(hidden, weight, active_ids, n_active, packed=False)
    return sparse_logits_ref(hidden, weight, active_ids, n_active)


@sparse_logits.register_fake
def _(hidden, weight, active_ids, n_active, validate=True):
    return hidden.new_empty((*hidden.shape[:2], active_ids.shape[-1]), dtype=_out_dtype(hidden))


@torch.library.custom_op("microspec::packed_logits", mutates_args=())
def packed_logits(hidden: Tensor, rows: Tensor, n_active: Tensor, validate: bool = True) -> Tensor:
    """GEMV over a repack buffer; Triton on CUDA, the torch reference elsewhere."""
    check_args(hidden, rows, None, n_active, validate)
    if triton_available_for(hidden) and hidden.dtype != torch.float64:
        return _launch(hidden, rows, None, n_active, packed=True)
    return packed_logits_ref(hidden, rows, n_active)


@packed_logits.register_fake
def _(hidden, rows, n_active, validate=True):
    return hidden.new_empty((*hidden.shape[:2], rows.shape[-2]), dtype=_out_dtype(hidden))
