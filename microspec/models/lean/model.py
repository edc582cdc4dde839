"""`LeanModel`: one model's weights in lean form (fused blocks, embedding, final norm, head) and its layout
(which layers slide, which rope each kind uses). Built once per Hugging Face model by a family module
(llama.py, qwen2.py, gemma3.py) and shared by every backend over that model; holds no per-request state.
"""
from __future__ import annotations

from typing import Callable

import torch.nn.functional as F
from torch import Tensor, nn

from .rope import inverse_frequencies, rope_parameters

KINDS = ("full_attention", "sliding_attention")


def layer_kinds(config) -> list[str]:
    """Attention kind of each layer: `config.layer_types` when the config lists them, else all full."""
    kinds = list(getattr(config, "layer_types", None) or ["full_attention"] * config.num_hidden_layers)
    unknown = set(kinds) - set(KINDS)
    if unknown:
        raise NotImplementedError(f"layer types {sorted(unknown)} are not implemented by the lean backend")
    return kinds[:config.num_hidden_layers]


def kind_windows(config, kinds: list[str]) -> dict[str, int | None]:
    """Mask kind -> sliding window (None = full causal), for the kinds the layers use."""
    window = getattr(config, "sliding_window", None)
    if getattr(config, "use_sliding_window", True) is False:
        window = None
    if "sliding_attention" in kinds and window is None:
        raise ValueError("sliding_attention layers without a sliding_window in the config")
    return {kind: (window if kind == "sliding_attention" else None) for kind in sorted(set(kinds))}


def head_dim_of(config) -> int:
    return getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads


def text_parts(model: nn.Module):
    """(text config, text decoder) of a causal LM; multimodal Gemma3 keeps them under `language_model`."""
    config = model.config.get_text_config() if hasattr(model.config, "get_text_config") else model.config
    decoder = getattr(model, getattr(model, "base_model_prefix", "model"), None)
    decoder = getattr(decoder, "language_model", decoder)
    if decoder is None or not hasattr(decoder, "layers") or not hasattr(decoder, "embed_tokens"):
        raise TypeError(f"{type(model).__name__}: no text decoder with .layers and .embed_tokens")
    return config, decoder


class LeanModel(nn.Module):
    """Weights and layout of one model, ready for `LeanCausalLM`.

    Args:
        config:      the Hugging Face (text) config.
        embed:       input embedding weight [V_in, D] (the model's own tensor).
        embed_scale: multiplier of looked-up embeddings in the embedding dtype (Gemma: sqrt(D)), or None.
        blocks:      one `DecoderBlock` per layer (its `kind` picks mask and rope tables); linked here, each
                     to the next block's input norm and the last to the final norm.
        norm:        the family's norm, (x [B, T, D], weight) -> [B, T, D].
        final_norm:  the final norm's weight (in the form `norm` takes).
        head:        the output head module (hidden -> logits [B, T, V]).
    """

    def __init__(self, config, embed: Tensor, embed_scale: Tensor | None, blocks: list[nn.Module],
                 norm: Callable[[Tensor, Tensor], Tensor], final_norm: Tensor, head: nn.Module):
        super().__init__()
        self.config = config
        self.register_buffer("embed_weight", embed.detach(), persistent=False)
        self.register_buffer("embed_scale", None if embed_scale is None else embed_scale.detach(),
                             persistent=False)
        self.blocks = nn.ModuleList(blocks)
        for block, successor in zip(blocks, blocks[1:]):
            block.link(successor.ln_in)
        blocks[-1].link(final_norm)
        self.norm = norm
        self.head = head
        kinds = [b.kind for b in blocks]
        self.windows = kind_windows(config, kinds)
        first = blocks[0]
        self.kv_heads, self.head_dim, self.heads = first.kv_heads, first.head_dim, first.heads
        self.rope = {kind: inverse_frequencies(rope_parameters(config, kind), self.head_dim)
                     for kind in self.windows}                  # kind -> (inv_freq float32 [Dh/2], scaling)

    @property
    def input_vocab(self) -> int:
        return self.embed_weight.shape[0]

    def input_norm(self, x: Tensor) -> Tensor:
        """The first block's input norm of x [B, T, D] (the blocks compute every later one)."""
        return self.norm(x, self.blocks[0].ln_in)

    def embed(self, tokens: Tensor) -> Tensor:
        """tokens [B, T] (ids outside [0, input_vocab) clamped) -> embeddings [B, T, D], scaled like the
        model's own embedding module."""
        x = F.embedding(tokens.clamp(0, self.input_vocab - 1), self.embed_weight)
        return x if self.embed_scale is None else x * self.embed_scale
