"""`microspec.lab.evaluation` (the machinery of `microspec eval`) on tiny random models: per-row logs add up
to the engine's own statistics, per-task aggregation is right on a hand-checked case, the trace file is what
`benchmarks/bench_e2e.py` reads, the prefill reuse changes nothing, and the greedy check finds a mismatch."""
import json
import sys
from pathlib import Path

import pytest
import torch
from tiny_models import EOS, PAD, VOCAB, noisy_copy, tiny_model

from microspec import SpecDecoder
from microspec.baseline import PlainDecoder
from microspec.lab import evaluation as ev
from microspec.lab.data import shared_data_dir
from microspec.lab.policy_labels import policy_from_label
from microspec.policies import FullVocab, InContextPolicy, StaticFrequencyPolicy
from microspec.prompts import left_pad

K = 5
ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def pair():
    target = tiny_model("llama", seed=0)
    return target, noisy_copy(target, 0.3)


def _batch(seed=0):
    g = torch.Generator().manual_seed(seed)
    rows = [torch.randint(3, VOCAB, (n,), generator=g).tolist() for n in (7, 12, 4)]
    return rows, *left_pad(rows, PAD)


def test_aggregate_and_task_stats_hand_checked():
    R = ev.RowStats
    tasks = ["a", "a", "b"]
    full = [R(steps=2, accepted=10, committed=12, covered=12, active=200),
            R(steps=1, accepted=5, committed=6, covered=6, active=100),
            R(steps=2, accepted=6, committed=8, covered=8, active=200)]
    pol = [R(steps=2, accepted=5, committed=7, covered=6, active=20),
           R(steps=1, accepted=0, committed=1, covered=1, active=10),
           R(steps=4, accepted=4, committed=8, covered=4, active=40)]
    out = ev.task_stats(tasks, {"full": full, "p": pol}, K)
    a = out["p"]["a"]
    assert a["tau"] == pytest.approx(1 + 5 / 3) and a["acceptance"] == pytest.approx(5 / 15)
    assert a["coverage"] == pytest.approx(7 / 8) and a["mean_active"] == pytest.approx(10)
    assert (a["row_steps"], a["committed"], a["prompts"]) == (3, 8, 2)
    assert out["full"]["a"]["tau"] == pytest.approx(6.0)
    assert a["tau_fraction"] == pytest.approx((1 + 5 / 3) / 6)
    assert out["p"]["b"]["tau_fraction"] == pytest.approx(2.0 / 4.0)
    assert out["p"]["all"]["tau"] == pytest.approx(1 + 9 / 7)                    # pooled, not averaged
    assert out["p"]["all"]["tau_fraction"] == pytest.approx((1 + 9 / 7) / (1 + 21 / 5))
    assert list(out["p"]) == ["a", "b", "all"]
    with pytest.raises(ValueError):
        ev.task_stats(tasks, {"p": pol[:2]}, K)
    md = ev.markdown_tables(out)
    assert "| p | 2.67 (44.4 %) | 2.00 (50.0 %) |" in md


def test_row_logs_add_up_to_engine_stats(pair):
    target, drafter = pair
    rows, ids, mask = _batch()
    dec = SpecDecoder(target, drafter, InContextPolicy(capacity=48, topk=2), K)
    new, stats, spec = ev.run_batch(dec, ids, mask, 30, eos=EOS, pad=PAD)
    plain_out = dec.generate(ids, attention_mask=mask, max_new_tokens=30, eos_token_id=EOS, pad_token_id=PAD)
    for i, (n, r) in enumerate(zip(new, stats)):
        assert n == plain_out.sequences[i, ids.shape[1]: ids.shape[1] + r.generated].tolist()
        assert len(r.trace) == r.steps and sum(r.trace) == r.accepted and all(0 <= x <= K for x in r.trace)
    assert sum(r.steps for r in stats) == spec.num_row_steps
    assert sum(r.committed for r in stats) == spec.num_committed
    total = ev.aggregate(stats, K)
    assert total["tau"] == pytest.approx(spec.mean_accepted_length)
    assert total["acceptance"] == pytest.approx(spec.acceptance_rate)
    assert total["coverage"] == pytest.approx(spec.coverage)
    assert total["mean_active"] == pytest.approx(spec.mean_active_size)
    hist = [0] * (K + 1)
    for x in ev.flat_trace(stats):
        hist[x] += 1
    assert hist == spec.accepted_histogram
    assert 0 < total["coverage"] < 1 and total["tau"] > 1                       # a real partial acceptance


@pytest.mark.parametrize("do_sample", [False, True])
def test_prefill_reuse_changes_nothing(pair, do_sample):
    target, drafter = pair
    _, ids, mask = _batch(1)
    cache = ev.PrefillCache(topk=3)

    def once(policy, use_cache):
        gens = [torch.Generator().manual_seed(i) for i in range(ids.shape[0])] if do_sample else None
        dec = SpecDecoder(target, drafter, policy, K)
        return ev.run_batch(dec, ids, mask, 20, do_sample=do_sample, generators=gens, eos=EOS, pad=PAD,
                            prefill_cache=cache if use_cache else None, prefill_key=0)[:2]

    fresh = once(InContextPolicy(capacity=40, topk=2), False)
    full = once(FullVocab(), False)
    assert once(FullVocab(), True) == full                     # computed with top-3 for later policies
    assert FullVocab.target_topk == 0 and "target_topk" not in vars(FullVocab())
    again = once(InContextPolicy(capacity=40, topk=2), True)   # restored from the cache, top-3 cut to 2
    assert len(cache) == 1
    assert fresh == again
    assert once(FullVocab(), True) == full


