"""Verifiers: given drafts and the target's logits over the block, decide what is committed, losslessly.

    chain.py  greedy prefix match and speculative sampling over a chain of drafts
    tree.py   the deepest target-matching path of a tree, and EAGLE's sibling test for sampled trees

`verify` picks the verifier for a block's shape and the sampling mode.
"""
from __future__ import annotations

import torch
from torch import Tensor

from ..drafting.base import Drafts, Verdict
from ..sampling import SamplingConfig, exponential_race, process_logits, safe_softmax
from .chain import verify_greedy, verify_sampling
from .tree import verify_tree_greedy, verify_tree_sampling

__all__ = ["Verdict", "verify", "verify_greedy", "verify_sampling", "verify_tree_greedy",
           "verify_tree_sampling"]


def verify(drafts: Drafts, target_logits: Tensor, active_ids: Tensor, cfg: SamplingConfig,
           uniforms: Tensor | None = None, exp_noise: Tensor | None = None) -> Verdict:
    """The verdict on one block: target_logits [B, N+1, V] over [last committed, node 1..N].

    active_ids [R, C] maps the chain's proposal slots to ids (sampling); uniforms float64 [B, N] and exp_noise
    float64 [B, V] are the step's noise (sampling only). Trees are verified as top-k drafts (deterministic
    proposals: EAGLE's sibling test), chains with their exact proposal distributions q. N = 0 is plain
    decoding: the next token is the target's argmax, or a draw from its processed distribution.
    """
    if drafts.tokens.shape[1] == 0:
        if not cfg.do_sample:
            return verify_greedy(drafts.tokens, drafts.valid, target_logits)
        p = safe_softmax(process_logits(target_logits[:, 0], cfg))[0]
        nxt = exponential_race(p, exp_noise).unsqueeze(1)
        return Verdict(torch.zeros_like(nxt[:, 0]), nxt)
    if not drafts.is_chain:
        if not cfg.do_sample:
            return verify_tree_greedy(drafts, target_logits, max_depth=drafts.max_depth)
        return verify_tree_sampling(drafts, target_logits, cfg, uniforms, exp_noise,
                                    max_depth=drafts.max_depth)
    if not cfg.do_sample:
        return verify_greedy(drafts.tokens, drafts.valid, target_logits)
    return verify_sampling(drafts.tokens, drafts.valid, drafts.q, drafts.slots, active_ids, target_logits,
                           cfg, uniforms, exp_noise)
