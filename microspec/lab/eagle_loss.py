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
float32 tensors (`chunk_rows`). Eagerly each chunk is about ten float32 passes over such tensors (1 GiB each
for Gemma-3's 262k vocabulary), by estimate most of a training step (not yet profiled); `compile=`
(`train-drafter --compile-loss`) fuses them into a few reductions over the raw logits.
"""
from __future__ import annotations

import torch
from torch import Tensor
from torch.nn import functional as F

from ..compiling import compiled


def chunk_rows(vocab_size: int, budget: int = 1 << 28) -> int:
    """Rows per chunk so one [rows, V] float32 tensor holds about `budget` elements (1 GiB by default)."""
    return max(16, budget // vocab_size)


def _raw(x: Tensor, weight: Tensor) -> Tensor:
    """[n, D] -> the head's raw outputs [n, V], in the weight's dtype."""
    return x.to(weight.dtype) @ weight.T


def _logits(x: Tensor, weight: Tensor, softcap: float | None) -> Tensor:
    """[n, D] -> [n, V] in float32 (float64 stays float64), soft-capped when the family does."""
    return _wide(_raw(x, weight), softcap)


def _cap(z: Tensor, softcap: float | None) -> Tensor:
    return torch.tanh(z / softcap) * softcap if softcap else z


def _wide(raw: Tensor, softcap: float | None) -> Tensor:
    """Raw head outputs (the weight's dtype) -> float32 or wider, soft-capped."""
    return _cap(raw.to(torch.promote_types(raw.dtype, torch.float32)), softcap)


def _ce_sum(t_raw: Tensor, d_raw: Tensor, softcap: float | None) -> tuple[Tensor, Tensor]:
    """Summed soft cross-entropy and argmax agreements of one chunk of raw logits [n, V] (target t, drafter
    d). Per row CE = lse(d) - sum(softmax(t) * d) (softmax(t) sums to 1), so no [n, V] probability tensor
    has to be kept: eagerly a few passes over the chunk, compiled a few fused reductions over the raw
    (bf16) logits."""
    t, d = _wide(t_raw, softcap), _wide(d_raw, softcap)
    p_t = (t - t.logsumexp(-1, keepdim=True)).exp()
    ce = (d.logsumexp(-1) - (p_t * d).sum(-1)).sum()
    return ce, (d.argmax(-1) == t.argmax(-1)).sum()


def _ce_grad(t_raw: Tensor, d_raw: Tensor, softcap: float | None, grad_ce: Tensor) -> Tensor:
    """d CE / d (raw drafter logits) of one chunk, in the raw logits' dtype: (softmax(d) - softmax(t)) x the
    soft-cap's derivative 1 - (capped / cap)^2."""
    t, d = _wide(t_raw, softcap), _wide(d_raw, softcap)
    g = (d.softmax(-1) - t.softmax(-1)) * grad_ce
    if softcap:
        g = g * (1 - (d / softcap) ** 2)
    return g.to(d_raw.dtype)


_COMPILED: dict = {}


def _chunk_fns(compile: bool | str):
    """(_ce_sum, _ce_grad), compiled once per backend when `compile` is set (dynamic row count: the last
    chunk of every batch has its own size)."""
    if not compile:
        return _ce_sum, _ce_grad
    if compile not in _COMPILED:
        _COMPILED[compile] = tuple(compiled(f, compile, dynamic=True) for f in (_ce_sum, _ce_grad))
    return _COMPILED[compile]


class _DistillCE(torch.autograd.Function):
    @staticmethod
    def forward(ctx, pred: Tensor, target: Tensor, weight: Tensor, softcap: float | None, chunk: int,
                compile: bool | str):
        ce_sum, _ = _chunk_fns(compile)
        ce = torch.zeros((), dtype=torch.promote_types(weight.dtype, torch.float32), device=pred.device)
        agree = torch.zeros((), dtype=torch.long, device=pred.device)
        for s in range(0, pred.shape[0], chunk):
            c, a = ce_sum(_raw(target[s:s + chunk], weight), _raw(pred[s:s + chunk], weight), softcap)
            ce += c
            agree += a
        ctx.save_for_backward(pred, target, weight)
        ctx.softcap, ctx.chunk, ctx.compile = softcap, chunk, compile
        ctx.mark_non_differentiable(agree)
        return ce, agree

    @staticmethod
    def backward(ctx, grad_ce: Tensor, _grad_agree):
        pred, target, weight = ctx.saved_tensors
        _, ce_grad = _chunk_fns(ctx.compile)
        grad = torch.empty_like(pred)
        chunk, softcap = ctx.chunk, ctx.softcap
        for s in range(0, pred.shape[0], chunk):
            g = ce_grad(_raw(target[s:s + chunk], weight), _raw(pred[s:s + chunk], weight), softcap, grad_ce)
            grad[s:s + chunk] = (g @ weight).to(pred.dtype)
        return grad, None, None, None, None, None


def distill_ce(pred: Tensor, target: Tensor, weight: Tensor, softcap: float | None = None,
               chunk: int | None = None, compile: bool | str = False) -> tuple[Tensor, Tensor]:
    """Summed soft cross-entropy of head(pred) against softmax(head(target)), and the top-1 agreement count.

    pred [N, D] (differentiable), target [N, D] (the target's features), weight [V, D] (frozen head).
    Returns (ce_sum float scalar, agree int64 scalar: rows where both argmaxes coincide). `compile` (True:
    Inductor, or a backend name) fuses each chunk's softmax arithmetic into a few reductions over the raw
    logits instead of eager float32 passes over [chunk, V] tensors.
    """
    chunk = chunk or chunk_rows(weight.shape[0])
    return _DistillCE.apply(pred, target.detach(), weight.detach(), softcap, chunk, compile)


@torch.no_grad()
def head_argmax(x: Tensor, weight: Tensor, softcap: float | None = None, chunk: int | None = None) -> Tensor:
    """argmax of head(x) per row, x [N, D] -> int64 [N], in chunks."""
    chunk = chunk or chunk_rows(weight.shape[0])
    parts = [_logits(x[s:s + chunk], weight, softcap).argmax(-1) for s in range(0, x.shape[0], chunk)]
    return torch.cat(parts)


def feature_loss(pred: Tensor, target: Tensor) -> Tensor:
    """EAGLE's regression term summed over rows: SmoothL1 averaged over the features. [N, D] x2 -> scalar."""
    return F.smooth_l1_loss(pred.float(), target.float(), reduction="none").mean(-1).sum()
