"""TESTING.md §4, the bad-input table, for `SpecDecoder` (rows on kernels, policies, token maps and sampling
live beside those tests), and issue 10's items on the public API (the `test_item*` tests). "Raise" means
before any model runs (checked with `no_model_work`), with a one-line message naming the value."""
import contextlib

import pytest
import torch

from microspec import SpecDecoder, check_vocabularies
from microspec.inputs import NOT_GIVEN, check_generator, resolve_special_ids
from microspec.policies import FullVocab, InContextPolicy, VocabPolicy
from tiny_models import EOS, PAD, VOCAB, noisy_copy, tiny_model


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
    (torch.zeros(1, 0, dtype=torch.long), "non-empty"),
    (torch.zeros(2, 3, 4, dtype=torch.long), "non-empty")])
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
        decoder.generate(torch.tensor([[4, 5]]), attention_mask=torch.ones(1, 3, dtype=torch.long),
                         max_new_tokens=4)


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


def test_row20_out_of_memory_names_the_sizes(pair):
    decoder = SpecDecoder(*pair, InContextPolicy(capacity=32), 3)

    def boom(*args, **kwargs):
        raise torch.OutOfMemoryError("CUDA out of memory")

    decoder.target.forward = boom                        # the first model work, whatever the backend
    try:
        with pytest.raises(torch.OutOfMemoryError, match="batch=1, K=3"):
            decoder.generate(torch.tensor([[4, 5]]), max_new_tokens=4)
    finally:
        del decoder.target.forward


def test_unsupported_attention_implementation(pair):
    """The Hugging Face backend runs the model's own attention and needs the 4-D masks of sdpa/eager; the lean
    backend (what "auto" picks for Llama) has its own attention and does not depend on the setting."""
    model = tiny_model("llama")
    model.config._attn_implementation = "flash_attention_2"
    with pytest.raises(ValueError, match="attention implementation"):
        SpecDecoder(model, pair[1], FullVocab(), 2, backend="hf")
    assert SpecDecoder(model, pair[1], FullVocab(), 2).target.name == "lean"


# ==================================================================== issue 10 on the public API
@contextlib.contextmanager
def no_model_work(*models, decoder=None):
    """Fail the test if any module of `models`, or the model backends of `decoder` (whatever code runs the
    weights: the Hugging Face modules or the lean backend), runs a forward inside the block."""
    def boom(*args, **kwargs):
        raise AssertionError("a model ran before the inputs were checked")

    handles = [m.register_forward_pre_hook(boom) for model in models for m in model.modules()]
    backends = [] if decoder is None else [decoder.target, getattr(decoder.proposer, "backend", None)]
    patched = [b for b in backends if b is not None and hasattr(b, "forward")]
    for b in patched:
        b.forward = boom
    try:
        yield
    finally:
        for h in handles:
            h.remove()
        for b in patched:
            del b.forward                      # back to the class's method


IDS = torch.tensor([[4, 5, 6], [7, 8, 9]])


def test_the_no_model_work_guard_trips_on_a_valid_call(decoder, pair):
    with no_model_work(*pair, decoder=decoder), pytest.raises(AssertionError, match="a model ran"):
        decoder.generate(IDS, max_new_tokens=4)
    decoder.generate(IDS, max_new_tokens=2)                    # and is gone afterwards
