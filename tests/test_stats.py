"""Uncertainty: bootstrap intervals, paired tests and summaries over seeds (stats.py)."""

import numpy as np
import pytest

from entityclip.stats import bootstrap_ci, over_seeds, paired_bootstrap


def test_the_bootstrap_interval_of_a_mean_covers_it_and_narrows_with_more_queries():
    rng = np.random.default_rng(0)
    few, many = rng.binomial(1, 0.4, 100) * 100.0, rng.binomial(1, 0.4, 1600) * 100.0
    low, high = bootstrap_ci(few)
    assert low < few.mean() < high
    # About 1.96 standard errors each side: sqrt(.4 * .6 / 100) * 100 = 4.9 points.
    assert (high - low) / 2 == pytest.approx(1.96 * 4.9, rel=0.2)
    low_many, high_many = bootstrap_ci(many)
    assert (high_many - low_many) == pytest.approx((high - low) / 4, rel=0.3)  # 16x the queries: 1/4 the width


def test_columns_are_bootstrapped_together():
    scores = np.stack([np.r_[np.zeros(50), np.full(50, 100.0)], np.full(100, 7.0)], axis=1)
    low, high = bootstrap_ci(scores)
    assert low[0] < 50 < high[0]
    assert low[1] == high[1] == 7.0


def test_a_consistent_small_gain_on_the_same_queries_is_significant_though_the_intervals_overlap():
    rng = np.random.default_rng(1)
    base = rng.uniform(0, 600, 150)  # per-query rsum: hard and easy queries alike for both models
    better = base + rng.normal(6, 3, 150)
    apart = [bootstrap_ci(base), bootstrap_ci(better)]
    assert apart[1][0] < apart[0][1]  # unpaired intervals overlap: side by side they say nothing
    result = paired_bootstrap("test_unseen/rsum", better, base)
    assert result.significant and result.difference == pytest.approx(6, abs=1.5)
    assert result.ci_low > 0 and result.p_value < 0.05
    assert "significant at 95%" in result.sentence() and "not" not in result.sentence()


def test_noise_is_not_significant():
    rng = np.random.default_rng(2)
    a = rng.uniform(0, 600, 150)
    b = a + rng.normal(0, 40, 150)  # same model up to noise
    result = paired_bootstrap("test_unseen/rsum", a, b)
    assert not result.significant
    assert result.ci_low < 0 < result.ci_high and result.p_value > 0.05
    assert "not significant" in result.sentence()


def test_seed_spread_widens_the_paired_interval_of_two_configurations():
    rng = np.random.default_rng(3)
    queries = rng.uniform(0, 600, 150)
    # Config A over 3 seeds: each seed shifts every query (a better or worse model), mean gain 10.
    a = np.stack([queries + shift for shift in (-30.0, 10.0, 50.0)])
    b = np.stack([queries + shift for shift in (0.0, 0.0, 0.0)])
    over = paired_bootstrap("rsum", a, b)
    one = paired_bootstrap("rsum", a[1], b[1])
    assert over.seeds == (3, 3) and over.difference == pytest.approx(10.0)
    assert (over.ci_high - over.ci_low) > 10 * (one.ci_high - one.ci_low)
    assert not over.significant  # a 10-point mean over seeds that move it by +-40 is not established


def test_seeds_shared_by_both_sides_are_paired_too():
    rng = np.random.default_rng(4)
    queries = rng.uniform(0, 600, 150)
    # Each seed moves both configurations alike (its initial weights), B a steady 8 points lower.
    shifts = (-40.0, 0.0, 40.0)
    a = np.stack([queries + s + rng.normal(0, 5, 150) for s in shifts])
    b = np.stack([queries + s - 8 + rng.normal(0, 5, 150) for s in shifts])
    apart, by_seed = paired_bootstrap("rsum", a, b), paired_bootstrap("rsum", a, b, same_seeds=True)
    assert not apart.significant  # the seeds' spread swamps the gain ...
    assert by_seed.significant and by_seed.ci_low > 6  # ... unless each seed is compared with itself
    assert "paired by seed" in by_seed.sentence()
    with pytest.raises(ValueError, match="as many runs"):
        paired_bootstrap("rsum", a, b[:2], same_seeds=True)


def test_paired_scores_need_the_same_queries():
    with pytest.raises(ValueError, match="same queries"):
        paired_bootstrap("rsum", np.ones(10), np.ones(11))


def test_over_seeds_gives_mean_spread_and_a_t_interval():
    summary = over_seeds([275.7, 320.8, 338.9, 351.4, 344.4])
    assert summary.n == 5 and summary.mean == pytest.approx(326.24)
    assert summary.low == 275.7 and summary.high == 351.4
    # t(0.975, 4) = 2.776; sd 30.5 → half-width 2.776 * 30.5 / sqrt(5) = 37.9
    assert summary.std == pytest.approx(30.5, abs=0.2)
    assert summary.ci_high - summary.mean == pytest.approx(37.9, abs=0.3)
    single = over_seeds([300.0])
    assert single.ci_low == single.ci_high == 300.0
