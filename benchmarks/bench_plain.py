"""Plain greedy decoding at real shapes (random weights, bf16): how close each model path gets to the
weight-read floor (issue 12). Per shape and batch size:

  floor        weight bytes / copy bandwidth measured in this run (a 2 GiB device-to-device copy, read +
               write bytes): the time one decode step needs just to read the weights once
  hf-generate  Hugging Face `generate(cache_implementation="static")`, greedy (transformers compiles its
               forward itself); decode time per step = (t(8 + N new) - t(8 new)) / N, so prefill and
               start-up cancel
  plain        `microspec.baseline.PlainDecoder(backend="hf")` (Hugging Face layers, static cache, CUDA graph)
  lean-eager   the lean backend (`microspec.models.lean`), uncompiled, one decode step in a CUDA graph
  lean         the lean backend with `compile=True`, one decode step (forward + head + argmax + write the
               next token) captured in a CUDA graph and replayed: the backend's own cost
  plain-lean   `PlainDecoder(backend="lean", compile=True)`: the engine's whole plain step (EOS, budget,
               bookkeeping) on the lean backend, CUDA graph: the baseline every speed-up is measured against

Also: head time alone (the LM-head GEMV, weights rotated beyond L2 as inside a step), per-layer µs =
(step time - head time) / layers, and CUDA kernels per decode step (profiler, uncaptured step). Results are
printed and saved to benchmarks/results/plain_<date>_<time>.json after every row.

    python benchmarks/bench_plain.py                                   # all shapes, batch 1 and 8 (H200)
    python benchmarks/bench_plain.py --shapes smollm2-135m --batch 1 --methods lean,plain
    python benchmarks/bench_plain.py --smoke                           # tiny shapes on the CPU

Compilation (the HF forward and the lean layers, once per shape and batch size) dominates the first run;
Inductor's on-disk cache shortens later ones.
"""
from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch
import torch._dynamo
from transformers import (Gemma3ForCausalLM, Gemma3TextConfig, LlamaConfig, LlamaForCausalLM, Qwen2Config,
                          Qwen2ForCausalLM)

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from benchmarks.common import copies_beyond_l2, copy_bandwidth, environment, run_stamp, save, time_us_rotating
from benchmarks.shapes import SHAPES, build_spec
from microspec.baseline import PlainDecoder
from microspec.timing import timed
from microspec.models.select import make_backend

GEMMA3_270M_LAYERS = ["sliding_attention" if (i + 1) % 6 else "full_attention" for i in range(18)]
PLAIN_SHAPES = {   # name: (config class, model class, config kwargs); the last three come from shapes.py
    "smollm2-135m": (LlamaConfig, LlamaForCausalLM, dict(
        hidden_size=576, intermediate_size=1536, num_hidden_layers=30, num_attention_heads=9,
        num_key_value_heads=3, vocab_size=49152, tie_word_embeddings=True, rope_theta=100000.0,
        rms_norm_eps=1e-5)),
    "gemma3-270m": (Gemma3TextConfig, Gemma3ForCausalLM, dict(
        hidden_size=640, intermediate_size=2048, num_hidden_layers=18, num_attention_heads=4,
        num_key_value_heads=1, head_dim=256, vocab_size=262144, sliding_window=512,
        layer_types=GEMMA3_270M_LAYERS, query_pre_attn_scalar=256, tie_word_embeddings=True)),
    "qwen2.5-0.5b": SHAPES["qwen2.5-0.5b"],
    "llama3.2-1b": SHAPES["llama3.2-1b"],
    "qwen2.5-1.5b": SHAPES["qwen2.5-1.5b"],
}
SMOKE_SHAPES = {   # tiny stand-ins of each family for CPU runs of this script
    "tiny-llama": SHAPES["tiny-llama"],
    "tiny-qwen2": (Qwen2Config, Qwen2ForCausalLM, dict(
        hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, vocab_size=3000)),
    "tiny-gemma3": (Gemma3TextConfig, Gemma3ForCausalLM, dict(
        hidden_size=64, intermediate_size=128, num_hidden_layers=3, num_attention_heads=4,
        num_key_value_heads=1, head_dim=32, vocab_size=3000, sliding_window=8, query_pre_attn_scalar=32,
        layer_types=["sliding_attention", "sliding_attention", "full_attention"])),
}
METHODS = ("hf-generate", "plain", "lean-eager", "lean", "plain-lean")
EXTRA_METHODS = ("plain-compile",)     # PlainDecoder(compile=True): one more HF compile per shape and batch
CUDA = torch.cuda.is_available()


