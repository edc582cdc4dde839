"""Per-task evaluation of vocabulary policies on real model pairs (the machinery of `microspec eval`).

Why: coverage (`microspec.lab.coverage`) bounds what a pruned drafter head can be accepted for, but the number
that decides the speed-up is the mean accepted length tau of real decoding, and it depends on the task
(code and arithmetic repeat their context; open writing does not). So every policy runs through the real
`SpecDecoder` on a fixed, listed prompt subset, and its tau is reported per task next to the
full-vocabulary drafter's tau on the same prompts: the fraction tau_policy / tau_full is what pruning costs.

Per-row bookkeeping comes from `RowLog`, an engine observer that logs, at every decode step, each row's
[live, accepted, committed, covered, active] counters (the engine keeps only batch totals and a histogram).
From these logs come per-task statistics (pooled over the task's rows, the same formulas as `SpecStats`)
and the acceptance traces: per prompt, the accepted-draft count of each real verification step, in order.
`benchmarks/bench_e2e.py --acceptance FILE` replays them at real shapes on a GPU.

Greedy runs are checked against plain greedy decoding of the target (`microspec.baseline.PlainDecoder`):
in float32 a row may differ only where the target's top-2 logits nearly tie, so every mismatch is reported
with that gap (`first_divergence`, `top2_gap`).
"""
from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from torch import Tensor

from ..engine import DecodeRun, Prefilled
from .data import FITTING_CORPORA, load_pairs, same_text_key, shared_data_dir

# The fixed evaluation subset: task -> (file under the shared data folder, question ids). The first turn of
# each question is the user message (chat template applied). Spec-Bench's first 80 questions are MT-bench, so
# MT-bench is taken from its own file and Spec-Bench contributes its five other categories. Summarization and
# RAG take the shortest articles (prefill on two CPU cores is the cost); MT-bench the first question of its
# writing, coding and reasoning categories (writing's first, 81, is also an AlpacaEval instruction whose
# answers are in the fitting corpora, so 82); every other task its first ids. `check_disjoint` verifies.
SUBSET: dict[str, tuple[str, tuple[int, ...]]] = {
    "mt_bench": ("mt_bench/question.jsonl", (82, 121, 101)),
    "translation": ("spec_bench/question.jsonl", (161, 162, 163)),
    "summarization": ("spec_bench/question.jsonl", (277, 275, 268)),
    "qa": ("spec_bench/question.jsonl", (321, 322, 323)),
    "math_reasoning": ("spec_bench/question.jsonl", (401, 402, 403)),
    "rag": ("spec_bench/question.jsonl", (503, 553, 531)),
    "humaneval": ("eagle_bench/humaneval.question.jsonl", (0, 1, 2)),
    "gsm8k": ("eagle_bench/gsm8k.question.jsonl", (0, 1, 2)),
}
BENCH_K = 5   # benchmarks/bench_e2e.py replays traces of K = 5 drafts per verification


@dataclass
class EvalPrompt:
    task: str
    source: str          # file under the shared data folder
    id: int              # question_id in that file
    text: str            # first turn


def load_subset(subset=SUBSET, per_task: int | None = None, tasks=None,
                root: Path | None = None) -> list[EvalPrompt]:
    """The listed prompts, task by task in `subset` order (the first `per_task` ids of each task)."""
    if tasks is not None and (unknown := set(tasks) - set(subset)):
        raise ValueError(f"unknown tasks {sorted(unknown)}; known: {', '.join(subset)}")
    root = Path(root) if root is not None else shared_data_dir()
    prompts = []
    for task, (rel, ids) in subset.items():
        if tasks is not None and task not in tasks:
            continue
        rows = {}
        with open(root / rel) as f:
            for line in f:
                rec = json.loads(line)
                rows[rec["question_id"]] = rec
        for qid in ids[:per_task]:
            if qid not in rows:
                raise ValueError(f"{rel} has no question_id {qid}")
            prompts.append(EvalPrompt(task, rel, qid, rows[qid]["turns"][0]))
    return prompts


def check_disjoint(prompts: list[EvalPrompt], corpora=FITTING_CORPORA) -> None:
    """Raise ValueError if an evaluation prompt is also a prompt of a fitting corpus (its answer would have
    been counted into the frequency table), or if two evaluation prompts are the same text."""
    texts = [same_text_key(p.text) for p in prompts]
    if len(set(texts)) != len(texts):
        raise ValueError("the evaluation subset holds the same prompt twice")
    fitted = {same_text_key(q) for spec in corpora for q, _ in load_pairs(spec)}
    clash = [f"{p.task}:{p.id}" for p, t in zip(prompts, texts) if t in fitted]
    if clash:
        raise ValueError(f"evaluation prompts {clash} are prompts of the fitting corpora {list(corpora)}")


