import math
import random

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from llmrec.evaluation.metrics import (
    compute_metrics,
    paired_bootstrap_ci,
    per_row_metrics,
    rank_of_target,
    ranks_from_scores,
    rows_for_power,
    seed_row_ci,
    student_t_quantile,
)


def test_rank_of_target():
    assert rank_of_target([5, 3, 9], 5) == 0
    assert rank_of_target([5, 3, 9], 9) == 2
    assert rank_of_target([5, 3, 9], 4) is None
    assert rank_of_target([], 4) is None
    assert rank_of_target([1, 2, 2], 2) == 1  # first occurrence


def test_hand_computed():
    # ranks: hit at 0, hit at 2, hit at 4, absent (None), absent (-1)
    m = compute_metrics([0, 2, 4, None, -1], ks=(1, 3, 5))
    assert m["hr@1"] == pytest.approx(1 / 5)
    assert m["hr@3"] == pytest.approx(2 / 5)
    assert m["hr@5"] == pytest.approx(3 / 5)
    assert m["ndcg@1"] == pytest.approx(1 / 5)
    assert m["ndcg@3"] == pytest.approx((1 + 1 / math.log2(4)) / 5)
    assert m["ndcg@5"] == pytest.approx((1 + 0.5 + 1 / math.log2(6)) / 5)
    assert m["mrr@3"] == pytest.approx((1 + 1 / 3) / 5)
    assert m["mrr@5"] == pytest.approx((1 + 1 / 3 + 1 / 5) / 5)
    assert set(m) == {f"{n}@{k}" for n in ("hr", "ndcg", "mrr") for k in (1, 3, 5)}


def test_ranks_in_any_form_give_the_same_metrics_and_broken_ranks_are_refused_with_their_row():
    want = compute_metrics([0, 2, None, -1], ks=(1, 3))
    for form in (np.array([0, 2, -1, -5]), torch.tensor([0, 2, -1, -1]), np.array([0.0, 2.0, -1.0, -1.0]),
                 torch.tensor([0.0, 2.0, -1.0, -1.0], dtype=torch.float16), [0, 2.0, None, -3]):
        assert compute_metrics(form, ks=(1, 3)) == want
    # A NaN became a huge negative int64 (an absent target) and 1.5 was truncated to 1: both silently.
    for bad, row in ((np.array([0.0, np.nan]), 1), (torch.tensor([1.5, 0.0]), 0), ([0, None, 2.5], 2),
                     ([float("inf")], 0)):
        with pytest.raises(ValueError, match=rf"rank of row {row} is .*whole numbers"):
            compute_metrics(bad, ks=(10,))
    with pytest.raises(ValueError, match="whole numbers"):
        per_row_metrics(["0", "1"], ks=(10,))


def test_max_k_filters_cutoffs_and_inputs():
    m = compute_metrics(np.array([0, 12]), ks=(1, 5, 10, 20), max_k=10)
    assert set(m) == {f"{n}@{k}" for n in ("hr", "ndcg", "mrr") for k in (1, 5, 10)}
    assert compute_metrics(torch.tensor([0, 12]), ks=(20,))["hr@20"] == 1.0
    with pytest.raises(ValueError):
        compute_metrics([0], ks=(20,), max_k=10)
    with pytest.raises(ValueError):
        compute_metrics([], ks=(1,))


def _plain_metrics(ranks, ks):
    out = {}
    for k in ks:
        hr = ndcg = mrr = 0.0
        for r in ranks:
            if r is not None and r < k:
                hr += 1
                ndcg += 1 / math.log2(r + 2)
                mrr += 1 / (r + 1)
        out[f"hr@{k}"] = hr / len(ranks)
        out[f"ndcg@{k}"] = ndcg / len(ranks)
        out[f"mrr@{k}"] = mrr / len(ranks)
    return out


@settings(max_examples=60, deadline=None)
@given(
    lists=st.lists(
        st.tuples(st.permutations(list(range(30))), st.integers(0, 40), st.integers(1, 30)), min_size=1, max_size=20
    ),
    ks=st.sets(st.integers(1, 25), min_size=1, max_size=5),
)
def test_against_plain_python(lists, ks):
    ranks = []
    for perm, target, list_len in lists:
        ranked = perm[:list_len]
        ranks.append(rank_of_target(ranked, target))
    got = compute_metrics(ranks, ks)
    want = _plain_metrics(ranks, sorted(ks))
    assert got.keys() == want.keys()
    for key in want:
        assert got[key] == pytest.approx(want[key], abs=1e-12)
    rows = per_row_metrics(ranks, ks)
    for key in want:
        assert rows[key].shape == (len(ranks),)
        assert rows[key].mean() == pytest.approx(want[key], abs=1e-12)


