"""`LeanCausalLM`: the lean `ModelBackend` (the contract and the visibility rule are in
`microspec.models.base`).

One call: a prologue (embed or take `embeds`, look up cos/sin at `positions`, build one mask per mask kind
with `visible_slots`, shared by all layers of that kind, and the first input norm), then the fused blocks,
which write K/V at `slots`, attend over the whole static cache and end with the next layer's norm (the final
norm after the last). Every shape is fixed by (B, T, W, S), nothing reads a value back to the host, nothing is
allocated by value, so a decode step runs under `torch.compile` and inside a CUDA graph.

Compilation is regional: the prologue is one graph, and one graph of `run_block` serves every layer (the
blocks share code and shapes), so compiling costs about one layer however deep the model is; inside a CUDA
graph the boundaries between layers cost nothing.
"""
from __future__ import annotations

import torch
from torch import Tensor, nn

from ...compiling import compiled
from ..base import apply_logit_transform, visible_slots
from .cache import StaticKVCache
from .layers import fold_mask, run_block
from .model import LeanModel
from .rope import rope_tables


class LeanCausalLM:
    """A Llama, Qwen2 or Gemma3 Hugging Face model run by the lean code, as a `ModelBackend`.

    >>> lm = LeanCausalLM(model, compile=True)
    >>> lm.allocate(batch_size=2, max_len=512)
    >>> hidden = lm.forward(prompt, torch.arange(L).expand(2, L), eager=True)      # prefill, [2, L, D]
    >>> logits = lm.logits(hidden[:, -1:])                                          # [2, 1, V]

    Args:
        model:   a loaded `LlamaForCausalLM`, `Qwen2ForCausalLM` or `Gemma3ForCausalLM` (eval mode, any dtype,
                 one device). Not modified; its fused weights are built once per model (`LeanModel`, shared by
                 every backend over it) and are a snapshot: weights changed later are not seen.
        compile: run calls through `torch.compile(dynamic=False, fullgraph=True)` unless `eager=True` (prefill
                 chunks, whose lengths vary); each new (B, T, W, S) compiles once. A string names the
                 `torch.compile` backend instead of Inductor (e.g. "aot_eager" to check tracing on a CPU).
    """

    name = "lean"

    def __init__(self, model: nn.Module, compile: bool | str = False):
        from . import lean_model
        self.lean: LeanModel = lean_model(model)
        self.config = self.lean.config
        self.num_layers = len(self.lean.blocks)
        self.hidden_size = self.config.hidden_size
        self.head = self.lean.head
        self.vocab_size = self.head.weight.shape[0]
        self.input_vocab = self.lean.input_vocab
        self.cache: StaticKVCache | None = None
        self.rope: dict[str, tuple[Tensor, Tensor]] = {}      # kind -> cos, sin [S, Dh]
        self.tapped: tuple[Tensor, ...] = ()
        if compile:
            self._compiled = (compiled(self._prologue, compile), compiled(run_block, compile))
        else:
            self._compiled = None

    @property
    def device(self) -> torch.device:
        return self.lean.embed_weight.device

    @property
    def dtype(self) -> torch.dtype:
        return self.lean.embed_weight.dtype

    def allocate(self, batch_size: int, max_len: int) -> StaticKVCache:
        """The cache for one request batch: reused as is when (batch_size, max_len) repeat, else new buffers
        (and new rope tables covering every slot), for which captured CUDA graphs must be captured again."""
        if self.cache is None or not self.cache.fits(batch_size, max_len):
            lean = self.lean
            self.cache = StaticKVCache(self.num_layers, batch_size, max_len, lean.kv_heads, lean.head_dim,
                                       self.dtype, self.device)
            self.rope = {kind: rope_tables(inv_freq, scaling, self.cache.size, self.dtype, self.device)
                         for kind, (inv_freq, scaling) in lean.rope.items()}
        return self.cache

    def embed(self, tokens: Tensor) -> Tensor:
        """tokens [B, T] -> input embeddings [B, T, D] (scaled as the model's own embedding; ids clamped)."""
        return self.lean.embed(tokens)

    def logits(self, hidden: Tensor, head: nn.Module | None = None) -> Tensor:
        """hidden [B, T, D] -> logits [B, T, N] through `head` (default: the model's own), then the family's
        logit transform (Gemma's final soft-capping)."""
        return apply_logit_transform(self.config, (self.head if head is None else head)(hidden))

    def move_kv(self, src_slots: Tensor, dst_slots: Tensor) -> None:
        """Copy every layer's K/V from src_slots [B, T] to dst_slots [B, T] (gathered first: overlap is
        safe)."""
        self.cache.move(src_slots, dst_slots)

    def snapshot(self) -> list[Tensor]:
        """A copy of the KV cache (lab tools reuse one prefill for several runs)."""
        return self.cache.snapshot()

    def restore(self, state: list[Tensor]) -> None:
        """Write a `snapshot` back into the cache, in place (captured CUDA graphs stay valid)."""
        self.cache.restore(state)

    def forward(self, tokens: Tensor, positions: Tensor, slots: Tensor | None = None,
                tree_mask: Tensor | None = None, tree_start: Tensor | None = None,
                embeds: Tensor | None = None, eager: bool = False, taps: tuple = ()) -> Tensor:
        """Final-norm hidden states [B, T, D] of tokens [B, T] at positions [B, T], K/V written at `slots`
        (default `positions`), attending by the rule of `microspec.models.base`.

        tree_mask bool [B, T, W] / tree_start int64 [B]: a tree call (W must not exceed any sliding window).
        embeds float [B, T, D]: replaces the embedding lookup. taps: layer indices (and/or "final") whose
        input residual streams [B, T, D] are kept in `self.tapped`, in the order given.
        """
        self._check(tokens, positions, slots, tree_mask, embeds, taps)
        prologue, block = (self._prologue, run_block) if (eager or self._compiled is None) else self._compiled
        slots = positions if slots is None else slots
        lean, cache = self.lean, self.cache
        with torch.no_grad():
            x, h, masks, rope = prologue(tokens, positions, slots, tree_mask, tree_start, embeds)
            kept = {}
            for i, blk in enumerate(lean.blocks):
                if i in taps:
                    kept[i] = x
                x, h = block(blk, x, h, *rope[blk.kind], masks[blk.kind], cache.layer(i), cache.rows,
                             slots)
        kept["final"] = h
        self.tapped = tuple(kept[tap] for tap in taps)
        return h

    def _check(self, tokens, positions, slots, tree_mask, embeds, taps) -> None:
        """Shape and device checks only (Python values: no sync)."""
        if self.cache is None:
            raise RuntimeError("allocate(batch_size, max_len) must be called before forward")
        B, T = tokens.shape
        if positions.shape != (B, T) or (slots is not None and slots.shape != (B, T)):
            raise ValueError(f"tokens {tuple(tokens.shape)}, positions {tuple(positions.shape)} and slots "
                             f"{None if slots is None else tuple(slots.shape)} must all be [B, T]")
        if B != self.cache.batch_size or T > self.cache.size:
            raise ValueError(f"[B, T] = {[B, T]} does not fit the cache allocated for batch "
                             f"{self.cache.batch_size}, {self.cache.max_len} slots")
        dev = self.device
        for name, t in (("tokens", tokens), ("positions", positions), ("slots", slots),
                        ("tree_mask", tree_mask), ("embeds", embeds)):
            if t is not None and t.device != dev:
                raise ValueError(f"{name} on {t.device}, the model on {dev}")
        if embeds is not None and embeds.shape != (B, T, self.hidden_size):
            raise ValueError(f"embeds must be [B, T, D] = {[B, T, self.hidden_size]}, "
                             f"got {tuple(embeds.shape)}")
        if tree_mask is not None:
            if tree_mask.dim() != 3 or tree_mask.shape[:2] != (B, T):
                raise ValueError(f"tree_mask must be [B, T, W], got {tuple(tree_mask.shape)}")
            W = tree_mask.shape[-1]
            for kind, window in self.lean.windows.items():
                if window is not None and W > window:
                    raise ValueError(f"tree region of {W} slots exceeds the {window}-token window of the "
                                     f"{kind} layers (the window is not applied inside the region)")
        for tap in taps:
            if tap != "final" and not (isinstance(tap, int) and 0 <= tap < self.num_layers):
                raise ValueError(f"taps must be layer indices in [0, {self.num_layers}) or 'final', "
                                 f"got {tap!r}")

    def _prologue(self, tokens, positions, slots, tree_mask, tree_start, embeds):
        """-> x [B, T, D] (embeddings), h = first input norm of x, masks {kind: [B, 1, G*T, S]},
        rope {kind: (cos, sin) [B, T, 1, Dh]}."""
        lean, size = self.lean, self.cache.size
        x = lean.embed(tokens) if embeds is None else embeds.to(self.dtype)
        groups = lean.heads // lean.kv_heads
        masks = {kind: fold_mask(visible_slots(positions, slots, tree_mask, size, window, tree_start), groups,
                                 self.dtype)
                 for kind, window in lean.windows.items()}
        rope = {kind: (cos[positions].unsqueeze(2), sin[positions].unsqueeze(2))
                for kind, (cos, sin) in self.rope.items()}
        return x, lean.input_norm(x), masks, rope