def length_batches(lengths: list[int], batch_size: int, max_ratio: float | None = None) -> list[list[int]]:
    """Indices sorted by prompt length and cut into batches of at most `batch_size` (less padding in the
    prefill); with `max_ratio`, a batch also ends before a prompt longer than max_ratio x its shortest."""
    order = sorted(range(len(lengths)), key=lambda i: (lengths[i], i))
    batches: list[list[int]] = []
    for i in order:
        if (not batches or len(batches[-1]) == batch_size
                or (max_ratio is not None and lengths[i] > max_ratio * lengths[batches[-1][0]])):
            batches.append([])
        batches[-1].append(i)
    return batches


# ---------------------------------------------------------------------------------------------- per-row logs
@dataclass
class RowStats:
    """One prompt's counters over its decode steps (row-steps = steps in which the row was unfinished)."""
    steps: int = 0
    accepted: int = 0
    committed: int = 0
    covered: int = 0
    active: int = 0
    trace: list[int] = field(default_factory=list)   # accepted drafts at each of its row-steps, in order
    generated: int = 0                                # new tokens, the prefill's first token included


class RowLog:
    """An engine observer that logs per-row counters of every decode step (host-side lists; CPU use only:
    each step copies five counters per row to the host)."""

    def __init__(self):
        self.log: list[Tensor] = []    # per step: int64 [B, 5] = live, accepted, committed, covered, active

    def __call__(self, r) -> None:
        covered = (r.in_set & r.mask).sum(1)
        self.log.append(torch.stack([r.live.long(), r.n_accepted * r.live, r.n_commit, covered,
                                     r.n_active * r.live], 1).cpu())

    def row_stats(self, generated: Tensor) -> list[RowStats]:
        rows = [RowStats(generated=int(g)) for g in generated.cpu()]
        for step in self.log:
            for r, (live, acc, com, cov, act) in zip(rows, step.tolist()):
                if live:
                    r.steps += 1
                    r.accepted += acc
                    r.committed += com
                    r.covered += cov
                    r.active += act
                    r.trace.append(acc)
        return rows


class PrefillCache:
    """Reuses the prefill of an earlier run on the same batch: both models' KV caches and the prefill outputs
    are restored instead of recomputed (on two CPU cores the prompt forwards would otherwise cost as much as
    decoding). The prefill depends on the policy only through the target top-k ids it hands over (computed
    once with `topk` >= every policy's k and cut to each policy's k; a sorted top-k's first k are the top-k)
    and whether hidden states are kept (part of the key); the same shapes give the same values, so the run is
    unchanged."""

    def __init__(self, topk: int = 0):
        self.topk, self.entries = topk, {}

    def __len__(self) -> int:
        return len(self.entries)

    def start(self, run: DecodeRun, key) -> None:
        policy, k = run.policy, run.policy.target_topk
        full = (key, policy.wants_hidden, run.S)
        entry = self.entries.get(full)
        run.target.allocate(run.B, run.S)
        run.proposer.allocate(run.B, run.S)
        if entry is None or entry[0] < k:
            k_all = max(k, self.topk)
            had = "target_topk" in vars(policy)
            own = policy.target_topk
            policy.target_topk = k_all     # the engine reads the policy's k; widened for this prefill only
            try:
                pre = run.prefill()
            finally:
                if had:
                    policy.target_topk = own
                else:
                    del policy.target_topk
            entry = self.entries[full] = (k_all, run.target.snapshot(), run.proposer.snapshot(), pre)
        else:
            run.target.restore(entry[1])
            run.proposer.restore(entry[2])
        pre = entry[3]
        topk = None if not k else pre.topk[..., :k].clone()
        run.start(Prefilled(pre.last_logits.clone(), topk,
                            None if pre.hidden is None else pre.hidden.clone()))


def run_batch(decoder, ids: Tensor, mask: Tensor, max_new_tokens: int, *, do_sample: bool = False,
              temperature: float = 1.0, generators=None, eos=None, pad: int | None = None,
              prefill_cache: PrefillCache | None = None, prefill_key=None):
    """`decoder.generate` with per-row logging -> (new-token lists per row, RowStats per row, SpecStats).
    `prefill_cache` / `prefill_key`: see `PrefillCache` (the key must name this exact batch and drafter)."""
    log = RowLog()
    with torch.inference_mode():
        run, input_ids, pad_id = decoder.new_run(ids, mask, max_new_tokens, do_sample=do_sample,
                                                 temperature=temperature, eos_token_id=eos, pad_token_id=pad,
                                                 generator=generators, observers=[log], cuda_graph=False)
        if prefill_cache is None:
            run.start()
        else:
            prefill_cache.start(run, prefill_key)
        run.run_steps()
        sequences = run.sequences(input_ids, pad_id)
    rows = log.row_stats(run.generated)
    L = ids.shape[1]
    new = [sequences[i, L: L + r.generated].tolist() for i, r in enumerate(rows)]
    return new, rows, run.summary()


