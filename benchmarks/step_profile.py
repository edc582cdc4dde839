"""Where a decode step's time goes: kernels and device time per stage, for plain and speculative decoding.

    python benchmarks/step_profile.py --model GGUF --name gemma3-270m --eagle checkpoints/eagle-gemma3-270m \\
        --configs plain eagle2:10,6,60 microspec:10,6,60 microspec:4,4,16 microspec:chain4 --out DIR
    python benchmarks/step_profile.py --shape gemma3-270m --configs ...      # random weights, untrained head

For each config (method[:tree]; tree = TOPK,DEPTH,TOKENS or chainK) it decodes the first prepared prompt of
`benchmarks/real_e2e.py` (batch 1, greedy, or T = 1 with --sample; with --shape: random weights at a
`bench_plain.py` shape, a random 256-token prompt and an untrained head: the step's cost does not depend on
the weights) to mid-request, then
  * times the captured step (CUDA-graph replays, CUDA events): `step_us`, the number that decides speed;
  * profiles one eager step (same compiled kernels, launched one by one) with each stage wrapped in a
    `record_function` label, and reports per stage the kernels launched and their summed device time.
The gap between `step_us` and the summed kernel time is what a graph still pays between kernels (launch
latency, dependencies); kernels x ~2-4 us is the floor a latency-bound step cannot go under.

Stages: policy (active set), refresh (head delta-gather), draft.layer / draft.head / draft.tree (the
proposer's model calls, head and tree bookkeeping), observe (the proposer's), target (forward of the block),
logits, verify, commit (bookkeeping), policy.update (the policy's `on_block` / `on_commit`) and policy.topk
(the target's top-k they take); "other" is the step's own code between them (block assembly, bad-logit
checks, the tree's K/V moves).
"""
from __future__ import annotations

import argparse
import sys
from collections import defaultdict
from contextlib import contextmanager
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from benchmarks.common import environment, save  # noqa: E402
from benchmarks.real_e2e import INPUTS, make_policy  # noqa: E402

STAGES = ("policy", "refresh", "draft.layer", "draft.head", "draft.tree", "observe", "target", "logits",
          "verify", "commit", "policy.update", "policy.topk")


def parse_config(text: str):
    """"plain" | "METHOD" | "METHOD:TOPK,DEPTH,TOKENS" | "METHOD:chainK" -> (method, TreeSpec | None, K)."""
    from microspec.drafting.tree import TreeSpec
    method, _, shape = text.partition(":")
    if method == "plain" or not shape:
        return method, None, 5
    if shape.startswith("chain"):
        return method, None, int(shape[5:])
    return method, TreeSpec(*(int(p) for p in shape.split(","))), 5


def _wrap(obj, name: str, label: str) -> None:
    """Replace obj.name (a bound method or callable attribute) by one that runs under `label`."""
    fn = getattr(obj, name)

    def wrapped(*args, **kwargs):
        with torch.profiler.record_function(label):
            return fn(*args, **kwargs)
    setattr(obj, name, wrapped)


def label_stages(run) -> None:
    """Wrap the run's parts so every stage of `run.step()` runs under its label (instance attributes only:
    the classes are untouched)."""
    prop = run.proposer
    _wrap(run.policy, "active", "policy")
    if prop.head is not None:
        _wrap(prop.head, "refresh", "refresh")
    for name, label in (("run_layer", "draft.layer"), ("_logits", "draft.head"), ("_tree_logp", "draft.head"),
                        ("observe", "observe")):       # _logits: chains; _tree_logp: tree levels
        if hasattr(prop, name):
            _wrap(prop, name, label)
    builder = getattr(prop, "builder", None)
    if builder is not None:
        for name in ("root", "expand", "finish"):
            _wrap(builder, name, "draft.tree")
    _wrap(run.target, "forward", "target")
    _wrap(run.target, "logits", "logits")
    _wrap(run, "_verify", "verify")                    # the verifier as the step calls it
    _wrap(run, "_commit", "commit")
    _wrap(run, "_update_policy", "policy.update")      # inside commit: the policy's hooks ...
    _wrap(run, "_target_topk", "policy.topk")          # ... and the target's top-k they take


