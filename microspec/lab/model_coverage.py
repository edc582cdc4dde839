"""Model-based coverage: what a policy covers when it gets the target's top-k ids and hidden states.

Why: text-only replay (`microspec.lab.coverage`) starves the policies that read the target: NanoSpec's
in-context set is built mostly from the target's top-3 predictions, and learned policies (`wants_hidden`, e.g.
a DynaSpec-style ClusterPolicy) route on the target's final hidden state. Those inputs exist only with a
model.

Method (teacher forcing): each (prompt, response) pair is tokenized with the model's own tokenizer (the chat
template applied to the prompt, optionally), and the target runs once over prompt + response through the
decoder's own model path (`microspec.models.hf.CausalLM`, chunked prefill with a per-row static cache). At
every position we keep the target's top-k next-token ids and, when a policy wants it, its final hidden state
(the input of its LM head, taken by a forward pre-hook on `get_output_embeddings()`). `coverage.simulate`
then feeds them to the policy hooks exactly as `SpecDecoder` would (see `microspec.lab.coverage`).

The assumption: this is the coverage a greedy decoder would see *if the target had produced the reference
responses*. Real greedy output is the target's argmax, so there the committed token is always the target's
top-1 at its position; with reference text from another model it often is not, and the top-k ids added per
verified position (NanoSpec's "Ext") are the target's guesses, not the reference tokens. Blocks are committed
in full (K + 1 tokens), the least frequent refresh.

    >>> traces = teacher_forced_traces(model, docs, topk=3, hidden=True)        # doctest: +SKIP
    >>> simulate(InContextPolicy(2048, topk=3), docs, V, [2], traces=traces).coverage  # doctest: +SKIP
"""
from __future__ import annotations

import random
import time
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from .data import Tokenizer
from .teacher import Teacher, length_batches, pad_rows
from ..inputs import eos_ids_of
from ..models.hf import vocab_size_of
from ..policies.base import VocabPolicy
from ..prompts import encode_prompt


@dataclass
class TargetTrace:
    """The target's view of one teacher-forced document (prompt then response: N = L + T positions).

    topk    int64 [N, k]       the target's top-k next-token ids at every position (row p predicts p + 1)
    hidden  float [N, D] | None  the target's final hidden state (the input of its LM head) at every position
    """
    topk: Tensor
    hidden: Tensor | None = None


def check_traces(policy: VocabPolicy, docs, traces) -> None:
    """Raise ValueError unless there is one trace per document, covering its positions, with what the
    policy wants (>= its top-k, hidden states if `wants_hidden`)."""
    if len(traces) != len(docs):
        raise ValueError(f"{len(traces)} traces for {len(docs)} documents")
    for i, ((p, r), tr) in enumerate(zip(docs, traces)):
        n = p.numel() + r.numel()
        if p.numel() == 0:
            raise ValueError(f"document {i}: model-based coverage needs a non-empty prompt")
        if tr.topk.shape[0] != n or (tr.hidden is not None and tr.hidden.shape[0] != n):
            raise ValueError(f"document {i}: trace covers {tr.topk.shape[0]} positions, expected {n}")
        if tr.topk.shape[1] < policy.target_topk:
            raise ValueError(f"{policy!r} wants the target's top-{policy.target_topk}; the traces hold "
                             f"top-{tr.topk.shape[1]}")
        if policy.wants_hidden and tr.hidden is None:
            raise ValueError(f"{policy!r} wants the target's hidden states; the traces hold none")


