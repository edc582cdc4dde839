"""Policy labels -> policies: the one grammar of the policy names that `microspec eval`, `demo`, `generate`,
`coverage`, `tune` and `benchmarks/bench_e2e.py` take, so a label means the same policy in a CPU evaluation,
a coverage run and a GPU replay.

    full                       FullVocab
    static@C                   StaticFrequencyPolicy: the C first ids of a frequency ranking
    incontext@C                InContextPolicy at capacity C (eviction: LRU unless the caller says otherwise)
    incontext+core@C           ... plus a core of the C // 4 first ranked ids (or of the caller's default)
    incontext+core<N>@C        ... plus a core of N ids
    .../k<N>, .../s<N>         in-context suffixes: the target's top-N per position; N corpus successors
                               per id
    .../tree, .../grow         in-context suffixes: admit every drafted tree node and the target's top-k
                               there (`tree_ids`); grow-only, no eviction (MicroSpec's recipe:
                               incontext@3072/k3/tree/grow)
    adaptive@C, adaptive<G>@C  `adaptive_recipe`: MicroSpec's recipe at C ∪ a per-row frequency core that
                               grows by G ids (default 64) per miss of the in-context set; takes /k<N>
    cluster@C                  ClusterPolicy from a `microspec fit-clusters` file
    custom@C                   what a user factory returns for capacity=C (`microspec coverage --custom`)

The ranking (static, core) is the caller's: `microspec eval` counts the fitting corpora (`frequency_ranking`
below: `microspec.lab.data.FITTING_CORPORA` with the model's own tokenizer, cached as safetensors, as are the
successors of `corpus_successors`); `demo` and `generate` count the answers shipped in `microspec.assets`;
`coverage` and `tune` count --fit corpora. A --token-map replaces the count everywhere it is offered.
"""
from __future__ import annotations

import importlib
from dataclasses import dataclass
from pathlib import Path

import torch

from .data import FITTING_CORPORA

SIZED_KINDS = ("static", "incontext", "incontext+core", "adaptive", "cluster", "custom")   # <kind>@<C>
_CORE = "incontext+core"
_ADAPTIVE = "adaptive"


@dataclass(frozen=True)
class PolicyLabel:
    """A parsed label. kind: "full" or one of `SIZED_KINDS`; capacity: C (None for full); core: N of
    incontext+core<N> or G of adaptive<G> (None: the builder's default); topk: N of /k<N> (None: the
    builder's default); successors: N of /s<N> (0: none); tree: /tree; grow: /grow."""

    kind: str
    capacity: int | None = None
    core: int | None = None
    topk: int | None = None
    successors: int = 0
    tree: bool = False
    grow: bool = False

    @property
    def needs_ranking(self) -> bool:
        """Whether building it needs a frequency ranking (so callers count one only when a label asks)."""
        return self.kind in ("static", _CORE, _ADAPTIVE)


def parse_label(label: str) -> PolicyLabel:
    """A label of the grammar above -> `PolicyLabel`; anything else raises a one-line ValueError naming it."""
    if label == "full":
        return PolicyLabel("full")
    head, *suffixes = label.split("/")
    kind, _, cap = head.partition("@")
    topk, successors, tree, grow = _suffixes(label, suffixes)
    if not _is_number(cap) or int(cap) < 1:
        raise ValueError(f"policy {label!r}: expected full or <kind>@<capacity>")
    core = None
    for sized in (_CORE, _ADAPTIVE):
        if kind.startswith(sized):
            size = kind[len(sized):]
            if size and not _is_number(size):
                raise ValueError(f"policy {label!r}: expected {sized}@C or {sized}<N>@C")
            kind, core = sized, int(size) if size else None
    if kind not in SIZED_KINDS:
        raise ValueError(f"unknown policy kind {kind!r}: use full, {', '.join(SIZED_KINDS)}")
    if kind == _ADAPTIVE and (successors or tree or grow):
        raise ValueError(f"policy {label!r}: adaptive labels take only /k<N> (tree ids and growth are "
                         "part of the recipe)")
    return PolicyLabel(kind, int(cap), core, topk, successors, tree, grow)


