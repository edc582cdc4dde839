"""Real end-to-end speed: real weights, a trained EAGLE head, held-out prompts, every method in one run.

Two steps, so the GPU machine needs neither the shared data folder nor the tokenizers' corpora:

    python benchmarks/real_e2e.py prepare --model smollm2 --name smollm2            # CPU, writes inputs
    python benchmarks/real_e2e.py prepare --model /path/gemma-3-270m-q4_k_m.gguf --name gemma3-270m
    python benchmarks/real_e2e.py run --model GGUF --name smollm2 --eagle checkpoints/eagle-smollm2 \\
        --batch 1 8 --modes greedy sample                                            # H200

`prepare` writes benchmarks/real_e2e/<name>.pt: the held-out prompts (`PROMPTS`: Spec-Bench categories,
MT-bench, HumanEval, GSM8K test; none is used to train a head or fit a frequency list) encoded with the
model's own tokenizer (chat template when the model has one; a plain "text\\n\\n" prompt for base models),
and the frequency ranking of the fitting corpora (`microspec.lab.policy_labels.frequency_ranking`) for the
FR-Spec lists. `run` decodes every prompt with every method and prints one table; the JSON result holds
pooled figures per method, batch size and mode, with per-batch entries (each with its batch's tasks), the
command, the device and the date.

Methods (`METHODS`): Hugging Face `generate` with a static cache; plain decoding on microspec's backend
(the baseline); EAGLE-2 (the trained head, dense LM head, dynamic tree); FR-Spec (static lists of 32k and
8k ids, same tree); MicroSpec's recipe (prompt ∪ target top-3 ∪ tree ids, no core, grow-only to 3,072);
and microspec's own policy. Figures: decode tokens/s after warm-up (CUDA-graph capture excluded), speed-up
over plain and over EAGLE-2, accepted length, draft / verify / policy-update time per step (graph replays
of the same run's parts), mean active rows, coverage, and for greedy whether each row equals plain greedy
decoding (with the target's top-2 gap at any divergence: bf16 near-ties).
"""
from __future__ import annotations

import argparse
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from benchmarks.common import copy_bandwidth, environment, run_stamp, save, time_us_rotating  # noqa: E402
from microspec.timing import timed  # noqa: E402

INPUTS = Path(__file__).parent / "real_e2e"
# task -> (file under the shared data folder, question ids): held out from every fitting and training set.
PROMPTS = {
    "mt_bench": ("mt_bench/question.jsonl", (82, 91, 101, 121)),
    "translation": ("spec_bench/question.jsonl", (161, 162, 163, 164)),
    "summarization": ("spec_bench/question.jsonl", (268, 275, 277, 280)),
    "qa": ("spec_bench/question.jsonl", (321, 322, 323, 324)),
    "math_reasoning": ("spec_bench/question.jsonl", (401, 402, 403, 404)),
    "rag": ("spec_bench/question.jsonl", (503, 531, 553, 560)),
    "humaneval": ("eagle_bench/humaneval.question.jsonl", (0, 1, 2, 3)),
    "gsm8k": ("eagle_bench/gsm8k.question.jsonl", (0, 1, 2, 3)),
}
METHODS = ("hf", "plain", "eagle2", "frspec32k", "frspec8k", "microspec", "ours")
MAX_PROMPT = 768     # tokens: long Spec-Bench articles are cut from the left (the question stays at the end)


# ---------------------------------------------------------------------------------------------- prepare (CPU)
def encode_prompt(tokenizer, text: str) -> list[int]:
    """`microspec.prompts.encode_prompt` (the chat template, or "text\\n\\n" with BOS for base models, as the
    heads were trained), at most the last MAX_PROMPT ids."""
    from microspec.prompts import encode_prompt as encode
    return encode(tokenizer, text, "auto")[-MAX_PROMPT:]


