"""Training data of EAGLE drafters: prompts that are not evaluation sets, answered by the target itself
(self-distillation), plus real answers teacher-forced.

    pairs = training_pairs()                 # prompt -> real answers: AlpacaEval instructions (answers of the
                                             # six models there) + GSM8K *train*; a prompt that also occurs in
                                             # an evaluation set is dropped
    train, held = split_prompts(sorted(pairs), 0.02, seed)
    rows  = [encode_prompt(tok, p, "auto") for p in train]    # chat template, or "prompt\\n\\n" (base models)
    seqs  = self_distill(model, rows, ("greedy", 0.7, 1.0), max_new=256, ...)     # the target's own answers
    seqs += teacher_forced(rows, [pairs[p] for p in train], tok, eos)              # real answers
    for idx in token_batches(seqs, max_tokens=16384, seed=0): ids, mask, plen, lens = collate(seqs, idx, pad)

Evaluation sets (never trained on): Spec-Bench, MT-bench, GSM8K test, HumanEval (../shared/data/README.md).
EAGLE's `eagle_bench` prompts are benchmark questions too, so they are not used either.

A `Sequence` holds token ids (prompt, then answer) and the prompt's length; the loss covers answer positions.
"""
from __future__ import annotations

import json
import random
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor

from .data import load_pairs, same_text_key, shared_data_dir
from .teacher import length_batches, pad_rows
from ..inputs import eos_ids_of
from ..prompts import encode_prompt

# alpaca:* = every AlpacaEval model file in the shared data (same 805 instructions, six models' answers).
DEFAULT_SOURCES = ("alpaca:*", "gsm8k:train")
EVAL_SETS = ("spec_bench/question.jsonl", "mt_bench/question.jsonl")   # plus gsm8k:test and humaneval


@dataclass
class Sequence:
    ids: list[int]          # prompt then answer
    prompt_len: int
    source: str             # "greedy", "t0.7", "real", ...


def evaluation_prompts() -> set[str]:
    """Normalised texts of every evaluation prompt (Spec-Bench and MT-bench turns, GSM8K test questions,
    HumanEval prompts)."""
    root = shared_data_dir()
    texts = []
    for rel in EVAL_SETS:
        with open(root / rel) as f:
            texts += [t for line in f if line.strip() for t in json.loads(line)["turns"]]
    texts += [q for q, _ in load_pairs("gsm8k:test")] + [p for p, _ in load_pairs("humaneval")]
    return {same_text_key(t) for t in texts}


def training_pairs(sources=DEFAULT_SOURCES, decontaminate: bool = True) -> dict[str, list[str]]:
    """prompt -> real answers over `sources` (names of `microspec.lab.data.load_pairs`; "alpaca:*" expands to
    every AlpacaEval model). Prompts that also occur in an evaluation set (normalised text) are dropped."""
    specs = []
    for spec in sources:
        if spec == "alpaca:*":
            found = sorted((shared_data_dir() / "alpaca_eval").glob("*.model_outputs.json*"))
            specs += [f"alpaca:{p.name.split('.model_outputs')[0]}" for p in found]
        else:
            specs.append(spec)
    pairs: dict[str, list[str]] = {}
    for spec in specs:
        for prompt, answer in load_pairs(spec):
            if prompt.strip():
                pairs.setdefault(prompt, []).append(answer)
    if decontaminate:
        banned = evaluation_prompts()
        pairs = {p: a for p, a in pairs.items() if same_text_key(p) not in banned}
    return pairs


def split_prompts(prompts: list[str], heldout_frac: float, seed: int) -> tuple[list[str], list[str]]:
    """(train, held-out) prompts: a seeded shuffle of the sorted list; at least one held-out prompt."""
    order = sorted(prompts)
    random.Random(seed).shuffle(order)
    n_held = max(1, round(heldout_frac * len(order))) if len(order) > 1 else 0
    return order[n_held:], order[:n_held]



def random_prompt_rows(n: int, vocab_size: int, lengths=(4, 12), seed: int = 0,
                       low: int = 3) -> list[list[int]]:
    """Random-token prompts (tiny random models have no tokenizer)."""
    g = random.Random(seed)
    return [[g.randrange(low, vocab_size) for _ in range(g.randint(*lengths))] for _ in range(n)]


def _cut(row: list[int], eos: set[int]) -> list[int]:
    for i, t in enumerate(row):
        if t in eos:
            return row[: i + 1]
    return row


