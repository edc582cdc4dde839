"""Running Hugging Face causal LMs with a static, per-row KV cache (the model path of `SpecDecoder`).

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

`CausalLM` wraps one model: `allocate(batch, max_len)` once per request, then
`logits = lm(tokens [B, T], positions [B, T], last_only=...)`.
"""
from __future__ import annotations

import weakref

import torch
from torch import Tensor, nn

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
    """A Hugging Face causal LM driven with explicit positions and a `RowKVCache`.

    `CausalLM.of(model, compile)` returns one shared wrapper per model, so decoders built over the same
    target share its compiled graphs and its cache buffers (used one call at a time).

    Args:
        model: a `transformers` causal LM (`...ForCausalLM`) in eval mode; its attention implementation
               must be "sdpa" or "eager" (they take the 4-D mask this path builds).
    """

    def __init__(self, model: nn.Module, compile: bool = False):
        config = model.config
        impl = getattr(config, "_attn_implementation", None) or "eager"
        if impl not in SUPPORTED_ATTENTION:
            raise ValueError(f"attention implementation {impl!r} is not supported; load the model with "
                             f"attn_implementation='sdpa' (or 'eager')")
        self.model = model
        self.config = config
        self.attn_impl = impl
        self.num_layers = config.num_hidden_layers
        self.windows = self._mask_windows(config)
        self.cache: RowKVCache | None = None
        self.hidden: Tensor | None = None      # final hidden states of the last call, when captured
        self._hidden_hook = None
        # Ids the model cannot embed (a larger target vocabulary's extra ids, fed to a drafter) are clamped:
        # that costs the drafter's guess its quality, never the output its correctness.
        get_embed = getattr(model, "get_input_embeddings", None)
        embed = get_embed() if callable(get_embed) else None
        self.input_vocab = getattr(embed, "num_embeddings", None) or vocab_size_of(model)
        # Decode-shaped calls (the same few shapes every step) can run through torch.compile, which fuses the
        # dozens of small element-wise kernels of each layer; prefill (varying lengths) stays eager.
        self._compiled = torch.compile(self._forward, dynamic=False) if compile else None

    def capture_hidden(self, enable: bool = True) -> None:
        """Keep the input of the output head (the final hidden states [B, T, D]) of every call in `hidden`."""
        if enable and self._hidden_hook is None:
            def keep(_module, args):
                self.hidden = args[0]
            self._hidden_hook = self.model.get_output_embeddings().register_forward_pre_hook(keep)
        elif not enable and self._hidden_hook is not None:
            self._hidden_hook.remove()
            self._hidden_hook, self.hidden = None, None

    _shared: "weakref.WeakKeyDictionary[nn.Module, dict[bool, CausalLM]]" = weakref.WeakKeyDictionary()

    @classmethod
    def of(cls, model: nn.Module, compile: bool = False) -> "CausalLM":
        per_model = cls._shared.setdefault(model, {})
        if compile not in per_model:
            per_model[compile] = cls(model, compile=compile)
        return per_model[compile]

    @staticmethod
    def _mask_windows(config) -> dict[str, int | None]:
        """Mask kinds the model's layers use -> sliding window (None = full causal)."""
        types = set(getattr(config, "layer_types", None) or ["full_attention"])
        window = getattr(config, "sliding_window", None)
        if getattr(config, "use_sliding_window", True) is False:
            window = None
        unknown = types - {"full_attention", "sliding_attention"}
        if unknown:
            raise ValueError(f"layer types {sorted(unknown)} are not supported")
        if types == {"full_attention"}:
            # Mistral-style configs put the window on every layer without listing layer types.
            return {"full_attention": window if getattr(config, "model_type", "") == "mistral" else None}
        return {"full_attention": None, "sliding_attention": window}

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

    def _mask(self, positions: Tensor, window: int | None) -> Tensor:
        """[B, 1, T, S] mask: slot j visible to query (b, t) iff j <= pos (and pos - j < window)."""
        slots = torch.arange(self.cache.max_len, device=positions.device)
        pos = positions.unsqueeze(-1)                                                   # [B, T, 1]
        visible = slots <= pos
        if window is not None:
            visible = visible & (slots > pos - window)
        visible = visible.unsqueeze(1)
        if self.attn_impl == "sdpa":
            return visible
        return torch.zeros(visible.shape, dtype=self.dtype, device=positions.device).masked_fill(
            ~visible, torch.finfo(self.dtype).min)

    def __call__(self, tokens: Tensor, positions: Tensor, last_only: bool = False) -> Tensor:
        """Run tokens [B, T] at positions [B, T]; returns logits [B, T, N] (or [B, 1, N] if last_only),
        N = vocabulary (or active-set size when the head is a `SparseLMHead`)."""
        return self._forward(tokens, positions, last_only)

    def decode(self, tokens: Tensor, positions: Tensor, last_only: bool = False) -> Tensor:
        """Same as calling the model, through the compiled path when `compile=True` (decode steps)."""
        return (self._compiled or self._forward)(tokens, positions, last_only)

    def _forward(self, tokens: Tensor, positions: Tensor, last_only: bool) -> Tensor:
        cache = self.cache
        cache.write_positions = positions
        masks = {kind: self._mask(positions, w) for kind, w in self.windows.items()}
        mask = masks if len(masks) > 1 else masks["full_attention"]
        out = self.model(input_ids=tokens.clamp(max=self.input_vocab - 1), position_ids=positions,
                         attention_mask=mask, past_key_values=cache, use_cache=True,
                         logits_to_keep=1 if last_only else 0)
        return out.logits
