"""`SparseLMHead`: a drop-in replacement for a drafter's `lm_head` that scores only the active set.

    hidden [B, T, D]  ->  logits float32 [B, T, C]   (slot order of the policy; -inf on padding slots)

Three modes:
  * "repack" (default, NanoSpec's mode 2): a persistent buffer rows [R, C, D] holds the active rows; before a
    draft block only the rows whose slot changed are copied (`delta_gather_`); with `async_gather` on a side
    CUDA stream whose event the head waits on just before its first GEMV (off in `SpecDecoder`: measured
    slower than the serialized copy of the few rows an update admits).
  * "gather" (NanoSpec's mode 1): a fused gather-GEMV reads rows by index on every call; no buffer.
  * "dense": the full head (used for `FullVocab`); slot s is token s.

Install it with `sparsify_lm_head_(model)`, which swaps the module in place, raises if the model has no
linear output head, and returns a handle whose `.restore()` puts the original back.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor, nn

from .kernels import check_active_set, delta_gather_, packed_logits, sparse_logits

MODES = ("repack", "gather", "dense")


class SparseLMHead(nn.Module):
    """Scores hidden states against the active rows of an LM-head weight.

    Args:
        weight:      the full head weight [V, D] (kept by reference: tied embeddings stay tied, no copy).
        mode:        "repack", "gather" or "dense" (see the module docstring).
        async_gather: on CUDA, run the delta gather on a side stream (repack mode).

    Usage:
        head.bind(active_ids, n_active)   # the policy's buffers [R, C] / [R]; allocates the repack buffer
        head.refresh()                    # after each policy update: copy the rows that changed
        logits = head(hidden)             # [B, T, C]
        ids = head.token_ids(slots)       # slot indices [B, ...] -> token ids
    """

    def __init__(self, weight: Tensor, mode: str = "repack", async_gather: bool = True):
        super().__init__()
        if mode not in MODES:
            raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
        self.weight = weight
        self.mode = mode
        self.async_gather = async_gather
        self.active_ids: Tensor | None = None
        self.n_active: Tensor | None = None
        self.rows: Tensor | None = None        # repack buffer [R, C, D]
        self.resident: Tensor | None = None    # id held by each slot of `rows` [R, C]
        self._stream = self._ready = None
        self._pending = False

    @property
    def in_features(self) -> int:
        return self.weight.shape[1]

    def bind(self, active_ids: Tensor, n_active: Tensor) -> None:
        """Point the head at a policy's active set (buffers read at every call, never copied)."""
        if active_ids.dim() != 2 or n_active.shape != active_ids.shape[:1]:
            raise ValueError(f"active_ids must be [R, C] and n_active [R], got {tuple(active_ids.shape)}, "
                             f"{tuple(n_active.shape)}")
        if active_ids.device != self.weight.device or n_active.device != self.weight.device:
            raise ValueError(f"active set on {active_ids.device}/{n_active.device}, head weight on "
                             f"{self.weight.device}")
        if self.mode == "dense":  # slot s is token s: only the full prefix [0, C) is a valid dense set
            C = active_ids.shape[1]
            if C > self.weight.shape[0]:
                raise ValueError(f"dense head has {self.weight.shape[0]} rows, active set wants {C}")
            if not bool((active_ids == torch.arange(C, device=active_ids.device)).all()):
                raise ValueError("dense mode needs the active set arange(C) in every row (FullVocab)")
        else:  # the one host-side check of the ids: the per-step kernel calls below skip it (no sync)
            check_active_set(active_ids, n_active, self.weight.shape[0])
        self.active_ids, self.n_active = active_ids, n_active
        if self.mode == "repack":
            shape = (*active_ids.shape, self.weight.shape[1])
            if self.rows is None or self.rows.shape != shape or self.rows.device != self.weight.device:
                self.rows = torch.zeros(shape, dtype=self.weight.dtype, device=self.weight.device)
                self.resident = torch.full_like(active_ids, -1)
            else:
                self.resident.fill_(-1)  # a new request: treat every slot as stale
            if self.weight.is_cuda and self.async_gather and self._stream is None:
                self._stream, self._ready = torch.cuda.Stream(self.weight.device), torch.cuda.Event()
        self._pending = False

    def refresh(self) -> None:
        """Bring the repack buffer up to date with the active set (delta only). No-op in other modes."""
        if self.mode != "repack":
            return
        if self._stream is None:
            delta_gather_(self.weight, self.active_ids, self.resident, self.rows, validate=False)
            return
        self._stream.wait_stream(torch.cuda.current_stream(self.weight.device))   # the policy update
        with torch.cuda.stream(self._stream):
            delta_gather_(self.weight, self.active_ids, self.resident, self.rows, validate=False)
            self._ready.record()
        self._pending = True

    def forward(self, hidden: Tensor) -> Tensor:
        if self.active_ids is None:
            raise RuntimeError("SparseLMHead.bind(active_ids, n_active) must be called before use")
        squeeze = hidden.dim() == 2
        h = hidden.unsqueeze(1) if squeeze else hidden                          # [B, T, D]
        if self.mode == "dense":
            C = self.active_ids.shape[1]
            logits = torch.matmul(h, self.weight[:C].T).to(torch.promote_types(h.dtype, torch.float32))
        elif self.mode == "gather":
            logits = sparse_logits(h, self.weight, self.active_ids, self.n_active, validate=False)
        else:
            if self._pending:  # join the side stream only now, after the drafter's layers were queued
                self._join_gather(h.device)
            logits = packed_logits(h, self.rows, self.n_active, validate=False)
        return logits.squeeze(1) if squeeze else logits

    @torch.compiler.disable
    def _join_gather(self, device: torch.device) -> None:
        """Make the current stream wait for the side-stream gather. Kept out of compiled graphs, which do not
        preserve cross-stream event waits (a captured step would then leave the side stream unjoined)."""
        torch.cuda.current_stream(device).wait_event(self._ready)
        self._pending = False

    def token_ids(self, slots: Tensor) -> Tensor:
        """Map slot indices [B, ...] (or [1, ...] for a shared set) to token ids."""
        ids = self.active_ids.expand(slots.shape[0], -1) if self.active_ids.shape[0] == 1 else self.active_ids
        return ids.gather(1, slots.flatten(1)).view_as(slots)

    def extra_repr(self) -> str:
        cap = None if self.active_ids is None else self.active_ids.shape[1]
        return (f"vocab={self.weight.shape[0]}, hidden={self.weight.shape[1]}, capacity={cap}, "
                f"mode={self.mode}")


