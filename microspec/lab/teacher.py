"""The one teacher-forced pass of the target: token rows (prompt then answer) in right-padded batches through
the frozen model, without gradients. The coverage traces (`model_coverage.teacher_forced_traces`), the cluster
router's training states (`clustering.collect_states`) and the EAGLE trainer's features (`train_drafter`) all
read the target through it.

    teacher = Teacher(model, topk=3, chunk=256)
    for b in teacher.batches(rows, length_batches([len(r) for r in rows], batch_tokens=4096)):
        b.rows      list[int]          the batch's row indices into `rows`              (B of them)
        b.tokens    int64 [B, T]       right-padded ids, on the model's device           (T = longest row)
        b.mask      bool [B, T]        real positions
        b.hidden    [B, T, D] | None   final hidden states (after the final norm: the LM head's input),
                                       the model's dtype, on its device
        b.topk      int64 [B, T, k] | None   the k most likely next ids (row t predicts t + 1)

Right padding: causality keeps the padding out of every real position's state, so a row's states do not
depend on the other rows of its batch (up to kernel rounding) and no position ids are needed.

Two model paths, chosen by `chunk`, so that each caller keeps the numbers it was built on:

* `chunk=None`: one call of the model's own decoder (`model.base_model`, 2-D attention mask, no cache) per
  batch. The EAGLE trainer and the cluster router read their features this way; it allocates no K/V.
* `chunk=n`: microspec's `CausalLM` (the decoder's model path: per-row cache, 4-D masks) in chunks of n
  positions, as the decoder's prefill runs, which bounds the [B, n, V] logits. Top-k needs it, since
  `CausalLM.logits` applies the family's logit transform. The coverage traces read the target this way.
"""
from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from ..models.hf import CausalLM


@dataclass
class TeacherBatch:
    """One batch of the pass (shapes in the module docstring)."""
    rows: list[int]
    tokens: Tensor
    mask: Tensor
    hidden: Tensor | None
    topk: Tensor | None


def pad_rows(seqs: list[Tensor], fill=0) -> tuple[Tensor, Tensor]:
    """Right-pad tensors [n_i, *F] to [B, max(n_i, 1), *F] with `fill`; bool mask [B, max] of real rows."""
    B, L = len(seqs), max(1, max(s.shape[0] for s in seqs))
    out = torch.full((B, L, *seqs[0].shape[1:]), fill, dtype=seqs[0].dtype)
    mask = torch.zeros(B, L, dtype=torch.bool)
    for r, s in enumerate(seqs):
        out[r, : s.shape[0]], mask[r, : s.shape[0]] = s, True
    return out, mask


def length_batches(lengths: Sequence[int], batch_tokens: int, lookahead: bool = True) -> list[list[int]]:
    """Row indices grouped in order of length (ties by index) so that rows x longest <= batch_tokens; a row
    longer than the budget gets a batch of its own. Similar lengths together: little padding.

    lookahead=False tests the budget with the batch's current longest row instead of the next row, so a
    batch may overflow by one longer row: `collect_states`' rule, kept because a batch's shape sets its
    kernels' rounding, and the fitted cluster policies were trained on the states of those batches."""
    batches, cur = [], []
    for i in sorted(range(len(lengths)), key=lambda i: lengths[i]):
        if cur and (len(cur) + 1) * lengths[i if lookahead else cur[-1]] > batch_tokens:
            batches.append(cur)
            cur = []
        cur.append(i)
    return batches + [cur] if cur else batches


class Teacher:
    """The frozen target, run teacher-forced (see the module docstring).

    hidden:     keep the final hidden states.
    topk:       keep the top-k next-token ids over ids < `vocab_size` (default: all head rows); needs `chunk`.
    chunk:      None: the model's own decoder in one call; n: `CausalLM` in chunks of n positions.
    """

    def __init__(self, model: nn.Module, *, hidden: bool = True, topk: int = 0, vocab_size: int | None = None,
                 chunk: int | None = None):
        if topk and chunk is None:
            raise ValueError("top-k ids need the CausalLM path (chunk=n): it applies the logit transform")
        self.model, self.hidden, self.topk, self.chunk = model, hidden, topk, chunk
        self.vocab_size = vocab_size
        self.lm = CausalLM(model) if chunk is not None else None
        self.device = next(model.parameters()).device

    @torch.no_grad()
    def run(self, tokens: Tensor, mask: Tensor, rows: list[int] | None = None) -> TeacherBatch:
        """One right-padded batch: tokens int [B, T], mask [B, T] (bool or 0/1) -> its `TeacherBatch`."""
        tokens = tokens.to(self.device)
        if self.lm is None:
            out = self.model.base_model(input_ids=tokens, attention_mask=mask.long().to(self.device),
                                        use_cache=False)
            hidden, topk = out.last_hidden_state, None
        else:
            hidden, topk = self._chunked(tokens)
        return TeacherBatch(rows or [], tokens, mask.to(self.device).bool(), hidden if self.hidden else None,
                            topk)

    def batches(self, rows: Sequence, batches: list[list[int]], pad: int = 0) -> Iterator[TeacherBatch]:
        """`run` over `batches` (index lists into `rows`, e.g. from `length_batches`), each right-padded with
        `pad`; rows are token lists or int 1-D tensors."""
        for idx in batches:
            tokens, mask = pad_rows([torch.as_tensor(rows[i], dtype=torch.long) for i in idx], pad)
            yield self.run(tokens, mask, idx)

    def _chunked(self, tokens: Tensor) -> tuple[Tensor | None, Tensor | None]:
        """`CausalLM` over positions [c, c + chunk) in turn -> hidden [B, T, D], top-k int64 [B, T, k] (each
        None unless asked for)."""
        lm, (B, T) = self.lm, tokens.shape
        lm.allocate(B, T)
        hids, tops = [], []
        for c0 in range(0, T, self.chunk):
            c1 = min(T, c0 + self.chunk)
            pos = torch.arange(c0, c1, device=tokens.device).expand(B, -1)                # [B, t]
            h = lm.forward(tokens[:, c0:c1], pos, eager=True)                               # [B, t, D]
            hids += [h] if self.hidden else []
            if self.topk:
                logits = lm.logits(h)[..., : self.vocab_size].float()                       # [B, t, V]
                tops.append(torch.topk(logits, self.topk, dim=-1).indices)
        return (torch.cat(hids, 1) if self.hidden else None), (torch.cat(tops, 1) if self.topk else None)