def weight_bytes(model: torch.nn.Module) -> int:
    """Bytes one decode step must read: every parameter once (tied embeddings counted once), except an input
    embedding separate from the head (a step reads only B of its rows). KV-cache reads are left out (about 2%
    of the weights at these shapes, B = 8, 320 slots)."""
    total = sum(p.numel() * p.element_size() for p in model.parameters())
    embed, head = model.get_input_embeddings().weight, model.get_output_embeddings().weight
    if embed.data_ptr() != head.data_ptr():
        total -= embed.numel() * embed.element_size()
    return total


def sync() -> None:
    if CUDA:
        torch.cuda.synchronize()


def elapsed_s(fn) -> float:
    """Seconds of fn() (`microspec.timing.timed`: CUDA events on a GPU, wall clock on a CPU)."""
    return timed(fn)[0]


def prompt(B: int, L: int, vocab: int, device) -> torch.Tensor:
    return torch.randint(3, vocab, (B, L), generator=torch.Generator().manual_seed(0)).to(device)


def hf_generate_step_s(model, ids, new: int, reps: int) -> float:
    """Seconds per decode step of HF static-cache greedy `generate` (difference of a long and a short run)."""
    kw = dict(attention_mask=torch.ones_like(ids), do_sample=False, cache_implementation="static",
              eos_token_id=None, pad_token_id=0)
    short = 8

    def run(n):
        return elapsed_s(lambda: model.generate(ids, max_new_tokens=n, min_new_tokens=n, **kw))
    run(short + new)                                              # warm-up: transformers compiles here
    run(short)
    t_long = statistics.median(run(short + new) for _ in range(reps))
    t_short = statistics.median(run(short) for _ in range(reps))
    return (t_long - t_short) / new


def plain_step_s(model, ids, new: int, compile: bool = False, backend: str = "hf") -> float:
    """Seconds per decode step of `PlainDecoder` after its CUDA graph is captured (second run: warm)."""
    dec = PlainDecoder(model, compile=compile, backend=backend)
    B = ids.shape[0]
    for _ in range(2):
        t = elapsed_s(lambda: dec.generate(ids, torch.ones_like(ids), max_new_tokens=new, eos_token_id=[]))
    if dec.steady_state is None:                                  # CPU: no graph, whole generate
        return t / new
    tokens, seconds = dec.steady_state
    return seconds / (tokens / B)


class LeanGreedy:
    """Greedy decoding on a lean backend: one step = forward of the current token at its position, head,
    argmax, then the new token and position written into the step's own input buffers (so a captured step
    replays on its own)."""

    def __init__(self, model, ids: torch.Tensor, new: int, compile: bool):
        self.lm = make_backend(model, "lean", compile=compile)
        B, L = ids.shape
        self.lm.allocate(B, L + new + 1)
        self.L = L
        with torch.inference_mode():
            hidden = self.lm.forward(ids, torch.arange(L, device=ids.device).expand(B, L), eager=True)
            first = self.lm.logits(hidden[:, -1:]).argmax(-1)                      # [B, 1]
        self.token = first.clone()
        self.position = torch.full((B, 1), L, dtype=torch.long, device=ids.device)
        self.hidden = hidden[:, -1:].clone()                          # [B, 1, D], for timing the head alone

    def step(self) -> None:
        hidden = self.lm.forward(self.token, self.position)
        self.token.copy_(self.lm.logits(hidden).argmax(-1))
        self.position.add_(1)

    def rewind(self) -> None:
        self.position.fill_(self.L)                                 # the next steps overwrite the same slots