class HookFeed:
    """The hook inputs that a batch's traces give, gathered at the positions `SpecDecoder` uses (text-only:
    `traces` None, every input None). Used by `microspec.lab.coverage.simulate`."""

    def __init__(self, policy: VocabPolicy, traces: list[TargetTrace] | None, prompt_len: Tensor,
                 resp_len: Tensor):
        self.k = policy.target_topk if traces is not None else 0
        self.on = traces is not None
        self.Lp, self.T = prompt_len, resp_len                                          # [B], [B]
        if self.on:
            self.topk = pad_rows([t.topk[:, : self.k] for t in traces])[0] if self.k else None  # [B, N, k]
            self.hidden = (pad_rows([t.hidden for t in traces])[0]                      # [B, N, D]
                           if policy.wants_hidden else None)

    def _hidden_at(self, pos: Tensor) -> Tensor | None:
        if self.hidden is None:
            return None
        return self.hidden.gather(1, pos.view(-1, 1, 1).expand(-1, 1, self.hidden.shape[-1])).squeeze(1)

    def prefill(self, width: int):
        """(topk [B, width, k] at prompt positions | None, hidden [B, D] at the last prompt position)."""
        if not self.on:
            return None, None
        topk = self.topk[:, :width] if self.k else None
        return topk, self._hidden_at(self.Lp - 1)

    def block(self, a: int, width: int, n_commit: Tensor):
        """Block of response tokens [a, a + width) with n_commit [B] real commits -> (topk [B, width, k],
        hidden [B, D]): top-k at positions Lp + a - 1 + j (they predict response token a + j); hidden at
        the newest committed input Lp + a + n_commit - 2, or at the last token for a finished row."""
        if not self.on:
            return None, None
        topk = None
        if self.k:
            pos = (self.Lp + a - 1).unsqueeze(1) + torch.arange(width)                  # [B, width]
            pos = pos.clamp(max=self.topk.shape[1] - 1)                                 # padding tail
            topk = self.topk.gather(1, pos.unsqueeze(-1).expand(-1, -1, self.k))
        newest = torch.where(n_commit > 0, self.Lp + a + n_commit - 2, self.Lp + self.T - 1)
        return topk, self._hidden_at(newest)


def hf_tokenizer(tokenizer, vocab_size: int, eos_ids, name: str = "model") -> Tokenizer:
    """Wrap a Hugging Face tokenizer (e.g. the one `load_gguf` returns) as a `microspec.lab.data.Tokenizer`
    (no special tokens added), so the coverage command can fit frequency lists with it."""
    def encode_batch(texts):
        return tokenizer(list(texts), add_special_tokens=False)["input_ids"] if texts else []
    return Tokenizer(name, "hf", vocab_size, sorted(set(int(e) for e in eos_ids)), encode_batch,
                     lambda ids: tokenizer.decode(ids))


model_eos_ids = eos_ids_of   # the name `microspec coverage` imports: the one EOS rule, under its old name


def encode_pairs(tokenizer, pairs, chat_template: bool = True, max_prompt_tokens: int | None = None,
                 max_response_tokens: int | None = None) -> list[tuple[list[int], list[int]]]:
    """(prompt, response) texts -> (prompt ids, response ids) with a Hugging Face tokenizer.

    The prompt becomes one user turn of the chat template plus the assistant header when `chat_template`
    (and the tokenizer has one), else the raw text; an empty raw prompt becomes the BOS/EOS id so the target
    has a position to predict token 0 from. The response is encoded on its own, without special tokens.
    Prompts keep their *last* `max_prompt_tokens` ids, responses their first `max_response_tokens`.
    """
    use_template = chat_template and getattr(tokenizer, "chat_template", None)
    out = []
    for prompt, response in pairs:
        p = encode_prompt(tokenizer, prompt, "chat" if use_template else "raw")
        if not p:
            p = [tokenizer.bos_token_id if tokenizer.bos_token_id is not None else tokenizer.eos_token_id]
        r = tokenizer(response, add_special_tokens=False)["input_ids"]
        if max_prompt_tokens:
            p = p[-max_prompt_tokens:]
        if max_response_tokens:
            r = r[:max_response_tokens]
        out.append((list(p), list(r)))
    return out


def sample_indices(n: int, k: int | None, seed: int = 0) -> list[int]:
    """k document indices of n drawn without replacement (sorted), or all of them when k is None or >= n."""
    if k is None or k >= n:
        return list(range(n))
    return sorted(random.Random(seed).sample(range(n), k))


