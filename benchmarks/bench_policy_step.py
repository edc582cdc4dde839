"""The in-context policy's per-step work at a real model's shape: the target's top-k and the policy hooks.

    python benchmarks/bench_policy_step.py --name gemma3-270m --vocab 262144 --nodes 17 --batch 1 8
    python benchmarks/bench_policy_step.py --smoke            # CPU, tiny shapes: checks the script only

Every in-context policy of `benchmarks/real_e2e.py` (MicroSpec's recipe, "ours") pays, per decode step, a
top-k over the verification block's logits [B, N+1, V] and one or two insertions into its slot table. The
real-weight run 16 put that at ~170-200 µs of a 1.5 ms Gemma-3-270M step (issue 15 asks for <= 5 %). This
times each piece as CUDA-graph replays, the old way and the new way side by side (same process, same inputs):

    topk.torch    torch.topk(logits, k) (the engine until 2026-12-01)
    topk.kernel   microspec.kernels.row_topk (two Triton passes)
    hooks.two     compiled on_block + on_commit (two insertions)
    hooks.one     compiled on_step (one insertion; what the engine calls now)
    before        topk.torch + hooks.two, as the old step ran them
    after         topk.kernel + hooks.one, as `DecodeRun._update_policy` runs them now

The logits rotate through enough copies to exceed the L2 cache (a pessimistic read: in a real step the LM
head has just written them). `floor` is the top-k's read of those logits at the measured copy bandwidth.
The policy starts from a real prompt of `real_e2e.py prepare` (its set then holds the core, the prompt and
its top-k) and the hook inputs are random ids of the step's shapes: every op has a static shape, so the
time does not depend on which ids arrive.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from benchmarks.common import copies_beyond_l2, copy_bandwidth, environment, save, time_us_rotating  # noqa: E402
from benchmarks.real_e2e import INPUTS, make_policy  # noqa: E402


def hook_inputs(B: int, V: int, nodes: int, depth: int, k: int, dev, seed: int = 0) -> dict:
    """A verification step's hook inputs: block [B, N+1] and its top-k, a committed path of depth+1 tokens."""
    g = torch.Generator().manual_seed(seed)
    block = torch.randint(0, V, (B, nodes), generator=g)
    block_topk = torch.randint(0, V, (B, nodes, k), generator=g)
    M = depth + 1
    return {name: t.to(dev) for name, t in dict(
        block_ids=block, block_mask=torch.ones(B, nodes, dtype=torch.bool), block_topk=block_topk,
        committed=torch.randint(0, V, (B, M), generator=g), mask=torch.ones(B, M, dtype=torch.bool),
        topk=block_topk[:, :M]).items()}


def start_policy(method: str, name: str, B: int, V: int, k: int, dev):
    """The method's policy after a real prompt's prefill (random target top-k at the prompt's positions)."""
    saved = torch.load(INPUTS / f"{name}.pt") if (INPUTS / f"{name}.pt").exists() else None
    ranking = saved["ranking"].long() if saved else torch.arange(V)
    prompt = torch.tensor(saved["rows"][0]) if saved else torch.randint(0, V, (64,))
    policy = make_policy(method, ranking[ranking < V])
    policy.setup(B, V, [1], dev)
    ids = prompt[prompt < V].to(dev).expand(B, -1)
    policy.on_prefill(ids, torch.ones_like(ids, dtype=torch.bool),
                      torch.randint(0, V, (*ids.shape, k), device=dev))
    return policy