# Ops that launch no kernel (metadata only): left out of the op counts.
_NO_KERNEL = {"view", "as_strided", "slice", "select", "expand", "unsqueeze", "squeeze", "empty", "reshape",
              "t", "transpose", "permute", "detach", "alias", "_unsafe_view", "lift_fresh", "empty_strided",
              "resolve_conj", "resolve_neg", "_reshape_alias", "unbind", "split", "narrow", "expand_as",
              "view_as", "flatten", "unflatten", "chunk", "empty_like", "result_type", "_to_copy"}


def stage_table(prof) -> dict:
    """{stage: {"kernels": n, "device_us": t, "ops": m}} from a profile of one step: each kernel (and each
    leaf aten op that launches one: the op count, what a CPU profile can tell) counts for the innermost label
    around the op that launched it ("other" when none)."""
    out = defaultdict(lambda: {"kernels": 0, "device_us": 0.0, "ops": 0})
    top = defaultdict(float)

    def visit(evt, label):
        if evt.name in STAGES:
            label = evt.name
        if (not evt.cpu_children and evt.name.startswith("aten::")
                and evt.name[6:] not in _NO_KERNEL):
            out[label]["ops"] += 1
        for k in getattr(evt, "kernels", []):
            out[label]["kernels"] += 1
            out[label]["device_us"] += k.duration
            top[(label, k.name[:60])] += k.duration
        for child in evt.cpu_children:
            visit(child, label)
    for evt in prof.events():
        if evt.cpu_parent is None:
            visit(evt, "other")
    heavy = sorted(top.items(), key=lambda kv: -kv[1])[:12]
    return {"stages": dict(out), "top_kernels": [(s, n, round(t, 1)) for (s, n), t in heavy]}


@contextmanager
def profiled(cuda: bool):
    from torch.profiler import ProfilerActivity, profile
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])
    if cuda:
        torch.cuda.synchronize()
    with profile(activities=activities) as prof:
        yield prof
        if cuda:
            torch.cuda.synchronize()


def graph_step_us(run, steps: int) -> float:
    """Mean µs of `steps` graph replays (no sync between them)."""
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(steps):
        run.draw_noise()
        run.graph.replay()
    end.record()
    end.synchronize()
    return start.elapsed_time(end) * 1e3 / steps


def profile_config(text, target, eagle, ranking, ids, args) -> dict:
    from microspec import SpecDecoder
    from microspec.baseline import NoDraft, PlainDecoder
    from microspec.engine import DecodeRun, EngineParts
    from microspec.sampling import SamplingConfig
    method, tree, K = parse_config(text)
    mask = torch.ones_like(ids, dtype=torch.bool)
    cuda = ids.device.type == "cuda"
    gen = torch.Generator(device=ids.device).manual_seed(0) if args.sample else None
    if method == "plain":   # PlainDecoder's run, built here to keep it (generate does not hand it out)
        lm = PlainDecoder(target, compile=cuda).lm
        parts = EngineParts(lm, NoDraft(), make_policy("eagle2", ranking), lm.vocab_size)
        run = DecodeRun(parts, ids, mask, args.new, SamplingConfig(do_sample=args.sample), [], gen,
                        cuda_graph=cuda)
    else:
        dec = SpecDecoder(target, eagle, make_policy(method, ranking), K, tree=tree, compile=cuda)
        run, _, _ = dec.new_run(ids, mask, args.new, do_sample=args.sample, eos_token_id=None, generator=gen,
                                cuda_graph=cuda)
    with torch.inference_mode():
        run.start()
        step_us = float("nan")
        if cuda:
            run.capture()
            for _ in range(args.warm):            # into the request, and every shape compiled
                run.draw_noise()
                run.graph.replay()
            step_us = graph_step_us(run, args.steps)
        tokens = run.summary().tokens_per_step
        label_stages(run)
        run.draw_noise()                       # sampling: fresh noise before every step (a no-op if greedy)
        run.step()                             # first eager step after wrapping (allocator warm-up)
        run.draw_noise()
        with profiled(cuda) as prof:
            run.step()
    table = stage_table(prof)
    kernels = sum(s["kernels"] for s in table["stages"].values())
    ops = sum(s["ops"] for s in table["stages"].values())
    device = sum(s["device_us"] for s in table["stages"].values())
    return {"config": text, "step_us": step_us, "tokens_per_step": tokens, "kernels": kernels,
            "ops": ops, "kernel_us": device, "us_per_token": step_us / max(tokens, 1e-9), **table}


