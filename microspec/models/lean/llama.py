"""Llama (SmolLM2, Llama-3.x): pre-norm blocks, RMSNorm whose weight applies in the model dtype, SwiGLU MLP.

    x = x + o_proj(attn(rope(q), rope(k), v))        on rms_norm(x, input_layernorm)
    x = x + down(silu(gate) * up)                     on rms_norm(x, post_attention_layernorm)

Biases (`attention_bias`, `mlp_bias`, or Qwen2's q/k/v biases) are carried when the model has them.
"""
from __future__ import annotations

from functools import partial

from torch import Tensor, nn

from .layers import DecoderBlock, norm_weight, rms_norm
from .model import LeanModel, head_dim_of, layer_kinds, text_parts


class LlamaBlock(DecoderBlock):
    """One Llama/Qwen2 decoder layer: (x, h) [B, T, D] -> (x', h') (see `DecoderBlock`)."""

    def __init__(self, layer: nn.Module, config, kind: str):
        head_dim = head_dim_of(config)
        super().__init__(layer, kind, config.num_attention_heads, config.num_key_value_heads, head_dim,
                         head_dim ** -0.5, config.hidden_act)
        self.register_buffer("ln_in", norm_weight(layer.input_layernorm), persistent=False)
        self.register_buffer("ln_mid", norm_weight(layer.post_attention_layernorm), persistent=False)
        self.eps = config.rms_norm_eps

    def forward(self, x: Tensor, h: Tensor, cos: Tensor, sin: Tensor, mask: Tensor, kv: Tensor,
                rows: Tensor, slots: Tensor) -> tuple[Tensor, Tensor]:
        x = x + self.attention(h, cos, sin, mask, kv, rows, slots)
        x = x + self.mlp(rms_norm(x, self.ln_mid, self.eps))
        return x, rms_norm(x, self.ln_next, self.eps)


def build(model: nn.Module) -> LeanModel:
    """The lean form of a `LlamaForCausalLM` (or any model with Llama's layer layout, such as Qwen2)."""
    config, decoder = text_parts(model)
    blocks = [LlamaBlock(layer, config, kind) for layer, kind in zip(decoder.layers, layer_kinds(config))]
    norm = partial(rms_norm, eps=config.rms_norm_eps)
    return LeanModel(config, decoder.embed_tokens.weight, None, blocks, norm, norm_weight(decoder.norm),
                     model.get_output_embeddings())


def check(config) -> str | None:
    """Why this config cannot run on the lean Llama code (None if it can)."""
    act = getattr(config, "hidden_act", "silu")
    if act not in ("silu", "swish"):
        return f"activation {act!r}"
    return None
