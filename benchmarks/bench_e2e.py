"""End-to-end decode throughput at real shapes (random weights), tokens/s after start-up:

  hf-eager     Hugging Face `generate` (context only: Python- and launch-bound)
  plain        plain greedy target decoding, static cache, CUDA graph (`microspec.baseline.PlainDecoder`)
  spec:<pol>   `SpecDecoder` (whole step in one CUDA graph) with policy <pol>; `spec:dense` is the usual
               dense-head speculative decoding

Random weights accept nothing, so the number of drafts accepted per verification is **imposed**: either by
construction (`--acceptance fixed:N`, every policy accepts N of K) or replayed from traces recorded on real
models (`--acceptance FILE.json`: per policy, the sequence of accepted counts of a real run; each batch row
starts at a different offset). The target's verification forward, argmax and every other cost stay real;
only the comparison "draft == target's token" is replaced.

    python benchmarks/bench_e2e.py --acceptance fixed:3
    python benchmarks/bench_e2e.py --acceptance benchmarks/results/acceptance_qwen_coder.json
    python benchmarks/bench_e2e.py --smoke
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import sys
import time
from pathlib import Path

import torch
import torch._dynamo

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from benchmarks.common import environment, run_stamp, save
from benchmarks.shapes import PAIRS, build
from microspec import SpecDecoder
from microspec.baseline import PlainDecoder
from microspec.cli.progress import echo, progress_bar
from microspec.drafting.base import Verdict
from microspec.engine import DecodeRun
from microspec.lab.policy_labels import policy_from_label
from microspec.sampling import SamplingConfig

K = 5


class TraceVerifier:
    """A verifier whose acceptance follows a trace: row b at step t accepts trace[(t + offset_b) % T]. It
    still computes the target's argmax (the real verification cost)."""

    def __init__(self, trace: torch.Tensor, B: int, device):
        self.trace = trace.to(device)
        self.offsets = torch.arange(B, device=device) * (len(trace) // max(B, 1))
        self.t = torch.zeros((), dtype=torch.long, device=device)

    def __call__(self, drafts, t_logits, active_ids, cfg, uniforms=None, exp_noise=None) -> Verdict:
        draft = drafts.tokens
        best = t_logits.argmax(-1)                                          # [B, K+1]
        n_acc = self.trace[(self.t + self.offsets) % len(self.trace)].clamp(0, draft.shape[1])
        self.t += 1
        padded = torch.cat([draft, best[:, -1:]], 1)
        steps = torch.arange(padded.shape[1], device=padded.device)
        return Verdict(n_acc, torch.where(steps < n_acc.unsqueeze(1), padded, best))


def make_policy(label: str, vocab: int):
    """A policy from a `microspec eval` label ("dense" is "full"). Random weights have no token frequencies,
    so a random ranking stands in: the head's cost depends on the capacity, not on which ids fill it."""
    ranking = torch.randperm(vocab, generator=torch.Generator().manual_seed(1))
    return policy_from_label("full" if label == "dense" else label, ranking)


def prompts(B, L, vocab, device):
    ids = torch.randint(3, vocab, (B, L), generator=torch.Generator().manual_seed(0)).to(device)
    return ids, torch.ones_like(ids)


def spec_tok_s(target, drafter, label, B, L, new, trace, compile=False) -> dict:
    dec = SpecDecoder(target, drafter, make_policy(label, drafter.config.vocab_size), K, compile=compile)
    ids, mask = prompts(B, L, target.config.vocab_size, next(target.parameters()).device)
    parts = dataclasses.replace(dec.parts(), verifier=TraceVerifier(trace, B, ids.device))
    run = DecodeRun(parts, ids, mask.bool(), new, SamplingConfig(), [], None, cuda_graph=True)
    run.start()
    if torch.cuda.is_available():
        run.capture()
        torch.cuda.synchronize()
    done0, steps0 = int(run.generated.sum()), run.num_steps
    t0 = time.perf_counter()
    run.run_steps()
    torch.cuda.synchronize() if torch.cuda.is_available() else None
    seconds = time.perf_counter() - t0
    tokens = int(run.generated.sum()) - done0
    stats = run.summary()
    return dict(tok_s=tokens / seconds, tokens=tokens, seconds=seconds, steps=run.num_steps - steps0,
                mean_accepted_length=stats.mean_accepted_length, mean_active=stats.mean_active_size)


def plain_tok_s(target, B, L, new, compile=False) -> dict:
    ids, mask = prompts(B, L, target.config.vocab_size, next(target.parameters()).device)
    dec = PlainDecoder(target, compile=compile)
    t0 = time.perf_counter()
    dec.generate(ids, mask, max_new_tokens=new, eos_token_id=[])
    if dec.steady_state is None:
        return dict(tok_s=B * new / (time.perf_counter() - t0))
    tokens, seconds = dec.steady_state
    return dict(tok_s=tokens / seconds, tokens=tokens, seconds=seconds)


def hf_eager_tok_s(target, L, new) -> dict:
    ids, mask = prompts(1, L, target.config.vocab_size, next(target.parameters()).device)
    target.generate(ids, attention_mask=mask, max_new_tokens=4, do_sample=False, eos_token_id=None)
    torch.cuda.synchronize() if torch.cuda.is_available() else None
    t0 = time.perf_counter()
    target.generate(ids, attention_mask=mask, max_new_tokens=new, min_new_tokens=new, do_sample=False,
                    eos_token_id=None)
    torch.cuda.synchronize() if torch.cuda.is_available() else None
    return dict(tok_s=new / (time.perf_counter() - t0))


def load_traces(spec: str) -> tuple[dict, str]:
    if spec.startswith("fixed:"):
        n = int(spec.split(":")[1])
        return ({}, f"by construction: every policy accepts {n} of K={K} drafts per step"), n
    data = json.loads(Path(spec).read_text())
    return (data["traces"], f"replayed from {Path(spec).name}: {data['source']}"), None


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--acceptance", default="fixed:3", help="fixed:N or a trace JSON file")
    ap.add_argument("--policies", default="dense,static@32768,static@3072,incontext@3072")
    ap.add_argument("--batch", default="1,8")
    ap.add_argument("--prompt-len", type=int, default=256)
    ap.add_argument("--new-tokens", type=int, default=256)
    ap.add_argument("--pairs", default=None, help="target:drafter,... (default: all real-shape pairs)")
    ap.add_argument("--compile", action="store_true", help="torch.compile the decode forwards (Inductor)")
    ap.add_argument("--smoke", action="store_true", help="tiny shapes on CPU")
    ap.add_argument("--out", type=Path, default=None)
    ap.add_argument("-q", "--quiet", action="store_true",
                    help="no progress bar (off anyway when stderr is not a terminal)")
    args = ap.parse_args(argv)
    device = "cpu" if args.smoke else "cuda"
    (traces, source), fixed = load_traces(args.acceptance)
    print(f"acceptance {source}", flush=True)
    pairs = ({"tiny-llama": PAIRS["tiny-llama"]} if args.smoke
             else {t: d for t, d in PAIRS.items() if "tiny" not in t})
    if args.pairs:
        pairs = {}
        for pair in args.pairs.split(","):
            t, d = pair.split(":")
            pairs.setdefault(t, []).append(d)
    torch._dynamo.config.cache_size_limit = 64
    L, new = (16, 24) if args.smoke else (args.prompt_len, args.new_tokens)
    rows, stamp, env = [], run_stamp(), environment()

    def write() -> Path:
        return save("e2e", dict(env=env, K=K, acceptance=source, prompt_len=L, new_tokens=new, rows=rows,
                                compiled=args.compile, command=" ".join(sys.argv)), args.out, stamp)

    bar = progress_bar(args.quiet, unit="row", desc="e2e")

    def record(row: dict) -> None:        # saved after every row: a time limit keeps what was measured
        rows.append(row)
        bar.update(1)
        if not args.smoke:
            write()
    with torch.inference_mode():
        for target_name, drafters in pairs.items():
            target = build(target_name, device, torch.float32 if args.smoke else torch.bfloat16)
            for B in map(int, args.batch.split(",")):
                r = plain_tok_s(target, B, L, new, args.compile)
                record(dict(target=target_name, drafter=None, batch=B, method="plain", **r))
                echo(f"{target_name:11s} B={B} plain (CUDA graph)       {r['tok_s']:9.1f} tok/s")
                if B == 1:
                    r = hf_eager_tok_s(target, L, min(new, 64))
                    record(dict(target=target_name, drafter=None, batch=1, method="hf-eager", **r))
                    echo(f"{target_name:11s} B=1 hf-eager (context)     {r['tok_s']:9.1f} tok/s")
            for drafter_name in drafters:
                drafter = build(drafter_name, device, torch.float32 if args.smoke else torch.bfloat16, seed=1)
                for B in map(int, args.batch.split(",")):
                    for label in args.policies.split(","):
                        key = label if label in traces else ("full" if label == "dense" else label)
                        if fixed is not None:
                            trace = torch.full((64,), fixed)
                        elif key in traces:
                            trace = torch.tensor(traces[key])
                        else:
                            echo(f"  no trace for {label}: skipped")
                            continue
                        r = spec_tok_s(target, drafter, label, B, L, new, trace, args.compile)
                        record(dict(target=target_name, drafter=drafter_name, batch=B, method=f"spec:{label}",
                                         **r))
                        echo(f"{target_name:11s} B={B} {drafter_name:15s} spec:{label:15s} "
                             f"{r['tok_s']:9.1f} tok/s  tau {r['mean_accepted_length']:.2f}  "
                             f"active {r['mean_active']:.0f}")
                del drafter
            del target
            torch.cuda.empty_cache() if torch.cuda.is_available() else None
    bar.close()
    if rows and not args.smoke:
        print(f"wrote {write()}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