def prepare(args) -> None:
    import json

    from microspec.inputs import eos_ids_of
    from microspec.lab.policy_labels import frequency_ranking
    from microspec.models import load_model
    from microspec.paths import cache_dir, shared_data_dir
    model, tokenizer = load_model(args.model, torch.float32, "cpu")
    root = shared_data_dir()
    tasks, rows, qids = [], [], []
    for task, (rel, ids) in PROMPTS.items():
        records = {json.loads(line)["question_id"]: json.loads(line) for line in open(root / rel)}
        for qid in ids[: args.per_task]:
            tasks.append(task)
            qids.append(qid)
            rows.append(encode_prompt(tokenizer, records[qid]["turns"][0]))
    ranking, meta = frequency_ranking(tokenizer, args.name,
                                      cache_dir() / "eval" / f"freq_{args.name}.safetensors")
    eos = eos_ids_of(model, tokenizer)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else eos[0]
    INPUTS.mkdir(exist_ok=True)
    path = INPUTS / f"{args.name}.pt"
    torch.save({"tasks": tasks, "question_ids": qids, "rows": rows, "ranking": ranking.to(torch.int32),
                "eos": eos, "pad": int(pad), "source": {t: PROMPTS[t][0] for t in PROMPTS},
                "frequency": {k: str(v) for k, v in meta.items() if k != "cache"}}, path)
    print(f"wrote {path}: {len(rows)} prompts, lengths {min(map(len, rows))}..{max(map(len, rows))}, "
          f"ranking over {len(ranking)} ids")


# ---------------------------------------------------------------------------------------------- run (GPU)
# method -> policy label (`microspec.lab.policy_labels`): the same names mean the same policies in `microspec
# eval` and here.
POLICY_LABELS = {
    "eagle2": "full",
    "frspec32k": "static@32768",
    "frspec8k": "static@8192",
    "microspec": "incontext@3072/k3/tree/grow",     # MicroSpec/NanoSpec: prompt ∪ top-3 ∪ tree ids, grow-only
    "ours": "incontext+core1024@4096/k3/tree/grow",  # issue 15: the recipe plus a pinned 1,024-id core
}


def make_policy(method: str, ranking: torch.Tensor):
    from microspec.lab.policy_labels import policy_from_label
    return policy_from_label(POLICY_LABELS[method], ranking.long())


def batches(n: int, B: int):
    """Prompt indices [0, n) in consecutive batches of (at most) B."""
    for i in range(0, n, B):
        yield list(range(i, min(i + B, n)))


def run_spec(dec, ids, mask, new, do_sample, eos, pad, seed):
    """One batch: (sequences, SpecStats, decode tokens, decode seconds after the graph capture, run)."""
    gens = torch.Generator(device=ids.device).manual_seed(seed) if do_sample else None
    run, input_ids, pad_id = dec.new_run(ids, mask, new, do_sample=do_sample, eos_token_id=eos,
                                         pad_token_id=pad, generator=gens)
    run.start()
    if new > 1 and run.cuda_graph:
        run.capture()
    tokens0 = int(run.generated.sum())
    seconds, _ = timed(run.run_steps)
    return run.sequences(input_ids, pad_id), run.summary(), int(run.generated.sum()) - tokens0, seconds, run


def part_times(dec, run) -> dict:
    """Per-step part times (µs) from graph replays on the finished run's state:
        draft_us   head refresh + the proposer
        policy_us  one compiled `on_commit` of a full block (what earlier runs reported as the policy)
        update_us  the policy's whole per-step work as the step runs it (`DecodeRun._update_policy`): the
                   target's top-k over the block's logits, `on_block` and `on_commit`
    The rest of a step (target forward, verification, K/V moves, bookkeeping) is step - draft - update."""
    from microspec.compiling import compiled
    from microspec.drafting.base import DraftRequest, Verdict
    ids, n_act = dec.policy.active()
    req = DraftRequest(run.tokens, run.n, ids, n_act, run.cfg, getattr(run, "draft_noise", None))

    def draft():
        dec.head.refresh()
        return dec.proposer.propose(req)
    out = {"draft_us": time_us_rotating([draft], calls=8, reps=5)}
    saved = [t.clone() for t in (ids, n_act)]
    k, B, dev = dec.policy.target_topk, run.B, run.device
    M = run.N + 1
    tokens = torch.randint(0, dec.vocab_size, (B, M), device=dev)
    mask = torch.ones_like(tokens, dtype=torch.bool)
    topk = torch.randint(0, dec.vocab_size, (B, M, k), device=dev) if k else None
    on_commit = compiled(dec.policy.on_commit, dec.compile)       # as the engine runs it
    out["policy_us"] = time_us_rotating([lambda: on_commit(tokens, mask, topk)], calls=8, reps=5)
    # A synthetic block of the step's shapes: the drafts, random target logits, a full-depth accepted path.
    drafts = draft()
    depth = int(drafts.depth.max()) if drafts.depth.numel() else 0
    path = torch.arange(depth + 1, device=dev).expand(B, -1)                             # [B, M']
    logits = torch.randn(B, run.N + 1, dec.vocab_size, device=dev, dtype=run.target.dtype)
    hidden = torch.zeros(B, run.N + 1, dec.head.in_features, device=dev, dtype=run.target.dtype)
    verdict = Verdict(torch.full((B,), depth, device=dev), tokens[:, : depth + 1], path)
    block = run.ops.block_inputs(run.tokens, run.n, drafts.tokens, drafts.depth, run.block)[0]     # [B, N+1]
    live, taken = torch.ones(B, dtype=torch.bool, device=dev), torch.ones_like(path, dtype=torch.bool)
    n_commit = torch.full((B,), depth + 1, device=dev)
    out["update_us"] = time_us_rotating(
        [lambda: run._update_policy(verdict, path, drafts, block, logits, hidden, live, taken, n_commit)],
        calls=8, reps=5)
    ids.copy_(saved[0]), n_act.copy_(saved[1])
    return out


