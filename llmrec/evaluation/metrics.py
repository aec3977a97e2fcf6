"""Top-K ranking metrics with one target per row: HR@K, NDCG@K, MRR@K.

Everything is computed from the 0-based *rank* of the target in each row's ranked list (``None`` or
``-1`` when the target is not in the list, e.g. not among the beams):

* ``hr@K   = 1                    if rank < K else 0``
* ``ndcg@K = 1 / log2(rank + 2)   if rank < K else 0``  (one relevant item, so IDCG = 1)
* ``mrr@K  = 1 / (rank + 1)       if rank < K else 0``

Generative models get ranks from their ranked item lists (:func:`rank_of_target`); ID-based models that
score the whole catalogue get them from :func:`ranks_from_scores`. Per-row values
(:func:`per_row_metrics`) allow paired comparisons between models (:func:`paired_bootstrap_ci`).
"""

from __future__ import annotations

import math
from collections.abc import Hashable, Iterable, Sequence
from statistics import NormalDist

import numpy as np
import torch

DEFAULT_KS: tuple[int, ...] = (1, 3, 5, 10, 20)
METRIC_NAMES: tuple[str, ...] = ("hr", "ndcg", "mrr")

RankLike = Sequence[int | None] | np.ndarray | torch.Tensor


def rank_of_target(ranked_ids: Iterable[Hashable], target: Hashable) -> int | None:
    """0-based position of the first occurrence of ``target`` in ``ranked_ids``, or ``None`` if absent."""
    for i, x in enumerate(ranked_ids):
        if x == target:
            return i
    return None


def _ranks_array(ranks: RankLike) -> np.ndarray:
    """int64 array with ``-1`` for absent targets (``None`` or any negative rank).

    Ranks given as floats must be whole numbers: a NaN (cast to int64 it became a huge negative number, an absent
    target) or a fractional rank (truncated) is refused with the row it is in, not counted as something else.
    """
    if isinstance(ranks, torch.Tensor):
        values = ranks.detach().cpu().numpy().reshape(-1)
    elif isinstance(ranks, np.ndarray):
        values = ranks.reshape(-1)
    else:
        values = np.array([-1 if r is None else r for r in ranks])
    if values.size and values.dtype.kind == "f":
        whole = np.isfinite(values) & (values == np.round(values))
        if not whole.all():
            bad = int(np.argmin(whole))
            raise ValueError(f"rank of row {bad} is {float(values[bad])!r}: ranks must be whole numbers (0-based; negative or "
                             "None for a target not in the list)")
    elif values.size and values.dtype.kind not in "iub":
        raise ValueError(f"ranks must be whole numbers, got an array of {values.dtype}")
    arr = values.astype(np.int64, copy=False)
    return np.where(arr < 0, -1, arr)


def _check_ks(ks: Iterable[int]) -> list[int]:
    ks = sorted({int(k) for k in ks})
    if not ks or ks[0] < 1:
        raise ValueError(f"ks must be positive integers, got {ks}")
    return ks


def per_row_metrics(ranks: RankLike, ks: Iterable[int] = DEFAULT_KS) -> dict[str, np.ndarray]:
    """Per-row metric values, keyed ``"hr@K"``, ``"ndcg@K"``, ``"mrr@K"``; each a float64 array [n_rows]."""
    arr = _ranks_array(ranks)
    found = arr >= 0
    # Absent rows get a placeholder rank; the `hit` mask zeroes them below.
    safe = np.where(found, arr, 0).astype(np.float64)
    ndcg_full = 1.0 / np.log2(safe + 2.0)
    mrr_full = 1.0 / (safe + 1.0)
    out: dict[str, np.ndarray] = {}
    for k in _check_ks(ks):
        hit = found & (arr < k)
        out[f"hr@{k}"] = hit.astype(np.float64)
        out[f"ndcg@{k}"] = np.where(hit, ndcg_full, 0.0)
        out[f"mrr@{k}"] = np.where(hit, mrr_full, 0.0)
    return out


