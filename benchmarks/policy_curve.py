"""Accepted length against mean active rows, per policy and task, on real weights (CPU): issue 15.

Why: a policy is worth shipping only if it keeps (nearly) the full-vocabulary accepted length on *every*
task with few active rows. This script decodes the evaluation prompts (`microspec.lab.evaluation.SUBSET`:
Spec-Bench, MT-bench, HumanEval, GSM8K test; `check_disjoint` proves none is a fitting-corpus prompt) with an
EAGLE head and an EAGLE-2 tree, once per policy and mode, and records per prompt: row-steps, accepted
drafts, summed active rows. From those: tau per task (pooled), % of the full-vocabulary tau, mean active
rows, and a paired bootstrap over prompts (within each task; stratified by task for "all") of the ratio
tau(policy) / tau(full): both policies resampled with the same prompt draw, so prompt difficulty cancels.

Greedy outputs of every policy are compared with the full-vocabulary run's (lossless: they must be equal up
to float near-ties); sampling uses the same per-prompt seed for every policy.

Policy names (short forms kept for the results already recorded; the label grammar's equivalents of
`microspec.lab.policy_labels` in brackets):
    full                      FullVocab
    ctx/k<k>                  MicroSpec recipe: InContextPolicy(3072, k, grow-only, tree_ids=True)
                              [incontext@3072/k<k>/tree/grow]
    ctx+core<N>/k<k>          ... plus a pinned core of the N most frequent ids (capacity 3072 + N)
    adapt<G>/k<k>             adaptive_recipe: recipe ∪ AdaptiveCorePolicy(grow G per novel token, <= 2048)
                              [adaptive<G>@3072/k<k>]
    ctx+cluster<C>/k<k>       UnionPolicy(recipe, ClusterPolicy file at capacity C)

Prompts: `--subset eval` is `microspec eval`'s subset (3 per task); `--subset wide` takes --per-task prompts
per task from the same files (`wide_subset`: one MT-bench question per category, at most 10; the shortest
Spec-Bench articles for summarization and RAG, the first ids elsewhere, at most 80), for per-task intervals
narrow enough to matter. Runs split by --tasks (one process per core) are joined with `--plot-only A.json
B.json --merge-into ALL.json`.

    OMP_NUM_THREADS=1 MKL_NUM_THREADS=1 python benchmarks/policy_curve.py --tree 4,4,16 \\
        --policies full,ctx/k3,adapt64/k3 --json benchmarks/results/policy_curve_smollm2_t4.json
    python benchmarks/policy_curve.py --plot-only benchmarks/results/policy_curve_*.json
"""
from __future__ import annotations

import argparse
import datetime
import json
import random
import re
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
SMOLLM2_CLUSTERS = ROOT / "docs" / "results" / "cluster_policy_smollm2_2026-11-22.safetensors"
DEFAULT_POLICIES = "full,ctx/k3,ctx+core1024/k3,adapt64/k3"


def build_policy(label: str, ranking, cluster_file=None):
    """A short name of the module docstring -> a fresh policy, through the label grammar where it has the
    form (`grammar_label`); the cluster union is composed here."""
    from microspec.lab.policy_labels import policy_from_label
    from microspec.policies import InContextPolicy, UnionPolicy
    m = re.fullmatch(r"ctx\+cluster(\d+)/k(\d+)", label)
    if not m:
        return policy_from_label(grammar_label(label), ranking)
    from microspec.policies.cluster import ClusterPolicy
    if cluster_file is None:
        raise ValueError(f"{label}: needs --cluster-file")
    return UnionPolicy(InContextPolicy(3072, int(m.group(2)), eviction=None, tree_ids=True),
                       ClusterPolicy.load(cluster_file, int(m.group(1))))


def grammar_label(name: str) -> str:
    """full, ctx/kK, ctx+coreN/kK, adaptG/kK -> the `microspec.lab.policy_labels` label of the same policy."""
    if name == "full":
        return "full"
    m = re.fullmatch(r"(ctx|ctx\+core(\d+)|adapt(\d+))/k(\d+)", name)
    if not m:
        raise ValueError(f"unknown policy label {name!r}")
    k = m.group(4)
    if m.group(2):
        n = int(m.group(2))
        return f"incontext+core{n}@{3072 + n}/k{k}/tree/grow"
    if m.group(3):
        return f"adaptive{m.group(3)}@3072/k{k}"
    return f"incontext@3072/k{k}/tree/grow"


