"""Paired comparison of evaluation runs on the same rows: ``llmrec compare RUN_A RUN_B ...``.

Each run is an ``llmrec evaluate`` output directory (``results.json`` + ``rankings.jsonl``). Runs are
compared on the rows they share (same split row and same target item); the first run is the baseline
of every difference. Differences come with their paired bootstrap 95% interval
(:func:`llmrec.evaluation.metrics.paired_bootstrap_ci`). With ``seeds_per_run`` > 1 every run is a group of
that many directories (the seeds of one method): each row's metrics are averaged over the group's seeds before
the differences, so the interval is over rows of seed-averaged values (as ``llmrec bench pipeline`` reports); a
second interval counts the seeds' spread as well (:func:`llmrec.evaluation.metrics.seed_row_ci`).
"""

from __future__ import annotations

import json
import logging
import math
from pathlib import Path

import numpy as np

from llmrec.evaluation.metrics import (
    METRIC_NAMES,
    SEED_ROW_COVERAGE_NOTE,
    paired_bootstrap_ci,
    per_row_metrics,
    rows_for_power,
    seed_row_ci,
)

logger = logging.getLogger(__name__)

# Below this many differing rows a comparison's cell says how many (its bootstrap interval means little).
FEW_ROWS_DIFFERING = 10


def _is_rank(value: object) -> bool:
    """A rank as `llmrec evaluate` writes it: a non-negative int, or None (the target is not in the list)."""
    return value is None or (isinstance(value, int) and not isinstance(value, bool) and value >= 0)


def load_rankings(run_dir: str | Path) -> dict[int, dict]:
    """``row -> ranking record`` of an evaluation run (clear error if the run is missing or unfinished).

    A damaged file is an error naming it, the line and the field, never a silent wrong number: a record without
    an integer ``row``, a ``target_item_id`` and an integer-or-null ``item_rank`` (and ``title_rank``, when
    present), or a row given twice (which record would count?).
    """
    run = Path(run_dir)
    path = run / "rankings.jsonl"
    if not (run / "results.json").exists() or not path.exists():
        raise FileNotFoundError(f"{run}: not a finished evaluation (needs results.json and rankings.jsonl)")
    records: dict[int, dict] = {}
    line_of: dict[int, int] = {}
    # split at "\n" only (read_text has turned "\r\n" into "\n"): str.splitlines() also breaks at U+0085, U+2028
    # and U+2029, which `llmrec evaluate` writes raw inside strings (a title holding one)
    for n, line in enumerate(path.read_text(encoding="utf-8").split("\n"), 1):
        if not line.strip():
            continue
        try:
            rec = json.loads(line)
        except json.JSONDecodeError as e:
            raise ValueError(f"{path}, line {n}: {e}") from None
        row = rec.get("row") if isinstance(rec, dict) else None
        if not isinstance(row, int) or isinstance(row, bool) or row < 0:
            raise ValueError(f"{path}, line {n}, field 'row': expected a row index (int >= 0) in a JSON object, "
                             f"got {line[:80]!r}")
        if "target_item_id" not in rec:
            raise ValueError(f"{path}, line {n}, field 'target_item_id': missing")
        # title_rank may be absent (a run with item matching only, e.g. scripts/rank_fusion.py); compare_runs then
        # refuses level="title" for it.
        for name in ("item_rank", "title_rank"):
            if (name == "item_rank" or name in rec) and (name not in rec or not _is_rank(rec[name])):
                raise ValueError(f"{path}, line {n}, field {name!r}: expected an int >= 0 or null, "
                                 f"got {rec.get(name, 'nothing')!r}")
        if row in records:
            raise ValueError(f"{path}, line {n}: row {row} is also on line {line_of[row]} (a damaged or "
                             "concatenated rankings file)")
        records[row], line_of[row] = rec, n
    return records


def _parse_metrics(metrics: list[str]) -> list[int]:
    """The cut-offs of metric names such as ``ndcg@10``; a malformed name is a clear error."""
    if not metrics:
        raise ValueError("no metric to compare; use e.g. ndcg@10, hr@10, mrr@10")
    ks = []
    for m in metrics:
        name, _, k = m.partition("@")
        if name not in METRIC_NAMES or not k.isdigit() or int(k) < 1:
            raise ValueError(f"unknown metric {m!r}; use e.g. ndcg@10, hr@10, mrr@10 (one of {', '.join(METRIC_NAMES)}"
                             " @ a cut-off >= 1)")
        ks.append(int(k))
    return sorted(set(ks))