def compute_metrics(
    ranks: RankLike, ks: Iterable[int] = DEFAULT_KS, max_k: int | None = None
) -> dict[str, float]:
    """Mean HR@K / NDCG@K / MRR@K over rows.

    Args:
        ranks: per row, the 0-based rank of the target, ``None`` / ``-1`` if absent.
        ks: cutoffs.
        max_k: the length of the ranked lists (e.g. the number of beams). Cutoffs above it are not
            reported, since a list of ``max_k`` items cannot support them.

    Returns:
        ``{"hr@K": ..., "ndcg@K": ..., "mrr@K": ...}`` for each reported K.
    """
    all_ks = _check_ks(ks)
    ks = all_ks if max_k is None else [k for k in all_ks if k <= max_k]
    if not ks:
        raise ValueError(f"no cutoff in {all_ks} is <= max_k={max_k}")
    arr = _ranks_array(ranks)
    if arr.size == 0:
        raise ValueError("cannot compute metrics over zero rows")
    rows = per_row_metrics(arr, ks)
    return {name: float(v.mean()) for name, v in rows.items()}


@torch.no_grad()
def ranks_from_scores(
    scores: torch.Tensor, targets: torch.Tensor, *, chunk_elements: int = 1 << 24
) -> torch.Tensor:
    """0-based rank of each row's target under full-catalogue scores (higher score = better).

    ``rank = #{j : s_j > s_t} + #{j < t : s_j == s_t}``: ties are broken by item id, the lower id
    ranking first, so the target ranks after equally-scored items with smaller ids (deterministic, and
    neither optimistic nor random). Items masked with ``-inf`` rank last; NaN scores never count as higher.

    Args:
        scores: ``[B, N]`` float scores.
        targets: ``[B]`` target item indices (columns of ``scores``).
        chunk_elements: rows are processed in chunks of about this many scores, so the boolean
            temporaries stay small whatever ``B`` is.

    Returns:
        LongTensor ``[B]`` on ``scores.device``.

    Raises:
        ValueError: if a target's own score is NaN (its rank would be meaningless).
    """
    if scores.ndim != 2:
        raise ValueError(f"scores must be [B, N], got shape {tuple(scores.shape)}")
    n_rows, n_items = scores.shape
    targets = targets.to(device=scores.device, dtype=torch.long).reshape(-1)
    if targets.numel() != n_rows:
        raise ValueError(f"got {targets.numel()} targets for {n_rows} rows")
    if n_rows and (int(targets.min()) < 0 or int(targets.max()) >= n_items):
        raise ValueError(f"targets must be in [0, {n_items})")
    target_scores = scores.gather(1, targets[:, None])  # [B, 1]
    if torch.isnan(target_scores).any():
        raise ValueError("some targets have NaN scores")
    out = torch.empty(n_rows, dtype=torch.long, device=scores.device)
    col = torch.arange(n_items, device=scores.device)
    step = max(1, chunk_elements // max(n_items, 1))
    for lo in range(0, n_rows, step):
        hi = min(lo + step, n_rows)
        s, ts, tg = scores[lo:hi], target_scores[lo:hi], targets[lo:hi, None]
        higher = (s > ts).sum(dim=1)
        tied_before = ((s == ts) & (col[None, :] < tg)).sum(dim=1)
        out[lo:hi] = higher + tied_before
    return out


def _check_finite(a: np.ndarray, b: np.ndarray) -> None:
    """Refuse NaN / inf values: they gave a NaN interval (or ``(-inf, nan, x)``) read as "does not exclude 0", a NaN
    row count read as "no row differs", or an error about Student's t degrees of freedom."""
    bad = int((~np.isfinite(a)).sum() + (~np.isfinite(b)).sum())
    if bad:
        raise ValueError(f"paired samples must be finite, got {bad} NaN or infinite value(s)")


def paired_bootstrap_ci(
    a: Sequence[float] | np.ndarray,
    b: Sequence[float] | np.ndarray,
    n_resamples: int = 10000,
    seed: int = 0,
    alpha: float = 0.05,
) -> tuple[float, float, float]:
    """Paired bootstrap confidence interval for ``mean(a) - mean(b)``.

    ``a`` and ``b`` are per-row values of one metric for two systems on the *same* rows (e.g. from
    :func:`per_row_metrics`). Rows are resampled with replacement ``n_resamples`` times; the interval is
    the ``alpha/2`` and ``1 - alpha/2`` percentiles of the resampled mean differences.

    Returns:
        ``(mean_diff, lo, hi)`` where ``mean_diff`` is the observed difference.
    """
    a = np.asarray(a, dtype=np.float64).reshape(-1)
    b = np.asarray(b, dtype=np.float64).reshape(-1)
    if a.shape != b.shape:
        raise ValueError(f"paired samples must have the same length, got {a.size} and {b.size}")
    _check_finite(a, b)
    if a.size < 2:  # one row resamples to itself: a zero-width interval that "excludes 0" whatever the systems
        raise ValueError(f"a bootstrap interval needs at least 2 paired rows, got {a.size}")
    if not 0.0 < alpha < 1.0:
        raise ValueError(f"alpha must be in (0, 1), got {alpha}")
    if n_resamples < 1:  # no resample has no percentile (numpy would raise an IndexError naming nothing)
        raise ValueError(f"n_resamples must be >= 1, got {n_resamples}")
    diff = a - b
    n = diff.size
    rng = np.random.default_rng(seed)
    means = np.empty(n_resamples, dtype=np.float64)
    # Resample in chunks so the index matrix stays around 4M entries whatever n is.
    chunk = max(1, (1 << 22) // n)
    for lo in range(0, n_resamples, chunk):
        hi = min(lo + chunk, n_resamples)
        idx = rng.integers(0, n, size=(hi - lo, n))
        means[lo:hi] = diff[idx].mean(axis=1)
    lo_q, hi_q = np.quantile(means, [alpha / 2.0, 1.0 - alpha / 2.0])
    return float(diff.mean()), float(lo_q), float(hi_q)


# What a seeds+rows interval's "95%" means with few seeds, for the reports that print one (their readers do not see
# seed_row_ci's docstring): measured by simulation (the docstring, and a review's reruns at 200-22,363 rows).
SEED_ROW_COVERAGE_NOTE = ("nominally 95%; with 2 seeds it covered ~88% in simulation, with 3 ~92%, with 6 or more "
                          "~95% (the seed term's 1-2 degrees of freedom)")


def seed_row_ci(
    a: Sequence[Sequence[float]] | np.ndarray,
    b: Sequence[Sequence[float]] | np.ndarray,
    alpha: float = 0.05,
) -> tuple[float, float, float]:
    """Confidence interval for ``mean(a) - mean(b)`` that counts both the test rows and the training seeds.

    ``a`` and ``b`` are ``(seeds, rows)`` per-row values of one metric: row ``j`` is the same test row in both, and
    seed ``i`` of ``a`` is paired with seed ``i`` of ``b`` (e.g. GRPO from the SFT model of seed ``i``, or two methods
    trained with seed ``i``). The differences ``d[i, j]`` are read as a crossed two-way random-effects design,
    ``d = mu + seed_i + row_j + e_ij``; the mean's variance ``var(seed)/S + var(row)/R + var(e)/(S R)`` is estimated
    from the ANOVA mean squares (each component truncated at 0), and the interval is Student's t with Satterthwaite's
    degrees of freedom. Unlike :func:`paired_bootstrap_ci` on seed-averaged rows, whose interval holds for these
    trained models only, this one asks whether another set of training runs would show the difference too; with 2
    or 3 seeds the seed term has 1 or 2 degrees of freedom, so the interval is wide whenever the seeds disagree.
    (Resampling seeds and rows independently, a "pigeonhole" bootstrap, counts the interaction term about three
    times and under-covers with few seeds: Owen 2007.) Simulated coverage of a nominal 95% interval: 0.92-0.97
    with 3 seeds, 0.94-0.95 with 6-9; with 2 seeds 0.88-0.97, the low end when the seed spread dominates (a review's
    simulation, 200 rows, seed sd 0.3-0.5 against row and cell sd 1: 0.88): adding the row and error terms lifts
    Satterthwaite's df a little above the seed term's 1, where the t quantile falls steeply. Read a 2-seed interval
    as about 88%.

    >>> d, lo, hi = seed_row_ci([[1.0, 1.0, 1.0], [-1.0, -1.0, -1.0]], [[0.0] * 3, [0.0] * 3])
    >>> d, round(lo, 2), round(hi, 2)
    (0.0, -12.71, 12.71)

    Returns:
        ``(mean_diff, lo, hi)``.
    """
    a = np.asarray(a, dtype=np.float64)
    b = np.asarray(b, dtype=np.float64)
    if a.ndim != 2 or a.shape != b.shape:
        raise ValueError(f"need two (seeds, rows) arrays of one shape, got {a.shape} and {b.shape}")
    _check_finite(a, b)
    n_seeds, n_rows = a.shape
    if n_seeds < 2 or n_rows < 2:
        raise ValueError(f"need at least 2 seeds and 2 rows to estimate both spreads, got {n_seeds} and {n_rows}")
    if not 0.0 < alpha < 1.0:
        raise ValueError(f"alpha must be in (0, 1), got {alpha}")
    d = a - b
    mean = float(d.mean())
    seed_means, row_means = d.mean(axis=1), d.mean(axis=0)
    df_seed, df_row, df_err = n_seeds - 1, n_rows - 1, (n_seeds - 1) * (n_rows - 1)
    ms_seed = n_rows * float(((seed_means - mean) ** 2).sum()) / df_seed
    ms_row = n_seeds * float(((row_means - mean) ** 2).sum()) / df_row
    ms_err = float(((d - seed_means[:, None] - row_means[None, :] + mean) ** 2).sum()) / df_err
    # E[MS_seed] = R var(seed) + var(e), E[MS_row] = S var(row) + var(e), E[MS_err] = var(e), so S R var(mean) =
    # MS_err + (MS_seed - MS_err) + (MS_row - MS_err) = sum of c * MS, each mean square with one net coefficient c
    # (MS_err's: 1 minus one per component kept); Satterthwaite's df = (sum c MS)^2 / sum (c MS)^2 / df.
    coef = {"seed": 0.0, "row": 0.0, "err": 1.0}
    for name, ms in (("seed", ms_seed), ("row", ms_row)):
        if ms > ms_err:  # a component estimated below 0 counts as 0
            coef[name] += 1.0
            coef["err"] -= 1.0
    terms = [(coef[k], ms, df) for k, ms, df in (("seed", ms_seed, df_seed), ("row", ms_row, df_row),
                                                 ("err", ms_err, df_err)) if coef[k] != 0.0]
    var = sum(c * ms for c, ms, _ in terms) / (n_seeds * n_rows)
    if var <= 0.0:
        return mean, mean, mean
    df = (var * n_seeds * n_rows) ** 2 / sum((c * ms) ** 2 / df for c, ms, df in terms)
    half = student_t_quantile(1.0 - alpha / 2.0, df) * math.sqrt(var)
    return mean, mean - half, mean + half


def student_t_quantile(p: float, df: float) -> float:
    """The ``p`` quantile of Student's t with ``df`` (> 0, not necessarily whole) degrees of freedom.

    ``P(|T| > t) = I_{df/(df+t^2)}(df/2, 1/2)`` (the regularised incomplete beta, by mpmath at 30 digits), solved
    for t by bisection on log t; the normal quantile above 1e5 degrees of freedom. (The density integrated on a
    fixed grid, as before, was far off below df ~ 1: 207.7 for the 0.975 quantile at df 0.2, whose value is
    ~7.7e5; Satterthwaite's df reaches such values with 2 seeds.)

    >>> round(student_t_quantile(0.975, 2), 4), round(student_t_quantile(0.975, 1), 4)
    (4.3027, 12.7062)
    """
    if not 0.0 < p < 1.0 or not df > 0:
        raise ValueError(f"need 0 < p < 1 and df > 0, got p={p}, df={df}")
    if p < 0.5:
        return -student_t_quantile(1.0 - p, df)
    if p == 0.5:
        return 0.0
    if df > 1e5:
        return NormalDist().inv_cdf(p)
    import mpmath  # a dependency of torch (through sympy), declared in pyproject too

    with mpmath.workdps(30):
        tail = 2 * (1 - mpmath.mpf(p))  # the two-sided tail probability at the quantile
        a = mpmath.mpf(df) / 2
        log_c = mpmath.loggamma(a + 0.5) - mpmath.loggamma(a) - mpmath.log(df * mpmath.pi) / 2

        def excess(x):  # P(|T| > e^x) - tail and its derivative in x (-2 t f(t)); decreasing in x
            t2 = mpmath.exp(2 * x)
            value = mpmath.betainc(a, 0.5, 0, df / (df + t2), regularized=True) - tail
            return value, -2 * mpmath.exp(x + log_c - (a + 0.5) * mpmath.log1p(t2 / df))

        lo, hi = mpmath.mpf(-40), mpmath.mpf(8)
        while excess(hi)[0] > 0:  # widen until the quantile is inside (heavy tails: df well below 1)
            lo, hi = hi, hi * 2
        x = mpmath.log(NormalDist().inv_cdf(p)) if p > 0.6 else (lo + hi) / 2
        x = min(max(x, lo), hi)
        tol = mpmath.mpf(10) ** -16
        for _ in range(200):  # Newton in log t, kept inside the bracket (a bisection step when it would leave it)
            value, slope = excess(x)
            if abs(value / slope) < tol:  # converged: the Newton step is below float resolution
                break
            lo, hi = (x, hi) if value > 0 else (lo, x)
            step = x - value / slope
            x = step if lo < step < hi else (lo + hi) / 2
            if hi - lo < tol:
                break
        return float(mpmath.exp(x))


def rows_for_power(
    a: Sequence[float] | np.ndarray,
    b: Sequence[float] | np.ndarray,
    effect: float,
    alpha: float = 0.05,
    power: float = 0.8,
) -> float:
    """Rows a paired comparison needs to detect a true difference of ``effect`` in ``mean(a) - mean(b)``.

    The usual normal-approximation sample size of a two-sided paired test,
    ``n = ((z[1 - alpha/2] + z[power]) * sd / effect) ** 2``, with ``sd`` the standard deviation of the per-row
    differences ``a - b`` observed here (so it answers: with rows like these, how many would a difference of that
    size need to show up at level ``alpha`` with probability ``power``; round up for a row count). ``nan`` when no
    row differs (no estimate of the spread).

    >>> math.ceil(rows_for_power([1.0, 0.0, 0.0, 0.0], [0.0, 0.0, 0.0, 0.0], effect=0.1))
    197
    """
    a = np.asarray(a, dtype=np.float64).reshape(-1)
    b = np.asarray(b, dtype=np.float64).reshape(-1)
    if a.shape != b.shape:
        raise ValueError(f"paired samples must have the same length, got {a.size} and {b.size}")
    _check_finite(a, b)
    diff = a - b
    if diff.size < 2:
        raise ValueError(f"need at least 2 paired rows, got {diff.size}")
    if effect == 0 or not math.isfinite(effect) or not 0.0 < alpha < 1.0 or not 0.0 < power < 1.0:
        raise ValueError(f"need effect != 0 and alpha, power in (0, 1); got {effect}, {alpha}, {power}")
    sd = float(diff.std(ddof=1))
    if sd == 0.0:
        return float("nan")
    z = NormalDist().inv_cdf(1.0 - alpha / 2.0) + NormalDist().inv_cdf(power)
    return float((z * sd / effect) ** 2)
