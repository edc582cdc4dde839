"""`microspec coverage`: how much of real model output would a vocabulary policy's active set cover?

Why a command: choosing a policy and a capacity is the first decision of a sparse-head deployment, and most
of it can be made without a GPU: tokenize real prompt/response pairs with the target's tokenizer and replay
them through the policies (`microspec.lab.coverage.simulate`), text-only in seconds, or with a small real
model (`--model smollm2`) for the policies that read the target's top-k or hidden state. `microspec tune`
reuses the data and policy plumbing here (`add_data_args`, `Setup`, `make_policy`).
"""
from __future__ import annotations

import argparse
import functools
import json
import os
import platform
import sys
import time

POLICIES = ("incontext", "static", "full", "custom")

DESCRIPTION = """\
Replay real prompt/response text through vocabulary policies and report coverage (the share of response
tokens that were in the row's active set when their block was drafted), its spread over documents, and
the active-set size (mean, p10/p90), per corpus and pooled ("all"). Optionally plot coverage vs mean
active size (--plot) and write everything as JSON (--json).

Text-only (default, --tokenizer): no target model, so no policy gets target top-k ids or hidden states
(InContextPolicy sees only prompt and response tokens). Model-based (--model smollm2 | FILE.gguf | HF dir):
the model's own tokenizer; the model runs teacher-forced over prompt + response once, and every policy gets
the target's top-k at every position and its final hidden state, exactly as SpecDecoder hands them over,
as if the target had produced the reference responses. Responses are committed in full blocks of --block
tokens (all drafts accepted), the least frequent refresh a real decoder makes.
"""

EPILOG = """\
corpora: shared dataset names (files under ../shared/data or $MICROSPEC_SHARED_DATA)
  alpaca:<model>   AlpacaEval instruction + output, e.g. alpaca:Meta-Llama-3-8B-Instruct
  gsm8k[:split]    question + answer, split test (default), train or test_socratic
  humaneval        prompt + canonical_solution
  mtbench[:turn1]  MT-bench questions + Vicuna-7B greedy answers (both turns by default)
or files: .jsonl / .json (list) / .txt (one text per line, empty prompt), optionally .gz.
Options that take several values (--capacity, --core, --fit) may be repeated; put CORPUS before them or --.

examples:
  microspec coverage alpaca:Meta-Llama-3-8B-Instruct gsm8k:test mtbench humaneval \\
      --tokenizer ../shared/data/tokenizers/llama3 --policy incontext,static,full --capacity 1024 3072 \\
      --core 0 256 --fit alpaca:gpt4_1106_preview alpaca:text_davinci_003 gsm8k:train --plot cov.png
  microspec coverage gsm8k:test humaneval --model smollm2 --sample 25 --max-tokens 256 --topk 3 \\
      --policy incontext,static,full --capacity 512 1024 --fit gsm8k:train --json out.json
  microspec coverage humaneval --model smollm2 --policy custom \\
      --custom microspec.policies.cluster:ClusterPolicy.load --custom-arg clusters.safetensors
"""


