"""The pieces every lean family shares: RMS norms, rotary embedding, attention over the static cache, and a
decoder block with fused projections.

Shapes: x [B, T, D] residual stream; q [B, T, Hq, Dh], k/v [B, T, Hkv, Dh]; a layer's cache kv
[2, B, Hkv, S, Dh]; cos/sin [B, T, 1, Dh]; masks [B, 1, G*T, S] additive (G = Hq // Hkv, see `fold_mask`).

The arithmetic follows transformers operation for operation (norms in float32, rotate-half RoPE, the same
activation functions), so float64 runs agree with the Hugging Face model to rounding.
"""
from __future__ import annotations

from functools import partial

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ...kernels.skinny_linear import skinny_linear

ACTIVATIONS = {"silu": F.silu, "swish": F.silu, "gelu_pytorch_tanh": partial(F.gelu, approximate="tanh")}


def activation(name: str):
    if name not in ACTIVATIONS:
        raise NotImplementedError(f"activation {name!r} is not implemented by the lean backend "
                                  f"(supported: {', '.join(ACTIVATIONS)}); use backend='hf'")
    return ACTIVATIONS[name]


def norm_weight(norm: nn.Module) -> Tensor | None:
    """A norm module's weight, detached; None for `nn.Identity` (a norm-free spot, as in an EAGLE-1 layer)."""
    return None if isinstance(norm, nn.Identity) else norm.weight.detach()


def rms_norm(x: Tensor, weight: Tensor | None, eps: float) -> Tensor:
    """Llama/Qwen2 RMSNorm: normalised in float32, cast back, then scaled in the model dtype (weight None:
    no norm at this spot)."""
    if weight is None:
        return x
    h = x.float()
    h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + eps)
    return weight * h.to(x.dtype)


def rms_norm_scaled_f32(x: Tensor, scale_f32: Tensor | None, eps: float) -> Tensor:
    """Gemma RMSNorm: normalised and scaled in float32 (`scale_f32` = 1 + weight, precomputed), then cast
    (scale None: no norm at this spot)."""
    if scale_f32 is None:
        return x
    h = x.float()
    h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + eps)
    return (h * scale_f32).to(x.dtype)


