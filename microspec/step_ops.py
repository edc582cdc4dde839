"""The decode step's own tensor arithmetic, as pure functions the engine compiles when its decoder does.

Between the model calls a step does ~150 small operations (block assembly, the bad-logit check, the cut at
EOS and budget, statistics); inside a CUDA graph each is a kernel of a few microseconds, so a tree step of
Gemma-3-270M spent ~200 us here. Written as functions of tensors (in-place updates on the buffers they are
given, no host sync, Python values only for shapes and modes) they compile to a few fused kernels with
`microspec.compiling.compiled`; uncompiled they are the reference.

Shapes: B rows, N drafted nodes, M = N + 1 block positions, S token slots, C active slots.
"""
from __future__ import annotations

import torch
from torch import Tensor

from .sampling import SamplingConfig, invalid_rows


def block_inputs(tokens: Tensor, n: Tensor, draft_tokens: Tensor, draft_depth: Tensor,
                 block: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """The target's verification block: [last committed token, drafts] with positions (root + depth) and
    cache slots (root + block index). tokens [B, S], n [B], draft_tokens / draft_depth [B, N], block
    arange(M) -> (block tokens, positions, slots) [B, M] each."""
    last = (n - 1).unsqueeze(1)
    ids = torch.cat([tokens.gather(1, last), draft_tokens], 1)
    depth = torch.cat([torch.zeros_like(last), draft_depth], 1)
    return ids, last + depth, last + block


def committed_bad(t_logits: Tensor, cfg: SamplingConfig, path: Tensor, n_accepted: Tensor, done: Tensor,
                  block: Tensor) -> Tensor:
    """bool []: a live row commits a token whose target logits transformers would refuse (NaN; when sampling
    +inf or no finite logit). t_logits [B, M, V], path [B, M'] block index of each committed position,
    n_accepted / done [B]."""
    used = block[: path.shape[1]] <= n_accepted.unsqueeze(1)                             # [B, M']
    bad = invalid_rows(t_logits, cfg).gather(1, path)
    return (bad & used & ~done.unsqueeze(1)).any()


def cut_and_write(tokens: Tensor, n: Tensor, done: Tensor, generated: Tensor, eos: Tensor, max_new: Tensor,
                  block: Tensor, v_tokens: Tensor, n_accepted: Tensor) -> tuple[Tensor, ...]:
    """Cut each row's verdict at its first EOS and at the token budget (finished rows commit nothing) and
    write it after the row's committed tokens (tokens [B, S], in place; slots past the cut are overwritten
    later). v_tokens [B, M'], n_accepted [B], max_new int64 [] -> (live, n_commit [B], mask, is_eos
    [B, M'])."""
    M = v_tokens.shape[1]
    steps = block[:M]
    live = ~done
    n_commit = n_accepted + 1
    is_eos = torch.isin(v_tokens, eos) & (steps < n_commit.unsqueeze(1))
    first_eos = torch.where(is_eos.any(1), is_eos.long().argmax(1), M)
    n_commit = torch.minimum(torch.minimum(n_commit, first_eos + 1), max_new - generated) * live
    tokens.scatter_(1, n.unsqueeze(1) + steps, v_tokens)
    return live, n_commit, steps < n_commit.unsqueeze(1), is_eos


def in_active_set(v_tokens: Tensor, ids: Tensor) -> Tensor:
    """bool [B, M']: each committed token was in its row's active set ids [R, C] (R = 1 or B)."""
    return (v_tokens.unsqueeze(-1) == ids.expand(v_tokens.shape[0], -1).unsqueeze(1)).any(-1)


def account(stats: dict[str, Tensor], histogram: Tensor, live: Tensor, n_accepted: Tensor, n_commit: Tensor,
            in_set: Tensor, mask: Tensor, n_active: Tensor) -> None:
    """Add one step to the run's counters (int64 [] each, in place) and the accepted-length histogram."""
    stats["row_steps"] += live.sum()
    stats["accepted"] += (n_accepted * live).sum()
    stats["committed"] += n_commit.sum()
    stats["covered"] += (in_set & mask).sum()
    stats["active"] += (n_active * live).sum()
    histogram.scatter_add_(0, n_accepted, live.long())


def advance(n: Tensor, generated: Tensor, done: Tensor, n_commit: Tensor, is_eos: Tensor, mask: Tensor,
            max_new: Tensor) -> None:
    """Move every row past its committed tokens and mark the rows that hit EOS or the budget (in place)."""
    done |= (is_eos & mask).any(1) | (generated + n_commit >= max_new)
    n.add_(n_commit)
    generated.add_(n_commit)


OPS = ("block_inputs", "committed_bad", "cut_and_write", "in_active_set", "account", "advance")