def mismatch_gap(model, prompt_row, expected, got):
    """Top-2 logit gap of the target where `got` first leaves `expected` (None when equal)."""
    diff = (expected != got).nonzero()
    if not diff.numel():
        return None
    j = int(diff[0])
    ctx = torch.tensor([prompt_row + expected[:j].tolist()], device=expected.device)
    with torch.inference_mode():
        logits = model(input_ids=ctx).logits[0, -1].float()
    top = logits.topk(2).values
    return float(top[0] - top[1])


@dataclass
class Bench:
    """What every timed method shares: the target, the prompts, the decoders and plain greedy's outputs."""
    args: argparse.Namespace
    target: torch.nn.Module
    rows: list                      # prompt ids, one list per prompt
    tasks: list                     # the task of each prompt
    eos: list
    pad: int
    device: str
    plain: object                   # microspec.baseline.PlainDecoder
    decoders: dict                  # speculative method -> SpecDecoder
    plain_out: dict = field(default_factory=dict)   # (B, prompt index) -> plain greedy's new tokens


def load_inputs(args) -> tuple[list, list, torch.Tensor, list, int]:
    """`prepare`'s prompts (the first --per-task of every task, then the first --limit), their tasks, the
    frequency ranking, the eos ids and the pad id."""
    data = torch.load(INPUTS / f"{args.name}.pt")
    rows, tasks = data["rows"], data["tasks"]
    if args.per_task:   # the first N prompts of every task
        keep = [i for i, t in enumerate(tasks) if tasks[: i].count(t) < args.per_task]
        rows, tasks = [rows[i] for i in keep], [tasks[i] for i in keep]
    if args.limit:
        rows, tasks = rows[: args.limit], tasks[: args.limit]
    return rows, tasks, data["ranking"], data["eos"], data["pad"]


def weight_params(target) -> int:
    """Parameters a decode step reads: all but the input embedding (unless it is tied to the head)."""
    emb = target.get_input_embeddings().weight.data_ptr()
    tied = target.config.tie_word_embeddings
    return sum(p.numel() for p in target.parameters() if p.data_ptr() != emb or tied)


def result_header(args, target, dtype: torch.dtype, tree, device: str) -> dict:
    """The JSON result before any row: environment, command, the device's copy bandwidth and the floor it
    puts on a decode step (every weight read once), the tree and K."""
    bw = copy_bandwidth() if device == "cuda" else float("nan")
    floor = weight_params(target) * dtype.itemsize / bw * 1e6
    return {"env": environment(), "command": " ".join(sys.argv), "name": args.name, "dtype": args.dtype,
            "copy_bandwidth_Bps": bw, "floor_us_per_token": floor,
            "tree": None if tree is None else str(tree), "K": args.K, "rows": []}


def build_decoders(methods, target, eagle, ranking, tree, args) -> dict:
    """One SpecDecoder per speculative method (every method but hf and plain), all on the same EAGLE head."""
    from microspec import SpecDecoder
    decoders = {}
    for method in methods:
        if method in ("hf", "plain"):
            continue
        if eagle is None:
            raise SystemExit(f"{method} needs --eagle")
        decoders[method] = SpecDecoder(target, eagle, make_policy(method, ranking), args.K, tree=tree,
                                       compile=not args.no_compile)
    return decoders


