"""Tokenizers and text corpora for offline measurements: active-set coverage, frequency token maps.

Why: a vocabulary policy is only as good as the share of real model output its active set covers, and that
can be measured without any model: tokenize real prompt/response text with the target's own tokenizer and
replay it through the policy (`microspec.lab.coverage`). Tokenizers ship in three formats and file names do
not say which (Llama-3's `tokenizer.model` is tiktoken text, Llama-2's is a SentencePiece protobuf), so
`load_tokenizer` sniffs the content. Text is always encoded without special tokens (no BOS): we measure the
generated text, not the chat template.

    >>> tok = load_tokenizer(shared_data_dir() / "tokenizers/llama3")        # doctest: +SKIP
    >>> tok.vocab_size, tok.eos_ids, len(tok.encode("Hello world"))         # doctest: +SKIP
    (128256, [128001, 128009], 2)
    >>> pairs = load_pairs("gsm8k:test")            # [(question, worked answer), ...]  # doctest: +SKIP

Dataset names (files under `shared_data_dir()`, see its README): `alpaca:<model>` (instruction, output),
`gsm8k[:test|train|test_socratic]` (question, answer), `humaneval` (prompt, canonical_solution),
`mtbench[:turn1]` (Vicuna-7B greedy answers; turn 2's prompt is the whole first exchange plus question 2).
Any other argument is a path: .txt (one text per line), .jsonl, .json (a list), each optionally .gz.
"""
from __future__ import annotations

import base64
import gzip
import json
import os
import re
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterator

from ..paths import shared_data_dir  # noqa: F401  (re-exported: lab code reads corpora from there)

PAT_LLAMA3 = r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"  # noqa: E501
PAT_QWEN2 = r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"  # noqa: E501
PAT_QWEN36 = r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?[\p{L}\p{M}]+|\p{N}| ?[^\s\p{L}\p{M}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"  # noqa: E501

# Special tokens that end a generation, in any of the supported vocabularies.
END_NAMES = ("<|end_of_text|>", "<|eot_id|>", "<|eom_id|>", "<|endoftext|>", "<|im_end|>", "<eos>",
             "<end_of_turn>", "</s>")
_LLAMA3_SPECIALS = ["<|begin_of_text|>", "<|end_of_text|>", "<|reserved_special_token_0|>",
                    "<|reserved_special_token_1|>", "<|finetune_right_pad_id|>", "<|step_id|>",
                    "<|start_header_id|>", "<|end_header_id|>", "<|eom_id|>", "<|eot_id|>", "<|python_tag|>",
                    "<|image|>"] + [f"<|reserved_special_token_{2 + i}|>" for i in range(244)]
# NOTE(data): only the first three Qwen3.6 special names are documented; the other 30 get placeholder
# names (they decode to the placeholder, never occur in encoded text, and keep the vocab size right).
_QWEN36_SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"] + [f"<|special_{248047 + i}|>"
                                                                      for i in range(30)]
# Known tiktoken vocabularies, keyed by their number of BPE ranks: (name, split pattern, special names).
_TIKTOKEN_PRESETS = {
    128000: ("llama3", PAT_LLAMA3, _LLAMA3_SPECIALS),
    151643: ("qwen2", PAT_QWEN2, ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]),
    248044: ("qwen3.6", PAT_QWEN36, _QWEN36_SPECIALS),
}
_EXTRA = "pip install microspec[tokenizers]"


@dataclass
class Tokenizer:
    """A loaded tokenizer behind one small interface (HF `tokenizers`, tiktoken or SentencePiece).

    vocab_size counts every id including specials (max id + 1); eos_ids are the special end ids found.
    """
    name: str
    kind: str                                   # "hf" | "tiktoken" | "sentencepiece"
    vocab_size: int
    eos_ids: list[int] = field(default_factory=list)
    _encode_batch: Callable[[list[str]], list[list[int]]] = field(default=None, repr=False)
    _decode: Callable[[list[int]], str] = field(default=None, repr=False)

    def encode(self, text: str) -> list[int]:
        """Token ids of `text`, no special tokens added."""
        return self._encode_batch([text])[0]

    def encode_batch(self, texts) -> list[list[int]]:
        """`encode` over many texts (multi-threaded where the backend is)."""
        return self._encode_batch(list(texts))

    def decode(self, ids) -> str:
        return self._decode([int(i) for i in ids])


def _read_bytes(path: Path) -> bytes:
    data = path.read_bytes()
    return gzip.decompress(data) if data[:2] == b"\x1f\x8b" else data