def measure(method: str, args, B: int, dev, bandwidth: float) -> dict:
    from microspec.compiling import compiled
    from microspec.kernels import row_topk
    V, nodes, k = args.vocab, args.nodes, 3
    policy = start_policy(method, args.name, B, V, k, dev)
    x = hook_inputs(B, V, nodes, args.depth, k, dev)
    nbytes = B * nodes * V * 2
    logits = [torch.randn(B, nodes, V, device=dev, dtype=torch.bfloat16)
              for _ in range(copies_beyond_l2(nbytes) if dev.type == "cuda" else 1)]
    compile_ = dev.type == "cuda" and not args.no_compile
    on_block, on_commit, on_step = (compiled(f, compile_) for f in (policy.on_block, policy.on_commit,
                                                                     policy.on_step))
    path = torch.arange(args.depth + 1, device=dev).expand(B, -1)

    def topk_torch(i):
        return torch.topk(logits[i], k, dim=-1).indices

    def topk_kernel(i):
        return row_topk(logits[i], k)

    def hooks_two(block_topk=x["block_topk"]):
        on_block(x["block_ids"], x["block_mask"], block_topk)
        on_commit(x["committed"], x["mask"], block_topk.gather(1, path.unsqueeze(-1).expand(-1, -1, k)))

    def hooks_one(block_topk=x["block_topk"]):
        on_step(x["committed"], x["mask"], block_topk.gather(1, path.unsqueeze(-1).expand(-1, -1, k)),
                block_ids=x["block_ids"], block_mask=x["block_mask"], block_topk=block_topk)

    def rotating(fn):   # one closure per logits copy, round robin
        return time_us_rotating([lambda i=i: fn(i) for i in range(len(logits))], calls=len(logits) * 4)

    row = dict(method=method, batch=B, vocab=V, nodes=nodes, active=float(policy.n_active.float().mean()),
               floor_us=nbytes / (bandwidth / 2) * 1e6)        # read only: half of a copy's traffic
    row["topk.torch"] = rotating(topk_torch)
    row["topk.kernel"] = rotating(topk_kernel)
    row["hooks.two"] = time_us_rotating([hooks_two], calls=16)
    row["hooks.one"] = time_us_rotating([hooks_one], calls=16)
    row["before"] = rotating(lambda i: hooks_two(topk_torch(i)))
    row["after"] = rotating(lambda i: hooks_one(topk_kernel(i)))
    same = torch.equal(logits[0].float().gather(-1, topk_kernel(0)), torch.topk(logits[0].float(), k).values)
    row["topk_values_equal"] = bool(same)
    return row


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--name", default="gemma3-270m", help="prepared inputs of real_e2e.py (prompt, ranking)")
    ap.add_argument("--vocab", type=int, default=262144)
    ap.add_argument("--nodes", type=int, default=17, help="verification block width N + 1 (tree 4,4,16: 17)")
    ap.add_argument("--depth", type=int, default=4, help="committed path length - 1 (a full-depth accept)")
    ap.add_argument("--batch", type=int, nargs="+", default=[1, 8])
    ap.add_argument("--methods", nargs="+", default=["microspec", "ours"])
    ap.add_argument("--no-compile", action="store_true")
    ap.add_argument("--smoke", action="store_true", help="CPU, vocabulary 512: checks the script only")
    ap.add_argument("--out", type=Path, default=None)
    args = ap.parse_args(argv)
    if args.smoke:
        args.vocab, args.batch, args.no_compile = 512, [2], True
    elif not torch.cuda.is_available():
        print("bench_policy_step needs CUDA (or --smoke)", file=sys.stderr)
        return 1
    dev = torch.device("cuda" if torch.cuda.is_available() and not args.smoke else "cpu")
    bandwidth = copy_bandwidth() if dev.type == "cuda" else 1e12
    rows = []
    cols = ("topk.torch", "topk.kernel", "floor_us", "hooks.two", "hooks.one", "before", "after")
    print(f"{'method':10} {'B':>2} {'active':>7} " + " ".join(f"{c:>11}" for c in cols) + "  (µs)")
    with torch.inference_mode():
        for method in args.methods:
            for B in args.batch:
                r = measure(method, args, B, dev, bandwidth)
                rows.append(r)
                print(f"{method:10} {B:2d} {r['active']:7.0f} " + " ".join(f"{r[c]:11.1f}" for c in cols)
                      + ("" if r["topk_values_equal"] else "  TOP-K MISMATCH"))
    if not args.smoke:
        payload = dict(env=environment(), command=" ".join(sys.argv), copy_bandwidth_Bps=bandwidth, rows=rows)
        print(f"wrote {save('policy_step', payload, args.out)}")
    return 0 if all(r["topk_values_equal"] for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
