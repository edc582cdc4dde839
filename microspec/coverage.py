"""Coverage simulator: replay real prompt/response token ids through a `VocabPolicy`, no model needed.

Why: the drafter can only propose ids in the policy's active set, so the share of the target's output that
lies in the set (coverage) caps the acceptance a sparse head can reach. Measuring it on real responses tells
which policy and capacity are worth running before any GPU time is spent.

The simulator drives the real policy object through its public hooks in the order `SpecDecoder` does:

    policy.setup(B, vocab_size, eos_ids, "cpu")
    policy.on_prefill(prompt_ids [B, L] left-padded, prompt_mask [B, L], None)
    response token 0 (the target's prefill token):   check, then on_commit(ids [B, 1], mask [B, 1])
    then blocks of `block` (= K + 1) tokens:          ids, n = policy.active(); check; on_commit([B, block])

"check" counts a response token as covered when it is among the valid ids of its row's set as it stood
before the token's block was committed. Every block is committed in full, as if every draft were accepted:
that refreshes the set least often (real decoding commits 1..K+1 tokens per step), so for context-driven
policies the estimate errs low; `block=1` gives the most frequent refresh. Rows are padded and masked; a
finished row just has mask False, as in the decoder.

It is a text-only, oracle-free estimate: there is no target model, so `target_topk` is None in every hook
and policies such as `InContextPolicy(topk=3)` lose the target's top-k predictions (they only see tokens).
Unlike `SpecStats.coverage`, which skips token 0 because the drafter never proposes it, all response tokens
count here (one token per document; the README frequency baselines count them too).

    >>> from microspec.policies import InContextPolicy
    >>> res = simulate(InContextPolicy(capacity=8, topk=0), [([5, 7], [7, 5, 9, 7])], vocab_size=16)
    >>> res.coverage, res.total_tokens       # 9 is new when first seen; it is resident afterwards
    (0.75, 4)
"""
from __future__ import annotations

import time
from dataclasses import dataclass

import torch
from torch import Tensor

from .policies.base import VocabPolicy


@dataclass
class CoverageResult:
    """Outcome of one `simulate` run.

    covered  int64 [D]  covered response tokens per document (input order)
    tokens   int64 [D]  response tokens per document
    active   int64 [S]  the row's active-set size n before each (document, block) that held response tokens
    seconds  wall time of the simulation (tokenization excluded)
    """
    covered: Tensor
    tokens: Tensor
    active: Tensor
    seconds: float = 0.0

    @property
    def docs(self) -> int:
        return self.tokens.numel()

    @property
    def total_tokens(self) -> int:
        return int(self.tokens.sum())

    @property
    def coverage(self) -> float:
        return int(self.covered.sum()) / max(self.total_tokens, 1)

    def active_stats(self) -> dict[str, float]:
        """mean, p50, p90 and max of the active-set size over (document, block) observations."""
        if self.active.numel() == 0:
            return {"mean": 0.0, "p50": 0.0, "p90": 0.0, "max": 0.0}
        a = self.active.double()
        q = torch.quantile(a, torch.tensor([0.5, 0.9], dtype=torch.double))
        return {"mean": float(a.mean()), "p50": float(q[0]), "p90": float(q[1]), "max": float(a.max())}

    def summary(self) -> dict:
        s = self.active_stats()
        return {"docs": self.docs, "tokens": self.total_tokens, "covered": int(self.covered.sum()),
                "coverage": self.coverage, "active_mean": s["mean"], "active_p50": s["p50"],
                "active_p90": s["p90"], "active_max": s["max"], "seconds": self.seconds}

    @staticmethod
    def merge(results: list["CoverageResult"]) -> "CoverageResult":
        """Concatenate several results (e.g. per-dataset runs) into one."""
        return CoverageResult(torch.cat([r.covered for r in results]), torch.cat([r.tokens for r in results]),
                              torch.cat([r.active for r in results]), sum(r.seconds for r in results))


def _pad(seqs: list[Tensor], left: bool) -> tuple[Tensor, Tensor]:
    """Pad int64 sequences to [B, max(L, 1)] with 0 and a bool mask of the real tokens."""
    B, L = len(seqs), max(1, max(s.numel() for s in seqs))
    ids = torch.zeros(B, L, dtype=torch.long)
    mask = torch.zeros(B, L, dtype=torch.bool)
    for r, s in enumerate(seqs):
        cols = slice(L - s.numel(), L) if left else slice(0, s.numel())
        ids[r, cols], mask[r, cols] = s, True
    return ids, mask


def _check_ids(docs, vocab_size: int) -> None:
    for i, (p, r) in enumerate(docs):
        for name, t in (("prompt", p), ("response", r)):
            bad = t[(t < 0) | (t >= vocab_size)]
            if bad.numel():
                raise ValueError(f"document {i}: {name} token id {int(bad[0])} outside [0, {vocab_size})")


