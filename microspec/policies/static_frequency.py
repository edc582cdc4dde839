"""`StaticFrequencyPolicy` (FR-Spec, VocabTrim, EAGLE-3's d2t): one fixed list of the most frequent ids.

The list is chosen once, on the host, from token counts or from a token-map file in the formats peers use
(see `microspec.policies.token_maps`). EOS and the other special ids are forced in (FR-Spec and vLLM do the
same), replacing the least frequent ids when the list is full. The active ids are stored sorted.
"""
from __future__ import annotations

import os

import torch

from ..inputs import as_token_ids, check_int, unique_stable
from .base import VocabPolicy
from .token_maps import load_token_map, ranked_ids_from_counts


class StaticFrequencyPolicy(VocabPolicy):
    """Top-`capacity` ids of a frequency ranking, shared by every batch row.

    Args:
        ranked_ids: token ids, most frequent first (ints [n], never floats); duplicates keep their first rank.
        capacity:   how many ids to keep (default: all of `ranked_ids`, plus the special ids).

    Example:
        >>> policy = StaticFrequencyPolicy.from_counts(torch.tensor([5, 0, 9, 1]), capacity=2)
        >>> policy.setup(batch_size=1, vocab_size=4, special_ids=[3], device="cpu")
        >>> policy.active()[0].tolist()    # id 2 (count 9) and EOS 3, sorted
        [[2, 3]]
    """

    shared = True

    def __init__(self, ranked_ids, capacity: int | None = None):
        # Keep the first occurrence of each id (its best rank).
        self.ranked_ids = unique_stable(as_token_ids(ranked_ids, "StaticFrequencyPolicy ranked_ids"))
        if capacity is not None:
            check_int("capacity", capacity, minimum=1)
        super().__init__(capacity if capacity is not None else self.ranked_ids.numel())

    @classmethod
    def from_counts(cls, counts, capacity: int) -> "StaticFrequencyPolicy":
        """From per-id counts (float or int [V], finite and >= 0); ids with a zero count are never chosen."""
        if not isinstance(counts, (torch.Tensor, list, tuple)):
            raise TypeError(f"counts must be a tensor or list of numbers [V], got {type(counts).__name__}")
        return cls(ranked_ids_from_counts(torch.as_tensor(counts)), capacity)

    @classmethod
    def from_file(cls, path: str | os.PathLike, capacity: int | None = None) -> "StaticFrequencyPolicy":
        """From a token map: FR-Spec/SGLang `.pt` id list, JSON list, plain-text ids, or safetensors
        (`token_ids` ranked list or `counts` [V]). See `microspec.policies.token_maps.load_token_map`."""
        return cls(load_token_map(path), capacity)

    def _allocate(self, rows, vocab_size, device) -> None:
        top = int(self.ranked_ids.max())
        if top >= vocab_size:
            raise ValueError(
                f"token map has id {top} >= vocab_size {vocab_size}: wrong tokenizer or model for this map?")

    def _reset(self) -> None:
        special = self.special_ids.cpu()
        others = self.ranked_ids[~torch.isin(self.ranked_ids, special)]
        keep = torch.cat([special, others[: self.capacity - special.numel()]])
        self._write_prefix(keep.sort().values.to(self.device))

    def extra_repr(self) -> str:
        return f"capacity={self.capacity}, ranked={self.ranked_ids.numel()}"