# ---------------------------------------------------------------------------------------------- statistics
def tau(rows) -> float:
    steps = sum(r["steps"] for r in rows)
    return 1.0 + sum(r["accepted"] for r in rows) / max(steps, 1)


def mean_active(rows) -> float:
    return sum(r["active"] for r in rows) / max(sum(r["steps"] for r in rows), 1)


def bootstrap_ratio(rows, full, strata, draws: int = 2000, seed: int = 0) -> tuple[float, float]:
    """95 % percentile interval of tau(rows) / tau(full) under a paired resampling of prompts within each
    stratum (strata[i]: the task of prompt i). A stratum of one prompt never varies: `summarise` pools
    single-prompt tasks into one stratum for "all", and a single-prompt task gets a zero-width interval."""
    rng = random.Random(seed)
    groups = {}
    for i, s in enumerate(strata):
        groups.setdefault(s, []).append(i)
    ratios = []
    for _ in range(draws):
        pick = [rng.choice(g) for g in groups.values() for _ in g]
        ratios.append(tau([rows[i] for i in pick]) / tau([full[i] for i in pick]))
    ratios.sort()
    return ratios[int(0.025 * draws)], ratios[int(0.975 * draws) - 1]


def summarise(tasks: list[str], per_label: dict[str, list[dict]]) -> dict:
    """label -> task ('all' pools every prompt) -> tau, pct of full, CI of pct, mean active rows."""
    names = list(dict.fromkeys(tasks))
    full = per_label.get("full")
    out = {}
    for label, rows in per_label.items():
        out[label] = {}
        for t in names + ["all"]:
            idx = [i for i, x in enumerate(tasks) if t in ("all", x)]
            sub = [rows[i] for i in idx]
            entry = {"tau": tau(sub), "mean_active": mean_active(sub), "prompts": len(idx),
                     "row_steps": sum(r["steps"] for r in sub)}
            if all("covered" in r for r in sub):     # committed tokens that were in the set when drafted
                entry["coverage"] = sum(r["covered"] for r in sub) / max(sum(r["committed"] for r in sub), 1)
            if full is not None:
                fsub = [full[i] for i in idx]
                entry["pct_of_full"] = 100 * entry["tau"] / tau(fsub)
                strata = [tasks[i] for i in idx]
                if len(set(strata)) == len(strata):     # one prompt per task: stratifying would fix the draw
                    strata = ["all"] * len(strata)
                lo, hi = bootstrap_ratio(sub, fsub, strata)
                entry["pct_ci95"] = [100 * lo, 100 * hi]
            out[label][t] = entry
    return out


def wide_subset(per_task: int, root: Path | None = None) -> dict:
    """`per_task` prompts per task from the evaluation files (task -> (file, ids), as `SUBSET`): MT-bench one
    question per category (81, writing's first, is an AlpacaEval instruction: 82 instead; at most 10),
    Spec-Bench summarization and RAG the shortest articles (CPU prefill), every other task its first ids (at
    most 80). A larger `per_task` extends a smaller one's list, so runs of different sizes share prompts.
    Evaluation prompts only; `check_disjoint` verifies none is in a fitting corpus and none is there twice."""
    from microspec.lab.data import same_text_key, shared_data_dir
    root = Path(root) if root is not None else shared_data_dir()
    n = per_task
    spec = [json.loads(line) for line in open(root / "spec_bench" / "question.jsonl")]

    def shortest(category):
        rows = [r for r in spec if r["category"] == category]
        return tuple(r["question_id"] for r in sorted(rows, key=lambda r: len(r["turns"][0]))[:n])

    def first(category, skip=frozenset()):
        return tuple(r["question_id"] for r in spec if r["category"] == category
                     and same_text_key(r["turns"][0]) not in skip)[:n]
    sb, gsm8k = "spec_bench/question.jsonl", "eagle_bench/gsm8k.question.jsonl"
    # Spec-Bench's math_reasoning is drawn from GSM8K test: three of its questions are in the GSM8K file too.
    in_gsm8k = frozenset(same_text_key(json.loads(line)["turns"][0]) for line in open(root / gsm8k))
    return {"mt_bench": ("mt_bench/question.jsonl", (82, 91, 101, 111, 121, 131, 141, 151, 92, 102)[:n]),
            "translation": (sb, first("translation")), "summarization": (sb, shortest("summarization")),
            "qa": (sb, first("qa")), "math_reasoning": (sb, first("math_reasoning", in_gsm8k)),
            "rag": (sb, shortest("rag")),
            "humaneval": ("eagle_bench/humaneval.question.jsonl", tuple(range(n))),
            "gsm8k": (gsm8k, tuple(range(n)))}


