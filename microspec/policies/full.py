"""`FullVocab`: the whole vocabulary, i.e. an ordinary dense drafter head. The baseline every policy is
measured against (accepted length as a fraction of full-vocabulary drafting)."""
from __future__ import annotations

import torch

from .base import VocabPolicy


class FullVocab(VocabPolicy):
    """Every id in [0, vocab_size). Its capacity is the vocabulary size, known only at `setup`.

    `SparseLMHead` recognises it and scores the drafter's own weight directly (no repack buffer).
    """

    shared = True

    def __init__(self):
        super().__init__(capacity=1)  # replaced by the vocabulary size in setup()

    def setup(self, batch_size, vocab_size, special_ids, device) -> None:
        if self.capacity != vocab_size:
            self.capacity, self.active_ids = vocab_size, None  # force reallocation at the new size
        super().setup(batch_size, vocab_size, special_ids, device)

    def _reset(self) -> None:
        self._write_prefix(torch.arange(self.vocab_size, device=self.device))

    def extra_repr(self) -> str:
        return f"vocab_size={self.vocab_size or '?'}"
