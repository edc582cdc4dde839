"""`microspec fit-clusters`: learn a `ClusterPolicy` (DynaSpec-style) for a model from the fitting corpora.

Why a command: the policy's clusters and router are model-specific artefacts that take minutes to fit and
milliseconds to load, so they are fitted once, saved (safetensors, no pickle) and reused by every run.

Steps: split the fitting corpora (`microspec.lab.data.FITTING_CORPORA`, never an evaluation set) into a
training part and a held-out part by document; count token frequencies on the training part; k-means over the
model's normalised LM-head (or embedding) rows of the ids seen there; run the model teacher-forced over
chat-formatted (prompt, response) pairs to collect (final hidden state, next W tokens); train the
meta-classifier; report, on held-out positions, how much of the next draft block the policy's set covers
against a static frequency list of the same size; save.
"""
from __future__ import annotations

import argparse
import os
import random
import sys
import time

DESCRIPTION = __doc__.split("\n\n")[1] + "\n\n" + __doc__.split("\n\n")[2]

EPILOG = """\
The report is over held-out positions t of the fitting corpora: the share of the tokens t+2..t+1+BLOCK
(the next draft block, given the one-token-stale hidden state a decoder hands the policy) that each set
contains, at the same size: static = EOS + most frequent ids of the training split; static+ctx = that
ranking with the ids already in the context (prompt and committed tokens) first; clusters = DynaSpec's
union of the top-scoring clusters; routed = the token fill (cluster score + frequency); routed+ctx = the
token fill with the context first (the saved default).

example (SmolLM2-135M, 7.5 minutes on a busy 2-core CPU; the file is 2.6 MB):
  microspec fit-clusters --out build/smollm2-clusters.safetensors
"""


def register(subparsers) -> None:
    p = subparsers.add_parser("fit-clusters",
                              help="fit a ClusterPolicy (token clusters + router) for a model",
                              description=DESCRIPTION, epilog=EPILOG,
                              formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="smollm2",
                   help="'smollm2' (real weights), a .gguf file or a Hugging Face model directory "
                        "(default: smollm2)")
    p.add_argument("--out", required=True, metavar="FILE.safetensors", help="where to save the policy")
    p.add_argument("--clusters", type=int, default=1024, metavar="K",
                   help="number of clusters (default: 1024)")
    p.add_argument("--features", choices=("lm-head", "embedding"), default="lm-head",
                   help="token rows to cluster, L2-normalised (default: lm-head)")
    p.add_argument("--core", type=int, default=256, metavar="N",
                   help="most frequent ids pinned in every set, outside the clusters (default: 256)")
    p.add_argument("--min-count", type=int, default=1, metavar="N",
                   help="cluster only ids seen >= N times in the training split; 0 clusters every id "
                        "(default: 1)")
    p.add_argument("--window", type=int, default=8, metavar="W",
                   help="label window: clusters of tokens t+1..t+W (default: 8 = 1 stale + K+1=6 + 1 slack)")
    p.add_argument("--positions", type=int, default=30000, metavar="N",
                   help="training positions (default: 30000)")
    p.add_argument("--holdout-positions", type=int, default=4000, metavar="N",
                   help="held-out positions for the report (default: 4000)")
    p.add_argument("--holdout", type=float, default=0.1, metavar="FRAC",
                   help="share of each fitting corpus' documents held out (default: 0.1)")
    p.add_argument("--max-response", type=int, default=192, metavar="T",
                   help="response tokens used per document (default: 192)")
    p.add_argument("--hidden-units", type=int, default=0, metavar="H",
                   help="classifier hidden layer width; 0 = linear (default: 0)")
    p.add_argument("--loss", choices=("softmax", "bce"), default="softmax",
                   help="classifier loss (default: softmax)")
    p.add_argument("--epochs", type=int, default=4, help="classifier epochs (default: 4)")
    p.add_argument("--fill", choices=("tokens", "clusters"), default="tokens",
                   help="saved default fill: rank ids by cluster score + frequency, or whole clusters "
                        "(default: tokens)")
    p.add_argument("--freq-weight", type=float, default=0.5,
                   help="token fill: weight of log count (default: 0.5)")
    p.add_argument("--no-context", action="store_true", help="token fill: do not rank context ids first")
    p.add_argument("--size-penalty", type=float, default=0.0,
                   help="cluster fill: rank by log p - penalty * log(size) (default: 0, by logit)")
    p.add_argument("--block", type=int, default=6, metavar="K+1",
                   help="draft block for the report (default: 6)")
    p.add_argument("--report-capacity", type=int, nargs="+", default=[512, 1024, 2048, 3072], metavar="C",
                   help="capacities of the report (default: 512 1024 2048 3072)")
    p.add_argument("--dtype", choices=("float32", "bfloat16", "float64"), default="float32",
                   help="model dtype while collecting hidden states (default: float32)")
    p.add_argument("--device", default=None, help="cuda or cpu (default: cuda if available)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("-q", "--quiet", "--no-progress", dest="no_progress", action="store_true",
                   help="no progress bars (off anyway when stderr is not a terminal)")
    p.set_defaults(func=run)