def teacher_forced_traces(model: nn.Module, docs, topk: int = 3, hidden: bool = False, vocab_size=None,
                          batch_tokens: int = 4096, chunk: int = 256, progress=None) -> list[TargetTrace]:
    """Run the target over each prompt + response once (`microspec.lab.teacher`, the `CausalLM` path) and
    keep what the policy hooks need.

    Args:
        model:        a Hugging Face causal LM (attention "sdpa" or "eager"); any dtype, on any device.
        docs:         (prompt ids, response ids) pairs; prompts must be non-empty.
        topk:         top-k ids kept per position (over ids < vocab_size: the policy's vocabulary).
        hidden:       also keep the final hidden state at every position (float32 [N, D] per document).
        vocab_size:   the shared vocabulary (default: the model's head rows).
        batch_tokens: documents are batched (sorted by length) so that rows x longest length <= this.
        chunk:        positions per forward (bounds the [B, chunk, V] logits, as the decoder's prefill).
        progress:     optional object with `update(n_tokens)`.
    Returns:
        one `TargetTrace` per document, in input order: topk int64 [N, topk], hidden float32 [N, D] or None.
    """
    V = vocab_size or vocab_size_of(model)
    seqs = [torch.as_tensor(list(p) + list(r), dtype=torch.long) for p, r in docs]
    for i, (p, _) in enumerate(docs):
        if len(p) == 0:
            raise ValueError(f"document {i}: empty prompt (the target needs a position to predict token 0)")
    teacher = Teacher(model, hidden=hidden, topk=topk, vocab_size=V, chunk=chunk)
    out: list[TargetTrace | None] = [None] * len(seqs)
    for b in teacher.batches(seqs, length_batches([s.numel() for s in seqs], batch_tokens)):
        top = b.topk.cpu() if topk else torch.zeros(*b.tokens.shape, 0, dtype=torch.long)   # [B, N, k]
        hid = b.hidden.float().cpu() if hidden else None                                   # [B, N, D]
        for r, i in enumerate(b.rows):
            n = seqs[i].numel()
            out[i] = TargetTrace(top[r, :n].clone(), hid[r, :n].clone() if hidden else None)
        if progress is not None:
            progress.update(sum(seqs[i].numel() for i in b.rows))
    return out


def traces_for(model, docs, policies, progress=None, **kw) -> tuple[list[TargetTrace], float]:
    """Traces with the largest top-k any of `policies` wants and hidden states if one wants them; seconds."""
    k = max((p.target_topk for p in policies), default=0)
    want_hidden = any(p.wants_hidden for p in policies)
    t0 = time.perf_counter()
    traces = teacher_forced_traces(model, docs, topk=k, hidden=want_hidden, progress=progress, **kw)
    return traces, time.perf_counter() - t0


def cached_traces(cache_dir, model, model_name: str, dtype: str, docs, k: int, hidden: bool, vocab_size,
                  progress=None) -> list[TargetTrace]:
    """`teacher_forced_traces` through a folder of safetensors files keyed by model, dtype and the exact
    token ids. A cached file with >= k top ids (and hidden states, if wanted) is reused; a miss computes
    top-max(k, 3) with hidden states, so later runs of hidden-state policies hit the cache too."""
    import glob
    import hashlib
    import json
    import os
    base = hashlib.sha256(json.dumps([model_name, dtype, [[list(p), list(r)] for p, r in docs]]).encode())
    base = os.path.join(cache_dir, base.hexdigest()[:24])
    for path in sorted(glob.glob(base + "_k*_h*.safetensors")):
        kk, hh = path[len(base) + 2: -len(".safetensors")].split("_h")
        if int(kk) >= k and int(hh) >= int(hidden):
            return load_traces(path)
    k = max(k, 3)
    traces = teacher_forced_traces(model, docs, k, True, vocab_size, progress=progress)
    os.makedirs(cache_dir, exist_ok=True)
    save_traces(traces, f"{base}_k{k}_h1.safetensors")
    return traces


def save_traces(traces: list[TargetTrace], path) -> None:
    """Traces as one safetensors file: topk int64 [sum N, k], offsets [D + 1], hidden float32 [sum N, D]."""
    from safetensors.torch import save_file
    offsets = torch.tensor([0] + [t.topk.shape[0] for t in traces]).cumsum(0)
    tensors = {"topk": torch.cat([t.topk for t in traces]).contiguous(), "offsets": offsets}
    if traces and traces[0].hidden is not None:
        tensors["hidden"] = torch.cat([t.hidden for t in traces]).contiguous()
    save_file(tensors, str(path))


def load_traces(path) -> list[TargetTrace]:
    """Inverse of `save_traces`."""
    from safetensors.torch import load_file
    t = load_file(str(path))
    o = t["offsets"].tolist()
    hid = t.get("hidden")
    return [TargetTrace(t["topk"][a:b], None if hid is None else hid[a:b]) for a, b in zip(o, o[1:])]
