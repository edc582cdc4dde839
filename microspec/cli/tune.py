"""`microspec tune`: choose a policy's capacity and knobs by coverage vs LM-head latency (optuna TPE).

Why a command: the capacity that maximises draft throughput depends on the text (coverage), the head's
real cost (bandwidth, launch floor, per-step gathers) and the drafter; a seeded search over measured
coverage and a stated cost model makes that choice reproducible. The model is in `microspec.lab.tuning`, the
coverage from the same harness as `microspec coverage` (text-only or --model). Needs the `tune` extra
(optuna).
"""
from __future__ import annotations

import argparse
import json
import math
import sys
import time

from .coverage import Setup, add_data_args, check_data_args, make_policy

DESCRIPTION = """\
Search a policy's capacity (static: list size; incontext: capacity, target top-k, eviction, core size) with
optuna's TPE sampler, maximising   utility = E[tokens per block] / block time   subject to
coverage >= --min-coverage, where (docs/tuning.md derives it)
  E[tokens per block] = 1 + sum_{i=1..K} (a*c)^i     c = coverage from the harness, a = --acceptance
  block time          = verify + K * (drafter layers + head(rows)) + per-step update
Head latency comes from --latency-table FILE (measured on a GPU) or, without it, from a cost model with
H100 reference constants (3.0 TB/s; fixed term fitted to 15.6 us / 23.3 us GEMVs at 2048 / 4096 rows).
Writes every trial, the best feasible one and the coverage/latency Pareto frontier (--json, --plot).
"""

EPILOG = """\
examples:
  microspec tune alpaca:Meta-Llama-3-8B-Instruct gsm8k:test mtbench humaneval \\
      --tokenizer ../shared/data/tokenizers/llama3 --policy static --min-coverage 0.9 --trials 40 \\
      --fit alpaca:gpt4_1106_preview alpaca:text_davinci_003 gsm8k:train --json tune.json --plot tune.png
  microspec tune gsm8k:test humaneval --model smollm2 --sample 25 --max-tokens 256 \\
      --policy incontext --topk-choices 0 1 3 --fit gsm8k:train --arch smollm2-135m --trace-cache /tmp/traces
  (add --latency-table FILE to use measured head latency instead of the cost model)
"""


def register(subparsers) -> argparse.ArgumentParser:
    p = subparsers.add_parser("tune", help="pick capacity and policy knobs by coverage vs head latency",
                              description=DESCRIPTION, epilog=EPILOG,
                              formatter_class=argparse.RawDescriptionHelpFormatter)
    add_data_args(p)
    p.add_argument("--policy", choices=("static", "incontext", "custom"), default="incontext")
    p.add_argument("--min-coverage", type=float, default=0.0, help="constraint: coverage >= this (default 0)")
    p.add_argument("--trials", type=int, default=40, help="TPE trials (default: 40)")
    p.add_argument("--capacity-range", type=int, nargs=2, metavar=("LO", "HI"), default=(256, 32768),
                   help="capacity search range, log-uniform integers (default: 256 32768)")
    p.add_argument("--topk-choices", type=int, nargs="+", metavar="K",
                   help="incontext with --model: target top-k values to try (default: 1 3 5)")
    p.add_argument("--eviction-choices", nargs="+", choices=("lru", "fifo", "none"), default=["lru"],
                   help="incontext: eviction rules to try (default: lru)")
    p.add_argument("--core-max-frac", type=float, default=0.5,
                   help="incontext: core size up to this fraction of the capacity (0: no core; default 0.5)")
    p.add_argument("--arch", choices=("llama3-8b", "qwen2-7b", "smollm2-135m"), default="llama3-8b",
                   help="target/drafter dimensions for the cost model (default: llama3-8b, as the H100 "
                        "numbers)")
    p.add_argument("--latency-table", metavar="FILE",
                   help="measured head latency JSON (format: docs/tuning.md)")
    p.add_argument("--bandwidth", type=float, metavar="B/s", help="cost model: override 3.0e12 bytes/s")
    p.add_argument("--fixed-us", type=float, help="cost model: override the fixed GEMV term (11.06 us)")
    p.add_argument("--layers-us", type=float,
                   help="drafter layers per drafted token (default: EAGLE estimate)")
    p.add_argument("--include-verify", action="store_true",
                   help="add the target's verification to the block time (default: draft-only utility)")
    p.add_argument("-K", type=int, default=5, help="drafts per block (default: 5; --block defaults to K+1)")
    p.add_argument("--acceptance", type=float, default=None,
                   help="per-token acceptance of the drafter with a full head (default: 0.70, EAGLE K=1)")
    p.add_argument("--json", metavar="OUT", help="write trials, best and Pareto frontier as JSON")
    p.add_argument("--plot", metavar="OUT.png", help="plot coverage vs head latency with the frontier")
    p.set_defaults(func=run, block=None)
    return p


