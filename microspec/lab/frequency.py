"""Token frequency tables: count ids over corpora once, save them, and move them between peers' formats.

Why: a static draft vocabulary (FR-Spec, VocabTrim, EAGLE-3's d2t) and the in-context policy's frequent core
are both "the N most frequent ids of the target's tokenizer over some text". Counting is the slow part
(tokenizing ~1M lines), so it is done once and kept as a table of counts, from which any N can be cut later;
the id lists peers load (FR-Spec/SGLang `freq_<N>.pt`, vLLM `draft_token_map` .json/.txt) are exports of it.

Table file (safetensors, no pickle):
    counts    int64 [V]  occurrences of each id over the corpora (V = the tokenizer's vocabulary size)
    metadata  str -> str: format "microspec-frequency/1", tokenizer, vocab_size, corpora (JSON list),
              files (JSON list), num_tokens, distinct_ids, date (ISO), eos_ids (JSON list)
`StaticFrequencyPolicy.from_file(path)` and `load_token_map(path)` read it through the `counts` key.
An imported id list (no counts) is saved with `token_ids` int64 [n] (ranked) instead of `counts`.

    >>> table = count_corpora(["gsm8k:train"], load_tokenizer(".../llama3"))       # doctest: +SKIP
    >>> save_table(table, "freq.safetensors")                                      # doctest: +SKIP
    >>> export_top(table.ranked(), "freq_32768.pt", 32768, table.meta["eos_ids"])  # doctest: +SKIP
"""
from __future__ import annotations

import datetime
import json
import os
import sys
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import Tensor

from .data import Tokenizer, load_texts
from ..policies.token_maps import load_token_map, ranked_ids_from_counts, save_token_map

FORMAT = "microspec-frequency/1"
EXPORT_SUFFIXES = (".pt", ".pth", ".json", ".txt", ".safetensors")


@dataclass
class FrequencyTable:
    """Counts int64 [V] (or, for an imported list, ranked ids int64 [n] with counts None) + metadata."""
    counts: Tensor | None
    meta: dict = field(default_factory=dict)
    token_ids: Tensor | None = None

    def ranked(self) -> Tensor:
        """Ids most frequent first (ties: lower id first; zero counts dropped) -> int64 [n]."""
        return self.token_ids if self.counts is None else ranked_ids_from_counts(self.counts)

    @property
    def num_tokens(self) -> int:
        return int(self.counts.sum()) if self.counts is not None else 0


def count_ids(seqs, vocab_size: int) -> Tensor:
    """Histogram of token ids over sequences -> int64 [vocab_size]. Raises ValueError for an id outside
    [0, vocab_size) (a tokenizer that does not match the declared vocabulary)."""
    flat = [i for s in seqs for i in s]
    ids = torch.tensor(flat, dtype=torch.long)
    if ids.numel() and (int(ids.min()) < 0 or int(ids.max()) >= vocab_size):
        bad = int(ids.max()) if int(ids.max()) >= vocab_size else int(ids.min())
        raise ValueError(f"token id {bad} outside [0, {vocab_size}): wrong tokenizer for this vocabulary?")
    return torch.bincount(ids, minlength=vocab_size)


def successor_table(seqs, vocab_size: int, m: int) -> Tensor:
    """The m most frequent next ids of every id over token sequences -> int64 [vocab_size, m], most frequent
    first, -1 where an id has fewer than m distinct successors (or never occurs). Ties go to the smaller id.

    Why: a word is often several tokens, and its later pieces follow its first one almost surely; an
    in-context set that holds an id's usual successors covers the continuation the target will accept
    (`InContextPolicy(successors=...)`)."""
    if m < 1:
        raise ValueError(f"m must be >= 1, got {m}")
    seqs = [torch.as_tensor(s, dtype=torch.long) for s in seqs if len(s) > 1]
    table = torch.full((vocab_size, m), -1, dtype=torch.long)
    if not seqs:
        return table
    every = torch.cat(seqs)
    if int(every.min()) < 0 or int(every.max()) >= vocab_size:
        raise ValueError(f"token ids outside [0, {vocab_size}): wrong tokenizer for this vocabulary?")
    flat = torch.cat([s[:-1] * vocab_size + s[1:] for s in seqs])
    pair, count = torch.unique(flat, return_counts=True)              # sorted by (first, next)
    first, nxt = pair // vocab_size, pair % vocab_size
    # order by first id, then count descending, then next id ascending (stable sort keeps the id order)
    order = torch.argsort(-count, stable=True)
    order = order[torch.argsort(first[order], stable=True)]
    first, nxt = first[order], nxt[order]
    start = torch.searchsorted(first, first)                            # index of each run's first entry
    rank = torch.arange(first.numel()) - start
    keep = rank < m
    table[first[keep], rank[keep]] = nxt[keep]
    return table