def time_hf(bench: Bench, ids, mask) -> dict:
    """Hugging Face `generate` (greedy, static cache): decode tokens and seconds net of a 2-token run
    (prefill and the first token), each timed after a warm-up of the very same call: transformers compiles
    its static-cache step per prompt length and cache size, so a shorter warm-up would leave the timed run
    compiling."""
    kw = dict(max_new_tokens=bench.args.new, do_sample=False, eos_token_id=bench.eos, pad_token_id=bench.pad,
              cache_implementation="static")

    def generate(**over):
        return bench.target.generate(ids, attention_mask=mask, **{**kw, **over})
    generate(max_new_tokens=2)                              # warm-ups: the timed calls compile nothing
    short, _ = timed(lambda: generate(max_new_tokens=2))
    generate()
    seconds, seqs = timed(generate)
    new = (seqs[:, ids.shape[1]:] != bench.pad).sum().item()
    return {"tokens": new - 2 * len(ids), "seconds": seconds - short}


def time_plain(bench: Bench, ids, mask, warm_up: bool) -> tuple[dict, torch.Tensor]:
    """Plain decoding on microspec's backend: (entry, sequences); steady-state tokens and seconds when the
    decoder reports them (capture excluded)."""
    def go():
        return bench.plain.generate(ids, mask, max_new_tokens=bench.args.new, eos_token_id=bench.eos,
                                    pad_token_id=bench.pad)
    if warm_up:     # first batch of a shape: compile + capture warm-up, then timed
        go()
    secs, seqs = timed(go)
    toks, secs = bench.plain.steady_state or (int(bench.plain.generated.sum()), secs)
    return {"tokens": toks, "seconds": secs}, seqs


def time_spec(bench: Bench, method: str, ids, mask, do_sample: bool, bi: int) -> tuple[dict, torch.Tensor]:
    """One speculative method on batch `bi`: (entry, sequences). The first batch is run once untimed
    (warm-up) and adds the draft / policy-update part times."""
    args, dec = bench.args, bench.decoders[method]
    if bi == 0:
        run_spec(dec, ids, mask, args.new, do_sample, bench.eos, bench.pad, args.seed)   # warm-up
    seqs, stats, toks, secs, r = run_spec(dec, ids, mask, args.new, do_sample, bench.eos, bench.pad,
                                          args.seed + bi)
    entry = {"tokens": toks, "seconds": secs, "steps": stats.num_verify_steps,
             "row_steps": stats.num_row_steps, "accepted_length": stats.mean_accepted_length,
             "active": stats.mean_active_size, "coverage": stats.coverage}
    if bi == 0:
        entry.update(part_times(dec, r))
    return entry, seqs


def compare_to_plain(bench: Bench, B: int, idx: list, new_tokens: torch.Tensor) -> dict:
    """Greedy rows against plain greedy's at the same batch size: rows compared (those with a plain output),
    rows equal, and the target's top-2 gap where a row first diverges."""
    gaps, compared = [], 0
    for j, i in enumerate(idx):
        ref = bench.plain_out.get((B, i))
        if ref is None:
            continue
        compared += 1
        got = new_tokens[j]
        n = min(len(ref), len(got))
        gap = mismatch_gap(bench.target, bench.rows[i], ref[:n], got[:n])
        if gap is not None:
            gaps.append(gap)
    return {"equal_rows": compared - len(gaps), "compared_rows": compared, "tie_gaps": gaps}


def time_batch(bench: Bench, method: str, B: int, do_sample: bool, bi: int, idx: list) -> dict:
    """One method on one batch of prompts (indices `idx`, the `bi`-th batch): its entry. Plain greedy keeps
    its outputs for the speculative methods' comparison."""
    from microspec.prompts import left_pad
    ids, mask = left_pad([bench.rows[i] for i in idx], bench.pad, bench.device)
    if method == "hf":
        return time_hf(bench, ids, mask)
    if method == "plain":
        entry, seqs = time_plain(bench, ids, mask, warm_up=bi == 0)
        if not do_sample:
            for j, i in enumerate(idx):
                bench.plain_out[(B, i)] = seqs[j, ids.shape[1]:]
        return entry
    entry, seqs = time_spec(bench, method, ids, mask, do_sample, bi)
    if not do_sample and bench.plain_out:
        entry.update(compare_to_plain(bench, B, idx, seqs[:, ids.shape[1]:]))
    return entry


