"""`EagleProposer`: chain drafting with an `EagleDrafter`, behind the `Proposer` protocol.

Drafter slot p holds the pair (f_p, x_{p+1}): the target's feature at position p and the token after it;
its output g_p regresses f_{p+1}, whose head logits guess x_{p+2}. With n committed tokens the real pairs are
p = 0 .. n-2 (the newest token x_{n-1} has not been through the target yet, so f_{n-1} is unknown), and
g_{n-2} stands in for it. One step:

    observe(commit)  stores the pairs this step made real: committed token i (position n_before + i) and
                     the target feature that predicted it (target_hidden at block index path[:, i]), i.e.
                     pair slot n_before - 1 + i, for i < n_commit (<= M = K + 1 per row).
    propose(req)     1. catch-up: runs the layer over those M pairs (static shape; the ones past n_commit are
                        padding written to slots no real query can see yet, and later writes overwrite them);
                     2. g = the output at the last real pair (slot n - 2): d_1 = head(g);
                     3. chain: slot n - 2 + i gets (g, d_i) and gives the next g (EAGLE's feature loop), for
                        i = 1 .. K-1. The chain's writes sit past the real pairs: the next catch-up rewrites
                        the ones that got committed with the target's true features.

Everything in `observe` / `propose` is static-shaped and sync-free (capturable in a CUDA graph). `prefill`
(host-driven) pairs each prompt feature with the next prompt token, carrying the last feature of a chunk
over to the next chunk. The pair of each row's last prompt position needs the first generated token: it is
made by the first `observe`, whose Commit should carry target_hidden [B, 1, D] = the target's hidden state at
each row's last prompt position (path 0); without it the proposer reads that feature from its prefill copy.

Tree drafting (EAGLE-2, `tree=TreeSpec(...)`): after the catch-up, g's head log-probs give the root's top_k
children; each expansion runs the frontier (k nodes, each fed its parent's output g) as one [B, k] call at
drafter position n - 2 + d, written after the earlier frontiers in the tree region that starts at slot n - 1,
with the builder's ancestor mask (`microspec.models.base`: tree calls); `TreeBuilder` keeps the scores and
re-ranks. The next catch-up overwrites the region's slots with real pairs.
"""
from __future__ import annotations

import torch
from torch import Tensor

from ..compiling import compiled
from ..sampling import draft_sample
from ..sparse_head import SparseLMHead
from .base import Commit, DraftRequest, Drafts
from .eagle import EagleDrafter
from .model_drafter import chain_drafts
from .tree import TreeBuilder, TreeSpec