def _suggest_fn(args, vocab: int):
    lo, hi = args.capacity_range
    hi = min(hi, vocab)
    if not 1 <= lo <= hi:
        raise ValueError(f"--capacity-range {lo} {hi}: need 1 <= LO <= HI (<= vocab {vocab})")
    topks = args.topk_choices or ([1, 3, 5] if args.model else [0])
    if any(k > 0 for k in topks) and not args.model:
        raise ValueError("--topk-choices > 0 need --model (text-only runs have no target top-k)")

    def suggest(trial) -> dict:
        params = {"capacity": trial.suggest_int("capacity", lo, hi, log=True)}
        if args.policy == "incontext":
            params["topk"] = trial.suggest_categorical("topk", topks)
            params["eviction"] = trial.suggest_categorical("eviction", args.eviction_choices)
            frac = 0.0
            if args.core_max_frac > 0:
                frac = trial.suggest_float("core_frac", 0.0, args.core_max_frac)
            params["core"] = round(frac * params["capacity"] / 64) * 64   # 64-id steps: fewer repeats
        return params
    return suggest


def _check_args(args) -> None:
    """What `_suggest_fn`, `_cost` and the data options would reject, before the tokenizer or model loads."""
    lo, hi = args.capacity_range
    if not 1 <= lo <= hi:
        raise ValueError(f"--capacity-range {lo} {hi}: need 1 <= LO <= HI")
    if any(k < 0 for k in args.topk_choices or []):
        raise ValueError(f"--topk-choices must be >= 0, got {args.topk_choices}")
    if any(k > 0 for k in args.topk_choices or []) and not args.model:
        raise ValueError("--topk-choices > 0 need --model (text-only runs have no target top-k)")
    if not 0 <= args.core_max_frac <= 1:
        raise ValueError(f"--core-max-frac must be in [0, 1], got {args.core_max_frac}")
    if args.acceptance is not None and not 0 < args.acceptance <= 1:
        raise ValueError(f"--acceptance must be in (0, 1], got {args.acceptance}")
    for flag, value in (("--bandwidth", args.bandwidth), ("--fixed-us", args.fixed_us),
                        ("--layers-us", args.layers_us)):
        if value is not None and not (math.isfinite(value) and value >= 0):
            raise ValueError(f"{flag} must be a finite number >= 0, got {value}")
    if args.block < 1:
        raise ValueError(f"--block must be >= 1, got {args.block}")
    check_data_args(args)


def _cost(args):
    from microspec.lab.tuning import ARCHS, CostModel, StepModel, load_latency_table

    arch = ARCHS[args.arch]
    if args.latency_table:
        cost = load_latency_table(args.latency_table, hidden=arch.hidden)
        if args.capacity_range[1] > cost.max_rows:
            print(f"note: capacity range capped at the table's largest entry, {cost.max_rows} rows",
                  file=sys.stderr)
            args.capacity_range = (min(args.capacity_range[0], cost.max_rows), cost.max_rows)
    else:
        cost = CostModel(hidden=arch.hidden, fixed_us=args.fixed_us)
        if args.bandwidth:
            cost.bandwidth = args.bandwidth
        if args.bandwidth or args.fixed_us is not None:
            cost.source = f"cost model: {cost.bandwidth:.3g} B/s, fixed {cost.fixed_us:.2f} us (user-set)"
    acceptance = 0.70 if args.acceptance is None else args.acceptance
    if not 0 < acceptance <= 1:
        raise ValueError(f"--acceptance must be in (0, 1], got {acceptance}")
    step = StepModel.for_arch(arch, cost, args.K, args.include_verify, acceptance)
    if args.layers_us is not None:
        step.layers_us = args.layers_us
    return cost, step, arch