BAD_GENERATE_ARGS = [
    # (id, kwargs, error, message fragment)
    ("max_new-bool", {"max_new_tokens": True}, TypeError, "max_new_tokens must be an int"),
    ("max_new-float", {"max_new_tokens": 4.0}, TypeError, "max_new_tokens must be an int"),
    ("do_sample-int", {"do_sample": 1}, TypeError, "do_sample must be True or False"),
    ("temperature-str", {"do_sample": True, "temperature": "1"}, TypeError, "temperature"),
    ("temperature-nan", {"do_sample": True, "temperature": float("nan")}, ValueError, "temperature"),
    ("temperature-inf", {"do_sample": True, "temperature": float("inf")}, ValueError, "temperature"),
    ("top_k-float", {"do_sample": True, "top_k": 2.0}, TypeError, "top_k"),
    ("top_k-bool", {"do_sample": True, "top_k": True}, TypeError, "top_k"),
    ("top_p-bool", {"do_sample": True, "top_p": True}, TypeError, "top_p"),
    ("top_p-zero", {"do_sample": True, "top_p": 0.0}, ValueError, "top_p"),
    ("eos-2.7", {"eos_token_id": 2.7}, TypeError, "eos_token_id"),           # item 6: was truncated to 2
    ("eos-bool", {"eos_token_id": True}, TypeError, "eos_token_id"),
    ("eos-float-list", {"eos_token_id": [2, 3.0]}, TypeError, "eos_token_id"),
    ("eos-float-tensor", {"eos_token_id": torch.tensor([2.0])}, TypeError, "eos_token_id"),
    ("eos-str", {"eos_token_id": "2"}, TypeError, "eos_token_id"),
    ("eos-negative", {"eos_token_id": [-1]}, ValueError, "eos_token_id -1"),
    ("pad-float", {"pad_token_id": 0.5}, TypeError, "pad_token_id"),
    ("pad-negative", {"pad_token_id": -1}, ValueError, "pad_token_id"),
    ("pad-beyond", {"pad_token_id": VOCAB}, ValueError, "pad_token_id"),
    ("generator-int", {"generator": 42}, TypeError, "generator must be a torch.Generator"),   # item 10
    ("generator-list-int", {"generator": [torch.Generator(), 7]}, TypeError, "generator"),
    ("streamer-object", {"streamer": object()}, TypeError, "streamer"),
    ("streamer-batch", {"streamer": type("S", (), {"put": print, "end": print})()}, ValueError, "one row"),
    ("mask-list", {"attention_mask": [[1, 1, 1], [1, 1, 1]]}, TypeError, "attention_mask"),   # item 9
    ("mask-float", {"attention_mask": torch.ones(2, 3)}, TypeError, "attention_mask"),
    ("mask-values", {"attention_mask": torch.full((2, 3), 2)}, ValueError, "only 0 and 1"),
]


@pytest.mark.parametrize("kwargs,err,match", [c[1:] for c in BAD_GENERATE_ARGS],
                         ids=[c[0] for c in BAD_GENERATE_ARGS])
def test_item6_9_10_generate_refuses_bad_arguments_before_model_work(decoder, pair, kwargs, err, match):
    with no_model_work(*pair, decoder=decoder), pytest.raises(err, match=match) as info:
        decoder.generate(IDS, **{"max_new_tokens": 4, **kwargs})
    assert "\n" not in str(info.value)


@pytest.mark.parametrize("ids", [[[4, 5, 6]], torch.tensor([[4, 5, 6]], device="meta")])
def test_item9_prompt_must_be_a_real_tensor(decoder, pair, ids):
    with no_model_work(*pair, decoder=decoder), pytest.raises((TypeError, ValueError), match="input_ids"):
        decoder.generate(ids, max_new_tokens=4)


def test_item10_policy_asking_for_more_topk_than_the_vocabulary_fails_before_prefill(pair):
    decoder = SpecDecoder(*pair, InContextPolicy(capacity=32, topk=500), 2)
    with no_model_work(*pair, decoder=decoder), pytest.raises(ValueError, match="top-500"):
        decoder.generate(IDS, max_new_tokens=4)


def test_item10_generator_on_another_device_is_refused():
    with pytest.raises(ValueError, match="generator is on cpu"):
        check_generator(torch.Generator(), 1, "cuda")
    check_generator([torch.Generator(), torch.Generator()], 2, "cpu")


@pytest.mark.parametrize("chunk", [0, -1, 2.5, True])
def test_item9_prefill_chunk_is_checked(pair, chunk):
    with pytest.raises((TypeError, ValueError), match="prefill_chunk"):
        SpecDecoder(*pair, FullVocab(), 2, prefill_chunk=chunk)


