"""`ClusterPolicy`: the contract, the set it builds (against a plain-Python reference), slot stability,
persistence, and lossless greedy decoding on tiny models with a policy fitted on random data."""
import math

import pytest
import torch

from microspec import SpecDecoder
from microspec.lab.clustering import fit_cluster_policy, token_features
from microspec.policies.cluster import ClusterPolicy, MetaClassifier, pad_table
from microspec.testing import PolicyContract, no_host_sync
from tiny_models import EOS, PAD, VOCAB, noisy_copy, tiny_model


def random_policy(vocab_size=97, k=9, hidden_size=16, capacity=16, core=(40, 41, 2), hidden_units=8,
                  seed=0, unclustered=(), **kwargs):
    """A policy over a random partition of the vocabulary (minus `unclustered`), random member counts and a
    random classifier. kwargs go to ClusterPolicy (fill, context, freq_weight, size_penalty)."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.tensor([i for i in range(vocab_size) if i not in set(unclustered)])
    labels = torch.randint(k, (ids.numel(),), generator=g)
    order = torch.argsort(labels, stable=True)
    table = pad_table(ids[order], torch.bincount(labels, minlength=k))
    counts = torch.rand(ids.numel(), generator=g) * 100
    torch.manual_seed(seed + 1)
    return ClusterPolicy(table, MetaClassifier(hidden_size, k, hidden_units), capacity, core_ids=core,
                         counts=counts, **kwargs)


def tiny_cluster_policy(model, capacity, num_clusters=12, core_size=4, seed=0, **kwargs):
    """A ClusterPolicy for a tiny HF model, fitted on random hidden states and windows of the right shapes."""
    g = torch.Generator().manual_seed(seed)
    V, D = model.config.vocab_size, model.config.hidden_size
    hidden = torch.randn(400, D, generator=g)
    windows = torch.randint(0, V, (400, 6), generator=g)
    return fit_cluster_policy(token_features(model), hidden, windows, num_clusters=num_clusters,
                              capacity=capacity, special_ids=[EOS], core_size=core_size, epochs=1, seed=seed,
                              **kwargs)


class TestClusterPolicy(PolicyContract):
    def make_policy(self):
        return random_policy()


class TestClusterPolicyNoContextLinear(PolicyContract):
    def make_policy(self):
        return random_policy(core=None, hidden_units=0, capacity=30, context=False, unclustered=range(50, 60))


class TestClusterPolicyClusterFill(PolicyContract):
    def make_policy(self):
        return random_policy(capacity=30, fill="clusters", size_penalty=0.5)


class TestClusterPolicyRoomy(PolicyContract):
    def make_policy(self):
        return random_policy(capacity=self.vocab_size + 5, unclustered=range(60, 70), fill="clusters")


class TestClusterPolicyCapacityOne(PolicyContract):
    special_ids = (2,)

    def make_policy(self):
        return random_policy(capacity=1)


def pinned_of(policy, special):
    return list(dict.fromkeys(special + policy.core_ids.tolist()))[: policy.capacity]


def reference_clusters(policy, scores_row, special):
    """Cluster fill: pinned ids, then whole clusters in score order, the last one cut to its first members."""
    out = pinned_of(policy, special)
    table = pad_table(policy.members, policy.sizes)
    for c in torch.argsort(scores_row, descending=True, stable=True).tolist():
        for t in table[c].tolist():
            if t >= 0 and t not in out and len(out) < policy.capacity:
                out.append(t)
    return out


def reference_tokens(policy, lp_row, seen, special, vocab_size=97):
    """Token fill: pinned ids, then ids by (in context) > clustered > unclustered, then lp + w log count."""
    out = pinned_of(policy, special)
    cluster = dict(zip(policy.members.tolist(), torch.repeat_interleave(torch.arange(policy.num_clusters),
                                                                         policy.sizes).tolist()))
    count = dict(zip(policy.members.tolist(), policy.counts.tolist()))
    def key(t):
        base = lp_row[cluster[t]].clamp(-1e3, 0).item() + policy.freq_weight * math.log(max(count[t], 0.5)) \
            if t in cluster else -2e3
        return (t in seen, t in cluster, base)
    rest = sorted((t for t in range(vocab_size) if t not in out), key=key, reverse=True)
    return out + rest[: policy.capacity - len(out)]


@pytest.mark.parametrize("capacity", [5, 16, 40, 120])
@pytest.mark.parametrize("fill,context", [("tokens", True), ("tokens", False), ("clusters", False)])
def test_set_matches_the_reference(capacity, fill, context):
    policy = random_policy(capacity=capacity, fill=fill, context=context, size_penalty=0.7 * (capacity == 40),
                           unclustered=range(90, 97))
    policy.setup(3, 97, [2, 5], "cpu")
    g = torch.Generator().manual_seed(1)
    hidden, prompt = torch.randn(3, 16, generator=g), torch.randint(0, 97, (3, 6), generator=g)
    prompt[:, 0] = 93                                                    # unclustered but in context
    mask = torch.ones(3, 6, dtype=torch.bool)
    mask[0, 1:] = False                                                  # row 0 sees only id 93
    policy.on_prefill(prompt, mask, hidden=hidden)
    ids, n = policy.active()
    scores = policy.scores(hidden)
    short = policy.shortlist(hidden, torch.zeros(3, 97, dtype=torch.bool).scatter_(1, prompt, mask))
    for r in range(3):
        if fill == "clusters":
            expect = reference_clusters(policy, scores[r], [2, 5])
        else:
            seen = set(prompt[r][mask[r]].tolist()) if context else set()
            expect = reference_tokens(policy, scores[r], seen, [2, 5])
        assert n[r] == len(expect) == min(capacity, 97 if fill == "tokens" else 90)   # 90 clustered or pinned
        assert sorted(ids[r, : n[r]].tolist()) == sorted(expect)
        if capacity < 90:                                       # (beyond: unclustered ids tie)
            assert short[r].tolist() == expect                  # shortlist: pinned, then best first
    if fill == "tokens" and capacity < 90:   # row 0 has seen only id 93, which is in no cluster
        assert (93 in ids[0, : n[0]].tolist()) == context


def test_without_hidden_states_frequency_or_prior_rules():
    g = torch.Generator().manual_seed(2)
    for fill in ("tokens", "clusters"):
        policy = random_policy(capacity=30, fill=fill, prior=torch.rand(9, generator=g))
        policy.setup(2, 97, [2], "cpu")
        before = policy.active()[0].clone()
        policy.on_commit(torch.tensor([[7], [8]]), torch.tensor([[True], [False]]), hidden=None)
        after = policy.active()[0]
        if fill == "clusters":                                   # nothing to route on: no change
            assert torch.equal(after, before)
            expect = reference_clusters(policy, policy.prior, [2])
            assert sorted(before[0, :30].tolist()) == sorted(expect)
        else:                                                    # frequency order, then the context enters
            assert sorted(before[0, :30].tolist()) == sorted(
                reference_tokens(policy, torch.zeros(9), set(), [2]))
            assert sorted(after[0, :30].tolist()) == sorted(
                reference_tokens(policy, torch.zeros(9), {7}, [2]))
            assert torch.equal(after[1], before[1])              # row 1's commit was masked out


@pytest.mark.parametrize("fill", ["tokens", "clusters"])
def test_ids_that_stay_keep_their_slot(fill):
    policy = random_policy(capacity=40, k=20, fill=fill)
    policy.setup(4, 97, [2, 5], "cpu")
    g = torch.Generator().manual_seed(3)
    prev = policy.active()[0].clone()
    moved_total = changed_total = 0
    for _ in range(6):
        policy.on_commit(torch.zeros(4, 1, dtype=torch.long), torch.ones(4, 1, dtype=torch.bool),
                         hidden=torch.randn(4, 16, generator=g))
        cur = policy.active()[0]
        for r in range(4):
            common = set(prev[r].tolist()) & set(cur[r].tolist())
            slot_prev = {t: s for s, t in enumerate(prev[r].tolist())}
            slot_cur = {t: s for s, t in enumerate(cur[r].tolist())}
            moved_total += sum(slot_prev[t] != slot_cur[t] for t in common if t >= 0)
            changed_total += len(set(cur[r].tolist()) - set(prev[r].tolist()))
        prev = cur.clone()
    assert moved_total == 0 and changed_total > 0


@pytest.mark.parametrize("fill", ["tokens", "clusters"])
def test_nan_hidden_still_gives_a_valid_set(fill):
    policy = random_policy(capacity=30, fill=fill)
    policy.setup(2, 97, [2, 5], "cpu")
    hidden = torch.full((2, 16), float("nan"))
    with no_host_sync():
        policy.on_commit(torch.zeros(2, 1, dtype=torch.long), torch.ones(2, 1, dtype=torch.bool),
                         hidden=hidden)
    ids, n = policy.active()
    for r in range(2):
        live = ids[r, : n[r]].tolist()
        assert len(set(live)) == len(live) == 30 and 2 in live and 5 in live


def test_bad_inputs_raise():
    with pytest.raises(ValueError, match="disjoint"):
        ClusterPolicy(torch.tensor([[1, 2], [2, -1]]), MetaClassifier(4, 2), 4)
    with pytest.raises(ValueError, match="scores"):
        ClusterPolicy(torch.tensor([[1, 2], [3, -1]]), MetaClassifier(4, 3), 4)
    policy = random_policy()
    with pytest.raises(ValueError, match="vocab_size"):
        policy.setup(1, 50, [2], "cpu")                              # table ids up to 96
    policy.setup(1, 97, [2], "cpu")
    with pytest.raises(ValueError, match="width"):
        policy.on_commit(torch.zeros(1, 1, dtype=torch.long), torch.ones(1, 1, dtype=torch.bool),
                         hidden=torch.randn(1, 15))


def test_save_and_load_round_trip(tmp_path):
    policy = random_policy(capacity=25, size_penalty=0.3)
    policy.metadata.update(model="tiny", corpora="a,b")
    path = tmp_path / "c.safetensors"
    policy.save(path)
    loaded = ClusterPolicy.load(path, capacity=25)
    assert loaded.metadata == {"model": "tiny", "corpora": "a,b"}
    assert ((loaded.size_penalty, loaded.fill, loaded.context, loaded.freq_weight)
            == (0.3, "tokens", True, 0.5))
    for name in ("members", "sizes", "counts", "core_ids", "prior"):
        assert torch.equal(getattr(loaded, name), getattr(policy, name)), name
    hidden, seen = torch.randn(3, 16), torch.rand(3, 97) < 0.1
    for p in (policy, loaded):
        p.setup(3, 97, [2], "cpu")
    assert torch.equal(policy.shortlist(hidden, seen), loaded.shortlist(hidden, seen))
    other = ClusterPolicy.load(path, capacity=12, fill="clusters", context=False)
    assert (other.capacity, other.fill, other.context) == (12, "clusters", False)
    from safetensors import safe_open
    with safe_open(str(path), "pt") as f:
        assert f.metadata()["format"] == "microspec.cluster_policy" and "members" in f.keys()


def test_load_rejects_missing_and_foreign_files(tmp_path):
    with pytest.raises(FileNotFoundError):
        ClusterPolicy.load(tmp_path / "nope.safetensors", capacity=8)
    junk = tmp_path / "junk.safetensors"
    junk.write_bytes(b"not a safetensors file at all")
    with pytest.raises(ValueError):
        ClusterPolicy.load(junk, capacity=8)
    from safetensors.torch import save_file
    other = tmp_path / "map.safetensors"
    save_file({"token_ids": torch.arange(5)}, str(other))
    with pytest.raises(ValueError, match="not a ClusterPolicy"):
        ClusterPolicy.load(other, capacity=8)


def _prompts(batch, seed):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, VOCAB, (batch, 9), generator=g)
    lengths = torch.randint(1, 10, (batch,), generator=g)
    lengths[0] = 9
    mask = (torch.arange(9) >= (9 - lengths).unsqueeze(1)).long()
    return ids.masked_fill(mask == 0, PAD), mask


class _Counting(ClusterPolicy):
    updates = 0

    def scores(self, hidden):
        self.updates += 1
        return super().scores(hidden)


@pytest.mark.parametrize("family,drafter,capacity,K,batch,early_eos,fill", [
    ("llama", "noisy", 40, 4, 4, True, "tokens"), ("qwen2", "same", 20, 5, 4, False, "tokens"),
    ("mistral", "noisy", 7, 3, 1, False, "clusters"), ("gemma", "same", VOCAB, 2, 4, True, "clusters"),
    ("llama", "same", 1, 3, 4, False, "tokens")])
def test_greedy_decoding_with_cluster_policy_equals_target(family, drafter, capacity, K, batch, early_eos,
                                                           fill):
    target = tiny_model(family, seed=0)
    draft = target if drafter == "same" else noisy_copy(target, 0.5)
    ids, mask = _prompts(batch, seed=K)
    eos = [EOS]
    expected = target.generate(ids, attention_mask=mask, do_sample=False, max_new_tokens=30, eos_token_id=eos,
                                pad_token_id=PAD)
    if early_eos:  # a token the target really emits, so rows stop mid-way
        eos = [int(expected[0, -15])]
        expected = target.generate(ids, attention_mask=mask, do_sample=False, max_new_tokens=30,
                                   eos_token_id=eos, pad_token_id=PAD)
    fitted = tiny_cluster_policy(target, capacity)
    policy = _Counting(pad_table(fitted.members, fitted.sizes), fitted.classifier, capacity,
                       core_ids=fitted.core_ids, counts=fitted.counts, prior=fitted.prior, fill=fill)
    out = SpecDecoder(target, draft, policy, K).generate(ids, attention_mask=mask, max_new_tokens=30,
                                                         eos_token_id=eos, pad_token_id=PAD)
    assert torch.equal(out.sequences, expected)
    assert out.stats.mean_active_size <= capacity
    if capacity > 1 + fitted.core_ids.numel():                    # room for routed ids: every state is used
        assert policy.updates >= out.stats.num_verify_steps


@pytest.mark.gpu
def test_cuda_graph_decoding_with_cluster_policy_equals_target():
    """On CUDA the whole step (classifier and slot-stable install included) is captured in a graph."""
    target = tiny_model("llama", seed=0)
    policy = tiny_cluster_policy(target, capacity=24)
    drafter = noisy_copy(target, 0.3).cuda()
    target = target.cuda()
    ids, mask = (t.cuda() for t in _prompts(4, seed=1))
    expected = target.generate(ids, attention_mask=mask, do_sample=False, max_new_tokens=30,
                               eos_token_id=[EOS], pad_token_id=PAD)
    decoder = SpecDecoder(target, drafter, policy, 3, cuda_graph=True)
    for _ in range(2):   # the second call replays the captured step on reused buffers
        out = decoder.generate(ids, attention_mask=mask, max_new_tokens=30, eos_token_id=[EOS],
                               pad_token_id=PAD)
        assert torch.equal(out.sequences, expected)