def _argsort_ranks(scores, targets):
    # Independent: stable sort on (-score) after ordering by id, i.e. lexicographic (score desc, id asc).
    out = []
    for row, t in zip(scores.tolist(), targets.tolist(), strict=True):
        order = sorted(range(len(row)), key=lambda j: (-row[j], j))
        out.append(order.index(t))
    return out


@pytest.mark.parametrize("seed", range(5))
def test_ranks_from_scores_vs_argsort(seed):
    g = torch.Generator().manual_seed(seed)
    n_rows, n_items = 17, 50
    # Few distinct values -> many ties, to exercise the tie rule.
    scores = torch.randint(0, 6, (n_rows, n_items), generator=g).float()
    scores[0, :5] = float("-inf")
    targets = torch.randint(0, n_items, (n_rows,), generator=g)
    got = ranks_from_scores(scores, targets, chunk_elements=3 * n_items)  # force several chunks
    assert got.dtype == torch.long
    assert got.tolist() == _argsort_ranks(scores, targets)
    # And continuous scores agree with torch.argsort.
    scores = torch.randn(n_rows, n_items, generator=g)
    want = [int((torch.argsort(-row) == t).nonzero()) for row, t in zip(scores, targets, strict=True)]
    assert ranks_from_scores(scores, targets).tolist() == want


def test_ranks_from_scores_tie_rule_and_errors():
    scores = torch.tensor([[1.0, 2.0, 2.0, 2.0, 0.0]])
    assert ranks_from_scores(scores, torch.tensor([1])).tolist() == [0]
    assert ranks_from_scores(scores, torch.tensor([3])).tolist() == [2]
    assert ranks_from_scores(scores, torch.tensor([4])).tolist() == [4]
    with pytest.raises(ValueError):
        ranks_from_scores(torch.tensor([[float("nan"), 1.0]]), torch.tensor([0]))
    with pytest.raises(ValueError):
        ranks_from_scores(scores, torch.tensor([5]))


def test_paired_bootstrap():
    rng = random.Random(0)
    a = np.array([rng.random() < 0.6 for _ in range(400)], dtype=float)
    b = np.array([rng.random() < 0.4 for _ in range(400)], dtype=float)
    diff, lo, hi = paired_bootstrap_ci(a, b, n_resamples=2000, seed=1)
    assert diff == pytest.approx(a.mean() - b.mean())
    assert lo < diff < hi
    assert lo > 0  # a is clearly better
    assert paired_bootstrap_ci(a, b, n_resamples=2000, seed=1) == (diff, lo, hi)  # seeded
    same = paired_bootstrap_ci(a, a, n_resamples=500)
    assert same == (0.0, 0.0, 0.0)
    with pytest.raises(ValueError):
        paired_bootstrap_ci(a, b[:-1])


@pytest.mark.parametrize("n", [0, -1])
def test_paired_bootstrap_needs_a_resample(n):
    with pytest.raises(ValueError, match="n_resamples must be >= 1"):
        paired_bootstrap_ci([1.0, 0.0], [0.0, 0.0], n_resamples=n)


@pytest.mark.parametrize("p, df, expected", [
    (0.975, 1, 12.706205), (0.975, 2, 4.302653), (0.975, 10, 2.228139), (0.995, 3, 5.840909), (0.975, 30, 2.042272),
    (0.025, 5, -2.570582), (0.975, 1e7, 1.959964),
])
def test_student_t_quantile_matches_the_tables(p, df, expected):
    assert student_t_quantile(p, df) == pytest.approx(expected, rel=1e-5)


