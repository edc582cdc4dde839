"""`microspec eval`: real speculative decoding of a model pair over a fixed prompt subset, per task and
policy.

Why a command: the accepted length of each vocabulary policy, per task and as a fraction of the
full-vocabulary drafter's, is the number the project is judged on, so it must be re-measurable from one
committed command line. Each (mode, policy) decodes the whole subset (`microspec.lab.evaluation.SUBSET`) with
`SpecDecoder`; greedy outputs are checked against plain greedy decoding of the target; the raw per-prompt
counters and acceptance traces go to a JSON file, the traces also to a `benchmarks/bench_e2e.py` replay file.
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import sys
import time
from pathlib import Path

import torch

from ._common import DTYPES, load_drafter, tree_spec
from .progress import add_quiet_arg, progress_bar
from ..lab.policy_labels import (corpus_successors, frequency_ranking, label_options, parse_label,
                                 policy_from_label)

DEFAULT_POLICIES = ("full,static@1024,static@3072,static@32768,incontext@1024,incontext@3072,"
                    "incontext+core@1024,incontext+core@3072")
EPILOG = """\
examples:
  microspec eval --target smollm2 --drafter self --dtype float64 --json eval.json
  microspec eval --target smollm2 --drafter eagle:checkpoints/eagle-smollm2 --tree 10,6,60 \
      --policies full,incontext@3072 --json eval_tree.json
  microspec eval --target qwen-1.5b.gguf --drafter qwen-0.5b.gguf --per-task 2 --max-new-tokens 96 \\
      --json docs/results/eval_qwen_DATE.json --traces benchmarks/results/acceptance_qwen_DATE.json
"""


def register(sub) -> None:
    p = sub.add_parser("eval", help="per-task accepted length of each policy on real weights",
                       description=__doc__, epilog=EPILOG,
                       formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--target", default="smollm2", help="'smollm2', a .gguf file or a Hugging Face directory")
    p.add_argument("--drafter", default="self",
                   help="'self', 'early-exit:N', 'eagle:PATH' (a trained EAGLE head for the target, e.g. "
                        "checkpoints/eagle-smollm2), or a model sharing the tokenizer")
    p.add_argument("--tree", default=None, metavar="TOPK,DEPTH,TOKENS",
                   help="EAGLE-2 dynamic tree drafting (eagle: drafters only), e.g. 10,6,60; acceptance "
                        "rates are then per tree depth (default: a chain of -K drafts)")
    p.add_argument("--dtype", choices=sorted(DTYPES), default="float32")
    p.add_argument("--policies", default=DEFAULT_POLICIES,
                   help="greedy runs: comma list of full, static@C, incontext@C, incontext+core@C, "
                        "incontext+core<N>@C (core of N ids), cluster@C; in-context labels may end in "
                        "/k<N> (their own target top-k) and /s<N> (N corpus successors per id)")
    p.add_argument("--sample-policies", default=None, help="sampling runs (default: --policies)")
    p.add_argument("--modes", default="greedy,sampling", help="greedy, sampling or both (default: both)")
    p.add_argument("-K", "--num-speculative-tokens", type=int, default=5, dest="K")
    p.add_argument("--max-new-tokens", type=int, default=96)
    p.add_argument("--per-task", type=int, default=2, help="first N prompts of each task's list (max 3)")
    p.add_argument("--tasks", default=None, help="comma list of tasks (default: all)")
    p.add_argument("--batch-size", type=int, default=8, help="prompts per batch, grouped by length")
    p.add_argument("--max-length-ratio", type=float, default=None,
                   help="also end a batch before a prompt longer than this x its shortest (less prefill "
                        "padding)")
    p.add_argument("--temperature", type=float, default=1.0, help="sampling temperature")
    p.add_argument("--seed", type=int, default=0,
                   help="sampling: row i uses a generator seeded seed*100003+i")
    p.add_argument("--topk", type=int, default=3, help="in-context policies: target top-k per position")
    p.add_argument("--core", type=int, default=None, help="incontext+core: core size (default: C // 4)")
    p.add_argument("--cluster-file", default=None, help="ClusterPolicy file for cluster@C policies")
    p.add_argument("--freq-cache", default=None,
                   help="frequency table (safetensors) to reuse/write (default: in ~/.cache/microspec/eval)")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    p.add_argument("--no-check", action="store_true", help="skip the plain greedy reference")
    p.add_argument("--name", default=None, help="model name in file metadata (default: from --target)")
    p.add_argument("--json", default=None, help="write the raw per-run JSON here")
    p.add_argument("--traces", default=None, help="write greedy acceptance traces in bench_e2e format here")
    p.add_argument("--markdown", default=None, help="write the per-task tables here")
    add_quiet_arg(p)
    p.set_defaults(func=run)


def machine() -> dict:
    cpu = platform.processor()
    try:
        cpu = next(line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo")
                   if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    import transformers
    return {"cpu": cpu, "cores": os.cpu_count(), "torch_threads": torch.get_num_threads(),
            "platform": platform.platform(), "python": platform.python_version(), "torch": torch.__version__,
            "transformers": transformers.__version__, "cuda": torch.cuda.is_available()}


def load(args):
    """(target, tokenizer, drafter, target description, drafter description); the drafter through the
    CLI's one `--drafter` reader (`_common.load_drafter`), on the CPU."""
    from microspec import models
    target, tok = models.load_model(args.target, DTYPES[args.dtype])
    desc = str(models.find_smollm2(download=False)) if args.target == "smollm2" else args.target
    drafter, drafter_desc = load_drafter(args, target)
    return target, tok, drafter, desc, drafter_desc