def _list_length(proto: dict, level: str, records: dict[int, dict]) -> int | None:
    """How many items (or titles) per row a run's ranked list holds at ``level``; None when any K is fine.

    A K beyond it would count every target ranked past the list as a miss. Beam search returns ``num_beams``
    titles (the item metrics are reported up to that K too); popularity keeps the top ``max(ks)`` items and
    titles; seqrec's item rank is the target's full-catalogue rank, its title list the first ``max(ks)`` titles.
    A ``rank_fusion`` run (scripts/rank_fusion.py) stores its fused list's top ``max(ks)`` items, the depth it is
    scored at, and records no ``ks``: its ``item_rank`` is a position in the union of two stored lists cut at
    other depths (10 beams and an ID model's top 20), not a fused ranking past the stored top, so the longest
    stored list is its length.
    """
    method, ks = proto.get("method"), proto.get("ks")
    if method == "beam":
        return proto.get("num_beams")
    if method == "rank_fusion":
        stored = [len(r["item_ranking"]) for r in records.values() if isinstance(r.get("item_ranking"), list)]
        return max(stored, default=0) or None
    if ks and (method == "popularity" or (method == "seqrec" and level == "title")):
        return max(int(k) for k in ks)
    return None


def _warn_numerics(protos: list[dict]) -> None:
    """Say when LM evaluations differ in what their numbers are computed with, not in the model.

    In bfloat16 the batch a row shares changes its beam scores: between batch 1 and 8 of the quickstart's GRPO
    checkpoint on 50 Games rows, same-title scores (length-normalised log-probabilities) moved by up to 0.07 and 31
    top-10 orders changed (hits@10 did not; benchmarks/README.md); in float32 the rankings were identical. A
    difference between such runs is partly arithmetic.
    """
    lm = [p for p in protos if p.get("method") == "beam" and p.get("dtype")]
    dtypes = sorted({str(p["dtype"]) for p in lm})
    if len(dtypes) > 1:
        logger.warning("the LM runs compute in different dtypes (%s): part of their differences is arithmetic "
                       "(bfloat16 moves beam scores by up to ~0.07 from float32 and reorders many top-10 lists)",
                       ", ".join(dtypes))
        return
    half = [p for p in lm if str(p["dtype"]) in ("bfloat16", "float16")]
    batches = sorted({int(p["batch_size"]) for p in half if isinstance(p.get("batch_size"), int)})
    if len(batches) > 1:
        logger.warning("the LM runs compute in %s with different batch sizes (%s): in half precision a row's batch-"
                       "mates move its beam scores (by up to ~0.07, reordering many top-10 lists), so part of their "
                       "differences is arithmetic; evaluate with one batch_size (or in float32) to compare models "
                       "only", half[0]["dtype"], ", ".join(map(str, batches)))