def add_data_args(p: argparse.ArgumentParser) -> None:
    """Evaluation text, tokenizer or model, fitting text: shared by `coverage` and `tune`."""
    p.add_argument("corpora", nargs="+", metavar="CORPUS", help="dataset names or files to evaluate on")
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--tokenizer", metavar="PATH",
                     help="text-only: tokenizer file or directory (HF tokenizer.json[.gz], tiktoken, "
                          "SentencePiece)")
    src.add_argument("--model", metavar="MODEL",
                     help="model-based: 'smollm2', a .gguf file or a Hugging Face model directory")
    p.add_argument("--tokenizer-kind", choices=("hf", "tiktoken", "sentencepiece"),
                   help="skip format sniffing")
    p.add_argument("--dtype", choices=("float32", "float64", "bfloat16"), default="float32",
                   help="--model: weights dtype (default: float32)")
    p.add_argument("--trace-cache", metavar="DIR",
                   help="--model: keep the model's top-k/hidden traces here; reuse them on identical inputs")
    p.add_argument("--no-chat-template", action="store_true",
                   help="--model: feed raw prompts (default: one user turn of the model's chat template)")
    p.add_argument("--block", type=int, default=6, metavar="K+1",
                   help="tokens committed per verification step (default: 6, i.e. K=5)")
    p.add_argument("--fit", nargs="+", action="extend", metavar="CORPUS",
                   help="static/core: count token ids over these corpora's responses (not an eval file)")
    p.add_argument("--fit-field", metavar="FIELD", help="JSON field of --fit files holding the text")
    p.add_argument("--token-map", metavar="FILE",
                   help="static/core: ranked ids from a token map or frequency table, instead of --fit")
    p.add_argument("--allow-fit-overlap", action="store_true",
                   help="run even if --fit shares files with the evaluation corpora (inflated coverage)")
    p.add_argument("--limit", type=int, metavar="N", help="first N documents of each corpus")
    p.add_argument("--sample", type=int, metavar="N", help="N random documents of each corpus (see --seed)")
    p.add_argument("--seed", type=int, default=0, help="seed of --sample (and of tune's sampler)")
    p.add_argument("--max-tokens", type=int, metavar="N", help="keep the first N tokens of each response")
    p.add_argument("--max-prompt-tokens", type=int, metavar="N", help="keep the last N tokens of each prompt")
    p.add_argument("--prompt-field", metavar="FIELD", help="prompt field of generic JSON/JSONL corpora")
    p.add_argument("--response-field", metavar="FIELD", help="response field of generic JSON/JSONL corpora")
    p.add_argument("--batch-size", type=int, default=64, help="documents simulated together (default: 64)")
    p.add_argument("--custom", metavar="MODULE:CALLABLE",
                   help="policy 'custom': a callable returning a VocabPolicy, called with capacity=C")
    p.add_argument("--custom-arg", metavar="ARG", help="first positional argument for --custom (e.g. a path)")
    p.add_argument("-q", "--quiet", "--no-progress", dest="no_progress", action="store_true",
                   help="no progress bars (off anyway when stderr is not a terminal)")


def register(subparsers) -> argparse.ArgumentParser:
    p = subparsers.add_parser("coverage", help="active-set coverage of vocabulary policies on real text",
                              description=DESCRIPTION, epilog=EPILOG,
                              formatter_class=argparse.RawDescriptionHelpFormatter)
    add_data_args(p)
    p.add_argument("--policy", action="append", metavar="NAME",
                   help="incontext, static, full or custom; repeat or comma-separate (default: incontext)")
    p.add_argument("--capacity", type=int, nargs="+", action="extend", metavar="C",
                   help="capacities to sweep; every policy but full runs at each (default: 3072)")
    p.add_argument("--eviction", choices=("lru", "fifo", "none"), default="lru",
                   help="incontext: what leaves a full set (default: lru; none = grow-only)")
    p.add_argument("--core", type=int, nargs="+", action="extend", metavar="N",
                   help="incontext: pin the N most frequent ids of --fit/--token-map; several N = variants")
    p.add_argument("--topk", type=int, nargs="+", action="extend", metavar="K",
                   help="incontext with --model: the target's top-K ids added per position (default: 3; "
                        "several K = variants)")
    p.add_argument("--json", metavar="OUT", help="also write the results as JSON")
    p.add_argument("--plot", metavar="OUT.png", help="plot coverage vs mean active size per policy")
    p.set_defaults(func=run)
    return p


