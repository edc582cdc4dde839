"""Data that ships with the package (see README.md in this folder for provenance, licence and the command).

    demo_corpus.jsonl.gz   255 prompts written for microspec with SmolLM2-135M-Instruct's greedy answers

`demo_ranking(tokenizer)` counts the answers' token ids with any Hugging Face tokenizer: the frequency list
of the demo's static policy and the core of its in-context policy, with no `../shared` data and no download.

    >>> ranking = demo_ranking(tokenizer)       # int64 [n], most frequent first   # doctest: +SKIP
"""
from __future__ import annotations

import gzip
import json
from importlib import resources

import torch
from torch import Tensor

DEMO_CORPUS = "demo_corpus.jsonl.gz"


def demo_texts() -> list[str]:
    """The shipped answers (responses only: the text a drafter has to predict)."""
    data = resources.files(__name__).joinpath(DEMO_CORPUS).read_bytes()
    return [json.loads(line)["response"] for line in gzip.decompress(data).decode().splitlines() if line]


def demo_ranking(tokenizer, vocab_size: int | None = None) -> Tensor:
    """Token ids of the shipped answers ranked by count (ties: lower id first) -> int64 [n].

    Encoded without special tokens, like every frequency table in microspec; ids >= `vocab_size` (the
    model's head, when smaller than the tokenizer) are dropped. Takes well under a second."""
    from ..policies.token_maps import ranked_ids_from_counts
    rows = tokenizer(demo_texts(), add_special_tokens=False)["input_ids"]
    ids = torch.tensor([i for row in rows for i in row], dtype=torch.long)
    ranking = ranked_ids_from_counts(torch.bincount(ids, minlength=int(ids.max()) + 1))
    return ranking if vocab_size is None else ranking[ranking < vocab_size]
