"""Tokenizer loading (every shared tokenizer, by content) and corpus readers (every format, .gz included)."""
import functools
import gzip
import json
import sys

import pytest

from microspec.lab.data import (
    PAT_LLAMA3, iter_texts, load_corpus, load_pairs, load_texts, load_tokenizer, shared_data_dir,
)

SHARED = shared_data_dir(required=False)
needs_shared = pytest.mark.skipif(SHARED is None, reason="../shared/data not found")
SENTENCE = "Speculative decoding with a pruned LM head: 3.14159 tokens/sec, naïve café — 你好世界!"

# path under tokenizers/, detected kind, vocab size (README §3), eos ids, README token count of SENTENCE
TOKENIZERS = [
    ("llama3/tokenizer.model", "tiktoken", 128256, [128001, 128008, 128009], 26),
    ("llama3/tokenizer.json.gz", "hf", 128256, [128001, 128009], 26),
    ("qwen2.5-qwen3/tokenizer.json", "hf", 151669, [151643, 151645], 29),
    ("qwen3.6/qwen3_6.tiktoken", "tiktoken", 248044 + 33, [248044, 248046], None),
    ("gemma3/tokenizer.json.gz", "hf", 262144 + 1, [1, 106], None),
    ("llama2/tokenizer.model", "sentencepiece", 32000, [2], None),
]


@functools.lru_cache(maxsize=None)
def tokenizer(rel):
    return load_tokenizer(SHARED / "tokenizers" / rel)


@needs_shared
@pytest.mark.parametrize("rel,kind,vocab,eos,n_tokens", TOKENIZERS, ids=[t[0] for t in TOKENIZERS])
def test_shared_tokenizers(rel, kind, vocab, eos, n_tokens):
    tok = tokenizer(rel)
    ids = tok.encode(SENTENCE)
    assert (tok.kind, tok.vocab_size, tok.eos_ids) == (kind, vocab, eos)
    assert tok.decode(ids) == SENTENCE
    assert n_tokens is None or len(ids) == n_tokens
    assert all(0 <= i < vocab for i in ids) and not set(ids) & {128000, 1, 2}   # no BOS added
    assert tok.encode_batch([SENTENCE, "hi"])[0] == ids


@needs_shared
@pytest.mark.parametrize("directory,file", [("llama3", "tokenizer.json.gz"), ("llama2", "tokenizer.model"),
                                            ("qwen3.6", "qwen3_6.tiktoken")])
def test_directory_picks_a_file(directory, file):
    assert load_tokenizer(SHARED / "tokenizers" / directory).name == f"{directory}/{file}"


@needs_shared
def test_llama3_tiktoken_and_hf_agree():
    text = "def f(x):\n    return x ** 2  # 12345 apples; 'tis the café's"
    tiktoken_ids = tokenizer("llama3/tokenizer.model").encode(text)
    assert tiktoken_ids == tokenizer("llama3/tokenizer.json.gz").encode(text)


@needs_shared
def test_kind_and_pattern_overrides():
    path = SHARED / "tokenizers/llama3/tokenizer.model"
    with pytest.raises(ValueError, match="HF tokenizer.json"):
        load_tokenizer(path, kind="hf")
    assert load_tokenizer(path, kind="tiktoken", pattern=PAT_LLAMA3).encode("hello world") == [15339, 1917]
    with pytest.raises(ValueError, match="unknown tokenizer kind"):
        load_tokenizer(path, kind="bpe")


def test_tokenizer_errors(tmp_path, monkeypatch):
    with pytest.raises(FileNotFoundError):
        load_tokenizer(tmp_path / "nope.json")
    with pytest.raises(FileNotFoundError, match="no tokenizer file"):
        load_tokenizer(tmp_path)
    (tmp_path / "junk.bin").write_bytes(b"\x00\x01garbage")
    with pytest.raises(ValueError, match="unknown tokenizer format"):
        load_tokenizer(tmp_path / "junk.bin")
    (tmp_path / "t.tiktoken").write_text("aGk= 0\nYQ== 1\n")
    monkeypatch.setitem(sys.modules, "tiktoken", None)          # simulate a missing optional extra
    with pytest.raises(ImportError, match=r"microspec\[tokenizers\]"):
        load_tokenizer(tmp_path / "t.tiktoken")


def test_tiny_tiktoken_file_gz(tmp_path):
    pytest.importorskip("tiktoken")
    import base64
    lines = [f"{base64.b64encode(bytes([b])).decode()} {b}" for b in range(256)]
    (tmp_path / "t.tiktoken.gz").write_bytes(gzip.compress("\n".join(lines).encode()))
    with pytest.warns(UserWarning, match="unknown tiktoken vocabulary"):
        tok = load_tokenizer(tmp_path / "t.tiktoken.gz")
    assert tok.vocab_size == 256 and tok.encode("hé") == [104, 195, 169]
    assert tok.decode([104, 195, 169]) == "hé"


