"""Greedy `SpecDecoder` output == `target.generate(do_sample=False)`, token for token (TESTING.md R5a).

Tiny random models in float64 (so near-ties of the target's top-2 logits are practically impossible), several
families, K in 1..8, capacities from 1 to V, batch 1 and 4 with ragged left-padded prompts, budgets
{1, K, K+1, 37}, EOS ids that stop rows early, drafters that agree fully, partly or not at all.
"""
import functools

import pytest
import torch
from hypothesis import example, given, settings
from hypothesis import strategies as st

from microspec import SpecDecoder
from microspec.policies import FullVocab, InContextPolicy, StaticFrequencyPolicy
from tiny_models import EOS, FAMILIES, PAD, VOCAB, noisy_copy, tiny_model


@functools.lru_cache(maxsize=None)
def models(family: str):
    target = tiny_model(family, seed=0)
    return {"same": target, "noisy": noisy_copy(target, 0.5), "random": tiny_model(family, seed=7)}


def make_prompts(batch: int, seed: int):
    g = torch.Generator().manual_seed(seed)
    L = 9
    ids = torch.randint(3, VOCAB, (batch, L), generator=g)
    lengths = torch.randint(1, L + 1, (batch,), generator=g)
    lengths[0] = L
    mask = (torch.arange(L) >= (L - lengths).unsqueeze(1)).long()     # left padding
    return ids.masked_fill(mask == 0, PAD), mask


def make_policy(kind: str, capacity: int):
    capacity = min(capacity, VOCAB)
    if kind == "full":
        return FullVocab()
    if kind == "static":
        return StaticFrequencyPolicy(torch.randperm(VOCAB, generator=torch.Generator().manual_seed(3)),
                                     capacity)
    eviction = {"lru": "lru", "fifo": "fifo", "grow": None}[kind]
    return InContextPolicy(capacity=capacity, topk=3 if capacity > 4 else 0, eviction=eviction)


@functools.lru_cache(maxsize=None)
def reference(family, batch, seed, max_new, eos):
    ids, mask = make_prompts(batch, seed)
    out = models(family)["same"].generate(ids, attention_mask=mask, do_sample=False, max_new_tokens=max_new,
                                          eos_token_id=list(eos), pad_token_id=PAD)
    return ids, mask, out