@torch.no_grad()
def self_distill(model, rows: list[list[int]], modes=("greedy", 0.7, 1.0), max_new: int = 256,
                 batch_size: int = 256, eos_ids=(), pad_id: int = 0, seed: int = 0,
                 deadline: float | None = None, progress: bool = True) -> list[Sequence]:
    """The target's own answers: for each batch of prompts (similar lengths together), one answer per mode
    ("greedy" or a temperature, full distribution: no top-k/top-p), up to `max_new` tokens, cut after the
    first EOS. Stops early (after a whole batch) once time.time() passes `deadline`."""
    from transformers import GenerationConfig
    from tqdm.auto import tqdm
    device = next(model.parameters()).device
    eos = {int(e) for e in eos_ids}
    order = sorted(range(len(rows)), key=lambda i: (len(rows[i]), i))
    batches = [order[i:i + batch_size] for i in range(0, len(order), batch_size)]
    random.Random(seed).shuffle(batches)                    # a time cut keeps a random subset of prompts
    out: list[Sequence] = []
    bar = tqdm(total=len(batches) * len(modes), desc="self-distillation", unit="batch", disable=not progress)
    for b, batch in enumerate(batches):
        if deadline is not None and time.time() > deadline:
            break
        width = max(len(rows[i]) for i in batch)
        ids = torch.full((len(batch), width), pad_id, dtype=torch.long)
        mask = torch.zeros_like(ids)
        for j, i in enumerate(batch):                                                   # left padding
            ids[j, width - len(rows[i]):], mask[j, width - len(rows[i]):] = torch.tensor(rows[i]), 1
        for m, mode in enumerate(modes):
            sample = mode != "greedy"
            temp = {"temperature": float(mode), "top_k": 0, "top_p": 1.0} if sample else {}
            cfg = GenerationConfig(max_new_tokens=max_new, do_sample=sample, pad_token_id=pad_id,
                                   eos_token_id=sorted(eos) or None, **temp)
            torch.manual_seed(seed * 100003 + b * 101 + m)
            gen = model.generate(input_ids=ids.to(device), attention_mask=mask.to(device),
                                 generation_config=cfg)
            new = gen[:, width:].tolist()
            for j, i in enumerate(batch):
                answer = _cut(new[j], eos)
                if answer:
                    source = f"t{mode}" if sample else "greedy"
                    out.append(Sequence(rows[i] + answer, len(rows[i]), source))
            bar.update(1)
        if not progress:
            print(f"self-distillation: {b + 1}/{len(batches)} batches, {len(out)} answers", flush=True)
    bar.close()
    return out


def teacher_forced(rows: list[list[int]], answers: list[list[str]], tokenizer,
                   eos_id: int | None) -> list[Sequence]:
    """Real answers after their prompts: row + encode(answer) + [eos] for every answer of every row."""
    out = []
    for row, texts in zip(rows, answers):
        for text in texts:
            body = tokenizer.encode(text, add_special_tokens=False) + ([eos_id] if eos_id is not None else [])
            if body:
                out.append(Sequence(row + body, len(row), "real"))
    return out


def truncate(seqs: list[Sequence], max_len: int) -> list[Sequence]:
    """Sequences cut to `max_len` tokens; those with fewer than 2 answer tokens left are dropped."""
    return [Sequence(s.ids[:max_len], s.prompt_len, s.source) for s in seqs
            if min(len(s.ids), max_len) - s.prompt_len >= 2]


def token_batches(seqs: list[Sequence], max_tokens: int, seed: int) -> list[list[int]]:
    """Indices of sequences grouped by length so that rows x longest <= max_tokens (`length_batches`), in a
    seeded order."""
    batches = length_batches([len(s.ids) for s in seqs], max_tokens)
    random.Random(seed).shuffle(batches)
    return batches


