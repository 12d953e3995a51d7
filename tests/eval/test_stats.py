"""Bootstrap intervals and ROC AUC against independent computations."""

import numpy as np
import pytest

from helox.eval.stats import bootstrap, bootstrap_mean, roc_auc, roc_auc_ci


def test_roc_auc_matches_scikit_learn_with_ties():
    metrics = pytest.importorskip("sklearn.metrics")
    rng = np.random.default_rng(0)
    pos = np.round(rng.normal(0.5, 1, 300), 1)  # rounded: many ties
    neg = np.round(rng.normal(0.0, 1, 200), 1)
    expected = metrics.roc_auc_score(np.r_[np.ones(300), np.zeros(200)], np.r_[pos, neg])
    assert roc_auc(pos, neg) == pytest.approx(expected, abs=1e-12)


def test_roc_auc_by_counting_pairs():
    pos, neg = [3, 2, 2], [2, 1]
    pairs = [1.0 if p > n else 0.5 if p == n else 0.0 for p in pos for n in neg]
    assert roc_auc(pos, neg) == pytest.approx(np.mean(pairs))
    assert roc_auc([1, 1], [1, 1]) == 0.5 and np.isnan(roc_auc([], [1]))


def test_bootstrap_interval_of_a_mean_covers_it_and_shrinks_with_n():
    rng = np.random.default_rng(1)
    small = bootstrap_mean(rng.normal(2.0, 1.0, 50))
    large = bootstrap_mean(rng.normal(2.0, 1.0, 2000))
    assert small.low < small.value < small.high and large.low < 2.0 < large.high
    # the normal-theory 95% interval of a mean is ±1.96 σ/√n
    assert large.high - large.low == pytest.approx(2 * 1.96 / np.sqrt(2000), rel=0.15)
    assert (large.high - large.low) < (small.high - small.low)
    assert bootstrap_mean([1.0, 1.0, 1.0]).as_dict() == {"value": 1.0, "ci_low": 1.0,
                                                         "ci_high": 1.0, "n": 3}


def test_seeded_and_generic():
    values = np.arange(20.0)
    assert bootstrap_mean(values, seed=3) == bootstrap_mean(values, seed=3)
    median = bootstrap(np.median, values)
    assert median.value == 9.5 and median.low < 9.5 < median.high


def test_auc_interval_is_stratified_and_covers_the_auc():
    rng = np.random.default_rng(2)
    estimate = roc_auc_ci(rng.normal(1, 1, 100), rng.normal(0, 1, 100))
    assert estimate.low < estimate.value < estimate.high and estimate.n == 200
    assert 0.64 < estimate.value < 0.86  # Φ(1/√2) = 0.76 in expectation
