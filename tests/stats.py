"""Statistical helpers for the distributional tests (TESTING.md §3, recipes R2 and R3).

`assert_fits(counts, p)` is the R2 gate: zero-probability tokens must have exactly zero counts, then a G-test
(log-likelihood power divergence) over the bins with p > 0, bins with expected count < 5 lumped into one,
expected counts computed in float64 and rescaled to the observed total. It passes iff pval > alpha (written so
that a NaN p-value fails). The failure message reports the total-variation distance against the sampling-noise
scale 3·sqrt(bins / N) and the worst bins, so a failure is readable as an effect size.

Joint-distribution helpers for R3: `sequence_counts` histograms token sequences [N, T] over V**T bins
(mixed radix, first token most significant) and `markov_joint` / `markov_marginals` give the exact law of a
first-order Markov chain started in a fixed state.
"""
from __future__ import annotations

import os
from dataclasses import dataclass

import numpy as np
import scipy.stats

#: Every fit computed in this process; set MICROSPEC_STATS_LOG=path to append each one to a file.
RECORD: list["Fit"] = []


@dataclass(frozen=True)
class Fit:
    label: str
    pval: float
    tv: float
    tv_noise: float
    n: int
    bins: int

    def __str__(self) -> str:
        return (f"{self.label}: pval={self.pval:.3g} TV={self.tv:.4f} (noise scale 3*sqrt(bins/N)="
                f"{self.tv_noise:.4f}) N={self.n} bins={self.bins}")


def _as_float_arrays(counts, p) -> tuple[np.ndarray, np.ndarray]:
    counts = np.asarray(counts, dtype=np.float64).ravel()
    p = np.asarray(p, dtype=np.float64).ravel()
    if counts.shape != p.shape:
        raise ValueError(f"counts has {counts.size} bins, p has {p.size}")
    if not (np.isfinite(p).all() and (p >= 0).all() and p.sum() > 0):
        raise ValueError("p must be finite, non-negative and not all zero")
    if not (np.isfinite(counts).all() and (counts >= 0).all() and counts.sum() > 0):
        raise ValueError("counts must be finite, non-negative and not all zero")
    return counts, p


def tv_distance(counts, p) -> float:
    """Total-variation distance between the empirical distribution of `counts` and p (normalised)."""
    counts, p = _as_float_arrays(counts, p)
    return 0.5 * float(np.abs(counts / counts.sum() - p / p.sum()).sum())


def g_test(counts, p) -> float:
    """p-value of the G-test of `counts` against p over the bins with p > 0 (TESTING.md R2).

    Assumes counts[p == 0] == 0 (checked by `assert_fits`). With fewer than two bins left there is nothing to
    test and the p-value is 1.0.
    """
    counts, p = _as_float_arrays(counts, p)
    obs, exp = counts[p > 0], p[p > 0] / p[p > 0].sum() * counts.sum()
    small = exp < 5                                     # lump sparse bins into one
    if small.any():
        obs = np.append(obs[~small], obs[small].sum())
        exp = np.append(exp[~small], exp[small].sum())
    if obs.size < 2:
        return 1.0
    exp *= obs.sum() / exp.sum()
    return float(scipy.stats.power_divergence(obs, exp, lambda_="log-likelihood").pvalue)


def assert_fits(counts, p, alpha: float = 1e-4, label: str = "") -> Fit:
    """Assert that the histogram `counts` is a sample of p (TESTING.md R2). Returns the `Fit`."""
    counts, p = _as_float_arrays(counts, p)
    n = int(counts.sum())
    tag = f"[{label}] " if label else ""
    zero = np.flatnonzero((p == 0) & (counts > 0))
    assert zero.size == 0, (f"{tag}emitted a token the target gives zero probability: bins "
                            f"{zero[:10].tolist()} with counts {counts[zero[:10]].astype(int).tolist()}")
    pval = g_test(counts, p)
    tv = tv_distance(counts, p)
    fit = Fit(label, pval, tv, 3.0 * float(np.sqrt(np.count_nonzero(p) / n)), n, int(np.count_nonzero(p)))
    RECORD.append(fit)
    if os.getenv("MICROSPEC_STATS_LOG"):
        with open(os.environ["MICROSPEC_STATS_LOG"], "a") as fh:
            fh.write(str(fit) + "\n")
    if not pval > alpha:                                # NaN fails too
        emp, ref = counts / n, p / p.sum()
        worst = np.argsort(-np.abs(emp - ref))[:5]
        detail = ", ".join(f"bin {i}: {emp[i]:.4f} vs {ref[i]:.4f}" for i in worst)
        raise AssertionError(f"{tag}G-test pval={pval:.3g} <= alpha={alpha:g}; TV={tv:.4f} vs noise scale "
                             f"{fit.tv_noise:.4f} (N={n}, bins={fit.bins}); worst bins: {detail}")
    return fit


# ---------------------------------------------------------------------------------------- joint distributions
def sequence_counts(seqs, V: int) -> np.ndarray:
    """Histogram of token sequences seqs int [N, T] over V**T bins; bin = Σ_t x_t · V**(T-1-t)."""
    seqs = np.asarray(seqs, dtype=np.int64)
    if seqs.ndim != 2:
        raise ValueError(f"seqs must be [N, T], got shape {seqs.shape}")
    if seqs.size and (seqs.min() < 0 or seqs.max() >= V):
        raise ValueError(f"token ids must be in [0, {V}), got [{seqs.min()}, {seqs.max()}]")
    T = seqs.shape[1]
    codes = seqs @ (V ** np.arange(T - 1, -1, -1, dtype=np.int64))
    return np.bincount(codes, minlength=V ** T).astype(np.float64)


def markov_joint(P, start: int, T: int) -> np.ndarray:
    """Exact law of (x_1, ..., x_T) for the chain x_{t+1} ~ P[x_t] with x_0 = start, as a [V**T] vector in the
    bin order of `sequence_counts`."""
    P = np.asarray(P, dtype=np.float64)
    V = P.shape[0]
    joint = P[start].copy()                              # [V]: law of x_1
    for _ in range(T - 1):                               # [V**t] -> [V**(t+1)]: P(prefix) · P[last, next]
        joint = (joint.reshape(-1, V)[:, :, None] * P[None]).reshape(-1)
    return joint


def markov_marginals(P, start: int, T: int) -> np.ndarray:
    """[T, V]: row t - 1 is the law of x_t for the chain started in `start`."""
    P = np.asarray(P, dtype=np.float64)
    out, cur = [], np.eye(P.shape[0])[start]
    for _ in range(T):
        cur = cur @ P
        out.append(cur)
    return np.stack(out)


def window_joint(P, start: int, t: int, width: int) -> np.ndarray:
    """Exact law of (x_t, ..., x_{t+width-1}) (t >= 1) as a [V**width] vector in `sequence_counts` order."""
    P = np.asarray(P, dtype=np.float64)
    V = P.shape[0]
    joint = markov_marginals(P, start, t)[t - 1]
    for _ in range(width - 1):
        joint = (joint.reshape(-1, V)[:, :, None] * P[None]).reshape(-1)
    return joint


def pair_joint(P, start: int, t: int) -> np.ndarray:
    """Exact law of (x_t, x_{t+1}) as a [V*V] vector (bin = x_t·V + x_{t+1}), t >= 1."""
    return window_joint(P, start, t, 2)