def _sniff(data: bytes) -> str:
    head = data[:4096]
    if head.lstrip()[:1] == b"{":
        return "hf"
    if re.fullmatch(rb"[A-Za-z0-9+/]+=* \d+", head.split(b"\n", 1)[0].strip()):
        return "tiktoken"
    if head[:1] == b"\x0a":  # protobuf field 1 (pieces), length-delimited: a SentencePiece ModelProto
        return "sentencepiece"
    raise ValueError("unknown tokenizer format (expected HF tokenizer.json, tiktoken BPE or SentencePiece)")


def _pick_file(directory: Path) -> Path:
    for pattern in ("tokenizer.json", "tokenizer.json.gz", "*.tiktoken", "*.tiktoken.gz", "tokenizer.model",
                    "*.model"):
        found = sorted(directory.glob(pattern))
        if found:
            return found[0]
    raise FileNotFoundError(f"no tokenizer file (tokenizer.json[.gz], *.tiktoken, *.model) in {directory}")


def load_tokenizer(path: str | os.PathLike, kind: str | None = None, pattern: str | None = None) -> Tokenizer:
    """Load a tokenizer file, or the best one in a directory (tokenizer.json first, it needs no extra).

    kind: "hf", "tiktoken" or "sentencepiece" to skip content sniffing. pattern: the split regex of a
    tiktoken file (defaults: PAT_LLAMA3 / PAT_QWEN2 / PAT_QWEN36 chosen by the number of ranks).
    Raises FileNotFoundError (missing path), ValueError (unknown format), ImportError (missing extra).
    """
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"tokenizer not found: {path}")
    if path.is_dir():
        path = _pick_file(path)
    data = _read_bytes(path)
    kind = kind or _sniff(data)
    name = f"{path.parent.name}/{path.name}"
    if kind == "hf":
        return _load_hf(data, path, name)
    if kind == "tiktoken":
        return _load_tiktoken(data, name, pattern)
    if kind == "sentencepiece":
        return _load_sentencepiece(data, name)
    raise ValueError(f"unknown tokenizer kind {kind!r}; use 'hf', 'tiktoken' or 'sentencepiece'")


def _load_hf(data: bytes, path: Path, name: str) -> Tokenizer:
    from tokenizers import Tokenizer as HFTokenizer
    try:
        tok = HFTokenizer.from_str(data.decode("utf-8"))
    except Exception as err:  # tokenizers raises its own Exception type on malformed JSON
        raise ValueError(f"{path}: not a valid HF tokenizer.json ({err})") from err
    decoder = tok.get_added_tokens_decoder()
    added = {t.content: i for i, t in decoder.items()}
    special = {t.content: i for i, t in decoder.items() if t.special}  # Gemma's "</s>" is a plain HTML tag
    ends = set(END_NAMES)
    config = path.parent / "tokenizer_config.json"
    if config.is_file():
        eos = json.loads(config.read_text()).get("eos_token")
        ends.add(eos.get("content") if isinstance(eos, dict) else eos)
    eos_ids = sorted(i for n, i in special.items() if n in ends)
    vocab_size = max(tok.get_vocab_size(with_added_tokens=True), max(added.values(), default=-1) + 1)

    def encode_batch(texts):
        return [e.ids for e in tok.encode_batch(texts, add_special_tokens=False)]

    return Tokenizer(name, "hf", vocab_size, eos_ids, encode_batch,
                     lambda ids: tok.decode(ids, skip_special_tokens=False))


def _load_tiktoken(data: bytes, name: str, pattern: str | None) -> Tokenizer:
    try:
        import tiktoken
    except ImportError as err:
        raise ImportError(f"tiktoken is needed to read {name}: {_EXTRA}") from err
    ranks = {}
    for line in data.splitlines():
        if line.strip():
            token, rank = line.split()
            ranks[base64.b64decode(token)] = int(rank)
    preset, default_pat, specials = _TIKTOKEN_PRESETS.get(len(ranks), (None, PAT_LLAMA3, []))
    if preset is None and pattern is None:
        warnings.warn(f"{name}: unknown tiktoken vocabulary ({len(ranks)} ranks); using PAT_LLAMA3 as the "
                      "split pattern (pass pattern= to override)", stacklevel=3)
    start = max(ranks.values()) + 1
    special = {s: start + i for i, s in enumerate(specials)}
    enc = tiktoken.Encoding(name=preset or name, pat_str=pattern or default_pat, mergeable_ranks=ranks,
                            special_tokens=special)
    eos_ids = sorted(i for s, i in special.items() if s in END_NAMES)
    return Tokenizer(name, "tiktoken", enc.n_vocab, eos_ids, enc.encode_ordinary_batch, enc.decode)