def _check_args(args) -> None:
    """Every argument checkable without the model, before it loads (a typo fails in seconds, not after)."""
    import math

    from ..lab.evaluation import SUBSET
    most = max(len(ids) for _, ids in SUBSET.values())
    for flag, value, lo in (("-K", args.K, 1), ("--max-new-tokens", args.max_new_tokens, 1),
                            ("--batch-size", args.batch_size, 1), ("--topk", args.topk, 0),
                            ("--per-task", args.per_task, 1), ("--threads", args.threads, 1),
                            ("--core", args.core, 0)):
        if value is not None and value < lo:
            raise ValueError(f"{flag} must be >= {lo}, got {value}")
    if args.per_task > most:
        raise ValueError(f"--per-task must be in [1, {most}] (the subset lists {most} prompts per task), got "
                         f"{args.per_task}")
    if not (math.isfinite(args.temperature) and args.temperature > 0):
        raise ValueError(f"--temperature must be finite and > 0, got {args.temperature}")
    if args.max_length_ratio is not None and not args.max_length_ratio >= 1:
        raise ValueError(f"--max-length-ratio must be >= 1, got {args.max_length_ratio}")
    if args.tasks is not None:
        tasks = [t.strip() for t in args.tasks.split(",") if t.strip()]
        if not tasks or set(tasks) - set(SUBSET):
            raise ValueError(f"--tasks {args.tasks!r}: choose from {', '.join(SUBSET)}")
    for flag, spec in (("--target", args.target), ("--drafter", args.drafter)):
        if spec in ("smollm2", "self"):
            continue
        if spec.startswith("early-exit:"):
            n = spec.split(":", 1)[1]
            if not n.isdigit() or int(n) < 1:
                raise ValueError(f"--drafter {spec}: expected early-exit:N with an integer N >= 1")
        elif flag == "--drafter" and spec.startswith("eagle:"):
            from microspec.drafting.eagle import EagleDrafter
            EagleDrafter.read_config(spec.split(":", 1)[1])      # exists and is a microspec EAGLE head
        elif not Path(spec).exists():
            raise FileNotFoundError(f"{flag} {spec}: no such file or model directory")
    tree_spec(args)                                             # parses; only with an eagle: drafter
    if args.tree is not None and args.traces:
        raise ValueError("--traces replays chains of K = 5 in benchmarks/bench_e2e.py; not with --tree")
    if args.cluster_file is not None and not Path(args.cluster_file).is_file():
        raise FileNotFoundError(f"--cluster-file {args.cluster_file}: no such file")
    # every label parses (and builds) with a stand-in ranking and successor table
    labels = _labels(args.policies) + _labels(args.sample_policies or args.policies)
    succ_cols = max([label_options(x, args.topk)[1] for x in labels] + [1])
    for label in labels:
        policy_from_label(label, torch.arange(1), args.cluster_file, args.topk, args.core,
                          torch.full((1, succ_cols), -1))


