"""Coverage simulator: replay real prompt/response token ids through a `VocabPolicy`, with or without a model.

Why: the drafter can only propose ids in the policy's active set, so the share of the target's output that
lies in the set (coverage) caps the acceptance a sparse head can reach. Measuring it on real responses tells
which policy and capacity are worth running before any GPU time is spent.

The simulator drives the real policy object through its public hooks in the order `SpecDecoder` does, with
the decoder's tensor layout (each row's prompt compacted to the left, padding on the right):

    policy.setup(B, vocab_size, eos_ids, "cpu")
    policy.on_prefill(prompt_ids [B, L], prompt_mask [B, L], topk [B, L, k] | None, hidden=[B, D] | None)
    response token 0 (the target's prefill token):   check, then on_commit(ids [B, 1], mask, None, hidden)
    then blocks of `block` (= K + 1) tokens:  ids, n = policy.active(); check; on_commit([B, block], ...)

"check" counts a response token as covered when it is among the valid ids of its row's set as it stood
before the token's block was committed. Every block is committed in full, as if every draft were accepted:
that refreshes the set least often (real decoding commits 1..K+1 tokens per step), so for context-driven
policies the estimate errs low; `block=1` gives the most frequent refresh. A finished row has mask False.

Two modes:
  * text-only (`traces=None`): no target model, so `target_topk` and `hidden` are None in every hook and
    policies such as `InContextPolicy(topk=3)` lose the target's top-k predictions (they see tokens only);
  * model-based (`traces`, built by `microspec.lab.model_coverage`): a `TargetTrace` per document holds the
    target's top-k ids and final hidden states along the teacher-forced (prompt + response) sequence, and
    the hooks get exactly what the decoder would hand them had the target produced that response: top-k at
    every prompt position and at the committed positions of each block; the hidden state at the last prompt
    position (prefill, token 0) and at the newest committed-input position (index n_commit - 1 of the
    verified block; a finished row gets its last token's).

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

from .model_coverage import HookFeed, TargetTrace, check_traces, pad_rows
from ..policies.base import VocabPolicy

__all__ = ["CoverageResult", "TargetTrace", "batch_order", "compare_at_same_size", "plot_coverage",
           "simulate"]


def _quantiles(x: Tensor, qs=(0.1, 0.5, 0.9)) -> list[float]:
    if x.numel() == 0:
        return [0.0] * len(qs)
    return torch.quantile(x.double(), torch.tensor(qs, dtype=torch.double)).tolist()


@dataclass
class CoverageResult:
    """Outcome of one `simulate` run.

    covered  int64 [D]  covered response tokens per document (input order)
    tokens   int64 [D]  response tokens per document
    active   int64 [S]  the row's active-set size n before each (document, block) that held response tokens
    delta    int64 [S'] slots whose id changed since the row's previous block (rows a repack head gathers per
                        step), one per (document, block) after the first
    seconds  wall time of the simulation (tokenization and model forwards excluded)
    """
    covered: Tensor
    tokens: Tensor
    active: Tensor
    delta: Tensor | None = None
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
        _, p50, p90 = _quantiles(a)
        return {"mean": float(a.mean()), "p50": p50, "p90": p90, "max": float(a.max())}

    def doc_coverage(self) -> Tensor:
        """float64 [D'] coverage of each document that has response tokens."""
        keep = self.tokens > 0
        return self.covered[keep].double() / self.tokens[keep].double()

    def summary(self) -> dict:
        """Pooled coverage and its spread over documents, active size and its spread, delta rows per step."""
        s = self.active_stats()
        per_doc = self.doc_coverage()
        d10, d50, d90 = _quantiles(per_doc)
        a10, _, _ = _quantiles(self.active)
        delta = self.delta if self.delta is not None else torch.zeros(0, dtype=torch.long)
        return {"docs": self.docs, "tokens": self.total_tokens, "covered": int(self.covered.sum()),
                "coverage": self.coverage,
                "doc_coverage_mean": float(per_doc.mean()) if per_doc.numel() else 0.0,
                "doc_coverage_std": float(per_doc.std()) if per_doc.numel() > 1 else 0.0,
                "doc_coverage_p10": d10, "doc_coverage_p50": d50, "doc_coverage_p90": d90,
                "active_mean": s["mean"],
                "active_std": float(self.active.double().std()) if self.active.numel() > 1 else 0.0,
                "active_p10": a10, "active_p50": s["p50"], "active_p90": s["p90"], "active_max": s["max"],
                "delta_mean": float(delta.double().mean()) if delta.numel() else 0.0,
                "seconds": self.seconds}

    @staticmethod
    def merge(results: list["CoverageResult"]) -> "CoverageResult":
        """Concatenate several results (e.g. per-dataset runs) into one."""
        deltas = [r.delta for r in results if r.delta is not None]
        return CoverageResult(torch.cat([r.covered for r in results]), torch.cat([r.tokens for r in results]),
                              torch.cat([r.active for r in results]), torch.cat(deltas) if deltas else None,
                              sum(r.seconds for r in results))


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


def batch_order(docs) -> list[int]:
    """The order in which `simulate` batches documents: by response length, then prompt length (stable)."""
    return sorted(range(len(docs)), key=lambda i: (len(docs[i][1]), len(docs[i][0])))


def simulate(policy: VocabPolicy, pairs_token_ids, vocab_size: int, eos_ids=(), block: int = 6,
             batch_size: int = 64, progress=None, num_threads: int | None = 1,
             traces: list[TargetTrace] | None = None) -> CoverageResult:
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
        traces:          one `TargetTrace` per document for model-based coverage (see the module docstring);
                         None for text-only. Required when the policy wants top-k ids or hidden states.
    Returns:
        CoverageResult with per-document counts in input order. Documents are batched by `batch_order`.

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
    if traces is not None:
        check_traces(policy, docs, traces)
    D = len(docs)
    covered, tokens = torch.zeros(D, dtype=torch.long), torch.zeros(D, dtype=torch.long)
    active: list[Tensor] = []
    delta: list[Tensor] = []
    order = batch_order(docs)
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
            batch_traces = None if traces is None else [traces[i] for i in rows]
            cov, tok = _run_batch(policy, member, [docs[i] for i in rows], block, progress, batch_traces,
                                  active, delta)
            covered[rows], tokens[rows] = cov, tok
    finally:
        torch.set_num_threads(threads)

    def cat(xs):
        return torch.cat(xs) if xs else torch.zeros(0, dtype=torch.long)
    return CoverageResult(covered, tokens, cat(active), cat(delta), time.perf_counter() - t0)


@torch.no_grad()  # not inference_mode: the policy's buffers must stay usable after the simulation
def _run_batch(policy, member: _Membership, docs, block: int, progress, traces, active: list, delta: list):
    """Prefill + commit loop for one batch of documents -> (covered [B], tokens [B]); appends to the
    active-size and delta lists."""
    B = len(docs)
    prompt, prompt_mask = pad_rows([p for p, _ in docs])                                    # [B, L]
    resp, resp_mask = pad_rows([r for _, r in docs])                                        # [B, T]
    feed = HookFeed(policy, traces, prompt_mask.sum(1), resp_mask.sum(1))
    topk, hidden = feed.prefill(prompt.shape[1])
    policy.on_prefill(prompt, prompt_mask, topk, hidden=hidden)
    T = resp.shape[1]
    bounds = [(0, 1)] + [(j, j + block) for j in range(1, T, block)]   # token 0 alone, as SpecDecoder
    pad = bounds[-1][1] - T                                             # every block has static width
    resp = torch.nn.functional.pad(resp, (0, pad))
    resp_mask = torch.nn.functional.pad(resp_mask, (0, pad))
    covered, prev = torch.zeros(B, dtype=torch.long), None
    for a, b in bounds:
        tok, mask = resp[:, a:b], resp_mask[:, a:b]                                     # [B, b - a]
        if not mask.any():
            break
        ids, n = policy.active()                                                        # [R, C], [R]
        member.mark(ids, n)
        covered += (member.contains(tok) & mask).sum(1)
        live = mask.any(1)
        active.append(n.expand(B)[live].clone())
        w = int(n.max())                                  # valid slots are a prefix: compare only those
        if prev is not None:
            old = torch.full((ids.shape[0], w), -1, dtype=torch.long)
            old[:, : min(w, prev.shape[1])] = prev[:, :w]
            changed = ((ids[:, :w] != old) & (torch.arange(w) < n.unsqueeze(1))).sum(1)    # [R]
            delta.append(changed.expand(B)[live])
        prev = ids[:, :w].clone()
        if a == 0:   # token 0: the decoder commits it with no top-k and the prefill hidden state
            policy.on_commit(tok, mask, None, hidden=hidden)
        else:
            topk, hidden_b = feed.block(a, b - a, mask.sum(1))
            policy.on_commit(tok, mask, topk, hidden=hidden_b)
        if progress is not None:
            progress.update(int(mask.sum()))
    return covered, resp_mask.sum(1)


def compare_at_same_size(rows: list[dict], reference: str = "static") -> None:
    """Give each row `<reference>_at_same_size`: the reference policy's coverage on the same dataset at the
    row's mean active size, interpolated linearly in log(size) between measured capacities (None outside
    the measured range, and for the reference rows themselves). Rows are the `summary()` dicts + policy."""
    import math
    for r in rows:
        pts = sorted((x["active_mean"], x["coverage"]) for x in rows
                     if x["policy"] == reference and x["dataset"] == r["dataset"])
        value = None
        if r["policy"] != reference and pts and pts[0][0] <= r["active_mean"] <= pts[-1][0]:
            for (x0, y0), (x1, y1) in zip(pts, pts[1:] + pts[-1:]):
                if x0 <= r["active_mean"] <= x1:
                    f = 0.0 if x1 == x0 else math.log(r["active_mean"] / x0) / math.log(x1 / x0)
                    value = y0 + f * (y1 - y0)
                    break
        r[f"{reference}_at_same_size"] = value


def plot_coverage(rows: list[dict], path, title: str = "") -> None:
    """PNG of coverage vs mean active size: one panel per dataset, one line per policy across capacities.

    rows: dicts with "policy", "dataset", "capacity", "active_mean", "coverage" (the `summary()` keys), as the
    coverage command writes them. A policy seen at one capacity only (full vocabulary) is one marker.
    """
    import matplotlib
    import matplotlib.ticker
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    datasets = list(dict.fromkeys(r["dataset"] for r in rows))
    policies = list(dict.fromkeys(r["policy"] for r in rows))
    cols = min(3, len(datasets))
    nrows = -(-len(datasets) // cols)
    fig, axes = plt.subplots(nrows, cols, figsize=(5.2 * cols, 4.0 * nrows), squeeze=False)
    for ax, ds in zip(axes.flat, datasets):
        for i, pol in enumerate(policies):
            pts = sorted((r["active_mean"], r["coverage"]) for r in rows
                         if r["dataset"] == ds and r["policy"] == pol)
            if pts:
                xs, ys = zip(*pts)
                ax.plot(xs, ys, marker="o", ms=4, label=pol, color=plt.cm.tab10(i % 10))
        ax.set_xscale("log")
        ax.xaxis.set_minor_formatter(matplotlib.ticker.NullFormatter())    # no crowded minor labels
        ax.set_title(ds, fontsize=10)
        ax.set_xlabel("mean active size (rows scored)")
        ax.set_ylabel("coverage of response tokens")
        ax.grid(True, which="both", alpha=0.3)
    for ax in list(axes.flat)[len(datasets):]:
        ax.axis("off")
    axes.flat[0].legend(fontsize=7, loc="lower right")
    if title:
        fig.suptitle(title, fontsize=11)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
