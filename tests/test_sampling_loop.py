"""The full `SpecDecoder` loop on toy Markov "language models" (TESTING.md R3, R6; §4 rows 8, 10, 22).

`MarkovLM` is a first-order chain dressed as a causal LM: the next-token law is exactly probs[current token],
so the law of generated sequences is known in closed form. Target P and drafter Q are random 8 x 8 transition
matrices with zero entries; generation is batched over N rows (one `generate` call, independent noise per
row).

  G. R3: the empirical joint of (x1, x2, x3) (512 bins) and the per-position marginals / adjacent pairs up to
     T = 8 match the exact laws from P (G-test, alpha = 1e-4), with K in {1, 2, 4} and the policies FullVocab,
     StaticFrequencyPolicy (a 3-id static set) and InContextPolicy (a 3-slot set that changes between blocks),
     with and without EOS (EOS makes the chain absorbing: the row stops and is padded with EOS), and with
     temperature / top-k / top-p (the exact law then uses the processed P).
  H. R6: same seed -> identical sequences (20 repetitions); per-row generators make a batched row equal the
     row run alone; different seeds differ.
  F. NaN logits from the target or the drafter raise FloatingPointError.
"""
from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn
from stats import assert_fits, markov_joint, markov_marginals, pair_joint, sequence_counts, window_joint
from tiny_models import MarkovLM, noisy_copy, tiny_model

from microspec import SpecDecoder
from microspec.policies import FullVocab, InContextPolicy, StaticFrequencyPolicy

ALPHA = 1e-4
V = 8
START = 3
EOS = 6
N_JOINT = 200_000
N_MARGINAL = 100_000


def _random_chain(seed: int, zero_frac: float) -> torch.Tensor:
    rng = np.random.default_rng(seed)
    m = rng.random((V, V)) + 0.05
    m[rng.random((V, V)) < zero_frac] = 0.0
    for i in range(V):                      # at least two successors per state
        if np.count_nonzero(m[i]) < 2:
            m[i, rng.choice(V, 2, replace=False)] = 0.5
    return torch.from_numpy(m / m.sum(1, keepdims=True))


P = _random_chain(0, 0.3)                   # target
Q = _random_chain(1, 0.35)                  # drafter: zeros in other places than P
RANKED = [0, 3, 5, 1, 2, 4, 6, 7]           # frequency ranking: capacity 3 keeps {0, 3, 5} without EOS


def make_policy(name: str):
    return {"full": lambda: FullVocab(),
            "static3": lambda: StaticFrequencyPolicy(torch.tensor(RANKED), capacity=3),
            "incontext3": lambda: InContextPolicy(capacity=3, topk=1)}[name]()


def processed_chain(P: torch.Tensor, temperature=1.0, top_k=None, top_p=None, eos=None) -> np.ndarray:
    """The exact per-state law of the target after temperature -> top-k -> top-p (HF semantics), computed in
    numpy from the same logits MarkovLM emits (log P, -1e4 for zeros); EOS rows made absorbing."""
    P = P.numpy()
    logits = np.where(P > 0, np.log(np.where(P > 0, P, 1.0)), -1e4) / temperature
    if top_k is not None and top_k < V:
        kth = np.sort(logits, axis=1)[:, -top_k][:, None]
        logits = np.where(logits < kth, -np.inf, logits)
    if top_p is not None and top_p < 1.0:
        for i in range(V):
            order = np.argsort(logits[i], kind="stable")
            pr = np.exp(logits[i][order] - logits[i].max())
            cum = np.cumsum(pr / pr.sum())
            drop = cum <= 1.0 - top_p
            drop[-1] = False
            logits[i, order[drop]] = -np.inf
    out = np.exp(logits - logits.max(1, keepdims=True))
    out /= out.sum(1, keepdims=True)
    if eos is not None:
        out[eos] = np.eye(V)[eos]
    return out


