"""Lossless verification of a draft chain (the invariants are in `microspec.sampling`'s docstring).

`verify_greedy` accepts the longest prefix equal to the target's argmaxes; `verify_sampling` is speculative
sampling (Leviathan et al.) over K chained drafts with the exact proposal distributions q. Their closed forms
(`microspec.sampling.acceptance_and_residual`) are the reference twin the identity tests compare against.
"""
from __future__ import annotations

import torch
from torch import Tensor

from ..drafting.base import Verdict
from ..sampling import SamplingConfig, exponential_race, process_logits, safe_softmax


def verify_greedy(draft: Tensor, draft_valid: Tensor, target_logits: Tensor) -> Verdict:
    """draft int64 [B, K] (global ids), draft_valid bool [B, K], target_logits [B, K+1, V]."""
    best = torch.argmax(target_logits, dim=-1)                                          # [B, K+1]
    accept = (draft == best[:, :-1]) & draft_valid
    return Verdict(accept.long().cumprod(1).sum(1), best)


def verify_sampling(draft: Tensor, draft_valid: Tensor, q_slots: Tensor, draft_slots: Tensor,
                    active_ids: Tensor, target_logits: Tensor, cfg: SamplingConfig,
                    uniforms: Tensor, exp_noise: Tensor) -> Verdict:
    """Speculative sampling over a chain of K drafts.

    draft        int64 [B, K]      drafted global ids
    draft_valid  bool  [B, K]      False where the drafter had no mass (the row drafted nothing from there)
    q_slots      float [B, K, C]   the proposal distributions over slots, as returned by `draft_sample`
    draft_slots  int64 [B, K]      the slot of each drafted id
    active_ids   int64 [R, C]      slot -> id (R = 1 or B), -1 on padding
    target_logits      [B, K+1, V] raw target logits
    uniforms     float64 [B, K]    U[0, 1) for the acceptance tests
    exp_noise    float64 [B, V]    -log(U) noise for the corrected / bonus token
    """
    B, K = draft.shape
    p = safe_softmax(process_logits(target_logits, cfg))[0]                              # [B, K+1, V]
    p_draft = p[:, :K].gather(-1, draft.unsqueeze(-1)).squeeze(-1)                      # [B, K]
    q_draft = q_slots.gather(-1, draft_slots.unsqueeze(-1)).squeeze(-1)                 # [B, K]
    accept = (uniforms * q_draft.double() < p_draft.double()) & draft_valid
    n_acc = accept.long().cumprod(1).sum(1)                                             # [B]
    # The distribution of the token after the accepted prefix: residual (p - q)+ at a rejection, p itself
    # for the bonus token (q = 0 there) or when the residual has no mass (p == q).
    p_next = p.gather(1, n_acc.view(B, 1, 1).expand(B, 1, p.shape[-1])).squeeze(1)       # [B, V]
    j = n_acc.clamp(max=K - 1).view(B, 1, 1).expand(B, 1, q_slots.shape[-1])
    q_next_slots = q_slots.gather(1, j).squeeze(1) * (n_acc < K).unsqueeze(-1)          # [B, C]
    q_next = torch.zeros_like(p_next).scatter_add_(
        -1, active_ids.clamp(min=0).expand(B, -1), q_next_slots.to(p_next.dtype))
    residual = (p_next - q_next).clamp_min(0.0)
    residual = torch.where(residual.sum(-1, keepdim=True) > 0, residual, p_next)
    next_token = exponential_race(residual, exp_noise)                                  # [B]
    tokens = torch.cat([draft, draft[:, :1]], dim=1).scatter(1, n_acc.unsqueeze(1), next_token.unsqueeze(1))
    return Verdict(n_acc, tokens)
