"""`microspec generate` streams: transformers' TextStreamer receives the tokens as the engine commits them
(`put` after prefill and after every step, `end` once), and the streamed text is the text of the final
sequence. A tiny random model with a word-level tokenizer stands in for real weights (fast, no files)."""
import pytest
import torch

from microspec.cli import generate as generate_cmd
from microspec.cli import main
from microspec.models import tiny_random_model


@pytest.fixture
def tiny_target(monkeypatch):
    pytest.importorskip("tokenizers")
    from tokenizers import Tokenizer, models as tok_models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast
    vocab = {"[UNK]": 0, "[BOS]": 1, "[EOS]": 2, **{f"w{i}": i for i in range(3, 512)}}
    raw = Tokenizer(tok_models.WordLevel(vocab, unk_token="[UNK]"))
    raw.pre_tokenizer = pre_tokenizers.Whitespace()
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=raw, unk_token="[UNK]", bos_token="[BOS]",
                                        eos_token="[EOS]")
    model = tiny_random_model(vocab_size=512, seed=5, dtype=torch.float64)
    monkeypatch.setattr(generate_cmd, "load_target", lambda args: (model, tokenizer, "tiny random Llama"))
    return model, tokenizer


def _generate(extra, capsys):
    rc = main(["generate", "w5 w9 w17 w33", "--max-new-tokens", "12", "--policy", "incontext",
               "--capacity", "64", "--device", "cpu", *extra])
    assert rc == 0
    out = capsys.readouterr().out
    text, _, stats = out.rpartition("\n[tiny random Llama;")
    return text.strip(), stats


def test_generate_streams_the_committed_tokens(tiny_target, monkeypatch, capsys):
    import transformers
    calls = []

    class CountingStreamer(transformers.TextStreamer):
        def put(self, value):
            calls.append(value.clone())
            super().put(value)

        def end(self):
            calls.append("end")
            super().end()

    monkeypatch.setattr(transformers, "TextStreamer", CountingStreamer)
    streamed, stats = _generate([], capsys)
    assert calls and calls[-1] == "end" and calls.count("end") == 1
    chunks = [c for c in calls if not isinstance(c, str)]
    assert len(chunks) >= 2                                   # prefill, then at least one decode step
    assert all(c.dim() == 1 and c.dtype == torch.long for c in chunks)
    tokens = torch.cat(chunks)
    assert 1 <= tokens.numel() <= 12                          # each committed token once, within the budget
    printed, _ = _generate(["--no-stream"], capsys)
    _, tokenizer = tiny_target
    assert printed and tokenizer.decode(tokens, skip_special_tokens=True).strip() == printed
    assert streamed == printed                                 # same text, streamed or printed at the end
    assert "accepted length" in stats