def run_method(bench: Bench, method: str, B: int, mode: str) -> dict:
    """One method at batch size B in one mode over all prompts: its pooled row (`summarize`), with the
    per-batch entries (and each batch's tasks) and the wall-clock seconds of the whole pass."""
    args = bench.args
    t_method = time.perf_counter()
    entries = []
    for bi, idx in enumerate(batches(len(bench.rows), B)):
        if method == "hf" and args.hf_limit and idx[0] >= args.hf_limit:
            break       # transformers compiles its static-cache step again for every length
        entry = time_batch(bench, method, B, mode == "sample", bi, idx)
        entries.append({**entry, "tasks": sorted({bench.tasks[i] for i in idx})})
    row = summarize(method, B, mode, entries)
    row["wall_s"] = time.perf_counter() - t_method
    return row


def run(args) -> None:
    from microspec.baseline import PlainDecoder
    from microspec.drafting.eagle import EagleDrafter
    from microspec.drafting.tree import TreeSpec
    from microspec.models import load_gguf
    dtype = {"bfloat16": torch.bfloat16, "float32": torch.float32}[args.dtype]
    rows, tasks, ranking, eos, pad = load_inputs(args)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    target, _ = load_gguf(args.model, dtype, device)
    eagle = EagleDrafter.from_pretrained(args.eagle, target) if args.eagle else None
    tree = None if args.chain else TreeSpec(top_k=args.top_k, depth=args.depth,
                                            total_tokens=args.total_tokens)
    result = result_header(args, target, dtype, tree, device)
    methods = [m for m in args.methods if m in METHODS]
    decoders = build_decoders(methods, target, eagle, ranking, tree, args)
    plain = PlainDecoder(target, compile=not args.no_compile)
    bench = Bench(args, target, rows, tasks, eos, pad, device, plain, decoders)
    for B in args.batch:
        for mode in args.modes:
            for method in methods:
                if method == "hf" and (mode == "sample" or B > 1 and args.hf_b1_only):
                    continue
                row = run_method(bench, method, B, mode)
                result["rows"].append(row)
                print(fmt(row), flush=True)
                save(f"real_e2e_{args.name}", result, args.out, args.stamp)
    add_speedups(result["rows"])
    print(table(result["rows"]))
    save(f"real_e2e_{args.name}", result, args.out, args.stamp)


def summarize(method, B, mode, entries) -> dict:
    toks = sum(e["tokens"] for e in entries)
    secs = sum(e["seconds"] for e in entries)
    row = {"method": method, "batch": B, "mode": mode, "tok_s": toks / secs if secs else 0.0, "tokens": toks,
           "seconds": secs, "batches": entries}
    spec = [e for e in entries if "row_steps" in e]
    if spec:
        rs = sum(e["row_steps"] for e in spec)
        row["accepted_length"] = sum(e["accepted_length"] * e["row_steps"] for e in spec) / max(rs, 1)
        row["active"] = sum(e["active"] * e["row_steps"] for e in spec) / max(rs, 1)
        row["coverage"] = sum(e["coverage"] * e["row_steps"] for e in spec) / max(rs, 1)
        steps = sum(e["steps"] for e in spec)
        row["step_us"] = secs / max(steps, 1) * 1e6
        first = spec[0]
        for key in ("draft_us", "policy_us", "update_us"):
            if key in first:
                row[key] = first[key]
        if "draft_us" in row:   # results before update_us existed subtract the one on_commit instead
            update = row.get("update_us", row.get("policy_us", 0.0))
            row["verify_us"] = row["step_us"] - row["draft_us"] - update
        if any("compared_rows" in e for e in spec):
            row["equal_rows"] = sum(e.get("equal_rows", 0) for e in spec)
            row["compared_rows"] = sum(e.get("compared_rows", 0) for e in spec)
            row["tie_gaps"] = [g for e in spec for g in e.get("tie_gaps", [])]
    return row


