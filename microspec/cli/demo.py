"""`microspec demo`: speculative decoding on real weights with each vocabulary policy, checked against plain
greedy decoding. The README's main job.

On a GPU it times plain decoding (`PlainDecoder`, CUDA graph) against dense-head speculation (`full`) and each
policy, after a warm-up, with CUDA events. On a CPU it shows acceptance, coverage and exactness only: there,
eager Python overhead dominates and wall-clock times say nothing about the GPU speed-up.

Everything it needs ships with `pip install`: the frequency list of the static and core policies is counted
over the answers in microspec/assets; the trained cluster policy is read from a checkout's docs/results/
(left out, with a note, where that file is absent).
"""
from __future__ import annotations

import statistics

import torch

from ..inputs import eos_ids_of
from ..prompts import encode_chat
from ._common import add_model_args, add_policy_args, build_policies, load_drafter, load_target, tree_spec

PROMPTS = [  # one per kind of task; none of them is in the text the static policy counts over
    "Write a short story, in about 100 words, about a lighthouse keeper who finds a message in a bottle.",
    "A train leaves at 3:15 pm and arrives at 6:40 pm. How long is the trip in minutes? "
    "Explain step by step.",
    "Write a Python function `is_palindrome(s)` that ignores case and spaces, with two doctest examples.",
    "Rewrite this sentence in formal English: "
    "'hey, gonna be late to the meeting, traffic is crazy, start w/o me'.",
]
CPU_MAX_NEW, GPU_MAX_NEW = 48, 256


def register(sub) -> None:
    p = sub.add_parser("demo", help="run every policy on real weights and check losslessness",
                       description=__doc__)
    add_model_args(p)
    add_policy_args(p, default_policy="full,static,incontext,incontext+core,cluster")
    p.add_argument("--max-new-tokens", type=int, default=None,
                   help=f"new tokens per prompt (default: {CPU_MAX_NEW} on CPU, {GPU_MAX_NEW} on GPU)")
    p.add_argument("--prompts", type=int, default=len(PROMPTS),
                   help=f"how many built-in prompts (<= {len(PROMPTS)})")
    p.add_argument("--repeats", type=int, default=3,
                   help="GPU: timed runs per row, the median is shown (default 3)")
    p.set_defaults(func=run)