def print_row(r) -> None:
    print(f"\n== {r['config']}: step {r['step_us']:.0f} us (graph), {r['tokens_per_step']:.2f} tokens/step "
          f"-> {r['us_per_token']:.0f} us/token; {r['kernels']} kernels ({r['ops']} ops), "
          f"{r['kernel_us']:.0f} us of kernel time")
    for stage, s in sorted(r["stages"].items(), key=lambda kv: (-kv[1]["device_us"], -kv[1]["ops"])):
        print(f"   {stage:<13} {s['kernels']:5d} kernels {s['ops']:5d} ops {s['device_us']:9.1f} us")
    for stage, name, t in r["top_kernels"][:8]:
        print(f"      {t:8.1f} us  {stage:<11} {name}")


def load(args, device: str):
    """(target, EAGLE head, prompt ids [1, L], frequency ranking, name) from a GGUF + prepared inputs, or
    random weights at a shape."""
    from microspec.drafting.eagle import EagleDrafter
    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    if args.shape:
        from benchmarks.bench_plain import PLAIN_SHAPES, SMOKE_SHAPES
        from benchmarks.shapes import build_spec
        target = build_spec({**PLAIN_SHAPES, **SMOKE_SHAPES}[args.shape], device, dtype)
        V = target.config.vocab_size
        eagle = (EagleDrafter.from_pretrained(args.eagle, target) if args.eagle
                 else EagleDrafter.from_target(target, seed=0))
        g = torch.Generator().manual_seed(0)
        ids = torch.randint(3, V, (1, min(256, args.new)), generator=g).to(device)
        return target, eagle, ids, torch.randperm(V, generator=g), args.shape
    if not (args.model and args.name and args.eagle):
        raise SystemExit("give --model, --name and --eagle (or --shape)")
    from microspec.models import load_gguf
    data = torch.load(INPUTS / f"{args.name}.pt")
    target, _ = load_gguf(args.model, dtype, device)
    eagle = EagleDrafter.from_pretrained(args.eagle, target)
    return target, eagle, torch.tensor([data["rows"][0]], device=device), data["ranking"], args.name


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", help="the target's GGUF file")
    p.add_argument("--name", help="benchmarks/real_e2e/<name>.pt (prompts, ranking)")
    p.add_argument("--eagle", help="the trained head (default: an untrained one, with --shape)")
    p.add_argument("--shape", help="instead of --model/--name: random weights at a bench_plain.py shape "
                                   "(tiny-llama, tiny-gemma3, ...: CPU smoke runs)")
    p.add_argument("--configs", nargs="+", default=["plain", "eagle2:10,6,60", "microspec:10,6,60"])
    p.add_argument("--new", type=int, default=1024, help="budget: the timed steps must stay inside it")
    p.add_argument("--warm", type=int, default=20, help="graph replays before timing")
    p.add_argument("--steps", type=int, default=30, help="graph replays timed")
    p.add_argument("--sample", action="store_true", help="temperature-1 sampling instead of greedy decoding")
    p.add_argument("--out", type=Path, default=None)
    args = p.parse_args(argv)
    device = "cuda" if torch.cuda.is_available() else "cpu"     # CPU: a smoke run (op counts, no times)
    target, eagle, ids, ranking, name = load(args, device)
    result = {"env": environment(), "command": " ".join(sys.argv), "sample": args.sample, "rows": []}
    for text in args.configs:
        row = profile_config(text, target, eagle, ranking, ids, args)
        result["rows"].append(row)
        print_row(row)
        save(f"step_profile_{name}{'_sample' if args.sample else ''}", result, args.out)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
