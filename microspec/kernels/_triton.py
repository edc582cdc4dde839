"""Optional Triton import. Triton is a dependency only where its wheels exist (Linux x86_64); everywhere else
each kernel's pure-torch reference runs instead and gives the same results.

Tests run the Triton kernels on the CPU with TRITON_INTERPRET=1 (set before the first import of triton).
"""
from __future__ import annotations

import os

import torch

try:  # pragma: no cover - depends on the platform
    import triton
    import triton.language as tl
    HAS_TRITON = True
except ImportError:  # pragma: no cover
    triton = tl = None
    HAS_TRITON = False


INTERPRETER = os.environ.get("TRITON_INTERPRET") == "1"   # kernels then run in numpy on the CPU


def triton_available_for(t: torch.Tensor) -> bool:
    """Production dispatch: Triton on CUDA tensors when it is installed; the torch reference otherwise."""
    return HAS_TRITON and t.is_cuda


def next_pow2(n: int) -> int:
    return 1 << max(0, (int(n) - 1).bit_length())
