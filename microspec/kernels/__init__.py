"""Kernels of the sparse LM head, of the policies' per-step work and of the lean layers' projections. Each
file: Triton kernel, launcher, pure-torch `*_ref`, registered op."""
from ._triton import HAS_TRITON
from .delta_gather import delta_gather_, delta_gather_ref, delta_gather_triton
from .row_topk import row_topk, row_topk_ref, row_topk_triton
from .skinny_linear import skinny_linear, skinny_linear_ref, skinny_linear_triton
from .sparse_logits import (packed_logits, packed_logits_ref, packed_logits_triton, sparse_logits,
                            sparse_logits_ref, sparse_logits_triton)
from .validate import check_active_set

__all__ = [
    "HAS_TRITON", "sparse_logits", "sparse_logits_ref", "sparse_logits_triton",
    "packed_logits", "packed_logits_ref", "packed_logits_triton",
    "delta_gather_", "delta_gather_ref", "delta_gather_triton", "row_topk", "row_topk_ref", "row_topk_triton",
    "skinny_linear", "skinny_linear_ref", "skinny_linear_triton", "check_active_set",
]