def lean_step_s(gen: LeanGreedy, new: int, reps: int) -> float:
    """Seconds per step: `new` replays of a CUDA graph holding one step (eager steps on a CPU), median of
    `reps` repeats."""
    with torch.inference_mode():
        run = gen.step
        if CUDA:
            side = torch.cuda.Stream()
            side.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(side):                 # compilation and allocator warm-up off the capture
                for _ in range(3):
                    gen.step()
            torch.cuda.current_stream().wait_stream(side)
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph):
                gen.step()
            run = graph.replay
        else:
            gen.step()
        times = []
        for _ in range(reps):
            gen.rewind()
            times.append(elapsed_s(lambda: [run() for _ in range(new)]) / new)
        return statistics.median(times)


def head_s(gen: LeanGreedy) -> float:
    """Seconds of the LM head alone on [B, 1, D] (copies of its weight rotated so none is read from L2)."""
    weight = gen.lm.head.weight
    if not CUDA:
        return elapsed_s(lambda: gen.lm.logits(gen.hidden))
    copies = [weight.clone() for _ in range(copies_beyond_l2(weight.numel() * weight.element_size(), cap=8))]
    fns = [lambda w=w: torch.nn.functional.linear(gen.hidden, w) for w in copies]
    with torch.inference_mode():
        us = time_us_rotating(fns, calls=4 * len(fns), reps=10)
    del copies
    return us * 1e-6


def kernels_per_step(step) -> int | None:
    """Device operations (kernels, memsets, copies) one uncaptured call of `step` launches, from the profiler;
    None off CUDA or if unavailable."""
    if not CUDA:
        return None
    try:
        from torch.profiler import ProfilerActivity, profile
        with torch.inference_mode():
            step()
            sync()
            with profile(activities=[ProfilerActivity.CUDA]) as prof:
                step()
                sync()
        return sum(1 for e in prof.events() if e.device_type == torch.autograd.DeviceType.CUDA)
    except Exception as err:   # profiling is diagnostic only: never lose the timings for it
        print(f"  (kernel count unavailable: {err})", flush=True)
        return None