def _check(args) -> None:
    for name in ("clusters", "positions", "holdout_positions", "epochs", "window", "block", "max_response"):
        if getattr(args, name) < 1:
            raise ValueError(f"--{name.replace('_', '-')} must be >= 1, got {getattr(args, name)}")
    if args.core < 0 or args.min_count < 0 or args.hidden_units < 0:
        raise ValueError("--core, --min-count and --hidden-units must be >= 0")
    if not 0 < args.holdout < 1:
        raise ValueError(f"--holdout must be in (0, 1), got {args.holdout}")
    if args.window < args.block + 1:
        raise ValueError(f"--window {args.window} must cover the stale token and the block: >= --block + 1")
    if any(c < 1 for c in args.report_capacity):
        raise ValueError(f"--report-capacity must be positive, got {args.report_capacity}")
    if not args.out.endswith(".safetensors"):
        raise ValueError(f"--out must end in .safetensors, got {args.out}")
    folder = os.path.dirname(os.path.abspath(args.out))
    if not os.path.isdir(folder):
        raise FileNotFoundError(f"--out {args.out}: folder {folder} does not exist")
    import math
    if not all(math.isfinite(x) and x >= 0 for x in (args.freq_weight, args.size_penalty)):
        raise ValueError("--freq-weight and --size-penalty must be finite and >= 0")
    if args.device is not None:
        from ._common import check_device
        check_device(args.device)
    if args.model != "smollm2" and not os.path.exists(args.model):
        raise FileNotFoundError(f"--model {args.model}: no such file or model directory")


def split_pairs(corpora, holdout: float, seed: int):
    """Per corpus, a seeded shuffle of its documents: the first `holdout` share is held out. Both parts
    interleave the corpora round-robin, so the first N positions mix chat and math evenly."""
    from microspec.lab.data import load_pairs
    train, held = [], []
    rng = random.Random(seed)
    for spec in corpora:
        pairs = list(load_pairs(spec))
        rng.shuffle(pairs)
        n = max(1, round(len(pairs) * holdout))
        held.append(pairs[:n])
        train.append(pairs[n:])
    def mix(parts):
        return [p[i] for i in range(max(map(len, parts))) for p in parts if i < len(p)]
    return mix(train), mix(held)


def _eos_ids(model, tokenizer) -> list[int]:
    """`microspec.inputs.eos_ids_of` (generation config, model config and tokenizer), never empty."""
    from microspec.inputs import eos_ids_of
    ids = eos_ids_of(model, tokenizer)
    if not ids:
        raise ValueError("the model and tokenizer define no EOS id")
    return ids


COLUMNS = ("static", "static+ctx", "clusters", "routed", "routed+ctx")


def recall_table(policy, ranked, held, capacities, special, block, vocab_size) -> list[dict]:
    """Held-out recall of the next block (tokens t+2..t+1+block), per capacity, of: the static frequency
    list (specials, then `ranked`); frequency + context ids (the policy without hidden states); the cluster
    fill (DynaSpec's union of top clusters); the token fill without and with context ids."""
    import torch

    from microspec.lab.clustering import window_recall
    from microspec.policies.cluster import ClusterPolicy, pad_table

    target = held.windows[:, 1: 1 + block]                                           # [N, block]
    sp = torch.tensor(special)
    static_ids = torch.cat([sp, ranked[~torch.isin(ranked, sp)]])
    rows = []
    def make(fill, capacity):
        p = ClusterPolicy(pad_table(policy.members, policy.sizes), policy.classifier, capacity,
                          core_ids=policy.core_ids, counts=policy.counts, prior=policy.prior, fill=fill,
                          freq_weight=policy.freq_weight, context=True, size_penalty=policy.size_penalty)
        p.setup(1, vocab_size, special, "cpu")
        return p

    for C in capacities:
        tok, clu = make("tokens", C), make("clusters", C)
        hits = dict.fromkeys(COLUMNS, 0)
        total = 0
        for i in range(0, target.shape[0], 512):
            w, h = target[i: i + 512], held.hidden[i: i + 512]
            seen = held.context_bitmap(i, i + w.shape[0], vocab_size)
            sets = {"static": static_ids[:C].expand(w.shape[0], -1), "static+ctx": tok.shortlist(None, seen),
                    "clusters": clu.shortlist(h), "routed": tok.shortlist(h),
                    "routed+ctx": tok.shortlist(h, seen)}
            for name, ids in sets.items():
                hits[name] += window_recall(ids, w)[0]
            total += window_recall(sets["static"], w)[1]
        rows.append({"capacity": C, "active": int(tok.n_active[0]), "tokens": total,
                     **{name: hits[name] / total for name in COLUMNS}})
    return rows