def generate(policy, K: int, N: int, T: int, seed: int, eos=None, prompt=None, drafter=None, **sampling):
    """One batched sampled `generate`; returns (new tokens int64 [N, T] padded with EOS, stats)."""
    dec = SpecDecoder(MarkovLM(P), drafter if drafter is not None else MarkovLM(Q), policy, K)
    if prompt is None:
        prompt = torch.full((N, 1), START)
    out = dec.generate(prompt, max_new_tokens=T, do_sample=True, eos_token_id=[] if eos is None else eos,
                       generator=torch.Generator().manual_seed(seed), **sampling)
    new = out.sequences[:, prompt.shape[1]:]
    assert new.shape[1] <= T
    if new.shape[1] < T:
        assert eos is not None, "rows stopped early without EOS"
        new = torch.cat([new, torch.full((N, T - new.shape[1]), eos)], 1)
    return new.numpy(), out.stats


# ============================================================================ G. R3 joint of (x1, x2, x3)
JOINT_CASES = [
    # (policy, K, eos, sampling kwargs)
    *[(pol, K, None, {}) for pol in ("full", "static3", "incontext3") for K in (1, 2, 4)],
    ("full", 2, EOS, {}),
    ("static3", 1, EOS, {}),
    ("incontext3", 4, EOS, {}),
    ("static3", 2, None, {"temperature": 0.7, "top_k": 3}),
    ("incontext3", 4, None, {"temperature": 0.7, "top_k": 3}),
    ("full", 2, EOS, {"temperature": 1.3, "top_p": 0.8}),
    ("incontext3", 2, None, {"temperature": 0.7, "top_k": 3, "top_p": 0.9}),
]


def _case_id(case) -> str:
    pol, K, eos, kw = case
    return f"{pol}-K{K}" + ("-eos" if eos is not None else "") + "".join(f"-{k}{v}" for k, v in kw.items())


@pytest.mark.parametrize("case", JOINT_CASES, ids=_case_id)
def test_r3_joint_of_three_tokens(case):
    pol, K, eos, kw = case
    T = 3
    seqs, stats = generate(make_policy(pol), K, N_JOINT, T, seed=1 + JOINT_CASES.index(case), eos=eos, **kw)
    chain = processed_chain(P, eos=eos, **kw)
    assert_fits(sequence_counts(seqs, V), markov_joint(chain, START, T), ALPHA,
                label=f"R3 joint {_case_id(case)}")
    assert 0.0 <= stats.acceptance_rate <= 1.0
    if pol != "full":                                   # the restricted set did reject some drafts
        assert stats.acceptance_rate < 1.0


@pytest.mark.parametrize("pol,K", [("full", 2), ("full", 4), ("static3", 2), ("incontext3", 2),
                                   ("incontext3", 4)])
def test_r3_joint_of_the_window_with_the_bonus_token(pol, K):
    """With T = 3 and K >= 2 the budget cuts every block before its bonus token. With T = K + 2 the first
    verification step can commit K drafts + the bonus token: test the joint of (x_K, x_K+1, x_K+2)."""
    T = K + 2
    seqs, stats = generate(make_policy(pol), K, N_JOINT, T, seed=60 + K)
    assert stats.accepted_histogram[K] > 0, "no block accepted all K drafts: the bonus path was not exercised"
    assert_fits(sequence_counts(seqs[:, T - 3:], V), window_joint(P.numpy(), START, T - 2, 3), ALPHA,
                label=f"R3 joint x{T - 2}..x{T} {pol}-K{K}")


@pytest.mark.parametrize("pol,K", [("full", 2), ("static3", 4), ("incontext3", 2), ("incontext3", 4)])
def test_r3_marginals_and_pairs_up_to_T8(pol, K):
    T = 8
    seqs, _ = generate(make_policy(pol), K, N_MARGINAL, T, seed=100 + K)
    marg = markov_marginals(P.numpy(), START, T)
    for t in range(T):
        assert_fits(np.bincount(seqs[:, t], minlength=V), marg[t], ALPHA,
                    label=f"R3 marginal x{t + 1} {pol}-K{K}")
    for t in range(1, T):
        assert_fits(sequence_counts(seqs[:, t - 1:t + 1], V), pair_joint(P.numpy(), START, t), ALPHA,
                    label=f"R3 pair x{t},x{t + 1} {pol}-K{K}")