# ---------------------------------------------------------------------------------------------- aggregation
def aggregate(rows: list[RowStats], K: int) -> dict:
    """Pooled statistics over rows (the formulas of `SpecStats`): tau = 1 + accepted / row-steps, acceptance
    = accepted / (K row-steps), coverage = covered / committed, mean active size per row-step."""
    steps = sum(r.steps for r in rows)
    acc, com = sum(r.accepted for r in rows), sum(r.committed for r in rows)
    return {"tau": 1.0 + acc / max(steps, 1), "acceptance": acc / max(K * steps, 1),
            "coverage": sum(r.covered for r in rows) / max(com, 1),
            "mean_active": sum(r.active for r in rows) / max(steps, 1),
            "row_steps": steps, "committed": com, "prompts": len(rows)}


def task_stats(tasks: list[str], rows_by_label: dict[str, list[RowStats]], K: int, full_label: str = "full"):
    """label -> task -> aggregate(...) plus "tau_fraction" (tau / tau of `full_label` on the same task);
    the task "all" pools every row. tasks[i] is the task of row i (the same row order for every label)."""
    names = list(dict.fromkeys(tasks)) + ["all"]
    out = {}
    for label, rows in rows_by_label.items():
        if len(rows) != len(tasks):
            raise ValueError(f"{label}: {len(rows)} rows for {len(tasks)} prompts")
        out[label] = {t: aggregate([r for r, rt in zip(rows, tasks) if t in ("all", rt)], K) for t in names}
    if full_label in out:
        for label, per_task in out.items():
            for t, s in per_task.items():
                s["tau_fraction"] = s["tau"] / out[full_label][t]["tau"]
    return out


# ---------------------------------------------------------------------------------------------- greedy check
def first_divergence(a: list[int], b: list[int]) -> int | None:
    """Index of the first differing token of two sequences (a shorter one differs where it ends)."""
    for j, (x, y) in enumerate(zip(a, b)):
        if x != y:
            return j
    return None if len(a) == len(b) else min(len(a), len(b))


def top2_gap(model, context: list[int]) -> tuple[float, list[int]]:
    """The target's top-1 minus top-2 logit after `context`, and those two ids (plain forward, no cache)."""
    with torch.inference_mode():
        ids = torch.tensor([context], device=next(model.parameters()).device)
        logits = model(input_ids=ids).logits[0, -1].float()
    top = torch.topk(logits, 2)
    return float(top.values[0] - top.values[1]), top.indices.tolist()


def greedy_mismatches(model, prompts: list[list[int]], outputs: list[list[int]], references: list[list[int]]):
    """Rows whose speculative greedy output differs from plain greedy decoding, with the target's top-2 gap
    at the first divergence (after the common prefix)."""
    found = []
    for i, (prompt, out, ref) in enumerate(zip(prompts, outputs, references)):
        j = first_divergence(out, ref)
        if j is None:
            continue
        gap, top = top2_gap(model, prompt + ref[:j])
        found.append({"row": i, "position": j, "spec_token": out[j] if j < len(out) else None,
                      "plain_token": ref[j] if j < len(ref) else None, "top2_gap": gap, "top2_ids": top})
    return found


# ---------------------------------------------------------------------------------------------- files
def write_traces(path, traces: dict[str, list[int]], source: str, K: int) -> Path:
    """The bench_e2e trace file: {"source": str, "K": K, "traces": {label: [n_accepted, ...]}}."""
    if K != BENCH_K:
        raise ValueError(f"benchmarks/bench_e2e.py replays K = {BENCH_K} traces; this run used K = {K}")
    for label, trace in traces.items():
        if not trace or any(not 0 <= int(n) <= K for n in trace):
            raise ValueError(f"trace {label!r} is empty or holds counts outside [0, {K}]")
    path = Path(path)
    path.write_text(json.dumps({"source": source, "K": K, "traces": {k: [int(n) for n in v]
                                                                      for k, v in traces.items()}}) + "\n")
    return path


def flat_trace(rows: list[RowStats]) -> list[int]:
    """Row traces concatenated in prompt order: one replayable sequence per policy."""
    return [n for r in rows for n in r.trace]


def rows_to_json(rows: list[RowStats]) -> list[dict]:
    return [asdict(r) for r in rows]


def markdown_tables(stats: dict, labels: list[str] | None = None) -> str:
    """Three tables (tau with the fraction of full-vocabulary tau; acceptance rate; coverage / mean active
    size), policies as rows and tasks as columns, from `task_stats` output."""
    labels = labels or list(stats)
    tasks = list(next(iter(stats.values())))
    head = "| policy | " + " | ".join(tasks) + " |\n|---|" + "---:|" * len(tasks) + "\n"

    def table(title, cell):
        body = "".join(f"| {lab} | " + " | ".join(cell(stats[lab][t]) for t in tasks) + " |\n"
                       for lab in labels)
        return f"{title}\n\n{head}{body}"

    frac = (lambda s: f"{s['tau']:.2f} ({100 * s['tau_fraction']:.1f} %)") if "tau_fraction" in \
        stats[labels[0]]["all"] else (lambda s: f"{s['tau']:.2f}")
    return "\n".join([table("tau (% of full-vocabulary tau)", frac),
                      table("acceptance rate", lambda s: f"{s['acceptance']:.3f}"),
                      table("coverage / mean active size",
                            lambda s: f"{s['coverage']:.3f} / {s['mean_active']:.0f}")])
