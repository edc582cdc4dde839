"""Gemma3 (Gemma-3-270M and the text part of larger Gemma3): sandwich norms, q/k norms, GELU-tanh MLP,
sliding-window layers interleaved with global ones, each kind with its own RoPE base.

    x = x + post_attention_norm(o_proj(attn(rope(q_norm(q)), rope(k_norm(k)), v)))   on input_norm(x)
    x = x + post_feedforward_norm(down(gelu_tanh(gate) * up))                      on pre_feedforward_norm(x)

Every norm is Gemma's: x / rms(x) * (1 + w), all in float32, then cast. Embeddings are multiplied by
sqrt(hidden) rounded to the embedding dtype (as transformers does); attention scores are scaled by
query_pre_attn_scalar ** -0.5; the final logit soft-capping is `apply_logit_transform`'s job.
"""
from __future__ import annotations

from functools import partial

import torch
from torch import Tensor, nn

from .layers import DecoderBlock, rms_norm_scaled_f32
from .model import LeanModel, layer_kinds, text_parts


def _scale(norm: nn.Module) -> Tensor | None:
    """1 + w in float32 [D]: the factor of Gemma's RMSNorm, computed once (None for `nn.Identity`)."""
    if isinstance(norm, nn.Identity):
        return None
    with torch.no_grad():
        return 1.0 + norm.weight.detach().float()


def _activation(config) -> str | None:
    return getattr(config, "hidden_activation", None) or getattr(config, "hidden_act", None)


class Gemma3Block(DecoderBlock):
    """One Gemma3 decoder layer: (x, h) [B, T, D] -> (x', h') (see `DecoderBlock`)."""

    def __init__(self, layer: nn.Module, config, kind: str):
        super().__init__(layer, kind, config.num_attention_heads, config.num_key_value_heads, config.head_dim,
                         config.query_pre_attn_scalar ** -0.5, _activation(config))
        norms = (("ln_in", "input_layernorm"), ("ln_post_attn", "post_attention_layernorm"),
                 ("ln_pre_mlp", "pre_feedforward_layernorm"), ("ln_post_mlp", "post_feedforward_layernorm"))
        for name, norm in norms:
            self.register_buffer(name, _scale(getattr(layer, norm)), persistent=False)
        self.register_buffer("q_scale", _scale(layer.self_attn.q_norm), persistent=False)
        self.register_buffer("k_scale", _scale(layer.self_attn.k_norm), persistent=False)
        self.eps = config.rms_norm_eps

    def qk_norm(self, q: Tensor, k: Tensor) -> tuple[Tensor, Tensor]:
        return rms_norm_scaled_f32(q, self.q_scale, self.eps), rms_norm_scaled_f32(k, self.k_scale, self.eps)

    def forward(self, x: Tensor, h: Tensor, cos: Tensor, sin: Tensor, mask: Tensor, kv: Tensor,
                rows: Tensor, slots: Tensor) -> tuple[Tensor, Tensor]:
        eps = self.eps
        a = self.attention(h, cos, sin, mask, kv, rows, slots)
        x = x + rms_norm_scaled_f32(a, self.ln_post_attn, eps)
        m = self.mlp(rms_norm_scaled_f32(x, self.ln_pre_mlp, eps))
        x = x + rms_norm_scaled_f32(m, self.ln_post_mlp, eps)
        return x, rms_norm_scaled_f32(x, self.ln_next, eps)


def build(model: nn.Module) -> LeanModel:
    """The lean form of a `Gemma3ForCausalLM` (or the text part of a `Gemma3ForConditionalGeneration`)."""
    config, decoder = text_parts(model)
    blocks = [Gemma3Block(layer, config, kind) for layer, kind in zip(decoder.layers, layer_kinds(config))]
    embed = decoder.embed_tokens
    # transformers multiplies by its `embed_scale` buffer cast to the weight dtype (sqrt(3072) is 55.5 in
    # bf16); older versions lack the buffer and use the Python float.
    scale = getattr(embed, "embed_scale", None)
    scale = torch.tensor(config.hidden_size ** 0.5) if scale is None else scale.detach()
    norm = partial(rms_norm_scaled_f32, eps=config.rms_norm_eps)
    return LeanModel(config, embed.weight, scale.to(embed.weight.device, embed.weight.dtype), blocks, norm,
                     _scale(decoder.norm), model.get_output_embeddings())


def check(config) -> str | None:
    """Why this config cannot run on the lean Gemma3 code (None if it can)."""
    if getattr(config, "attn_logit_softcapping", None):
        return "attention logit soft-capping (SDPA cannot apply it)"
    if getattr(config, "use_bidirectional_attention", False):
        return "bidirectional attention"
    act = _activation(config)
    if act != "gelu_pytorch_tanh":
        return f"activation {act!r}"
    return None
