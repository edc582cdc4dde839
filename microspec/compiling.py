"""One rule for compiling the decode step's pieces: `compiled(fn, compile)`.

Inside a CUDA graph a decode step costs about a few microseconds per kernel whatever the kernel does, so
the pieces made of many small ops (model layers, tree bookkeeping, policy updates) are compiled with static
shapes and no graph breaks; Inductor fuses their elementwise work into a few kernels.
"""
from __future__ import annotations

from collections.abc import Callable

import torch


def compiled(fn: Callable, compile: bool | str, dynamic: bool = False) -> Callable:
    """`fn` itself when `compile` is falsy, else `torch.compile(fn, fullgraph=True, dynamic=dynamic)`; a
    string names the backend instead of Inductor (e.g. "aot_eager", to check tracing on a CPU). Static shapes
    by default (the decode step's pieces); `dynamic` for training code whose sizes vary per batch."""
    if not compile:
        return fn
    _allow_recompiles()
    options = dict(fullgraph=True, dynamic=dynamic)
    if isinstance(compile, str):
        options["backend"] = compile
    return torch.compile(fn, **options)


def _allow_recompiles(limit: int = 1024) -> None:
    """Raise Dynamo's recompile limit (8 by default) to `limit`. It counts per code object, and the compiled
    functions here are shared by every caller: the lean layers by every target, drafter, decode shape and
    batch size (a benchmark of five methods at batch 1 and 8 passed 64 and, with fullgraph=True, stopped);
    the distillation loss's chunk functions by every dtype and soft-cap."""
    config = torch._dynamo.config
    name = "recompile_limit" if hasattr(config, "recompile_limit") else "cache_size_limit"
    setattr(config, name, max(getattr(config, name), limit))
