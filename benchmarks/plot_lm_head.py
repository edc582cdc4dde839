"""Plot LM-head latency against capacity from a bench_lm_head.py result file, with the physical floor
(C·D·2 bytes / measured copy bandwidth) drawn in.

    python benchmarks/plot_lm_head.py benchmarks/results/lm_head_<stamp>.json docs/results/lm_head_h100.png
"""
from __future__ import annotations

import json
import sys
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt

STYLE = {"dense": ("k", "--"), "index_select": ("tab:gray", ":"), "pregathered": ("tab:blue", "-"),
         "triton_gather": ("tab:orange", "-"), "triton_packed": ("tab:red", "-")}


def main(src: str, dst: str, vocab: int = 128256) -> None:
    data = json.loads(Path(src).read_text())
    rows = [r for r in data["rows"] if r["vocab"] == vocab and not r["per_row"]]
    panels = [(1, 4096), (1, 2048), (8, 4096), (1, 896)]
    fig, axes = plt.subplots(1, len(panels), figsize=(4.2 * len(panels), 3.8), sharey=False)
    for ax, (B, D) in zip(axes, panels):
        sel = [r for r in rows if r["batch"] == B and r["hidden"] == D]
        caps = sorted({r["capacity"] for r in sel})
        for provider, (color, ls) in STYLE.items():
            ys = [next(r["graph_us"] for r in sel if r["capacity"] == c and r["provider"] == provider)
                  for c in caps]
            ax.plot(caps, ys, color=color, ls=ls, marker="o", ms=3, label=provider)
        floor = [next(r["floor_us"] for r in sel if r["capacity"] == c) for c in caps]
        ax.plot(caps, floor, color="green", lw=2, alpha=0.5, label="floor (C·D·2 B / copy BW)")
        ax.set(xscale="log", yscale="log", xlabel="capacity C (rows scored)",
               title=f"B={B}, D={D}, V={vocab}")
        ax.grid(True, which="both", alpha=0.3)
    axes[0].set_ylabel("µs per call (CUDA-graph replay, inputs beyond L2)")
    axes[0].legend(fontsize=7)
    env = data["env"]
    fig.suptitle(f"LM-head latency, {env['device']}, bf16, {env['date']} "
                 f"(torch {env['torch']}, triton {env['triton']})", fontsize=10)
    fig.tight_layout()
    Path(dst).parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(dst, dpi=110)
    print(f"wrote {dst}")


if __name__ == "__main__":
    main(*sys.argv[1:3])
