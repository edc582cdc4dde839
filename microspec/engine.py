"""`DecodeRun`: the state machine of one request batch: prefill, then decode steps until every row is done.

It is given its parts (`EngineParts`: the target backend, a proposer, a vocabulary policy) and knows nothing
of `SpecDecoder`. One decode step (`step`), for all rows at once, with static shapes and no host sync:

    ids, n_act = policy.active()       the set for this block (fixed while drafting)
    proposer.head.refresh()            delta-gather the newly admitted head rows
    drafts = proposer.propose(...)     N draft nodes: a chain, or a tree with its ancestor mask
    target.forward(block)              the target scores [last committed, node 1..N] over its full vocabulary
    verdict = verify(...)              `microspec.verification`: greedy or lossless sampling, chain or tree
    commit                             accepted path + corrected/bonus token, cut at EOS and at the budget;
                                       a tree's accepted K/V move into their final cache slots
    policy.on_step, proposer.observe, observers

Per-row state: `tokens` [B, S] (prompt and generated tokens compacted to the left: position = slot),
`n` [B] committed length, `generated` [B], `done` [B]; S = longest prompt + max_new_tokens + N + 1.
Every state tensor is updated in place and RNG lives in noise buffers refilled before each step
(`draw_noise`), so on CUDA the whole step is captured once in a CUDA graph (`capture`) and replayed.

Observers (`observers=[...]`) see a `StepRecord` of device tensors at the end of every step; inside a
captured step they must stay on the device (the record's tensors are live buffers: copy what you keep).
"""
from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from types import SimpleNamespace

import torch
from torch import Tensor

from . import step_ops
from .compiling import compiled
from .drafting.base import Commit, DraftRequest, Drafts, Proposer
from .kernels import row_topk
from .models.base import ModelBackend
from .outputs import GenerateOutput, SpecStats
from .policies import VocabPolicy
from .sampling import SamplingConfig, exponential_race, invalid_rows, process_logits, safe_softmax
from .verification import Verdict, verify


@dataclass
class EngineParts:
    """What a run is made of. vocab_size: ids the policy may hold (the shared vocabulary, <= the target's).
    verifier: decides what a block commits (swap it to impose acceptance, as `benchmarks/bench_e2e.py`
    does). compile: run the policy's per-step updates, the step's own arithmetic (`microspec.step_ops`) and
    the library's verifier through `microspec.compiling.compiled` (a tree step's in-context update alone is
    ~150 small ops)."""

    target: ModelBackend
    proposer: Proposer
    policy: VocabPolicy
    vocab_size: int
    prefill_chunk: int = 512
    verifier: Callable[..., Verdict] = verify   # `microspec.verification.verify`'s signature
    compile: bool | str = False

    @property
    def target_vocab_size(self) -> int:
        return self.target.vocab_size


@dataclass
class StepRecord:
    """One decode step as observers see it (device tensors; M = longest committed block).

    live [B] bool (row was unfinished), n_accepted [B], n_commit [B], tokens [B, M], mask [B, M] (committed),
    in_set [B, M] (token was in the active set used to draft), n_active [B] (active-set size of the row).
    """

    live: Tensor
    n_accepted: Tensor
    n_commit: Tensor
    tokens: Tensor
    mask: Tensor
    in_set: Tensor
    n_active: Tensor


@dataclass
class Prefilled:
    """What the prefill hands the first step: the target's logits at each row's last prompt position [B, V],
    its top-k ids at every prompt position [B, L, k] (policies that want them) and its final hidden states at
    every prompt position [B, L, D] (learned policies and feature drafters)."""

    last_logits: Tensor
    topk: Tensor | None
    hidden: Tensor | None


