"""Verifiers: given drafts and the target's logits over the block, decide what is committed, losslessly.

    chain.py  greedy prefix match and speculative sampling over a chain of drafts
"""
from .chain import verify_greedy, verify_sampling

__all__ = ["verify_greedy", "verify_sampling"]