def merge(results: list[dict]) -> dict:
    """Runs of the same model, tree and policies over different prompts -> one result (prompts and each
    policy's per-prompt rows concatenated, per mode; statistics re-derived by the caller)."""
    out = json.loads(json.dumps(results[0]))
    for r in results[1:]:
        if (r["model"], r["tree"], r["max_new_tokens"]) != (out["model"], out["tree"], out["max_new_tokens"]):
            raise ValueError("--merge-into: runs of different models, trees or lengths")
        out["prompts"] += r["prompts"]
        for mode, rec in r["runs"].items():
            for label, entry in rec["policies"].items():
                mine = out["runs"][mode]["policies"][label]
                mine["rows"] += entry["rows"]
                mine["seconds"] = round(mine["seconds"] + entry["seconds"], 1)
        out["command"] += " + " + r["command"]
    return out


# ---------------------------------------------------------------------------------------------- decoding
def measure(args) -> dict:
    from microspec import SpecDecoder, models
    from microspec.drafting.eagle import EagleDrafter
    from microspec.drafting.tree import TreeSpec
    from microspec.lab import evaluation as ev
    from microspec.lab.policy_labels import frequency_ranking
    from microspec.inputs import resolve_special_ids
    from microspec.prompts import encode_prompt, left_pad

    torch.set_num_threads(1)
    labels = [x.strip() for x in args.policies.split(",") if x.strip()]
    if labels[0] != "full":
        raise ValueError("the first policy must be full (the reference of every ratio)")
    tasks = None if args.tasks is None else args.tasks.split(",")
    subset = wide_subset(args.per_task) if args.subset == "wide" else ev.SUBSET
    prompts = ev.load_subset(subset, per_task=args.per_task, tasks=tasks)
    ev.check_disjoint(prompts)
    t0 = time.perf_counter()
    target, tok = models.load_model(args.model, torch.float32)
    drafter = EagleDrafter.from_pretrained(args.drafter, target)
    name = args.name or ("smollm2" if args.model == "smollm2" else Path(args.model).stem.lower())
    from microspec.models import cache_dir
    ranking, _ = frequency_ranking(tok, name, cache_dir() / "eval" / f"freq_{name}.safetensors")
    tree = TreeSpec(*(int(x) for x in args.tree.split(",")))
    rows = [encode_prompt(tok, p.text, args.prompt_format) for p in prompts]
    eos, pad = resolve_special_ids(generation_config=target.generation_config,     # as `microspec eval`
                                   vocab_size=target.get_output_embeddings().weight.shape[0])
    batches = ev.length_batches([len(r) for r in rows], args.batch_size)
    print(f"{name}: {len(prompts)} prompts, tree {args.tree}, loaded in {time.perf_counter() - t0:.0f} s",
          flush=True)
    cache = ev.PrefillCache(topk=max([0] + [int(x.split("/k")[1]) for x in labels if "/k" in x]))
    task_of = [p.task for p in prompts]
    result = {"date": datetime.date.today().isoformat(), "device": "cpu (1 torch thread)",
              "command": " ".join(["python"] + sys.argv), "model": name, "drafter": args.drafter,
              "tree": args.tree, "max_new_tokens": args.max_new_tokens, "seed": args.seed,
              "temperature": 1.0, "dtype": "float32", "prompt_format": args.prompt_format,
              "prompts": [{"task": p.task, "source": p.source, "id": p.id, "tokens": len(r)}
                          for p, r in zip(prompts, rows)], "runs": {}}
    for mode in args.modes.split(","):
        do_sample = mode == "sampling"
        per_label, outputs, record = {}, {}, {"policies": {}}
        for label in labels:
            policy = build_policy(label, ranking, args.cluster_file)
            dec = SpecDecoder(target, drafter, policy, tree.depth, tokenizer=tok, cuda_graph=False, tree=tree)
            t1 = time.perf_counter()
            stats, outs = [None] * len(rows), [None] * len(rows)
            for b, batch in enumerate(batches):
                ids, mask = left_pad([rows[i] for i in batch], pad)
                gens = ([torch.Generator().manual_seed(args.seed * 100003 + i) for i in batch] if do_sample
                        else None)
                new, rs, _ = ev.run_batch(dec, ids, mask, args.max_new_tokens, do_sample=do_sample,
                                          temperature=1.0, generators=gens, eos=eos, pad=pad,
                                          prefill_cache=cache, prefill_key=b)
                for i, n, r in zip(batch, new, rs):
                    stats[i] = {"steps": r.steps, "accepted": r.accepted, "active": r.active,
                                "generated": r.generated, "covered": r.covered, "committed": r.committed}
                    outs[i] = n
            per_label[label], outputs[label] = stats, outs
            entry = {"seconds": round(time.perf_counter() - t1, 1), "rows": stats}
            if mode == "greedy" and label != "full":
                entry["greedy_differs_from_full"] = [i for i, (a, f) in enumerate(zip(outs, outputs["full"]))
                                                     if a != f]
            record["policies"][label] = entry
            print(f"  {mode:9}{label:22} tau {tau(stats):5.2f}  rows {mean_active(stats):8.0f}  "
                  f"{entry['seconds']:6.0f} s", flush=True)
        record["tasks"] = summarise(task_of, per_label)
        result["runs"][mode] = record
        Path(args.json).write_text(json.dumps(result, indent=1) + "\n")   # after every mode: partial results
    return result


