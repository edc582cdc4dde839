"""`microspec train-drafter`: train an EAGLE-1/2 feature drafter (`microspec.drafting.eagle`) for a target.

Builds the data (the target's own answers to training prompts that are not evaluation sets, plus the
corpora's real answers), trains online on the target's features and writes into --out: the drafter
(eagle_drafter.json + eagle_drafter.safetensors in bf16, loadable with `EagleDrafter.from_pretrained(out,
target)`), log.jsonl and loss.png (with matplotlib); into --state-dir (default --out): dataset.safetensors
(token ids) and trainer_state.pt (fp32 weights + optimizer), which --resume continues from. --init starts
from a trained head's weights instead of a fresh initialisation (new data, optimizer and schedule: longer
training on more data without the first run's state directory).

    microspec train-drafter --model smollm2 --out checkpoints/eagle-smollm2           # GPU, a few minutes
    microspec train-drafter --model tiny --smoke --out /tmp/eagle-smoke --device cpu    # CPU, seconds
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

SMOKE = dict(limit_prompts=24, random_prompts=24, max_new=12, answers="greedy,1.0", steps=30,
             batch_tokens=384, max_len=64, gen_batch=16, eval_every=10, save_every=15, log_every=5, warmup=5)


def register(sub) -> None:
    p = sub.add_parser("train-drafter", help="train an EAGLE feature drafter for a target model",
                       description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="smollm2",
                   help="'smollm2', a .gguf file, a Hugging Face directory, or 'tiny' (a tiny random Llama)")
    p.add_argument("--out", required=True, help="output directory: the drafter, log.jsonl, loss.png")
    p.add_argument("--state-dir", default=None,
                   help="where dataset.safetensors and trainer_state.pt go (large; default: --out)")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--dtype", choices=["bfloat16", "float32", "float16"], default=None,
                   help="the target's dtype (default: bfloat16 on CUDA, float32 on CPU); the drafter trains "
                        "in fp32")
    p.add_argument("--smoke", action="store_true", help="tiny sizes for a seconds-long check (tests)")
    p.add_argument("--resume", action="store_true", help="continue from --state-dir's dataset and state")
    p.add_argument("--init", default=None,
                   help="start from this trained head (a --out directory of this command, for the same "
                        "target) instead of a fresh initialisation")
    p.add_argument("--seed", type=int, default=0)
    d = p.add_argument_group("data")
    d.add_argument("--sources", default="alpaca:*,gsm8k:train",
                   help="prompt/answer corpora (microspec.lab.data names); evaluation sets are refused")
    d.add_argument("--prompt-format", choices=["auto", "chat", "plain"], default="auto",
                   help="chat template (instruct models) or 'prompt\\n\\n' (base models, e.g. Gemma-3-270M); "
                        "auto: chat when the tokenizer has a template")
    d.add_argument("--limit-prompts", type=int, default=None, help="use the first N training prompts")
    d.add_argument("--random-prompts", type=int, default=256, help="tiny model: number of random prompts")
    d.add_argument("--heldout", type=float, default=0.02, help="fraction of prompts held out for evaluation")
    d.add_argument("--answers", default="greedy,0.7,1.0",
                   help="self-distilled answers per prompt: 'greedy' or a temperature each "
                        "(default: %(default)s)")
    d.add_argument("--max-new", type=int, default=256, help="tokens per self-distilled answer")
    d.add_argument("--gen-batch", type=int, default=512, help="prompts per generate() call")
    d.add_argument("--gen-minutes", type=float, default=None, help="stop generating answers after this long")
    d.add_argument("--no-real", action="store_true", help="no teacher-forced corpus answers")
    d.add_argument("--max-len", type=int, default=1024, help="tokens per training sequence")
    t = p.add_argument_group("training")
    t.add_argument("--steps", type=int, default=None, help="optimizer steps (default: --epochs of data)")
    t.add_argument("--epochs", type=float, default=4.0)
    t.add_argument("--batch-tokens", type=int, default=16384, help="padded tokens per batch")
    t.add_argument("--lr", type=float, default=5e-4)
    t.add_argument("--warmup", type=int, default=100)
    t.add_argument("--noise", type=float, default=0.2, help="EAGLE-1 uniform feature noise (0: off)")
    t.add_argument("--p-weight", type=float, default=0.1, help="weight of the distribution (CE) loss")
    t.add_argument("--train-minutes", type=float, default=None,
                   help="stop training after this long (the LR schedule then ends there)")
    t.add_argument("--eval-every", type=int, default=500)
    t.add_argument("--save-every", type=int, default=1000)
    t.add_argument("--log-every", type=int, default=20)
    t.add_argument("--fc-bias", action="store_true", help="a bias in fc (EAGLE's Vicuna heads had one)")
    t.add_argument("--compile-loss", nargs="?", const=True, default=False, metavar="BACKEND",
                   help="compile the distillation loss's per-chunk arithmetic into fused reductions "
                        "(Inductor, or the named torch.compile backend) instead of eager float32 passes "
                        "over [chunk, vocabulary] tensors")
    t.add_argument("--no-progress", action="store_true")
    p.set_defaults(func=run)


def _apply_smoke(args) -> None:
    for key, value in SMOKE.items():
        if getattr(args, key) == _defaults()[key]:
            setattr(args, key, value)


def _defaults() -> dict:
    parser = argparse.ArgumentParser()
    register(parser.add_subparsers())
    return vars(parser.parse_args(["train-drafter", "--out", "x"]))


def _load(args):
    from microspec import models
    dtype = getattr(torch, args.dtype) if args.dtype else (torch.bfloat16 if args.device.startswith("cuda")
                                                          else torch.float32)
    if args.model == "tiny":
        return models.tiny_random_model(seed=args.seed, dtype=dtype).to(args.device), None
    return models.load_model(args.model, dtype, args.device)


def run(args) -> int:
    from microspec.drafting.eagle import EagleDrafter
    from microspec.lab.drafter_data import build_dataset, load_sequences, save_sequences, special_ids, summary
    from microspec.lab.train_drafter import STATE_FILE, TrainConfig, train
    if args.smoke:
        _apply_smoke(args)
    if args.init and args.resume:
        raise ValueError("--init and --resume: --resume already continues a head (and its optimizer)")
    if args.init:
        EagleDrafter.read_config(args.init)                       # a missing or foreign file: before any work
    out = Path(args.out)
    torch.manual_seed(args.seed)
    target, tokenizer = _load(args)
    target.eval().requires_grad_(False)
    # a head trained for another model is refused here, before the data is built; fp32 master weights
    start = EagleDrafter.from_pretrained(args.init, target, dtype=torch.float32) if args.init else None
    state_dir = Path(args.state_dir) if args.state_dir else out
    data_file = state_dir / "dataset.safetensors"
    t0 = time.time()
    if args.resume and data_file.is_file():
        data = load_sequences(data_file)
    else:
        if args.resume:
            raise FileNotFoundError(f"--resume: no {data_file}")
        modes = tuple(m if m == "greedy" else float(m) for m in args.answers.split(","))
        data = build_dataset(target, tokenizer, sources=tuple(args.sources.split(",")),
                             prompt_format=args.prompt_format, limit_prompts=args.limit_prompts,
                             heldout_frac=args.heldout, modes=modes, max_new=args.max_new,
                             gen_batch=args.gen_batch, real=not args.no_real, max_len=args.max_len,
                             seed=args.seed, gen_minutes=args.gen_minutes, random_prompts=args.random_prompts,
                             progress=not args.no_progress)
        state_dir.mkdir(parents=True, exist_ok=True)
        save_sequences(data_file, **data)
    gen_seconds = time.time() - t0
    for split in ("train", "heldout"):
        counts = summary(data[split])
        total = sum(c["tokens"] for c in counts.values())
        answer = sum(c["answer_tokens"] for c in counts.values())
        parts = ", ".join(f"{k} {c['sequences']} seq / {c['answer_tokens']} answer tok"
                          for k, c in sorted(counts.items()))
        print(f"{split}: {sum(c['sequences'] for c in counts.values())} sequences, {total} tokens "
              f"({answer} answer tokens): {parts}", file=sys.stderr)
    print(f"data ready in {gen_seconds:.0f} s", file=sys.stderr)
    if not data["train"]:
        raise ValueError("no training sequences (all prompts filtered out?)")
    cfg = TrainConfig(steps=args.steps, epochs=args.epochs, batch_tokens=args.batch_tokens, lr=args.lr,
                      warmup=args.warmup, noise=args.noise, p_weight=args.p_weight,
                      train_minutes=args.train_minutes, eval_every=args.eval_every,
                      save_every=args.save_every, log_every=args.log_every, seed=args.seed,
                      compile_loss=args.compile_loss)
    resume = args.resume and (state_dir / STATE_FILE).is_file()
    drafter = start or EagleDrafter.from_target(target, fc_bias=args.fc_bias, dtype=torch.float32,
                                                seed=args.seed)
    _, pad = special_ids(target, tokenizer)
    info = {"arguments": {k: v for k, v in vars(args).items() if k != "func"},
            "data_seconds": round(gen_seconds, 1)}
    result = train(target, drafter, data["train"], data["heldout"], cfg, out, pad_id=pad, resume=resume,
                   progress=not args.no_progress, info=info, state_dir=state_dir)
    ev = result.get("final_eval", {})
    print(f"done: {result['steps']} steps, {result['tokens_seen']} tokens, {result['minutes']} min; held-out "
          + ", ".join(f"{k} {v:.4g}" for k, v in ev.items()) + f"\ndrafter: {out}", file=sys.stderr)
    return 0
