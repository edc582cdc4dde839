"""Issue 10, the items fixed in the engine / model backend / decoder constructor (items 2, 4, 8, 12, and the
constructor's option checks of item 9), tested end to end against transformers.

  2. Families whose config sets `sliding_window` without `layer_types` (Phi-3, Starcoder2, Mixtral): greedy
     `SpecDecoder` output equals `model.generate` on sequences longer than the window (6), float64 tiny
     models. A control checks the window really changes these models' greedy output.
  4. +inf or all -inf target logits while sampling raise (transformers' multinomial raises there) instead of
     emitting token 0; greedy decoding takes the argmax as transformers does.
  8. K = 10**6 with max_new_tokens = 3 finishes in seconds (K capped by the remaining budget).
 12. No "`past_key_values` is deprecated" FutureWarning from a generate call.
  9. SpecDecoder's scalar options are type-checked (`microspec.inputs.check_decoder_options`).
"""
from __future__ import annotations

import functools
import time
import warnings

import pytest
import torch
from torch import nn
from transformers import (MixtralConfig, MixtralForCausalLM, Phi3Config, Phi3ForCausalLM, Starcoder2Config,
                          Starcoder2ForCausalLM)

from microspec import SpecDecoder
from microspec.policies import FullVocab, InContextPolicy, StaticFrequencyPolicy

from tiny_models import BOS, EOS, PAD, VOCAB, MarkovLM, noisy_copy, tiny_model

WINDOW = 6
_COMMON = dict(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
               num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512, bos_token_id=BOS,
               eos_token_id=EOS, pad_token_id=PAD, attn_implementation="sdpa", initializer_range=0.1)
WINDOWED = {
    "phi3": (Phi3Config, Phi3ForCausalLM, {}),
    "starcoder2": (Starcoder2Config, Starcoder2ForCausalLM, {"tie_word_embeddings": False}),
    "mixtral": (MixtralConfig, MixtralForCausalLM, {"num_local_experts": 2, "num_experts_per_tok": 1,
                                                     "experts_implementation": "eager"}),
}


def _windowed(family: str, window: int | None = WINDOW, seed: int = 0):
    config_cls, model_cls, extra = WINDOWED[family]
    torch.manual_seed(seed)
    model = model_cls(config_cls(**_COMMON, **extra, sliding_window=window)).double().eval()
    with torch.no_grad():
        model.get_output_embeddings().weight.mul_(8.0)
    return model


PROMPT = torch.tensor([[4, 5, 6, 7, 8], [9, 10, 11, 12, 13]])      # equal lengths: no padding inside a window
NEW = 25                                                            # 30 positions: five windows


@functools.lru_cache(maxsize=None)
def _reference(family: str):
    """(target, transformers' greedy output) for one family, built once per session."""
    target = _windowed(family)
    expected = target.generate(PROMPT, attention_mask=torch.ones_like(PROMPT), do_sample=False,
                               max_new_tokens=NEW, eos_token_id=[], pad_token_id=PAD)
    return target, expected


@pytest.mark.parametrize("family", sorted(WINDOWED))
def test_item2_control_the_window_changes_greedy_output(family):
    target, expected = _reference(family)
    unwindowed = _windowed(family, window=None)
    unwindowed.load_state_dict(target.state_dict())
    plain = unwindowed.generate(PROMPT, attention_mask=torch.ones_like(PROMPT), do_sample=False,
                                max_new_tokens=NEW, eos_token_id=[], pad_token_id=PAD)
    assert not torch.equal(plain, expected), f"{family}: the window of {WINDOW} does not change the output"


# Mixtral's eager experts are slow on a CPU: one case (self-drafting, few steps) covers its window.
CASES = [(f, K, pol) for f in ("phi3", "starcoder2")
         for K, pol in ((1, "full"), (3, "incontext"), (5, "static"))] + [("mixtral", 4, "full")]


@pytest.mark.parametrize("family,K,policy", CASES)
def test_item2_sliding_window_families_equal_transformers_greedy(family, K, policy):
    target, expected = _reference(family)
    make = {"full": FullVocab, "incontext": lambda: InContextPolicy(capacity=24, topk=2),
            "static": lambda: StaticFrequencyPolicy(torch.arange(VOCAB), capacity=40)}[policy]
    drafter = target if policy == "full" else noisy_copy(target, 0.3)
    out = SpecDecoder(target, drafter, make(), K).generate(PROMPT, max_new_tokens=NEW, eos_token_id=[],
                                                            pad_token_id=PAD)
    mismatch = (out.sequences != expected).nonzero()[:3].tolist()
    assert torch.equal(out.sequences, expected), f"{family} K={K} {policy}: first mismatches {mismatch}"


