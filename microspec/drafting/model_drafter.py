"""`ModelDrafter`: a standalone causal LM (a smaller model of the same tokenizer, the target's early-exit
prefix, or the target itself) drafting a chain of K tokens over the policy's active set.

Each step re-reads the row's last two committed tokens [n-2, n-1] first (positions n-2, n-1), so its cache is
right whether or not the previous block's final draft survived: the K/V of position n-2 may belong to a
rejected draft, and rewriting it costs one extra position in the first forward. Then K-1 one-token forwards
extend the chain. Logits come from a `SparseLMHead` over the drafter's own output-head weight, so only the
active rows are scored.
"""
from __future__ import annotations

import torch
from torch import Tensor

from ..sampling import draft_sample
from ..sparse_head import SparseLMHead
from .base import Commit, DraftRequest, Drafts


class ModelDrafter:
    """Chain proposer over a model backend (`microspec.models.hf.CausalLM` or a lean backend).

    Args:
        backend: the drafter's `ModelBackend` (its own instance: a drafter that is the target itself needs a
                 cache of its own).
        num_speculative_tokens: K, drafts per step.
        head: the `SparseLMHead` over the backend's head weight (built by `SpecDecoder` from the policy).
    """

    wants_target_hidden = False
    draws_noise = True

    def __init__(self, backend, num_speculative_tokens: int, head: SparseLMHead):
        self.backend, self.max_K, self.head = backend, num_speculative_tokens, head
        self.K = num_speculative_tokens
        self.nan_seen = torch.zeros((), dtype=torch.bool, device=backend.device)

    @property
    def num_nodes(self) -> int:
        return self.K

    def plan(self, max_nodes: int) -> int:
        self.K = min(self.max_K, max_nodes)
        return self.K

    def allocate(self, batch_size: int, max_len: int) -> None:
        self.backend.allocate(batch_size, max_len)
        self.nan_seen.zero_()

    def prefill(self, tokens: Tensor, positions: Tensor, target_hidden: Tensor | None) -> None:
        self.backend.forward(tokens, positions, eager=True)                      # fills the cache

    def snapshot(self):
        return self.backend.snapshot()

    def restore(self, state) -> None:
        self.backend.restore(state)

    def observe(self, commit: Commit) -> None:
        """Nothing to do: the next `propose` re-reads the committed tokens it needs."""

    def _logits(self, tokens: Tensor, positions: Tensor, n_active: Tensor) -> Tensor:
        """Draft logits over active slots [B, C] after running tokens [B, T] at positions [B, T]."""
        hidden = self.backend.forward(tokens, positions)[:, -1:]
        logits = self.backend.logits(hidden, head=self.head)[:, -1]                    # [B, C]
        self.nan_seen |= torch.isnan(logits).any()
        # Re-mask padding: model-side logit transforms (soft-capping) must not revive it.
        pad = torch.arange(logits.shape[-1], device=logits.device) >= n_active.unsqueeze(-1)
        return logits.masked_fill(pad, float("-inf"))

    def propose(self, request: DraftRequest) -> Drafts:
        """K chained drafts per row: tokens [B, K], q over slots [B, K, C], slots [B, K]."""
        n, cfg, K = request.n, request.cfg, self.K
        ctx = torch.stack([n - 2, n - 1], dim=1).clamp(min=0)                           # [B, 2]
        logits = self._logits(request.tokens.gather(1, ctx), ctx, request.n_active)
        drafts, slots, has_mass, q_rows = [], [], [], []
        for i in range(K):
            noise = request.noise[:, i] if cfg.do_sample else None
            slot, q, ok = draft_sample(logits, cfg, noise)
            token = self.head.token_ids(slot.unsqueeze(1)).squeeze(1).clamp(min=0)
            drafts.append(token), slots.append(slot), has_mass.append(ok), q_rows.append(q)
            if i + 1 < K:
                logits = self._logits(token.unsqueeze(1), (n + i).unsqueeze(1), request.n_active)
        return chain_drafts(torch.stack(drafts, 1), torch.stack(has_mass, 1), torch.stack(q_rows, 1),
                            torch.stack(slots, 1))


def chain_drafts(tokens: Tensor, has_mass: Tensor, q: Tensor | None = None,
                 slots: Tensor | None = None) -> Drafts:
    """`Drafts` of a chain: node i's parent is block index i, its depth i + 1; a dry row (no mass) invalidates
    its node and every later one. tokens int64 [B, K], has_mass bool [B, K]."""
    B, K = tokens.shape
    idx = torch.arange(K, device=tokens.device).expand(B, K)
    valid = has_mass.long().cumprod(1).bool()
    return Drafts(tokens=tokens, parents=idx, depth=idx + 1, valid=valid, q=q, slots=slots)