def check(family, drafter, policy_kind, capacity, K, batch, max_new, seed, early_eos):
    eos = (EOS,)
    if early_eos:  # an id the target really emits, so some rows stop mid-way
        eos = (int(reference(family, batch, seed, max_new, eos)[2][0, -max(1, max_new // 2)]),)
    ids, mask, expected = reference(family, batch, seed, max_new, eos)
    decoder = SpecDecoder(models(family)["same"], models(family)[drafter],
                          make_policy(policy_kind, capacity), K)
    out = decoder.generate(ids, attention_mask=mask, max_new_tokens=max_new, eos_token_id=list(eos),
                           pad_token_id=PAD)
    if not torch.equal(out.sequences, expected):
        diff = ((out.sequences != expected).nonzero()[:5].tolist()
                if out.sequences.shape == expected.shape else None)
        pytest.fail(f"mismatch: shapes {tuple(out.sequences.shape)} vs {tuple(expected.shape)}, "
                    f"first diffs {diff}")
    return out


@settings(max_examples=60)
@given(family=st.sampled_from(sorted(FAMILIES)), drafter=st.sampled_from(["same", "noisy", "random"]),
       policy_kind=st.sampled_from(["full", "static", "lru", "fifo", "grow"]),
       capacity=st.sampled_from([1, 2, 7, 40, VOCAB]), K=st.integers(1, 8), batch=st.sampled_from([1, 4]),
       budget=st.sampled_from(["1", "K", "K+1", "37"]), seed=st.integers(0, 3), early_eos=st.booleans())
@example(family="llama", drafter="noisy", policy_kind="lru", capacity=7, K=4, batch=4, budget="37", seed=0,
         early_eos=True)
@example(family="qwen2", drafter="same", policy_kind="static", capacity=1, K=8, batch=4, budget="K+1", seed=1,
         early_eos=False)
@example(family="mistral", drafter="random", policy_kind="fifo", capacity=2, K=1, batch=1, budget="1", seed=2,
         early_eos=False)
@example(family="gemma", drafter="noisy", policy_kind="grow", capacity=VOCAB, K=5, batch=4, budget="K",
         seed=3, early_eos=True)
def test_greedy_equals_target_generate(family, drafter, policy_kind, capacity, K, batch, budget, seed,
                                       early_eos):
    max_new = {"1": 1, "K": K, "K+1": K + 1, "37": 37}[budget]
    check(family, drafter, policy_kind, capacity, K, batch, max_new, seed, early_eos)


@pytest.mark.parametrize("family", sorted(FAMILIES))
@pytest.mark.parametrize("K", [1, 3, 8])
def test_drafter_equal_to_target_accepts_every_draft(family, K):
    """Oracle: with the target as its own drafter and the full vocabulary every step accepts all K."""
    out = check(family, "same", "full", VOCAB, K, 4, 37, seed=0, early_eos=False)
    hist = out.stats.accepted_histogram
    assert hist[K] == out.stats.num_row_steps and sum(hist) == hist[K], hist
    assert out.stats.acceptance_rate == 1.0 and out.stats.mean_accepted_length == K + 1
    assert out.stats.coverage == 1.0


def test_tiny_active_set_accepts_almost_nothing_but_stays_exact():
    out = check("llama", "same", "lru", 1, 4, 4, 37, seed=1, early_eos=False)
    assert out.stats.mean_active_size == 1.0          # only EOS fits
    assert out.stats.acceptance_rate < 0.1, out.stats


@pytest.mark.parametrize("policy_kind,capacity", [("lru", 12), ("fifo", 20), ("static", 30), ("grow", 40)])
def test_coverage_explains_every_rejection_of_a_self_drafter(policy_kind, capacity):
    """With the target as drafter, a draft is rejected only when the target's choice was outside the active
    set, and that correction token is committed uncovered: so uncovered commits >= rejecting row-steps
    (up to one budget-cut final step per row)."""
    K, batch = 4, 4
    out = check("llama", "same", policy_kind, capacity, K, batch, 37, seed=2, early_eos=False)
    s = out.stats
    uncovered = round((1 - s.coverage) * s.num_committed)
    rejecting = s.num_row_steps - s.accepted_histogram[K]
    assert rejecting > 0 and s.coverage < 1.0, s
    assert uncovered >= rejecting - batch, s
    assert s.mean_active_size <= capacity


@pytest.mark.parametrize("drafter_vocab", [VOCAB + 5, VOCAB - 3])
def test_padded_or_smaller_drafter_vocabulary(drafter_vocab):
    """Same tokenizer, different embedding padding (TESTING.md row 2): accepted silently; the active set
    stays below min(V_draft, V_target) and the target's distribution is untouched."""
    target = models("llama")["same"]
    drafter = tiny_model("llama", seed=0, vocab_size=drafter_vocab)
    ids, mask, expected = reference("llama", 4, 0, 37, (EOS,))
    decoder = SpecDecoder(target, drafter, InContextPolicy(capacity=VOCAB, topk=3), 3)
    assert decoder.vocab_size == min(VOCAB, drafter_vocab)
    out = decoder.generate(ids, attention_mask=mask, max_new_tokens=37, eos_token_id=[EOS], pad_token_id=PAD)
    assert torch.equal(out.sequences, expected)
    assert int(decoder.policy.active()[0].max()) < decoder.vocab_size


def test_gather_head_mode_is_exact():
    target = models("qwen2")["same"]
    ids, mask, expected = reference("qwen2", 4, 1, 37, (EOS,))
    decoder = SpecDecoder(target, models("qwen2")["noisy"], InContextPolicy(capacity=40), 4,
                          head_mode="gather")
    out = decoder.generate(ids, attention_mask=mask, max_new_tokens=37, eos_token_id=[EOS], pad_token_id=PAD)
    assert torch.equal(out.sequences, expected)


def test_decoder_is_reusable_and_leaves_models_untouched():
    target, drafter = models("llama")["same"], models("llama")["noisy"]
    head_before = drafter.get_output_embeddings()
    decoder = SpecDecoder(target, drafter, InContextPolicy(capacity=40), 3)
    assert drafter.get_output_embeddings() is head_before and target.get_output_embeddings() is not None
    for seed, batch in [(0, 4), (1, 1), (2, 4)]:
        ids, mask, expected = reference("llama", batch, seed, 37, (EOS,))
        out = decoder.generate(ids, attention_mask=mask, max_new_tokens=37, eos_token_id=[EOS],
                               pad_token_id=PAD)
        assert torch.equal(out.sequences, expected)


class _HiddenRecorder(InContextPolicy):
    wants_hidden = True

    def setup(self, *args, **kwargs):
        self.seen = []
        super().setup(*args, **kwargs)

    def on_prefill(self, prompt_ids, prompt_mask, target_topk=None, hidden=None):
        self.seen.append(("prefill", None, None, hidden.clone()))
        super().on_prefill(prompt_ids, prompt_mask, target_topk)

    def on_commit(self, committed_ids, committed_mask, target_topk=None, hidden=None):
        self.seen.append(("commit", committed_ids.clone(), committed_mask.clone(), hidden.clone()))
        super().on_commit(committed_ids, committed_mask, target_topk)


def test_hidden_state_hook_gives_the_state_behind_the_newest_committed_token():
    """`hidden` is the target's final hidden state whose logits chose the newest committed token (greedy)."""
    target = models("llama")["same"]
    ids, mask, expected = reference("llama", 4, 0, 37, (EOS,))
    policy = _HiddenRecorder(capacity=40)
    out = SpecDecoder(target, models("llama")["noisy"], policy, 3).generate(
        ids, attention_mask=mask, max_new_tokens=37, eos_token_id=[EOS], pad_token_id=PAD)
    assert torch.equal(out.sequences, expected)
    head = target.get_output_embeddings().weight.detach()
    first = expected[:, ids.shape[1]]
    kind, _, _, hidden = policy.seen[0]
    assert kind == "prefill" and torch.equal((hidden @ head.T).argmax(-1), first)
    checked = 0
    for kind, tokens, commit_mask, hidden in policy.seen[2:]:          # [1] is the first token's commit
        n = commit_mask.sum(1)
        live = n > 0
        newest = tokens.gather(1, (n - 1).clamp(min=0).unsqueeze(1)).squeeze(1)
        assert torch.equal((hidden @ head.T).argmax(-1)[live], newest[live])
        checked += int(live.sum())
    assert checked > 10
