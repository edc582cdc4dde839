"""Per-task view of `real_e2e.py` results: tokens/s and accepted length per method and task, as a Markdown
table and a bar chart (one panel per model), from the batch-1 entries (one prompt per batch, so each entry
belongs to one task).

    python benchmarks/plot_real_e2e.py benchmarks/results/real_e2e_gemma3-270m_2026-12-01_033311.json \\
        benchmarks/results/real_e2e_smollm2_2026-12-01_033813.json --mode greedy --png docs/real_e2e_tasks.png
"""
from __future__ import annotations

import argparse
import json
from collections import defaultdict
from pathlib import Path


def per_task(result: dict, mode: str) -> dict:
    """{method: {task: (tok/s, tau or None)}} over the batch-1 rows of `mode` of the methods timed on every
    task; tok/s pools tokens and seconds of the task's prompts, tau weighs each prompt by its verification
    steps."""
    out = {}
    for row in result["rows"]:
        if row["batch"] != 1 or row["mode"] != mode:
            continue
        acc = defaultdict(lambda: [0, 0.0, 0.0, 0])            # tokens, seconds, tau * steps, steps
        for entry in row["batches"]:
            (task,) = entry["tasks"]
            a = acc[task]
            a[0] += entry["tokens"]
            a[1] += entry["seconds"]
            if "row_steps" in entry:
                a[2] += entry["accepted_length"] * entry["row_steps"]
                a[3] += entry["row_steps"]
        out[row["method"]] = {t: (a[0] / a[1], a[2] / a[3] if a[3] else None) for t, a in acc.items()}
    tasks = set().union(*out.values()) if out else set()
    # a method timed on a few prompts only (hf with --hf-limit) has no per-task view: its rate is pooled
    return {m: by_task for m, by_task in out.items() if set(by_task) == tasks}


def markdown(name: str, table: dict) -> str:
    methods = list(table)
    tasks = sorted({t for m in methods for t in table[m]})
    head = f"| {name} | " + " | ".join(methods) + " |\n|---|" + "---:|" * len(methods) + "\n"
    lines = []
    for task in tasks:
        cells = []
        for m in methods:
            rate, tau = table[m].get(task, (float("nan"), None))
            cells.append(f"{rate:.0f}" + (f" (τ {tau:.2f})" if tau is not None else ""))
        lines.append(f"| {task} | " + " | ".join(cells) + " |")
    return head + "\n".join(lines) + "\n"


def plot(panels: list[tuple[str, dict]], path: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, axes = plt.subplots(len(panels), 1, figsize=(11, 3.6 * len(panels)), squeeze=False)
    names = list(dict.fromkeys(m for _, table in panels for m in table))     # one colour per method
    colour = {m: f"C{i % 10}" for i, m in enumerate(names)}
    for ax, (name, table) in zip(axes[:, 0], panels):
        methods = list(table)
        tasks = sorted({t for m in methods for t in table[m]})
        width = 0.8 / len(methods)
        for i, m in enumerate(methods):
            ax.bar([j + i * width for j in range(len(tasks))],
                   [table[m].get(t, (0.0, None))[0] for t in tasks], width, label=m, color=colour[m])
        ax.set_xticks([j + 0.4 - width / 2 for j in range(len(tasks))], tasks, fontsize=8)
        ax.set_ylabel("tokens/s")
        ax.set_title(name, fontsize=10)
        ax.legend(fontsize=7, ncol=len(methods))
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("results", nargs="+", type=Path)
    p.add_argument("--mode", default="greedy", choices=["greedy", "sample"])
    p.add_argument("--png", type=Path, default=None)
    args = p.parse_args(argv)
    panels = []
    for path in args.results:
        result = json.loads(path.read_text())
        title = (f"{result['name']}: batch 1, {args.mode}, tree {result.get('tree') or 'chain'} "
                 f"({result['env']['device']}, {result['env']['date']})")
        panels.append((title, per_task(result, args.mode)))
        print(markdown(result["name"], panels[-1][1]))
    if args.png:
        plot(panels, args.png)
        print(f"wrote {args.png}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
