"""The whole loop with the EAGLE drafter: chains and EAGLE-2 trees through `SpecDecoder`.

* Greedy output equals the target's own greedy output (Hugging Face `generate`) for three families, several
  tree shapes (top_k 1..10, depth 1..8, total tokens 1..64), capacities from 1 to V, batch 1 and 4 ragged,
  on both backends where the family has a lean one.
* A degenerate tree (top_k 1, depth d) drafts exactly what a chain of d drafts does: same output, same
  accepted lengths.
* Sampling with a tree follows the target's distribution: the joint law of the first two new tokens over
  many rows (goodness of fit against the target's exact probabilities, enumerated).
* Bad tree parameters get one clear error before any work.
"""
import numpy as np
import pytest
import torch
from stats import assert_fits
from tiny_models import EOS, PAD, VOCAB, tiny_model

from microspec import SpecDecoder
from microspec.drafting.eagle import EagleDrafter
from microspec.drafting.tree import TreeSpec
from microspec.policies import FullVocab, InContextPolicy, StaticFrequencyPolicy

SHAPES = [TreeSpec(1, 1, 2), TreeSpec(1, 4, 5), TreeSpec(3, 3, 8), TreeSpec(10, 2, 11), TreeSpec(4, 8, 30),
          TreeSpec(8, 4, 64), TreeSpec(2, 2, 1)]


def _prompts(batch: int, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, VOCAB, (batch, 9), generator=g)
    mask = torch.ones_like(ids)
    if batch > 1:
        mask[1, :4] = 0
        mask[-1, :2] = 0
    return ids, mask


@pytest.fixture(scope="module")
def drafters():
    out = {}
    for family in ("llama", "qwen2", "gemma"):
        target = tiny_model(family)
        out[family] = (target, EagleDrafter.from_target(target, seed=1).double())
    return out


# (family, tree, policy index): every family, every shape and every policy kind at least once.
CASES = [("llama", SHAPES[0], 0), ("llama", SHAPES[4], 2), ("qwen2", SHAPES[1], 1), ("qwen2", SHAPES[5], 3),
         ("gemma", SHAPES[2], 2), ("gemma", SHAPES[3], 0), ("llama", SHAPES[6], 1)]


def _policy(i: int):
    ranking = torch.randperm(VOCAB, generator=torch.Generator().manual_seed(2))
    return [FullVocab(), InContextPolicy(1, topk=2), InContextPolicy(24, topk=2, tree_ids=True),
            StaticFrequencyPolicy(ranking, VOCAB)][i]


@pytest.mark.parametrize("family, tree, policy", CASES, ids=lambda c: str(c))
def test_tree_greedy_equals_target_greedy(drafters, family, tree, policy):
    target, drafter = drafters[family]
    for batch in (1, 4):
        ids, mask = _prompts(batch)
        expected = target.generate(ids, attention_mask=mask, do_sample=False, max_new_tokens=20,
                                   eos_token_id=EOS, pad_token_id=PAD)
        dec = SpecDecoder(target, drafter, _policy(policy), 3, tree=tree)
        out = dec.generate(ids, attention_mask=mask, max_new_tokens=20, eos_token_id=EOS, pad_token_id=PAD)
        assert torch.equal(out.sequences, expected), (family, tree, policy, batch)


@pytest.mark.parametrize("backend", ["hf", "lean"])
@pytest.mark.parametrize("depth", [1, 3, 6])
def test_degenerate_tree_is_the_chain(drafters, backend, depth):
    target, drafter = drafters["llama"]
    ids, mask = _prompts(4, seed=1)
    outs = []
    for tree in (None, TreeSpec(top_k=1, depth=depth, total_tokens=depth + 1)):
        dec = SpecDecoder(target, drafter, InContextPolicy(48, topk=2), depth, tree=tree, backend=backend)
        outs.append(dec.generate(ids, attention_mask=mask, max_new_tokens=24, eos_token_id=[]))
    assert torch.equal(outs[0].sequences, outs[1].sequences)
    assert outs[0].stats.accepted_histogram == outs[1].stats.accepted_histogram
    assert outs[0].stats.mean_accepted_length == outs[1].stats.mean_accepted_length


def _exact_pair_law(target, prompt: torch.Tensor, temperature: float) -> np.ndarray:
    """P(x1, x2 | prompt) of the target's processed (temperature) distribution, enumerated: [V * V]."""
    with torch.no_grad():
        first = torch.softmax(target(prompt).logits[0, -1] / temperature, -1)                 # [V]
        ctx = torch.cat([prompt.expand(VOCAB, -1), torch.arange(VOCAB).unsqueeze(1)], 1)       # [V, L+1]
        second = torch.softmax(target(ctx).logits[:, -1] / temperature, -1)                   # [V, V]
    return (first.unsqueeze(1) * second).flatten().numpy()


@pytest.mark.slow
@pytest.mark.parametrize("policy", ["full", "incontext"])
def test_tree_sampling_follows_the_target(drafters, policy):
    """20,000 rows, one batch: the first two committed tokens' joint counts against the exact law (G-test at
    the suite's alpha). The drafter is random, so acceptance is partial and both the sibling test's accept
    and reject branches are exercised."""
    target, drafter = drafters["llama"]
    prompt = torch.tensor([[5, 9, 17, 4]])
    N, T = 20_000, 0.9
    pol = FullVocab() if policy == "full" else InContextPolicy(12, topk=2, tree_ids=True)
    dec = SpecDecoder(target, drafter, pol, 3, tree=TreeSpec(top_k=3, depth=2, total_tokens=6))
    out = dec.generate(prompt.expand(N, -1), max_new_tokens=2, do_sample=True, temperature=T, eos_token_id=[],
                       generator=torch.Generator().manual_seed(7))
    pairs = out.sequences[:, -2:]
    counts = np.bincount((pairs[:, 0] * VOCAB + pairs[:, 1]).numpy(), minlength=VOCAB * VOCAB)
    assert_fits(counts, _exact_pair_law(target, prompt, T), 1e-4, label=f"tree sampling ({policy})")


@pytest.mark.parametrize("kwargs, error", [
    (dict(top_k=0), ValueError), (dict(depth=0), ValueError), (dict(total_tokens=10_000), ValueError),
    (dict(top_k=2.5), TypeError)])
def test_bad_tree_parameters_are_refused_up_front(kwargs, error):
    with pytest.raises(error):
        TreeSpec(**kwargs)


def test_a_tree_needs_a_feature_drafter(drafters):
    target, _ = drafters["llama"]
    with pytest.raises(ValueError, match="feature drafter"):
        SpecDecoder(target, target, FullVocab(), 3, tree=TreeSpec())
    with pytest.raises(TypeError, match="TreeSpec"):
        SpecDecoder(target, EagleDrafter.from_target(target), FullVocab(), 3, tree=(10, 6, 60))
