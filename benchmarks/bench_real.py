"""Real weights end to end on the GPU: SmolLM2-135M-Instruct (GGUF, bf16), real prompts, real acceptance.

Methods (decode tokens/s after start-up; greedy):
  hf-eager        Hugging Face `generate` (context only)
  plain           plain greedy decoding, static cache, CUDA graph (+ `--compile`: Inductor-fused layers)
  self:<policy>   SpecDecoder, drafter = the target itself with a pruned head (acceptance = coverage effect)
  exit<N>:<pol>   SpecDecoder, drafter = the target's first N layers (self-speculative early exit)

Every speculative output is compared with plain greedy decoding of the same batch; in bf16 a mismatch can
only come from a near-tie of the target's top-2 logits (different summation order at K+1 positions).

    python benchmarks/bench_real.py --gguf PATH --prompts prompts.json --token-map smollm2_freq.pt
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch
import torch._dynamo

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from benchmarks.common import environment, save
from microspec import SpecDecoder
from microspec.baseline import PlainDecoder
from microspec.cli.progress import echo, progress_bar
from microspec.inputs import eos_ids_of
from microspec.models import early_exit_drafter, load_gguf
from microspec.policies import FullVocab, InContextPolicy, StaticFrequencyPolicy, load_token_map
from microspec.prompts import encode_chat

K = 5


def spec_run(dec, ids, mask, new, eos):
    """(sequences, stats, decode tokens/s after the graph capture)."""
    run, _, _ = dec.new_run(ids, mask, new, eos_token_id=eos, cuda_graph=True)
    run.start()
    run.capture()
    torch.cuda.synchronize()
    tokens0 = int(run.generated.sum())
    t0 = time.perf_counter()
    run.run_steps()
    torch.cuda.synchronize()
    rate = (int(run.generated.sum()) - tokens0) / (time.perf_counter() - t0)
    return run.sequences(ids, eos[0]), run.summary(), rate


def first_mismatch_gap(model, expected, got, mask):
    """For rows that differ: the target's top-2 logit gap at the first differing position (bf16 near-tie?),
    recomputed on the row's own tokens (left padding removed)."""
    gaps, prompt_len = [], mask.shape[1]
    for row in range(expected.shape[0]):
        diff = (expected[row, prompt_len:] != got[row, prompt_len:]).nonzero()
        if diff.numel():
            col = prompt_len + int(diff[0])
            start = int((mask[row] == 0).sum())
            logits = model(expected[row: row + 1, start:col]).logits[0, -1].float()
            top2 = logits.topk(2).values
            gaps.append(float(top2[0] - top2[1]))
    return gaps


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--gguf", required=True)
    ap.add_argument("--prompts", required=True, help="JSON list of user messages")
    ap.add_argument("--token-map", required=True, help="frequency ranking for the static policy")
    ap.add_argument("--new-tokens", type=int, default=128)
    ap.add_argument("--exit-layers", type=int, default=10)
    ap.add_argument("--compile", action="store_true")
    ap.add_argument("--dtype", choices=("bfloat16", "float32"), default="bfloat16",
                    help="float32: ties at bf16 resolution vanish, so every row must equal plain greedy")
    ap.add_argument("--out", type=Path, default=None)
    ap.add_argument("-q", "--quiet", action="store_true",
                    help="no progress bar (off anyway when stderr is not a terminal)")
    args = ap.parse_args(argv)
    torch._dynamo.config.cache_size_limit = 64
    model, tokenizer = load_gguf(args.gguf, dtype=getattr(torch, args.dtype), device="cuda")
    prompts = json.loads(Path(args.prompts).read_text())
    ranking = load_token_map(args.token_map)
    eos = eos_ids_of(model)
    rows = []
    policies = {"full": FullVocab, "static@1024": lambda: StaticFrequencyPolicy(ranking, 1024),
                "incontext@1024": lambda: InContextPolicy(1024, topk=3),
                "incontext+core@1024": lambda: InContextPolicy(1024, topk=3, core_ids=ranking[:256])}
    bar = progress_bar(args.quiet, unit="row", desc="bench_real")
    with torch.inference_mode():
        for B in (1, 8):
            ids, mask = encode_chat(tokenizer, prompts[:B], device="cuda")
            if B == 1:
                model.generate(ids, attention_mask=mask, max_new_tokens=4, do_sample=False)
                torch.cuda.synchronize()
                t0 = time.perf_counter()
                model.generate(ids, attention_mask=mask, max_new_tokens=64, min_new_tokens=64,
                               do_sample=False)
                torch.cuda.synchronize()
                rows.append(dict(batch=1, method="hf-eager", tok_s=64 / (time.perf_counter() - t0)))
                echo(f"B=1 hf-eager {rows[-1]['tok_s']:8.1f} tok/s")
                bar.update(1)
            compile_here = args.compile and B == 1          # compilation costs minutes: batch 1 only
            for compiled in ((False, True) if compile_here else (False,)):
                plain = PlainDecoder(model, compile=compiled)
                expected = plain.generate(ids, mask, max_new_tokens=args.new_tokens, eos_token_id=eos,
                                          pad_token_id=eos[0])
                tokens, seconds = plain.steady_state
                rows.append(dict(batch=B, method="plain" + ("+compile" if compiled else ""),
                                 tok_s=tokens / seconds))
                echo(f"B={B} {rows[-1]['method']:28s} {rows[-1]['tok_s']:8.1f} tok/s")
                bar.update(1)
            drafters = {"self": model, f"exit{args.exit_layers}": early_exit_drafter(model, args.exit_layers)}
            for dname, drafter in drafters.items():
                for pname, make in policies.items():
                    both = compile_here and pname == "incontext@1024"
                    for compiled in ((False, True) if both else (False,)):
                        dec = SpecDecoder(model, drafter, make(), K, tokenizer=tokenizer, compile=compiled)
                        seqs, stats, rate = spec_run(dec, ids, mask, args.new_tokens, eos)
                        same = [bool(torch.equal(a, b)) for a, b in zip(seqs, expected)]
                        gaps = first_mismatch_gap(model, expected, seqs, mask) if not all(same) else []
                        method = f"{dname}:{pname}" + ("+compile" if compiled else "")
                        rows.append(dict(batch=B, method=method, tok_s=rate, tau=stats.mean_accepted_length,
                                         coverage=stats.coverage, active=stats.mean_active_size,
                                         rows_equal_plain=sum(same), rows=len(same), mismatch_top2_gaps=gaps))
                        echo(f"B={B} {method:28s} {rate:8.1f} tok/s  tau {stats.mean_accepted_length:.2f}  "
                             f"coverage {stats.coverage:.3f}  active {stats.mean_active_size:6.0f}  "
                             f"equal {sum(same)}/{len(same)} {gaps}")
                        bar.update(1)
    bar.close()
    payload = dict(env=environment(), K=K, model=Path(args.gguf).name, dtype=args.dtype, prompts=prompts,
                   new_tokens=args.new_tokens,
                   rows=rows, command=" ".join(sys.argv))
    name = "real_smollm2" if args.dtype == "bfloat16" else f"real_smollm2_{args.dtype}"
    print(f"wrote {save(name, payload, args.out)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
