"""Prompts -> model inputs: one user turn through the chat template, then left padding into a batch.

Shared by `microspec demo`/`generate`/`eval` and the GPU scripts, so every number is measured on the same
token ids for the same text.
"""
from __future__ import annotations

import torch
from torch import Tensor


PROMPT_FORMATS = ("auto", "chat", "plain", "raw")


def encode_prompt(tokenizer, text: str, fmt: str = "auto") -> list[int]:
    """One prompt -> token ids, the one place a prompt is formatted (demo, generate, eval, benchmarks, the
    drafter's training data, the lab's teacher-forced passes).

    "chat": one user turn through the chat template with the generation prompt (no extra special tokens:
    the template holds them); "plain": the text, a blank line, and the tokenizer's BOS (base models such as
    Gemma-3-270M); "raw": the text alone; "auto": chat when the tokenizer has a template, else plain.
    """
    if fmt not in PROMPT_FORMATS:
        raise ValueError(f"prompt format must be one of {', '.join(PROMPT_FORMATS)}, got {fmt!r}")
    has_template = bool(getattr(tokenizer, "chat_template", None))
    if fmt == "auto":
        fmt = "chat" if has_template else "plain"
    if fmt == "chat":
        if not has_template:
            raise ValueError("prompt format 'chat' needs a tokenizer with a chat template")
        text = tokenizer.apply_chat_template([{"role": "user", "content": text}], add_generation_prompt=True,
                                             tokenize=False)
        return tokenizer.encode(text, add_special_tokens=False)
    if fmt == "plain":
        return tokenizer.encode(text.rstrip() + "\n\n", add_special_tokens=True)
    return tokenizer.encode(text, add_special_tokens=False) if text else []


def chat_rows(tokenizer, texts: list[str]) -> list[list[int]]:
    """One user turn each, through the tokenizer's chat template when it has one, else the raw text."""
    fmt = "chat" if getattr(tokenizer, "chat_template", None) else "raw"
    return [encode_prompt(tokenizer, text, fmt) for text in texts]


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
