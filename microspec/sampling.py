"""Draft sampling and lossless verification, with no host synchronisation.

Invariants (TESTING.md §1):
  * Greedy: the draft token is the argmax of the drafter's logits restricted to the active set S; a token is
    accepted iff it equals the target's argmax; the committed tokens are exactly the target's argmaxes, so a
    greedy `SpecDecoder` emits the target's own greedy output.
  * Sampling: q = softmax(processed draft logits over S), exactly 0 outside S and on padding slots, and it is
    returned by the same function that samples the draft token (`draft_sample`). The target p is the
    processed distribution over the target's full vocabulary. Draft x is accepted iff u·q(x) < p(x) with
    u ~ U[0, 1) in float64 (strict, so p(x) = 0 is never accepted); at the first rejection the token is drawn
    from (p − q)+ / Σ(p − q)+, or from p when that sum is 0; when all K drafts pass, a bonus token is drawn
    from p at position K+1.
  * Temperature, top-k and top-p are applied the same way to p and to q (Hugging Face order and semantics:
    temperature, then top-k keeping ties at the k-th value, then top-p keeping at least one token), except
    that top_k = 1 keeps only the first maximal token, so it always picks the temperature-0 token.

Randomness is an input (RNG tensors drawn by the caller), so a captured graph replays with fresh noise and a
test can feed the same noise to an implementation and its reference. Categorical draws use the exponential
race: argmax(w / E) with E = -log(U), U ~ U[0, 1) in float64, which samples index i with probability w_i / Σw
(float64 so that the discreteness of U never makes a token with a tiny but positive weight unreachable).
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor

from .inputs import check_bool, check_real, is_int


@dataclass(frozen=True)
class SamplingConfig:
    """How tokens are chosen; the same processing is applied to the drafter and the target."""

    do_sample: bool = False
    temperature: float = 1.0
    top_k: int | None = None
    top_p: float | None = None

    def __post_init__(self):
        # Types are checked always (refuse, never coerce: do_sample=1, top_k=2.0, temperature="1"); ranges
        # only when sampling, since greedy decoding ignores them (as transformers does).
        check_bool("do_sample", self.do_sample)
        check_real("temperature", self.temperature, finite=False)
        if self.top_k is not None and not is_int(self.top_k):
            raise TypeError(f"top_k must be an int >= 1 or None, got {type(self.top_k).__name__} "
                            f"{self.top_k!r}")
        if self.top_p is not None:
            check_real("top_p", self.top_p)
        if not self.do_sample:
            return
        if not (math.isfinite(self.temperature) and self.temperature > 0):
            raise ValueError(f"temperature must be finite and > 0 when sampling, got {self.temperature!r}")
        if self.top_k is not None and self.top_k < 1:
            raise ValueError(f"top_k must be an int >= 1 or None, got {self.top_k!r}")
        if self.top_p is not None and not (0.0 < self.top_p <= 1.0):
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p!r}")


def process_logits(logits: Tensor, cfg: SamplingConfig) -> Tensor:
    """Temperature, top-k, top-p over the last dim; returns float32 (float64 stays float64). [..., N]."""
    out = logits.to(torch.promote_types(logits.dtype, torch.float32))
    if not cfg.do_sample:
        return out
    if cfg.temperature != 1.0:
        out = out / cfg.temperature
    if cfg.top_k == 1:  # the greedy token exactly, first index on ties (HF would keep every tied maximum)
        keep = torch.zeros_like(out, dtype=torch.bool).scatter_(-1, out.argmax(-1, keepdim=True), True)
        out = out.masked_fill(~keep, float("-inf"))
    elif cfg.top_k is not None and cfg.top_k < out.shape[-1]:
        kth = torch.topk(out, cfg.top_k, dim=-1).values[..., -1:]
        out = out.masked_fill(out < kth, float("-inf"))
    if cfg.top_p is not None and cfg.top_p < 1.0:
        sorted_logits, order = torch.sort(out, dim=-1)                     # ascending
        cum = sorted_logits.softmax(-1).cumsum(-1)
        drop_sorted = cum <= 1.0 - cfg.top_p
        drop_sorted[..., -1] = False                                       # always keep the top token
        out = out.masked_fill(drop_sorted.scatter(-1, order, drop_sorted), float("-inf"))
    return out


def invalid_rows(logits: Tensor, cfg: SamplingConfig) -> Tensor:
    """bool [...]: rows of logits [..., V] that cannot be sampled from the way transformers would.

    NaN anywhere is invalid in every mode. When sampling, so are +inf anywhere and a row with no finite
    logit after the temperature (all -inf, or finite logits that the temperature sends to +-inf): there
    softmax gives NaN and `torch.multinomial`, hence Hugging Face's `generate`, raises. Greedy decoding takes
    the argmax of such rows, as transformers does. No host sync: callers accumulate the flag on the device
    (`flag |= invalid_rows(...).any()`) and raise after the loop, as for NaN. Not for the drafter's
    restricted logits, where an all -inf row is a legitimate "no mass in the active set" (`safe_softmax`).
    """
    bad = torch.isnan(logits).any(-1)
    if not cfg.do_sample:
        return bad
    x = logits.to(torch.promote_types(logits.dtype, torch.float32))
    if cfg.temperature != 1.0:
        x = x / cfg.temperature
    return bad | torch.isposinf(x).any(-1) | ~(x.amax(-1) > float("-inf"))


def safe_softmax(logits: Tensor) -> tuple[Tensor, Tensor]:
    """softmax over the last dim, with rows that are entirely -inf mapped to all-zero probabilities.

    Returns (probs, has_mass) where has_mass [...] is False for those rows. NaN logits stay NaN (the caller
    flags them); they never turn into a valid-looking distribution.
    """
    shift, denom, has_mass = softmax_stats(logits)
    return softmax_apply(logits, shift, denom), has_mass


def softmax_stats(logits: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """`safe_softmax`'s per-row statistics of logits [..., V]: shift [..., 1], denom [..., 1], has_mass [...].
    With them `softmax_apply` gives any entries of a row the values `safe_softmax` gives the whole row: the
    sampled tree verifier needs the rows' sums and a few entries, never the whole distribution."""
    top = logits.amax(-1, keepdim=True)
    has_mass = top.squeeze(-1) > float("-inf")
    shift = torch.where(has_mass.unsqueeze(-1), top, 0.0)
    denom = (logits - shift).exp().sum(-1, keepdim=True).clamp_min(torch.finfo(logits.dtype).tiny)
    return shift, denom, has_mass


