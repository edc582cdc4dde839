"""The lean model path: compact gpt-fast-style code for the families with real weights here, driven through
the `ModelBackend` contract of `microspec.models.base` (`LeanCausalLM`).

    layers.py   norms, RoPE, grouped-query attention over the static cache, the fused decoder block
    rope.py     inverse frequencies from a config (default, linear, llama3) and cos/sin tables
    cache.py    the static KV cache [B, Hkv, S, Dh] per layer, and compaction (`move`)
    model.py    `LeanModel`: one model's fused weights and layout, shared by every backend over it
    llama.py, qwen2.py, gemma3.py   one family each: its block and `build(model)`
    backend.py  `LeanCausalLM`, the backend

Same math as transformers (float64 agrees to rounding, tests/models/test_lean.py); fewer, larger kernels: one
QKV GEMM, one gate/up GEMM, no K/V repeat, one mask per mask kind per call, rope by table lookup.
"""
from __future__ import annotations

import weakref

from torch import nn

from . import gemma3, llama, qwen2
from .backend import LeanCausalLM
from .layers import ACTIVATIONS
from .model import LeanModel, head_dim_of, layer_kinds, text_parts
from .rope import inverse_frequencies, rope_parameters

FAMILIES = {"llama": llama, "qwen2": qwen2, "gemma3_text": gemma3, "gemma3": gemma3}   # model_type -> module

_LEAN_MODELS: "weakref.WeakKeyDictionary[nn.Module, LeanModel]" = weakref.WeakKeyDictionary()


def unsupported_reason(model: nn.Module) -> str | None:
    """Why the lean code cannot run `model` (None when it can), without building anything."""
    model_type = getattr(model.config, "model_type", None)
    if model_type not in FAMILIES:
        return f"model type {model_type!r} has no lean implementation (lean: {', '.join(sorted(FAMILIES))})"
    try:
        config, _ = text_parts(model)
        kinds = layer_kinds(config)
        for kind in set(kinds):
            inverse_frequencies(rope_parameters(config, kind), head_dim_of(config))
    except (NotImplementedError, TypeError, ValueError) as err:
        return str(err)
    reason = FAMILIES[model_type].check(config)
    return None if reason is None else f"{model_type}: {reason} is not implemented by the lean backend"


def lean_model(model: nn.Module) -> LeanModel:
    """The `LeanModel` of `model`, built at the first call and shared afterwards (the fused weights are
    copies: one per model, however many backends run it). Raises `NotImplementedError` for unsupported
    models."""
    lean = _LEAN_MODELS.get(model)
    if lean is None:
        reason = unsupported_reason(model)
        if reason is not None:
            raise NotImplementedError(f"{reason}; use backend='hf'")
        lean = _LEAN_MODELS[model] = FAMILIES[model.config.model_type].build(model)
    return lean


__all__ = ["ACTIVATIONS", "FAMILIES", "LeanCausalLM", "LeanModel", "lean_model", "unsupported_reason"]
