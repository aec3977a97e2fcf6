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
DATA=${DATA:-data/ml100k}
OUT=${OUT:-runs/seqrec-bench-ml100k}
MODELS=${MODELS:-sasrec,rearec-prl,rearec-erl,lares}
SEEDS=${SEEDS:-3}
[ -f "$DATA/stats.json" ] || llmrec data prepare --format recbole --input ../shared/data/ml-100k_recbole --output "$DATA"
EXTRA=(); [ -n "${REPORT_ONLY:-}" ] && EXTRA=(--report-only)
llmrec bench seqrec --dataset "$DATA" --models "$MODELS" --seeds "$SEEDS" --config 'recipes/seqrec/{model}_ml100k.yaml' \
  --output-dir "$OUT" --output "$OUT/summary.json" --progress false "${EXTRA[@]}"
mkdir -p benchmarks/results
# The committed table (and the merge with the committed models): scripts/seqrec_ml100k_table.py, tested on its own.
python scripts/seqrec_ml100k_table.py "$OUT"
