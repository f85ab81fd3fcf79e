"""How sure a retrieval figure is: bootstrap confidence intervals over test queries, paired
tests between two models on the same queries, and summaries over training seeds.

Every metric the evaluator reports is a mean over test samples of a per-sample score (see
`evaluate.sample_scores`: R@k of a sample is 100 when its first relevant item ranks within k,
its rsum the sum of its six recalls), so each figure's uncertainty is that of a mean:
resampling the samples with replacement (the bootstrap) gives its 95% interval, and resampling
the per-sample *differences* of two models on the same samples gives the interval of their
difference, which is much narrower than the two intervals side by side because the hard
queries are hard for both.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

CONFIDENCE = 0.95
BOOTSTRAP_SAMPLES = 2000


def _weights(n: int, samples: int, seed: int) -> np.ndarray:
    """[samples, n]: how often each of n items is drawn in each bootstrap resample."""
    return np.random.default_rng(seed).multinomial(n, np.full(n, 1.0 / n), size=samples).astype(np.float64)


def _interval(draws: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    tail = 100 * (1 - CONFIDENCE) / 2
    return np.percentile(draws, tail, axis=0), np.percentile(draws, 100 - tail, axis=0)


def bootstrap_ci(scores: np.ndarray, samples: int = BOOTSTRAP_SAMPLES, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """95% percentile-bootstrap interval of the mean of `scores` [N] or of each column of [N, M]."""
    scores = np.asarray(scores, dtype=np.float64)
    if len(scores) == 0:
        raise ValueError("no scores to bootstrap")
    draws = _weights(len(scores), samples, seed) @ scores.reshape(len(scores), -1) / len(scores)
    low, high = _interval(draws)
    return (low[0], high[0]) if scores.ndim == 1 else (low, high)


@dataclass(frozen=True)
class PairedResult:
    """Model A minus model B on the same test queries."""
    metric: str
    a: float
    b: float
    difference: float
    ci_low: float
    ci_high: float
    p_value: float  # two-sided, from the same bootstrap distribution
    queries: int
    seeds: tuple[int, int] = (1, 1)  # runs averaged on each side
    same_seeds: bool = False  # the sides' runs were paired by seed

    @property
    def significant(self) -> bool:
        """The 95% interval of the difference excludes zero."""
        return self.ci_low > 0 or self.ci_high < 0

    def sentence(self) -> str:
        verdict = "significant" if self.significant else "not significant"
        seeds = "" if self.seeds == (1, 1) else f", {self.seeds[0]} vs {self.seeds[1]} seeds"
        seeds += " paired by seed" if self.same_seeds else ""
        return (f"{self.metric}: {self.a:.1f} vs {self.b:.1f}, difference {self.difference:+.1f} "
                f"(95% CI {self.ci_low:+.1f} to {self.ci_high:+.1f}, p={self.p_value:.3f}, "
                f"{self.queries} paired queries{seeds}): {verdict} at 95%")


def paired_bootstrap(metric: str, a: np.ndarray, b: np.ndarray, samples: int = BOOTSTRAP_SAMPLES,
                     seed: int = 0, same_seeds: bool = False) -> PairedResult:
    """Compare per-query scores of two groups of runs on the same queries.

    `a` [Sa, N] and `b` [Sb, N]: one row per run (seed), one column per query, columns aligned.
    Each resample draws the queries once for both sides (the pairing) and each side's seeds with
    replacement, so the interval covers seed-to-seed spread as well as which queries were drawn.
    `same_seeds`: row i of both sides was trained with the same seed (the same initial weights
    and data order), so seeds are drawn once for both sides too. With one run a side this is
    the ordinary paired bootstrap."""
    a, b = np.atleast_2d(np.asarray(a, np.float64)), np.atleast_2d(np.asarray(b, np.float64))
    if a.shape[1] != b.shape[1] or a.shape[1] == 0:
        raise ValueError(f"paired scores need the same queries on both sides ({a.shape[1]} vs {b.shape[1]})")
    rng = np.random.default_rng(seed)
    n = a.shape[1]
    weights = _weights(n, samples, seed)
    per_run_a, per_run_b = weights @ a.T / n, weights @ b.T / n  # [samples, Sa], [samples, Sb]

    if same_seeds and a.shape[0] != b.shape[0]:
        raise ValueError(f"same_seeds needs as many runs on each side ({a.shape[0]} vs {b.shape[0]})")
    shared = rng.integers(0, a.shape[0], size=per_run_a.shape) if same_seeds else None

    def seed_means(per_run: np.ndarray) -> np.ndarray:
        if per_run.shape[1] == 1:
            return per_run[:, 0]
        pick = shared if shared is not None else rng.integers(0, per_run.shape[1], size=per_run.shape)
        return np.take_along_axis(per_run, pick, axis=1).mean(axis=1)

    draws = seed_means(per_run_a) - seed_means(per_run_b)
    low, high = _interval(draws)
    p = min(1.0, 2 * min(np.mean(draws <= 0), np.mean(draws >= 0)))
    mean_a, mean_b = float(a.mean()), float(b.mean())
    return PairedResult(metric, mean_a, mean_b, mean_a - mean_b, float(low), float(high), float(p), n,
                        (a.shape[0], b.shape[0]), same_seeds and a.shape[0] > 1)


@dataclass(frozen=True)
class SeedSummary:
    """One configuration over its seeds: mean, spread, and the t-interval of the mean."""
    n: int
    mean: float
    std: float
    low: float
    high: float
    ci_low: float
    ci_high: float


def over_seeds(values: list[float]) -> SeedSummary:
    from scipy import stats as scipy_stats

    v = np.asarray(values, dtype=np.float64)
    std = float(v.std(ddof=1)) if len(v) > 1 else 0.0
    half = float(scipy_stats.t.ppf(0.5 + CONFIDENCE / 2, len(v) - 1) * std / np.sqrt(len(v))) if len(v) > 1 else 0.0
    mean = float(v.mean())
    return SeedSummary(len(v), mean, std, float(v.min()), float(v.max()), mean - half, mean + half)
