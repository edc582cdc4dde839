"""Policy labels -> policies, with the corpus statistics they need (the vocabulary of `microspec eval` and of
`benchmarks/bench_e2e.py`, so a label means the same policy in a CPU evaluation and in its GPU replay).

    full                       FullVocab
    static@C                   StaticFrequencyPolicy: the C most frequent ids of the fitting corpora
    incontext@C                InContextPolicy, LRU at capacity C
    incontext+core@C           ... plus a core of the C // 4 most frequent ids
    incontext+core<N>@C        ... plus a core of N ids
    .../k<N>, .../s<N>         in-context suffixes: the target's top-N per position; N corpus successors
                               per id
    cluster@C                  ClusterPolicy from a `microspec fit-clusters` file

Frequencies and successors are counted over `microspec.lab.data.FITTING_CORPORA` with the model's own
tokenizer and cached as safetensors.
"""
from __future__ import annotations

from pathlib import Path

import torch

from .data import FITTING_CORPORA


def hf_tokenizer_adapter(tokenizer, name: str):
    """A Hugging Face tokenizer behind `microspec.lab.data.Tokenizer`, so `microspec.lab.frequency` can count
    with the model's own tokenizer (text encoded without special tokens)."""
    from .data import Tokenizer
    eos = tokenizer.eos_token_id
    return Tokenizer(name, "hf", len(tokenizer), [] if eos is None else [int(eos)],
                     lambda texts: tokenizer(list(texts), add_special_tokens=False)["input_ids"],
                     lambda ids: tokenizer.decode(ids))


def frequency_ranking(tokenizer, name: str, cache: Path | None = None):
    """Ids ranked by count over `FITTING_CORPORA` with the model's tokenizer -> (int64 [n], table metadata).
    The counts are kept as a `microspec.lab.frequency` safetensors table at `cache` and reused when its
    tokenizer name, vocabulary size and corpora match."""
    from .frequency import count_corpora, load_table, save_table
    if cache is not None and Path(cache).is_file():
        table = load_table(cache)
        if (table.meta.get("tokenizer"), table.meta.get("vocab_size"), table.meta.get("corpora")) == \
                (name, len(tokenizer), list(FITTING_CORPORA)):
            return table.ranked(), {**table.meta, "cache": str(cache), "cached": True}
    table = count_corpora(list(FITTING_CORPORA), hf_tokenizer_adapter(tokenizer, name))
    if cache is not None:
        Path(cache).parent.mkdir(parents=True, exist_ok=True)
        save_table(table, cache)
    return table.ranked(), {**table.meta, "cache": str(cache), "cached": False}


def policy_from_label(label: str, ranking: torch.Tensor | None = None, cluster_file=None, topk: int = 3,
                      core: int | None = None, successors: torch.Tensor | None = None):
    """"full", "static@C", "incontext@C", "incontext+core@C" (core: the `core` most frequent ids, default
    C // 4 as in `microspec demo`), "incontext+core<N>@C" (a core of N ids), "cluster@C" (a `ClusterPolicy`
    file) -> a fresh policy. An in-context label may end in "/k<N>" to take the target's top-N per position
    instead of `topk` and in "/s<N>" to add each id's N most frequent successors from `successors` [V, >= N]
    (e.g. "incontext+core1024@2048/k10/s4")."""
    from ..policies import FullVocab, InContextPolicy, StaticFrequencyPolicy
    if label == "full":
        return FullVocab()
    topk, n_succ = label_options(label, topk)
    if n_succ and (successors is None or successors.shape[1] < n_succ):
        raise ValueError(f"policy {label!r} needs a successor table with >= {n_succ} columns")
    succ = successors[:, :n_succ] if n_succ else None
    kind, _, cap = label.partition("@")
    cap = cap.split("/", 1)[0]
    if not cap.isdigit() or int(cap) < 1:
        raise ValueError(f"policy {label!r}: expected full or <kind>@<capacity>")
    C = int(cap)
    if (kind == "static" or kind.startswith("incontext+core")) and ranking is None:
        raise ValueError(f"policy {label!r} needs a frequency ranking")
    if kind == "static":
        return StaticFrequencyPolicy(ranking, C)
    if kind == "incontext":
        return InContextPolicy(C, topk, "lru", successors=succ)
    if kind.startswith("incontext+core"):
        size = kind[len("incontext+core"):]
        if size and not size.isdigit():
            raise ValueError(f"policy {label!r}: expected incontext+core@C or incontext+core<N>@C")
        n = int(size) if size else (C // 4 if core is None else core)
        return InContextPolicy(C, topk, "lru", ranking[:n], successors=succ)
    if kind == "cluster":
        if cluster_file is None:
            raise ValueError(f"policy {label!r} needs --cluster-file (a `microspec fit-clusters` output)")
        from ..policies.cluster import ClusterPolicy
        return ClusterPolicy.load(cluster_file, capacity=C)
    raise ValueError(f"unknown policy kind {kind!r}: use full, static, incontext, incontext+core, cluster")


def label_options(label: str, topk: int) -> tuple[int, int]:
    """An in-context label's suffixes -> (target top-k, successors per id): "/k<N>" sets the top-k (else
    `topk`), "/s<N>" adds each id's N most frequent successors in the fitting corpora (else 0)."""
    parts = label.split("/")
    k, succ = topk, 0
    for part in parts[1:]:
        if (not label.startswith("incontext") or len(part) < 2 or part[0] not in "ks"
                or not part[1:].isdigit()):
            raise ValueError(f"policy {label!r}: only in-context labels take /k<N> (top-k) and /s<N> "
                             "(successors) suffixes")
        if part[0] == "k":
            k = int(part[1:])
        else:
            succ = int(part[1:])
    return k, succ


def corpus_successors(tokenizer, name: str, m: int, cache: Path | None = None) -> torch.Tensor:
    """`microspec.lab.frequency.successor_table` over `FITTING_CORPORA` with the model's tokenizer ->
    int64 [V, m], kept at `cache` (safetensors) and reused when its tokenizer name, vocabulary size and
    corpora match."""
    from safetensors import safe_open
    from safetensors.torch import save_file
    from .data import fitting_texts
    from .frequency import successor_table
    key = {"tokenizer": name, "vocab_size": str(len(tokenizer)), "corpora": ",".join(FITTING_CORPORA)}
    if cache is not None and Path(cache).is_file():
        with safe_open(str(cache), "pt") as f:
            meta, table = f.metadata() or {}, f.get_tensor("successors")
        if all(meta.get(k) == v for k, v in key.items()) and table.shape[1] >= m:
            return table[:, :m]
    ids = hf_tokenizer_adapter(tokenizer, name).encode_batch(fitting_texts())
    table = successor_table(ids, len(tokenizer), max(m, 8))
    if cache is not None:
        Path(cache).parent.mkdir(parents=True, exist_ok=True)
        save_file({"successors": table}, str(cache), metadata=key)
    return table[:, :m]
