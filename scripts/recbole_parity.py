"""SASRec on ML-100K: llmrec's runs beside RecBole 1.2's on the same protocol, per seed and mean +- std.

    python scripts/recbole_parity.py --recbole 'benchmarks/results/recbole_sasrec_ml100k_seed*.json' \
        --ours benchmarks/results/seqrec_ml100k_bench.json "llmrec, stride 50 (default)" \
        --ours benchmarks/results/seqrec_ml100k_stride25_9seeds.json "llmrec, window_stride 25" \
        --ours benchmarks/results/seqrec_ml100k_stride10.json "llmrec, window_stride 10" \
        --ours benchmarks/results/seqrec_ml100k_stride10_lr2e-3.json "llmrec, window_stride 10, lr 2e-3" \
        --ours benchmarks/results/seqrec_ml100k_stride10_lr5e-4.json "llmrec, window_stride 10, lr 5e-4" \
        --ours benchmarks/results/seqrec_ml100k_stride10_b128.json "llmrec, window_stride 10, batch 128" \
        --ours benchmarks/results/seqrec_ml100k_stride25_dropout0.3.json "llmrec, window_stride 25, dropout 0.3" \
        --ours benchmarks/results/seqrec_ml100k_stride25_dropout0.2.json "llmrec, window_stride 25, dropout 0.2" \
        --ours 'benchmarks/results/sasrec_ml100k_rows_b2048_seed*.json' "llmrec, train_mode rows, batch 2048" \
        --crosscheck benchmarks/results/sasrec_recbole_parity_ml100k.json \
        --output benchmarks/results/sasrec_recbole_parity_ml100k

RecBole's numbers come from ``scripts/recbole_sasrec_ml100k.py`` (its own venv; one JSON per seed); ours from
``llmrec bench seqrec`` results files (their ``sasrec`` runs) or single ``llmrec seqrec train`` runs' ``results.json``
(a glob of them: one setting, one file per seed).
``--crosscheck`` adds RecBole's own trained weights evaluated by llmrec (directories written by
``scripts/recbole_weights_in_llmrec.py``, each with ``eval_valid/`` and ``eval_test/`` from ``llmrec evaluate``).
Writes ``<output>.json`` and ``<output>.md``. The seeds of the two libraries are not the same random streams: the comparison is of means over seeds.
"""

from __future__ import annotations

import argparse
import glob
import json
import statistics
from pathlib import Path

METRICS = ("ndcg@10", "hr@10", "ndcg@20")


def _mean_std(values: list[float]) -> tuple[float, float]:
    return statistics.fmean(values), statistics.stdev(values) if len(values) > 1 else 0.0


def _fmt(stat: dict[str, float], n: int) -> str:
    """``mean ± std``, or the single value of a one-seed setting (whose std is not 0 but unknown)."""
    return f"{stat['mean']:.4f} ± {stat['std']:.4f}" if n > 1 else f"{stat['mean']:.4f} (1 seed)"


def _crosscheck_entries(pattern: str) -> dict[int, dict]:
    """Per RecBole seed: llmrec's evaluation of RecBole's trained weights (``dir``, ``valid_ndcg@10``, ``test``).

    ``pattern`` is a glob of directories written by ``scripts/recbole_weights_in_llmrec.py`` (each with
    ``eval_valid/`` and ``eval_test/`` from ``llmrec evaluate``), or an earlier output JSON of this script, whose
    ``crosscheck`` section is reused (the run directories are not committed; the numbers are).
    """
    if pattern.endswith(".json") and Path(pattern).is_file():
        saved = json.loads(Path(pattern).read_text()).get("crosscheck")
        if not saved:
            raise SystemExit(f"{pattern}: no crosscheck section (an output of this script run with --crosscheck DIRS)")
        return {int(seed): entry for seed, entry in saved.items()}
    dirs = sorted(glob.glob(pattern))
    if not dirs:
        raise SystemExit(f"--crosscheck {pattern!r} matches no directory")
    entries = {}
    for d in dirs:
        seed = int(json.loads((Path(d) / "results.json").read_text())["source"]["seed"])
        got = {split: json.loads((Path(d) / f"eval_{split}" / "results.json").read_text())["metrics"]["item"]
               for split in ("valid", "test")}
        entries[seed] = {"dir": d, "valid_ndcg@10": got["valid"]["ndcg@10"], "test": got["test"]}
    return entries