def test_r3_longer_prompt_per_row_sets():
    """Prompts of 3 tokens (the in-context set starts from them); the law depends on the last token only."""
    N, T = N_JOINT, 3
    g = torch.Generator().manual_seed(5)
    prompt = torch.randint(0, V, (N, 3), generator=g)
    prompt[:, -1] = START
    seqs, _ = generate(InContextPolicy(capacity=3, topk=0), 3, N, T, seed=77, prompt=prompt)
    assert_fits(sequence_counts(seqs, V), markov_joint(P.numpy(), START, T), ALPHA,
                label="R3 joint long prompt")


class RecordingInContext(InContextPolicy):
    """InContextPolicy that records the active set handed out for every draft block."""

    def setup(self, *args, **kwargs):
        self.history = []
        super().setup(*args, **kwargs)

    def active(self):
        ids, n = super().active()
        self.history.append(ids.clone())
        return ids, n


def test_in_context_set_really_changes_between_blocks():
    """Guard for the dynamic-policy R3 cases: the 3-slot set does change from one block to the next."""
    policy = RecordingInContext(capacity=3, topk=1)
    generate(policy, 2, 256, 8, seed=3)
    sets = [h.sort(dim=1).values for h in policy.history[1:]]          # history[0] is the head binding
    changed = sum(int((a != b).any(1).sum()) for a, b in zip(sets, sets[1:]))
    assert len(sets) >= 3 and changed > 0, "the in-context set never changed between blocks"


@pytest.mark.parametrize("bug", ["bonus_from_previous_position", "q_from_unrestricted_drafter"])
def test_r3_has_power_against_loop_bugs(bug, monkeypatch):
    """The R3 joint test fails on a deliberately broken verification (proof that it can see loop bugs)."""
    from microspec import verification
    real = verification.verify_sampling

    def broken(draft, valid, q_slots, slots, ids, t_logits, cfg, uniforms, noise):
        if bug == "bonus_from_previous_position":    # the bonus token drawn with the last draft's context
            t_logits = torch.cat([t_logits[:, :-1], t_logits[:, -2:-1]], 1)
        else:                                        # q claimed uniform over the set, drafts drawn from Q
            q_slots = (q_slots > 0).to(q_slots.dtype)
            q_slots = q_slots / q_slots.sum(-1, keepdim=True).clamp_min(1)
        return real(draft, valid, q_slots, slots, ids, t_logits, cfg, uniforms, noise)

    monkeypatch.setattr(verification, "verify_sampling", broken)
    seqs, _ = generate(make_policy("full"), 1, N_JOINT, 3, seed=31)
    with pytest.raises(AssertionError, match="pval|zero probability"):
        assert_fits(sequence_counts(seqs, V), markov_joint(P.numpy(), START, 3), ALPHA,
                    label=f"R3 broken: {bug}")
    monkeypatch.undo()                               # control: the real verification passes on the same seed
    seqs, _ = generate(make_policy("full"), 1, N_JOINT, 3, seed=31)
    assert_fits(sequence_counts(seqs, V), markov_joint(P.numpy(), START, 3), ALPHA, label="R3 power control")


class RecordingCommits(InContextPolicy):
    """InContextPolicy that records the set of every draft block and the tokens committed after it."""

    def setup(self, *args, **kwargs):
        self.sets, self.commits = [], []
        super().setup(*args, **kwargs)

    def active(self):
        ids, n = super().active()
        self.sets.append(ids.clone())
        return ids, n

    def on_commit(self, committed_ids, committed_mask, target_topk=None, hidden=None):
        self.commits.append((committed_ids.clone(), committed_mask.clone()))
        super().on_commit(committed_ids, committed_mask, target_topk)


