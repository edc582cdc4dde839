"""Choosing a model backend: the lean code where the family has it, the Hugging Face path everywhere else.

>>> lm = make_backend(model, backend="auto", compile=True)
>>> lm.name            # "lean" for Llama / Qwen2 / Gemma3, "hf" otherwise
"""
from __future__ import annotations

from torch import nn

BACKENDS = ("auto", "hf", "lean")


def lean_supported(model: nn.Module) -> bool:
    """True when the lean backend implements `model` (family, rope type, activation, attention features)."""
    from .lean import unsupported_reason
    return unsupported_reason(model) is None


def make_backend(model: nn.Module, backend: str = "auto", compile: bool = False):
    """A `ModelBackend` over `model`; its `.name` says which was picked ("lean" or "hf").

    Args:
        model:   a loaded Hugging Face causal LM.
        backend: "lean" (raises `NotImplementedError`, with the reason, for a model it does not implement),
                 "hf" (`microspec.models.hf.CausalLM`, any family), or "auto" (lean when supported, else hf).
        compile: compile decode-shaped calls (`forward(..., eager=False)`) with `torch.compile`.
    """
    if backend not in BACKENDS:
        raise ValueError(f"unknown backend {backend!r}; expected one of {', '.join(BACKENDS)}")
    if backend == "lean" or (backend == "auto" and lean_supported(model)):
        from .lean import LeanCausalLM
        return LeanCausalLM(model, compile=compile)
    from .hf import CausalLM
    return CausalLM(model, compile=compile)