def count_corpora(specs, tokenizer: Tokenizer, text_field: str | None = None, chunk: int = 2000,
                  progress=None) -> FrequencyTable:
    """Count the tokenizer's ids over each corpus's texts (a dataset name gives its responses; a file gives
    `microspec.lab.data.iter_texts`). `progress`: optional object with `update(n_texts)` and `total`."""
    if not specs:
        raise ValueError("no corpus given")
    counts = torch.zeros(tokenizer.vocab_size, dtype=torch.long)
    files: list[str] = []
    loaded = []
    for spec in specs:
        texts, paths = load_texts(spec, text_field)
        loaded.append((spec, texts))
        files += [str(p) for p in paths]
    if progress is not None:
        progress.total = sum(len(t) for _, t in loaded)
    for spec, texts in loaded:
        before = int(counts.sum())
        for i in range(0, len(texts), chunk):
            counts += count_ids(tokenizer.encode_batch(texts[i: i + chunk]), tokenizer.vocab_size)
            if progress is not None:
                progress.update(len(texts[i: i + chunk]))
        if int(counts.sum()) == before:
            raise ValueError(f"empty corpus: {spec} has no tokens")
    meta = {"format": FORMAT, "tokenizer": tokenizer.name, "vocab_size": tokenizer.vocab_size,
            "corpora": list(map(str, specs)), "files": files, "num_tokens": int(counts.sum()),
            "distinct_ids": int((counts > 0).sum()), "date": datetime.date.today().isoformat(),
            "eos_ids": list(tokenizer.eos_ids)}
    return FrequencyTable(counts, meta)


def fit_ranking(specs, tokenizer: Tokenizer, text_field: str | None = None, eval_files=(),
                allow_overlap: bool = False) -> Tensor:
    """Ids most frequent first over the texts of `specs` -> int64 [n], for a static list or a core.

    Keeps fitting and evaluation text apart: a corpus whose files are among `eval_files` raises ValueError
    (with `allow_overlap`, a warning on stderr: the coverage measured would be inflated).
    """
    counts = torch.zeros(tokenizer.vocab_size, dtype=torch.long)
    for spec in specs:
        texts, files = load_texts(spec, text_field)
        shared = set(eval_files).intersection(files)
        if shared:
            msg = (f"--fit {spec} shares {', '.join(map(str, sorted(shared)))} with the evaluation corpora: "
                   "coverage would be measured on the fitting text")
            if not allow_overlap:
                raise ValueError(msg + " (pass --allow-fit-overlap to run anyway)")
            print(f"WARNING: {msg}. Numbers are inflated.", file=sys.stderr)
        counts += count_ids(tokenizer.encode_batch(texts), tokenizer.vocab_size)
    if int(counts.sum()) == 0:
        raise ValueError(f"empty fit corpus: {list(specs)}")
    print(f"fit: {int(counts.sum())} tokens, {int((counts > 0).sum())} distinct ids", file=sys.stderr)
    return ranked_ids_from_counts(counts)


