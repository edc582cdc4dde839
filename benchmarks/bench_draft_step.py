"""Draft-step latency at real shapes (random weights): K = 5 chained drafts with the dense head against each
policy at its capacity, the asynchronous gather overlapped / serialized / absent, and the policy update.

A "draft step" is what `DecodeRun.step` does before verification: `head.refresh()` then K drafter forwards,
each followed by the (sparse) head and the draft choice. It is captured in a CUDA graph with
`benchmarks.common.time_us(graph=True)` and timed over replays, as in the decoder.

    python benchmarks/bench_draft_step.py            # H100: the three drafters, batch 1 and 8
    python benchmarks/bench_draft_step.py --smoke    # CPU: tiny shapes, checks the script runs
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch
import torch._dynamo

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from benchmarks.common import environment, save, time_us
from benchmarks.shapes import build
from microspec import SpecDecoder
from microspec.cli.progress import echo, progress_bar
from microspec.drafting.base import DraftRequest
from microspec.policies import FullVocab, InContextPolicy, StaticFrequencyPolicy
from microspec.sampling import SamplingConfig

K = 5


def filled_run(drafter, policy, B: int, prompt_len: int, async_gather: bool = False, compile: bool = False):
    """A started DecodeRun whose active set is full (n_active = capacity) for per-request policies."""
    dev = next(drafter.parameters()).device
    V = drafter.config.vocab_size
    dec = SpecDecoder(drafter, drafter, policy, K, async_gather=async_gather, cuda_graph=False,
                      compile=compile)
    g = torch.Generator(device="cpu").manual_seed(0)
    ids = torch.randint(3, V, (B, prompt_len), generator=g).to(dev)
    run, _, _ = dec.new_run(ids, max_new_tokens=64, eos_token_id=[], cuda_graph=False)
    run.start()
    while isinstance(policy, InContextPolicy) and int(policy.n_active.min()) < policy.capacity:
        commit = torch.randint(3, V, (B, K + 1), generator=g).to(dev)
        topk = torch.randint(3, V, (B, K + 1, policy.target_topk), generator=g).to(dev)
        policy.on_commit(commit, torch.ones_like(commit, dtype=torch.bool), topk)
    return dec, run


def perturber(ids: torch.Tensor, vocab: int, delta: int):
    """In-graph policy update stand-in: swap `delta` slots between the resident ids and fresh ones each call,
    so every refresh has exactly `delta` new rows to gather."""
    slots = torch.arange(ids.shape[1] - delta, ids.shape[1], device=ids.device)
    old = ids[:, slots].clone()
    resident = set(ids.flatten().tolist())
    fresh = torch.tensor([v for v in range(3, vocab) if v not in resident][: old.numel()], device=ids.device)
    fresh = fresh.view_as(old)
    flag = torch.zeros(1, dtype=torch.bool, device=ids.device)

    def swap():
        ids[:, slots] = torch.where(flag, old, fresh)
        flag.logical_not_()
    return swap


def draft_step_us(dec, run, refresh: bool = True, delta: int = 0) -> float:
    ids, n = dec.policy.active()
    swap = perturber(ids, dec.vocab_size, delta) if delta else None

    def step():
        if swap is not None:
            swap()
        if refresh:
            dec.head.refresh()
        dec.proposer.propose(DraftRequest(run.tokens, run.n, ids, n, SamplingConfig()))
    return time_us(step, graph=True)


def policies(vocab: int, capacities, incontext_capacity: int):
    yield "dense", FullVocab()
    ranking = torch.randperm(vocab, generator=torch.Generator().manual_seed(1))
    for C in capacities:
        yield f"static@{C}", StaticFrequencyPolicy(ranking, C)
    yield f"incontext@{incontext_capacity}", InContextPolicy(incontext_capacity, topk=3)


def run_all(smoke: bool, compile: bool, drafters, batches,
            quiet: bool = False) -> tuple[list[dict], list[dict]]:
    device = "cpu" if smoke else "cuda"
    drafters = ["tiny-llama-1l"] if smoke else drafters
    # With compilation every decoder compiles its drafter: keep to the headline capacity.
    capacities = (64, 256) if smoke else ((3072,) if compile else (1024, 3072, 8192, 32768))
    incontext_capacity = 256 if smoke else 3072
    batches, prompt_len = ((1, 2), 32) if smoke else (batches, 512)
    rows, overlap = [], []
    bar = progress_bar(quiet, unit="row", desc="draft step")
    for name in drafters:
        drafter = build(name, device, torch.float32 if smoke else torch.bfloat16)
        V = drafter.config.vocab_size
        for B in batches:
            dense_us = None
            for label, policy in policies(V, capacities, incontext_capacity):
                dec, run = filled_run(drafter, policy, B, prompt_len, compile=compile)
                us = draft_step_us(dec, run)
                dense_us = dense_us or us
                n_active = float(policy.n_active.float().mean())
                rows.append(dict(drafter=name, batch=B, policy=label, n_active=n_active, step_us=us,
                                 per_token_us=us / K, reduction=1 - us / dense_us, compiled=compile))
                bar.update(1)
                echo(f"{name:16s} B={B} {label:16s} active {n_active:8.0f}  draft step {us:8.1f} us  "
                     f"({us / K:6.1f} us/token)  {100 * (1 - us / dense_us):5.1f}% less than dense")
                if label.startswith("incontext") and not compile:   # overlap: measured without compilation
                    delta = (K + 1) * (1 + policy.target_topk)
                    modes = (("overlapped", True, True), ("serialized", False, True), ("absent", True, False))
                    for mode, async_gather, refresh in modes:
                        dec2, run2 = filled_run(drafter, InContextPolicy(policy.capacity, 3), B, prompt_len,
                                                async_gather, compile)
                        t = draft_step_us(dec2, run2, refresh=refresh, delta=delta if refresh else 0)
                        overlap.append(dict(drafter=name, batch=B, capacity=policy.capacity, delta_rows=delta,
                                            gather=mode, step_us=t, compiled=compile))
                        echo(f"    gather {mode:10s} ({delta} new rows/step): {t:8.1f} us")
                    upd = policy_update_us(policy, B, V, dec.policy.device)
                    overlap.append(dict(drafter=name, batch=B, capacity=policy.capacity,
                                        policy_update_us=upd))
                    echo(f"    InContextPolicy.on_commit: {upd:6.1f} us")
                del dec, run
            torch.cuda.empty_cache() if torch.cuda.is_available() else None
        del drafter
    bar.close()
    return rows, overlap


def policy_update_us(policy, B: int, V: int, device) -> float:
    g = torch.Generator().manual_seed(2)
    commit = torch.randint(3, V, (B, K + 1), generator=g).to(device)
    topk = torch.randint(3, V, (B, K + 1, policy.target_topk), generator=g).to(device)
    mask = torch.ones_like(commit, dtype=torch.bool)
    return time_us(lambda: policy.on_commit(commit, mask, topk), graph=True)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--smoke", action="store_true", help="tiny shapes on CPU (checks the script)")
    ap.add_argument("--compile", action="store_true", help="torch.compile the decode forwards (Inductor)")
    ap.add_argument("--drafters", default="eagle-llama3-8b,llama3.2-1b,qwen2.5-0.5b")
    ap.add_argument("--batch", default="1,8")
    ap.add_argument("--out", type=Path, default=None)
    ap.add_argument("-q", "--quiet", action="store_true",
                    help="no progress bar (off anyway when stderr is not a terminal)")
    args = ap.parse_args(argv)
    if not args.smoke and not torch.cuda.is_available():
        print("bench_draft_step needs CUDA (or --smoke)", file=sys.stderr)
        return 1
    torch._dynamo.config.cache_size_limit = 64    # one compiled drafter per decoder built here
    with torch.inference_mode():
        rows, overlap = run_all(args.smoke, args.compile, args.drafters.split(","),
                                tuple(map(int, args.batch.split(","))), args.quiet)
    if not args.smoke:
        payload = dict(env=environment(), K=K, compiled=args.compile, rows=rows, overlap=overlap,
                       command=" ".join(sys.argv))
        print(f"wrote {save('draft_step', payload, args.out)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
