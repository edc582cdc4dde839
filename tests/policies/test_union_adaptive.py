"""`UnionPolicy` and `AdaptiveCorePolicy`: the contract, the merge rule (union, slot stability, lingering
stale ids), the novelty rule of the adaptive core, and the whole `on_block` + `on_commit` step without a host
sync."""
import pytest
import torch

from microspec.policies import (AdaptiveCorePolicy, InContextPolicy, StaticFrequencyPolicy, UnionPolicy,
                                adaptive_recipe)
from microspec.testing import PolicyContract, no_host_sync

V = 97


def live(policy, row=0):
    ids, n = policy.active()
    return ids[row, : int(n[row])].tolist()


def ones(t):
    return torch.ones_like(t, dtype=torch.bool)


class TestUnionInContextStatic(PolicyContract):
    def make_policy(self):
        return UnionPolicy(InContextPolicy(12, topk=3), StaticFrequencyPolicy(torch.arange(90, 60, -1), 6))


class TestUnionTight(PolicyContract):
    """Capacity below the children's sum: stale ids are evicted, new ids may wait for room."""
    def make_policy(self):
        return UnionPolicy(InContextPolicy(10, topk=2), InContextPolicy(8, topk=0, eviction="fifo"),
                           capacity=12, max_new=3)


class TestAdaptiveCore(PolicyContract):
    def make_policy(self):
        return AdaptiveCorePolicy(torch.arange(V - 1, -1, -1), max_core=30, start=4, grow=5, topk=2)


class TestAdaptiveRecipe(PolicyContract):
    def make_policy(self):
        return adaptive_recipe(torch.arange(V - 1, -1, -1), capacity=16, max_core=20, grow=3, max_new=8)


def test_union_is_the_union_and_resident_ids_keep_their_slots():
    a, b = InContextPolicy(6, topk=0, eviction="lru"), InContextPolicy(6, topk=0, eviction=None)
    union = UnionPolicy(a, b)
    union.setup(1, V, [0], "cpu")
    union.on_prefill(torch.tensor([[10, 11, 12]]), ones(torch.tensor([[1, 1, 1]])))
    assert sorted(live(union)) == [0, 10, 11, 12]
    slots = {t: s for s, t in enumerate(live(union))}
    for ids in ([20, 21], [22, 23], [24]):      # a (LRU) evicts 10, 11, 12...; b (grow-only) keeps them
        union.on_commit(torch.tensor([ids]), ones(torch.tensor([ids])))
    want = set(live(a)) | set(live(b))
    assert set(live(union)) == want and len(live(union)) == len(want)
    assert all(live(union)[s] == t for t, s in slots.items())


def test_stale_ids_linger_until_their_slot_is_needed():
    a = InContextPolicy(4, topk=0, eviction="lru")          # EOS + 3 context ids
    b = StaticFrequencyPolicy(torch.tensor([0, 50]), 2)
    union = UnionPolicy(a, b, capacity=6)
    union.setup(1, V, [0], "cpu")
    union.on_commit(torch.tensor([[1, 2, 3]]), ones(torch.tensor([[1, 2, 3]])))
    union.on_commit(torch.tensor([[4, 5]]), ones(torch.tensor([[4, 5]])))   # a drops 1 and 2
    assert {0, 50, 3, 4, 5} <= set(live(union)) and len(live(union)) == 6  # one stale id lingers
    union.on_commit(torch.tensor([[6]]), ones(torch.tensor([[6]])))          # a drops 3 now
    got = live(union)
    assert {0, 50, 4, 5, 6} <= set(got) and len(got) == 6 and len(set(got)) == 6


def test_adaptive_core_grows_on_novel_tokens_only():
    ranking = torch.arange(90, 40, -1)                      # core order: 90, 89, ...
    core = AdaptiveCorePolicy(ranking, max_core=20, start=2, grow=3, topk=1, block=True)
    core.setup(1, V, [0], "cpu")
    assert live(core) == [0, 90, 89]
    core.on_prefill(torch.tensor([[5, 6]]), ones(torch.tensor([[5, 6]])), torch.tensor([[[7], [8]]]))
    core.on_commit(torch.tensor([[5, 8, 90]]), ones(torch.tensor([[5, 8, 90]])))   # prompt, top-k, core
    assert int(core.n_active[0]) == 3
    core.on_block(torch.tensor([[8, 30]]), ones(torch.tensor([[8, 30]])), torch.tensor([[[31], [32]]]))
    # 30 was drafted (in the set); 31 only in this block's top-k (too late to draft): novel, as is 33
    core.on_commit(torch.tensor([[30, 31, 33]]), ones(torch.tensor([[30, 31, 33]])))
    assert live(core) == [0, 90, 89, 88, 87, 86, 85, 84, 83]
    core.on_commit(torch.tensor([[31, 33, 34]]), torch.tensor([[True, True, False]]))  # seen now; 34 masked
    assert int(core.n_active[0]) == 9


