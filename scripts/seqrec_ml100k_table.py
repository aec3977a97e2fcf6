"""The committed ML-100K table of scripts/seqrec_ml100k.sh, from that invocation's ``llmrec bench seqrec`` result.

Merges ``OUT/seqrec_bench.json`` with the committed ``seqrec_ml100k_bench.json`` (keeping the committed models that
OUT does not hold, so models can be run on different machines) and writes ``seqrec_ml100k_bench.{md,json}``.

    python scripts/seqrec_ml100k_table.py OUT [--results-dir benchmarks/results]
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
NAME = "seqrec_ml100k_bench"
ORDER = ["sasrec", "rearec-erl", "rearec-prl", "lares"]


def _seed_tests(runs: list[dict]) -> dict[int, dict]:
    return {r["seed"]: r["test"] for r in runs}


def merge_committed(bench: dict, old: dict) -> dict[str, str]:
    """Add to ``bench`` the models of ``old`` (the committed result) that it does not hold, with their paired
    intervals when still valid; returns the committed pairings dropped, ``{model: baseline}``.

    A committed interval was bootstrapped over the baseline's runs of then: it is kept only if the baseline's runs
    (seeds and test metrics) are the same in both, else the table would show an interval against the old runs beside
    a "% vs" the new mean."""
    merged = [m for m in old.get("summary", {}) if m not in bench["summary"]]
    for m in merged:  # all models first: a baseline merged from ``old`` may come after the model that needs it
        bench["summary"][m], bench["runs"][m] = old["summary"][m], old["runs"][m]
        if m in old.get("timing_settings", {}):
            bench.setdefault("timing_settings", {})[m] = old["timing_settings"][m]
    dropped: dict[str, str] = {}
    for m in merged:
        if m not in old.get("paired", {}):
            continue
        base = old["paired"][m]["baseline"]
        if base in bench["runs"] and _seed_tests(bench["runs"][base]) == _seed_tests(old["runs"].get(base, [])):
            bench.setdefault("paired", {})[m] = old["paired"][m]
        else:
            dropped[m] = base
    return dropped


def flip_sasrec_pairing(paired: dict[str, dict]) -> None:
    """The bench pairs every model with the first one it ran; with SASRec run second, its entry holds SASRec minus
    that model: add it from the model's side (the same rows and resamples, the interval mirrored)."""
    p = paired.get("sasrec")
    if p and p["baseline"] != "sasrec" and p["baseline"] not in paired:
        flip = {k: {"diff": -v["diff"], "ci95": [-v["ci95"][1], -v["ci95"][0]], "excludes_zero": v["excludes_zero"]}
                for k, v in p.items() if isinstance(v, dict)}
        paired[p["baseline"]] = {**p, **flip, "baseline": "sasrec"}


def _threads(bench: dict) -> str:
    """The torch threads the timings were made with: the bench's ``timing_settings`` (what its timing columns
    average over), else (a result from before it recorded them) the threads each run recorded."""
    settings = bench.get("timing_settings") or {}
    by_model: dict[str, set[int]] = {}
    for m, runs in bench["runs"].items():
        if m in settings:
            by_model[m] = {settings[m]["torch_threads"]}
        else:
            by_model[m] = {r["timings"]["torch_threads"] for r in runs if "torch_threads" in r.get("timings", {})}
    every = set().union(*by_model.values()) if by_model else set()
    if not every:
        return "torch threads per run not recorded"
    if len(every) == 1 and all(by_model.values()):
        n = every.pop()
        return "one torch thread per run" if n == 1 else f"{n} torch threads per run"
    return "torch threads per run: " + ", ".join(
        f"{m} {'/'.join(map(str, sorted(t))) or '?'}" for m, t in by_model.items())


def _timed(s: dict, key: str, digits: int) -> str:
    """A timing column: over the row's ``timing_runs`` (the runs made with the bench's timing settings), ``-``
    when none is (the bench then records None)."""
    n, seeds = int(s.get("timing_runs", s["seeds"])), int(s["seeds"])
    if n == 0 or s.get(key) is None:
        return "-"
    return f"{s[key]:.{digits}f}" + (f" ({n} of {seeds} runs)" if n < seeds else "")


def _seed_list(bench: dict) -> str:
    """The seeds the runs used (the caption said "42, 43, 44" whatever they were; a review)."""
    return ", ".join(str(x) for x in sorted({r["seed"] for runs in bench["runs"].values() for r in runs}))