def collate(seqs: list[Sequence], idx: list[int], pad_id: int,
            device=None) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Right-padded batch: input_ids int64 [B, T], attention_mask int64 [B, T], prompt_lens [B],
    lengths [B]."""
    rows = [seqs[i] for i in idx]
    ids, mask = pad_rows([torch.tensor(s.ids, dtype=torch.long) for s in rows], pad_id)
    plen = torch.tensor([s.prompt_len for s in rows])
    lens = torch.tensor([len(s.ids) for s in rows])
    return ids.to(device), mask.long().to(device), plen.to(device), lens.to(device)


def summary(seqs: list[Sequence]) -> dict:
    """Counts per source: sequences, tokens, answer tokens (what the loss sees)."""
    out: dict = {}
    for s in seqs:
        d = out.setdefault(s.source, {"sequences": 0, "tokens": 0, "answer_tokens": 0})
        d["sequences"] += 1
        d["tokens"] += len(s.ids)
        d["answer_tokens"] += len(s.ids) - s.prompt_len
    return out


def save_sequences(path: str | Path, **splits: list[Sequence]) -> None:
    """Write named lists of sequences (e.g. train=..., heldout=...) to one safetensors file."""
    from safetensors.torch import save_file
    tensors, meta = {}, {}
    for name, seqs in splits.items():
        sources = sorted({s.source for s in seqs})
        tensors[f"{name}.ids"] = torch.tensor([t for s in seqs for t in s.ids], dtype=torch.int32)
        tensors[f"{name}.lengths"] = torch.tensor([len(s.ids) for s in seqs], dtype=torch.int64)
        tensors[f"{name}.prompt_lens"] = torch.tensor([s.prompt_len for s in seqs], dtype=torch.int64)
        tensors[f"{name}.source"] = torch.tensor([sources.index(s.source) for s in seqs], dtype=torch.int64)
        meta[name] = sources
    save_file(tensors, str(path), metadata={"sources": json.dumps(meta)})


def load_sequences(path: str | Path) -> dict[str, list[Sequence]]:
    """The splits written by `save_sequences`."""
    from safetensors import safe_open
    with safe_open(str(path), framework="pt") as f:
        meta = json.loads(f.metadata()["sources"])
        t = {k: f.get_tensor(k) for k in f.keys()}
    out = {}
    for name, sources in meta.items():
        ids, lengths = t[f"{name}.ids"].tolist(), t[f"{name}.lengths"].tolist()
        starts = [0]
        for n in lengths:
            starts.append(starts[-1] + n)
        out[name] = [Sequence(ids[a:a + n], p, sources[s]) for a, n, p, s in
                     zip(starts, lengths, t[f"{name}.prompt_lens"].tolist(), t[f"{name}.source"].tolist())]
    return out


def special_ids(model, tokenizer) -> tuple[list[int], int]:
    """(EOS ids, pad id): `eos_ids_of` the model and the tokenizer; the tokenizer's pad id, else the
    generation config's, else the smallest EOS id (0 without one)."""
    eos = eos_ids_of(model, tokenizer)
    pad = getattr(tokenizer, "pad_token_id", None) if tokenizer is not None else None
    if pad is None:
        pad = getattr(getattr(model, "generation_config", None), "pad_token_id", None)
    return sorted(eos), int(pad if pad is not None else (min(eos) if eos else 0))


def build_dataset(model, tokenizer, *, sources=DEFAULT_SOURCES, prompt_format: str = "auto",
                  limit_prompts: int | None = None, heldout_frac: float = 0.02, modes=("greedy", 0.7, 1.0),
                  max_new: int = 256, gen_batch: int = 256, real: bool = True, max_len: int = 1024,
                  seed: int = 0, gen_minutes: float | None = None, random_prompts: int = 64,
                  progress: bool = True) -> dict[str, list[Sequence]]:
    """{"train": [...], "heldout": [...]}: the split is by prompt, so no prompt's answers straddle it.

    With a tokenizer: `training_pairs(sources)`, formatted with `prompt_format`, the first `limit_prompts`
    training prompts of the seeded order; self-distilled answers per `modes` (the held-out prompts first,
    never cut by `gen_minutes`) plus, with `real`, the corpora's answers teacher-forced. Without one (tiny
    random models): `random_prompts` random-token prompts, self-distilled only. Sequences are cut to
    `max_len`.
    """
    eos, pad = special_ids(model, tokenizer)
    if tokenizer is None:
        rows = random_prompt_rows(random_prompts, model.get_input_embeddings().weight.shape[0], seed=seed)
        held_n = max(1, round(heldout_frac * len(rows)))
        train_rows, held_rows, train_ans, held_ans = rows[held_n:], rows[:held_n], [], []
        real = False
    else:
        pairs = training_pairs(sources)
        train_p, held_p = split_prompts(list(pairs), heldout_frac, seed)
        train_p = train_p[:limit_prompts] if limit_prompts else train_p
        rows = {p: encode_prompt(tokenizer, p, prompt_format) for p in train_p + held_p}
        fits = {p: r for p, r in rows.items() if len(r) <= max_len - 16}          # room for an answer
        train_p, held_p = [p for p in train_p if p in fits], [p for p in held_p if p in fits]
        train_rows, held_rows = [fits[p] for p in train_p], [fits[p] for p in held_p]
        train_ans, held_ans = [pairs[p] for p in train_p], [pairs[p] for p in held_p]
    kw = dict(modes=modes, max_new=max_new, batch_size=gen_batch, eos_ids=eos, pad_id=pad, seed=seed,
              progress=progress)
    held = self_distill(model, held_rows, **kw)
    deadline = time.time() + gen_minutes * 60 if gen_minutes else None
    train = self_distill(model, train_rows, deadline=deadline, **kw)
    if real:     # one id to write after a real answer, not a set to stop at: the tokenizer's own
        eos_id = getattr(tokenizer, "eos_token_id", None)
        train += teacher_forced(train_rows, train_ans, tokenizer, eos_id)
        held += teacher_forced(held_rows, held_ans, tokenizer, eos_id)
    return {"train": truncate(train, max_len), "heldout": truncate(held, max_len)}
