"""Table of single-seed variants of one ``llmrec seqrec train`` recipe, selected on validation.

Each argument is ``LABEL=SOURCE``, where SOURCE is a run's output directory (its ``results.json``) or one seed of a
``llmrec bench seqrec`` result, written ``FILE.json#MODEL#SEED``. The first argument is the baseline; the table gives
every run's validation and test NDCG@10 and the difference to the baseline (single runs: no interval, and the
validation column is the one a variant is chosen by).

    python scripts/seqrec_variant_table.py \
        "recipe (normal_zero, dropout 0.5)=benchmarks/results/seqrec_ml100k_bench.json#lares#42" \
        "state_init zero=runs/lares-var/zero_s42" --title "LARES on ML-100K, seed 42" \
        --output benchmarks/results/lares_variants_ml100k
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from llmrec.data.canonical import atomic_write_json, atomic_write_text

UNRECORDED = (None, None, ())  # a run summarised before the bench recorded protocols: its data is not compared


def data_of(run: dict) -> tuple:
    """What a run was trained and tested on, from its protocol: the catalogue, the split and its rows."""
    p = run.get("protocol", {})
    return p.get("num_items"), p.get("split"), tuple(sorted((p.get("rows") or {}).items()))


def load(source: str) -> dict:
    """One run's result dict (``valid``, ``test``, ``best_epoch``, optional ``best_phase``)."""
    if "#" in source:
        path, model, seed = source.split("#")
        runs = json.loads(Path(path).read_text())["runs"].get(model)
        if runs is None:
            raise SystemExit(f"{path}: no runs of model {model!r}")
        for r in runs:
            if str(r["seed"]) == seed:
                return r
        raise SystemExit(f"{path}: model {model!r} has no seed {seed}")
    path = Path(source) / "results.json"
    if not path.exists():
        raise SystemExit(f"{path}: not a finished run (no results.json)")
    return json.loads(path.read_text())


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("runs", nargs="+", help="LABEL=SOURCE; the first is the baseline")
    ap.add_argument("--title", default="")
    ap.add_argument("--metric", default="ndcg@10")
    ap.add_argument("--output", required=True, help="writes <output>.md and <output>.json")
    args = ap.parse_args(argv)
    rows = []
    for arg in args.runs:
        label, sep, source = arg.partition("=")
        if not sep or not source:
            raise SystemExit(f"{arg!r}: expected LABEL=SOURCE")
        r = load(source)
        rows.append({"label": label, "source": source, "seed": r.get("seed"), "valid": r["valid"], "test": r["test"],
                     "best_epoch": r["best_epoch"], "best_phase": r.get("best_phase")})
        # A single-run difference means something only on the baseline's seed and data: another dataset's or seed's
        # run was tabled as a variant (a review: seed 42 vs 44 gave -0.0086, pure seed noise).
        if len(rows) == 1:
            base_seed, base_data = r.get("seed"), data_of(r)
        elif r.get("seed") != base_seed or (data_of(r) != base_data and UNRECORDED not in (data_of(r), base_data)):
            raise SystemExit(f"{source}: seed {r.get('seed')}, data {data_of(r)}; the baseline {rows[0]['source']}: "
                             f"seed {base_seed}, data {base_data} (a variant must differ in its settings only)")
    m = args.metric
    base_v, base_t = rows[0]["valid"][m], rows[0]["test"][m]
    lines = [args.title, ""] if args.title else []
    lines += [f"| setting | seed | valid {m.upper()} | diff | test {m.upper()} | diff | test HR@10 | selected |",
              "|---|---|---|---|---|---|---|---|"]
    for i, r in enumerate(rows):
        dv = "-" if i == 0 else f"{r['valid'][m] - base_v:+.4f}"
        dt = "-" if i == 0 else f"{r['test'][m] - base_t:+.4f}"
        sel = f"{r['best_phase'] or 'train'} epoch {r['best_epoch']}"
        lines.append(f"| {r['label']} | {r['seed']} | {r['valid'][m]:.4f} | {dv} | {r['test'][m]:.4f} | {dt} | "
                     f"{r['test']['hr@10']:.4f} | {sel} |")
    out = Path(args.output)
    atomic_write_text(Path(f"{out}.md"), "\n".join(lines) + "\n")
    atomic_write_json(Path(f"{out}.json"), {"metric": m, "runs": rows})
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