def test_item9_tokenizer_given_as_a_path_is_refused(pair, tmp_path):
    for tok in ("../shared/models/smollm2", tmp_path):
        with pytest.raises(TypeError, match="load it first"):
            SpecDecoder(*pair, FullVocab(), 2, tokenizer=tok)
    with pytest.raises(TypeError, match="get_vocab"):
        check_vocabularies(*pair, tokenizer=object())


def test_item7_structural_check_also_runs_with_equal_distinct_tokenizers(pair):
    a = _Tok({f"t{i}": i for i in range(VOCAB)})
    big = tiny_model("llama", vocab_size=5000)
    with pytest.raises(ValueError, match="differ by more than"):
        SpecDecoder(pair[0], big, FullVocab(), 2, tokenizer=a, drafter_tokenizer=_Tok(a.vocab))
    with pytest.raises(ValueError, match="differ by more than"):
        check_vocabularies(pair[0], big, a, a)
    with pytest.raises(ValueError, match="tokenizer has 1000 entries"):       # the tokenizer of another model
        check_vocabularies(*pair, _Tok({f"t{i}": i for i in range(1000)}))


def test_item7_models_must_be_modules_with_a_head(pair):
    with pytest.raises(TypeError, match="target must be a torch.nn.Module"):
        check_vocabularies("model-path", pair[1])


# ---------------------------------------------------------------- item 13: eos_token_id=None, as transformers
@pytest.fixture(scope="module")
def qwen_with_eos():
    """A tiny Qwen2 whose generation config's EOS is a token it emits early in greedy decoding."""
    target = tiny_model("qwen2", seed=3)
    ids = torch.tensor([[4, 5, 6, 7], [9, 10, 11, 12]])
    plain = target.generate(ids, do_sample=False, max_new_tokens=24, eos_token_id=None, pad_token_id=PAD)
    eos = int(plain[0, 4 + 5])                     # row 0's sixth new token
    target.generation_config.eos_token_id = eos
    target.generation_config.pad_token_id = PAD
    return target, ids, plain, SpecDecoder(target, noisy_copy(target, 0.3), InContextPolicy(capacity=32), 3)


@pytest.mark.parametrize("eos_arg", ["not given", None, []])
@pytest.mark.parametrize("pad_arg", ["not given", None])
def test_item13_eos_and_pad_follow_transformers_generate(qwen_with_eos, eos_arg, pad_arg):
    target, ids, plain, decoder = qwen_with_eos
    kwargs = {}
    if eos_arg != "not given":
        kwargs["eos_token_id"] = eos_arg
    if pad_arg != "not given":
        kwargs["pad_token_id"] = pad_arg
    if eos_arg == [] and pad_arg is None:
        pytest.skip("transformers itself fails here (pad = eos[0] of an empty list)")
    expected = target.generate(ids, attention_mask=torch.ones_like(ids), do_sample=False, max_new_tokens=24,
                               **kwargs)
    out = decoder.generate(ids, max_new_tokens=24, **kwargs)
    assert torch.equal(out.sequences, expected), (eos_arg, pad_arg, out.sequences, expected)
    # the generation config's EOS stops rows only when eos_token_id is not given
    assert torch.equal(expected, plain) == (eos_arg != "not given")


def test_item13_resolve_special_ids_semantics():
    gen = type("Gen", (), {"eos_token_id": [EOS, 7], "pad_token_id": 0})()
    assert resolve_special_ids(NOT_GIVEN, NOT_GIVEN, gen, VOCAB) == ([EOS, 7], 0)
    assert resolve_special_ids(None, NOT_GIVEN, gen, VOCAB) == ([], 0)
    assert resolve_special_ids(None, None, gen, VOCAB) == ([], 0)
    assert resolve_special_ids(NOT_GIVEN, None, gen, VOCAB) == ([EOS, 7], EOS)     # pad falls back to EOS
    assert resolve_special_ids(5, 9, gen, VOCAB) == ([5], 9)
    with pytest.raises(ValueError, match="generation_config"):
        resolve_special_ids(NOT_GIVEN, NOT_GIVEN, type("Gen", (), {"eos_token_id": VOCAB})(), VOCAB)
