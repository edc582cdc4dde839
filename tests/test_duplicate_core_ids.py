"""Issue 10, item 1: duplicate ids in `InContextPolicy(core_ids=...)` must not break losslessness.

A repeated core id used to occupy two slots of the active set: acceptance read one slot's q while the
residual summed both, so that token was over-accepted (P(x2) 0.358 where the exact law says 0.110). Now the
policy keeps each core id once (first occurrence), `SparseLMHead.bind` refuses a set with duplicates, and the
whole sampled loop follows the target's law again (TESTING.md R3: G-test on the joint of three tokens,
alpha = 1e-4, on a toy Markov target whose law is known exactly). The power test rebuilds the old bug (the
duplicates forced back in, the bind check switched off) and shows the same G-test rejects it.
"""
from __future__ import annotations

import numpy as np
import pytest
import torch

import microspec.sparse_head as sparse_head
from microspec import SpecDecoder
from microspec.policies import InContextPolicy

from stats import assert_fits, markov_joint, sequence_counts
from tiny_models import MarkovLM

ALPHA = 1e-4
V, START, T, N = 8, 3, 3, 20_000          # 512 bins, 39 draws per bin on average
CORE = [5, 5, 2, 5]                        # 5 three times


def _chain(seed: int, zero_frac: float) -> torch.Tensor:
    rng = np.random.default_rng(seed)
    m = rng.random((V, V)) + 0.05
    m[rng.random((V, V)) < zero_frac] = 0.0
    for i in range(V):
        if np.count_nonzero(m[i]) < 2:
            m[i, rng.choice(V, 2, replace=False)] = 0.5
    return torch.from_numpy(m / m.sum(1, keepdims=True))


P, Q = _chain(0, 0.3), _chain(1, 0.35)      # target, drafter (the chains of test_sampling_loop.py)


class _DuplicatedCore(InContextPolicy):
    """The pre-fix behaviour: core ids kept as given, repeats included."""

    def __init__(self, *args, core, **kwargs):
        super().__init__(*args, **kwargs)
        self.core_ids = torch.tensor(core)


def _sample(policy, K: int, seed: int, **sampling) -> np.ndarray:
    dec = SpecDecoder(MarkovLM(P), MarkovLM(Q), policy, K)
    out = dec.generate(torch.full((N, 1), START), max_new_tokens=T, do_sample=True, eos_token_id=[],
                       generator=torch.Generator().manual_seed(seed), **sampling)
    return out.sequences[:, 1:].numpy()


def test_core_ids_are_deduplicated_in_order():
    policy = InContextPolicy(capacity=6, topk=0, core_ids=CORE + [7, 2])
    assert policy.core_ids.tolist() == [5, 2, 7]
    policy.setup(1, V, [], "cpu")
    ids, n = policy.active()
    assert ids[0, : int(n[0])].tolist() == [5, 2, 7]


@pytest.mark.parametrize("K", [2, 4])
def test_sampling_with_duplicate_core_ids_follows_the_target(K):
    seqs = _sample(InContextPolicy(capacity=4, topk=0, core_ids=CORE), K, seed=K)
    assert_fits(sequence_counts(seqs, V), markov_joint(P.numpy(), START, T), ALPHA,
                label=f"duplicate core ids K={K}")


def test_a_set_with_duplicates_is_refused_at_bind():
    dec = SpecDecoder(MarkovLM(P), MarkovLM(Q), _DuplicatedCore(capacity=4, topk=0, core=CORE), 2)
    with pytest.raises(ValueError, match="duplicate ids"):
        dec.generate(torch.full((2, 1), START), max_new_tokens=3, do_sample=True, eos_token_id=[])


def test_power_the_gof_test_rejects_the_old_duplicate_bug(monkeypatch):
    """Control for the test above: with the duplicates forced back in (and the bind check off) the same
    G-test on the same number of draws fails, so its pass is evidence."""
    monkeypatch.setattr(sparse_head, "check_active_set", lambda *args: None)
    seqs = _sample(_DuplicatedCore(capacity=4, topk=0, core=CORE), 2, seed=2)
    with pytest.raises(AssertionError, match="pval"):
        assert_fits(sequence_counts(seqs, V), markov_joint(P.numpy(), START, T), ALPHA,
                    label="duplicate core ids, bug rebuilt")
