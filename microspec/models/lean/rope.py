"""Rotary position embeddings: inverse frequencies from a Hugging Face config, and cos/sin tables.

The tables reproduce transformers bit for bit: inverse frequencies in float32, angles `position.float() *
inv_freq` in float32, cos/sin in float32, then cast to the model dtype (the rotary module does the same per
call; a table indexed by position gives identical values without recomputing them every step).

Supported rope types: "default", "linear", "llama3" (Llama-3.1/3.2). Others raise `NotImplementedError`.
"""
from __future__ import annotations

import math

import torch
from torch import Tensor

ROPE_TYPES = ("default", "linear", "llama3")


def rope_parameters(config, layer_type: str | None = None) -> dict:
    """The rope parameters that apply to layers of `layer_type`, from either config format:

    * transformers >= 5: `config.rope_parameters`, flat ({"rope_type", "rope_theta", ...}) or nested by layer
      type (Gemma3: {"full_attention": {...}, "sliding_attention": {...}});
    * older configs: `rope_theta` and `rope_scaling`, plus `rope_local_base_freq` for Gemma3's sliding layers.
    """
    params = getattr(config, "rope_parameters", None)
    if isinstance(params, dict) and params:
        if layer_type is not None and isinstance(params.get(layer_type), dict):
            params = params[layer_type]
        elif any(isinstance(v, dict) for v in params.values()):
            raise ValueError(f"rope_parameters has no entry for layer type {layer_type!r}: {sorted(params)}")
        params = dict(params)
    else:
        scaling = dict(getattr(config, "rope_scaling", None) or {})
        theta = getattr(config, "rope_theta", 10000.0)
        if layer_type == "sliding_attention" and getattr(config, "rope_local_base_freq", None) is not None:
            theta, scaling = config.rope_local_base_freq, {}          # Gemma3 scales only its global layers
        params = {**scaling, "rope_theta": theta}
    params.setdefault("rope_type", params.get("type", "default"))
    if params["rope_type"] == "llama3":      # transformers' default for configs that omit it
        params.setdefault("original_max_position_embeddings", config.max_position_embeddings)
    return params


def inverse_frequencies(params: dict, head_dim: int) -> tuple[Tensor, float]:
    """(inv_freq float32 [head_dim // 2], attention scaling) for one rope parameter dict.

    Same float32 operations as transformers' `_compute_*_parameters`, so the tables match it exactly.
    """
    rope_type = params.get("rope_type", "default")
    if rope_type not in ROPE_TYPES:
        raise NotImplementedError(f"rope type {rope_type!r} is not implemented by the lean backend "
                                  f"(supported: {', '.join(ROPE_TYPES)}); use backend='hf'")
    if params.get("partial_rotary_factor", 1.0) != 1.0:
        raise NotImplementedError("partial rotary embeddings are not implemented by the lean backend")
    base = params["rope_theta"]
    inv_freq = 1.0 / (base ** (torch.arange(0, head_dim, 2, dtype=torch.int64).float() / head_dim))
    if rope_type == "linear":
        inv_freq = inv_freq / params["factor"]
    elif rope_type == "llama3":
        inv_freq = _llama3(inv_freq, params)
    return inv_freq, 1.0


def _llama3(inv_freq: Tensor, params: dict) -> Tensor:
    """Llama-3.1 frequency scaling: long wavelengths divided by `factor`, short ones kept, a smooth blend
    in between (the operations of transformers' `_compute_llama3_parameters`, in the same order)."""
    factor, low, high = params["factor"], params["low_freq_factor"], params["high_freq_factor"]
    old_len = params["original_max_position_embeddings"]
    low_wavelen, high_wavelen = old_len / low, old_len / high
    wavelen = 2 * math.pi / inv_freq
    scaled = torch.where(wavelen > low_wavelen, inv_freq / factor, inv_freq)
    smooth = (old_len / wavelen - low) / (high - low)
    smoothed = (1 - smooth) * scaled / factor + smooth * scaled
    medium = ~(wavelen < high_wavelen) * ~(wavelen > low_wavelen)
    return torch.where(medium, smoothed, scaled)


def rope_tables(inv_freq: Tensor, scaling: float, length: int, dtype: torch.dtype,
                device: torch.device) -> tuple[Tensor, Tensor]:
    """cos, sin [length, head_dim] in `dtype` for positions 0 .. length - 1 (the halves repeated, for the
    rotate-half layout transformers uses)."""
    positions = torch.arange(length, device=device).float()                              # [P]
    freqs = positions[:, None] * inv_freq.to(device)[None, :]                             # [P, Dh/2] float32
    emb = torch.cat((freqs, freqs), dim=-1)                                               # [P, Dh]
    return (emb.cos() * scaling).to(dtype), (emb.sin() * scaling).to(dtype)
