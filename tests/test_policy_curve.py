"""benchmarks/policy_curve.py without models: labels build the intended policies, the pooled tau and the
paired bootstrap are right on hand-made rows, and the report renders."""
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
curve = pytest.importorskip("benchmarks.policy_curve")

from microspec.policies import AdaptiveCorePolicy, FullVocab, InContextPolicy, UnionPolicy  # noqa: E402


def test_labels_build_the_policies():
    ranking = torch.arange(5000)
    assert isinstance(curve.build_policy("full", ranking), FullVocab)
    ctx = curve.build_policy("ctx/k3", ranking)
    assert isinstance(ctx, InContextPolicy) and ctx.eviction is None and ctx.wants_block
    assert ctx.target_topk == 3
    core = curve.build_policy("ctx+core256/k10", ranking)
    assert core.core_ids.numel() == 256 and core.capacity == 3072 + 256 and core.target_topk == 10
    adapt = curve.build_policy("adapt16/k3", ranking)
    assert isinstance(adapt, UnionPolicy) and isinstance(adapt.children[1], AdaptiveCorePolicy)
    assert adapt.children[1].grow == 16 and adapt.wants_block and adapt.target_topk == 3
    for bad in ("ctx", "ctx/k", "adapt/k3", "static@8"):
        with pytest.raises(ValueError):
            curve.build_policy(bad, ranking)
    with pytest.raises(ValueError, match="cluster-file"):
        curve.build_policy("ctx+cluster64/k3", ranking)


def _row(steps, accepted, active=10):
    return {"steps": steps, "accepted": accepted, "active": active * steps, "generated": 0}


def test_pooled_tau_and_paired_bootstrap():
    full = [_row(10, 10), _row(10, 20), _row(5, 5)]
    half = [_row(10, 5), _row(10, 10), _row(5, 0)]
    assert curve.tau(full) == pytest.approx(1 + 35 / 25) and curve.mean_active(half) == 10
    lo, hi = curve.bootstrap_ratio(full, full, ["a", "a", "b"], draws=200)
    assert lo == hi == pytest.approx(1.0)                      # paired: identical runs have no spread
    lo, hi = curve.bootstrap_ratio(half, full, ["a", "a", "b"], draws=400)
    assert lo < curve.tau(half) / curve.tau(full) < hi and lo >= (1 + 5 / 10) / (1 + 20 / 10) - 1e-9
    stats = curve.summarise(["a", "a", "b"], {"full": full, "half": half})
    assert stats["half"]["b"]["pct_of_full"] == pytest.approx(100 * 1.0 / 2.0)
    assert stats["half"]["all"]["prompts"] == 3 and stats["full"]["all"]["pct_ci95"] == [100.0, 100.0]
    md = curve.markdown({"model": "m", "tree": "4,4,16", "runs": {"greedy": {"tasks": stats}}})
    assert "| half | " in md and "50.0 %" in md


def test_wide_subset_is_evaluation_only_and_runs_merge():
    from microspec.lab import evaluation as ev
    from microspec.paths import shared_data_dir
    root = shared_data_dir(required=False)
    if root is None or not (root / "spec_bench" / "question.jsonl").is_file():
        pytest.skip("../shared/data not found")
    prompts = ev.load_subset(curve.wide_subset(8), per_task=8)
    assert len(prompts) == 64 and {p.task for p in prompts} == set(ev.SUBSET)
    ev.check_disjoint(prompts)                                   # none is a fitting-corpus prompt
    wider = ev.load_subset(curve.wide_subset(40), per_task=40, tasks=["gsm8k", "math_reasoning", "mt_bench"])
    assert sum(p.task == "gsm8k" for p in wider) == 40 and sum(p.task == "mt_bench" for p in wider) == 10
    ev.check_disjoint(wider)            # Spec-Bench math_reasoning's questions in the GSM8K file: skipped
    first = [p.id for p in prompts if p.task == "gsm8k"]
    assert [p.id for p in wider if p.task == "gsm8k"][:8] == first     # a wider run extends a narrower one

    def run(tasks, steps):
        rows = [{"steps": s, "accepted": s, "active": 10 * s} for s in steps]
        return {"model": "m", "tree": "4,4,16", "max_new_tokens": 8, "command": "c",
                "prompts": [{"task": t} for t in tasks],
                "runs": {"greedy": {"policies": {"full": {"rows": rows, "seconds": 1.0}}}}}
    merged = curve.merge([run(["a"], [2]), run(["b", "b"], [3, 4])])
    assert [p["task"] for p in merged["prompts"]] == ["a", "b", "b"]
    assert [r["steps"] for r in merged["runs"]["greedy"]["policies"]["full"]["rows"]] == [2, 3, 4]
    with pytest.raises(ValueError, match="different models"):
        curve.merge([run(["a"], [2]), {**run(["b"], [3]), "tree": "10,6,60"}])
