"""Prompts -> model inputs: one user turn through the chat template, then left padding into a batch.

Shared by `microspec demo`/`generate`/`eval` and the GPU scripts, so every number is measured on the same
token ids for the same text.
"""
from __future__ import annotations

import torch
from torch import Tensor


def chat_rows(tokenizer, texts: list[str]) -> list[list[int]]:
    """One user turn each, through the tokenizer's chat template when it has one (no extra special tokens:
    the template already holds them)."""
    rows = []
    for text in texts:
        if getattr(tokenizer, "chat_template", None):
            text = tokenizer.apply_chat_template([{"role": "user", "content": text}],
                                                 add_generation_prompt=True, tokenize=False)
        rows.append(tokenizer.encode(text, add_special_tokens=False))
    return rows


def left_pad(rows: list[list[int]], pad: int = 0, device=None) -> tuple[Tensor, Tensor]:
    """Token lists -> ids int64 [B, L], mask int64 [B, L] (left padding, the Hugging Face convention)."""
    if not rows or any(len(r) == 0 for r in rows):
        raise ValueError("left_pad needs at least one row and no empty row")
    L = max(map(len, rows))
    ids = torch.full((len(rows), L), pad, dtype=torch.long)
    mask = torch.zeros(len(rows), L, dtype=torch.long)
    for i, row in enumerate(rows):
        ids[i, L - len(row):] = torch.tensor(row, dtype=torch.long)
        mask[i, L - len(row):] = 1
    return ids.to(device), mask.to(device)


def encode_chat(tokenizer, texts: list[str], pad: int = 0, device=None) -> tuple[Tensor, Tensor]:
    """`chat_rows` then `left_pad`."""
    return left_pad(chat_rows(tokenizer, texts), pad, device)
