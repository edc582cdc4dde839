"""What `SpecDecoder.generate` returns."""
from __future__ import annotations

from dataclasses import dataclass, field

from torch import Tensor


@dataclass
class SpecStats:
    """What one `generate` call measured (row-steps = verification steps of unfinished rows).

    mean_accepted_length: 1 + accepted drafts per row-step (the usual tau; K + 1 when every draft passes)
    acceptance_rate:      accepted drafts / drafted tokens
    num_verify_steps:     decode steps of the batch loop
    mean_active_size:     mean active-set size over row-steps
    coverage:             share of tokens committed by verification that were in the active set used to
                          draft them (1.0 for FullVocab)
    tokens_per_step:      committed tokens per row-step (lower than tau where EOS or the budget cut a block)
    accepted_histogram:   row-steps with 0, 1, ..., K accepted drafts
    """

    mean_accepted_length: float
    acceptance_rate: float
    num_verify_steps: int
    mean_active_size: float
    coverage: float
    tokens_per_step: float
    num_row_steps: int
    num_committed: int
    accepted_histogram: list[int] = field(default_factory=list)


@dataclass
class GenerateOutput:
    """sequences: int64 [B, prompt_len + new] (Hugging Face convention: the prompt, left padding included,
    then the new tokens; rows that stopped early are padded with pad_token_id). stats: `SpecStats`."""

    sequences: Tensor
    stats: SpecStats