def _load_sentencepiece(data: bytes, name: str) -> Tokenizer:
    try:
        import sentencepiece
    except ImportError as err:
        raise ImportError(f"sentencepiece is needed to read {name}: {_EXTRA}") from err
    sp = sentencepiece.SentencePieceProcessor()
    try:
        sp.LoadFromSerializedProto(data)
    except Exception as err:  # RuntimeError or OSError depending on the version
        raise ValueError(f"{name}: not a SentencePiece model ({err})") from err
    eos_ids = [sp.eos_id()] if sp.eos_id() >= 0 else []
    return Tokenizer(name, "sentencepiece", sp.get_piece_size(), eos_ids,
                     lambda texts: sp.encode(texts, out_type=int), sp.decode)


# ---------------------------------------------------------------------------------------------- corpora
def _records(path: Path) -> Iterator:
    """Raw records of a .txt (lines), .jsonl (one JSON value per line) or .json (a list) file, maybe .gz."""
    if not path.is_file():
        raise FileNotFoundError(f"corpus file not found: {path}")
    base = path.name[:-3] if path.name.endswith(".gz") else path.name
    suffix = Path(base).suffix.lower()
    if suffix not in (".txt", ".jsonl", ".json"):
        raise ValueError(f"{path}: unsupported corpus format (use .txt, .jsonl or .json, optionally .gz)")
    opener = gzip.open if path.name.endswith(".gz") else open
    with opener(path, "rt", encoding="utf-8") as f:
        if suffix == ".json":
            obj = json.load(f)
            if not isinstance(obj, list):
                raise ValueError(f"{path}: expected a JSON list of records")
            yield from obj
            return
        for line in f:
            line = line.rstrip("\n")
            if line.strip():
                yield json.loads(line) if suffix == ".jsonl" else line


TEXT_FIELDS = ("text", "output", "answer", "response", "completion", "canonical_solution", "content")
PAIR_FIELDS = (("instruction", "output"), ("question", "answer"), ("prompt", "canonical_solution"),
               ("prompt", "response"), ("prompt", "completion"), ("input", "output"))


def iter_texts(path: str | os.PathLike, field: str | None = None) -> Iterator[str]:
    """Texts of a corpus file. JSON records give `field` (default: the first of TEXT_FIELDS present); a
    list value yields each string in it. Plain strings (txt lines, JSON strings) are yielded as they are."""
    path = Path(path)
    for i, rec in enumerate(_records(path)):
        if isinstance(rec, str):
            yield rec
            continue
        if not isinstance(rec, dict):
            raise ValueError(f"{path}: record {i} is {type(rec).__name__}, expected an object or a string")
        key = field or next((k for k in TEXT_FIELDS if k in rec), None)
        if key is None or key not in rec:
            raise ValueError(f"{path}: record {i} has no field {key or TEXT_FIELDS!r} "
                             f"(fields: {sorted(rec)})")
        value = rec[key]
        yield from (value if isinstance(value, list) else [value])


@dataclass
class Corpus:
    """(prompt, response) pairs plus the files they came from (to keep fit and evaluation corpora apart)."""
    name: str
    pairs: list[tuple[str, str]]
    files: tuple[Path, ...]


def _pairs_from_file(path: Path, prompt_field: str | None, response_field: str | None):
    pairs = []
    for i, rec in enumerate(_records(path)):
        if isinstance(rec, str):       # a bare text: nothing in context before it
            pairs.append(("", rec))
            continue
        keys = (prompt_field, response_field)
        if None in keys:
            keys = next(((p, r) for p, r in PAIR_FIELDS if p in rec and r in rec), keys)
        if keys[0] not in rec or keys[1] not in rec:
            raise ValueError(f"{path}: record {i} lacks prompt/response fields {keys} "
                             f"(fields: {sorted(rec)}); name them with prompt_field= / response_field=")
        pairs.append((str(rec[keys[0]]), str(rec[keys[1]])))
    return pairs


