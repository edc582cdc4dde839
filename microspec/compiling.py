"""One rule for compiling the decode step's pieces: `compiled(fn, compile)`.

Inside a CUDA graph a decode step costs about a few microseconds per kernel whatever the kernel does, so
the pieces made of many small ops (model layers, tree bookkeeping, policy updates) are compiled with static
shapes and no graph breaks; Inductor fuses their elementwise work into a few kernels.
"""
from __future__ import annotations

from collections.abc import Callable

import torch


def compiled(fn: Callable, compile: bool | str) -> Callable:
    """`fn` itself when `compile` is falsy, else `torch.compile(fn, fullgraph=True, dynamic=False)`; a string
    names the backend instead of Inductor (e.g. "aot_eager", to check tracing on a CPU)."""
    if not compile:
        return fn
    options = dict(fullgraph=True, dynamic=False)
    if isinstance(compile, str):
        options["backend"] = compile
    return torch.compile(fn, **options)