def run(args) -> int:
    from microspec import SpecDecoder
    from microspec.lab import evaluation as ev
    from microspec.baseline import PlainDecoder
    from microspec.inputs import resolve_special_ids
    from microspec.prompts import chat_rows, left_pad
    from microspec.models import cache_dir
    _check_args(args)
    if args.threads:
        torch.set_num_threads(args.threads)
    t_all = time.perf_counter()
    modes = [m.strip() for m in args.modes.split(",") if m.strip()]
    if not modes or set(modes) - {"greedy", "sampling"}:
        raise ValueError(f"--modes takes greedy and/or sampling, got {args.modes!r}")
    if args.traces and "greedy" not in modes:
        raise ValueError("--traces are taken from the greedy runs: add greedy to --modes")
    labels = {"greedy": _labels(args.policies), "sampling": _labels(args.sample_policies or args.policies)}
    tasks = None if args.tasks is None else [t.strip() for t in args.tasks.split(",")]
    prompts = ev.load_subset(per_task=args.per_task, tasks=tasks)
    ev.check_disjoint(prompts)
    name = args.name or Path(args.target).stem.lower()

    tree = tree_spec(args)
    K = tree.depth if tree is not None else args.K   # the most drafts one verification can accept
    t0 = time.perf_counter()
    target, tok, drafter, target_desc, drafter_desc = load(args)
    t_load = time.perf_counter() - t0
    shape = f"tree {args.tree}" if tree is not None else f"K={args.K}"
    print(f"target {target_desc}\ndrafter {drafter_desc}\n{args.dtype}, {shape}, "
          f"{len(prompts)} prompts x {args.max_new_tokens} new tokens, loaded in {t_load:.0f} s", flush=True)
    rows = chat_rows(tok, [p.text for p in prompts])
    # The EOS / pad rule of `SpecDecoder.generate` (transformers' `generate` conventions), so the plain
    # reference and every policy stop alike.
    eos, pad = resolve_special_ids(generation_config=target.generation_config,
                                   vocab_size=target.get_output_embeddings().weight.shape[0])
    batches = ev.length_batches([len(r) for r in rows], args.batch_size, args.max_length_ratio)

    ranking, freq_meta = None, None
    if any(parse_label(k).needs_ranking for ls in labels.values() for k in ls):
        cache = (Path(args.freq_cache) if args.freq_cache
                 else cache_dir() / "eval" / f"freq_{name}.safetensors")
        t0 = time.perf_counter()
        ranking, freq_meta = frequency_ranking(tok, name, cache)
        freq_meta["seconds"] = round(time.perf_counter() - t0, 1)

    options = [label_options(x, args.topk) for ls in labels.values() for x in ls]
    max_topk = max(k for k, _ in options)
    successors = None
    if max(m for _, m in options):
        successors = corpus_successors(tok, name, max(m for _, m in options),
                                       cache_dir() / "eval" / f"successors_{name}.safetensors")
    prefills = ev.PrefillCache(topk=max_topk)  # one prefill per (batch, hidden or not), for every policy

    def decode_all(decoder, do_sample, desc=None):
        outs, stats = [None] * len(rows), [None] * len(rows)
        bar = progress_bar(args.no_progress, batches, desc=desc, unit="batch", leave=False)
        for b, batch in enumerate(bar):
            ids, mask = left_pad([rows[i] for i in batch], pad)
            gens = ([torch.Generator().manual_seed(args.seed * 100003 + i) for i in batch] if do_sample
                    else None)
            new, rs, _ = ev.run_batch(decoder, ids, mask, args.max_new_tokens, do_sample=do_sample,
                                      temperature=args.temperature, generators=gens, eos=eos, pad=pad,
                                      prefill_cache=prefills, prefill_key=b)
            for i, n, r in zip(batch, new, rs):
                outs[i], stats[i] = n, r
        return outs, stats

    result = {"command": "microspec " + " ".join(sys.argv[1:]) if sys.argv[0].endswith("microspec") else
              " ".join(sys.argv), "date": datetime.date.today().isoformat(), "machine": machine(),
              "target": target_desc, "drafter": drafter_desc, "dtype": args.dtype, "K": K, "tree": args.tree,
              "max_new_tokens": args.max_new_tokens, "batch_size": args.batch_size, "seed": args.seed,
              "batches": batches, "prefill_reuse": "one prefill per batch (and per hidden-state capture), "
              "restored for every later policy and mode; per-policy seconds exclude reused prefills",
              "temperature": args.temperature, "load_seconds": round(t_load, 1), "frequency_table": freq_meta,
              "prompts": [{"task": p.task, "source": p.source, "id": p.id, "prompt_tokens": len(r)}
                          for p, r in zip(prompts, rows)], "runs": {}}
    task_of = [p.task for p in prompts]
    for mode in modes:
        do_sample = mode == "sampling"
        record = result["runs"][mode] = {"policies": {}}
        refs = None
        if mode == "greedy" and not args.no_check:
            t0 = time.perf_counter()
            refs = _plain_greedy(PlainDecoder(target, cuda_graph=False), rows, batches, args.max_new_tokens,
                                 eos, pad)
            record["plain_reference_seconds"] = round(time.perf_counter() - t0, 1)
            record["plain_reference_text"] = [tok.decode(r, skip_special_tokens=True) for r in refs]
            print(f"plain greedy reference: {record['plain_reference_seconds']:.0f} s", flush=True)
        print(f"\n{mode}: {'policy':<22}{'tau':>6}{'accept':>8}{'cover':>7}{'active':>8}{'mismatch':>9}"
              f"{'s':>7}")
        per_label = {}
        for label in labels[mode]:
            policy = policy_from_label(label, ranking, args.cluster_file, args.topk, args.core, successors)
            decoder = SpecDecoder(target, drafter, policy, args.K, tokenizer=tok, cuda_graph=False, tree=tree)
            t0 = time.perf_counter()
            load0 = os.getloadavg()[0]
            outs, stats = decode_all(decoder, do_sample, f"{mode} {label}")
            seconds = time.perf_counter() - t0
            entry = {"seconds": round(seconds, 1), "load_average_start": load0,
                     "rows": ev.rows_to_json(stats)}
            if refs is not None:
                entry["greedy_mismatches"] = ev.greedy_mismatches(target, rows, outs, refs)
            record["policies"][label] = entry
            per_label[label] = stats
            s = ev.aggregate(stats, K)
            mism = len(entry["greedy_mismatches"]) if refs is not None else "-"
            print(f"{'':10}{label:<22}{s['tau']:6.2f}{s['acceptance']:8.3f}{s['coverage']:7.3f}"
                  f"{s['mean_active']:8.0f}{mism:>9}{seconds:7.0f}", flush=True)
        record["tasks"] = ev.task_stats(task_of, per_label, K)
        result[f"markdown_{mode}"] = ev.markdown_tables(record["tasks"])
        print("\n" + result[f"markdown_{mode}"], flush=True)
    result["total_seconds"] = round(time.perf_counter() - t_all, 1)
    print(f"total wall time {result['total_seconds']:.0f} s")
    _write(args, result, prompts, name)
    return 0