def run(args) -> int:
    from microspec import SpecDecoder
    cuda = torch.device(args.device).type == "cuda"
    if cuda and args.dtype is None:
        # exactness is the demo's claim: float32 keeps near-ties of the target's top-2 logits from flipping
        # between a one-token and a (K+1)-token forward, and a small model's decoding is launch-bound anyway
        args.dtype = "float32"
    max_new = args.max_new_tokens or (GPU_MAX_NEW if cuda else CPU_MAX_NEW)
    target, tokenizer, source = load_target(args)
    drafter, drafter_desc = load_drafter(args, target)
    print(f"target:  {source}\ndrafter: {drafter_desc}\n"
          f"dtype {next(target.parameters()).dtype}, device {args.device}, K={args.K}, "
          f"max_new_tokens={max_new}")
    if tokenizer is None:
        ids = torch.randint(3, target.config.vocab_size, (args.prompts, 12), device=args.device)
        mask = torch.ones_like(ids)
    else:
        ids, mask = encode_chat(tokenizer, PROMPTS[: args.prompts], device=args.device)
    gen = target.generation_config
    eos = eos_ids_of(gen)        # the generation config's alone: what target.generate stops at
    pad = gen.pad_token_id
    pad = pad if pad is not None else (eos[0] if isinstance(gen.eos_token_id, int) else 0)
    eos_ids = torch.tensor(eos, dtype=torch.long, device=args.device)
    vocab = target.get_output_embeddings().weight.shape[0]
    policies = build_policies(args, tokenizer, vocab, skip_missing_cluster=True)

    def spec(policy, n):
        decoder = SpecDecoder(target, drafter, policy, args.K, tokenizer=tokenizer, tree=tree_spec(args))
        return lambda: decoder.generate(ids, attention_mask=mask, max_new_tokens=n, eos_token_id=eos,
                                        pad_token_id=pad)

    if cuda:
        from microspec.baseline import PlainDecoder
        plain = PlainDecoder(target)

        def run_plain(n):
            return lambda: plain.generate(ids, mask, max_new_tokens=n, eos_token_id=eos, pad_token_id=pad)

        reference, t_plain = _cuda_timed(run_plain(max_new), run_plain(8), args.repeats)
        n_plain = _new_tokens(reference, ids.shape[1], eos_ids)
        print(f"plain greedy decoding (microspec PlainDecoder, CUDA graph): {n_plain / t_plain:,.0f} "
              f"tokens/s for a batch of {ids.shape[0]} (median of {args.repeats} runs after a warm-up; "
              "prefill and graph capture included)")
        if args.drafter == "self":
            print("note: the drafter is the target itself, so every draft costs a full forward and "
                  "speculation cannot beat plain decoding here;\n      the rows compare the dense head with "
                  "pruned ones. The speed-up comes with a cheap drafter (--drafter early-exit:N).")
    else:
        with torch.inference_mode():
            reference = target.generate(ids, attention_mask=mask, do_sample=False, max_new_tokens=max_new,
                                        eos_token_id=eos, pad_token_id=pad)
        print(f"plain greedy decoding: Hugging Face generate, batch of {ids.shape[0]}")
    header = (f"{'policy':<22}{'active size':>12}{'coverage':>10}{'accepted len':>14}{'accept rate':>13}"
              f"{'== greedy':>11}")
    if cuda:
        header += f"{'tokens/s':>10}{'x plain':>9}{'x full':>8}"
    print("\n" + header + "\n" + "-" * len(header))
    all_equal, t_full = True, None
    for name, policy in policies.items():
        if cuda:
            out, dt = _cuda_timed(spec(policy, max_new), spec(policy, 8), args.repeats)
        else:
            out, dt = spec(policy, max_new)(), None
        same = torch.equal(out.sequences, reference)
        all_equal &= same
        s = out.stats
        line = (f"{name:<22}{s.mean_active_size:>12.0f}{s.coverage:>10.3f}{s.mean_accepted_length:>14.2f}"
                f"{s.acceptance_rate:>13.2f}{'yes' if same else 'NO':>11}")
        if cuda:
            t_full = dt if name == "full" else t_full
            vs_full = f"{t_full / dt:>8.2f}" if t_full is not None else f"{'':>8}"
            rate = _new_tokens(out.sequences, ids.shape[1], eos_ids) / dt
            line += f"{rate:>10,.0f}{t_plain / dt:>9.2f}{vs_full}"
        print(line)
    if tokenizer is not None:
        answer = reference[0, ids.shape[1]:]
        text = tokenizer.decode(answer, skip_special_tokens=True).strip()
        print(f"\nprompt 1: {PROMPTS[0]}\nanswer:   {text}")
    print("\nAll outputs equal plain greedy decoding." if all_equal else
          "\nSome outputs differ from plain greedy decoding (see TESTING.md R5b: in low precision a near-tie "
          "of the target's top-2 logits can flip).")
    if cuda:
        print("x plain / x full: time of plain decoding / of dense-head speculation over this row's time "
              "(> 1 is faster). GPU measurements of every part: docs/benchmarks.md.")
    else:
        print("No timings on a CPU: there eager Python overhead dominates and wall-clock times say nothing "
              "about the GPU speed-up.\nRun this on a GPU (--device cuda) for tokens/s, or see "
              "docs/benchmarks.md.")
    return 0 if all_equal else 1


def _cuda_timed(fn, warm_up, repeats: int):
    """(output of the last run, median seconds over `repeats` runs of fn), timed with CUDA events after one
    short warm-up run (Triton JIT, cuBLAS handles, allocator)."""
    from microspec.timing import timed
    warm_up()
    times = []
    for _ in range(max(1, repeats)):
        seconds, out = timed(fn, cuda=True)
        times.append(seconds)
    return out, statistics.median(times)


def _new_tokens(sequences: torch.Tensor, prompt_len: int, eos_ids: torch.Tensor) -> int:
    """New tokens over all rows, each row counted up to and including its first EOS."""
    new = sequences[:, prompt_len:]
    if new.shape[1] == 0:
        return 0
    hit = torch.isin(new, eos_ids)
    length = torch.where(hit.any(1), hit.int().argmax(1) + 1, new.shape[1])
    return int(length.sum())