class DecodeRun:
    def __init__(self, parts: EngineParts, input_ids: Tensor, mask: Tensor, max_new: int, cfg: SamplingConfig,
                 eos: list[int], generator=None, *, cuda_graph: bool = False, observers=(), streamer=None):
        self.parts, self.policy, self.proposer = parts, parts.policy, parts.proposer
        # The per-step policy update, compiled (the prefill's is host-driven, once per request); uncompiled,
        # the policy's method is looked up at each call.
        self._compiled_update = compiled(parts.policy.on_step, parts.compile) if parts.compile else None
        self.ops = SimpleNamespace(**{name: compiled(getattr(step_ops, name), parts.compile)
                                      for name in step_ops.OPS})
        # The library's verifier too: a sampled tree walk is ~20 small ops per depth around one pass over the
        # block's vocabulary. A verifier the caller swapped in runs as given.
        self._verify = (compiled(verify, parts.compile) if parts.compile and parts.verifier is verify
                        else parts.verifier)
        self.target = parts.target
        self.cfg, self.max_new, self.generator = cfg, max_new, generator
        self.observers, self.streamer = list(observers), streamer
        B, L = input_ids.shape
        # Never draft more than the budget can commit (K = 10**6 with 3 new tokens drafts 2).
        N, dev = parts.proposer.plan(max(1, max_new - 1)), input_ids.device
        self.B, self.L, self.N, self.device = B, L, N, dev
        self.S = L + max_new + N + 1
        self.cuda_graph = cuda_graph and dev.type == "cuda"
        self.graph: torch.cuda.CUDAGraph | None = None
        # Compact each prompt to the left: slot = position, so rows advance independently.
        self.lengths = mask.sum(1)                                                       # [B]
        order = torch.argsort((~mask).to(torch.int8), dim=1, stable=True)
        self.tokens = torch.zeros(B, self.S, dtype=torch.long, device=dev)
        self.tokens[:, :L] = input_ids.gather(1, order).masked_fill(~mask.gather(1, order), 0)
        self.prompt_mask = torch.arange(L, device=dev) < self.lengths.unsqueeze(1)      # [B, L]
        self.n = self.lengths.clone()
        self.generated = torch.zeros(B, dtype=torch.long, device=dev)
        self.done = torch.zeros(B, dtype=torch.bool, device=dev)
        self.max_new_t = torch.tensor(max_new, device=dev)         # a tensor: compiled ops do not specialise
        self.eos = torch.tensor(eos, dtype=torch.long, device=dev)
        self.block = torch.arange(N + 1, device=dev)                                    # [N+1]
        # The target's bad-logit flag (NaN, or what sampling cannot draw from); the drafter keeps its own.
        self.nan_seen = torch.zeros(1, dtype=torch.bool, device=dev)
        self.stats = {name: torch.zeros((), dtype=torch.long, device=dev)
                      for name in ("row_steps", "accepted", "committed", "covered", "active")}
        self.histogram = torch.zeros(N + 1, dtype=torch.long, device=dev)
        self.num_steps = 0

    # ------------------------------------------------------------------ randomness (outside the step)
    def _fill_uniform(self, buf: Tensor) -> Tensor:
        gens = self.generator if isinstance(self.generator, (list, tuple)) else None
        if gens is None:
            return buf.uniform_(generator=self.generator)
        for row, g in zip(buf, gens):
            row.uniform_(generator=g)
        return buf

    def _fill_exponential(self, buf: Tensor) -> Tensor:
        return self._fill_uniform(buf).log_().neg_()                                      # (0, inf]

    def _allocate_noise(self) -> None:
        if not self.cfg.do_sample:
            return
        C = self.policy.active_ids.shape[1]
        f64 = dict(dtype=torch.float64, device=self.device)
        # Only sampled chains draw their drafts from noise; top-k trees need none ([B, N, V] would be big).
        self.draft_noise = torch.empty(self.B, self.N if self.proposer.draws_noise else 0, C, **f64)
        self.uniforms = torch.empty(self.B, self.N, **f64)
        self.next_noise = torch.empty(self.B, self.parts.target_vocab_size, **f64)

    def draw_noise(self) -> None:
        """Refill the step's noise buffers (host side, before each step or graph replay)."""
        if self.cfg.do_sample:
            self._fill_exponential(self.draft_noise)
            self._fill_uniform(self.uniforms)
            self._fill_exponential(self.next_noise)

    # ------------------------------------------------------------------ prefill (host-driven)
    def prefill(self) -> Prefilled:
        """Run the target and the proposer over the prompts in chunks of `parts.prefill_chunk` positions."""
        B, L, dev = self.B, self.L, self.device
        k, chunk_len = self.policy.target_topk, self.parts.prefill_chunk
        want_hidden = self.policy.wants_hidden or self.proposer.wants_target_hidden
        topk = torch.zeros(B, L, k, dtype=torch.long, device=dev) if k else None
        hidden = None
        last_pos = self.lengths - 1
        last = None
        for c0 in range(0, L, chunk_len):
            c1 = min(L, c0 + chunk_len)
            chunk = self.tokens[:, c0:c1]
            pos = torch.arange(c0, c1, device=dev).expand(B, -1)
            h = self.target.forward(chunk, pos, eager=True)                              # [B, T, D]
            if want_hidden:
                hidden = h if hidden is None else torch.cat([hidden, h], 1)
            idx = (last_pos - c0).clamp(0, c1 - c0 - 1)
            here = ((last_pos >= c0) & (last_pos < c1)).unsqueeze(1)
            if k:  # over the shared vocabulary only: the policy cannot hold target-only ids
                logits = self.target.logits(h)                                            # [B, T, V]
                self.nan_seen[0] |= torch.isnan(logits).any()
                topk[:, c0:c1] = row_topk(logits[..., : self.parts.vocab_size], k)
                cand = _pick(logits, idx)
            else:
                cand = self.target.logits(_pick(h, idx).unsqueeze(1))[:, 0]
                self.nan_seen[0] |= torch.isnan(cand).any()
            last = cand if last is None else torch.where(here, cand, last)
            self.proposer.prefill(chunk, pos, h if self.proposer.wants_target_hidden else None)
        self.nan_seen[0] |= invalid_rows(last, self.cfg).any()
        return Prefilled(last, topk, hidden)

    def _first_token(self, logits: Tensor) -> Tensor:
        if not self.cfg.do_sample:
            return torch.argmax(logits, dim=-1)
        probs = safe_softmax(process_logits(logits, self.cfg))[0]
        noise = self._fill_exponential(torch.empty(probs.shape, dtype=torch.float64, device=self.device))
        return exponential_race(probs, noise)

    def start(self, prefilled: Prefilled | None = None) -> None:
        """Host-side set-up and prefill: caches, policy, head binding, noise buffers, the first token.
        `prefilled` (from an earlier `prefill()` of the same batch, with the caches restored) skips the prompt
        forwards."""
        policy, parts = self.policy, self.parts
        self.target.allocate(self.B, self.S)
        self.proposer.allocate(self.B, self.S)
        eos_in_vocab = [e for e in self.eos.tolist() if e < parts.vocab_size]
        policy.setup(self.B, parts.vocab_size, eos_in_vocab, self.device)
        if self.proposer.head is not None:
            self.proposer.head.bind(*policy.active())
        self._allocate_noise()
        pre = prefilled if prefilled is not None else self.prefill()
        prompt = self.tokens[:, : self.L]
        last_hidden = None if pre.hidden is None else _pick(pre.hidden, self.lengths - 1)     # [B, D]
        policy.on_prefill(prompt, self.prompt_mask & (prompt < parts.vocab_size), pre.topk,
                          hidden=last_hidden if policy.wants_hidden else None)
        first = self._first_token(pre.last_logits)
        n_before = self.n.clone()
        self.tokens.scatter_(1, self.n.unsqueeze(1), first.unsqueeze(1))
        self.n.add_(1)
        self.generated.add_(1)
        self.done |= torch.isin(first, self.eos) | (self.max_new <= 1)
        policy.on_commit(first.unsqueeze(1), (first < parts.vocab_size).unsqueeze(1),
                         hidden=last_hidden if policy.wants_hidden else None)
        ones = torch.ones(self.B, dtype=torch.long, device=self.device)
        self.proposer.observe(Commit(n_before, first.unsqueeze(1), ones, ones.bool().unsqueeze(1),
                                     torch.zeros_like(first).unsqueeze(1),
                                     None if last_hidden is None else last_hidden.unsqueeze(1)))
        if self.streamer is not None:
            self.streamer.put(first[:1].cpu())

    # ------------------------------------------------------------------ one decode step (capturable)
    def step(self) -> None:
        n = self.n
        ids, n_act = self.policy.active()                                                # [R, C], [R]
        if self.proposer.head is not None:
            self.proposer.head.refresh()
        drafts = self.proposer.propose(DraftRequest(self.tokens, n, ids, n_act, self.cfg,
                                                    self.draft_noise if self.cfg.do_sample else None))
        block, positions, slots = self.ops.block_inputs(self.tokens, n, drafts.tokens, drafts.depth,
                                                        self.block)                      # [B, N+1] each
        hidden = self.target.forward(block, positions, slots, tree_mask=drafts.tree_mask)   # [B, N+1, D]
        t_logits = self.target.logits(hidden)                                            # [B, N+1, V]
        noise = (self.uniforms, self.next_noise) if self.cfg.do_sample else (None, None)
        verdict = self._verify(drafts, t_logits, ids, self.cfg, *noise)
        path = verdict.path if verdict.path is not None else self.block[: verdict.tokens.shape[1]].expand(
            self.B, -1)                                                                  # [B, M]
        # Raise at the end (no sync here) where a committed token came from logits transformers refuses:
        # NaN, or when sampling +inf / no finite logit (torch.multinomial raises on those).
        self.nan_seen[0] |= self.ops.committed_bad(t_logits, self.cfg, path, verdict.n_accepted, self.done,
                                                   self.block)
        if not drafts.is_chain:  # the accepted nodes' K/V move to the slots their positions own
            base = (n - 1).unsqueeze(1)
            self.target.move_kv(base + path, base + self.block[: path.shape[1]])
        self._commit(verdict, path, drafts, block, t_logits, hidden, ids, n_act)

    def _commit(self, verdict: Verdict, path: Tensor, drafts: Drafts, block: Tensor, t_logits: Tensor,
                hidden: Tensor, ids: Tensor, n_act: Tensor) -> None:
        """Cut at the first EOS and at the token budget; finished rows commit nothing."""
        n, ops = self.n, self.ops
        live, n_commit, mask, is_eos = ops.cut_and_write(self.tokens, n, self.done, self.generated, self.eos,
                                                         self.max_new_t, self.block, verdict.tokens,
                                                         verdict.n_accepted)             # mask [B, M]
        # Account before the policy update: `ids` / `n_act` are the policy's live buffers.
        if self.N:
            in_set = ops.in_active_set(verdict.tokens, ids)                             # [B, M]
        else:  # plain decoding: nothing was drafted, so there is no set to miss
            in_set = torch.ones_like(verdict.tokens, dtype=torch.bool)
        record = StepRecord(live, verdict.n_accepted, n_commit, verdict.tokens, mask, in_set,
                            n_act.expand(self.B).clone())                # the policy updates n_act below
        ops.account(self.stats, self.histogram, live, verdict.n_accepted, n_commit, in_set, mask,
                    record.n_active)
        self._update_policy(verdict, path, drafts, block, t_logits, hidden, live, mask, n_commit)
        self.proposer.observe(Commit(n.clone(), verdict.tokens, n_commit, mask, path,
                                     hidden if self.proposer.wants_target_hidden else None))
        ops.advance(self.n, self.generated, self.done, n_commit, is_eos, mask, self.max_new_t)
        for observer in self.observers:
            observer(record)
        if self.streamer is not None:
            self.streamer.put(verdict.tokens[0][mask[0]].cpu())

    def _target_topk(self, t_logits: Tensor, path: Tensor) -> tuple[Tensor | None, Tensor | None]:
        """The target's top-k ids the policy asked for: at every block position ([B, N+1, k]) and at each
        committed token's input position, the path ([B, M, k]); (None, None) when it asked for none."""
        k, vocab = self.policy.target_topk, self.parts.vocab_size
        if not k:
            return None, None
        # one pass over the block's logits (a Triton kernel on CUDA); the policy cannot hold target-only ids
        block_topk = row_topk(t_logits[..., :vocab], k)                                  # [B, N+1, k]
        return block_topk, block_topk.gather(1, path.unsqueeze(-1).expand(-1, -1, k))

    def _update_policy(self, verdict: Verdict, path: Tensor, drafts: Drafts, block: Tensor, t_logits: Tensor,
                       hidden: Tensor, live: Tensor, mask: Tensor, n_commit: Tensor) -> None:
        """The policy's per-step hook `on_step`: the committed tokens and, when it takes it, the verification
        block [B, N+1], with the target's top-k where it asked for them."""
        policy, vocab = self.policy, self.parts.vocab_size
        block_topk, topk = self._target_topk(t_logits, path)
        on_step = self._compiled_update or policy.on_step
        block_args = {}
        if policy.wants_block:
            block_mask = torch.cat([live.unsqueeze(1), drafts.valid & live.unsqueeze(1)], 1)
            block_args = dict(block_ids=block, block_mask=block_mask & (block < vocab), block_topk=block_topk)
        newest = None
        if policy.wants_hidden:  # newest position whose input is committed
            newest = _pick(hidden, path.gather(1, (n_commit - 1).clamp(min=0).unsqueeze(1)).squeeze(1))
        on_step(verdict.tokens, mask & (verdict.tokens < vocab), topk, newest, **block_args)

    # ------------------------------------------------------------------ driver (host side)
    def capture(self) -> None:
        """Run one real step on a side stream (warm-up, as CUDA graphs require), then capture the next."""
        side = torch.cuda.Stream(self.device)
        side.wait_stream(torch.cuda.current_stream(self.device))
        with torch.cuda.stream(side):
            self.draw_noise()
            self.step()
            self.num_steps += 1
        torch.cuda.current_stream(self.device).wait_stream(side)
        self.graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(self.graph):
            self.step()

    def run_steps(self, watcher: _DoneWatcher | None = None) -> None:
        """Decode until every row is done (each live row commits >= 1 token per step)."""
        watcher = watcher or _DoneWatcher(self.device, eager=self.streamer is not None)
        while self.num_steps < self.max_new - 1 and not watcher.all_done(self.done):
            if self.cuda_graph and self.graph is None and self.streamer is None:
                self.capture()
                continue
            self.draw_noise()
            if self.graph is not None:
                self.graph.replay()
            else:
                self.step()
            self.num_steps += 1
        if self.streamer is not None:
            self.streamer.end()

    def execute(self, original_ids: Tensor, pad: int) -> GenerateOutput:
        self.start()
        self.run_steps()
        return GenerateOutput(self.sequences(original_ids, pad), self.summary())

    def sequences(self, original_ids: Tensor, pad: int) -> Tensor:
        """[B, L + new]: the caller's prompt (padding included), then each row's new tokens, padded with
        `pad`."""
        self._raise_on_nan()
        G = int(self.generated.max())
        span = torch.arange(G, device=self.device)
        new = self.tokens.gather(1, self.lengths.unsqueeze(1) + span)
        new = new.masked_fill(span >= self.generated.unsqueeze(1), pad)
        return torch.cat([original_ids.to(self.device), new], dim=1)

    def _raise_on_nan(self) -> None:
        nan = getattr(self.proposer, "nan_seen", None)
        target_nan, drafter_nan = bool(self.nan_seen[0]), bool(nan) if nan is not None else False
        if target_nan or drafter_nan:
            which = "target" if target_nan else "drafter"
            what = "NaN" if drafter_nan and not target_nan else "NaN, +inf or no finite logit"
            raise FloatingPointError(f"{what} in the {which} logits (torch.multinomial would raise here); "
                                     "generated tokens would not be trustworthy")

    def summary(self) -> SpecStats:
        s = {k: int(v) for k, v in self.stats.items()}
        rows = max(s["row_steps"], 1)
        return SpecStats(
            mean_accepted_length=1.0 + s["accepted"] / rows,
            acceptance_rate=s["accepted"] / (max(self.N, 1) * rows),
            num_verify_steps=self.num_steps,
            mean_active_size=s["active"] / rows,
            coverage=s["covered"] / max(s["committed"], 1),
            tokens_per_step=s["committed"] / rows,
            num_row_steps=s["row_steps"],
            num_committed=s["committed"],
            accepted_histogram=self.histogram.tolist(),
        )


def _pick(x: Tensor, idx: Tensor) -> Tensor:
    """x [B, T, N], idx [B] -> x[b, idx[b]] as [B, N]."""
    return x.gather(1, idx.view(-1, 1, 1).expand(-1, 1, x.shape[-1])).squeeze(1)


class _DoneWatcher:
    """Decides when to stop the loop. On CUDA it reads the done flag one step late, through pinned memory,
    so the host never waits for the step it just queued; elsewhere (or when `eager`) it reads it directly."""

    def __init__(self, device: torch.device, eager: bool = False):
        self.cuda = device.type == "cuda" and not eager
        if self.cuda:
            self.flags = torch.zeros(2, dtype=torch.bool, pin_memory=True)
            self.events = [torch.cuda.Event(), torch.cuda.Event()]
            self.i = 0

    def all_done(self, done: Tensor) -> bool:
        if not self.cuda:
            return bool(done.all())
        slot = self.i % 2
        self.flags[slot].copy_(done.all(), non_blocking=True)
        self.events[slot].record()
        self.i += 1
        if self.i < 2:
            return False
        prev = 1 - slot
        self.events[prev].synchronize()
        return bool(self.flags[prev])
