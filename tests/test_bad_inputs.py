"""TESTING.md §4, the bad-input table, for `SpecDecoder` (rows on kernels, policies, token maps and sampling
live beside those tests). "Raise" means before any model runs, with a message naming the value."""
import pytest
import torch

from microspec import SpecDecoder, check_vocabularies
from microspec.policies import FullVocab, InContextPolicy, VocabPolicy
from tiny_models import PAD, VOCAB, noisy_copy, tiny_model


@pytest.fixture(scope="module")
def pair():
    target = tiny_model("llama")
    return target, noisy_copy(target, 0.3)


@pytest.fixture
def decoder(pair):
    return SpecDecoder(*pair, InContextPolicy(capacity=32), 3)


class _Tok:
    def __init__(self, vocab):
        self.vocab = vocab

    def get_vocab(self):
        return dict(self.vocab)

    def __len__(self):
        return len(self.vocab)


def test_row1_different_tokenizers_raise(pair):
    a = _Tok({f"t{i}": i for i in range(VOCAB)})
    b = _Tok({**a.vocab, "t5": 6, "t6": 5})
    with pytest.raises(ValueError, match="tokenizers differ"):
        SpecDecoder(*pair, FullVocab(), 2, tokenizer=a, drafter_tokenizer=b)
    SpecDecoder(*pair, FullVocab(), 2, tokenizer=a, drafter_tokenizer=_Tok(a.vocab))     # same: fine


def test_row1_vocabularies_far_apart_or_other_special_ids_raise(pair):
    with pytest.raises(ValueError, match="differ by more than"):
        check_vocabularies(pair[0], tiny_model("llama", vocab_size=VOCAB + 500))
    with pytest.raises(ValueError, match="eos_token_id"):
        check_vocabularies(pair[0], tiny_model("llama", eos_token_id=7))


def test_tokenizer_length_bounds_the_active_set(pair):
    tok = _Tok({f"t{i}": i for i in range(VOCAB - 11)})
    assert SpecDecoder(*pair, FullVocab(), 2, tokenizer=tok).vocab_size == VOCAB - 11


@pytest.mark.parametrize("ids,match", [
    (torch.tensor([[3, VOCAB]]), "prompt token ids"), (torch.tensor([[-1, 4]]), "prompt token ids"),
    (torch.zeros(1, 0, dtype=torch.long), "non-empty"), (torch.zeros(2, 3, 4, dtype=torch.long), "non-empty")])
def test_rows5_6_prompt_ids_out_of_range_or_empty(decoder, ids, match):
    with pytest.raises(ValueError, match=match):
        decoder.generate(ids, max_new_tokens=4)


def test_row6_a_row_with_no_real_token_raises(decoder):
    ids = torch.tensor([[4, 5], [6, 7]])
    with pytest.raises(ValueError, match="empty prompt in batch rows \\[1\\]"):
        decoder.generate(ids, attention_mask=torch.tensor([[1, 1], [0, 0]]), max_new_tokens=4)


def test_row16_wrong_dtypes_and_shapes(decoder):
    with pytest.raises(TypeError):
        decoder.generate(torch.rand(1, 3), max_new_tokens=4)
    with pytest.raises(ValueError, match="attention_mask shape"):
        decoder.generate(torch.tensor([[4, 5]]), attention_mask=torch.ones(1, 3), max_new_tokens=4)


@pytest.mark.parametrize("kwargs,match", [
    ({"max_new_tokens": 0}, "max_new_tokens"), ({"max_new_tokens": -3}, "max_new_tokens"),
    ({"do_sample": True, "temperature": 0.0}, "temperature"), ({"do_sample": True, "top_k": 0}, "top_k"),
    ({"do_sample": True, "top_p": 1.5}, "top_p"), ({"eos_token_id": VOCAB + 1}, "eos_token_id"),
    ({"generator": [torch.Generator()]}, "generators")])
def test_row7_and_sampling_arguments(decoder, kwargs, match):
    args = {"max_new_tokens": 4, **kwargs}
    with pytest.raises(ValueError, match=match):
        decoder.generate(torch.tensor([[4, 5], [6, 7]]), **args)


@pytest.mark.parametrize("K", [0, -1, 2.5])
def test_bad_speculation_length(pair, K):
    with pytest.raises(ValueError, match="num_speculative_tokens"):
        SpecDecoder(*pair, FullVocab(), K)


def test_policy_must_be_a_vocab_policy(pair):
    with pytest.raises(TypeError, match="VocabPolicy"):
        SpecDecoder(*pair, object(), 2)


class _EmptyPolicy(VocabPolicy):
    """Never offers a single id: the drafter has no mass anywhere (row 11)."""

    shared = True

    def _reset(self):
        self.active_ids.fill_(-1)
        self.n_active.zero_()


@pytest.mark.parametrize("do_sample", [False, True])
def test_row11_no_drafter_mass_means_plain_target_steps(pair, do_sample):
    target = pair[0]
    decoder = SpecDecoder(target, pair[1], _EmptyPolicy(capacity=4), 3)
    ids = torch.tensor([[4, 5, 6]])
    out = decoder.generate(ids, max_new_tokens=12, eos_token_id=[], do_sample=do_sample,
                           generator=torch.Generator().manual_seed(0))
    assert out.stats.acceptance_rate == 0.0 and out.stats.mean_accepted_length == 1.0
    assert out.sequences.shape == (1, 15)
    if not do_sample:
        expected = target.generate(ids, do_sample=False, max_new_tokens=12, eos_token_id=[], pad_token_id=PAD)
        assert torch.equal(out.sequences, expected)


def test_row8_finished_rows_draft_nothing_and_are_padded(pair):
    target = pair[0]
    ids = torch.tensor([[4, 5, 6], [9, 10, 11]])
    plain = target.generate(ids, do_sample=False, max_new_tokens=20, eos_token_id=[], pad_token_id=PAD)
    eos = int(plain[0, 5])                      # row 0 emits it at step 3
    expected = target.generate(ids, do_sample=False, max_new_tokens=20, eos_token_id=[eos], pad_token_id=PAD)
    out = SpecDecoder(*pair, InContextPolicy(capacity=32), 4).generate(
        ids, max_new_tokens=20, eos_token_id=[eos], pad_token_id=PAD)
    assert torch.equal(out.sequences, expected)
    assert out.stats.num_committed == int((expected[:, 3:] != PAD).sum()) - 2   # minus the prefill tokens


def test_row20_out_of_memory_names_the_sizes(pair, monkeypatch):
    decoder = SpecDecoder(*pair, InContextPolicy(capacity=32), 3)

    def boom(*args, **kwargs):
        raise torch.OutOfMemoryError("CUDA out of memory")

    monkeypatch.setattr(type(decoder.target), "__call__", lambda self, *a, **k: boom())
    with pytest.raises(torch.OutOfMemoryError, match="batch=1, K=3"):
        decoder.generate(torch.tensor([[4, 5]]), max_new_tokens=4)


def test_unsupported_attention_implementation(pair):
    model = tiny_model("llama")
    model.config._attn_implementation = "flash_attention_2"
    with pytest.raises(ValueError, match="attention implementation"):
        SpecDecoder(model, pair[1], FullVocab(), 2)