class Setup:
    """Tokenized evaluation corpora (+ the model and its traces when model-based), the frequency ranking."""

    def __init__(self, args):
        from microspec.lab.data import load_corpus, load_tokenizer
        from microspec.lab.model_coverage import encode_pairs, hf_tokenizer, model_eos_ids, sample_indices

        self.args, self.model, self.describe, self.chat_template = args, None, None, False
        self._traces: dict = {}
        self.trace_seconds = 0.0
        if args.model:
            import torch

            from microspec.models.hf import vocab_size_of
            from microspec.models import load_model
            self.model, hf_tok = load_model(args.model, getattr(torch, args.dtype))
            vocab = min(vocab_size_of(self.model), len(hf_tok))
            eos = model_eos_ids(self.model, hf_tok)
            self.tok = hf_tokenizer(hf_tok, vocab, eos, f"{args.model} tokenizer")
            self.describe = f"{type(self.model).__name__} ({args.model}, {args.dtype})"
            self.chat_template = not args.no_chat_template and bool(getattr(hf_tok, "chat_template", None))
        else:
            self.tok = load_tokenizer(args.tokenizer, kind=args.tokenizer_kind)
        self.datasets, self.subsets, self.eval_files = {}, {}, set()
        for spec in args.corpora:
            corpus = load_corpus(spec, args.prompt_field, args.response_field, args.limit)
            keep = sample_indices(len(corpus.pairs), args.sample, args.seed)
            texts = [corpus.pairs[i] for i in keep]
            if args.model:
                pairs = encode_pairs(hf_tok, texts, self.chat_template, args.max_prompt_tokens,
                                     args.max_tokens)
            else:
                prompts = [p[-args.max_prompt_tokens:] if args.max_prompt_tokens else p
                           for p in self.tok.encode_batch(p for p, _ in texts)]
                pairs = list(zip(prompts, [r[: args.max_tokens] if args.max_tokens else r
                                           for r in self.tok.encode_batch(r for _, r in texts)]))
            if not pairs or not any(r for _, r in pairs):
                raise ValueError(f"empty corpus: {spec} has no response tokens")
            self.datasets[spec] = pairs
            self.subsets[spec] = keep if args.sample else None
            self.eval_files.update(corpus.files)
        self.n_tokens = sum(len(r) for pairs in self.datasets.values() for _, r in pairs)
        self._ranked = None

    def ranked(self):
        if self._ranked is None:
            self._ranked = _ranking(self.args, self.tok, self.eval_files)
        return self._ranked

    def traces(self, spec: str, k: int, hidden: bool):
        """Teacher-forced traces of one corpus with >= k top ids (and hidden states), computed once."""
        from microspec.lab.model_coverage import cached_traces, teacher_forced_traces
        have = self._traces.get(spec)
        if have is None or have[0] < k or (hidden and not have[1]):
            from tqdm import tqdm
            t0 = time.perf_counter()
            a = self.args
            docs = self.datasets[spec]
            progress = tqdm(total=sum(len(p) + len(r) for p, r in docs), unit="tok", leave=False,
                            desc=f"model forward {spec}", disable=True if a.no_progress else None,
                            file=sys.stderr)
            if a.trace_cache:
                tr = cached_traces(a.trace_cache, self.model, a.model, a.dtype, docs, k, hidden,
                                   self.tok.vocab_size, progress)
                k, hidden = tr[0].topk.shape[1], tr[0].hidden is not None
            else:
                tr = teacher_forced_traces(self.model, self.datasets[spec], k, hidden, self.tok.vocab_size,
                                           progress=progress)
            progress.close()
            self.trace_seconds += time.perf_counter() - t0
            have = self._traces[spec] = (k, hidden, tr)
        return have[2]

    def evaluate(self, make, progress=None) -> dict:
        """{spec: CoverageResult} (plus "all" when several corpora) for a fresh policy per corpus."""
        from microspec.lab.coverage import CoverageResult, simulate
        results = {}
        for spec, pairs in self.datasets.items():
            policy = make()
            traces = None
            if self.model is not None:
                traces = self.traces(spec, policy.target_topk, policy.wants_hidden)
            elif policy.target_topk or policy.wants_hidden:
                raise ValueError(f"{policy!r} needs the target's top-k or hidden states: run with --model")
            results[spec] = simulate(policy, pairs, self.tok.vocab_size, self.tok.eos_ids,
                                     block=self.args.block, batch_size=self.args.batch_size,
                                     progress=progress, traces=traces)
        if len(results) > 1:
            results["all"] = CoverageResult.merge(list(results.values()))
        return results

    def meta(self) -> dict:
        a = self.args
        return {"date": time.strftime("%Y-%m-%d"), "machine": f"{platform.machine()}, {os.cpu_count()} CPUs",
                "mode": "model-based" if a.model else "text-only", "model": self.describe,
                "tokenizer": self.tok.name, "vocab_size": self.tok.vocab_size, "eos_ids": self.tok.eos_ids,
                "block": a.block, "corpora": a.corpora, "fit": a.fit, "token_map": a.token_map,
                "limit": a.limit, "sample": a.sample, "seed": a.seed, "subsets": self.subsets,
                "max_tokens": a.max_tokens, "max_prompt_tokens": a.max_prompt_tokens,
                "chat_template": self.chat_template,
                "trace_seconds": round(self.trace_seconds, 1)}


