"""The model-backend contract: how the engine runs a model inside a decode step.

A backend owns one model's KV cache and runs tokens at explicit positions into explicit cache slots:

    backend.allocate(batch_size, max_len)                 # once per request (buffers reused when shapes
                                                          # repeat)
    hidden = backend.forward(tokens, positions, slots=None, tree_mask=None)
    logits = backend.logits(hidden)                       # the model's own output head (and logit transform)
    backend.move_kv(src_slots, dst_slots)                 # compact accepted tree nodes into their final slots

Shapes: tokens, positions, slots int64 [B, T]; hidden [B, T, D] (the input of the output head, i.e. after the
final norm); logits float [B, T, N].

Which cache slots a query sees (one rule, every backend). The call writes its T tokens at `slots` (one
contiguous block per row, slots[b, t] = slots[b, 0] + t; default slots = positions).

  * Causal call (tree_mask None): query (b, t) sees slot j iff j <= slots[b, t]; on sliding-window layers also
    positions[b, t] - pos(j) < window, with pos(j) = j before the block and positions[b, u] at block offset u.
  * Tree call (tree_mask bool [B, T, W], tree_start int64 [B], default slots[:, 0]): the W slots
    [tree_start, tree_start + W) form the tree region, which holds this call's block. Query (b, t) sees every
    slot j < tree_start (history, with the window rule pos(j) = j) and region slot tree_start + w iff
    tree_mask[b, t, w]. The window is not applied inside the region: a backend raises if W reaches a window.

Causal decoding passes positions = slots; tree verification passes depth-based positions, slots = the block
and its ancestor mask (W = T); a tree drafter expanding depth d writes the d-th frontier after the earlier
ones and passes the mask over all of them (W = d * top_k). Slots past a row's committed length hold stale K/V
of rejected drafts: the rule never shows them, and later blocks overwrite them, so a rejection costs nothing.

`embeds` (optional, float [B, T, D]) replaces the embedding lookup of `tokens` (feature drafters feed
fc(concat(embedding, feature)) there); `tokens` still fix the shapes.

`eager=True` marks calls of varying shape (prefill chunks): a backend built with `compile=True` runs them
uncompiled, so only the few decode shapes are compiled.

`taps` (optional): `forward(..., taps=(i, j))` also keeps the inputs of decoder layers i, j (residual stream
[B, T, D] each) in `backend.tapped`, for feature drafters (EAGLE-3 style); `taps=("final",)` is the hidden
output itself and needs no hook.
"""
from __future__ import annotations

from typing import Protocol, runtime_checkable

import torch
from torch import Tensor, nn


@runtime_checkable
class ModelBackend(Protocol):
    """What the engine needs from a model. `microspec.models.hf.CausalLM` (any Hugging Face causal LM) and
    `microspec.models.lean` (compact code for Llama, Qwen2, Gemma3) implement it."""

    config: object            # the Hugging Face config of the model
    num_layers: int
    hidden_size: int
    vocab_size: int           # rows of the output head (the padded vocabulary)
    input_vocab: int          # rows of the input embedding (ids >= this are clamped by `forward`)
    head: nn.Module           # the output head; `SpecDecoder` gives the drafter a `SparseLMHead` instead

    @property
    def device(self) -> torch.device: ...

    @property
    def dtype(self) -> torch.dtype: ...

    def allocate(self, batch_size: int, max_len: int) -> None: ...

    def forward(self, tokens: Tensor, positions: Tensor, slots: Tensor | None = None,
                tree_mask: Tensor | None = None, tree_start: Tensor | None = None,
                embeds: Tensor | None = None, eager: bool = False) -> Tensor: ...

    def logits(self, hidden: Tensor, head: nn.Module | None = None) -> Tensor: ...

    def embed(self, tokens: Tensor) -> Tensor: ...

    def move_kv(self, src_slots: Tensor, dst_slots: Tensor) -> None: ...

    def snapshot(self) -> object: ...              # a copy of the KV cache (lab tools reuse one prefill)

    def restore(self, state: object) -> None: ...


def visible_slots(positions: Tensor, slots: Tensor | None, tree_mask: Tensor | None, max_len: int,
                  window: int | None, tree_start: Tensor | None = None) -> Tensor:
    """The visibility rule of the module docstring as a bool mask [B, T, S] (True = may attend).

    The reference every backend's masking is tested against; backends that build dense masks use it directly.
    """
    B, T = positions.shape
    dev = positions.device
    slots = positions if slots is None else slots
    j = torch.arange(max_len, device=dev)                                                # [S]
    if tree_mask is None:
        visible = j.view(1, 1, -1) <= slots.unsqueeze(-1)                                # [B, T, S]
        if window is not None:
            u = j - slots[:, :1]                                                         # [B, S] block offset
            in_block = (u >= 0) & (u < T)
            key_pos = torch.where(in_block, positions.gather(1, u.clamp(0, T - 1)), j)   # [B, S]
            visible &= (positions.unsqueeze(-1) - key_pos.unsqueeze(1)) < window
        return visible
    W = tree_mask.shape[-1]
    start = (slots[:, :1] if tree_start is None else tree_start.view(B, 1))              # [B, 1]
    # [B, S] region offset
    w = j - start
    history = (w < 0).unsqueeze(1)                                                       # [B, 1, S]
    if window is not None:
        history = history & ((positions.unsqueeze(-1) - j) < window)                     # [B, T, S]
    region = tree_mask.bool().gather(2, w.clamp(0, W - 1).unsqueeze(1).expand(B, T, max_len))
    return history | (region & ((w >= 0) & (w < W)).unsqueeze(1))


def apply_logit_transform(config, logits: Tensor) -> Tensor:
    """The family's transform of the head's output (Gemma-2-style final soft-capping); identity otherwise."""
    cap = getattr(config, "final_logit_softcapping", None)
    if cap:
        logits = torch.tanh(logits / cap) * cap
    return logits
