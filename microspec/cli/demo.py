"""`microspec demo`: speculative decoding on real weights with each vocabulary policy, checked against plain
greedy decoding. The README's main job."""
from __future__ import annotations

import time

import torch

from ..prompts import encode_chat
from ._common import add_model_args, add_policy_args, build_policies, load_drafter, load_target

PROMPTS = [  # one per kind of task; none of them is in the corpora the static policy counts over
    "Write a short story, in about 100 words, about a lighthouse keeper who finds a message in a bottle.",
    "A train leaves at 3:15 pm and arrives at 6:40 pm. How long is the trip in minutes? Explain step by step.",
    "Write a Python function `is_palindrome(s)` that ignores case and spaces, with two doctest examples.",
    "Rewrite this sentence in formal English: 'hey, gonna be late to the meeting, traffic is crazy, start w/o me'.",
]


def register(sub) -> None:
    p = sub.add_parser("demo", help="run every policy on real weights and check losslessness",
                       description=__doc__)
    add_model_args(p)
    add_policy_args(p, default_policy="full,static,incontext,incontext+core,cluster")
    p.add_argument("--max-new-tokens", type=int, default=48)
    p.add_argument("--prompts", type=int, default=len(PROMPTS), help=f"how many built-in prompts (<= {len(PROMPTS)})")
    p.set_defaults(func=run)


def run(args) -> int:
    from microspec import SpecDecoder
    target, tokenizer, source = load_target(args)
    drafter, drafter_desc = load_drafter(args, target)
    print(f"target:  {source}\ndrafter: {drafter_desc}\n"
          f"dtype {next(target.parameters()).dtype}, device {args.device}, K={args.K}, "
          f"max_new_tokens={args.max_new_tokens}")
    if tokenizer is None:
        ids = torch.randint(3, target.config.vocab_size, (args.prompts, 12), device=args.device)
        mask = torch.ones_like(ids)
    else:
        ids, mask = encode_chat(tokenizer, PROMPTS[: args.prompts], device=args.device)
    eos = target.generation_config.eos_token_id
    pad = target.generation_config.pad_token_id
    pad = pad if pad is not None else (eos if isinstance(eos, int) else 0)
    t0 = time.perf_counter()
    with torch.inference_mode():
        reference = target.generate(ids, attention_mask=mask, do_sample=False, max_new_tokens=args.max_new_tokens,
                                    eos_token_id=eos, pad_token_id=pad)
    t_ref = time.perf_counter() - t0
    print(f"plain greedy decoding (Hugging Face generate): {t_ref:.1f} s for a batch of {ids.shape[0]}\n")
    header = f"{'policy':<22}{'active size':>12}{'coverage':>10}{'accepted len':>14}{'accept rate':>13}" \
             f"{'== greedy':>11}{'time s':>8}"
    print(header + "\n" + "-" * len(header))
    vocab = target.get_output_embeddings().weight.shape[0]
    all_equal = True
    for name, policy in build_policies(args, tokenizer, vocab).items():
        decoder = SpecDecoder(target, drafter, policy, args.K, tokenizer=tokenizer)
        t0 = time.perf_counter()
        out = decoder.generate(ids, attention_mask=mask, max_new_tokens=args.max_new_tokens, eos_token_id=eos,
                               pad_token_id=pad)
        dt = time.perf_counter() - t0
        same = torch.equal(out.sequences, reference)
        all_equal &= same
        s = out.stats
        print(f"{name:<22}{s.mean_active_size:>12.0f}{s.coverage:>10.3f}{s.mean_accepted_length:>14.2f}"
              f"{s.acceptance_rate:>13.2f}{'yes' if same else 'NO':>11}{dt:>8.1f}")
    if tokenizer is not None:
        answer = reference[0, ids.shape[1]:]
        print(f"\nprompt 1: {PROMPTS[0]}\nanswer:   {tokenizer.decode(answer, skip_special_tokens=True).strip()}")
    print("\nAll outputs equal plain greedy decoding." if all_equal else
          "\nSome outputs differ from plain greedy decoding (see TESTING.md R5b: in low precision a near-tie of "
          "the target's top-2 logits can flip).")
    print("Timings here are CPU wall-clock with eager Hugging Face models: they show overhead, not the GPU "
          "speed-up (see docs/benchmarks.md).")
    return 0 if all_equal else 1
