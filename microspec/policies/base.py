"""The `VocabPolicy` contract: who decides which vocabulary rows the drafter may score.

A policy owns a fixed-capacity *active set* per batch row (or one set shared by all rows) and exposes it as
two device tensors that keep their storage for the whole generation:

    active_ids  int64 [R, C]   slot -> token id; valid slots are the prefix [0, n_active[r]), the rest hold -1
    n_active    int64 [R]      how many slots of each row are valid (0 <= n_active <= C)

R is the batch size, or 1 when `shared` is True (one set for every row). C is `capacity`.

Invariants every policy keeps (checked by `microspec.testing.PolicyContract`):
  * the valid ids of a row are unique and in [0, vocab_size); every special id (EOS) is present;
  * padding slots hold -1, so a bug that reads one fails loudly instead of drafting token 0;
  * a slot that keeps its id keeps its position (slot-stable order, not sorted): the sparse head gathers
    only the rows whose slot changed, so re-sorting would force a full re-gather every step;
  * the set changes only in `on_prefill` / `on_step` (= `on_block` then `on_commit`), never while a block is
    being drafted;
  * `on_commit` sees committed tokens only (never rejected drafts);
  * hook inputs are trusted: every id where the mask is True, and every top-k id, is in [0, vocab_size)
    (the decoder masks target-only ids of a larger target vocabulary before calling a hook);
  * the per-step hooks allocate nothing, never synchronise with the host and never change a shape, so
    they can run inside a CUDA graph and under `torch.compile(fullgraph=True)`.

Lifecycle, driven by `SpecDecoder`:

    policy.setup(batch_size, vocab_size, special_ids, device)   # host side: (re)allocate + reset
    policy.on_prefill(prompt_ids, prompt_mask, target_topk)      # once per request
    loop:
        ids, n = policy.active()                                  # the set for this draft block
        ... draft K tokens over `ids`, verify with the target ...
        policy.on_step(committed_ids, committed_mask, target_topk, hidden, block_ids=..., ...)
                                      # by default `on_block` (when `wants_block`), then `on_commit`
"""
from __future__ import annotations

import abc

import torch
from torch import Tensor

from ..inputs import as_token_ids, check_int