def add_speedups(rows) -> None:
    base = {(r["batch"], r["mode"]): r["tok_s"] for r in rows if r["method"] == "plain"}
    eagle = {(r["batch"], r["mode"]): r["tok_s"] for r in rows if r["method"] == "eagle2"}
    for r in rows:
        key = (r["batch"], r["mode"])
        if base.get(key):
            r["x_plain"] = r["tok_s"] / base[key]
        if eagle.get(key):
            r["x_eagle2"] = r["tok_s"] / eagle[key]


def fmt(r) -> str:
    """One row as the progress line printed after each method."""
    def g(key):
        return r.get(key, float("nan"))
    eq = f"{r['equal_rows']}/{r['compared_rows']}" if "compared_rows" in r else "-"
    return (f"{r['method']:<10} B={r['batch']} {r['mode']:<6} {r['tok_s']:9.1f} tok/s  "
            f"tau {g('accepted_length'):5.2f}  step {g('step_us'):7.1f} us  "
            f"draft {g('draft_us'):7.1f}  update {g('update_us'):6.1f}  "
            f"active {g('active'):8.0f}  cov {g('coverage'):.3f}  == {eq}")


COLUMNS = ("method", "B", "mode", "tok/s", "× plain", "× EAGLE-2", "τ", "step µs", "draft µs", "verify µs",
           "update µs", "active", "coverage", "== plain")


def table(rows) -> str:
    """The final Markdown table, one line per row ("–" where a figure does not apply)."""
    head = "| " + " | ".join(COLUMNS) + " |\n|" + "---|" * 3 + "---:|" * 10 + "---|\n"

    def f(r, k, spec="{:.2f}"):
        return spec.format(r[k]) if k in r else "–"

    def cells(r):
        eq = f"{r['equal_rows']}/{r['compared_rows']}" if "compared_rows" in r else "–"
        return [r["method"], r["batch"], r["mode"], f"{r['tok_s']:.0f}", f(r, "x_plain"), f(r, "x_eagle2"),
                f(r, "accepted_length"), f(r, "step_us", "{:.0f}"), f(r, "draft_us", "{:.0f}"),
                f(r, "verify_us", "{:.0f}"), f(r, "update_us", "{:.1f}"), f(r, "active", "{:.0f}"),
                f(r, "coverage", "{:.3f}"), eq]
    return head + "".join("| " + " | ".join(map(str, cells(r))) + " |\n" for r in rows)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = p.add_subparsers(dest="cmd", required=True)
    pp = sub.add_parser("prepare")
    pp.add_argument("--model", required=True)
    pp.add_argument("--name", required=True)
    pp.add_argument("--per-task", type=int, default=4)
    pr = sub.add_parser("run")
    pr.add_argument("--model", required=True, help="the GGUF file of the target")
    pr.add_argument("--name", required=True)
    pr.add_argument("--eagle", default=None, help="a trained EAGLE head (microspec train-drafter output)")
    pr.add_argument("--methods", nargs="+", default=list(METHODS))
    pr.add_argument("--batch", type=int, nargs="+", default=[1, 8])
    pr.add_argument("--modes", nargs="+", default=["greedy", "sample"], choices=["greedy", "sample"])
    pr.add_argument("--new", type=int, default=128, help="new tokens per prompt")
    pr.add_argument("-K", type=int, default=5)
    pr.add_argument("--top-k", type=int, default=10)
    pr.add_argument("--depth", type=int, default=6)
    pr.add_argument("--total-tokens", type=int, default=60)
    pr.add_argument("--chain", action="store_true", help="chain drafting of -K tokens instead of the tree")
    pr.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float32"])
    pr.add_argument("--seed", type=int, default=0)
    pr.add_argument("--no-compile", action="store_true")
    pr.add_argument("--hf-b1-only", action="store_true", help="time HF generate at batch 1 only")
    pr.add_argument("--hf-limit", type=int, default=0, help="time HF generate on the first N prompts only")
    pr.add_argument("--per-task", type=int, default=0, help="the first N prompts of each task (default: all)")
    pr.add_argument("--limit", type=int, default=0, help="first N prompts only (CPU smoke runs)")
    pr.add_argument("--out", type=Path, default=None)
    pr.add_argument("--stamp", default=run_stamp())
    args = p.parse_args(argv)
    prepare(args) if args.cmd == "prepare" else run(args)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