def compare_runs(run_dirs: list[str | Path], metrics: list[str], level: str = "item", n_resamples: int = 10000,
                 seed: int = 0, power_rel: list[float] | tuple[float, ...] = (), seeds_per_run: int = 1,
                 labels: list[str] | None = None) -> dict:
    """Per-run metric means on the shared rows and each run's difference to the first run (with CI).

    ``labels``: one short name per run (per group of seeds), shown in :func:`comparison_table` instead of the
    directories (which then follow the table); stored under ``"labels"``.

    ``seeds_per_run`` = n > 1: every n consecutive directories are the seeds of one run (``A0 A1 B0 B1`` with n =
    2 compares A with B), each row's metrics averaged over them first; the result's ``runs`` then lists the
    groups, each as its directories joined by ``" + "``, and each difference also has ``per_seed_diff`` and
    ``ci95_seeds_rows`` (:func:`~llmrec.evaluation.metrics.seed_row_ci`: seeds and rows, seed i paired with the
    baseline's seed i).

    ``power_rel`` (e.g. ``[0.03, 0.17]``): for each difference, also the rows a paired comparison with rows like
    these would need to detect a true difference of that size relative to the baseline's mean (two-sided 5%,
    80% power; :func:`~llmrec.evaluation.metrics.rows_for_power`, rounded up), under ``"rows_for_power"``: ``None``
    where no shared row differs (no spread to go by) or the baseline's mean is 0 (no relative effect).
    """
    if not all(0 < r < math.inf for r in power_rel):  # also refuses nan
        raise ValueError(f"power_rel values must be finite and > 0 (relative effects, e.g. 0.03), got {list(power_rel)}")
    if seeds_per_run < 1 or len(run_dirs) % seeds_per_run:
        raise ValueError(f"{len(run_dirs)} run directories do not split into groups of seeds_per_run = {seeds_per_run}")
    groups = [list(run_dirs[i:i + seeds_per_run]) for i in range(0, len(run_dirs), seeds_per_run)]
    if len(groups) < 2:
        raise ValueError("compare needs at least two runs")
    if labels is not None:
        labels = [str(x).strip() for x in labels]
        if len(labels) != len(groups):
            raise ValueError(f"{len(labels)} labels for {len(groups)} runs (one label per run"
                             + (f", i.e. per group of {seeds_per_run} seeds" if seeds_per_run > 1 else "") + ")")
        if not all(labels) or len(set(labels)) != len(labels) or any("|" in x for x in labels):
            raise ValueError(f"labels must be non-empty, distinct and free of '|', got {labels}")
    if level not in ("item", "title"):
        raise ValueError(f"level must be 'item' or 'title', got {level!r}")
    ks = _parse_metrics(metrics)
    runs = [load_rankings(r) for r in run_dirs]
    protos = []
    for r, recs in zip(run_dirs, runs):
        res = Path(r) / "results.json"
        try:
            proto = json.loads(res.read_text(encoding="utf-8")).get("protocol", {}) if res.exists() else {}
            if not isinstance(proto, dict):
                raise AttributeError(f"its protocol is a {type(proto).__name__}, not an object")
        except (json.JSONDecodeError, UnicodeDecodeError, AttributeError) as e:
            raise ValueError(f"{res}: not a results file of `llmrec evaluate` ({e})") from None
        # results.json is written after rankings.jsonl: fewer records than its rows is a damaged copy (cut at a line
        # end), and the missing rows would silently drop out of the shared rows.
        if isinstance(proto.get("rows"), int) and proto["rows"] != len(recs):
            raise ValueError(f"{Path(r) / 'rankings.jsonl'} has {len(recs)} rows, but {res} says the evaluation ranked "
                             f"{proto['rows']} (a damaged or replaced rankings file)")
        # K beyond a run's list (e.g. @20 of 10 beams) would count targets it never ranked as misses.
        length = _list_length(proto, level, recs)
        beyond = [m for m in metrics if length and int(m.split("@")[1]) > length]
        if beyond and proto.get("method") == "rank_fusion":
            raise ValueError(f"{r} is a rank fusion of {' and '.join(map(str, proto.get('runs') or ['two runs']))} "
                             f"scored on its top {length} items ({Path(r) / 'rankings.jsonl'}): past them its item "
                             f"ranks are positions in lists cut at other depths, not a fused ranking, so "
                             f"{', '.join(beyond)} would be another number than the fusion's; compare at K <= {length}")
        if beyond:
            what = "titles per row (num_beams" if proto.get("method") == "beam" else f"{level}s per row (max(ks)"
            raise ValueError(f"{r} ranks {length} {what}, {res}): {', '.join(beyond)} would count "
                             f"targets it never ranked as misses; compare at K <= {length}")
        protos.append(proto)
    splits = {p["split"] for p in protos if "split" in p}
    if len(splits) > 1:  # row i of one split is not row i of another, whatever their targets
        raise ValueError(f"the runs evaluate different splits ({', '.join(sorted(splits))}): not the same rows")
    shared = sorted(set.intersection(*(set(r) for r in runs)))
    for row in shared:
        targets = {r[row]["target_item_id"] for r in runs}
        if len(targets) != 1:
            raise ValueError(f"row {row} has different targets in the runs ({sorted(targets)}): not the same split")
        users = {str(u) for r in runs if (u := r[row].get("user_id")) is not None}
        if len(users) > 1:
            raise ValueError(f"row {row} has different users in the runs ({sorted(users)}): not the same split")
    if not shared:
        raise ValueError("the runs share no rows")
    fewest = min(len(r) for r in runs)
    if len(shared) < fewest:
        # Subsets of other sizes (max_rows) are separate seeded draws, not nested: they share few rows.
        logger.warning("the runs share %d of the %d rows of the smallest run: compared on those only (evaluate "
                       "them with the same max_rows and row_seed to compare them on all their rows)",
                       len(shared), fewest)
    datasets = {str(p["dataset"]) for p in protos if p.get("dataset")}
    if len(datasets) > 1:
        logger.warning("the runs record different datasets (%s): the same row indices and targets may still be "
                       "other rows", ", ".join(sorted(datasets)))
    _warn_numerics(protos)
    # A masked run can never hit a target already in the history and ranks every other one higher: its hits are
    # another quantity than an unmasked run's on the same rows.
    masked = [bool(p.get("history_masked", False)) for p in protos]
    if len(set(masked)) > 1:
        logger.warning("the runs rank history items differently (masked: %s; not masked: %s): their differences "
                       "include the masking", ", ".join(str(r) for r, m in zip(run_dirs, masked) if m),
                       ", ".join(str(r) for r, m in zip(run_dirs, masked) if not m))
    for r, recs in zip(run_dirs, runs):
        if any(f"{level}_rank" not in recs[row] for row in shared):
            raise ValueError(f"{Path(r) / 'rankings.jsonl'} has no {level}_rank (a run without {level} matching); "
                             "compare at the other level")
    per_seed = [per_row_metrics([recs[row][f"{level}_rank"] for row in shared], ks) for recs in runs]  # None = miss
    per_run = [{m: np.mean([per_seed[i][m] for i in range(g, g + seeds_per_run)], axis=0) for m in per_seed[g]}
               for g in range(0, len(runs), seeds_per_run)]
    out = {"rows": len(shared), "level": level, "runs": [" + ".join(str(r) for r in g) for g in groups],
           "seeds_per_run": seeds_per_run, "metrics": {}, "differences": {}}
    if any(masked):
        out["history_masked"] = [any(masked[g:g + seeds_per_run]) for g in range(0, len(runs), seeds_per_run)]
    if labels is not None:
        out["labels"] = labels
    for m in metrics:
        if m not in per_run[0]:
            raise ValueError(f"unknown metric {m!r}; use e.g. ndcg@10, hr@10, mrr@10")
        out["metrics"][m] = [float(v[m].mean()) for v in per_run]
        diffs = []
        for g, v in enumerate(per_run[1:], 1):
            d, lo, hi = paired_bootstrap_ci(v[m], per_run[0][m], n_resamples=n_resamples, seed=seed)
            # the rows whose (seed-averaged) metric differs: with a handful, the percentile bootstrap under-covers
            # (a review's simulation: ~86% at 2-3 rows; no row differing gives [0, 0])
            entry = {"diff": d, "ci95": [lo, hi], "excludes_zero": bool(lo > 0 or hi < 0),
                     "rows_differing": int(np.count_nonzero(v[m] != per_run[0][m]))}
            if seeds_per_run > 1:
                treated, base = (np.stack([per_seed[first + i][m] for i in range(seeds_per_run)])
                                 for first in (g * seeds_per_run, 0))
                entry.update(seed_level_difference(treated, base))
            if power_rel:
                if len(shared) < 2:
                    raise ValueError(f"the runs share {len(shared)} row: the rows needed (power_rel) take >= 2")
                base = float(per_run[0][m].mean())
                needed = {f"{r:g}": rows_for_power(v[m], per_run[0][m], r * base) if base > 0 else math.nan
                          for r in power_rel}
                entry["rows_for_power"] = {r: None if math.isnan(n) else math.ceil(n) for r, n in needed.items()}
            diffs.append(entry)
        out["differences"][m] = diffs
    return out