def _mtbench(root: Path, arg: str):
    if arg not in ("", "turn1"):
        raise ValueError(f"mtbench variant must be empty or 'turn1', got {arg!r}")
    qfile = root / "mt_bench/question.jsonl"
    afile = root / "mt_bench/model_answers_vicuna-7b-v1.3_from_eagle_judgment.jsonl.gz"
    questions = {r["question_id"]: r["turns"] for r in _records(qfile)}
    pairs = []
    for row in _records(afile):
        if row["model"] != "vicuna-7b-v1.3-greedy":
            continue
        (q1, q2), (a1, a2) = questions[row["question_id"]], row["turns"]
        pairs.append((q1, a1))
        if not arg:  # turn 2 sees the whole first exchange as its prompt, as a chat decoder would
            pairs.append((f"{q1}\n\n{a1}\n\n{q2}", a2))
    return pairs, (qfile, afile)


def _alpaca(root: Path, arg: str):
    found = (root / "alpaca_eval").glob("*.model_outputs.json*")
    models = sorted(p.name.split(".model_outputs")[0] for p in found)
    if arg not in models:
        raise ValueError(f"alpaca needs one of these models: alpaca:{{{','.join(models)}}} (got {arg!r})")
    path = root / f"alpaca_eval/{arg}.model_outputs.json.gz"
    return _pairs_from_file(path, "instruction", "output"), (path,)


def _gsm8k(root: Path, arg: str):
    split = arg or "test"
    if split not in ("train", "test", "test_socratic"):
        raise ValueError(f"gsm8k split must be train, test or test_socratic, got {split!r}")
    path = root / f"gsm8k/{split}.jsonl.gz"
    return _pairs_from_file(path, "question", "answer"), (path,)


def _humaneval(root: Path, arg: str):
    path = root / "humaneval/HumanEval.jsonl.gz"
    return _pairs_from_file(path, "prompt", "canonical_solution"), (path,)


DATASETS = {"alpaca": _alpaca, "gsm8k": _gsm8k, "humaneval": _humaneval, "mtbench": _mtbench}
DATASET_HELP = "alpaca:<model>, gsm8k[:train|test|test_socratic], humaneval, mtbench[:turn1]"


def load_corpus(spec: str | os.PathLike, prompt_field: str | None = None, response_field: str | None = None,
                limit: int | None = None) -> Corpus:
    """A shared dataset name (see the module docstring) or a file path -> `Corpus` (first `limit` pairs)."""
    text = str(spec)
    name, _, arg = text.partition(":")
    if not Path(text).exists() and name.lower().replace("_", "") in DATASETS:
        pairs, files = DATASETS[name.lower().replace("_", "")](shared_data_dir(), arg)
    elif Path(text).exists():
        files = (Path(text),)
        pairs = _pairs_from_file(files[0], prompt_field, response_field)
        name = Path(text).name
    elif "/" in text or os.sep in text or Path(text).suffix:
        raise FileNotFoundError(f"corpus file not found: {text}")
    else:
        raise ValueError(f"unknown dataset {text!r}: use {DATASET_HELP} or a file path")
    pairs = pairs[:limit] if limit is not None else pairs
    return Corpus(text, pairs, tuple(p.resolve() for p in files))


def same_text_key(text: str) -> str:
    """A prompt's key for "is this the same prompt": case and whitespace folded (used to keep evaluation
    prompts out of training and fitting corpora, and to refuse duplicates)."""
    return " ".join(text.split()).lower()


def load_pairs(spec: str | os.PathLike, prompt_field: str | None = None, response_field: str | None = None,
               limit: int | None = None) -> list[tuple[str, str]]:
    """(prompt, response) pairs of a shared dataset name or a file. See `load_corpus`."""
    return load_corpus(spec, prompt_field, response_field, limit).pairs


def load_texts(spec: str | os.PathLike, field: str | None = None) -> tuple[list[str], tuple[Path, ...]]:
    """Texts to count token frequencies on, and their files: a dataset name gives its responses; a file
    gives `iter_texts(path, field)`."""
    text = str(spec)
    if not Path(text).exists():
        corpus = load_corpus(text)
        return [r for _, r in corpus.pairs], corpus.files
    return list(iter_texts(text, field)), (Path(text).resolve(),)


# The fitting split of ../shared/data/README.md §6: frequency tables and clusters are learned on these;
# evaluations use other text (Spec-Bench, MT-bench, the target family's own AlpacaEval outputs, GSM8K test,
# HumanEval).
FITTING_CORPORA = ("alpaca:gpt4_1106_preview", "alpaca:text_davinci_003", "gsm8k:train")


def fitting_texts() -> list[str]:
    """Response texts of `FITTING_CORPORA` (raises FileNotFoundError without the shared data)."""
    return [text for spec in FITTING_CORPORA for text in load_texts(spec)[0]]