def test_greedy_check_finds_mismatches(pair):
    target, drafter = pair
    rows, ids, mask = _batch(2)
    plain = PlainDecoder(target, cuda_graph=False)
    ref_seq = plain.generate(ids, mask, max_new_tokens=16, eos_token_id=EOS, pad_token_id=PAD)
    L = ids.shape[1]
    refs = [ref_seq[i, L: L + int(plain.generated[i])].tolist() for i in range(len(rows))]
    dec = SpecDecoder(target, drafter, StaticFrequencyPolicy(torch.arange(VOCAB), 64), K)
    new, _, _ = ev.run_batch(dec, ids, mask, 16, eos=EOS, pad=PAD)
    assert ev.greedy_mismatches(target, rows, new, refs) == []
    bad = [list(r) for r in new]
    j = min(3, len(bad[1]) - 1)
    bad[1][j] = (bad[1][j] + 1) % VOCAB
    found = ev.greedy_mismatches(target, rows, bad, refs)
    assert [(f["row"], f["position"], f["spec_token"]) for f in found] == [(1, j, bad[1][j])]
    assert found[0]["top2_gap"] > 0 and found[0]["top2_ids"][0] == refs[1][j]
    assert ev.first_divergence([1, 2], [1, 2, 3]) == 2 and ev.first_divergence([1], [1]) is None


def test_trace_file_is_what_bench_e2e_reads(tmp_path):
    sys.path.insert(0, str(ROOT))
    bench = pytest.importorskip("benchmarks.bench_e2e")
    traces = {"full": [5, 5, 3], "static@3072": [2, 0, 5], "incontext@3072": [1, 4]}
    path = ev.write_traces(tmp_path / "acc.json", traces, "tiny pair, greedy", K)
    (loaded, source), fixed = bench.load_traces(str(path))
    assert loaded == traces and fixed is None and "tiny pair, greedy" in source
    assert json.loads(path.read_text())["K"] == bench.K == K
    with pytest.raises(ValueError, match="K = 5"):
        ev.write_traces(tmp_path / "x.json", traces, "s", 4)
    with pytest.raises(ValueError, match="outside"):
        ev.write_traces(tmp_path / "x.json", {"full": [6]}, "s", K)


def test_policy_labels():
    ranking = torch.arange(100, 0, -1)
    p = policy_from_label("incontext+core16@64", ranking)
    assert p.capacity == 64 and p.core_ids.tolist() == ranking[:16].tolist()
    assert policy_from_label("incontext+core@64", ranking).core_ids.numel() == 16
    assert isinstance(policy_from_label("static@8", ranking), StaticFrequencyPolicy)
    assert isinstance(policy_from_label("full"), FullVocab)
    assert policy_from_label("incontext+core16@64/k7", ranking).target_topk == 7
    succ = torch.randint(-1, 10, (VOCAB, 4))
    p = policy_from_label("incontext+core16@64/k2/s3", ranking, successors=succ)
    assert p.target_topk == 2 and torch.equal(p.successors, succ[:, :3])
    with pytest.raises(ValueError, match="successor table"):
        policy_from_label("incontext@64/s5", ranking, successors=succ)
    assert policy_from_label("incontext@64", ranking, topk=2).target_topk == 2
    for bad in ("static", "incontext@x", "banana@4", "incontext+corex@8", "cluster@8", "static@8/k3",
                "incontext@8/q3", "static@8/s2", "incontext@8/s"):
        with pytest.raises(ValueError):
            policy_from_label(bad, ranking)
    with pytest.raises(ValueError, match="ranking"):
        policy_from_label("static@8")


def test_subset_loading_and_disjointness(tmp_path):
    (tmp_path / "t").mkdir()
    lines = [{"question_id": i, "turns": [f"question {i}", "second"]} for i in (3, 5)]
    (tmp_path / "t/q.jsonl").write_text("".join(json.dumps(r) + "\n" for r in lines))
    subset = {"x": ("t/q.jsonl", (5, 3)), "y": ("t/q.jsonl", (3,))}
    got = ev.load_subset(subset, per_task=1, root=tmp_path)
    assert [(p.task, p.id, p.text) for p in got] == [("x", 5, "question 5"), ("y", 3, "question 3")]
    with pytest.raises(ValueError, match="twice"):
        ev.check_disjoint(ev.load_subset(subset, root=tmp_path), corpora=())
    with pytest.raises(ValueError, match="no question_id"):
        ev.load_subset({"x": ("t/q.jsonl", (4,))}, root=tmp_path)
    with pytest.raises(ValueError, match="unknown tasks"):
        ev.load_subset(subset, tasks=["z"], root=tmp_path)


@pytest.mark.skipif(shared_data_dir(required=False) is None, reason="../shared/data not present")
def test_committed_subset_is_valid_and_disjoint_from_fitting():
    prompts = ev.load_subset()
    assert len(prompts) == sum(len(ids) for _, ids in ev.SUBSET.values())
    ev.check_disjoint(prompts)
    train = ev.EvalPrompt("gsm8k", "train", 0, ev.load_subset(per_task=1, tasks=["gsm8k"])[0].text)
    from microspec.lab.data import load_pairs
    train.text = load_pairs("gsm8k:train")[0][0]
    with pytest.raises(ValueError, match="fitting"):
        ev.check_disjoint([train])


def test_length_batches():
    lengths = [50, 10, 12, 30, 11, 100]
    assert ev.length_batches(lengths, 4) == [[1, 4, 2, 3], [0, 5]]
    assert ev.length_batches(lengths, 4, max_ratio=2.0) == [[1, 4, 2], [3, 0], [5]]
    assert sorted(i for b in ev.length_batches(lengths, 1) for i in b) == list(range(6))