# ---------------------------------------------------------------------------------------------- reporting
def markdown(result: dict) -> str:
    """One table per mode: policies as rows, tasks as columns, 'tau (pct %) / rows'."""
    out = []
    for mode, rec in result["runs"].items():
        stats = rec["tasks"]
        tasks = list(next(iter(stats.values())))
        out.append(f"**{result['model']}, tree {result['tree']}, {mode}**\n")
        out.append("| policy | " + " | ".join(tasks) + " | worst task |")
        out.append("|---|" + "---:|" * (len(tasks) + 1))
        for label, per in stats.items():
            cells = [f"{s['tau']:.2f}" + (f" ({s['pct_of_full']:.1f} %)" if label != "full" else "")
                     + f" / {s['mean_active']:.0f}" for s in per.values()]
            worst = "" if label == "full" else f"{min(s['pct_of_full'] for s in per.values()):.1f} %"
            out.append(f"| {label} | " + " | ".join(cells) + f" | {worst} |")
        ci = "; ".join(f"{lab} [{s['all']['pct_ci95'][0]:.1f}, {s['all']['pct_ci95'][1]:.1f}]"
                       for lab, s in stats.items() if lab != "full")
        out.append(f"\n95 % CI of % of full (all tasks, paired bootstrap over prompts): {ci}\n")
    return "\n".join(out)


