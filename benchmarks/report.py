"""Markdown tables from benchmark result files (so the numbers in docs/benchmarks.md are copied, not typed).

    python benchmarks/report.py lm_head benchmarks/results/lm_head_<stamp>.json
    python benchmarks/report.py draft benchmarks/results/draft_step_<stamp>.json
    python benchmarks/report.py e2e benchmarks/results/e2e_<stamp>.json
"""
from __future__ import annotations

import json
import sys
from pathlib import Path

SPARSE = ("pregathered", "triton_gather", "triton_packed")


def lm_head(data, batches=(1, 8), vocab=128256) -> str:
    out = ["| B | D | C | dense | index_select | pregathered cuBLAS | Triton gather | Triton packed | "
           "floor | best / floor | dense / best |", "|---|---|---|---|---|---|---|---|---|---|---|"]
    keyed = {}
    for r in data["rows"]:
        if r["vocab"] == vocab and r["batch"] in batches and not r["per_row"]:
            keyed.setdefault((r["batch"], r["hidden"], r["capacity"]), {})[r["provider"]] = r
    for (B, D, C), by in sorted(keyed.items()):
        best = min(by[p]["graph_us"] for p in ("triton_gather", "triton_packed"))
        floor = by["dense"]["floor_us"]
        cells = " | ".join(f"{by[p]['graph_us']:.1f}" for p in ("dense", "index_select") + SPARSE)
        out.append(f"| {B} | {D} | {C} | {cells} | {floor:.1f} | {best / floor:.2f}× | "
                   f"{by['dense']['graph_us'] / best:.1f}× |")
    return "\n".join(out)


def draft(data) -> str:
    out = ["| drafter | B | policy | active rows | draft step (K=5), µs | µs per drafted token | "
           "draft time vs dense |", "|---|---|---|---|---|---|---|"]
    for r in data["rows"]:
        change = "—" if r["policy"] == "dense" else f"{-100 * r['reduction']:+.1f} %"
        out.append(f"| {r['drafter']} | {r['batch']} | {r['policy']} | {r['n_active']:.0f} | "
                   f"{r['step_us']:.0f} | {r['per_token_us']:.0f} | {change} |")
    gathers = [r for r in data.get("overlap", []) if "gather" in r]
    if gathers:
        out += ["", "| drafter | B | gather of new rows | draft step, µs |", "|---|---|---|---|"]
        out += [f"| {r['drafter']} | {r['batch']} | {r['gather']} ({r['delta_rows']} rows) | "
                f"{r['step_us']:.0f} |" for r in gathers]
    updates = [r for r in data.get("overlap", []) if "policy_update_us" in r]
    if updates:
        out += ["", "| drafter | B | InContextPolicy.on_commit, µs |", "|---|---|---|"]
        out += [f"| {r['drafter']} | {r['batch']} | {r['policy_update_us']:.0f} |" for r in updates]
    return "\n".join(out)


def e2e(data) -> str:
    out = ["| target | drafter | B | method | tokens/s | vs plain | vs spec:dense | τ | active rows |",
           "|---|---|---|---|---|---|---|---|---|"]
    plain = {(r["target"], r["batch"]): r["tok_s"] for r in data["rows"] if r["method"] == "plain"}
    dense = {(r["target"], r["drafter"], r["batch"]): r["tok_s"]
             for r in data["rows"] if r["method"] == "spec:dense"}
    for r in data["rows"]:
        base = plain.get((r["target"], r["batch"]))
        d = dense.get((r["target"], r["drafter"], r["batch"]))
        vs_plain = f"{r['tok_s'] / base:.2f}×" if base and r["method"] != "plain" else ""
        vs_dense = f"{r['tok_s'] / d:.2f}×" if d and r["method"].startswith("spec:") else ""
        tau = f"{r['mean_accepted_length']:.2f}" if "mean_accepted_length" in r else ""
        active = f"{r['mean_active']:.0f}" if "mean_active" in r else ""
        out.append(f"| {r['target']} | {r['drafter'] or ''} | {r['batch']} | {r['method']} | "
                   f"{r['tok_s']:.1f} | {vs_plain} | {vs_dense} | {tau} | {active} |")
    return "\n".join(out)


if __name__ == "__main__":
    kind, path = sys.argv[1], sys.argv[2]
    data = json.loads(Path(path).read_text())
    print({"lm_head": lm_head, "draft": draft, "e2e": e2e}[kind](data))