class VocabPolicy(abc.ABC):
    """Base class of all vocabulary policies. Subclasses implement `_reset` and usually the two hooks.

    Class attributes a subclass may override:
        shared:       True when one set serves every batch row (static policies): R = 1.
        target_topk:  how many of the target's top ids per position the hooks want (0: none, saves a top-k).
        wants_block:  True to receive `on_block` every step: the whole verification block (every drafted node,
                      accepted or not, and the target's top-k at every block position), as MicroSpec's tree
                      construction admits them.
        wants_hidden: True to receive `hidden`, the target's final hidden state (the input of its LM head)
                      at the newest position whose input token is committed, float [B, D_target]: a
                      summary of the context for learned policies (ClusterPolicy). It is one token stale
                      after a rejection (the corrected token has not been through the target yet).
    """

    shared: bool = False
    target_topk: int = 0
    wants_hidden: bool = False
    wants_block: bool = False

    def __init__(self, capacity: int):
        self.capacity = check_int("capacity", capacity, minimum=1)
        self.batch_size = 0
        self.vocab_size = 0
        self.device: torch.device | None = None
        self.special_ids: Tensor | None = None
        self.active_ids: Tensor | None = None
        self.n_active: Tensor | None = None

    # ------------------------------------------------------------------ host side (not captured)
    def setup(self, batch_size: int, vocab_size: int, special_ids, device) -> None:
        """Prepare the buffers for a new request batch and reset the set.

        Buffers are reallocated only when the batch size, vocabulary or device change, so repeated
        `generate` calls keep the same storage (CUDA-graph friendly). `special_ids` (EOS, ...) are always in
        the set; they must fit: len(special_ids) <= capacity.
        """
        batch_size = check_int("batch_size", batch_size, minimum=1)
        vocab_size = check_int("vocab_size", vocab_size, minimum=1)
        try:
            device = torch.device(device)
        except (RuntimeError, TypeError) as err:
            raise ValueError(f"device {device!r} is not a torch device ({err})") from None
        special = special_ids if isinstance(special_ids, Tensor) else list(special_ids)
        special = as_token_ids(special, "special ids", allow_empty=True).unique()
        if special.numel() and special.max() >= vocab_size:
            raise ValueError(f"special ids {special.tolist()} out of range for vocab_size={vocab_size}")
        if self.target_topk > vocab_size:
            raise ValueError(f"{type(self).__name__} asks for the target's top-{self.target_topk} ids, but "
                             f"the vocabulary has only {vocab_size}")
        if special.numel() > self.capacity:
            raise ValueError(
                f"capacity={self.capacity} cannot hold the {special.numel()} special ids {special.tolist()}")
        rows = 1 if self.shared else batch_size
        if (self.active_ids is None or self.active_ids.shape[0] != rows or self.vocab_size != vocab_size
                or self.device != device):
            self.active_ids = torch.full((rows, self.capacity), -1, dtype=torch.long, device=device)
            self.n_active = torch.zeros(rows, dtype=torch.long, device=device)
            self._allocate(rows, vocab_size, device)
        self.batch_size, self.vocab_size, self.device = batch_size, vocab_size, device
        self.special_ids = special.to(device)
        self._reset()

    def _allocate(self, rows: int, vocab_size: int, device: torch.device) -> None:
        """Allocate any extra state buffers (called only when the shapes change)."""

    @abc.abstractmethod
    def _reset(self) -> None:
        """Write the initial set (at least the special ids) into `active_ids` / `n_active`, in place."""

    # ------------------------------------------------------------------ device side (capturable)
    def active(self) -> tuple[Tensor, Tensor]:
        """The current set: (active_ids int64 [R, C], n_active int64 [R]). Same storage every call."""
        return self.active_ids, self.n_active

    def on_prefill(self, prompt_ids: Tensor, prompt_mask: Tensor, target_topk: Tensor | None = None,
                   hidden: Tensor | None = None) -> None:
        """Observe the prompts.

        prompt_ids   int64 [B, L]; prompt_mask bool [B, L] marks real tokens (padding is False);
        target_topk  int64 [B, L, k] the target's top-k next-token ids at each prompt position, when
                     `target_topk` > 0, else None;
        hidden       float [B, D] the target's final hidden state at each row's last prompt token, when
                     `wants_hidden`, else None.
        """

    def on_commit(self, committed_ids: Tensor, committed_mask: Tensor, target_topk: Tensor | None = None,
                  hidden: Tensor | None = None) -> None:
        """Observe the tokens committed by one verification step.

        committed_ids  int64 [B, M] (M = K + 1); committed_mask bool [B, M] marks real commits (False for
        tokens past the accepted prefix, past EOS, or in finished rows); target_topk int64 [B, M, k]: the
        target's top-k ids at the positions whose context is fully committed, aligned with committed_ids;
        hidden float [B, D]: see `wants_hidden` (rows that committed nothing repeat an older state).
        """

    def on_step(self, committed_ids: Tensor, committed_mask: Tensor, target_topk: Tensor | None = None,
                hidden: Tensor | None = None, *, block_ids: Tensor | None = None,
                block_mask: Tensor | None = None, block_topk: Tensor | None = None) -> None:
        """One verification step's update, the hook the decoder calls: `on_block` (when `wants_block`; the
        block_* arguments are its inputs, None otherwise), then `on_commit` (the other arguments).

        A policy that takes the block may override this to do both in one pass: the committed tokens are
        the accepted path's nodes plus one target token, and their `target_topk` rows are rows of
        `block_topk` (`InContextPolicy` admits all of them in one insertion instead of two).
        """
        if self.wants_block:
            self.on_block(block_ids, block_mask, block_topk)
        self.on_commit(committed_ids, committed_mask, target_topk, hidden)

    def on_block(self, block_ids: Tensor, block_mask: Tensor, target_topk: Tensor | None = None) -> None:
        """Observe one verification block, before `on_commit` (only when `wants_block`).

        block_ids int64 [B, N+1]: the row's last committed token, then the N drafted nodes (a chain or a
        tree); block_mask bool [B, N+1]: real entries (valid nodes of unfinished rows, ids in the vocabulary);
        target_topk int64 [B, N+1, k]: the target's top-k at every block position (None when k = 0). Drafted
        ids here may be rejected: a policy that admits them chooses to (it cannot change the output).
        """

    # ------------------------------------------------------------------ helpers for subclasses
    def _write_prefix(self, ids: Tensor) -> None:
        """Fill every row with the same id list `ids` [n] (n <= C) and -1 padding, in place."""
        n = ids.numel()
        self.active_ids.fill_(-1)
        self.active_ids[:, :n] = ids
        self.n_active.fill_(n)

    def extra_repr(self) -> str:
        return f"capacity={self.capacity}"

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.extra_repr()})"