@pytest.mark.parametrize("p", [0.9, 0.975, 0.995])
@pytest.mark.parametrize("df", [0.2, 0.35, 0.7, 1.0, 2.0, 4.5])
def test_student_t_quantile_below_one_degree_of_freedom(p, df):
    """Closed forms at df 1 (Cauchy) and 2, and the tail integral of the density otherwise: the grid integration
    gave 207.7 for the 0.975 quantile at df 0.2 (~7.7e5), which Satterthwaite's df reaches with 2 seeds."""
    import mpmath

    t = student_t_quantile(p, df)
    if df == 1.0:
        assert t == pytest.approx(math.tan(math.pi * (p - 0.5)), rel=1e-9)
    elif df == 2.0:
        assert t == pytest.approx((2 * p - 1) / math.sqrt(2 * p * (1 - p)), rel=1e-9)
    with mpmath.workdps(40):  # P(T > t) by quadrature of the density (substituting t = tan u, so the tail is finite)
        c = mpmath.gamma((df + 1) / 2) / (mpmath.sqrt(df * mpmath.pi) * mpmath.gamma(df / 2))
        density = lambda u: c * (1 + mpmath.tan(u) ** 2 / df) ** (-(df + 1) / 2) / mpmath.cos(u) ** 2  # noqa: E731
        tail = mpmath.quad(density, [mpmath.atan(t), (mpmath.atan(t) + mpmath.pi / 2) / 2, mpmath.pi / 2])
    assert float(tail) == pytest.approx(1 - p, rel=1e-6)


def _crossed_coverage(n_seeds: int, sd_seed: float, sd_row: float, sd_cell: float, sims: int = 400) -> float:
    """How often :func:`seed_row_ci` covers the true mean difference 0 over data drawn from the crossed model."""
    rng = np.random.default_rng(n_seeds)
    hits = 0
    for _ in range(sims):
        d = (rng.normal(0, sd_seed, (n_seeds, 1)) + rng.normal(0, sd_row, (1, 200))
             + rng.normal(0, sd_cell, (n_seeds, 200)))
        _, lo, hi = seed_row_ci(d, np.zeros_like(d))
        hits += lo <= 0.0 <= hi
    return hits / sims


@pytest.mark.parametrize("n_seeds, sd_seed, sd_row, sd_cell", [
    (3, 1.0, 1.0, 1.0),  # the seeds dominate
    (3, 0.0, 1.0, 3.0),  # the seed x row interaction dominates (where resampling both levels over-covers)
    (6, 0.2, 1.0, 3.0),
])
def test_seed_row_ci_covers_the_true_difference_at_its_level(n_seeds, sd_seed, sd_row, sd_cell):
    # 400 draws: the coverage estimate has a standard error of about 0.011 around 0.95
    assert 0.91 <= _crossed_coverage(n_seeds, sd_seed, sd_row, sd_cell) <= 0.985


def test_seed_row_ci_counts_the_spread_between_seeds_and_pairs_them():
    # Seed 0 gains 1 on every row, seed 1 loses 1: seed-averaged rows show no spread at all, yet another pair of
    # training runs could land anywhere; the interval is the t(1) one of the two seed means.
    a = np.array([[1.0] * 50, [-1.0] * 50])
    b = np.zeros_like(a)
    assert paired_bootstrap_ci(a.mean(axis=0), b.mean(axis=0), n_resamples=500) == (0.0, 0.0, 0.0)
    diff, lo, hi = seed_row_ci(a, b)
    assert diff == 0.0 and lo == pytest.approx(-12.706205, rel=1e-5) and hi == pytest.approx(12.706205, rel=1e-5)
    # A shift that both runs of a seed share cancels in the pairing: only the rows' spread is left.
    rng = np.random.default_rng(0)
    x = (rng.random((3, 400)) < 0.3).astype(float)
    y = (rng.random((3, 400)) < 0.2).astype(float)
    shift = np.array([[5.0], [-3.0], [9.0]])
    assert seed_row_ci(x + shift, y + shift) == pytest.approx(seed_row_ci(x, y))
    # With the seeds agreeing, the interval is close to the row bootstrap of the seed-averaged rows.
    same = np.tile(x[:1], (3, 1)), np.tile(y[:1], (3, 1))
    d, lo, hi = seed_row_ci(*same)
    d0, lo0, hi0 = paired_bootstrap_ci(x[0], y[0], n_resamples=4000)
    assert d == pytest.approx(d0) and lo == pytest.approx(lo0, abs=0.01) and hi == pytest.approx(hi0, abs=0.01)
    # Every cell the same: no spread to go by.
    assert seed_row_ci(np.ones((2, 3)), np.zeros((2, 3))) == (1.0, 1.0, 1.0)


