"""The state machine of one `SpecDecoder.generate` call: prefill, then decode steps until every row is done.

One decode step (`step`), for all rows at once, with static shapes and no host sync:

    ids, n_act = policy.active()       the set for this block (fixed while drafting)
    head.refresh()                     delta-gather the new rows (optionally on a side CUDA stream)
    draft K tokens over `ids`          the drafter first re-reads [previous, last] committed tokens, so its
                                       cache is right whether or not the last block's final draft survived
    verify [last, d1..dK]              the target scores K+1 positions over its full vocabulary
    commit                             accepted prefix + corrected/bonus token, cut at EOS and at the budget
    policy.on_commit(...)              committed tokens, the target's top-k at committed positions, and
                                       (if wanted) the target's hidden state at the newest committed input

Per-row state: `tokens` [B, S] (prompt and generated tokens compacted to the left: position = slot),
`n` [B] committed length, `generated` [B], `done` [B]; S = longest prompt + max_new_tokens + K + 1.
Every state tensor is updated in place and RNG lives in noise buffers refilled before each step
(`_draw_noise`), so on CUDA the whole step is captured once in a CUDA graph and replayed.
"""
from __future__ import annotations

import torch
from torch import Tensor

from .outputs import GenerateOutput, SpecStats
from .drafting.base import Verdict
from .sampling import SamplingConfig, draft_sample, exponential_race, process_logits, safe_softmax
from .verification import verify_greedy, verify_sampling