def _suffixes(label: str, parts: list[str]) -> tuple[int | None, int, bool, bool]:
    """An in-context (or adaptive) label's suffixes -> (target top-k of /k<N> or None, successors per id of
    /s<N> or 0, /tree, /grow)."""
    topk, successors, flags = None, 0, set()
    for part in parts:
        if not label.startswith(("incontext", _ADAPTIVE)) or not (
                part in ("tree", "grow") or (len(part) >= 2 and part[0] in "ks" and _is_number(part[1:]))):
            raise ValueError(f"policy {label!r}: only in-context labels take the suffixes /k<N> (top-k), "
                             "/s<N> (successors), /tree and /grow")
        if part in ("tree", "grow"):
            flags.add(part)
        elif part[0] == "k":
            topk = int(part[1:])
        else:
            successors = int(part[1:])
    return topk, successors, "tree" in flags, "grow" in flags


def _is_number(text: str) -> bool:
    return text.isascii() and text.isdigit()


def hf_tokenizer_adapter(tokenizer, name: str):
    """A Hugging Face tokenizer behind `microspec.lab.data.Tokenizer`, so `microspec.lab.frequency` can count
    with the model's own tokenizer (text encoded without special tokens)."""
    from ..inputs import eos_ids_of
    from .data import Tokenizer
    return Tokenizer(name, "hf", len(tokenizer), eos_ids_of(None, tokenizer),
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
                      core: int | None = None, successors: torch.Tensor | None = None,
                      eviction: str | None = "lru", custom=None):
    """A label of the grammar above -> a fresh policy. The arguments fill in what the label leaves open:
    ranking int64 [n] (ids most frequent first: static, core), cluster_file (cluster), topk (in-context
    without /k<N>), core (the size of an incontext+core@C core; default C // 4 as in `microspec demo`),
    successors int64 [V, >= N] (/s<N>: each id's N most frequent successors), eviction ("lru", "fifo" or
    None: grow-only) and custom (a callable: capacity -> `VocabPolicy`, e.g. from `custom_factory`)."""
    from ..policies import FullVocab, InContextPolicy, StaticFrequencyPolicy
    spec = parse_label(label)
    if spec.kind == "full":
        return FullVocab()
    if spec.successors and (successors is None or successors.shape[1] < spec.successors):
        raise ValueError(f"policy {label!r} needs a successor table with >= {spec.successors} columns")
    if spec.needs_ranking and ranking is None:
        raise ValueError(f"policy {label!r} needs a frequency ranking")
    C = spec.capacity
    if spec.kind == "static":
        return StaticFrequencyPolicy(ranking, C)
    k = topk if spec.topk is None else spec.topk
    if spec.kind in ("incontext", _CORE):
        core_ids = None
        if spec.kind == _CORE:
            core_ids = ranking[: spec.core if spec.core is not None else (C // 4 if core is None else core)]
        return InContextPolicy(C, k, None if spec.grow else eviction, core_ids,
                               successors=successors[:, : spec.successors] if spec.successors else None,
                               tree_ids=spec.tree)
    if spec.kind == _ADAPTIVE:
        from ..policies import adaptive_recipe
        return adaptive_recipe(ranking, C, k, grow=64 if spec.core is None else spec.core)
    if spec.kind == "cluster":
        if cluster_file is None:
            raise ValueError(f"policy {label!r} needs --cluster-file (a `microspec fit-clusters` output)")
        from ..policies.cluster import ClusterPolicy
        return ClusterPolicy.load(cluster_file, capacity=C)
    if custom is None:
        raise ValueError(f"policy {label!r} needs a policy factory (`microspec coverage --custom "
                         "MODULE:CALLABLE`)")
    return custom(C)


def custom_factory(spec: str, arg: str | None = None):
    """"MODULE:CALLABLE" (a dotted attribute path after the colon) and an optional first positional argument
    -> a factory capacity -> `VocabPolicy` for custom@C labels; a callable that returns anything else is
    refused with a one-line ValueError."""
    from ..policies import VocabPolicy
    module, _, attr = spec.partition(":")
    obj = importlib.import_module(module)
    for part in attr.split("."):
        obj = getattr(obj, part)
    extra = (arg,) if arg else ()

    def make(capacity: int):
        policy = obj(*extra, capacity=capacity)
        if not isinstance(policy, VocabPolicy):
            raise ValueError(f"--custom {spec} returned {type(policy).__name__}, not a VocabPolicy")
        return policy
    return make


def label_options(label: str, topk: int) -> tuple[int, int]:
    """A label's in-context options -> (target top-k: /k<N>, else `topk`; successors per id: /s<N>, else
    0)."""
    spec = parse_label(label)
    return (topk if spec.topk is None else spec.topk), spec.successors


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