def _crosscheck(entries: dict[int, dict], rec: dict[int, dict[str, float]], out: dict) -> list[str]:
    """Table lines: RecBole's own numbers beside llmrec's evaluation of RecBole's trained weights, per seed."""
    lines = ["", "RecBole's trained weights loaded into llmrec's SASRec (`scripts/recbole_weights_in_llmrec.py`) and "
             "evaluated by llmrec (`llmrec evaluate --method seqrec`), beside RecBole's own evaluation of them:", "",
             "| seed | valid NDCG@10 RecBole / llmrec | test NDCG@10 RecBole / llmrec | test HR@10 RecBole / llmrec |",
             "|---|---|---|---|"]
    out["crosscheck"] = {}
    for seed, got in sorted(entries.items()):
        if seed not in rec:
            raise SystemExit(f"{got['dir']}: RecBole seed {seed} has no results file among --recbole")
        r = rec[seed]
        out["crosscheck"][seed] = got
        lines.append(f"| {seed} | {r['valid_ndcg@10']:.4f} / {got['valid_ndcg@10']:.4f} | {r['ndcg@10']:.4f} / "
                     f"{got['test']['ndcg@10']:.4f} | {r['hr@10']:.4f} / {got['test']['hr@10']:.4f} |")
    return lines


def runs_by_seed(runs: list[tuple[str, int, dict]], setting: str) -> dict[int, dict]:
    """``{seed: metrics}`` of one setting's ``(file, seed, metrics)`` runs; a seed found twice (two files of one
    seed, say a rerun beside the first run) is an error naming both files, not one silently replacing the other."""
    out: dict[int, dict] = {}
    source: dict[int, str] = {}
    for path, seed, metrics in runs:
        if seed in out:
            raise SystemExit(f"{setting}: seed {seed} is given twice ({source[seed]} and {path}): keep one")
        out[seed], source[seed] = metrics, path
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--recbole", required=True, help="glob of scripts/recbole_sasrec_ml100k.py outputs")
    ap.add_argument("--ours", nargs=2, action="append", required=True, metavar=("RESULTS_JSON", "LABEL"),
                    help="an llmrec bench seqrec results file (or a glob of sasrec runs' results.json) and its "
                         "label (repeatable)")
    ap.add_argument("--crosscheck", default=None,
                    help="glob of run directories holding RecBole's weights (scripts/recbole_weights_in_llmrec.py), "
                         "evaluated by llmrec into eval_valid/ and eval_test/; or an earlier --output JSON of this "
                         "script, whose cross-check is reused")
    ap.add_argument("--output", required=True, help="output path without extension")
    args = ap.parse_args()

    from llmrec.data.canonical import atomic_write_json, atomic_write_text

    settings: dict[str, dict[int, dict[str, float]]] = {}
    rec_files = sorted(glob.glob(args.recbole))
    if not rec_files:
        raise SystemExit(f"no RecBole results match {args.recbole!r}")
    rec_runs = []
    for f in rec_files:
        r = json.loads(Path(f).read_text())
        if r.get("history_masking"):
            raise SystemExit(f"{f}: RecBole ran with history masking; llmrec's protocol does not mask")
        t = r["test"]
        rec_shape = (int(r["items"]), int(r["users"]))  # the checks below compare our runs with this
        rec_runs.append((f, int(r["seed"]), {"ndcg@10": t["ndcg@10"], "hr@10": t["hit@10"], "ndcg@20": t["ndcg@20"],
                                             "valid_ndcg@10": r["best_valid_ndcg@10"]}))
    rec = runs_by_seed(rec_runs, "RecBole 1.2 SASRec")
    settings["RecBole 1.2 SASRec"] = rec
    for pattern, label in args.ours:
        runs = []
        for path in sorted(glob.glob(pattern)) or [pattern]:
            res = json.loads(Path(path).read_text())
            found = res["runs"].get("sasrec", []) if "runs" in res else [res] if res.get("model") == "sasrec" else []
            for r in found:
                # Another dataset's or protocol's SASRec was printed as "vs RecBole" under the ML-100K caption (a
                # review): the catalogue, the test users and the unmasked history must be RecBole's.
                p = r.get("protocol", {})
                shape = (p.get("num_items"), p.get("rows", {}).get("test"))
                if shape != rec_shape or p.get("mask_history") or p.get("split") != "loo":
                    raise SystemExit(f"{path}: seed {r['seed']} is not on RecBole's protocol (items, test users "
                                     f"{shape}, mask_history {p.get('mask_history')}, split {p.get('split')}; "
                                     f"RecBole: {rec_shape}, unmasked leave-one-out)")
                runs.append((path, int(r["seed"]),
                             {**{m: r["test"][m] for m in METRICS}, "valid_ndcg@10": r["valid"]["ndcg@10"]}))
        if not runs:
            raise SystemExit(f"{pattern}: no sasrec runs (`llmrec bench seqrec` results or sasrec runs' results.json)")
        settings[label] = runs_by_seed(runs, label)

    ref = _mean_std([v["ndcg@10"] for v in rec.values()])[0]
    summary = {}
    for label, by_seed in settings.items():
        s = {m: _mean_std([v[m] for v in by_seed.values()]) for m in (*METRICS, "valid_ndcg@10")}
        summary[label] = {"seeds": sorted(by_seed), **{m: {"mean": mu, "std": sd} for m, (mu, sd) in s.items()},
                          "ndcg@10_vs_recbole": s["ndcg@10"][0] / ref - 1.0}
    out = {"recbole_files": rec_files, "ours_files": [p for p, _ in args.ours], "per_seed": settings,
           "summary": summary}
    seeds = sorted({s for by in settings.values() for s in by})
    lines = ["SASRec on ML-100K (leave-one-out, history 50, d 64, 2 layers, dropout 0.5, full-softmax CE, full "
             "ranking, no history masking, selection on validation NDCG@10): RecBole 1.2 "
             "(`scripts/recbole_sasrec_ml100k.py`, its own venv) beside llmrec (`llmrec bench seqrec`), test NDCG@10 per "
             "seed (the libraries' seeds are different random streams) and mean ± std "
             "(`python scripts/recbole_parity.py`):", "",
             "| setting | " + " | ".join(f"seed {s}" for s in seeds)
             + " | NDCG@10 | HR@10 | NDCG@20 | vs RecBole | valid NDCG@10 |",
             "|---|" + "---|" * len(seeds) + "---|---|---|---|---|"]
    for label, by_seed in settings.items():
        s = summary[label]
        cells = [f"{by_seed[x]['ndcg@10']:.4f}" if x in by_seed else "-" for x in seeds]
        rel = "" if label.startswith("RecBole") else f"{100 * s['ndcg@10_vs_recbole']:+.1f}%"
        lines.append(f"| {label} | " + " | ".join(cells) + " | "
                     + " | ".join(_fmt(s[m], len(by_seed)) for m in METRICS) + f" | {rel} | "
                     + _fmt(s["valid_ndcg@10"], len(by_seed)) + " |")
    if args.crosscheck:
        lines += _crosscheck(_crosscheck_entries(args.crosscheck), rec, out)
    atomic_write_text(Path(args.output + ".md"), "\n".join(lines) + "\n")
    atomic_write_json(Path(args.output + ".json"), out)
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