def run(args) -> int:
    from tqdm import tqdm

    from microspec.lab.tuning import plot_pareto, tune

    args.block = args.block or args.K + 1
    if args.trials < 1 or args.K < 1 or not 0 <= args.min_coverage <= 1:
        raise ValueError("--trials and -K must be >= 1 and --min-coverage in [0, 1]")
    _check_args(args)
    t0 = time.perf_counter()
    cost, step, arch = _cost(args)
    setup = Setup(args)
    suggest = _suggest_fn(args, setup.tok.vocab_size)
    print(f"{setup.tok.name}: {len(setup.datasets)} corpora, {setup.n_tokens} response tokens; "
          f"{setup.describe or 'text-only'}; {cost.source}", file=sys.stderr)

    def evaluate(params: dict) -> dict:
        kw = {k: params[k] for k in ("topk", "core", "eviction") if k in params}
        results = setup.evaluate(lambda: make_policy(args.policy, params["capacity"], setup, **kw))
        res = results.get("all") or next(iter(results.values()))
        s = res.summary()
        return {"coverage": s["coverage"], "active_mean": s["active_mean"], "delta_mean": s["delta_mean"]}

    with tqdm(total=args.trials, unit="trial", disable=True if args.no_progress else None,
              file=sys.stderr) as bar:
        def on_trial(t):
            bar.set_description(f"C={t.params['capacity']} cov={t.coverage:.3f} util={t.utility:.3f}")
            bar.update(1)
        result = tune(evaluate, suggest, cost, step, args.min_coverage, args.trials, args.seed, args.policy,
                      on_trial)
    full = _full_vocab_reference(arch.vocab, cost, step)
    _print(result, step, args, full)
    meta = {**setup.meta(), "policy": args.policy, "min_coverage": args.min_coverage, "trials": args.trials,
            "latency_source": cost.source, "arch": args.arch, "K": step.K, "acceptance": step.acceptance,
            "layers_us": step.layers_us, "verify_us": step.verify_us, "bandwidth": cost.bandwidth,
            "fixed_us": cost.fixed_us, "full_vocab": full, "seconds": round(time.perf_counter() - t0, 1)}
    if args.json:
        with open(args.json, "w") as f:
            json.dump({**meta, **result.to_dict()}, f, indent=1)
    if args.plot:
        plot_pareto(result, step.K, args.min_coverage, args.plot,
                    f"{args.policy} on {', '.join(args.corpora)} ({meta['mode']}); {cost.source}"[:150])
    print(f"total {time.perf_counter() - t0:.1f}s", file=sys.stderr)
    return 0 if result.best is not None else 1


def _full_vocab_reference(vocab: int, cost, step) -> dict:
    """The dense head of the --arch vocabulary (coverage 1): the utility a sparse configuration must beat.
    A latency table gives it through its "dense_us" entry, or an entry at >= vocab rows; else NaN."""
    try:
        head = cost.head_us(vocab)
    except ValueError:
        head = getattr(cost, "dense_us", None) or math.nan
    block = step.block_us(head, 0.0)
    tokens = step.expected_tokens(1.0)
    return {"rows": vocab, "head_us": head, "block_us": block, "tokens_per_block": tokens,
            "utility": tokens / block * 1e3}


def _print(result, step, args, full) -> None:
    from microspec.lab.tuning import head_latency_per_token
    w = max([len("params")] + [len(json.dumps(t.params)) for t in result.pareto])
    print(f"{'trial':>5}  {'params':<{w}} {'coverage':>8} {'mean|A|':>8} {'head us/tok':>11} {'tok/blk':>7} "
          f"{'util tok/ms':>11}")
    for t in sorted(result.pareto, key=lambda t: t.coverage):
        print(f"{t.number:>5}  {json.dumps(t.params):<{w}} {t.coverage:>8.4f} {t.active_mean:>8.0f} "
              f"{head_latency_per_token(t, step.K):>11.2f} {t.tokens_per_block:>7.3f} {t.utility:>11.4f}"
              + ("" if t.feasible else "  (infeasible)"))
    print(f"full vocabulary: head {full['head_us']:.1f} us, {full['tokens_per_block']:.3f} tok/blk, "
          f"utility {full['utility']:.4f} tok/ms")
    if result.best is None:
        print(f"no trial reached coverage {args.min_coverage}", file=sys.stderr)
        return
    b = result.best
    print(f"best (coverage >= {args.min_coverage}): {json.dumps(b.params)}  coverage {b.coverage:.4f}, "
          f"utility {b.utility:.4f} tok/ms = {b.utility / full['utility']:.2f}x the full-vocabulary head")