def test_adaptive_core_rows_grow_independently_and_cap():
    core = AdaptiveCorePolicy(torch.arange(V), max_core=10, start=0, grow=4, topk=0, block=False)
    core.setup(2, V, [96], "cpu")
    ids = torch.tensor([[50, 51, 52], [50, 50, 50]])
    core.on_commit(ids, torch.tensor([[True, True, True], [True, False, False]]))
    assert core.n_active.tolist() == [1 + 10, 1 + 4]       # row 0: 3 novel x 4 = 12, capped at 10


@pytest.mark.parametrize("make", [
    lambda: adaptive_recipe(torch.arange(V), capacity=20, max_core=16, grow=2, max_new=6),
    lambda: UnionPolicy(InContextPolicy(12, topk=2, tree_ids=True),
                        StaticFrequencyPolicy(torch.arange(V), 5)),
])
def test_block_and_commit_steps_never_sync_and_stay_valid(make):
    policy = make()
    policy.setup(3, V, [2, 5], "cpu")
    g = torch.Generator().manual_seed(0)
    k = policy.target_topk
    policy.on_prefill(torch.randint(0, V, (3, 7), generator=g), torch.ones(3, 7, dtype=torch.bool),
                      torch.randint(0, V, (3, 7, k), generator=g))
    contract = PolicyContract()
    for _ in range(5):
        block = torch.randint(0, V, (3, 9), generator=g)
        with no_host_sync():
            policy.on_block(block, torch.rand(3, 9, generator=g) < 0.8, torch.randint(0, V, (3, 9, k),
                                                                                      generator=g))
            policy.on_commit(block[:, :4], torch.arange(4) < torch.tensor([[1], [4], [0]]),
                             torch.randint(0, V, (3, 4, k), generator=g))
        contract.assert_valid(policy)


def test_union_refuses_bad_children():
    with pytest.raises(TypeError):
        UnionPolicy(InContextPolicy(4))
    p = InContextPolicy(4)
    with pytest.raises(ValueError, match="distinct"):
        UnionPolicy(p, p)


# ------------------------------------------------------------------------------------ inside the decoder
def _decoder_policies(vocab):
    ranking = torch.randperm(vocab, generator=torch.Generator().manual_seed(2))
    return {"adaptive": lambda: adaptive_recipe(ranking, capacity=12, topk=2, max_core=24, grow=4, max_new=6),
            "union": lambda: UnionPolicy(InContextPolicy(10, topk=2, tree_ids=True),
                                         StaticFrequencyPolicy(ranking, 6), capacity=14, max_new=4)}


@pytest.mark.parametrize("name", ["adaptive", "union"])
def test_tree_decoding_with_new_policies_is_lossless(name):
    from tiny_models import EOS, PAD, VOCAB, tiny_model

    from microspec import SpecDecoder
    from microspec.drafting.eagle import EagleDrafter
    from microspec.drafting.tree import TreeSpec
    target = tiny_model("llama")
    drafter = EagleDrafter.from_target(target, seed=1).double()
    ids = torch.randint(3, VOCAB, (3, 9), generator=torch.Generator().manual_seed(0))
    mask = torch.ones_like(ids)
    mask[1, :4] = 0
    expected = target.generate(ids, attention_mask=mask, do_sample=False, max_new_tokens=20, eos_token_id=EOS,
                               pad_token_id=PAD)
    policy = _decoder_policies(VOCAB)[name]()
    dec = SpecDecoder(target, drafter, policy, 3, tree=TreeSpec(3, 3, 8))
    out = dec.generate(ids, attention_mask=mask, max_new_tokens=20, eos_token_id=EOS, pad_token_id=PAD)
    assert torch.equal(out.sequences, expected)
    assert 0 < out.stats.mean_active_size < VOCAB


@pytest.mark.parametrize("name", ["adaptive", "union"])
@pytest.mark.parametrize("do_sample", [False, True])
def test_whole_tree_step_never_syncs(name, do_sample):
    """The engine's step (on_block, on_commit included) under `no_host_sync()`: CUDA-graph capturable."""
    from tiny_models import VOCAB, tiny_model

    from microspec import SpecDecoder
    from microspec.drafting.eagle import EagleDrafter
    from microspec.drafting.tree import TreeSpec
    target = tiny_model("llama")
    dec = SpecDecoder(target, EagleDrafter.from_target(target, seed=1).double(),
                      _decoder_policies(VOCAB)[name](), 3, tree=TreeSpec(3, 3, 8))
    ids = torch.randint(3, VOCAB, (2, 6), generator=torch.Generator().manual_seed(1))
    run, _, _ = dec.new_run(ids, torch.ones_like(ids), 12, do_sample=do_sample, eos_token_id=[],
                            generator=torch.Generator().manual_seed(0))
    run.start()
    with torch.inference_mode():
        for _ in range(3):
            run.draw_noise()
            with no_host_sync():
                run.step()
    assert int(run.generated.min()) >= 4
