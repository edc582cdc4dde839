"""The lean backend's static KV cache: one K and one V buffer [B, Hkv, S, Dh] per layer, written in place.

Row b's token written at slot s stays there until a later call writes slot s again: rollback is not
advancing (the visibility rule of `microspec.models.base` hides stale slots), compaction is `move`.
"""
from __future__ import annotations

import torch
from torch import Tensor

ALIGN = 16   # S is rounded up to this, so the mask rows SDPA reads are aligned (no padded copy per call)


class StaticKVCache:
    """Per-layer K/V buffers of a fixed shape, zero-filled once (masked slots then never hold NaN/inf, which
    would leak through a zero attention weight).

    Args:
        num_layers, batch_size: buffers and rows; max_len: slots asked for (S = max_len rounded up to ALIGN;
        the extra slots lie past every row's length, so the visibility rule never shows them);
        kv_heads, head_dim, dtype, device: buffer geometry.
    """

    def __init__(self, num_layers: int, batch_size: int, max_len: int, kv_heads: int, head_dim: int,
                 dtype: torch.dtype, device: torch.device):
        self.batch_size, self.max_len = batch_size, max_len
        self.size = -(-max_len // ALIGN) * ALIGN                                       # S
        shape = (batch_size, kv_heads, self.size, head_dim)
        self.keys = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(num_layers)]
        self.values = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(num_layers)]
        self.rows = torch.arange(batch_size, device=device).unsqueeze(1)                # [B, 1]

    def fits(self, batch_size: int, max_len: int) -> bool:
        return self.batch_size == batch_size and self.max_len == max_len

    def move(self, src_slots: Tensor, dst_slots: Tensor) -> None:
        """Copy every layer's K/V at src_slots [B, T] to dst_slots [B, T]. All sources are gathered into a
        temporary before any destination is written, so overlapping ranges (compacting a tree path towards
        its root) read the old values."""
        for buf in (*self.keys, *self.values):
            moved = buf[self.rows, :, src_slots]                                        # [B, T, Hkv, Dh] copy
            buf[self.rows, :, dst_slots] = moved

    def snapshot(self) -> list[Tensor]:
        """A copy of every buffer (keys, then values)."""
        return [t.clone() for t in (*self.keys, *self.values)]

    def restore(self, state: list[Tensor]) -> None:
        """Copy a `snapshot` back in place: buffers keep their addresses, so captured graphs stay valid."""
        buffers = (*self.keys, *self.values)
        if len(state) != len(buffers) or any(s.shape != b.shape for s, b in zip(state, buffers)):
            raise ValueError("snapshot of a cache of another shape (allocate the same batch and length)")
        for buf, saved in zip(buffers, state):
            buf.copy_(saved)