class EagleProposer:
    """K-token chain drafts from an `EagleDrafter` run through a model backend.

    Args:
        drafter:  the `EagleDrafter` (its `fc`, embedding and layer).
        backend:  a `microspec.models.base.ModelBackend` over `drafter.as_causal_lm()` (it owns the drafter's
                  KV cache; `forward(..., embeds=)` runs the layer on fused inputs).
        num_speculative_tokens: K.
        head:     the `SparseLMHead` to draft through (`SpecDecoder` passes one over the target's head);
                  default: a new one over `drafter.head_weight` with `head_mode` / `async_gather`.

    Attributes: head (a `SparseLMHead` over the target's head weight, built here unless given; the engine
    binds it to the policy's set), wants_target_hidden = True, num_nodes = K, nan_seen bool [] (a NaN
    reached the draft logits).
    """

    wants_target_hidden = True

    @property
    def draws_noise(self) -> bool:
        """Sampled chains draw each draft with the engine's noise; trees draft top-k deterministically."""
        return self.tree is None

    def __init__(self, drafter: EagleDrafter, backend, num_speculative_tokens: int,
                 head: SparseLMHead | None = None, head_mode: str = "repack", async_gather: bool = False,
                 tree: TreeSpec | None = None, compile: bool | str = False):
        if not isinstance(num_speculative_tokens, int) or num_speculative_tokens < 1:
            raise ValueError(f"num_speculative_tokens must be an int >= 1, got {num_speculative_tokens!r}")
        if tree is not None and not isinstance(tree, TreeSpec):
            raise TypeError(f"tree must be a microspec.drafting.tree.TreeSpec, got {type(tree).__name__}")
        self.drafter, self.backend, self.tree = drafter, backend, tree
        self.builder = TreeBuilder(tree, compile=compile) if tree is not None else None
        self._level_logp = compiled(_level_logp, compile if tree is not None else False)
        self.max_K = self.K = num_speculative_tokens
        self.head = head if head is not None else SparseLMHead(drafter.head_weight, mode=head_mode,
                                                               async_gather=async_gather)
        self.B = self.max_len = 0
        self.nan_seen = torch.zeros((), dtype=torch.bool, device=drafter.fc.weight.device)

    @property
    def num_nodes(self) -> int:
        return self.tree.num_nodes if self.tree is not None else self.K

    def plan(self, max_nodes: int) -> int:
        """Chains: draft min(K, max_nodes) tokens per step in this request. Trees keep their shape (the
        engine's budget cut bounds what they commit). Returns the nodes per step."""
        if self.tree is None:
            self.K = min(self.max_K, max_nodes)
        return self.num_nodes

    def _block(self) -> int:
        """Longest committed block: K + 1 for a chain, depth + 1 for a tree."""
        return self.K + 1 if self.tree is None else self.tree.depth + 1

    def _region(self) -> int:
        """Drafter slots past the committed ones that a step writes: the chain, or every tree frontier."""
        return self.K if self.tree is None else (self.tree.depth - 1) * self.tree.top_k + 1

    # ------------------------------------------------------------------ host side
    def allocate(self, batch_size: int, max_len: int) -> None:
        """Buffers for one request batch (the backend's cache too). Must precede `prefill`."""
        self.backend.allocate(batch_size, max_len + self._region())
        ref = self.drafter.fc.weight
        if (batch_size, max_len) != (self.B, self.max_len):
            self.B, self.max_len = batch_size, max_len
            self.prompt_feats = torch.zeros(batch_size, max_len, self.drafter.hidden_size, dtype=ref.dtype,
                                            device=ref.device)
        self._pairs(self._block())
        self.nan_seen.zero_()
        self._carry: Tensor | None = None

    def _pairs(self, M: int) -> None:
        ref = self.drafter.fc.weight
        B, dev = self.B, ref.device
        self.pair_tokens = torch.zeros(B, M, dtype=torch.long, device=dev)
        self.pair_feats = torch.zeros(B, M, self.drafter.hidden_size, dtype=ref.dtype, device=dev)
        self.pair_base = torch.zeros(B, dtype=torch.long, device=dev)     # slot of pair 0 (n_before - 1)
        self.n_pairs = torch.zeros(B, dtype=torch.long, device=dev)       # real pairs (n_commit)
        self.steps_m = torch.arange(M, device=dev)

    @torch.no_grad()
    def prefill(self, tokens: Tensor, positions: Tensor, target_hidden: Tensor | None) -> None:
        """One prompt chunk, in order: tokens / positions [B, T], target_hidden [B, T, D] at those positions.

        Writes the pairs (f_{p-1}, x_p) for every p of the chunk (p >= 1), the first one with the feature
        carried from the previous chunk."""
        if target_hidden is None:
            raise ValueError("EagleProposer needs the target's hidden states at prefill")
        feats = target_hidden.to(self.pair_feats.dtype)
        D = feats.shape[-1]
        self.prompt_feats.scatter_(1, positions.unsqueeze(-1).expand(-1, -1, D), feats)
        if self._carry is None:      # first chunk: position 0 has no feature before it
            tokens, prev, slots = tokens[:, 1:], feats[:, :-1], positions[:, 1:] - 1
        else:
            prev, slots = torch.cat([self._carry, feats[:, :-1]], 1), positions - 1
        self._carry = feats[:, -1:]
        if tokens.shape[1]:
            self.run_layer(tokens, prev, slots, eager=True)

    def snapshot(self) -> tuple:
        """The request state after a prefill: the backend's cache and the prompt features."""
        return self.backend.snapshot(), self.prompt_feats.clone()

    def restore(self, state: tuple) -> None:
        cache, feats = state
        self.backend.restore(cache)
        self.prompt_feats.copy_(feats)

    # ------------------------------------------------------------------ per step (capturable)
    @torch.no_grad()
    def observe(self, commit: Commit) -> None:
        """Store the pairs made real by this step's commit (see the module docstring)."""
        tokens = commit.tokens                                                          # [B, M]
        B, M = tokens.shape
        D = self.drafter.hidden_size
        if M > self.pair_tokens.shape[1]:        # host-side: only a block longer than K + 1 (never a chain)
            self._pairs(M)
        if commit.target_hidden is not None:
            hidden = commit.target_hidden                                               # [B, N+1, D]
            path = self.steps_m[:M].expand(B, M) if commit.path is None else commit.path
            path = path.clamp(0, hidden.shape[1] - 1)
            feats = hidden.gather(1, path.unsqueeze(-1).expand(B, M, D))
        else:
            if M != 1:
                raise ValueError("a Commit without target_hidden is only valid for the first token (M = 1)")
            last = (commit.n_before - 1).clamp(min=0).view(B, 1, 1)
            feats = self.prompt_feats.gather(1, last.expand(B, 1, D))
        # Columns >= M (the first commit has M = 1) keep stale pairs: padding, like those past n_commit.
        self.pair_tokens[:, :M].copy_(tokens)
        self.pair_feats[:, :M].copy_(feats)
        self.pair_base.copy_(commit.n_before - 1)
        self.n_pairs.copy_(commit.n_commit)

    @torch.no_grad()
    def propose(self, request: DraftRequest) -> Drafts:
        """Chain: K drafts per row over the bound active set: tokens [B, K], q over slots [B, K, C], slots
        [B, K] (`chain_drafts`: parents i, depth i + 1, valid until the first dry row). Tree: the
        `TreeBuilder`'s N = total_tokens - 1 nodes with their ancestor mask (top-k drafts, q None)."""
        h, first_slot = self._catch_up()
        if self.tree is not None:
            return self._tree(h, first_slot, request)
        return self._chain(h, first_slot, request)

    def _catch_up(self) -> tuple[Tensor, Tensor]:
        """Run the newly real pairs; returns g at the last one [B, 1, D] (~ f_{n-1}) and slot n - 1 [B]."""
        B, D = self.B, self.drafter.hidden_size
        positions = self.pair_base.unsqueeze(1) + self.steps_m                          # [B, M]
        h = self.run_layer(self.pair_tokens, self.pair_feats, positions)                # [B, M, D]
        last = (self.n_pairs - 1).clamp(min=0)
        h = h.gather(1, last.view(B, 1, 1).expand(B, 1, D))                             # [B, 1, D]
        return h, self.pair_base + last + 1

    def _tree(self, h: Tensor, first_slot: Tensor, request: DraftRequest) -> Drafts:
        """EAGLE-2's dynamic tree (see the module docstring)."""
        B, D, k = self.B, self.drafter.hidden_size, self.tree.top_k
        ids = request.active_ids
        logp = self._tree_logp(h, request.n_active)[:, 0]                               # [B, C]
        state = self.builder.root(logp, ids)
        parent_h = h.expand(B, k, D)                                                    # the root's g
        offsets = torch.arange(k, device=h.device)
        for d in range(1, self.tree.depth):
            feats = parent_h.gather(1, state.parent_row.unsqueeze(-1).expand(B, k, D))   # [B, k, D]
            pos = (first_slot + d - 1).unsqueeze(1).expand(B, k)
            slots = first_slot.unsqueeze(1) + (d - 1) * k + offsets
            out = self.run_layer(state.tokens, feats, pos, slots=slots, tree_mask=state.mask,
                                 tree_start=first_slot)                                 # [B, k, D]
            logp = self._tree_logp(out, request.n_active)                              # [B, k, C]
            state = self.builder.expand(state, logp)
            parent_h = out
        return self.builder.finish(state)

    def _chain(self, h: Tensor, first_slot: Tensor, request: DraftRequest) -> Drafts:
        cfg = request.cfg
        tokens, slots, q_rows, ok_rows = [], [], [], []
        for i in range(self.K):
            noise = request.noise[:, i] if cfg.do_sample else None
            slot, q, ok = draft_sample(self._logits(h, request.n_active)[:, 0], cfg, noise)
            token = self.head.token_ids(slot.unsqueeze(1)).squeeze(1).clamp(min=0)     # [B]
            tokens.append(token), slots.append(slot), q_rows.append(q), ok_rows.append(ok)
            if i + 1 < self.K:
                h = self.run_layer(token.unsqueeze(1), h, (first_slot + i).unsqueeze(1))
        return chain_drafts(torch.stack(tokens, 1), torch.stack(ok_rows, 1), torch.stack(q_rows, 1),
                            torch.stack(slots, 1))

    def run_layer(self, tokens: Tensor, features: Tensor, positions: Tensor, slots: Tensor | None = None,
                  tree_mask: Tensor | None = None, tree_start: Tensor | None = None,
                  eager: bool = False) -> Tensor:
        """The drafter's layer on pairs: tokens [B, W] (x_{p+1}), features [B, W, D] (f_p or a drafted g),
        at positions [B, W] (cache slots default to positions; tree calls pass slots and a tree mask, as the
        backend contract says; `eager` for prefill chunks). Returns g [B, W, D]."""
        embeds = self.drafter.fuse(tokens, features.to(self.drafter.fc.weight.dtype))
        return self.backend.forward(tokens, positions, slots=slots, tree_mask=tree_mask,
                                    tree_start=tree_start, embeds=embeds, eager=eager)

    def _tree_logp(self, h: Tensor, n_active: Tensor) -> Tensor:
        """[B, W, D] -> float32 log-probs over the bound set [B, W, C] (padding slots -inf)."""
        logp, nan = self._level_logp(self.backend.logits(h, head=self.head), n_active)
        self.nan_seen |= nan
        return logp

    def _logits(self, h: Tensor, n_active: Tensor) -> Tensor:
        """[B, W, D] -> [B, W, C] over the bound set; padding slots -inf (after any logit transform)."""
        logits = self.backend.logits(h, head=self.head)                                 # [B, W, C]
        self.nan_seen |= torch.isnan(logits).any()
        return logits.masked_fill(_padding(logits, n_active), float("-inf"))


def _padding(logits: Tensor, n_active: Tensor) -> Tensor:
    """bool [R, 1, C]: the slots of logits [B, W, C] past each row's n_active [R] (R = 1 or B)."""
    return torch.arange(logits.shape[-1], device=logits.device) >= n_active.view(-1, 1, 1)


def _level_logp(logits: Tensor, n_active: Tensor) -> tuple[Tensor, Tensor]:
    """logits [B, W, C] over slots, n_active [R] -> (float32 log_softmax with slots >= n_active at -inf,
    bool [] whether a NaN was seen): one tree level's masking, one fused kernel when compiled."""
    masked = logits.float().masked_fill(_padding(logits, n_active), float("-inf"))
    return torch.log_softmax(masked, dim=-1), torch.isnan(logits).any()