# ------------------------------------------------------------------------------------------ corpus readers
def _write(path, text):
    if path.name.endswith(".gz"):
        path.write_bytes(gzip.compress(text.encode()))
    else:
        path.write_text(text)
    return path


@pytest.mark.parametrize("gz", ["", ".gz"])
def test_iter_texts_formats(tmp_path, gz):
    recs = [{"text": "a b", "other": 1}, {"text": "c"}]
    txt = _write(tmp_path / f"c.txt{gz}", "first line\n\nsecond line\n")
    jsonl = _write(tmp_path / f"c.jsonl{gz}", "\n".join(json.dumps(r) for r in recs) + "\n\n")
    js = _write(tmp_path / f"c.json{gz}", json.dumps(recs))
    assert list(iter_texts(txt)) == ["first line", "second line"]
    assert list(iter_texts(jsonl)) == ["a b", "c"] == list(iter_texts(js))
    lists = _write(tmp_path / f"l.jsonl{gz}", json.dumps({"turns": ["x", "y"]}) + "\n")
    assert list(iter_texts(lists, field="turns")) == ["x", "y"]


def test_iter_texts_errors(tmp_path):
    with pytest.raises(FileNotFoundError):
        list(iter_texts(tmp_path / "missing.jsonl"))
    with pytest.raises(ValueError, match="unsupported corpus format"):
        list(iter_texts(_write(tmp_path / "c.csv", "a,b\n")))
    with pytest.raises(ValueError, match="no field"):
        list(iter_texts(_write(tmp_path / "c.jsonl", '{"foo": "bar"}\n')))
    with pytest.raises(ValueError, match="JSON list"):
        list(iter_texts(_write(tmp_path / "c.json", '{"foo": "bar"}')))


def test_generic_pairs(tmp_path):
    rows = "\n".join(json.dumps({"q": f"q{i}", "a": f"a{i}"}) for i in range(3))
    path = _write(tmp_path / "p.jsonl.gz", rows)
    assert load_pairs(path, prompt_field="q", response_field="a", limit=2) == [("q0", "a0"), ("q1", "a1")]
    with pytest.raises(ValueError, match="prompt/response fields"):
        load_pairs(path)
    auto = _write(tmp_path / "auto.json", json.dumps([{"instruction": "i", "output": "o", "x": 1}]))
    assert load_pairs(auto) == [("i", "o")]
    assert load_pairs(_write(tmp_path / "t.txt", "hello\nworld\n")) == [("", "hello"), ("", "world")]
    assert load_texts(auto) == (["o"], (auto.resolve(),))


def test_unknown_names_and_paths():
    with pytest.raises(ValueError, match="unknown dataset"):
        load_pairs("no_such_dataset")
    with pytest.raises(FileNotFoundError):
        load_pairs("some/dir/missing.jsonl")


def test_shared_data_dir_env(tmp_path, monkeypatch):
    monkeypatch.setenv("MICROSPEC_SHARED_DATA", str(tmp_path))
    assert shared_data_dir() == tmp_path.resolve()


# ------------------------------------------------------------------------------------------ shared datasets
@needs_shared
@pytest.mark.parametrize("name,n,prompt_start,response_start", [
    ("alpaca:Meta-Llama-3-8B-Instruct", 805, "What are the names of some famous actors", None),
    ("alpaca:Qwen2-72B-Instruct", 805, "What are the names of some famous actors", None),
    ("gsm8k:test", 1319, "Janet’s ducks lay 16 eggs", "Janet sells"),
    ("gsm8k:train", 7473, "Natalia sold clips", None),
    ("humaneval", 164, "from typing import List", "    for idx, elem"),
    ("mtbench", 160, "Compose an engaging travel blog post", None),
    ("mtbench:turn1", 80, "Compose an engaging travel blog post", None),
])
def test_shared_pairs(name, n, prompt_start, response_start):
    corpus = load_corpus(name)
    assert len(corpus.pairs) == n and all(f.is_file() for f in corpus.files)
    prompt, response = corpus.pairs[0]
    assert prompt.startswith(prompt_start) and response.strip()
    assert response_start is None or response.startswith(response_start)
    assert all(isinstance(p, str) and isinstance(r, str) for p, r in corpus.pairs[:5])
    assert load_pairs(name, limit=3) == corpus.pairs[:3]


@needs_shared
def test_mtbench_turn2_prompt_holds_the_first_exchange():
    (q1, a1), (p2, a2) = load_pairs("mtbench", limit=2)
    assert p2.startswith(q1) and a1 in p2 and a2 and a2 not in p2


@needs_shared
def test_bad_dataset_arguments():
    with pytest.raises(ValueError, match="Meta-Llama-3-8B-Instruct"):
        load_pairs("alpaca")
    with pytest.raises(ValueError, match="split"):
        load_pairs("gsm8k:validation")
    with pytest.raises(ValueError, match="turn1"):
        load_pairs("mtbench:turn3")