@dataclass
class HeadSwap:
    """Handle returned by `sparsify_lm_head_`; `restore()` puts the original head back."""

    model: nn.Module
    original: nn.Module
    head: SparseLMHead

    def restore(self) -> None:
        if self.model.get_output_embeddings() is not self.head:
            raise RuntimeError("the model's output head was replaced by someone else; not restoring")
        self.model.set_output_embeddings(self.original)


def sparse_head_for(head: nn.Module, mode: str = "repack", async_gather: bool = True) -> SparseLMHead:
    """A `SparseLMHead` over the weight of an output head `head` (shared by reference, never copied).

    Raises TypeError unless `head` is an `nn.Linear` without bias (a pruned head would silently drop or
    misalign a bias).
    """
    if isinstance(head, SparseLMHead):
        raise TypeError("the model's output head is already a SparseLMHead")
    if not isinstance(head, nn.Linear):
        raise TypeError(f"no nn.Linear output head to sparsify (found {type(head).__name__})")
    if head.bias is not None:
        raise TypeError("output heads with a bias are not supported")
    return SparseLMHead(head.weight, mode=mode, async_gather=async_gather)


def sparsify_lm_head_(model: nn.Module, mode: str = "repack", async_gather: bool = True) -> HeadSwap:
    """Replace `model`'s output head (a Hugging Face causal LM's `lm_head`) by a `SparseLMHead`, in place.

    Raises TypeError if the model exposes no `nn.Linear` output head, or one with a bias.
    """
    get = getattr(model, "get_output_embeddings", None)
    sparse = sparse_head_for(get() if callable(get) else None, mode=mode, async_gather=async_gather)
    original = model.get_output_embeddings()
    model.set_output_embeddings(sparse)
    return HeadSwap(model, original, sparse)
