"""Paired before/after statistics (scipy.stats) checked against independent computations."""

import itertools
import math

import numpy as np
import pytest
import torch

from lit_rlhf.callbacks import stats


def exact_sign_flip_p(d: list[float]) -> float:
    """Two-sided sign-flip p-value by enumerating all 2^n sign patterns: P(|mean(s*d)| >= |mean(d)|)."""
    observed = abs(sum(d) / len(d))
    flips = [abs(sum(s * x for s, x in zip(signs, d)) / len(d)) for signs in itertools.product((1, -1), repeat=len(d))]
    return sum(f >= observed - 1e-12 for f in flips) / len(flips)


@pytest.mark.parametrize("n", [3, 6, 10])
def test_permutation_test_equals_full_sign_flip_enumeration(n):
    generator = torch.Generator().manual_seed(n)
    before = torch.rand(n, generator=generator, dtype=torch.float64)
    after = before - 0.1 + 0.3 * torch.randn(n, generator=generator, dtype=torch.float64)
    result = stats.paired_test(before, after, "permutation", num_permutations=2**n)
    assert "exact" in result.test
    assert result.p_value == pytest.approx(exact_sign_flip_p((before - after).tolist()), abs=1e-12)
    assert result.statistic == pytest.approx(float((before - after).mean()))


def test_sign_flip_test_is_exact_on_a_hand_example():
    # d = [1, 1, 1]: of the 8 sign patterns only +++ and --- reach |mean| >= 1, so p = 2 / 8
    result = stats.paired_test(torch.tensor([2.0, 3.0, 4.0]), torch.tensor([1.0, 2.0, 3.0]), "permutation")
    assert result.p_value == pytest.approx(0.25)
    assert "exact" in result.test


def test_random_sign_flips_are_seeded_and_close_to_exact():
    generator = torch.Generator().manual_seed(0)
    before = torch.rand(14, generator=generator, dtype=torch.float64)
    after = before - 0.05 + 0.2 * torch.randn(14, generator=generator, dtype=torch.float64)
    sampled = stats.paired_test(before, after, "permutation", num_permutations=4000, seed=3)
    assert "4000 random sign patterns" in sampled.test
    assert stats.paired_test(before, after, "permutation", num_permutations=4000, seed=3) == sampled
    exact = exact_sign_flip_p((before - after).tolist())
    # 4000 draws: the standard error of a p-value near 0.5 is ~0.008
    assert sampled.p_value == pytest.approx(exact, abs=0.04)


@pytest.mark.parametrize("method", ["wilcoxon", "permutation"])
def test_paired_test_detects_a_shift_and_not_its_absence(method):
    generator = torch.Generator().manual_seed(0)
    before = torch.rand(40, generator=generator, dtype=torch.float64)
    shifted = before - 0.2 + 0.01 * torch.randn(40, generator=generator, dtype=torch.float64)
    assert stats.paired_test(before, shifted, method).p_value < 1e-3
    # differences +a_i and -a_i in pairs: symmetric around 0, no shift at all
    a = torch.rand(20, generator=generator, dtype=torch.float64) + 0.1
    after = before + torch.cat([a, -a])
    assert stats.paired_test(before, after, method).p_value > 0.9
    assert stats.paired_test(before, before.clone(), method).p_value == 1.0


def test_wilcoxon_on_a_hand_example():
    # d = [4, 0.5, 7, -0.25, 4, -0.5]: |d| ranks 1 (0.25), 2.5 (0.5 twice), 4.5 (4 twice), 6 (7);
    # negative ranks sum to 1 + 2.5 = 3.5 = W (scipy's two-sided statistic: the smaller rank sum)
    after = torch.tensor([1.0, 2.0, 3.0, 4.0, 5.0, 6.0], dtype=torch.float64)
    before = after + torch.tensor([4.0, 0.5, 7.0, -0.25, 4.0, -0.5], dtype=torch.float64)
    for method in ("wilcoxon", "auto"):  # "auto" is the older name of the same test
        result = stats.paired_test(before, after, method)
        assert result.test.startswith("Wilcoxon")
        assert result.statistic == pytest.approx(3.5)
        assert 0.1 < result.p_value < 0.5


def test_unknown_paired_test_names_the_option():
    with pytest.raises(ValueError, match="`paired_test` must be one of"):
        stats.paired_test(torch.zeros(3), torch.ones(3), "ttest")


def test_bootstrap_ci_contains_the_true_mean_difference():
    generator = torch.Generator().manual_seed(1)
    differences = 0.1 + 0.05 * torch.randn(400, generator=generator, dtype=torch.float64)  # true mean 0.1
    low, high = stats.bootstrap_ci(differences, num_resamples=2000, confidence=0.95, seed=0)
    assert low < 0.1 < high
    assert low < float(differences.mean()) < high
    # the normal-theory interval: mean +- 1.96 * s / sqrt(n); the bootstrap agrees within a few percent
    half = 1.96 * float(differences.std()) / math.sqrt(400)
    assert high - low == pytest.approx(2 * half, rel=0.1)
    assert stats.bootstrap_ci(differences, 2000, 0.95, seed=0) == (low, high)  # fixed seed: reproducible
    assert stats.bootstrap_ci(differences, 2000, 0.95, seed=1) != (low, high)


def test_bootstrap_ci_covers_the_mean_at_its_confidence():
    # 200 independent samples of 30 skewed differences (exponential, true mean 1): a 90% interval should
    # contain 1 about 180 times; BCa on n=30 undercovers slightly, so accept 160..195
    rng = np.random.default_rng(0)
    hits = sum(
        low <= 1.0 <= high
        for low, high in (stats.bootstrap_ci(torch.from_numpy(rng.exponential(1.0, 30)), 500, 0.90, seed=i)
                          for i in range(200))
    )
    assert 160 <= hits <= 195


def test_bootstrap_ci_of_constant_or_empty_differences():
    assert stats.bootstrap_ci(torch.full((5,), 0.3), 100) == pytest.approx((0.3, 0.3))
    assert stats.bootstrap_ci(torch.tensor([0.7]), 100) == pytest.approx((0.7, 0.7))
    assert all(math.isnan(x) for x in stats.bootstrap_ci(torch.tensor([]), 100))
    with pytest.raises(ValueError, match="confidence"):
        stats.bootstrap_ci(torch.ones(3), 100, confidence=1.0)


def test_improvement_percent_is_the_relative_decrease():
    assert stats.improvement_percent(0.2, 0.15) == pytest.approx(25.0)  # (0.2 - 0.15) / 0.2
    assert stats.improvement_percent(0.2, 0.3) == pytest.approx(-50.0)  # worse after: negative
    assert math.isnan(stats.improvement_percent(0.0, 0.1))


def test_mean_std_is_the_population_std():
    mean, std = stats.mean_std(torch.tensor([1.0, 2.0, 3.0, 4.0]))
    assert mean == pytest.approx(2.5)
    assert std == pytest.approx(math.sqrt(1.25))  # squared deviations 2.25, .25, .25, 2.25 -> mean 1.25


def test_distinct_n_on_a_hand_example():
    responses = [["a", "b", "a"], ["a", "b"]]
    assert stats.distinct_n(responses, 1) == pytest.approx(2 / 5)  # a b a a b: {a, b}
    assert stats.distinct_n(responses, 2) == pytest.approx(2 / 3)  # ab ba ab: {ab, ba}
    assert stats.distinct_n([["x"]], 2) == 0.0  # no bigram at all
