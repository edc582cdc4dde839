"""Size tuning: pick a policy's capacity (and knobs) by trading coverage against LM-head latency.

Why: a bigger active set covers more of the target's tokens (longer accepted blocks) but makes every draft
token's LM head slower; the best size depends on the head's real cost and on the text. Following the 2026
coverage-vs-latency paper (arXiv 2603.05210), we maximise a utility under a minimum-coverage constraint with
optuna's TPE sampler (seeded, so a run is reproducible) and report the coverage/latency Pareto frontier.

Cost of one draft block (K drafted tokens, chain drafting, batch 1), in microseconds:

    block_us = verify_us + K * (layers_us + head_us(rows)) + update_us
    head_us(rows)  = fixed_us + rows * d * 2 B / bandwidth       (cost model: a bandwidth-bound bf16 GEMV)
                   | interpolated from a measured latency table  (`LatencyTable`, see docs/tuning.md)
    rows           = the mean active size (the sparse-head kernel reads only valid rows)
    update_us      = delta_rows * d * 2 B * 2 / bandwidth + policy_update_us   (repack gather, read + write)

Accepted length under an i.i.d. model: each draft is accepted with probability p = a * c (a: the drafter's
per-token acceptance with a full head; c: coverage), and a chain stops at the first rejection, so

    E[tokens per block] = 1 + sum_{i=1..K} p^i          utility = E[tokens per block] / block_us  (tokens/ms)

It ignores that easy tokens are both frequent and predictable (errs low) and that a tree drafts
alternatives (errs either way): a proxy for ranking configurations, not a speedup prediction.
"""
from __future__ import annotations

import json
import math
import os
import textwrap
from collections.abc import Callable
from dataclasses import asdict, dataclass, field

# Measured on an H100 80GB (torch 2.11, project microbenchmark, ../shared/REFERENCES.md (e)): cuBLAS GEMV
# over pre-gathered bf16 rows of d = 4096, and the dense 128256 x 4096 head.
H100_BANDWIDTH = 3.0e12                        # bytes/s, device copy bandwidth (issue text)
H100_GATHERED_US = {2048: 15.6, 4096: 23.3}    # rows -> microseconds, d = 4096
H100_DENSE = (128256, 386.5)                   # rows, microseconds
# vLLM PR #29334: EAGLE on Llama-3.1-8B, A100, MT-bench (2 prompts), 1 speculative token: mean acceptance
# length 1.70, i.e. a per-token acceptance of 0.70 with the full head. A thin number: override per drafter.
EAGLE_ACCEPTANCE = 0.70


@dataclass(frozen=True)
class Arch:
    """Dimensions that set the bytes a forward reads (bf16 weights)."""
    hidden: int
    vocab: int
    intermediate: int
    heads: int
    kv_heads: int
    head_dim: int
    layers: int

    def layer_params(self) -> int:
        attn = 2 * self.hidden * self.heads * self.head_dim + 2 * self.hidden * self.kv_heads * self.head_dim
        return attn + 3 * self.hidden * self.intermediate

    def eagle_params(self) -> int:
        """An EAGLE-1/2 drafter: one decoder layer plus the fc that fuses [embedding; feature] (2d -> d)."""
        return self.layer_params() + 2 * self.hidden * self.hidden

    def target_params(self) -> int:
        return self.layers * self.layer_params() + self.vocab * self.hidden


ARCHS = {
    "llama3-8b": Arch(4096, 128256, 14336, 32, 8, 128, 32),
    "qwen2-7b": Arch(3584, 152064, 18944, 28, 4, 128, 28),
    "smollm2-135m": Arch(576, 49152, 1536, 9, 3, 64, 30),
}


@dataclass
class CostModel:
    """Bandwidth-bound latency of a bf16 GEMV over `rows` LM-head rows of width `hidden`, plus a fixed term.

    The default fixed term is fitted to the H100 gathered-GEMV points with the bandwidth held at 3.0 TB/s:
    mean(15.6 - 5.59, 23.3 - 11.18) = 11.06 us; the model then puts the dense head at 361 us (measured 386.5).
    """
    hidden: int = 4096
    bandwidth: float = H100_BANDWIDTH
    fixed_us: float = field(default=None)
    policy_update_us: dict = field(default_factory=dict)
    source: str = "cost model: H100 reference constants (3.0 TB/s; fixed term fitted to 15.6/23.3 us GEMVs)"

    def __post_init__(self):
        if self.fixed_us is None:
            self.fixed_us = sum(us - r * 4096 * 2 / H100_BANDWIDTH * 1e6
                                for r, us in H100_GATHERED_US.items()) / len(H100_GATHERED_US)

    def bytes_us(self, nbytes: float) -> float:
        return nbytes / self.bandwidth * 1e6

    def head_us(self, rows: float) -> float:
        return self.fixed_us + self.bytes_us(rows * self.hidden * 2)

    def update_us(self, delta_rows: float, policy: str) -> float:
        """Repack gather of the rows that changed (read + write) plus the policy's own per-step cost."""
        return self.bytes_us(delta_rows * self.hidden * 2 * 2) + float(self.policy_update_us.get(policy, 0.0))


