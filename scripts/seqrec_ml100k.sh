#!/usr/bin/env bash
# The ID-based baselines on ML-100K (issue "ID-based sequential recommenders"): every model with its own recipe
# (recipes/seqrec/<model>_ml100k.yaml), 3 seeds, trained to early stopping on validation NDCG@10, then tested.
# Each (model, seed) run is kept in $OUT/runs/, so a rerun skips finished runs and resumes a cut one.
#   OMP_NUM_THREADS=1 bash scripts/seqrec_ml100k.sh              # MODELS / SEEDS / OUT override the defaults
#   REPORT_ONLY=1 bash scripts/seqrec_ml100k.sh                    # tables from the finished runs only
# Writes $OUT/seqrec_bench.{json,md} and the committed copy benchmarks/results/seqrec_ml100k_bench.{json,md}, which
# keeps the committed models that $OUT does not hold (so models can be run on different machines).
set -euo pipefail
cd "$(dirname "$0")/.."
DATA=${DATA:-/tmp/prep/ml100k}
OUT=${OUT:-runs/seqrec-bench-ml100k}
MODELS=${MODELS:-sasrec,rearec-prl,rearec-erl,lares}
SEEDS=${SEEDS:-3}
[ -f "$DATA/stats.json" ] || llmrec data prepare --format recbole --input ../shared/data/ml-100k_recbole --output "$DATA"
EXTRA=(); [ -n "${REPORT_ONLY:-}" ] && EXTRA=(--report-only)
llmrec bench seqrec --dataset "$DATA" --models "$MODELS" --seeds "$SEEDS" --config 'recipes/seqrec/{model}_ml100k.yaml' \
  --output-dir "$OUT" --output "$OUT/summary.json" --progress false "${EXTRA[@]}"
mkdir -p benchmarks/results
python - "$OUT" <<'PY'
import json, sys
from pathlib import Path
out = Path(sys.argv[1])
bench = json.loads((out / "seqrec_bench.json").read_text())
# Keep the committed models this run directory does not hold (run on another machine, whose runs/ is gone).
committed = Path("benchmarks/results") / "seqrec_ml100k_bench.json"
if committed.exists():
    old = json.loads(committed.read_text())
    for m in old.get("summary", {}):
        if m not in bench["summary"]:
            bench["summary"][m], bench["runs"][m] = old["summary"][m], old["runs"][m]
            if m in old.get("paired", {}) and old["paired"][m]["baseline"] in bench["summary"]:
                bench.setdefault("paired", {})[m] = old["paired"][m]
paired = bench.get("paired", {})
for m, p in list(paired.items()):
    # The bench pairs every model with the first one it ran; with SASRec run second, its entry holds SASRec minus
    # that model: shown from the model's side (the same rows and resamples, the interval mirrored).
    if m == "sasrec" and p["baseline"] != "sasrec" and p["baseline"] not in paired:
        flip = {k: {"diff": -v["diff"], "ci95": [-v["ci95"][1], -v["ci95"][0]], "excludes_zero": v["excludes_zero"]}
                for k, v in p.items() if isinstance(v, dict)}
        paired[p["baseline"]] = {**p, **flip, "baseline": "sasrec"}
lines = ["ML-100K, leave-one-out, history 50, d 64, full ranking over all items, no history masking; every model",
         "with its own recipe (recipes/seqrec/<model>_ml100k.yaml), early stopping on validation NDCG@10; mean ± std",
         "over the finished seeds of 42, 43, 44 (seeds column); wall times on a shared 2-core CPU, one torch thread per run",
         "(`bash scripts/seqrec_ml100k.sh`; models with no finished seed are not listed). Where SASRec's runs were",
         "benchmarked together with a model's, the brackets add the paired bootstrap 95% interval of the NDCG@10",
         "difference over the 943 test rows (each row averaged over the seeds).",
         "", "| model | seeds | test NDCG@10 | test HR@10 | NDCG@20 | best epochs | s/epoch | inference ms/row |",
         "|---|---|---|---|---|---|---|---|"]
sasrec = bench["summary"].get("sasrec", {}).get("ndcg@10")
order = ["sasrec", "rearec-erl", "rearec-prl", "lares"]
for m, s in sorted(bench["summary"].items(), key=lambda kv: order.index(kv[0]) if kv[0] in order else len(order)):
    runs = bench["runs"][m]
    n20 = [r["test"]["ndcg@20"] for r in runs]
    # LARES: an epoch of its RPT phase when RPT beat the SPT weights on validation.
    best = ", ".join(("" if r.get("best_phase", "train") == "train" else r["best_phase"].upper() + " ")
                     + str(r["best_epoch"]) for r in runs)
    rel = f" ({(s['ndcg@10'] / sasrec - 1) * 100:+.1f}% vs SASRec)" if sasrec and m != "sasrec" else ""
    if m in paired and paired[m]["baseline"] == "sasrec":  # the paired 95% interval over the test rows
        d = paired[m]["ndcg@10"]
        rel = rel[:-1] + f"; {d['diff']:+.4f} [{d['ci95'][0]:+.4f}, {d['ci95'][1]:+.4f}])"
    lines.append(f"| {m} | {int(s['seeds'])} | {s['ndcg@10']:.4f} ± {s['ndcg@10_std']:.4f}{rel} | "
                 f"{s['hr@10']:.4f} ± {s['hr@10_std']:.4f} | {sum(n20) / len(n20):.4f} | {best} | "
                 f"{s['epoch_s']:.1f} | {s['infer_ms_per_row']:.3f} |")
(Path("benchmarks/results") / "seqrec_ml100k_bench.md").write_text("\n".join(lines) + "\n")
(Path("benchmarks/results") / "seqrec_ml100k_bench.json").write_text(json.dumps(bench, indent=1) + "\n")
print("\n".join(lines))
PY