def test_stats_coverage_counts_the_set_used_to_draft():
    """SpecStats.coverage = committed tokens that were in the active set *used to draft them* / committed.
    For a dynamic policy the set is updated by on_commit, so it must be read before the update."""
    policy = RecordingCommits(capacity=2, topk=0)
    dec = SpecDecoder(MarkovLM(P), MarkovLM(Q), policy, 2)
    stats = dec.generate(torch.full((500, 1), START), max_new_tokens=12, do_sample=True, eos_token_id=[],
                         generator=torch.Generator().manual_seed(0)).stats
    # sets[0] / commits[0]: head binding and the first token (not a verification step); then one per step
    covered = committed = 0
    for ids, (tok, mask) in zip(policy.sets[1:], policy.commits[1:]):
        in_set = (tok.unsqueeze(-1) == ids.unsqueeze(1)).any(-1)
        covered += int((in_set & mask).sum())
        committed += int(mask.sum())
    assert committed == stats.num_committed
    assert stats.coverage == pytest.approx(covered / committed, abs=1e-12), (
        f"coverage {stats.coverage:.4f} but only {covered / committed:.4f} of the committed tokens were in "
        f"the set used to draft them")


def test_eos_stops_rows_and_pads():
    seqs, _ = generate(make_policy("static3"), 4, 2000, 6, seed=9, eos=EOS)
    for row in seqs:
        hit = np.flatnonzero(row == EOS)
        if hit.size:
            assert (row[hit[0]:] == EOS).all(), "tokens after EOS must be padding"


# ============================================================================ H. R6 determinism
def test_same_seed_identical_over_20_repetitions_markov():
    runs = [generate(make_policy("incontext3"), 3, 64, 12, seed=42, eos=EOS)[0] for _ in range(20)]
    assert all(np.array_equal(runs[0], r) for r in runs[1:])
    other = generate(make_policy("incontext3"), 3, 64, 12, seed=43, eos=EOS)[0]
    assert not np.array_equal(runs[0], other), "different seeds gave identical samples"


def test_same_seed_identical_over_20_repetitions_tiny_llama():
    target = tiny_model("llama", seed=0)
    drafter = noisy_copy(target, 0.3)
    dec = SpecDecoder(target, drafter, InContextPolicy(capacity=32, topk=2), 3)
    prompt = torch.randint(3, 131, (3, 5), generator=torch.Generator().manual_seed(0))
    def run(seed):
        return dec.generate(prompt, max_new_tokens=10, do_sample=True, temperature=1.5, eos_token_id=[],
                            generator=torch.Generator().manual_seed(seed)).sequences
    first = run(7)
    for _ in range(19):
        assert torch.equal(run(7), first)
    assert not torch.equal(run(8), first)


@pytest.mark.parametrize("pol", ["static3", "incontext3", "full"])
@pytest.mark.parametrize("eos", [None, EOS])
def test_per_row_generators_batch_equals_rows_alone(pol, eos):
    B, T, K = 6, 10, 3
    seeds = [1000 + 7 * i for i in range(B)]
    g = torch.Generator().manual_seed(4)
    lengths = [1, 3, 2, 4, 1, 3]                                   # ragged prompts, left padded
    L = max(lengths)
    prompt = torch.zeros(B, L, dtype=torch.long)
    mask = torch.zeros(B, L, dtype=torch.long)
    rows = []
    for b, n in enumerate(lengths):
        toks = torch.randint(0, V, (n,), generator=g)
        toks[-1] = b % V if b % V != EOS else 0
        prompt[b, L - n:], mask[b, L - n:] = toks, 1
        rows.append(toks)
    dec = SpecDecoder(MarkovLM(P), MarkovLM(Q), make_policy(pol), K)
    eos_arg = [] if eos is None else eos
    batched = dec.generate(prompt, attention_mask=mask, max_new_tokens=T, do_sample=True,
                           eos_token_id=eos_arg,
                           generator=[torch.Generator().manual_seed(s) for s in seeds]).sequences[:, L:]
    for b in range(B):
        for gen in (torch.Generator().manual_seed(seeds[b]), [torch.Generator().manual_seed(seeds[b])]):
            alone = dec.generate(rows[b][None], max_new_tokens=T, do_sample=True, eos_token_id=eos_arg,
                                 generator=gen).sequences[0, lengths[b]:]
            want = batched[b, : alone.numel()]
            assert torch.equal(alone, want), f"row {b}: alone {alone.tolist()}, batched {batched[b].tolist()}"
            if eos is not None and alone.numel() < T:              # the batched row is padded after EOS
                assert (batched[b, alone.numel():] == EOS).all()
    assert len({tuple(r.tolist()) for r in batched}) > 1