def _relative_to_sasrec(bench: dict, model: str) -> str:
    """`` (+x.x% vs SASRec)`` over the seeds both have: a mean over 3 seeds against one over 5 mixed seed spread
    into the comparison (a review); the seeds are named when the two models' seed sets differ."""
    def by_seed(m: str) -> dict[int, float]:
        return {r["seed"]: r["test"]["ndcg@10"] for r in bench["runs"].get(m, [])}

    mine, base = by_seed(model), by_seed("sasrec")
    shared = sorted(set(mine) & set(base))
    if not shared:
        return " (no seed in common with SASRec)"
    rel = (sum(mine[x] for x in shared) / sum(base[x] for x in shared) - 1) * 100
    on = "" if set(mine) == set(base) else f" on seeds {', '.join(map(str, shared))}"
    return f" ({rel:+.1f}% vs SASRec{on})"


def table(bench: dict, dropped: dict[str, str] | None = None) -> str:
    """The markdown table (with its caption); ``dropped``: pairings :func:`merge_committed` left out, said so in
    the row of the model paired with SASRec (naming the one rerun)."""
    paired = bench.get("paired", {})
    # the model paired with SASRec in each dropped pairing (from either side) -> the one rerun since (the baseline)
    no_interval = {m if b == "sasrec" else b: b for m, b in (dropped or {}).items() if "sasrec" in (m, b)}
    lines = ["ML-100K, leave-one-out, history 50, d 64, full ranking over all items, no history masking; every model",
             "with its own recipe (recipes/seqrec/<model>_ml100k.yaml), early stopping on validation NDCG@10; mean ± std",
             f"over the finished seeds of {_seed_list(bench)} (seeds column); wall times on a shared 2-core CPU, "
             f"{_threads(bench)}",
             "(`bash scripts/seqrec_ml100k.sh`; models with no finished seed are not listed). Where SASRec's runs were",
             "benchmarked together with a model's, the brackets add the paired bootstrap 95% interval of the NDCG@10",
             "difference over the 943 test rows (each row averaged over the seeds).",
             "", "| model | seeds | test NDCG@10 | test HR@10 | NDCG@20 | best epochs | s/epoch | inference ms/row |",
             "|---|---|---|---|---|---|---|---|"]
    sasrec = bench["summary"].get("sasrec", {}).get("ndcg@10")
    partly = False
    for m, s in sorted(bench["summary"].items(), key=lambda kv: ORDER.index(kv[0]) if kv[0] in ORDER else len(ORDER)):
        runs = bench["runs"][m]
        n20 = [r["test"]["ndcg@20"] for r in runs]
        # LARES: an epoch of its RPT phase when RPT beat the SPT weights on validation.
        best = ", ".join(("" if r.get("best_phase", "train") == "train" else r["best_phase"].upper() + " ")
                         + str(r["best_epoch"]) for r in runs)
        rel = _relative_to_sasrec(bench, m) if sasrec and m != "sasrec" else ""
        if m in paired and paired[m]["baseline"] == "sasrec":  # the paired 95% interval over the test rows
            d = paired[m]["ndcg@10"]
            rel = rel[:-1] + f"; {d['diff']:+.4f} [{d['ci95'][0]:+.4f}, {d['ci95'][1]:+.4f}])"
        elif m in no_interval and rel:
            rel = rel[:-1] + f"; no paired interval: {no_interval[m]} rerun since)"
        partly |= int(s.get("timing_runs", s["seeds"])) < s["seeds"]
        lines.append(f"| {m} | {int(s['seeds'])} | {s['ndcg@10']:.4f} ± {s['ndcg@10_std']:.4f}{rel} | "
                     f"{s['hr@10']:.4f} ± {s['hr@10_std']:.4f} | {sum(n20) / len(n20):.4f} | {best} | "
                     f"{_timed(s, 'epoch_s', 1)} | {_timed(s, 'infer_ms_per_row', 3)} |")
    if partly:
        lines += ["", "Timings (s/epoch, ms/row): only over the runs made with the bench's torch threads, eval batch "
                      "size and processes (\"k of n runs\"; -: none), which change them; the metrics are over all seeds."]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    from llmrec.data.canonical import atomic_write_json, atomic_write_text

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("out", type=Path, help="the bench's output directory (holds seqrec_bench.json)")
    ap.add_argument("--results-dir", type=Path, default=ROOT / "benchmarks" / "results")
    args = ap.parse_args(argv)
    bench = json.loads((args.out / "seqrec_bench.json").read_text(encoding="utf-8"))
    committed = args.results_dir / f"{NAME}.json"
    dropped = merge_committed(bench, json.loads(committed.read_text(encoding="utf-8"))) if committed.exists() else {}
    for m, base in dropped.items():
        print(f"{m}: committed paired interval vs {base} dropped ({base}'s runs changed)", file=sys.stderr)
    flip_sasrec_pairing(bench.setdefault("paired", {}))
    text = table(bench, dropped)
    atomic_write_text(args.results_dir / f"{NAME}.md", text)
    atomic_write_json(args.results_dir / f"{NAME}.json", bench)
    print(text, end="")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
