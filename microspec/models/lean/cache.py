"""The lean backend's static KV cache: one buffer [L, 2, B, Hkv, S, Dh] holding every layer's K and V,
written in place. `layer(i)` is layer i's [2, B, Hkv, S, Dh] (K then V), the one cache argument of a compiled
block: K and V passed as two views of one buffer would alias, and AOTAutograd handles mutated aliased inputs
through a synthetic base, i.e. copies. `keys[i]` / `values[i]` are views for inspection.

Row b's token written at slot s stays there until a later call writes slot s again: rollback is not
advancing (the visibility rule of `microspec.models.base` hides stale slots), compaction is `move`.
"""
from __future__ import annotations

import torch
from torch import Tensor

ALIGN = 16   # S is rounded up to this, so the mask rows attention reads are aligned (no padded copy per call)


class StaticKVCache:
    """Per-layer K/V buffers of a fixed shape, zero-filled once (masked slots then never hold NaN/inf, which
    would leak through a zero attention weight). One allocation for all layers, so compaction (`move`) is
    one gather and one scatter for the whole model rather than two per layer and tensor (a 61-token tree
    step of Gemma-3-270M spent ~240 us in 72 small copies).

    Args:
        num_layers, batch_size: buffers and rows; max_len: slots asked for (S = max_len rounded up to ALIGN;
        the extra slots lie past every row's length, so the visibility rule never shows them);
        kv_heads, head_dim, dtype, device: buffer geometry.
    """

    def __init__(self, num_layers: int, batch_size: int, max_len: int, kv_heads: int, head_dim: int,
                 dtype: torch.dtype, device: torch.device):
        self.batch_size, self.max_len = batch_size, max_len
        self.size = -(-max_len // ALIGN) * ALIGN                                       # S
        self.kv = torch.zeros(num_layers, 2, batch_size, kv_heads, self.size, head_dim, dtype=dtype,
                              device=device)
        self.keys, self.values = list(self.kv[:, 0].unbind(0)), list(self.kv[:, 1].unbind(0))  # [B,Hkv,S,Dh]
        self.rows = torch.arange(batch_size, device=device).unsqueeze(1)                # [B, 1]

    def layer(self, i: int) -> Tensor:
        """Layer i's K and V, [2, B, Hkv, S, Dh] (a view)."""
        return self.kv[i]

    def fits(self, batch_size: int, max_len: int) -> bool:
        return self.batch_size == batch_size and self.max_len == max_len

    def move(self, src_slots: Tensor, dst_slots: Tensor) -> None:
        """Copy every layer's K/V at src_slots [B, T] to dst_slots [B, T]. All sources are gathered into a
        temporary before any destination is written, so overlapping ranges (compacting a tree path towards
        its root) read the old values."""
        moved = self.kv[:, :, self.rows, :, src_slots]                  # [B, T, L, 2, Hkv, Dh]: a copy
        self.kv[:, :, self.rows, :, dst_slots] = moved

    def snapshot(self) -> list[Tensor]:
        """A copy of the buffer (every layer's keys and values)."""
        return [self.kv.clone()]

    def restore(self, state: list[Tensor]) -> None:
        """Copy a `snapshot` back in place: the buffer keeps its address, so captured graphs stay valid."""
        if len(state) != 1 or state[0].shape != self.kv.shape:
            raise ValueError("snapshot of a cache of another shape (allocate the same batch and length)")
        self.kv.copy_(state[0])