def softmax_apply(logits: Tensor, shift: Tensor, denom: Tensor) -> Tensor:
    """exp(logits - shift) / denom, elementwise (shapes broadcast): entries of `safe_softmax`'s output."""
    return (logits - shift).exp() / denom


def exponential_race(weights: Tensor, exp_noise: Tensor) -> Tensor:
    """Index drawn with probability proportional to `weights` (>= 0, unnormalised) along the last dim.

    exp_noise has the same shape, drawn as -log(U), U ~ U[0, 1) (float64): values in (0, inf], so a zero
    weight scores 0 and can win only when the whole row is zero (callers mask such rows).
    """
    return torch.argmax(weights.to(exp_noise.dtype) / exp_noise, dim=-1)


def draft_sample(logits: Tensor, cfg: SamplingConfig, exp_noise: Tensor | None = None):
    """Choose one draft slot per row from restricted logits [B, C] (padding slots are -inf).

    Returns (slot int64 [B], q float [B, C], has_mass bool [B]). q is the exact proposal distribution the
    slot was drawn from (one-hot of the argmax when greedy); rows with no finite logit have has_mass False
    and must not be drafted from.
    """
    if not cfg.do_sample:
        slot = torch.argmax(logits, dim=-1)
        has_mass = logits.amax(-1) > float("-inf")
        q = torch.zeros(logits.shape, dtype=torch.promote_types(logits.dtype, torch.float32),
                        device=logits.device).scatter_(-1, slot.unsqueeze(-1), 1.0)
        return slot, q, has_mass
    q, has_mass = safe_softmax(process_logits(logits, cfg))
    return exponential_race(q, exp_noise), q, has_mass


def acceptance_and_residual(p: Tensor, q: Tensor) -> tuple[Tensor, Tensor]:
    """The closed forms behind `verify_sampling`, for the identity test (TESTING.md R1).

    p, q [..., V] probabilities. Returns a = min(1, p/q) (1 where q = 0) and r = (p - q)+ / Σ(p - q)+ (p where
    that sum is 0), so that q·a + (1 - β)·r == p with β = Σ min(p, q).
    """
    a = torch.where(q > 0, (p / torch.where(q > 0, q, 1.0)).clamp(max=1.0), 1.0)
    r = (p - q).clamp_min(0.0)
    s = r.sum(-1, keepdim=True)
    return a, torch.where(s > 0, r / torch.where(s > 0, s, 1.0), p)