def test_seed_row_ci_satterthwaite_df_combines_each_mean_squares_coefficients():
    # d = 0.5 + seed_i + row_j + e_ij on 3 seeds x 6 rows, every effect summing to 0 along each axis, so the mean
    # squares are exact: MS_seed = 6 * (9 + 0 + 9) / 2 = 54, MS_err = (4 * 4 * 3) / (2 * 5) = 4.8.
    seed = np.array([3.0, 0.0, -3.0])[:, None]
    e = np.array([[2.0, -2.0, 2.0, -2.0, 2.0, -2.0], [-2.0, 2.0, -2.0, 2.0, -2.0, 2.0], [0.0] * 6])
    zeros = np.zeros((3, 6))
    # Rows 3, -3, 1, -1, 2, -2: MS_row = 3 * 28 / 5 = 16.8 > MS_err, both components kept, so 18 var = MS_seed +
    # MS_row - MS_err (MS_err's net coefficient -1) and df = 66^2 / (54^2 / 2 + 16.8^2 / 5 + 4.8^2 / 10).
    d = 0.5 + seed + np.array([3.0, -3.0, 1.0, -1.0, 2.0, -2.0])[None, :] + e
    mean, lo, hi = seed_row_ci(d, zeros)
    half = student_t_quantile(0.975, 66.0**2 / (54.0**2 / 2 + 16.8**2 / 5 + 4.8**2 / 10)) * math.sqrt(66.0 / 18)
    assert mean == pytest.approx(0.5) and (lo, hi) == pytest.approx((0.5 - half, 0.5 + half), rel=1e-12)
    # Rows 1, -1, 1, -1, 0, 0: MS_row = 3 * 4 / 5 = 2.4 < MS_err, cut to 0, so 18 var = MS_err + (MS_seed - MS_err)
    # = MS_seed alone (MS_err's net coefficient 0) and df = MS_seed's, 2: the t(2) interval of the 3 seed means.
    d = 0.5 + seed + np.array([1.0, -1.0, 1.0, -1.0, 0.0, 0.0])[None, :] + e
    mean, lo, hi = seed_row_ci(d, zeros)
    half = 4.302653 * math.sqrt(54.0 / 18)  # t(0.975, 2) sqrt(3)
    assert mean == pytest.approx(0.5) and (lo, hi) == pytest.approx((0.5 - half, 0.5 + half), rel=1e-5)
    seed_means = d.mean(axis=1)
    assert half == pytest.approx(4.302653 * seed_means.std(ddof=1) / math.sqrt(3), rel=1e-12)


@pytest.mark.parametrize("a, b, match", [
    (np.zeros(4), np.zeros(4), "seeds, rows"),
    (np.zeros((2, 4)), np.zeros((2, 3)), "seeds, rows"),
    (np.zeros((1, 4)), np.zeros((1, 4)), "at least 2 seeds"),
    (np.zeros((3, 1)), np.zeros((3, 1)), "at least 2 seeds and 2 rows"),
])
def test_seed_row_ci_refuses_bad_input(a, b, match):
    with pytest.raises(ValueError, match=match):
        seed_row_ci(a, b)
    with pytest.raises(ValueError, match="df > 0"):
        student_t_quantile(0.5, 0.0)


@pytest.mark.parametrize("bad", [math.nan, math.inf, -math.inf])
def test_paired_statistics_refuse_non_finite_values(bad):
    """A NaN (or inf) value gave a (nan, nan, nan) bootstrap interval (or (-inf, nan, 0.75)) that reads as "does not
    exclude 0", a NaN row count that compare shows as "no row differs", and a seed_row_ci error about df."""
    a, b = [bad, 1.0, 0.0, 1.0], [0.0, 0.0, 0.0, 1.0]
    for call in (lambda: paired_bootstrap_ci(a, b, n_resamples=50), lambda: paired_bootstrap_ci(b, a, n_resamples=50),
                 lambda: rows_for_power(a, b, effect=0.1), lambda: seed_row_ci([a, b], [b, b])):
        with pytest.raises(ValueError, match="must be finite, got 1 NaN or infinite"):
            call()