def hf_backend_step(model, ids, new: int):
    """One decode step through the Hugging Face backend (`make_backend(..., "hf")`), for its kernel count."""
    lm = make_backend(model, "hf")
    B, L = ids.shape
    lm.allocate(B, L + new + 1)
    with torch.inference_mode():
        lm.forward(ids, torch.arange(L, device=ids.device).expand(B, L), eager=True)
    token, position = ids[:, -1:].clone(), torch.full((B, 1), L, dtype=torch.long, device=ids.device)
    return lambda: lm.logits(lm.forward(token, position)).argmax(-1)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--shapes", default=None, help=f"comma-separated, from {', '.join(PLAIN_SHAPES)}")
    ap.add_argument("--batch", default="1,8")
    ap.add_argument("--methods", default=",".join(METHODS),
                    help=f"comma-separated, from {', '.join(METHODS + EXTRA_METHODS)}")
    ap.add_argument("--prompt-len", type=int, default=256)
    ap.add_argument("--new-tokens", type=int, default=64, help="decode steps timed per repeat")
    ap.add_argument("--reps", type=int, default=5, help="repeats; the median is reported")
    ap.add_argument("--smoke", action="store_true", help="tiny shapes, float32, on the CPU")
    ap.add_argument("--out", type=Path, default=None)
    args = ap.parse_args(argv)
    if not args.smoke and not CUDA:
        ap.error("needs a CUDA device (or --smoke)")
    device, dtype = ("cpu", torch.float32) if args.smoke else ("cuda", torch.bfloat16)
    shapes = SMOKE_SHAPES if args.smoke else PLAIN_SHAPES
    if args.shapes:
        shapes = {name: shapes[name] for name in args.shapes.split(",")}
    methods = args.methods.split(",")
    unknown = set(methods) - set(METHODS + EXTRA_METHODS)
    if unknown:
        ap.error(f"unknown methods {sorted(unknown)}")
    L, new, reps = (16, 8, 2) if args.smoke else (args.prompt_len, args.new_tokens, args.reps)
    torch._dynamo.config.cache_size_limit = 64
    bandwidth = copy_bandwidth(2 << 30)
    env, stamp, rows = environment(), run_stamp(), []
    print(f"{env['device']}  torch {env['torch']}  transformers {env['transformers']}  "
          f"copy bandwidth {bandwidth / 1e12:.2f} TB/s (read + write)", flush=True)

    def write() -> Path:
        return save("plain", dict(env=env, command=" ".join(sys.argv), copy_bandwidth=bandwidth, prompt_len=L,
                                  new_tokens=new, reps=reps, dtype=str(dtype), rows=rows), args.out, stamp)

    def record(row: dict) -> None:         # saved after every row: a time limit keeps what was measured
        rows.append(row)
        if not args.smoke or args.out:
            write()

    for name, spec in shapes.items():
        t_build = time.perf_counter()
        model = build_spec(spec, device, dtype)
        layers = model.config.num_hidden_layers
        nbytes = weight_bytes(model)
        floor = nbytes / bandwidth
        print(f"\n{name}: {layers} layers, {nbytes / 1e9:.3f} GB of weights, floor "
              f"{floor * 1e6:.1f} µs/step", flush=True)
        for B in map(int, args.batch.split(",")):
            ids = prompt(B, L, model.config.vocab_size, device)
            gen = LeanGreedy(model, ids, new, compile=False)
            head = head_s(gen)
            base = dict(shape=name, batch=B, layers=layers, weight_bytes=nbytes, floor_us=floor * 1e6,
                        head_us=head * 1e6)
            print(f"  B={B}  head alone {head * 1e6:8.1f} µs", flush=True)
            for method in methods:
                t0 = time.perf_counter()
                kernels = None
                if method == "hf-generate":
                    step = hf_generate_step_s(model, ids, new, reps)
                elif method == "plain-lean":
                    step = plain_step_s(model, ids, new, compile=CUDA, backend="lean")
                elif method in ("plain", "plain-compile"):
                    step = plain_step_s(model, ids, new, compile=method == "plain-compile" and CUDA)
                    if method == "plain":
                        kernels = kernels_per_step(hf_backend_step(model, ids, new))
                else:
                    g = gen if method == "lean-eager" else LeanGreedy(model, ids, new, compile=CUDA)
                    step = lean_step_s(g, new, reps)
                    g.rewind()
                    kernels = kernels_per_step(g.step)
                row = dict(base, method=method, step_us=step * 1e6, tok_s=B / step, x_floor=step / floor,
                           layer_us=(step - head) / layers * 1e6, kernels_per_step=kernels,
                           wall_s=time.perf_counter() - t0)
                record(row)
                k = "" if kernels is None else f"  {kernels:5d} kernels/step ({kernels / layers:.0f}/layer)"
                print(f"  B={B}  {method:11s} {row['tok_s']:9.1f} tok/s  {row['step_us']:8.1f} µs/step  "
                      f"{row['x_floor']:5.2f}x floor  {row['layer_us']:6.1f} µs/layer{k}  "
                      f"[{row['wall_s']:.0f} s]", flush=True)
            del gen
        del model
        torch.cuda.empty_cache() if CUDA else None
        print(f"  ({time.perf_counter() - t_build:.0f} s for {name})", flush=True)
    if rows and (not args.smoke or args.out):
        print(f"\nwrote {write()}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