def test_per_row_generators_differ_between_rows():
    """Rows with the same prompt but different per-row seeds sample different continuations."""
    N, T = 16, 12
    dec = SpecDecoder(MarkovLM(P), MarkovLM(Q), make_policy("incontext3"), 2)
    out = dec.generate(torch.full((N, 1), START), max_new_tokens=T, do_sample=True, eos_token_id=[],
                       generator=[torch.Generator().manual_seed(s) for s in range(N)]).sequences
    assert len({tuple(r.tolist()) for r in out}) > N // 2


# ============================================================================ F. NaN logits
class _NaNOneHot(nn.Module):
    """One-hot hidden states, NaN wherever the input token is `bad` (every token if bad is None)."""

    layers = nn.ModuleList()

    def __init__(self, inner, bad):
        super().__init__()
        self.inner, self.bad = inner, bad

    def forward(self, input_ids=None, **kwargs):
        out = self.inner(input_ids, **kwargs)
        hit = torch.ones_like(input_ids, dtype=torch.bool) if self.bad is None else input_ids == self.bad
        out.last_hidden_state = out.last_hidden_state.masked_fill(hit.unsqueeze(-1), float("nan"))
        return out


class NaNMarkovLM(MarkovLM):
    """MarkovLM whose logits are NaN wherever the input token is `bad` (all rows if bad is None)."""

    def __init__(self, probs, bad=None):
        super().__init__(probs)
        self.model = _NaNOneHot(self.model, bad)


UNIFORM = torch.full((V, V), 1.0 / V, dtype=torch.float64)
TO_5 = torch.full((V, V), 0.1, dtype=torch.float64)
TO_5[:, 5] = 0.3                                       # every state's argmax is 5 (greedy reaches it)


@pytest.mark.parametrize("do_sample", [False, True])
@pytest.mark.parametrize("where", ["prefill", "decode"])
def test_nan_target_logits_raise(do_sample, where):
    bad = None if where == "prefill" else 5                        # 5 is reached during decoding only
    dec = SpecDecoder(NaNMarkovLM(TO_5, bad), MarkovLM(UNIFORM), StaticFrequencyPolicy(torch.arange(V), 4), 2)
    with pytest.raises(FloatingPointError, match="target"):
        dec.generate(torch.full((32, 1), START), max_new_tokens=8, do_sample=do_sample, eos_token_id=[],
                     generator=torch.Generator().manual_seed(0))


@pytest.mark.parametrize("do_sample", [False, True])
def test_nan_drafter_logits_raise(do_sample):
    dec = SpecDecoder(MarkovLM(TO_5), NaNMarkovLM(UNIFORM, 5), InContextPolicy(capacity=8, topk=1), 2)
    with pytest.raises(FloatingPointError, match="drafter"):
        dec.generate(torch.full((32, 1), START), max_new_tokens=8, do_sample=do_sample, eos_token_id=[],
                     generator=torch.Generator().manual_seed(0))