@dataclass
class LatencyTable(CostModel):
    """Measured head latency: `points` {rows: microseconds}, interpolated piecewise-linearly in rows.

    Below the smallest entry the smallest latency is used (a GEMV does not get faster than its floor);
    above the largest it raises (extend the benchmark or lower the capacity range).
    """
    points: dict = field(default_factory=dict)
    layers_us: float | None = None     # measured drafter forward without head, per token (optional)
    verify_us: float | None = None     # measured target verification of one block (optional)
    dense_us: float | None = None      # measured dense head (optional)

    def head_us(self, rows: float) -> float:
        xs = sorted(self.points)
        if rows <= xs[0]:
            return float(self.points[xs[0]])
        if rows > xs[-1]:
            raise ValueError(f"{rows:.0f} rows is beyond the latency table's largest entry ({xs[-1]})")
        hi = next(i for i, x in enumerate(xs) if x >= rows)
        x0, x1 = xs[max(hi - 1, 0)], xs[hi]
        y0, y1 = self.points[x0], self.points[x1]
        return float(y0 if x1 == x0 else y0 + (y1 - y0) * (rows - x0) / (x1 - x0))

    @property
    def max_rows(self) -> int:
        return max(self.points)


def _intercept(points: dict) -> float:
    """Least-squares intercept (us at 0 rows) of the table, >= 0: its fixed launch/latency term."""
    xs, ys = list(map(float, points)), list(map(float, points.values()))
    if len(xs) < 2:
        return ys[0]
    mx, my = sum(xs) / len(xs), sum(ys) / len(ys)
    slope = sum((x - mx) * (y - my) for x, y in zip(xs, ys)) / sum((x - mx) ** 2 for x in xs)
    return max(0.0, my - slope * mx)


def load_latency_table(path: str | os.PathLike, hidden: int | None = None) -> LatencyTable:
    """Read a latency table: `{"head_us": {rows: us}, ...}` (the documented format) or a bare `{rows: us}`."""
    if not os.path.isfile(path):
        raise FileNotFoundError(f"latency table not found: {path}")
    try:
        with open(path) as f:
            obj = json.load(f)
    except ValueError as err:
        raise ValueError(f"{path}: not JSON ({err})") from err
    raw = obj.get("head_us", obj) if isinstance(obj, dict) else None
    try:
        points = {int(k): float(v) for k, v in raw.items() if str(k).isdigit()}
    except (AttributeError, TypeError, ValueError) as err:
        raise ValueError(f"{path}: expected {{rows: microseconds}} entries ({err})") from err
    if not points or any(v <= 0 or not math.isfinite(v) for v in points.values()):
        raise ValueError(f"{path}: no usable {{rows: microseconds}} entries (positive, finite)")
    meta = obj if "head_us" in obj else {}
    return LatencyTable(hidden=int(meta.get("hidden_size", hidden or 4096)),
                        bandwidth=float(meta.get("bandwidth_bytes_per_s", H100_BANDWIDTH)),
                        fixed_us=_intercept(points),
                        policy_update_us=dict(meta.get("update_us", {})), points=points,
                        layers_us=meta.get("draft_layers_us"), verify_us=meta.get("verify_us"),
                        dense_us=meta.get("dense_us"),
                        source=f"latency table {path}" + (f" ({meta['device']})" if "device" in meta else ""))


@dataclass
class StepModel:
    """What a draft block costs besides the head, and how drafts get accepted."""
    K: int = 5
    layers_us: float = 0.0         # drafter forward without its head, per drafted token
    verify_us: float = 0.0         # target verification per block (0: draft-only utility)
    acceptance: float = EAGLE_ACCEPTANCE

    @classmethod
    def for_arch(cls, arch: Arch, cost: CostModel, K: int = 5, include_verify: bool = False,
                 acceptance: float = EAGLE_ACCEPTANCE) -> "StepModel":
        """Measured values from a latency table when it has them, else bandwidth-bound estimates: the EAGLE
        drafter's layers (+ one fixed term) and, optionally, the target's weights read once per block."""
        layers = getattr(cost, "layers_us", None)
        if layers is None:
            layers = cost.bytes_us(arch.eagle_params() * 2) + cost.fixed_us
        verify = getattr(cost, "verify_us", None)
        if verify is None:
            verify = cost.bytes_us(arch.target_params() * 2)
        verify = verify if include_verify else 0.0
        return cls(K, layers, verify, acceptance)

    def expected_tokens(self, coverage: float) -> float:
        p = self.acceptance * coverage
        return 1.0 + sum(p ** i for i in range(1, self.K + 1))

    def block_us(self, head_us: float, update_us: float) -> float:
        return self.verify_us + self.K * (self.layers_us + head_us) + update_us