def save_table(table: FrequencyTable, path: str | os.PathLike) -> Path:
    """Write a table as safetensors (`counts` or `token_ids`, plus string metadata)."""
    from safetensors.torch import save_file
    path = Path(path)
    if path.suffix.lower() != ".safetensors":
        raise ValueError(f"{path}: a frequency table is saved as .safetensors (use --export for id lists)")
    if not path.parent.is_dir():
        raise FileNotFoundError(f"{path}: its folder does not exist")
    tensors = {"counts": table.counts.contiguous()} if table.counts is not None else {
        "token_ids": table.token_ids.contiguous()}
    meta = {k: v if isinstance(v, str) else json.dumps(v) for k, v in table.meta.items()}
    save_file(tensors, str(path), metadata=meta)
    return path


def load_table(path: str | os.PathLike) -> FrequencyTable:
    """Read a table written by `save_table` (or any safetensors file with `counts` / `token_ids`)."""
    from safetensors import safe_open
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"frequency table not found: {path}")
    with safe_open(str(path), framework="pt") as f:
        meta = dict(f.metadata() or {})
        keys = set(f.keys())
        if "counts" in keys:
            return FrequencyTable(f.get_tensor("counts").long(), _decode_meta(meta))
        if "token_ids" in keys:
            return FrequencyTable(None, _decode_meta(meta), f.get_tensor("token_ids").long())
    raise ValueError(f"{path}: no 'counts' or 'token_ids' tensor (found {sorted(keys)})")


def _decode_meta(meta: dict) -> dict:
    out = {}
    for k, v in meta.items():
        try:
            out[k] = json.loads(v)
        except ValueError:
            out[k] = v
    return out


def import_token_map(path: str | os.PathLike, vocab_size: int | None = None) -> FrequencyTable:
    """Any supported token map (FR-Spec `.pt`, vLLM `.json`/`.txt`, safetensors counts/ids/d2t) -> a table.

    A safetensors table keeps its counts; an id list becomes `token_ids` (ranked as stored). With
    `vocab_size`, ids >= vocab_size raise ValueError (the map was built for another tokenizer).
    """
    path = Path(path)
    if path.suffix.lower() == ".safetensors":
        try:
            table = load_table(path)
        except ValueError:
            table = FrequencyTable(None, {}, load_token_map(path))
    else:
        table = FrequencyTable(None, {}, load_token_map(path))
    top = int(table.ranked().max()) if table.ranked().numel() else -1
    size = table.counts.numel() if table.counts is not None else None
    if vocab_size is not None and (top >= vocab_size or (size is not None and size > vocab_size)):
        raise ValueError(f"{path}: token id {max(top, (size or 0) - 1)} >= vocab size {vocab_size}: "
                         "this map was built for another tokenizer")
    table.meta = {"format": FORMAT, **table.meta, "imported_from": str(path)}
    return table


def top_ids(ranked: Tensor, n: int, eos_ids=()) -> Tensor:
    """The first n ranked ids with every EOS id forced in (as FR-Spec does), replacing the least frequent
    ones; order kept (most frequent first, forced EOS ids last unless already in) -> int64 [<= n]."""
    if n < 1:
        raise ValueError(f"--top must be >= 1, got {n}")
    eos = torch.as_tensor(list(eos_ids), dtype=torch.long).unique()
    if eos.numel() > n:
        raise ValueError(f"top {n} cannot hold the {eos.numel()} EOS ids {eos.tolist()}")
    head = ranked[:n]
    missing = eos[~torch.isin(eos, head)]
    return torch.cat([head[: n - missing.numel()], missing])


def export_top(ranked: Tensor, path: str | os.PathLike, n: int, eos_ids=()) -> Tensor:
    """Write the top-n ids (EOS forced in) as FR-Spec/SGLang `.pt` (1-D int64 tensor), vLLM `.json` list or
    `.txt` (one id per line), or safetensors `token_ids`, by suffix. Returns the ids written, int64 [<= n]."""
    path = Path(path)
    if path.suffix.lower() not in EXPORT_SUFFIXES:
        raise ValueError(f"{path}: export format must be one of {', '.join(EXPORT_SUFFIXES)}")
    if not path.parent.is_dir():
        raise FileNotFoundError(f"{path}: its folder does not exist")
    ids = top_ids(ranked, n, eos_ids)
    save_token_map(ids, path)
    return ids
