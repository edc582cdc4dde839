"""Qwen2 (Qwen2.5): Llama's layer layout with q/k/v biases (no o_proj bias), and optional sliding-window
layers (`use_sliding_window`, layers from `max_window_layers` on, listed in `config.layer_types`).

The Llama block already fuses whatever biases the projections carry, so Qwen2 is the Llama code.
"""
from __future__ import annotations

from torch import nn

from . import llama
from .model import LeanModel


def build(model: nn.Module) -> LeanModel:
    """The lean form of a `Qwen2ForCausalLM`."""
    return llama.build(model)


def check(config) -> str | None:
    """Why this config cannot run on the lean Qwen2 code (None if it can)."""
    return llama.check(config)
