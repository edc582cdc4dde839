"""InContextPolicy semantics: what enters, what is evicted, and that resident ids never move."""
import pytest
import torch

from microspec.policies import InContextPolicy

EOS = 0


def live(policy, row=0):
    ids, n = policy.active()
    return ids[row, : int(n[row])].tolist()


def fresh(capacity, **kw):
    policy = InContextPolicy(capacity=capacity, **kw)
    policy.setup(1, 100, [EOS], "cpu")
    return policy


def commit(policy, ids, topk=None):
    ids = torch.tensor([ids])
    policy.on_commit(ids, torch.ones_like(ids, dtype=torch.bool),
                     None if topk is None else torch.tensor([topk]))


def test_prompt_newest_first_and_deduplicated():
    policy = fresh(8, topk=0)
    policy.on_prefill(torch.tensor([[5, 7, 5, 9]]), torch.ones(1, 4, dtype=torch.bool))
    assert live(policy) == [EOS, 9, 5, 7]


def test_prompt_overflow_keeps_the_most_recent_tokens():
    policy = fresh(4, topk=0)
    policy.on_prefill(torch.tensor([[10, 11, 12, 13, 14, 15]]), torch.ones(1, 6, dtype=torch.bool))
    assert live(policy) == [EOS, 15, 14, 13]


def test_target_topk_enters_with_each_position():
    policy = fresh(16, topk=2)
    prompt = torch.tensor([[5, 6]])
    topk = torch.tensor([[[20, 21, 22], [30, 31, 32]]])          # the policy keeps only the first 2
    policy.on_prefill(prompt, torch.ones(1, 2, dtype=torch.bool), topk)
    assert sorted(live(policy)) == sorted([EOS, 5, 6, 20, 21, 30, 31])


def test_lru_evicts_the_least_recently_committed():
    policy = fresh(4, topk=0, eviction="lru")
    commit(policy, [1, 2, 3])          # slots: EOS 1 2 3
    commit(policy, [1])                # refresh 1
    commit(policy, [4])                # evicts 2 (oldest stamp), 4 takes its slot
    assert live(policy) == [EOS, 1, 4, 3]


def test_fifo_evicts_the_oldest_insertion_even_if_reused():
    policy = fresh(4, topk=0, eviction="fifo")
    commit(policy, [1, 2, 3])
    commit(policy, [1])                # no refresh under FIFO
    commit(policy, [4])
    assert live(policy) == [EOS, 4, 2, 3]


def test_grow_only_drops_what_does_not_fit():
    policy = fresh(4, topk=0, eviction=None)
    commit(policy, [1, 2, 3, 4, 5])
    assert live(policy) == [EOS, 1, 2, 3]


def test_core_and_special_ids_are_never_evicted():
    policy = fresh(5, topk=0, core_ids=[50, 51])
    commit(policy, list(range(10, 30)))
    ids = live(policy)
    assert ids[:3] == [EOS, 50, 51] and len(ids) == 5


def test_resident_ids_keep_their_slots():
    policy = fresh(12, topk=0)
    commit(policy, [1, 2, 3, 4])
    before = {tok: slot for slot, tok in enumerate(live(policy))}
    commit(policy, [3, 9, 1, 10])
    after = {tok: slot for slot, tok in enumerate(live(policy))}
    assert all(after[t] == s for t, s in before.items())


def test_masked_commits_do_not_enter():
    policy = fresh(8, topk=0)
    policy.on_commit(torch.tensor([[1, 2, 3]]), torch.tensor([[True, False, True]]))
    assert live(policy) == [EOS, 1, 3]


def test_per_row_sets_differ():
    policy = InContextPolicy(capacity=6, topk=0)
    policy.setup(2, 100, [EOS], "cpu")
    policy.on_prefill(torch.tensor([[1, 2], [3, 4]]), torch.ones(2, 2, dtype=torch.bool))
    assert live(policy, 0) == [EOS, 2, 1] and live(policy, 1) == [EOS, 4, 3]


