"""Paired comparison of evaluation runs on the same rows: ``llmrec compare RUN_A RUN_B ...``.

Each run is an ``llmrec evaluate`` output directory (``results.json`` + ``rankings.jsonl``). Runs are
compared on the rows they share (same split row and same target item); the first run is the baseline
of every difference. Differences come with their paired bootstrap 95% interval
(:func:`llmrec.evaluation.metrics.paired_bootstrap_ci`). With ``seeds_per_run`` > 1 every run is a group of
that many directories (the seeds of one method): each row's metrics are averaged over the group's seeds before
the differences, so the interval is over rows of seed-averaged values (as ``llmrec bench pipeline`` reports).
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np

from llmrec.evaluation.metrics import paired_bootstrap_ci, per_row_metrics, rows_for_power


def load_rankings(run_dir: str | Path) -> dict[int, dict]:
    """``row -> ranking record`` of an evaluation run (clear error if the run is missing or unfinished)."""
    run = Path(run_dir)
    path = run / "rankings.jsonl"
    if not (run / "results.json").exists() or not path.exists():
        raise FileNotFoundError(f"{run}: not a finished evaluation (needs results.json and rankings.jsonl)")
    records = {}
    for n, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        if not line.strip():
            continue
        try:
            rec = json.loads(line)
        except json.JSONDecodeError as e:
            raise ValueError(f"{path}, line {n}: {e}") from None
        records[int(rec["row"])] = rec
    return records


def compare_runs(run_dirs: list[str | Path], metrics: list[str], level: str = "item", n_resamples: int = 10000,
                 seed: int = 0, power_rel: list[float] | tuple[float, ...] = (), seeds_per_run: int = 1) -> dict:
    """Per-run metric means on the shared rows and each run's difference to the first run (with CI).

    ``seeds_per_run`` = n > 1: every n consecutive directories are the seeds of one run (``A0 A1 B0 B1`` with n =
    2 compares A with B), each row's metrics averaged over them first; the result's ``runs`` then lists the
    groups, each as its directories joined by ``" + "``.

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
    if level not in ("item", "title"):
        raise ValueError(f"level must be 'item' or 'title', got {level!r}")
    runs = [load_rankings(r) for r in run_dirs]
    shared = sorted(set.intersection(*(set(r) for r in runs)))
    for row in shared:
        targets = {r[row]["target_item_id"] for r in runs}
        if len(targets) != 1:
            raise ValueError(f"row {row} has different targets in the runs ({sorted(targets)}): not the same split")
    if not shared:
        raise ValueError("the runs share no rows")
    for r in run_dirs:  # K beyond a beam run's list (e.g. @20 of 10 beams) would count unranked targets as misses
        res = Path(r) / "results.json"
        try:
            proto = json.loads(res.read_text(encoding="utf-8")).get("protocol", {}) if res.exists() else {}
        except (json.JSONDecodeError, UnicodeDecodeError, AttributeError) as e:
            raise ValueError(f"{res}: not a results file of `llmrec evaluate` ({e})") from None
        beams = proto.get("num_beams") if proto.get("method") == "beam" else None
        beyond = [m for m in metrics if beams and int(m.split("@")[1]) > beams]
        if beyond:
            raise ValueError(f"{r} ranks {beams} titles per row (num_beams, {res}): {', '.join(beyond)} would count "
                             "targets it never ranked as misses; compare at K <= num_beams")
    ks = sorted({int(m.split("@")[1]) for m in metrics})
    per_seed = [per_row_metrics([recs[row][f"{level}_rank"] for row in shared], ks) for recs in runs]  # None = miss
    per_run = [{m: np.mean([per_seed[i][m] for i in range(g, g + seeds_per_run)], axis=0) for m in per_seed[g]}
               for g in range(0, len(runs), seeds_per_run)]
    out = {"rows": len(shared), "level": level, "runs": [" + ".join(str(r) for r in g) for g in groups],
           "seeds_per_run": seeds_per_run, "metrics": {}, "differences": {}}
    for m in metrics:
        if m not in per_run[0]:
            raise ValueError(f"unknown metric {m!r}; use e.g. ndcg@10, hr@10, mrr@10")
        out["metrics"][m] = [float(v[m].mean()) for v in per_run]
        diffs = []
        for v in per_run[1:]:
            d, lo, hi = paired_bootstrap_ci(v[m], per_run[0][m], n_resamples=n_resamples, seed=seed)
            entry = {"diff": d, "ci95": [lo, hi], "excludes_zero": bool(lo > 0 or hi < 0)}
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


def comparison_table(result: dict) -> str:
    """Markdown: one row per run, each metric with its difference to the first run and the 95% interval."""
    metrics = list(result["metrics"])
    head = "| run | " + " | ".join(metrics) + " |\n|---|" + "---|" * len(metrics) + "\n"
    lines = []
    for i, run in enumerate(result["runs"]):
        cells = []
        for m in metrics:
            v = result["metrics"][m][i]
            if i == 0:
                cells.append(f"{v:.4f}")
            else:
                d = result["differences"][m][i - 1]
                cells.append(f"{v:.4f} ({d['diff']:+.4f} [{d['ci95'][0]:+.4f}, {d['ci95'][1]:+.4f}])")
        lines.append(f"| {run} | " + " | ".join(cells) + " |")
    seeds = result.get("seeds_per_run", 1)
    text = head + "\n".join(lines) + f"\n\n{result['rows']} shared rows, {result['level']}-level matching" + (
        f", each row's metrics averaged over the {seeds} seeds of a run" if seeds > 1 else "") + \
        "; differences to the first run with paired bootstrap 95% intervals.\n"
    power = [(m, i, d["rows_for_power"]) for m in metrics for i, d in enumerate(result["differences"][m], 1)
             if "rows_for_power" in d]
    if power:
        rels = list(power[0][2])
        text += ("\nRows a paired comparison would need to detect a true difference of the given size relative to the "
                 "baseline's mean (two-sided 5%, 80% power, per-row spread as observed here; - : no row differs or "
                 "the baseline's mean is 0):\n\n"
                 "| run | metric | " + " | ".join(f"{float(r) * 100:g}%" for r in rels) + " |\n|---|---|"
                 + "---|" * len(rels) + "\n")
        for m, i, rows in power:
            cells = ["-" if n is None else f"{n:,}" for n in rows.values()]
            text += f"| {result['runs'][i]} | {m} | " + " | ".join(cells) + " |\n"
    return text