@dataclass
class Trial:
    number: int
    params: dict
    coverage: float
    active_mean: float
    delta_mean: float
    head_us: float
    update_us: float
    block_us: float
    tokens_per_block: float
    utility: float                 # tokens per millisecond of block time
    feasible: bool


@dataclass
class TuneResult:
    trials: list[Trial]
    best: Trial | None             # highest utility among feasible trials (None: none feasible)
    pareto: list[Trial]            # non-dominated: higher coverage and lower per-token head latency

    def to_dict(self) -> dict:
        return {"best": asdict(self.best) if self.best else None, "pareto": [asdict(t) for t in self.pareto],
                "trials": [asdict(t) for t in self.trials]}


def head_latency_per_token(t: Trial, K: int) -> float:
    """LM-head time per drafted token, the policy's update amortised over the K drafts of its block."""
    return t.head_us + t.update_us / K


def pareto_front(trials: list[Trial], K: int) -> list[Trial]:
    """Trials no other trial beats on both coverage (higher) and head latency per token (lower), sorted."""
    pts = sorted(trials, key=lambda t: (head_latency_per_token(t, K), -t.coverage))
    front, best_cov = [], -1.0
    for t in pts:
        if t.coverage > best_cov:
            front.append(t)
            best_cov = t.coverage
    return front


Evaluation = dict   # {"coverage": float, "active_mean": float, "delta_mean": float}


def tune(evaluate: Callable[[dict], Evaluation], suggest: Callable, cost: CostModel, step: StepModel,
         min_coverage: float = 0.0, n_trials: int = 40, seed: int = 0, policy_name: str = "policy",
         callback=None) -> TuneResult:
    """Maximise utility over `n_trials` TPE trials subject to coverage >= min_coverage.

    suggest(trial) -> params dict (uses optuna's trial.suggest_*); evaluate(params) -> Evaluation (cached per
    distinct params). Deterministic for a given seed and deterministic `evaluate`.
    """
    import warnings

    import optuna

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    modern = hasattr(optuna.trial.Trial, "set_constraint")
    cache: dict = {}
    trials: list[Trial] = []

    def objective(trial):
        params = suggest(trial)
        key = json.dumps(params, sort_keys=True)
        if key not in cache:
            cache[key] = evaluate(params)
        ev = cache[key]
        head = cost.head_us(ev["active_mean"])
        update = cost.update_us(ev.get("delta_mean", 0.0), policy_name)
        block = step.block_us(head, update)
        tokens = step.expected_tokens(ev["coverage"])
        t = Trial(trial.number, params, ev["coverage"], ev["active_mean"], ev.get("delta_mean", 0.0), head,
                  update, block, tokens, tokens / block * 1e3, ev["coverage"] >= min_coverage)
        trials.append(t)
        if modern:                                 # optuna >= 5: constraints live on the trial
            trial.set_constraint("coverage", min_coverage - ev["coverage"])
        else:
            trial.set_user_attr("violation", min_coverage - ev["coverage"])
        if callback is not None:
            callback(t)
        return t.utility

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        constraints = {} if modern else {"constraints_func": lambda ft: [ft.user_attrs.get("violation", 0.0)]}
        sampler = optuna.samplers.TPESampler(seed=seed, n_startup_trials=min(10, max(1, n_trials // 4)),
                                             **constraints)
        study = optuna.create_study(direction="maximize", sampler=sampler)
        study.optimize(objective, n_trials=n_trials)
    feasible = [t for t in trials if t.feasible]
    best = max(feasible, key=lambda t: (t.utility, -t.number)) if feasible else None
    return TuneResult(trials, best, pareto_front(trials, step.K))


def plot_pareto(result: TuneResult, K: int, min_coverage: float, path, title: str = "") -> None:
    """PNG: every trial (coverage vs head latency per drafted token), the Pareto frontier, the best trial."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.4, 4.4))
    for ok, color, label in ((True, "tab:blue", "feasible"), (False, "tab:gray", "below min coverage")):
        pts = [(head_latency_per_token(t, K), t.coverage) for t in result.trials if t.feasible == ok]
        if pts:
            ax.scatter(*zip(*pts), s=24, color=color, alpha=0.8, label=label, zorder=3)
    front = [(head_latency_per_token(t, K), t.coverage) for t in result.pareto]
    ax.plot(*zip(*front), color="tab:orange", drawstyle="steps-post", label="Pareto frontier", zorder=2)
    if result.best is not None:
        ax.scatter([head_latency_per_token(result.best, K)], [result.best.coverage], marker="*", s=160,
                   color="tab:red", zorder=5, label=f"best: {result.best.params}"[:70])
    ax.axhline(min_coverage, ls="--", color="k", lw=0.8)
    ax.set_xlabel("LM-head latency per drafted token (us, incl. amortised update)")
    ax.set_ylabel("coverage of response tokens")
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize=7, loc="lower right")
    ax.set_title(textwrap.fill(title, 90), fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