def _labels(text: str) -> list[str]:
    labels = [x.strip() for x in text.split(",") if x.strip()]
    if not labels:
        raise ValueError("no policy given")
    return labels


def _plain_greedy(plain, rows, batches, max_new, eos, pad) -> list[list[int]]:
    from microspec.prompts import left_pad
    refs = [None] * len(rows)
    for batch in batches:
        ids, mask = left_pad([rows[i] for i in batch], pad)
        out = plain.generate(ids, mask, max_new_tokens=max_new, eos_token_id=eos, pad_token_id=pad)
        for j, i in enumerate(batch):
            refs[i] = out[j, ids.shape[1]: ids.shape[1] + int(plain.generated[j])].tolist()
    return refs


def _write(args, result, prompts, name) -> None:
    from microspec.lab import evaluation as ev
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=1) + "\n")
        print(f"wrote {args.json}")
    if args.markdown:
        text = "".join(f"## {m}\n\n{result[f'markdown_{m}']}\n" for m in result["runs"])
        Path(args.markdown).write_text(text)
        print(f"wrote {args.markdown}")
    if args.traces:
        greedy = result["runs"]["greedy"]["policies"]
        traces = {label: ev.flat_trace([ev.RowStats(**r) for r in entry["rows"]])
                  for label, entry in greedy.items()}
        tasks = ", ".join(dict.fromkeys(p.task for p in prompts))
        source = (f"{name}: target {result['target']}, drafter {result['drafter']}, {result['dtype']}, "
                  f"greedy, K={args.K}, {len(prompts)} prompts ({tasks}) x {args.max_new_tokens} new tokens, "
                  f"microspec eval on CPU, {result['date']}")
        ev.write_traces(args.traces, traces, source, args.K)
        print(f"wrote {args.traces}")