def seed_level_difference(treated: np.ndarray, base: np.ndarray) -> dict:
    """``per_seed_diff`` of two ``(seeds, rows)`` arrays (seed i paired with seed i) and, with 2 seeds and 2 rows or
    more, ``ci95_seeds_rows`` / ``excludes_zero_seeds_rows``: the interval that counts the seeds' spread too
    (:func:`~llmrec.evaluation.metrics.seed_row_ci`), i.e. what another set of training runs could give, not only
    these models on other rows."""
    out: dict = {"per_seed_diff": [float(x) for x in (treated - base).mean(axis=1)]}
    if min(treated.shape) > 1:
        _, lo, hi = seed_row_ci(treated, base)
        out.update(ci95_seeds_rows=[lo, hi], excludes_zero_seeds_rows=bool(lo > 0 or hi < 0))
    return out


def comparison_table(result: dict) -> str:
    """Markdown: one row per run, each metric with its difference to the first run and the 95% interval."""
    metrics = list(result["metrics"])
    names = result.get("labels") or result["runs"]
    head = "| run | " + " | ".join(metrics) + " |\n|---|" + "---|" * len(metrics) + "\n"
    lines = []
    for i, name in enumerate(names):
        cells = []
        for m in metrics:
            v = result["metrics"][m][i]
            if i == 0:
                cells.append(f"{v:.4f}")
            else:
                d = result["differences"][m][i - 1]
                both = "" if "ci95_seeds_rows" not in d else \
                    f"; seeds+rows [{d['ci95_seeds_rows'][0]:+.4f}, {d['ci95_seeds_rows'][1]:+.4f}]"
                few = "" if d.get("rows_differing", FEW_ROWS_DIFFERING) >= FEW_ROWS_DIFFERING else \
                    f"; {d['rows_differing']} row(s) differ"
                cells.append(f"{v:.4f} ({d['diff']:+.4f} [{d['ci95'][0]:+.4f}, {d['ci95'][1]:+.4f}]{both}{few})")
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    seeds = result.get("seeds_per_run", 1)
    text = head + "\n".join(lines) + f"\n\n{result['rows']} shared rows, {result['level']}-level matching" + (
        f", each row's metrics averaged over the {seeds} seeds of a run" if seeds > 1 else "") + \
        "; differences to the first run with paired bootstrap 95% intervals" + (
        " over rows (these trained models on other rows) and, after \"seeds+rows\", over seeds and rows (seed i "
        "paired with the first run's seed i; crossed random effects, t with Satterthwaite df: other training runs "
        f"too; {SEED_ROW_COVERAGE_NOTE})" if any(
            "ci95_seeds_rows" in d for ds in result["differences"].values() for d in ds) else "") + ".\n" + (
        f"Where fewer than {FEW_ROWS_DIFFERING} rows differ (\"n row(s) differ\"), the rows interval is a percentile "
        "bootstrap over those few rows: it covers less than 95% (~86% with 2-3 in simulation) and is [0, 0] with "
        "none.\n" if any(d.get("rows_differing", FEW_ROWS_DIFFERING) < FEW_ROWS_DIFFERING
                         for ds in result["differences"].values() for d in ds) else "")
    if any(result.get("history_masked", ())):
        text += "History items ranked last (masked) in: " + ", ".join(
            name for name, m in zip(names, result["history_masked"]) if m) + "; the other runs rank them like any " \
            "item.\n"
    if result.get("labels"):
        text += "\nRuns:\n\n" + "".join(
            f"- {label}: `{run}`\n"
            for label, run in zip(result["labels"], result["runs"]))
    power = [(m, i, d["rows_for_power"]) for m in metrics for i, d in enumerate(result["differences"][m], 1)
             if "rows_for_power" in d]
    if power:
        rels = list(power[0][2])
        text += ("\nRows a paired comparison would need to detect a true difference of the given size relative to the "
                 "baseline's mean (two-sided 5%, 80% power, per-row spread as observed here; - : no row differs or "
                 "the baseline's mean is 0)" + (
                     f"; for the rows-only interval with these {result['seeds_per_run']} seeds per row: the seeds+rows "
                     "interval also carries the spread between training runs, which no number of rows narrows"
                     if result.get("seeds_per_run", 1) > 1 else "") + ":\n\n"
                 "| run | metric | " + " | ".join(f"{float(r) * 100:g}%" for r in rels) + " |\n|---|---|"
                 + "---|" * len(rels) + "\n")
        for m, i, rows in power:
            cells = ["-" if n is None else f"{n:,}" for n in rows.values()]
            text += f"| {names[i]} | {m} | " + " | ".join(cells) + " |\n"
    return text