class _Membership:
    """Row-wise "is id in the valid active set" lookups without rebuilding a [R, V] bitmap each block.

    `stamp[r, id] == step` iff id was among row r's valid slots when `mark(step)` ran: each block writes its
    fresh step number into the ids' columns (O(R * C)) and stale marks simply hold older step numbers.
    Column V is a sink for padding slots.
    """

    def __init__(self, rows: int, vocab_size: int):
        self.stamp = torch.zeros(rows, vocab_size + 1, dtype=torch.int32)
        self.step = 0
        self.V = vocab_size

    def mark(self, ids: Tensor, n: Tensor) -> None:
        self.step += 1
        ids = ids[:, : int(n.max())]                      # valid slots are a prefix: skip the padding tail
        valid = (torch.arange(ids.shape[1]) < n.unsqueeze(1)) & (ids >= 0)             # [R, w]
        self.stamp.scatter_(1, torch.where(valid, ids, self.V), self.step)

    def contains(self, tok: Tensor) -> Tensor:
        """tok int64 [B, M] -> bool [B, M]; a shared set (R == 1) serves every row."""
        B, M = tok.shape
        look = tok.reshape(1, -1) if self.stamp.shape[0] == 1 else tok
        return (self.stamp.gather(1, look) == self.step).view(B, M)


def simulate(policy: VocabPolicy, pairs_token_ids, vocab_size: int, eos_ids=(), block: int = 6,
             batch_size: int = 64, progress=None, num_threads: int | None = 1) -> CoverageResult:
    """Replay (prompt_ids, response_ids) documents through `policy` and measure coverage of the responses.

    Args:
        policy:          any `VocabPolicy`; it is `setup` afresh for every batch of documents.
        pairs_token_ids: sequence of (prompt ids, response ids), each a list or 1-D int tensor.
        vocab_size:      the tokenizer's vocabulary (ids must lie in [0, vocab_size)).
        eos_ids:         special ids the policy must always hold (passed to `setup`).
        block:           tokens committed per verification step, K + 1 (default 6: K = 5 drafts).
        batch_size:      documents simulated together (vectorised; results do not depend on it).
        progress:        optional object with `update(n_tokens)` (e.g. a tqdm bar).
        num_threads:     torch threads while simulating (restored afterwards; None: leave as is). The
                         per-block ops are small, so one thread is as fast and much steadier on a busy host.
    Returns:
        CoverageResult with per-document counts in input order. Documents are batched by length internally.

    Example (a static set of ids {1, 2} plus EOS 0, response [1, 3, 2, 0] -> 3 of 4 covered):
        >>> from microspec.policies import StaticFrequencyPolicy
        >>> policy = StaticFrequencyPolicy([1, 2], capacity=3)
        >>> simulate(policy, [([], [1, 3, 2, 0])], vocab_size=4, eos_ids=[0]).coverage
        0.75
    """
    if block < 1 or batch_size < 1:
        raise ValueError(f"block and batch_size must be >= 1, got {block} and {batch_size}")
    docs = [(torch.as_tensor(p, dtype=torch.long).flatten(), torch.as_tensor(r, dtype=torch.long).flatten())
            for p, r in pairs_token_ids]
    _check_ids(docs, vocab_size)
    D = len(docs)
    covered, tokens = torch.zeros(D, dtype=torch.long), torch.zeros(D, dtype=torch.long)
    active: list[Tensor] = []
    order = sorted(range(D), key=lambda i: (docs[i][1].numel(), docs[i][0].numel()))   # less padding
    member = None
    threads = torch.get_num_threads()
    t0 = time.perf_counter()
    try:
        if num_threads:
            torch.set_num_threads(num_threads)
        for start in range(0, D, batch_size):
            rows = order[start: start + batch_size]
            policy.setup(len(rows), vocab_size, list(eos_ids), "cpu")
            R = policy.active_ids.shape[0]
            if member is None or member.stamp.shape[0] != R:
                member = _Membership(R, vocab_size)
            cov, tok, act = _run_batch(policy, member, [docs[i] for i in rows], block, progress)
            covered[rows], tokens[rows] = cov, tok
            active += act
    finally:
        torch.set_num_threads(threads)
    active_t = torch.cat(active) if active else torch.zeros(0, dtype=torch.long)
    return CoverageResult(covered, tokens, active_t, time.perf_counter() - t0)


@torch.no_grad()  # not inference_mode: the policy's buffers must stay usable after the simulation
def _run_batch(policy, member: _Membership, docs, block: int, progress):
    """Prefill + commit loop for one batch of documents -> (covered [B], tokens [B], [active sizes])."""
    B = len(docs)
    prompt, prompt_mask = _pad([p for p, _ in docs], left=True)                         # [B, L]
    policy.on_prefill(prompt, prompt_mask, None)
    resp, resp_mask = _pad([r for _, r in docs], left=False)                            # [B, T]
    T = resp.shape[1]
    bounds = [(0, 1)] + [(j, j + block) for j in range(1, T, block)]   # token 0 alone, as SpecDecoder
    pad = bounds[-1][1] - T                                             # every block has static width
    resp = torch.nn.functional.pad(resp, (0, pad))
    resp_mask = torch.nn.functional.pad(resp_mask, (0, pad))
    covered, active = torch.zeros(B, dtype=torch.long), []
    for a, b in bounds:
        tok, mask = resp[:, a:b], resp_mask[:, a:b]                                     # [B, b - a]
        if not mask.any():
            break
        ids, n = policy.active()                                                        # [R, C], [R]
        member.mark(ids, n)
        covered += (member.contains(tok) & mask).sum(1)
        active.append(n.expand(B)[mask.any(1)].clone())
        policy.on_commit(tok, mask, None)
        if progress is not None:
            progress.update(int(mask.sum()))
    return covered, resp_mask.sum(1), active
