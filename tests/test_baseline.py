"""The plain-decoding baseline produces exactly Hugging Face's greedy output (it is the denominator of every
speed-up, so it must decode the same thing)."""
import pytest
import torch

from microspec.baseline import PlainDecoder
from tiny_models import EOS, FAMILIES, PAD, VOCAB, tiny_model


@pytest.mark.parametrize("family", sorted(FAMILIES))
@pytest.mark.parametrize("max_new", [1, 2, 37])
def test_plain_decoder_equals_hf_greedy(family, max_new):
    model = tiny_model(family)
    ids = torch.randint(3, VOCAB, (4, 9))
    mask = torch.ones_like(ids)
    mask[1, :3] = mask[2, :6] = 0
    ids = ids.masked_fill(mask == 0, PAD)
    expected = model.generate(ids, attention_mask=mask, do_sample=False, max_new_tokens=max_new,
                              eos_token_id=[EOS], pad_token_id=PAD)
    out = PlainDecoder(model).generate(ids, mask, max_new_tokens=max_new, eos_token_id=[EOS],
                                       pad_token_id=PAD)
    assert torch.equal(out, expected)


def test_rows_stop_at_eos():
    model = tiny_model("llama")
    ids = torch.randint(3, VOCAB, (2, 5))
    plain = model.generate(ids, do_sample=False, max_new_tokens=20, eos_token_id=[], pad_token_id=PAD)
    eos = int(plain[0, 8])
    expected = model.generate(ids, do_sample=False, max_new_tokens=20, eos_token_id=[eos], pad_token_id=PAD)
    assert torch.equal(PlainDecoder(model).generate(ids, max_new_tokens=20, eos_token_id=[eos],
                                                    pad_token_id=PAD), expected)
