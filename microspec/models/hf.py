"""The Hugging Face backend: any `transformers` causal LM with a static, per-row KV cache.

Why this path: any `transformers` causal LM that takes `position_ids`, a custom cache object and a 4-D
attention mask runs unchanged (Llama, Qwen2, Mistral, Gemma, Phi-3, ...), and every step has static shapes:

  * `RowKVCache` stores K/V as [B, H_kv, S, Dh] per layer and writes each new token at its row's own
    position (`scatter_` along S). Row b's token at position p lives in slot p, so prompts are stored
    compacted (no left padding inside the cache) and rows advance independently in a batch.
  * The attention mask is built from positions alone: query (b, t) sees slot j iff j <= position[b, t]
    (and, for sliding-window models, j > position - window). Slots beyond a row's committed length hold
    stale K/V of rejected drafts; causality hides them and the next step overwrites them, so rolling back
    a rejection costs nothing (no crop, unlike HF's DynamicCache).
  * No host syncs: positions and masks are device tensors, so a step can be captured in a CUDA graph.

`CausalLM` implements the backend contract of `microspec.models.base` (read it for the slot/mask rule):
`allocate(batch, max_len)` once per request, then `hidden = lm.forward(tokens, positions, ...)` and
`lm.logits(hidden)`; the output head is applied separately so a drafter can score a pruned head instead.
"""
from __future__ import annotations

import inspect
import weakref

import torch
from torch import Tensor, nn

from .base import apply_logit_transform, visible_slots

SUPPORTED_ATTENTION = ("sdpa", "eager")


class RowKVCache:
    """Duck-typed `transformers` cache with per-row write positions and a fixed length S.

    Before each forward the caller sets `write_positions` [B, T]; every layer's `update` scatters its new
    K/V there and returns the whole [B, H, S, Dh] buffers. Buffers are allocated lazily at the first update
    (head count and head dim come from the model's own tensors, whatever the family).
    """

    is_compileable = True

    def __init__(self, num_layers: int, batch_size: int, max_len: int):
        self.num_layers, self.batch_size, self.max_len = num_layers, batch_size, max_len
        self.keys: list[Tensor | None] = [None] * num_layers
        self.values: list[Tensor | None] = [None] * num_layers
        self.write_positions: Tensor | None = None

    def update(self, key_states: Tensor, value_states: Tensor, layer_idx: int, *args, **kwargs):
        if self.keys[layer_idx] is None:
            B, H, _, Dh = key_states.shape
            shape = (B, H, self.max_len, Dh)
            self.keys[layer_idx] = key_states.new_zeros(shape)
            self.values[layer_idx] = value_states.new_zeros((*shape[:3], value_states.shape[-1]))
        k, v = self.keys[layer_idx], self.values[layer_idx]
        pos = self.write_positions[:, None, :, None]                                    # [B, 1, T, 1]
        k.scatter_(2, pos.expand_as(key_states), key_states)
        v.scatter_(2, pos.expand_as(value_states), value_states)
        return k, v

    def get_seq_length(self, layer_idx: int = 0) -> int:  # only used when position_ids are missing
        raise RuntimeError("RowKVCache needs explicit position_ids")

    def __len__(self) -> int:
        return self.num_layers


def vocab_size_of(model: nn.Module) -> int:
    """Rows of the model's output head (the padded vocabulary the logits cover)."""
    head = model.get_output_embeddings()
    weight = getattr(head, "weight", None)
    if weight is None:
        raise TypeError(f"{type(model).__name__} has no output head weight")
    return weight.shape[0]