class DecodeRun:
    def __init__(self, dec, input_ids: Tensor, mask: Tensor, max_new: int, cfg: SamplingConfig,
                 eos: list[int], generator, cuda_graph: bool = False):
        self.dec, self.policy, self.head = dec, dec.policy, dec.head
        self.cfg, self.max_new, self.generator = cfg, max_new, generator
        B, L = input_ids.shape
        K, dev = dec.K, input_ids.device
        self.B, self.L, self.K, self.device = B, L, K, dev
        self.S = L + max_new + K + 1
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
        self.eos = torch.tensor(eos, dtype=torch.long, device=dev)
        self.steps_k = torch.arange(K + 1, device=dev)
        self.nan_seen = torch.zeros(2, dtype=torch.bool, device=dev)                     # [target, drafter]
        self.stats = {name: torch.zeros((), dtype=torch.long, device=dev)
                      for name in ("row_steps", "accepted", "committed", "covered", "active")}
        self.histogram = torch.zeros(K + 1, dtype=torch.long, device=dev)
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
        self.draft_noise = torch.empty(self.B, self.K, C, **f64)
        self.next_noise = torch.empty(self.B, self.dec.target_vocab_size, **f64)
        self.uniforms = torch.empty(self.B, self.K, **f64)

    def _draw_noise(self) -> None:
        if self.cfg.do_sample:
            self._fill_exponential(self.draft_noise)
            self._fill_uniform(self.uniforms)
            self._fill_exponential(self.next_noise)

    # ------------------------------------------------------------------ prefill
    def _prefill(self) -> tuple[Tensor, Tensor | None, Tensor | None]:
        """Run both models over the prompts in chunks. Returns the target's logits at each row's last
        prompt position [B, V], its top-k ids at every position [B, L, k] (if the policy wants them) and its
        final hidden state at the last prompt position [B, D] (if the policy wants it)."""
        B, L, dev = self.B, self.L, self.device
        k = self.policy.target_topk
        topk = torch.zeros(B, L, k, dtype=torch.long, device=dev) if k else None
        last_pos = self.lengths - 1
        last = hidden = None
        for c0 in range(0, L, self.dec.prefill_chunk):
            c1 = min(L, c0 + self.dec.prefill_chunk)
            chunk = self.tokens[:, c0:c1]
            pos = torch.arange(c0, c1, device=dev).expand(B, -1)
            logits = self.dec.target(chunk, pos)                                         # [B, T, V]
            self.nan_seen[0] |= torch.isnan(logits).any()
            if k:  # over the shared vocabulary only: the policy cannot hold target-only ids
                topk[:, c0:c1] = torch.topk(logits[..., : self.dec.vocab_size], k, dim=-1).indices
            here = (last_pos >= c0) & (last_pos < c1)
            idx = (last_pos - c0).clamp(0, c1 - c0 - 1)
            cand = _pick(logits, idx)
            last = cand if last is None else torch.where(here.unsqueeze(1), cand, last)
            if self.policy.wants_hidden:
                cand = _pick(self.dec.target.hidden, idx)
                hidden = cand if hidden is None else torch.where(here.unsqueeze(1), cand, hidden)
            self.dec.drafter(chunk, pos, last_only=True)                                 # fills its cache
        return last, topk, hidden

    def _first_token(self, logits: Tensor) -> Tensor:
        if not self.cfg.do_sample:
            return torch.argmax(logits, dim=-1)
        probs = safe_softmax(process_logits(logits, self.cfg))[0]
        noise = self._fill_exponential(torch.empty(probs.shape, dtype=torch.float64, device=self.device))
        return exponential_race(probs, noise)

    # ------------------------------------------------------------------ one decode step (capturable)
    def _draft_logits(self, tokens: Tensor, positions: Tensor, n_act: Tensor) -> Tensor:
        logits = self.dec.drafter.decode(tokens, positions, last_only=True)[:, -1]      # [B, C]
        self.nan_seen[1] |= torch.isnan(logits).any()
        # Re-mask padding: model-side logit transforms (soft-capping) must not revive it.
        pad = torch.arange(logits.shape[-1], device=logits.device) >= n_act.unsqueeze(-1)
        return logits.masked_fill(pad, float("-inf"))

    def _draft(self, ids: Tensor, n_act: Tensor):
        """K drafts per row: tokens [B, K], valid [B, K], q over slots [B, K, C], slots [B, K]."""
        n, cfg = self.n, self.cfg
        ctx = torch.stack([n - 2, n - 1], dim=1)                                         # [B, 2]
        logits = self._draft_logits(self.tokens.gather(1, ctx), ctx, n_act)
        drafts, slots, has_mass, q_rows = [], [], [], []
        for i in range(self.K):
            slot, q, ok = draft_sample(logits, cfg, self.draft_noise[:, i] if cfg.do_sample else None)
            token = self.head.token_ids(slot.unsqueeze(1)).squeeze(1).clamp(min=0)
            drafts.append(token), slots.append(slot), has_mass.append(ok), q_rows.append(q)
            if i + 1 < self.K:
                logits = self._draft_logits(token.unsqueeze(1), (n + i).unsqueeze(1), n_act)
        valid = torch.stack(has_mass, 1).long().cumprod(1).bool()                       # stop at a dry row
        return torch.stack(drafts, 1), valid, torch.stack(q_rows, 1), torch.stack(slots, 1)

    def _verify(self, draft, valid, q_rows, slots, ids, t_logits) -> Verdict:
        if self.cfg.do_sample:
            return verify_sampling(draft, valid, q_rows, slots, ids, t_logits, self.cfg, self.uniforms,
                                   self.next_noise)
        return verify_greedy(draft, valid, t_logits)

    def step(self) -> None:
        K, n = self.K, self.n
        ids, n_act = self.policy.active()                                                # [R, C], [R]
        self.head.refresh()
        draft, valid, q_rows, slots = self._draft(ids, n_act)
        last = self.tokens.gather(1, (n - 1).unsqueeze(1))
        positions = (n - 1).unsqueeze(1) + self.steps_k                                  # [B, K+1]
        t_logits = self.dec.target.decode(torch.cat([last, draft], 1), positions)       # [B, K+1, V]
        self.nan_seen[0] |= torch.isnan(t_logits).any()
        verdict = self._verify(draft, valid, q_rows, slots, ids, t_logits)
        # --- commit: cut at the first EOS and at the token budget; finished rows commit nothing
        live = ~self.done
        n_commit = verdict.n_accepted + 1
        is_eos = torch.isin(verdict.tokens, self.eos) & (self.steps_k < n_commit.unsqueeze(1))
        first_eos = torch.where(is_eos.any(1), is_eos.long().argmax(1), K + 1)
        n_commit = torch.minimum(torch.minimum(n_commit, first_eos + 1), self.max_new - self.generated) * live
        commit_mask = self.steps_k < n_commit.unsqueeze(1)                               # [B, K+1]
        self.tokens.scatter_(1, n.unsqueeze(1) + self.steps_k, verdict.tokens)
        # Account before the policy update: `ids` / `n_act` are the policy's live buffers.
        self._account(verdict.n_accepted, verdict.tokens, commit_mask, n_commit, live, ids, n_act)
        k = self.policy.target_topk
        topk = torch.topk(t_logits[..., : self.dec.vocab_size], k, dim=-1).indices if k else None
        hidden = None
        if self.policy.wants_hidden:  # newest position whose input is committed: index n_commit - 1
            hidden = _pick(self.dec.target.hidden, (n_commit - 1).clamp(min=0))
        self.policy.on_commit(verdict.tokens, commit_mask & (verdict.tokens < self.dec.vocab_size), topk,
                              hidden=hidden)
        self.done |= (is_eos & commit_mask).any(1) | (self.generated + n_commit >= self.max_new)
        self.n.add_(n_commit)
        self.generated.add_(n_commit)

    def _account(self, n_acc, tokens, commit_mask, n_commit, live, ids, n_act) -> None:
        ids_b = ids.expand(self.B, -1)
        in_set = (tokens.unsqueeze(-1) == ids_b.unsqueeze(1)).any(-1)                    # [B, K+1]
        s = self.stats
        s["row_steps"] += live.sum()
        s["accepted"] += (n_acc * live).sum()
        s["committed"] += n_commit.sum()
        s["covered"] += (in_set & commit_mask).sum()
        s["active"] += (n_act.expand(self.B) * live).sum()
        self.histogram.scatter_add_(0, n_acc, live.long())

    # ------------------------------------------------------------------ driver (host side)
    def start(self) -> None:
        """Host-side set-up and prefill: caches, policy, head binding, noise buffers, the first token."""
        dec, policy = self.dec, self.policy
        dec.target.allocate(self.B, self.S)
        dec.drafter.allocate(self.B, self.S)
        dec.target.capture_hidden(policy.wants_hidden)
        eos_in_vocab = [e for e in self.eos.tolist() if e < dec.vocab_size]
        policy.setup(self.B, dec.vocab_size, eos_in_vocab, self.device)
        self.head.bind(*policy.active())
        self._allocate_noise()
        last_logits, topk, hidden = self._prefill()
        prompt = self.tokens[:, : self.L]
        policy.on_prefill(prompt, self.prompt_mask & (prompt < dec.vocab_size), topk, hidden=hidden)
        first = self._first_token(last_logits)
        self.tokens.scatter_(1, self.n.unsqueeze(1), first.unsqueeze(1))
        self.n.add_(1)
        self.generated.add_(1)
        self.done |= torch.isin(first, self.eos) | (self.max_new <= 1)
        policy.on_commit(first.unsqueeze(1), (first < dec.vocab_size).unsqueeze(1), hidden=hidden)

    def _capture(self) -> None:
        """Run one real step on a side stream (warm-up, as CUDA graphs require), then capture the next."""
        side = torch.cuda.Stream(self.device)
        side.wait_stream(torch.cuda.current_stream(self.device))
        with torch.cuda.stream(side):
            self._draw_noise()
            self.step()
            self.num_steps += 1
        torch.cuda.current_stream(self.device).wait_stream(side)
        self.graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(self.graph):
            self.step()

    def run_steps(self, watcher: "_DoneWatcher | None" = None) -> None:
        """Decode until every row is done (each live row commits >= 1 token per step)."""
        watcher = watcher or _DoneWatcher(self.device)
        while self.num_steps < self.max_new - 1 and not watcher.all_done(self.done):
            if self.cuda_graph and self.graph is None:
                self._capture()
                continue
            self._draw_noise()
            if self.graph is not None:
                self.graph.replay()
            else:
                self.step()
            self.num_steps += 1

    def execute(self, original_ids: Tensor, pad: int) -> GenerateOutput:
        self.start()
        self.run_steps()
        return GenerateOutput(self._sequences(original_ids, pad), self._stats())

    def _sequences(self, original_ids: Tensor, pad: int) -> Tensor:
        self._raise_on_nan()
        G = int(self.generated.max())
        span = torch.arange(G, device=self.device)
        new = self.tokens.gather(1, self.lengths.unsqueeze(1) + span)
        new = new.masked_fill(span >= self.generated.unsqueeze(1), pad)
        return torch.cat([original_ids.to(self.device), new], dim=1)

    def _raise_on_nan(self) -> None:
        target_nan, drafter_nan = self.nan_seen.tolist()
        if target_nan or drafter_nan:
            which = "target" if target_nan else "drafter"
            raise FloatingPointError(f"NaN in the {which} logits; generated tokens would not be trustworthy")

    def _stats(self) -> SpecStats:
        s = {k: int(v) for k, v in self.stats.items()}
        rows = max(s["row_steps"], 1)
        return SpecStats(
            mean_accepted_length=1.0 + s["accepted"] / rows,
            acceptance_rate=s["accepted"] / (self.K * rows),
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
    so the host never waits for the step it just queued; elsewhere it reads the flag directly."""

    def __init__(self, device: torch.device):
        self.cuda = device.type == "cuda"
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
