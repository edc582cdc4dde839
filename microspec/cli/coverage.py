"""`microspec coverage`: how much of real model output would a vocabulary policy's active set cover?

Why a command: choosing a policy and a capacity is the first decision of a sparse-head deployment, and it can
be made on text alone, in seconds, with no GPU: tokenize real prompt/response pairs with the target's
tokenizer and replay them through the policy (`microspec.coverage.simulate`).
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time

POLICIES = ("incontext", "static", "full")

DESCRIPTION = """\
Replay real prompt/response text through vocabulary policies and report coverage: the share of response
tokens that were in the row's active set when they were committed, plus the active-set size (mean, p90).

This is a text-only, oracle-free estimate. There is no target model, so the policies get no target
top-k ids (--topk does not apply: InContextPolicy sees only prompt and response tokens, not the target's
top-3 predictions that NanoSpec adds). Responses are committed in full blocks of --block tokens (all
drafts accepted), the least frequent refresh a real decoder makes.
"""

EPILOG = """\
corpora: shared dataset names (files under ../shared/data or $MICROSPEC_SHARED_DATA)
  alpaca:<model>   AlpacaEval instruction + output, e.g. alpaca:Meta-Llama-3-8B-Instruct
  gsm8k[:split]    question + answer, split test (default), train or test_socratic
  humaneval        prompt + canonical_solution
  mtbench[:turn1]  MT-bench questions + Vicuna-7B greedy answers (both turns by default)
or files: .jsonl / .json (list) / .txt (one text per line, empty prompt), optionally .gz.
Options that take several values (--capacity, --fit) may be repeated; put CORPUS before them or use --.

examples:
  microspec coverage --tokenizer ../shared/data/tokenizers/llama3 alpaca:Meta-Llama-3-8B-Instruct \\
      --policy incontext,static --capacity 1024 3072 --limit 200 \\
      --fit alpaca:gpt4_1106_preview alpaca:text_davinci_003 gsm8k:train
  microspec coverage --tokenizer tok.json my.jsonl --prompt-field q --response-field a \\
      --policy static --token-map freq_32768.pt --capacity 32768 --json out.json
