"""Statistics of a before/after comparison over the same prompts: pure functions of tensors and plain numbers.

Every comparison here is *paired*: prompt ``i`` was answered once before and once after training, so the
unit of resampling and of the significance test is the per-prompt difference ``d_i``, not the two samples
as if they were independent.
"""

from __future__ import annotations

import math
from collections.abc import Hashable, Sequence
from dataclasses import dataclass
from typing import Literal, get_args

import numpy as np
import scipy.stats
from torch import Tensor

PairedTestMethod = Literal["wilcoxon", "permutation", "auto"]
"""``auto`` is the Wilcoxon test (an older name kept so that existing configs still run)."""


def mean_std(x: Tensor) -> tuple[float, float]:
    """Mean and population standard deviation (ddof=0, numpy's default that the recipe's ``np.std`` uses).

    x: [N]. An empty x gives (nan, nan)."""
    if x.numel() == 0:
        return math.nan, math.nan
    x = x.double()
    return float(x.mean()), float(x.std(correction=0))


def improvement_percent(before: float, after: float) -> float:
    """Relative decrease ``(before - after) / before * 100`` (positive: lower after, e.g. less toxic).

    The recipe's "percentage improvement of toxicity"; nan when ``before`` is 0 (no relative change exists)."""
    if before == 0 or not math.isfinite(before) or not math.isfinite(after):
        return math.nan
    return (before - after) / before * 100.0


def bootstrap_ci(
    differences: Tensor, num_resamples: int = 2000, confidence: float = 0.95, seed: int = 0
) -> tuple[float, float]:
    """BCa bootstrap confidence interval of the mean of paired differences (``scipy.stats.bootstrap``).

    differences: [N], one per prompt (e.g. toxicity before - after). Resampling the differences with
    replacement is resampling the prompts (each prompt keeps its before and after together); the interval is
    the bias-corrected and accelerated one (Efron & Tibshirani 1993, ch. 14), drawn ``num_resamples`` times
    from a generator seeded with ``seed``, so it is reproducible. All differences equal (including N = 1)
    gives the degenerate interval (d, d); an empty input gives (nan, nan).
    """
    if not 0.0 < confidence < 1.0:
        raise ValueError(f"`confidence` must lie in (0, 1), got {confidence}")
    if num_resamples < 1:
        raise ValueError(f"`num_resamples` must be at least 1, got {num_resamples}")
    d = differences.double().flatten().numpy()
    if d.size == 0:
        return math.nan, math.nan
    if (d == d[0]).all():
        # every resample has the same mean; scipy's BCa is undefined there (no spread to correct)
        return float(d[0]), float(d[0])
    result = scipy.stats.bootstrap(
        (d,), np.mean, n_resamples=num_resamples, confidence_level=confidence, method="BCa",
        vectorized=True, random_state=np.random.default_rng(seed),
    )
    return float(result.confidence_interval.low), float(result.confidence_interval.high)


@dataclass(frozen=True)
class PairedTestResult:
    """A two-sided paired test of "no difference between before and after"."""

    test: str
    """Which test was run, e.g. ``Wilcoxon signed-rank test (scipy)`` or ``sign-flip permutation test (exact)``."""
    statistic: float
    """The test's statistic: Wilcoxon's W (scipy's), or the mean difference for the sign-flip test."""
    p_value: float


def paired_test(
    before: Tensor,
    after: Tensor,
    method: PairedTestMethod = "wilcoxon",
    num_permutations: int = 10000,
    seed: int = 0,
) -> PairedTestResult:
    """Two-sided paired test that before and after do not differ. before, after: [N], paired by position.

    ``wilcoxon`` (and ``auto``, its older name): ``scipy.stats.wilcoxon``, the signed-rank test (zero
    differences dropped, scipy's default; exact distribution for small N without ties). ``permutation``:
    ``scipy.stats.permutation_test`` with ``permutation_type="samples"`` on the differences, i.e. a sign-flip
    test of the mean difference (under H0 each difference is as likely positive as negative); exact over all
    2^n sign patterns when 2^n <= ``num_permutations``, else that many random patterns from a generator
    seeded with ``seed``. When every difference is 0 the p-value is 1.
    """
    if before.shape != after.shape or before.dim() != 1:
        raise ValueError(
            f"`before` and `after` must be 1-d and equally long, got {tuple(before.shape)} and {tuple(after.shape)}"
        )
    if method not in get_args(PairedTestMethod):
        raise ValueError(f"`paired_test` must be one of {get_args(PairedTestMethod)}, got {method!r}")
    b, a = before.double().numpy(), after.double().numpy()
    d = b - a  # [N]
    exact = 2 ** len(d) <= num_permutations
    if method == "permutation":
        name = f"sign-flip permutation test ({'exact' if exact else f'{num_permutations} random sign patterns'})"
    else:
        name = "Wilcoxon signed-rank test (scipy)"
    if not (d != 0).any():
        return PairedTestResult(name, 0.0, 1.0)
    if method == "permutation":
        result = scipy.stats.permutation_test(
            (d,), np.mean, permutation_type="samples", vectorized=True, n_resamples=num_permutations,
            alternative="two-sided", random_state=np.random.default_rng(seed),
        )
    else:
        result = scipy.stats.wilcoxon(b, a, alternative="two-sided")
    return PairedTestResult(name, float(result.statistic), float(result.pvalue))


def distinct_n(sequences: Sequence[Sequence[Hashable]], n: int) -> float:
    """Share of unique n-grams among all n-grams of all sequences (distinct-n, Li et al. 2016, arXiv:1510.03055).

    Corpus level: 1.0 when no n-gram repeats anywhere, lower the more the responses repeat themselves and
    each other. 0.0 when there is no n-gram at all."""
    if n < 1:
        raise ValueError(f"n must be at least 1, got {n}")
    ngrams = [tuple(seq[i : i + n]) for seq in sequences for i in range(len(seq) - n + 1)]
    return len(set(ngrams)) / len(ngrams) if ngrams else 0.0


def words(text: str) -> list[str]:
    """The tokens distinct-n counts: lowercased whitespace-separated words."""
    return text.lower().split()
