"""Statistics of evaluation results: bootstrap confidence intervals and ROC AUC.

Percentile bootstrap (Efron & Tibshirani 1993, ch. 13): resample the items with replacement,
recompute the statistic, take the alpha/2 and 1 - alpha/2 quantiles. Seeded, so a result file
is reproducible. ROC AUC is the Mann-Whitney U statistic over all (positive, negative) pairs,
ties counted half: the probability that a random positive outscores a random negative.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

BOOTSTRAP_RESAMPLES = 1000
CONFIDENCE = 0.95


@dataclass(frozen=True)
class Estimate:
    """A statistic with its bootstrap confidence interval."""

    value: float
    low: float
    high: float
    n: int
    """Items it was computed over."""

    def as_dict(self) -> dict:
        return {"value": self.value, "ci_low": self.low, "ci_high": self.high, "n": self.n}

    @staticmethod
    def from_dict(record: dict) -> Estimate:
        return Estimate(record["value"], record["ci_low"], record["ci_high"], record["n"])


def bootstrap_mean(values, resamples: int = BOOTSTRAP_RESAMPLES, confidence: float = CONFIDENCE,
                   seed: int = 0) -> Estimate:
    """Mean of `values` with a percentile-bootstrap interval (vectorised: one index matrix)."""
    values_N = np.asarray(values, dtype=np.float64)
    n = len(values_N)
    if n == 0:
        return Estimate(float("nan"), float("nan"), float("nan"), 0)
    rng = np.random.default_rng(seed)
    means_R = values_N[rng.integers(0, n, size=(resamples, n))].mean(axis=1)
    low, high = _quantiles(means_R, confidence)
    return Estimate(float(values_N.mean()), low, high, n)


def bootstrap(statistic: Callable[[np.ndarray], float], values, resamples: int =
              BOOTSTRAP_RESAMPLES, confidence: float = CONFIDENCE, seed: int = 0) -> Estimate:
    """Any statistic of the items (rows of `values`) with a percentile-bootstrap interval."""
    values_N = np.asarray(values)
    n = len(values_N)
    if n == 0:
        return Estimate(float("nan"), float("nan"), float("nan"), 0)
    rng = np.random.default_rng(seed)
    stats_R = np.array([statistic(values_N[rng.integers(0, n, size=n)])
                        for _ in range(resamples)])
    low, high = _quantiles(stats_R, confidence)
    return Estimate(float(statistic(values_N)), low, high, n)


def _quantiles(samples_R: np.ndarray, confidence: float) -> tuple[float, float]:
    alpha = 1 - confidence
    finite = samples_R[np.isfinite(samples_R)]
    if len(finite) == 0:
        return float("nan"), float("nan")
    low, high = np.quantile(finite, [alpha / 2, 1 - alpha / 2])
    return float(low), float(high)


def roc_auc(positive_scores, negative_scores) -> float:
    """P(a positive scores above a negative), ties counted half (Mann-Whitney U / n+ n-)."""
    pos = np.asarray(positive_scores, dtype=np.float64)
    neg = np.asarray(negative_scores, dtype=np.float64)
    if len(pos) == 0 or len(neg) == 0:
        return float("nan")
    ranks = _average_ranks(np.concatenate([pos, neg]))
    u = ranks[:len(pos)].sum() - len(pos) * (len(pos) + 1) / 2
    return float(u / (len(pos) * len(neg)))


def _average_ranks(values_N: np.ndarray) -> np.ndarray:
    """1-based ranks, tied values sharing their mean rank."""
    order = np.argsort(values_N, kind="mergesort")
    sorted_values = values_N[order]
    ranks = np.empty(len(values_N), dtype=np.float64)
    start = 0
    while start < len(values_N):
        end = start
        while end + 1 < len(values_N) and sorted_values[end + 1] == sorted_values[start]:
            end += 1
        ranks[order[start:end + 1]] = (start + end) / 2 + 1
        start = end + 1
    return ranks


def roc_auc_ci(positive_scores, negative_scores, resamples: int = BOOTSTRAP_RESAMPLES,
               confidence: float = CONFIDENCE, seed: int = 0) -> Estimate:
    """ROC AUC with a stratified bootstrap interval (positives and negatives resampled apart)."""
    pos = np.asarray(positive_scores, dtype=np.float64)
    neg = np.asarray(negative_scores, dtype=np.float64)
    rng = np.random.default_rng(seed)
    aucs_R = np.array([roc_auc(pos[rng.integers(0, len(pos), len(pos))],
                               neg[rng.integers(0, len(neg), len(neg))])
                       for _ in range(resamples)]) if len(pos) and len(neg) else np.array([])
    low, high = _quantiles(aucs_R, confidence)
    return Estimate(roc_auc(pos, neg), low, high, len(pos) + len(neg))