class CausalLM:
    """A Hugging Face causal LM run as a `ModelBackend`: its decoder (`model.model`) with a `RowKVCache`, and
    its output head kept apart.

    `CausalLM.of(model, compile)` returns one shared wrapper per model, so decoders built over the same target
    share its compiled graphs and its cache buffers (used one call at a time). A drafter that is the target
    itself gets its own wrapper (`CausalLM(model)`), hence its own cache.

    Args:
        model: a `transformers` causal LM (`...ForCausalLM`) in eval mode; its attention implementation must
               be "sdpa" or "eager" (they take the 4-D mask this path builds).
        compile: run decode-shaped calls through `torch.compile` (Inductor fuses each layer's small
               element-wise kernels; the first call per shape pays the compilation). Prefill (varying
               lengths) stays eager.
    """

    name = "hf"

    def __init__(self, model: nn.Module, compile: bool = False):
        config = model.config
        impl = getattr(config, "_attn_implementation", None) or "eager"
        if impl not in SUPPORTED_ATTENTION:
            raise ValueError(f"attention implementation {impl!r} is not supported; load the model with "
                             f"attn_implementation='sdpa' (or 'eager')")
        decoder = getattr(model, getattr(model, "base_model_prefix", "model"), None)
        if decoder is None or not hasattr(decoder, "layers"):
            raise TypeError(f"{type(model).__name__}: no decoder with .layers under "
                            f".{model.base_model_prefix}")
        self.model, self.decoder, self.config = model, decoder, config
        self.head = model.get_output_embeddings()
        self.attn_impl = impl
        self.num_layers = config.num_hidden_layers
        self.hidden_size = config.hidden_size
        self.vocab_size = vocab_size_of(model)
        self.windows = mask_windows(config)
        self.cache: RowKVCache | None = None
        # Ids the model cannot embed (a larger target vocabulary's extra ids, fed to a drafter) are clamped:
        # that costs the drafter's guess its quality, never the output its correctness.
        embed = model.get_input_embeddings()
        self.input_vocab = getattr(embed, "num_embeddings", None) or self.vocab_size
        # transformers renamed `past_key_values` to `cache` (5.24 warns on the old name); pass what this
        # version's decoder takes.
        params = inspect.signature(decoder.forward).parameters
        self._cache_kwarg = "cache" if "cache" in params else "past_key_values"
        self._compiled = torch.compile(self._forward, dynamic=False) if compile else None

    _shared: weakref.WeakKeyDictionary[nn.Module, dict[bool, CausalLM]] = weakref.WeakKeyDictionary()

    @classmethod
    def of(cls, model: nn.Module, compile: bool = False) -> CausalLM:
        per_model = cls._shared.setdefault(model, {})
        if compile not in per_model:
            per_model[compile] = cls(model, compile=compile)
        return per_model[compile]

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    @property
    def dtype(self) -> torch.dtype:
        return next(self.model.parameters()).dtype

    def allocate(self, batch_size: int, max_len: int) -> RowKVCache:
        """A fresh cache for one request batch (reused, and zero-filled lazily, when the shape repeats)."""
        cache = self.cache
        if cache is None or cache.batch_size != batch_size or cache.max_len != max_len:
            cache = self.cache = RowKVCache(self.num_layers, batch_size, max_len)
        return cache

    def embed(self, tokens: Tensor) -> Tensor:
        return self.model.get_input_embeddings()(tokens.clamp(max=self.input_vocab - 1))

    def logits(self, hidden: Tensor, head: nn.Module | None = None) -> Tensor:
        return apply_logit_transform(self.config, (head or self.head)(hidden))

    def forward(self, tokens: Tensor, positions: Tensor, slots: Tensor | None = None,
                tree_mask: Tensor | None = None, tree_start: Tensor | None = None,
                embeds: Tensor | None = None, eager: bool = False) -> Tensor:
        """Final hidden states [B, T, D] of tokens [B, T] at positions [B, T], written at `slots` (the rule of
        `microspec.models.base`). Through the compiled path when `compile=True`, unless `eager` (prefill)."""
        fn = self._forward if (eager or self._compiled is None) else self._compiled
        return fn(tokens, positions, slots, tree_mask, tree_start, embeds)

    def _forward(self, tokens, positions, slots, tree_mask, tree_start, embeds) -> Tensor:
        cache = self.cache
        cache.write_positions = positions if slots is None else slots
        masks = {kind: self._mask(positions, slots, tree_mask, tree_start, w)
                 for kind, w in self.windows.items()}
        mask = masks if len(masks) > 1 else next(iter(masks.values()))
        inputs = ({"inputs_embeds": embeds} if embeds is not None
                  else {"input_ids": tokens.clamp(max=self.input_vocab - 1)})
        out = self.decoder(**inputs, position_ids=positions, attention_mask=mask, use_cache=True,
                           **{self._cache_kwarg: cache})
        return out.last_hidden_state

    def _mask(self, positions, slots, tree_mask, tree_start, window) -> Tensor:
        """[B, 1, T, S] mask of `visible_slots`; bool for sdpa, additive for eager."""
        visible = visible_slots(positions, slots, tree_mask, self.cache.max_len, window,
                                tree_start).unsqueeze(1)
        if self.attn_impl == "sdpa":
            return visible
        return torch.zeros(visible.shape, dtype=self.dtype, device=positions.device).masked_fill(
            ~visible, torch.finfo(self.dtype).min)

    def snapshot(self) -> list[Tensor]:
        """A copy of the KV cache (lab tools reuse one prefill for several runs)."""
        return [t.clone() for t in (*self.cache.keys, *self.cache.values)]

    def restore(self, state: list[Tensor]) -> None:
        n = self.num_layers
        self.cache.keys, self.cache.values = [t.clone() for t in state[:n]], [t.clone() for t in state[n:]]

    def move_kv(self, src_slots: Tensor, dst_slots: Tensor) -> None:
        """Copy every layer's K/V from src_slots [B, T] to dst_slots [B, T] (gathered first: overlap is
        safe)."""
        for buf in (*self.cache.keys, *self.cache.values):
            if buf is None:
                continue
            src = src_slots[:, None, :, None].expand(-1, buf.shape[1], -1, buf.shape[3])
            buf.scatter_(2, dst_slots[:, None, :, None].expand_as(src), buf.gather(2, src))


def mask_windows(config) -> dict[str, int | None]:
    """Mask kinds the model's layers use -> sliding window (None = full causal), as transformers decides:
    configs that list `layer_types` window only their "sliding_attention" layers; configs without it (Mistral,
    Mixtral, Phi-3, Starcoder2, ...) window every layer when `sliding_window` is set."""
    window = getattr(config, "sliding_window", None)
    if getattr(config, "use_sliding_window", True) is False:
        window = None
    types = getattr(config, "layer_types", None)
    if not types:
        return {"full_attention": window}
    unknown = set(types) - {"full_attention", "sliding_attention"}
    if unknown:
        raise ValueError(f"layer types {sorted(unknown)} are not supported")
    return {kind: (window if kind == "sliding_attention" else None) for kind in sorted(set(types))}