def apply_rope(x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
    """x [B, T, H, Dh] rotated by cos/sin [B, T, 1, Dh] (rotate-half layout, as transformers)."""
    x1, x2 = x.chunk(2, dim=-1)
    return x * cos + torch.cat((-x2, x1), dim=-1) * sin


def fold_mask(visible: Tensor, groups: int, dtype: torch.dtype) -> Tensor:
    """[B, T, S] bool visibility -> [B, 1, G*T, S] additive mask (0 visible, -inf hidden) in `dtype`, for
    `attend`'s folded queries (row g*T + t is query t of the g-th query head of a KV group).

    Built once per call and mask kind and shared by all layers of that kind. Additive rather than bool
    because SDPA converts a bool mask to a float one inside every call, i.e. once per layer."""
    B, T, S = visible.shape
    folded = visible.unsqueeze(1).expand(B, groups, T, S).reshape(B, 1, groups * T, S)
    return torch.zeros(folded.shape, dtype=dtype, device=visible.device).masked_fill_(~folded, float("-inf"))


def write_kv(kv: Tensor, rows: Tensor, slots: Tensor, k: Tensor, v: Tensor) -> None:
    """kv [2, B, Hkv, S, Dh][:, rows, :, slots] = (k, v) [B, T, Hkv, Dh] each, in place (rows [B, 1], slots
    [B, T]).

    One `index_put_` at device-side indices into the layer's buffer itself (not into a K or V view of it,
    which a compiled graph may write back through the whole buffer): no host sync, static shapes, and
    the new K/V go in straight from the projection layout (no transpose)."""
    which = torch.arange(2, device=kv.device).view(2, 1, 1)
    kv[which, rows, :, slots] = torch.stack((k, v))


# Folded query rows (G*T) up to which `attend` computes attention as two GEMMs and a softmax: decode steps,
# tree verification and drafter calls. Past it (prefill chunks) SDPA's fused kernels, which never hold the
# [G*T, S] score matrix.
MATH_MAX_ROWS = 512


def attend(q: Tensor, k_cache: Tensor, v_cache: Tensor, mask: Tensor, scale: float) -> Tensor:
    """Grouped-query attention of q [B, T, Hq, Dh] over the whole cache [B, Hkv, S, Dh] -> [B, T, Hq * Dh].

    GQA without repeating K/V: the G query heads that share a KV head are folded into the query length
    ([B, Hkv, G*T, Dh]), and each KV head is read once per group rather than G times.

    Decode-shaped calls (G*T <= MATH_MAX_ROWS) compute attention as transformers' eager path does: scores
    q k^T in the model dtype, scaled, plus the mask, a float32 softmax cast back, then p v. The fused SDPA
    kernels give each (batch row, KV head) one thread block, i.e. one to three of the H200's 132 SMs at
    batch 1, and take time proportional to S (Gemma-3-270M, S = 1344: 79 us per layer with cuDNN, 11 us as
    GEMMs compiled by Inductor with float32 scores; `benchmarks/bench_attention.py`); model-dtype scores
    skip the cache's float32 copy and use tensor cores.
    """
    B, T, Hq, Dh = q.shape
    Hkv = k_cache.shape[1]
    G = Hq // Hkv
    qf = q.view(B, T, Hkv, G, Dh).permute(0, 2, 3, 1, 4).reshape(B, Hkv, G * T, Dh)
    if G * T <= MATH_MAX_ROWS:
        scores = torch.matmul(qf, k_cache.transpose(-1, -2)) * scale + mask             # [B, Hkv, G*T, S]
        f = torch.promote_types(scores.dtype, torch.float32)                           # float64 stays
        out = torch.matmul(torch.softmax(scores, dim=-1, dtype=f).to(v_cache.dtype), v_cache)
    else:
        out = F.scaled_dot_product_attention(qf, k_cache, v_cache, attn_mask=mask, scale=scale)
    return out.view(B, Hkv, G, T, Dh).permute(0, 3, 1, 2, 4).reshape(B, T, Hq * Dh)


def _cat(*tensors: Tensor | None) -> Tensor | None:
    """Concatenate along the output dimension (weights [out, in] or biases [out]); None if all are None."""
    if all(t is None for t in tensors):
        return None
    if any(t is None for t in tensors):
        raise ValueError("fusing projections where only some have a bias")
    return torch.cat([t.detach() for t in tensors], dim=0)


class DecoderBlock(nn.Module):
    """One decoder layer's weights, fused: wqkv [(Hq + 2 Hkv) Dh, D], w13 [2F, D] (gate rows, then up rows).

    A block takes the residual stream x and its own input norm h = norm(x, ln_in), and returns the new
    residual and the *next* layer's input norm (the final norm after the last layer, see `link`): the
    residual add and the next norm then fuse into one kernel even though each layer is compiled on its own.

    The fused matrices are copies made once here (the Hugging Face model is left untouched: its layer weights
    are then held twice); o/down projections and norm weights are the model's own tensors. Every projection
    goes through `microspec.kernels.skinny_linear`: F.linear, except for one row in half precision on a GPU
    (a batch-1 decode step), where cuBLAS runs these narrow weights on a few SMs. Subclasses set
    `ln_in`, give the residual structure (`forward`) and may normalise q/k (`qk_norm`).

    Args:
        layer: the Hugging Face decoder layer (`self_attn.{q,k,v,o}_proj`, `mlp.{gate,up,down}_proj`).
        kind:  its attention kind, "full_attention" or "sliding_attention" (selects mask and rope tables).
        heads, kv_heads, head_dim: attention geometry; scale: the softmax scale.
        act:   the MLP activation's transformers name.
    """

    def __init__(self, layer: nn.Module, kind: str, heads: int, kv_heads: int, head_dim: int, scale: float,
                 act: str):
        super().__init__()
        attn, mlp = layer.self_attn, layer.mlp
        self.kind, self.scale = kind, scale
        self.heads, self.kv_heads, self.head_dim = heads, kv_heads, head_dim
        self.act = activation(act)
        with torch.no_grad():
            self.register_buffer("wqkv", _cat(attn.q_proj.weight, attn.k_proj.weight, attn.v_proj.weight),
                                 persistent=False)
            self.register_buffer("bqkv", _cat(attn.q_proj.bias, attn.k_proj.bias, attn.v_proj.bias),
                                 persistent=False)
            self.register_buffer("w13", _cat(mlp.gate_proj.weight, mlp.up_proj.weight), persistent=False)
            self.register_buffer("b13", _cat(mlp.gate_proj.bias, mlp.up_proj.bias), persistent=False)
            for name, lin in (("o", attn.o_proj), ("2", mlp.down_proj)):
                self.register_buffer(f"w{name}", lin.weight.detach(), persistent=False)
                self.register_buffer(f"b{name}", None if lin.bias is None else lin.bias.detach(),
                                     persistent=False)
        self.register_buffer("ln_next", None, persistent=False)
        self.split = (heads * head_dim, kv_heads * head_dim, kv_heads * head_dim)

    def link(self, next_norm: Tensor) -> None:
        """Set the norm applied to this block's output: the next block's `ln_in`, or the final norm's."""
        self.ln_next = next_norm

    def qk_norm(self, q: Tensor, k: Tensor) -> tuple[Tensor, Tensor]:
        return q, k

    def attention(self, h: Tensor, cos: Tensor, sin: Tensor, mask: Tensor, kv: Tensor, rows: Tensor,
                  slots: Tensor) -> Tensor:
        """Normed input h [B, T, D] -> attention output after o_proj [B, T, D]; writes K/V at `slots`."""
        B, T, _ = h.shape
        q, k, v = skinny_linear(h, self.wqkv, self.bqkv).split(self.split, dim=-1)
        q = q.view(B, T, self.heads, self.head_dim)
        k = k.view(B, T, self.kv_heads, self.head_dim)
        v = v.view(B, T, self.kv_heads, self.head_dim)
        q, k = self.qk_norm(q, k)
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        write_kv(kv, rows, slots, k, v)
        return skinny_linear(attend(q, kv[0], kv[1], mask, self.scale), self.wo, self.bo)

    def mlp(self, h: Tensor) -> Tensor:
        """Normed input h [B, T, D] -> down_proj(act(gate) * up) [B, T, D], gate and up in one GEMM."""
        gate, up = skinny_linear(h, self.w13, self.b13).chunk(2, dim=-1)
        return skinny_linear(self.act(gate) * up, self.w2, self.b2)


def run_block(block: DecoderBlock, x: Tensor, h: Tensor, cos: Tensor, sin: Tensor, mask: Tensor,
              kv: Tensor, rows: Tensor, slots: Tensor) -> tuple[Tensor, Tensor]:
    """One layer: (x, h) [B, T, D] each -> (x', next norm of x'); kv [2, B, Hkv, S, Dh] is the layer's cache
    (K, V). The unit `torch.compile` compiles: every block of a family has the same code and shapes, so one
    graph serves all layers (compile time of one layer, not of the whole model)."""
    return block(x, h, cos, sin, mask, kv, rows, slots)