def _ranking(args, tok, eval_files: set):
    """Ids most frequent first, from --token-map or by counting --fit corpora (checked against eval files)."""
    from microspec.lab.frequency import fit_ranking
    from microspec.policies import load_token_map

    if args.token_map:
        ids = load_token_map(args.token_map)
        if int(ids.max()) >= tok.vocab_size:
            raise ValueError(f"{args.token_map}: token id {int(ids.max())} >= vocab size {tok.vocab_size} of "
                             f"{tok.name}: this map was built for another tokenizer")
        return ids
    if not args.fit:
        raise ValueError("the static policy and --core need --fit CORPUS... or --token-map FILE")
    return fit_ranking(args.fit, tok, args.fit_field, eval_files, args.allow_fit_overlap)


def make_policy(name: str, capacity: int, setup: Setup, topk: int = 0, core: int = 0, eviction="lru"):
    """A fresh policy: incontext (topk, core, eviction), static, full, or custom (--custom), built from its
    label (`policy_label`) by `microspec.lab.policy_labels.policy_from_label`."""
    from microspec.lab.policy_labels import custom_factory, parse_label, policy_from_label

    if name not in POLICIES:
        raise ValueError(f"unknown policy {name!r}: choose from {', '.join(POLICIES)}")
    label, args = policy_label(name, capacity, topk, core), setup.args
    ranking = setup.ranked() if parse_label(label).needs_ranking else None
    custom = custom_factory(args.custom, args.custom_arg) if name == "custom" and args.custom else None
    return policy_from_label(label, ranking, eviction=None if eviction == "none" else eviction, custom=custom)


def policy_label(name: str, capacity: int, topk: int = 0, core: int = 0) -> str:
    """A policy name of `POLICIES` at one capacity (incontext: the target's top-k and a core of the `core`
    most frequent ids, none at 0) -> its label in the grammar of `microspec.lab.policy_labels`."""
    if name == "full":
        return "full"
    if name != "incontext":
        return f"{name}@{capacity}"
    return f"incontext{f'+core{core}' if core else ''}@{capacity}/k{topk}"


def _runs(args, setup: Setup) -> list[tuple[str, str, int, dict]]:
    """(label, policy name, capacity, make_policy kwargs) for every policy x capacity (x core) to evaluate."""
    names = [n.strip() for v in (args.policy or ["incontext"]) for n in v.split(",") if n.strip()]
    bad = [n for n in names if n not in POLICIES]
    if bad or not names:
        raise ValueError(f"unknown policy {bad or names}: choose from {', '.join(POLICIES)}")
    if args.topk and not args.model:
        raise ValueError("--topk needs --model (text-only runs have no target top-k)")
    topks = list(dict.fromkeys(args.topk or [3])) if args.model else [0]
    runs = []
    for name in dict.fromkeys(names):
        for cap in (args.capacity if name != "full" else [setup.tok.vocab_size]):
            if name != "incontext":
                runs.append((name, name, cap, {}))
                continue
            for topk in topks:
                for core in dict.fromkeys(args.core or [0]):
                    if core >= cap:
                        print(f"skipping incontext C={cap} core {core}: the core fills the set",
                              file=sys.stderr)
                        continue
                    label = ("incontext" + (f"-top{topk}" if args.model else "")
                             + (f"+core{core}" if core else ""))
                    runs.append((label, name, cap, {"topk": topk, "core": core, "eviction": args.eviction}))
    return runs


def _check_args(args) -> None:
    args.capacity = args.capacity or [3072]
    if any(c < 1 for c in args.capacity) or any(c < 0 for c in (args.core or [])):
        raise ValueError(f"--capacity must be positive (got {args.capacity}) and --core >= 0")
    for name in ("block", "batch_size", "limit", "sample", "max_tokens", "max_prompt_tokens"):
        value = getattr(args, name)
        if value is not None and value < 1:
            raise ValueError(f"--{name.replace('_', '-')} must be >= 1, got {value}")
    for name in ("json", "plot"):
        path = getattr(args, name, None)
        if path and not os.path.isdir(os.path.dirname(os.path.abspath(path))):
            raise FileNotFoundError(f"--{name} {path}: its folder does not exist")
    if args.fit and args.token_map:
        raise ValueError("use either --fit or --token-map, not both")
    check_data_args(args)


