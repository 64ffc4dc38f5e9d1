"""Statistics of a before/after comparison over the same prompts: pure functions of tensors and plain numbers.

Every comparison here is *paired*: prompt ``i`` was answered once before and once after training, so the
unit of resampling and of the significance test is the per-prompt difference ``d_i``, not the two samples
as if they were independent.
"""

from __future__ import annotations

import math
from collections.abc import Hashable, Sequence
from dataclasses import dataclass
from typing import Literal

import torch
from torch import Tensor

PairedTestMethod = Literal["auto", "wilcoxon", "permutation"]

_EXACT_SIGN_FLIPS_UP_TO = 16
"""Below this many non-zero differences the sign-flip test enumerates all 2^n sign patterns (exact p-value)."""


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
    """Percentile bootstrap confidence interval of the mean of paired differences.

    differences: [N], one per prompt (e.g. toxicity before - after). Prompts are resampled with replacement
    ``num_resamples`` times with a fixed seed, so the interval is reproducible; the interval is the
    ((1 - confidence) / 2, (1 + confidence) / 2) quantiles of the resampled means (Efron & Tibshirani 1993,
    ch. 13). An empty input gives (nan, nan).
    """
    if not 0.0 < confidence < 1.0:
        raise ValueError(f"`confidence` must lie in (0, 1), got {confidence}")
    if num_resamples < 1:
        raise ValueError(f"`num_resamples` must be at least 1, got {num_resamples}")
    d = differences.double().flatten()
    n = d.numel()
    if n == 0:
        return math.nan, math.nan
    generator = torch.Generator().manual_seed(seed)
    idx = torch.randint(0, n, (num_resamples, n), generator=generator)  # [R, N]
    means = d[idx].mean(1)  # [R]
    alpha = (1.0 - confidence) / 2
    low, high = torch.quantile(means, torch.tensor([alpha, 1.0 - alpha], dtype=torch.float64))
    return float(low), float(high)


@dataclass(frozen=True)
class PairedTestResult:
    """A two-sided paired test of "no difference between before and after"."""

    test: str
    """Which test was run, e.g. ``Wilcoxon signed-rank test (scipy)`` or ``sign-flip permutation test (exact)``."""
    statistic: float
    """The test's statistic: Wilcoxon's W (scipy's), or the mean difference for the sign-flip test."""
    p_value: float


def scipy_available() -> bool:
    try:
        import scipy.stats  # noqa: F401
    except ImportError:
        return False
    return True


def paired_test(
    before: Tensor,
    after: Tensor,
    method: PairedTestMethod = "auto",
    num_permutations: int = 10000,
    seed: int = 0,
) -> PairedTestResult:
    """Two-sided paired test that before and after do not differ. before, after: [N], paired by position.

    ``wilcoxon``: Wilcoxon signed-rank test from scipy (zero differences dropped, scipy's default; exact
    distribution for small N without ties). ``permutation``: sign-flip permutation test of the mean
    difference (under H0 each difference is as likely positive as negative); exact over all 2^n sign
    patterns for n <= 16 non-zero differences, else ``num_permutations`` random patterns with a fixed seed
    and the add-one p-value (Phipson & Smyth 2010). ``auto``: Wilcoxon when scipy is installed, else the
    sign-flip test. When every difference is 0 the p-value is 1.
    """
    if before.shape != after.shape or before.dim() != 1:
        raise ValueError(
            f"`before` and `after` must be 1-d and equally long, got {tuple(before.shape)} and {tuple(after.shape)}"
        )
    if method not in ("auto", "wilcoxon", "permutation"):
        raise ValueError(f"`method` must be 'auto', 'wilcoxon' or 'permutation', got {method!r}")
    if method == "auto":
        method = "wilcoxon" if scipy_available() else "permutation"
    d = (before.double() - after.double())
    nonzero = d[d != 0]
    name = "Wilcoxon signed-rank test (scipy)" if method == "wilcoxon" else "sign-flip permutation test"
    if nonzero.numel() == 0:
        return PairedTestResult(name, 0.0, 1.0)
    if method == "wilcoxon":
        from scipy.stats import wilcoxon

        result = wilcoxon(before.double().numpy(), after.double().numpy(), alternative="two-sided")
        return PairedTestResult(name, float(result.statistic), float(result.pvalue))
    return _sign_flip_test(nonzero, num_permutations, seed)


def _sign_flip_test(d: Tensor, num_permutations: int, seed: int) -> PairedTestResult:
    """p = P(|mean(s * d)| >= |mean(d)|) over random signs s; d: [n] non-zero differences."""
    n = d.numel()
    observed = d.mean().abs()
    if n <= _EXACT_SIGN_FLIPS_UP_TO:
        # row k's signs are the bits of k: all 2^n patterns
        bits = (torch.arange(2**n)[:, None] >> torch.arange(n)[None]) & 1  # [2^n, n]
        signs = bits.double() * 2 - 1
        exact = True
    else:
        generator = torch.Generator().manual_seed(seed)
        signs = torch.randint(0, 2, (num_permutations, n), generator=generator).double() * 2 - 1  # [R, n]
        exact = False
    flipped = (signs * d).mean(1).abs()  # [R]
    # a relative tolerance, so permutations equal to the observed mean up to rounding count as "as extreme"
    extreme = (flipped >= observed * (1 - 1e-12)).sum().item()
    p = extreme / len(signs) if exact else (extreme + 1) / (len(signs) + 1)
    name = f"sign-flip permutation test ({'exact' if exact else f'{num_permutations} random sign patterns'})"
    return PairedTestResult(name, float(d.mean()), float(min(1.0, p)))


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
