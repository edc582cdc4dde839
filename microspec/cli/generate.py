"""`microspec generate`: speculative decoding of one prompt, streaming the text as tokens are committed, then
the statistics."""
from __future__ import annotations

import time

import torch

from ._common import (add_model_args, add_policy_args, build_policies, check_model_args, check_policy_args,
                      check_sampling_args, load_drafter, load_target, tree_spec)


def register(sub) -> None:
    p = sub.add_parser("generate", help="generate text for a prompt with one policy", description=__doc__)
    p.add_argument("prompt", help="the user message (chat-formatted when the tokenizer has a template)")
    add_model_args(p)
    add_policy_args(p, default_policy="incontext")
    p.add_argument("--max-new-tokens", type=int, default=128)
    p.add_argument("--sample", action="store_true", help="sample instead of greedy decoding")
    p.add_argument("--temperature", type=float, default=1.0)
    p.add_argument("--top-k", type=int, default=None)
    p.add_argument("--top-p", type=float, default=None)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--no-stream", action="store_true",
                   help="print the text at the end instead of as it is committed (then on a GPU the decode "
                        "steps run as one CUDA graph, with no host wait per step)")
    p.set_defaults(func=run)


def run(args) -> int:
    from microspec import SpecDecoder
    from ..prompts import encode_chat
    check_model_args(args)          # everything checkable is checked before the (slow) model load
    check_policy_args(args)
    check_sampling_args(args)
    if len([n for n in args.policy.split(",") if n.strip()]) != 1:
        raise ValueError("generate takes exactly one --policy")
    target, tokenizer, source = load_target(args)
    if tokenizer is None:
        raise ValueError("generate needs a model with a tokenizer (no real weights were found)")
    drafter, drafter_desc = load_drafter(args, target)
    policies = build_policies(args, tokenizer, target.get_output_embeddings().weight.shape[0])
    if len(policies) != 1:
        raise ValueError("generate takes exactly one --policy")
    (name, policy), = policies.items()
    ids, mask = encode_chat(tokenizer, [args.prompt], device=args.device)
    generator = torch.Generator(device=args.device).manual_seed(args.seed)
    streamer = None
    if not args.no_stream:       # put(LongTensor [n]) after prefill and after every step, end() at the end
        from transformers import TextStreamer
        streamer = TextStreamer(tokenizer, skip_prompt=False, skip_special_tokens=True)
    t0 = time.perf_counter()
    out = SpecDecoder(target, drafter, policy, args.K, tokenizer=tokenizer, tree=tree_spec(args)).generate(
        ids, attention_mask=mask, max_new_tokens=args.max_new_tokens, do_sample=args.sample,
        temperature=args.temperature, top_k=args.top_k, top_p=args.top_p, generator=generator,
        streamer=streamer)
    dt = time.perf_counter() - t0
    if streamer is None:
        print(tokenizer.decode(out.sequences[0, ids.shape[1]:], skip_special_tokens=True).strip())
    s = out.stats
    n_new = out.sequences.shape[1] - ids.shape[1]
    print(f"\n[{source}; drafter {drafter_desc}; policy {name}; K={args.K}] {n_new} tokens in {dt:.1f} s, "
          f"accepted length {s.mean_accepted_length:.2f}, acceptance {s.acceptance_rate:.2f}, "
          f"coverage {s.coverage:.3f}, mean active size {s.mean_active_size:.0f}")
    return 0