def check_data_args(args) -> None:
    """The `add_data_args` options checkable before the tokenizer or model loads (shared with `tune`)."""
    from pathlib import Path

    from microspec.policies import load_token_map
    if any(k < 0 for k in (getattr(args, "topk", None) or [])):
        raise ValueError(f"--topk must be >= 0, got {args.topk}")
    if args.model and args.model != "smollm2" and not Path(args.model).exists():
        raise FileNotFoundError(f"--model {args.model}: no such file or model directory")
    if args.custom is not None and (":" not in args.custom or not all(args.custom.partition(":")[::2])):
        raise ValueError(f"--custom {args.custom}: expected MODULE:CALLABLE")
    if args.token_map:
        load_token_map(args.token_map)     # one-line error for a corrupt, empty, pickled or non-integer map


def _table(rows: list[dict]) -> str:
    head = ("policy", "capacity", "dataset", "docs", "tokens", "coverage", "doc p10", "doc p90", "mean|A|",
            "p90|A|", "max|A|", "static@|A|", "sec")
    body = [(r["policy"], str(r["capacity"]), r["dataset"], str(r["docs"]), str(r["tokens"]),
             f"{r['coverage']:.4f}", f"{r['doc_coverage_p10']:.3f}", f"{r['doc_coverage_p90']:.3f}",
             f"{r['active_mean']:.1f}", f"{r['active_p90']:.0f}", f"{r['active_max']:.0f}",
             "-" if r.get("static_at_same_size") is None else f"{r['static_at_same_size']:.4f}",
             f"{r['seconds']:.1f}") for r in rows]
    widths = [max(len(h), *(len(b[i]) for b in body)) for i, h in enumerate(head)]
    line = "  ".join(f"{{:<{w}}}" if i < 3 else f"{{:>{w}}}" for i, w in enumerate(widths))
    rule = line.format(*("-" * w for w in widths))
    return "\n".join([line.format(*head), rule] + [line.format(*b) for b in body])


def run(args) -> int:
    from tqdm import tqdm

    from microspec.lab.coverage import compare_at_same_size, plot_coverage

    _check_args(args)
    t0 = time.perf_counter()
    setup = Setup(args)
    runs = _runs(args, setup)
    tok = setup.tok
    print(f"tokenizer {tok.name} ({tok.kind}, vocab {tok.vocab_size}, eos {tok.eos_ids}); "
          f"{len(setup.datasets)} corpora, {setup.n_tokens} response tokens; "
          f"{setup.describe or 'text-only'}", file=sys.stderr)
    if any(name == "static" or kw.get("core") for _, name, _, kw in runs):
        setup.ranked()
    rows = []
    with tqdm(total=len(runs) * setup.n_tokens, unit="tok", disable=True if args.no_progress else None,
              file=sys.stderr) as bar:
        for label, name, cap, kw in runs:
            bar.set_description(f"{label} C={cap}")
            make = functools.partial(make_policy, name, cap, setup, **kw)
            results = setup.evaluate(make, progress=bar)
            label = type(make()).__name__ if name == "custom" else label
            for spec, res in results.items():
                rows.append({"policy": label, "capacity": cap, "dataset": spec, **res.summary()})
    compare_at_same_size(rows)
    print(_table(rows))
    print(f"total {time.perf_counter() - t0:.1f}s (model forwards {setup.trace_seconds:.1f}s)",
          file=sys.stderr)
    meta = {**setup.meta(), "oracle_free": not args.model, "eviction": args.eviction,
            "core": args.core or [0],
            "target_topk": (args.topk or [3]) if args.model else None,
            "seconds": round(time.perf_counter() - t0, 1)}
    if args.json:
        with open(args.json, "w") as f:
            json.dump({**meta, "results": rows}, f, indent=1)
    if args.plot:
        mode = "model-based, " + setup.describe if args.model else "text-only"
        plot_coverage(rows, args.plot,
                      f"coverage vs mean active size: {tok.name} ({mode}), block {args.block}")
    return 0