# ------------------------------------------------------------------ item 4: +inf / all -inf while sampling
class _BadHead(nn.Linear):
    """A Markov LM head whose logits become `value` (everywhere, or at `token` only) for rows whose current
    token (the one-hot hidden state) is `trigger`."""

    def __init__(self, head: nn.Linear, value: float, trigger: int, token: int | None):
        super().__init__(head.in_features, head.out_features, bias=False, dtype=head.weight.dtype)
        with torch.no_grad():
            self.weight.copy_(head.weight)
        self.value, self.trigger, self.token = value, trigger, token

    def forward(self, hidden):
        logits = super().forward(hidden)
        hit = (hidden[..., self.trigger] > 0.5).unsqueeze(-1)                          # [B, T, 1]
        if self.token is not None:
            hit = hit & (torch.arange(logits.shape[-1], device=logits.device) == self.token)
        return logits.masked_fill(hit, self.value)


def _bad_logits_lm(probs, value: float, trigger: int, token: int | None = None) -> MarkovLM:
    model = MarkovLM(probs)
    model.lm_head = _BadHead(model.lm_head, value, trigger, token)
    return model


V8 = 8
TO_5 = torch.full((V8, V8), 0.1, dtype=torch.float64)
TO_5[:, 5] = 0.3                                     # every state's most likely successor is 5


@pytest.mark.parametrize("value,token", [(float("inf"), 3), (float("-inf"), None)],
                         ids=["plus-inf-at-one-token", "all-minus-inf"])
@pytest.mark.parametrize("where", ["prefill", "decode"])
def test_item4_invalid_target_logits_raise_while_sampling(value, token, where):
    trigger = 3 if where == "prefill" else 5           # the prompt is token 3; 5 is reached while decoding
    target = _bad_logits_lm(TO_5, value, trigger, token)
    dec = SpecDecoder(target, MarkovLM(TO_5), StaticFrequencyPolicy(torch.arange(V8), 4), 2)
    with pytest.raises(FloatingPointError, match="target"):
        dec.generate(torch.full((16, 1), 3), max_new_tokens=8, do_sample=True, eos_token_id=[],
                     generator=torch.Generator().manual_seed(0))


def test_item4_greedy_takes_the_argmax_of_a_plus_inf_row_as_transformers_does():
    target = _bad_logits_lm(TO_5, float("inf"), trigger=3, token=6)
    dec = SpecDecoder(target, MarkovLM(TO_5), FullVocab(), 2)
    out = dec.generate(torch.full((2, 1), 3), max_new_tokens=3, eos_token_id=[])
    assert out.sequences[:, 1].tolist() == [6, 6]


# ------------------------------------------------------------------ item 8: K is capped by the budget
@pytest.mark.timeout(120)
def test_item8_huge_K_with_a_small_budget_finishes_fast():
    target = tiny_model("llama")
    ids = torch.tensor([[4, 5, 6]])
    expected = target.generate(ids, do_sample=False, max_new_tokens=3, eos_token_id=[], pad_token_id=PAD)
    t0 = time.perf_counter()
    out = SpecDecoder(target, noisy_copy(target, 0.3), InContextPolicy(capacity=32), 10**6).generate(
        ids, max_new_tokens=3, eos_token_id=[])
    assert torch.equal(out.sequences, expected)
    assert time.perf_counter() - t0 < 30, "K was not capped by the remaining budget"


# ------------------------------------------------------------------ item 12: no deprecation warning
def test_item12_generate_emits_no_past_key_values_deprecation():
    target = tiny_model("llama")
    dec = SpecDecoder(target, noisy_copy(target, 0.3), InContextPolicy(capacity=32), 3)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        dec.generate(torch.tensor([[4, 5, 6]]), max_new_tokens=6)
    bad = [str(w.message) for w in caught if "past_key_values" in str(w.message)]
    assert not bad, bad[0]


# ------------------------------------------------------------------ item 9: the constructor's options
@pytest.mark.parametrize("kwargs,err", [
    ({"cuda_graph": "yes"}, TypeError), ({"compile": 1}, TypeError), ({"async_gather": None}, TypeError),
    ({"head_mode": "bogus"}, ValueError), ({"prefill_chunk": 0}, ValueError),
    ({"prefill_chunk": 4.0}, (TypeError, ValueError)),
])
def test_item9_decoder_options_are_checked(kwargs, err):
    target = tiny_model("llama")
    with pytest.raises(err):
        SpecDecoder(target, target, InContextPolicy(capacity=8), 2, **kwargs)