@pytest.mark.parametrize("kwargs", [{"capacity": 0}, {"topk": -1}, {"eviction": "random"}])
def test_bad_arguments(kwargs):
    with pytest.raises(ValueError):
        InContextPolicy(**kwargs)


def test_capacity_must_hold_special_ids():
    with pytest.raises(ValueError, match="cannot hold"):
        InContextPolicy(capacity=1).setup(1, 100, [0, 1], "cpu")


def test_successors_enter_with_prompt_and_committed_ids():
    succ = torch.full((100, 2), -1)
    succ[5] = torch.tensor([50, 51])       # 5 -> 50, 51
    succ[7] = torch.tensor([70, -1])       # 7 -> 70 only
    succ[9] = torch.tensor([90, 91])       # 9 only ever arrives masked out
    policy = fresh(16, topk=0, successors=succ)
    policy.on_prefill(torch.tensor([[5, 6]]), torch.ones(1, 2, dtype=torch.bool))
    assert live(policy) == [EOS, 6, 5, 50, 51]     # newest position first, then its successors
    policy.on_commit(torch.tensor([[7, 9]]), torch.tensor([[True, False]]))
    assert live(policy) == [EOS, 6, 5, 50, 51, 7, 70]


def test_successor_table_from_token_streams():
    from microspec.lab.frequency import successor_table
    table = successor_table([[1, 2, 3, 1, 2, 4, 1, 5], [2, 3]], 6, 2)
    assert table.tolist() == [[-1, -1], [2, 5], [3, 4], [1, -1], [1, -1], [-1, -1]]
    with pytest.raises(ValueError, match="outside"):
        successor_table([[1, 7]], 6, 2)


@pytest.mark.parametrize("succ", [torch.zeros(101, 2, dtype=torch.long), torch.full((10, 2), 100),
                                  torch.full((10, 2), -2)])
def test_successors_must_fit_the_vocabulary(succ):
    with pytest.raises(ValueError, match="successors"):
        InContextPolicy(capacity=8, successors=succ).setup(1, 100, [EOS], "cpu")


def test_successors_must_be_a_table():
    with pytest.raises(ValueError, match="successors"):
        InContextPolicy(capacity=8, successors=torch.arange(5))


@pytest.mark.parametrize("seed", range(4))
def test_one_step_insertion_admits_what_the_two_hooks_admit(seed):
    """`on_step` with `tree_ids` makes one insertion of on_block's and on_commit's candidates; below the cap
    the set it builds holds the same ids (the committed tokens' top-k are rows of the block's)."""
    g = torch.Generator().manual_seed(seed)
    B, V, N1, M, k = 3, 1000, 7, 4, 3
    succ = torch.randint(-1, V, (V, 2), generator=g)
    one, two = (InContextPolicy(capacity=V, topk=k, eviction=None, tree_ids=True,
                                core_ids=torch.arange(10, 20), successors=succ) for _ in range(2))
    for p in (one, two):
        p.setup(B, V, [EOS], "cpu")
    for _ in range(5):
        block = torch.randint(0, V, (B, N1), generator=g)
        block_topk = torch.randint(0, V, (B, N1, k), generator=g)
        path = torch.rand(B, N1, generator=g).argsort(1)[:, :M]                  # distinct nodes
        mask = torch.arange(M) < torch.randint(0, M + 1, (B, 1), generator=g)
        block_mask = torch.rand(B, N1, generator=g) < 0.7
        block_mask.scatter_(1, path, mask | block_mask.gather(1, path))   # path nodes valid where committed
        committed, topk = torch.randint(0, V, (B, M), generator=g), block_topk.gather(
            1, path.unsqueeze(-1).expand(-1, -1, k))
        two.on_block(block, block_mask, block_topk)
        two.on_commit(committed, mask, topk)
        one.on_step(committed, mask, topk, block_ids=block, block_mask=block_mask, block_topk=block_topk)
        for r in range(B):
            assert sorted(live(one, r)) == sorted(live(two, r))
