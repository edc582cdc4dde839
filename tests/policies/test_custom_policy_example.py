"""The policy of docs/custom_policy.md passes the contract and decodes losslessly: the docs stay runnable."""
import importlib.util
from pathlib import Path

import torch

from microspec import SpecDecoder
from microspec.testing import PolicyContract
from tiny_models import EOS, PAD, noisy_copy, tiny_model

_spec = importlib.util.spec_from_file_location(
    "prompt_vocab_policy", Path(__file__).parents[2] / "docs" / "examples" / "prompt_vocab_policy.py")
example = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(example)


class TestPromptVocabPolicy(PolicyContract):
    def make_policy(self):
        return example.PromptVocabPolicy(capacity=8)


def test_prompt_vocab_policy_is_lossless():
    target = tiny_model("qwen2")
    ids = torch.randint(3, 100, (3, 7))
    expected = target.generate(ids, do_sample=False, max_new_tokens=20, eos_token_id=[EOS], pad_token_id=PAD)
    out = SpecDecoder(target, noisy_copy(target, 0.2), example.PromptVocabPolicy(capacity=16), 3).generate(
        ids, max_new_tokens=20, eos_token_id=[EOS], pad_token_id=PAD)
    assert torch.equal(out.sequences, expected)
    assert out.stats.mean_active_size <= 8