def plot(results: list[dict], path: Path) -> bool:
    """% of full-vocabulary tau against mean active rows (log x): all tasks pooled with the bootstrap
    interval, and the worst task (hollow); one row of panels per result file, one column per mode; full is
    100 %. Returns False when matplotlib is missing."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    modes = list(dict.fromkeys(m for r in results for m in r["runs"]))
    fig, axes = plt.subplots(len(results), len(modes), figsize=(5.2 * len(modes), 3.9 * len(results)),
                             squeeze=False)
    colors = {}
    for ax, (r, mode) in zip(axes.flat, [(r, m) for r in results for m in modes]):
        if mode not in r["runs"]:
            ax.set_axis_off()
            continue
        stats = r["runs"][mode]["tasks"]
        ax.axhline(100, color="k", ls="--", lw=1,
                   label=f"full vocabulary (tau {stats['full']['all']['tau']:.2f}, "
                         f"{stats['full']['all']['mean_active']:.0f} rows)")
        ax.axhline(98, color="grey", ls=":", lw=1, label="98 % of full")
        families = {}
        for label, per in stats.items():
            if label != "full":
                families.setdefault(re.sub(r"\d+", "N", label), []).append(per)
        for fam, pts in families.items():
            pts.sort(key=lambda per: per["all"]["mean_active"])
            color = colors.setdefault(fam, f"C{len(colors)}")
            x = [per["all"]["mean_active"] for per in pts]
            y = [per["all"]["pct_of_full"] for per in pts]
            err = [[v - per["all"]["pct_ci95"][0] for v, per in zip(y, pts)],
                   [per["all"]["pct_ci95"][1] - v for v, per in zip(y, pts)]]
            ax.errorbar(x, y, yerr=err, fmt="o-", color=color, capsize=3, label=f"{fam} (all tasks, 95 % CI)")
            worst = [min(s["pct_of_full"] for t, s in per.items() if t != "all") for per in pts]
            ax.plot(x, worst, "v", color=color, mfc="none", label=f"{fam}: worst task")
        ax.set_xscale("log")
        ax.set_xlabel("mean active rows")
        ax.set_ylabel("tau, % of full vocabulary")
        ax.set_title(f"{r['model']} + EAGLE head, tree {r['tree']}, {mode}, {len(r['prompts'])} prompts",
                     fontsize=9)
        ax.legend(fontsize=6)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    return True


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="smollm2", help="'smollm2' or a .gguf path")
    p.add_argument("--drafter", default="checkpoints/eagle-smollm2", help="an EagleDrafter checkpoint")
    p.add_argument("--name", default=None)
    p.add_argument("--tree", default="4,4,16", help="TOPK,DEPTH,TOKENS")
    p.add_argument("--policies", default=DEFAULT_POLICIES)
    p.add_argument("--modes", default="greedy,sampling")
    p.add_argument("--per-task", type=int, default=3)
    p.add_argument("--tasks", default=None)
    p.add_argument("--max-new-tokens", type=int, default=64)
    p.add_argument("--batch-size", type=int, default=4)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--prompt-format", default="auto", choices=["auto", "chat", "plain"],
                   help="microspec.prompts.encode_prompt: 'plain' for base models (Gemma-3-270M's EAGLE "
                        "head was trained on it)")
    p.add_argument("--cluster-file", default=None)
    p.add_argument("--json", default=None)
    p.add_argument("--plot", default=None,
                   help="write the curve here (default: docs/policy_curve.png with --plot-only, none when "
                        "measuring: a run on a few tasks must not replace the committed figure)")
    p.add_argument("--plot-only", nargs="*", default=None, help="re-plot / re-tabulate these JSON files")
    p.add_argument("--subset", default="eval", choices=["eval", "wide"])
    p.add_argument("--merge-into", default=None, help="with --plot-only: join the runs into this JSON file")
    args = p.parse_args(argv)
    if args.plot_only is not None:
        args.plot = ROOT / "docs" / "policy_curve.png" if args.plot is None else args.plot
        results = [json.loads(Path(f).read_text()) for f in args.plot_only]
        if args.merge_into:
            results = [merge(results)]
            Path(args.merge_into).write_text(json.dumps(results[0], indent=1) + "\n")
        for r in results:                        # re-derive the statistics from the raw per-prompt rows
            task_of = [p["task"] for p in r["prompts"]]
            for rec in r["runs"].values():
                rec["tasks"] = summarise(task_of, {k: e["rows"] for k, e in rec["policies"].items()})
    else:
        if not args.json:
            p.error("--json is required when measuring")
        results = [measure(args)]
    for r in results:
        print(markdown(r))
    if args.plot:
        print(f"wrote {args.plot}" if plot(results, Path(args.plot)) else "matplotlib missing: no plot")
    return 0


if __name__ == "__main__":
    sys.exit(main())