def run(args) -> int:
    import torch

    from microspec.lab.data import FITTING_CORPORA
    from microspec.models import find_smollm2, load_model

    _check(args)
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    dtype = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float64": torch.float64}[args.dtype]
    quiet = args.no_progress
    t0 = time.perf_counter()
    model, tokenizer = load_model(args.model, dtype, device)
    if tokenizer is None:
        raise ValueError(f"{args.model}: no tokenizer found next to the model")
    train, held = split_pairs(FITTING_CORPORA, args.holdout, args.seed)
    print(f"model {args.model} ({type(model).__name__}) loaded in {time.perf_counter() - t0:.0f}s; fitting "
          f"corpora {', '.join(FITTING_CORPORA)}: {len(train)} training / {len(held)} held-out documents",
          file=sys.stderr)
    policy, report, timings = fit(model, tokenizer, train, held, args, device, quiet)
    source = find_smollm2(download=False) if args.model == "smollm2" else args.model
    policy.metadata.update(model=f"{args.model} ({os.path.basename(str(source))})",
                           corpora=",".join(FITTING_CORPORA),
                           tokenizer=os.path.basename(str(getattr(tokenizer, "name_or_path", "") or source)))
    policy.save(args.out)
    print(format_report(report, timings, args, policy, os.path.getsize(args.out)))
    return 0


def fit(model, tokenizer, train, held, args, device, quiet=True):
    """Everything after loading: counts, states, clusters, classifier, report. Returns (policy, report rows,
    timings). Split out of `run` so tests can drive it with a tiny model and tokenizer."""
    import torch
    from tqdm import tqdm

    from microspec.lab import clustering

    timings = {}
    V = model.get_output_embeddings().weight.shape[0]
    eos = [e for e in _eos_ids(model, tokenizer) if e < V]
    t = time.perf_counter()
    counts = torch.zeros(V, dtype=torch.float64)
    for _, response in train:
        ids = torch.tensor(tokenizer.encode(response, add_special_tokens=False), dtype=torch.long)
        counts += torch.bincount(ids[ids < V], minlength=V).double()
    timings["count"] = time.perf_counter() - t
    states = {}
    for name, pairs, n in (("train", train, args.positions), ("held-out", held, args.holdout_positions)):
        t = time.perf_counter()
        with tqdm(total=n, desc=f"hidden states ({name})", unit="pos", disable=True if quiet else None,
                  file=sys.stderr) as bar:
            states[name] = clustering.collect_states(model, tokenizer, pairs, positions=n, window=args.window,
                                                     eos_id=eos[0], max_response=args.max_response,
                                                     progress=bar)
        timings[f"states ({name})"] = time.perf_counter() - t
    t = time.perf_counter()

    def progress(name, total):
        return tqdm(total=total, desc=name, disable=True if quiet else None, file=sys.stderr)

    train_states = states["train"]
    meta = {"vocab_size": V, "features": args.features, "window": args.window,
            "positions": train_states.hidden.shape[0], "epochs": args.epochs, "min_count": args.min_count,
            "max_response": args.max_response, "created": time.strftime("%Y-%m-%d")}
    policy = clustering.fit_cluster_policy(
        clustering.token_features(model, args.features), train_states.hidden, train_states.windows,
        num_clusters=args.clusters, capacity=max(args.report_capacity), counts=counts, special_ids=eos,
        core_size=args.core, min_count=args.min_count, hidden_units=args.hidden_units, loss=args.loss,
        epochs=args.epochs, seed=args.seed, device=device, metadata=meta,
        progress=None if quiet else progress, fill=args.fill, freq_weight=args.freq_weight,
        context=not args.no_context, size_penalty=args.size_penalty)
    timings["fit (k-means + classifier)"] = time.perf_counter() - t
    ranked = torch.argsort(-counts, stable=True)
    t = time.perf_counter()
    report = recall_table(policy, ranked, states["held-out"], args.report_capacity, eos, args.block, V)
    timings["report"] = time.perf_counter() - t
    return policy, report, timings


def format_report(rows, timings, args, policy, size_bytes: int) -> str:
    clf = f"MLP with {args.hidden_units} hidden units" if args.hidden_units else "linear"
    lines = [f"ClusterPolicy: {policy.num_clusters} clusters over {policy.members.numel()} ids, core "
             f"{policy.core_ids.numel()}, {clf} classifier ({args.loss}), window {args.window}, saved fill "
             f"{policy.fill!r}" + (" + context" if policy.context else ""),
             f"held-out recall of the next {args.block}-token block "
             f"({rows[0]['tokens'] if rows else 0} tokens):",
             f"{'capacity':>8}" + "".join(f"{name:>12}" for name in COLUMNS)]
    for r in rows:
        lines.append(f"{r['capacity']:>8}" + "".join(f"{r[name]:>12.4f}" for name in COLUMNS))
    lines.append("time: " + ", ".join(f"{k} {v:.0f}s" for k, v in timings.items()))
    lines.append(f"saved {args.out} ({size_bytes / 1e6:.2f} MB)")
    return "\n".join(lines)
