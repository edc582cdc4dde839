"""The EAGLE-1 training objective, with the vocabulary-sized part computed in chunks.

For drafter position t (pair (f_t, x_{t+1}), see `microspec.drafting.eagle`) the drafter predicts g_t and

    loss = v_w * SmoothL1(g_t, f_{t+1})  +  p_w * CE(softmax(head(f_{t+1})), log_softmax(head(g_t)))

averaged over loss positions (EAGLE-1: v_w = 1, p_w = 0.1; the regression is averaged over the D features,
EAGLE's `criterion` then `mean(2)`). head is the target's own LM head with its logit transform (soft-capping
where the family has one), frozen.

The CE over a 262k vocabulary would need [N, V] logits, softmaxes and their gradients at once (N ~ 10^4
positions: tens of GB). `distill_ce` is an autograd function that never keeps them: its forward walks row
chunks and keeps only the scalar loss and the top-1 agreement count; its backward walks the chunks again and
recomputes (softmax(head(g)) - softmax(head(f))) @ W, the exact gradient. Peak memory: a few [chunk, V]
float32 tensors (`chunk_rows`).
"""
from __future__ import annotations

import torch
from torch import Tensor
from torch.nn import functional as F


def chunk_rows(vocab_size: int, budget: int = 1 << 28) -> int:
    """Rows per chunk so one [rows, V] float32 tensor holds about `budget` elements (1 GiB by default)."""
    return max(16, budget // vocab_size)


def _logits(x: Tensor, weight: Tensor, softcap: float | None) -> Tensor:
    """[n, D] -> [n, V] in float32 (float64 stays float64), soft-capped when the family does."""
    out = (x.to(weight.dtype) @ weight.T).to(torch.promote_types(weight.dtype, torch.float32))
    return torch.tanh(out / softcap) * softcap if softcap else out


class _DistillCE(torch.autograd.Function):
    @staticmethod
    def forward(ctx, pred: Tensor, target: Tensor, weight: Tensor, softcap: float | None, chunk: int):
        ce = torch.zeros((), dtype=torch.promote_types(weight.dtype, torch.float32), device=pred.device)
        agree = torch.zeros((), dtype=torch.long, device=pred.device)
        for s in range(0, pred.shape[0], chunk):
            t = _logits(target[s:s + chunk], weight, softcap)
            d = _logits(pred[s:s + chunk], weight, softcap)
            ce += -(t.softmax(-1) * d.log_softmax(-1)).sum()
            agree += (d.argmax(-1) == t.argmax(-1)).sum()
        ctx.save_for_backward(pred, target, weight)
        ctx.softcap, ctx.chunk = softcap, chunk
        ctx.mark_non_differentiable(agree)
        return ce, agree

    @staticmethod
    def backward(ctx, grad_ce: Tensor, _grad_agree):
        pred, target, weight = ctx.saved_tensors
        softcap, chunk = ctx.softcap, ctx.chunk
        grad = torch.empty_like(pred)
        for s in range(0, pred.shape[0], chunk):
            d = _logits(pred[s:s + chunk], weight, softcap)
            g = (d.softmax(-1) - _logits(target[s:s + chunk], weight, softcap).softmax(-1)) * grad_ce
            if softcap:                                  # d(cap * tanh(z / cap)) / dz = 1 - (capped / cap)^2
                g = g * (1 - (d / softcap) ** 2)
            grad[s:s + chunk] = (g.to(weight.dtype) @ weight).to(pred.dtype)
        return grad, None, None, None, None


def distill_ce(pred: Tensor, target: Tensor, weight: Tensor, softcap: float | None = None,
               chunk: int | None = None) -> tuple[Tensor, Tensor]:
    """Summed soft cross-entropy of head(pred) against softmax(head(target)), and the top-1 agreement count.

    pred [N, D] (differentiable), target [N, D] (the target's features), weight [V, D] (frozen head).
    Returns (ce_sum float scalar, agree int64 scalar: rows where both argmaxes coincide).
    """
    chunk = chunk or chunk_rows(weight.shape[0])
    return _DistillCE.apply(pred, target.detach(), weight.detach(), softcap, chunk)


@torch.no_grad()
def head_argmax(x: Tensor, weight: Tensor, softcap: float | None = None, chunk: int | None = None) -> Tensor:
    """argmax of head(x) per row, x [N, D] -> int64 [N], in chunks."""
    chunk = chunk or chunk_rows(weight.shape[0])
    parts = [_logits(x[s:s + chunk], weight, softcap).argmax(-1) for s in range(0, x.shape[0], chunk)]
    return torch.cat(parts)


def feature_loss(pred: Tensor, target: Tensor) -> Tensor:
    """EAGLE's regression term summed over rows: SmoothL1 averaged over the features. [N, D] x2 -> scalar."""
    return F.smooth_l1_loss(pred.float(), target.float(), reduction="none").mean(-1).sum()