"""


def register(subparsers) -> None:
    p = subparsers.add_parser("coverage", help="active-set coverage of vocabulary policies on real text",
                              description=DESCRIPTION, epilog=EPILOG,
                              formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("corpora", nargs="+", metavar="CORPUS", help="dataset names or files to evaluate on")
    p.add_argument("--tokenizer", required=True, metavar="PATH",
                   help="tokenizer file or directory (HF tokenizer.json[.gz], tiktoken, SentencePiece)")
    p.add_argument("--tokenizer-kind", choices=("hf", "tiktoken", "sentencepiece"),
                   help="skip format sniffing")
    p.add_argument("--policy", action="append", metavar="NAME",
                   help="incontext, static or full; repeat or comma-separate (default: incontext)")
    p.add_argument("--capacity", type=int, nargs="+", action="extend", metavar="C",
                   help="capacities to sweep; every policy but full runs at each (default: 3072)")
    p.add_argument("--eviction", choices=("lru", "fifo", "none"), default="lru",
                   help="incontext: what leaves a full set (default: lru; none = grow-only)")
    p.add_argument("--core", type=int, default=0, metavar="N",
                   help="incontext: pin the N most frequent ids of --fit/--token-map in every row")
    p.add_argument("--block", type=int, default=6, metavar="K+1",
                   help="tokens committed per verification step (default: 6, i.e. K=5)")
    p.add_argument("--fit", nargs="+", action="extend", metavar="CORPUS",
                   help="static: count token ids over these corpora's responses (must not be an eval file)")
    p.add_argument("--fit-field", metavar="FIELD", help="JSON field of --fit files holding the text")
    p.add_argument("--token-map", metavar="FILE",
                   help="static: ranked ids from a token map (.pt, .json, .txt, .safetensors), not --fit")
    p.add_argument("--allow-fit-overlap", action="store_true",
                   help="run even if --fit shares files with the evaluation corpora (inflated coverage)")
    p.add_argument("--limit", type=int, metavar="N", help="first N documents of each corpus")
    p.add_argument("--prompt-field", metavar="FIELD", help="prompt field of generic JSON/JSONL corpora")
    p.add_argument("--response-field", metavar="FIELD", help="response field of generic JSON/JSONL corpora")
    p.add_argument("--batch-size", type=int, default=64, help="documents simulated together (default: 64)")
    p.add_argument("--json", metavar="OUT", help="also write the results as JSON")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.set_defaults(func=run)


def _policies(args) -> list[str]:
    names = [n.strip() for v in (args.policy or ["incontext"]) for n in v.split(",") if n.strip()]
    bad = [n for n in names if n not in POLICIES]
    if bad or not names:
        raise ValueError(f"unknown policy {bad or names}: choose from {', '.join(POLICIES)}")
    return list(dict.fromkeys(names))


def _check_args(args, policies: list[str]) -> None:
    args.capacity = args.capacity or [3072]
    if any(c < 1 for c in args.capacity):
        raise ValueError(f"--capacity must be positive, got {args.capacity}")
    if args.block < 1 or args.batch_size < 1 or (args.limit is not None and args.limit < 1):
        raise ValueError("--block, --batch-size and --limit must be >= 1")
    if args.json and not os.path.isdir(os.path.dirname(os.path.abspath(args.json))):
        raise FileNotFoundError(f"--json {args.json}: its folder does not exist")
    if args.fit and args.token_map:
        raise ValueError("use either --fit or --token-map, not both")
    needs_rank = "static" in policies or args.core > 0
    if needs_rank and not (args.fit or args.token_map):
        raise ValueError("the static policy and --core need --fit CORPUS... or --token-map FILE")


def _ranking(args, tok, eval_files: set) -> "torch.Tensor":
    """Ids most frequent first, from --token-map or by counting --fit corpora (checked against eval files)."""
    import torch

    from microspec.data import load_texts
    from microspec.policies import load_token_map, ranked_ids_from_counts

    if args.token_map:
        ids = load_token_map(args.token_map)
        if int(ids.max()) >= tok.vocab_size:
            raise ValueError(f"{args.token_map}: token id {int(ids.max())} >= vocab size {tok.vocab_size} of "
                             f"{tok.name}: this map was built for another tokenizer")
        return ids
    counts = torch.zeros(tok.vocab_size, dtype=torch.long)
    fitted = 0
    for spec in args.fit:
        texts, files = load_texts(spec, args.fit_field)
        shared = eval_files.intersection(files)
        if shared:
            msg = (f"--fit {spec} shares {', '.join(map(str, sorted(shared)))} with the evaluation corpora: "
                   "coverage would be measured on the fitting text")
            if not args.allow_fit_overlap:
                raise ValueError(msg + " (pass --allow-fit-overlap to run anyway)")
            print(f"WARNING: {msg}. Numbers are inflated.", file=sys.stderr)
        ids = torch.tensor([i for seq in tok.encode_batch(texts) for i in seq], dtype=torch.long)
        counts += torch.bincount(ids, minlength=tok.vocab_size)
        fitted += ids.numel()
    if fitted == 0:
        raise ValueError(f"empty fit corpus: {args.fit}")
    print(f"fit: {fitted} tokens, {int((counts > 0).sum())} distinct ids", file=sys.stderr)
    return ranked_ids_from_counts(counts)


def _make_policy(name: str, capacity: int, args, ranked):
    from microspec.policies import FullVocab, InContextPolicy, StaticFrequencyPolicy

    if name == "full":
        return FullVocab()
    if name == "static":
        return StaticFrequencyPolicy(ranked, capacity=capacity)
    core = ranked[: args.core] if args.core else None
    eviction = None if args.eviction == "none" else args.eviction
    return InContextPolicy(capacity=capacity, topk=0, eviction=eviction, core_ids=core)


def _table(rows: list[dict]) -> str:
    head = ("policy", "capacity", "dataset", "docs", "tokens", "coverage", "mean|A|", "p90|A|", "max|A|",
            "sec")
    body = [(r["policy"], str(r["capacity"]), r["dataset"], str(r["docs"]), str(r["tokens"]),
             f"{r['coverage']:.4f}", f"{r['active_mean']:.1f}", f"{r['active_p90']:.0f}",
             f"{r['active_max']:.0f}", f"{r['seconds']:.1f}") for r in rows]
    widths = [max(len(h), *(len(b[i]) for b in body)) for i, h in enumerate(head)]
    line = "  ".join("{:<%d}" % w if i < 3 else "{:>%d}" % w for i, w in enumerate(widths))
    rule = line.format(*("-" * w for w in widths))
    return "\n".join([line.format(*head), rule] + [line.format(*b) for b in body])


def run(args) -> int:
    from tqdm import tqdm

    from microspec.coverage import CoverageResult, simulate
    from microspec.data import load_corpus, load_tokenizer

    policies = _policies(args)
    _check_args(args, policies)
    t0 = time.perf_counter()
    tok = load_tokenizer(args.tokenizer, kind=args.tokenizer_kind)
    datasets, eval_files = {}, set()
    for spec in args.corpora:
        corpus = load_corpus(spec, args.prompt_field, args.response_field, args.limit)
        prompts = tok.encode_batch(p for p, _ in corpus.pairs)
        pairs = list(zip(prompts, tok.encode_batch(r for _, r in corpus.pairs)))
        if not pairs or not any(r for _, r in pairs):
            raise ValueError(f"empty corpus: {spec} has no response tokens")
        datasets[spec] = pairs
        eval_files.update(corpus.files)
    n_tokens = sum(len(r) for pairs in datasets.values() for _, r in pairs)
    print(f"tokenizer {tok.name} ({tok.kind}, vocab {tok.vocab_size}, eos {tok.eos_ids}); "
          f"{len(datasets)} corpora, {n_tokens} response tokens", file=sys.stderr)
    ranked = _ranking(args, tok, eval_files) if ("static" in policies or args.core) else None
    print(f"set-up (tokenize, fit) {time.perf_counter() - t0:.1f}s", file=sys.stderr)
    runs = [(name, cap) for name in policies
            for cap in (args.capacity if name != "full" else [tok.vocab_size])]
    total = len(runs) * n_tokens
    rows = []
    with tqdm(total=total, unit="tok", disable=True if args.no_progress else None, file=sys.stderr) as bar:
        for name, cap in runs:
            results = {}
            for spec, pairs in datasets.items():
                bar.set_description(f"{name} C={cap} {spec}")
                policy = _make_policy(name, cap, args, ranked)
                results[spec] = simulate(policy, pairs, tok.vocab_size, tok.eos_ids, block=args.block,
                                         batch_size=args.batch_size, progress=bar)
            if len(results) > 1:
                results["all"] = CoverageResult.merge(list(results.values()))
            for spec, res in results.items():
                rows.append({"policy": name, "capacity": cap, "dataset": spec, **res.summary()})
    print(_table(rows))
    if args.json:
        meta = {"tokenizer": tok.name, "tokenizer_kind": tok.kind, "vocab_size": tok.vocab_size,
                "eos_ids": tok.eos_ids, "block": args.block, "oracle_free": True, "target_topk": None,
                "eviction": args.eviction, "core": args.core, "fit": args.fit, "token_map": args.token_map,
                "limit": args.limit, "corpora": args.corpora}
        with open(args.json, "w") as f:
            json.dump({**meta, "results": rows}, f, indent=2)
    return 0
