"""Uncertainty of benchmark scores and paired comparisons of two runs, over the scored documents.

A task's headline value is a ratio over its documents, value = Σ v_i / Σ w_i: an accuracy has w_i = 1 and v_i the
document's score (0/1, or a fraction for VQA accuracy), a word error rate has v_i the edit distance and w_i the
reference length of document i (a corpus-level rate). Then:

- :func:`interval`: a 95 % interval of the value: Wilson's score interval when every v_i is 0 or 1 and w_i = 1
  (a binomial proportion), else the percentile bootstrap over documents (the ratio recomputed on resampled
  documents);
- :func:`paired_p_value`: two runs scored on the same documents: the exact McNemar test when both are right/wrong
  per document, else a paired permutation test (each document's pair of results swapped between the runs at
  random; the ratio difference recomputed), two-sided.

Pure functions of lists of floats; seeded, so a table is reproducible.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np

LEVEL = 0.95
Z95 = 1.959963984540054  # the standard normal's 97.5 % quantile
RESAMPLES = 2000


def _ratio(values: np.ndarray, weights: np.ndarray | None) -> float:
    return float(values.sum() / weights.sum()) if weights is not None else float(values.mean())


def is_binary(values: Sequence[float], weights: Sequence[float] | None = None) -> bool:
    """Every value 0 or 1 and no weights: a right/wrong score per document."""
    return weights is None and all(v in (0.0, 1.0) for v in values)


def wilson(successes: float, n: int, z: float = Z95) -> tuple[float, float]:
    """Wilson's score interval of a binomial proportion k/n (level set by ``z``)."""
    if n <= 0:
        return float("nan"), float("nan")
    p = successes / n
    centre = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / (1 + z * z / n)
    return max(0.0, centre - half), min(1.0, centre + half)


def bootstrap(values: Sequence[float], weights: Sequence[float] | None = None, resamples: int = RESAMPLES,
              seed: int = 0, level: float = LEVEL) -> tuple[float, float]:
    """Percentile bootstrap interval of Σ v / Σ w over documents resampled with replacement."""
    v = np.asarray(values, dtype=np.float64)
    w = None if weights is None else np.asarray(weights, dtype=np.float64)
    n = v.size
    if n == 0:
        return float("nan"), float("nan")
    idx = np.random.default_rng(seed).integers(0, n, size=(resamples, n))
    if w is None:
        stats = v[idx].mean(axis=1)
    else:
        total = w[idx].sum(axis=1)
        stats = np.divide(v[idx].sum(axis=1), total, out=np.full(resamples, np.nan), where=total > 0)
    lo, hi = np.nanquantile(stats, [(1 - level) / 2, (1 + level) / 2])
    return float(lo), float(hi)


def interval(values: Sequence[float], weights: Sequence[float] | None = None, seed: int = 0) -> tuple[float, float, str]:
    """(low, high, method) of the value Σ v / Σ w: "wilson" for right/wrong documents, else "bootstrap"."""
    if is_binary(values, weights):
        lo, hi = wilson(sum(values), len(values))
        return lo, hi, "wilson"
    lo, hi = bootstrap(values, weights, seed=seed)
    return lo, hi, "bootstrap"


def mcnemar_exact(only_a: int, only_b: int) -> float:
    """Two-sided exact McNemar p-value from the discordant counts: documents only run A got right, only B."""
    n = only_a + only_b
    if n == 0:
        return 1.0
    k = min(only_a, only_b)
    tail = sum(math.comb(n, i) for i in range(k + 1)) / 2.0 ** n
    return min(1.0, 2.0 * tail)


def permutation_p_value(values_a: Sequence[float], values_b: Sequence[float],
                        weights_a: Sequence[float] | None = None, weights_b: Sequence[float] | None = None,
                        resamples: int = RESAMPLES, seed: int = 0) -> float:
    """Two-sided paired permutation test of ratio(A) - ratio(B): per document, A's and B's results are swapped
    with probability 1/2; p = (#{|Δ*| >= |Δ|} + 1) / (resamples + 1)."""
    va, vb = np.asarray(values_a, np.float64), np.asarray(values_b, np.float64)
    wa = np.ones_like(va) if weights_a is None else np.asarray(weights_a, np.float64)
    wb = np.ones_like(vb) if weights_b is None else np.asarray(weights_b, np.float64)
    observed = va.sum() / wa.sum() - vb.sum() / wb.sum()
    swap = np.random.default_rng(seed).random((resamples, va.size)) < 0.5
    sa_v, sb_v = np.where(swap, vb, va), np.where(swap, va, vb)
    sa_w, sb_w = np.where(swap, wb, wa), np.where(swap, wa, wb)
    diffs = sa_v.sum(1) / sa_w.sum(1) - sb_v.sum(1) / sb_w.sum(1)
    return float(((np.abs(diffs) >= abs(observed) - 1e-12).sum() + 1) / (resamples + 1))


def paired_p_value(values_a: Sequence[float], values_b: Sequence[float],
                   weights_a: Sequence[float] | None = None, weights_b: Sequence[float] | None = None,
                   seed: int = 0) -> tuple[float, str]:
    """(p-value, test) of the difference between two runs on the same documents (same order): "mcnemar" when
    both are right/wrong per document, else "permutation"."""
    if len(values_a) != len(values_b):
        raise ValueError(f"paired runs need the same documents: {len(values_a)} vs {len(values_b)}")
    if is_binary(values_a, weights_a) and is_binary(values_b, weights_b):
        only_a = sum(1 for a, b in zip(values_a, values_b) if a == 1.0 and b == 0.0)
        only_b = sum(1 for a, b in zip(values_a, values_b) if a == 0.0 and b == 1.0)
        return mcnemar_exact(only_a, only_b), "mcnemar"
    return permutation_p_value(values_a, values_b, weights_a, weights_b, seed=seed), "permutation"
