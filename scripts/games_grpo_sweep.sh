#!/usr/bin/env bash
# Latent GRPO on top of the latent SFT checkpoint of scripts/games_sft_comparison.sh (run that first):
# a learning-rate x advantage-mode sweep of short runs screened on 200 *validation* rows, then the best run
# against its SFT starting point on the same 500 test rows as the other methods. Every stage skips or resumes
# finished work. Results: runs/games-cmp/${NAME}_sweep.md and ${NAME}_compare.{md,json} (NAME=games_grpo).
#   bash scripts/games_grpo_sweep.sh          # GRPO_ROWS=128 prompts per run by default
# Round 2 (relative noise, more prompts, a larger validation screen), results under their own name:
#   GRPO_ROWS=256 VAL_ROWS=300 NOISE_MODE=relative NOISE_SCALE=0.3 LRS="1e-4 5e-4" NAME=games_grpo_rel0.3 \
#     bash scripts/games_grpo_sweep.sh
set -euo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-runs/games-cmp}
GRPO_ROWS=${GRPO_ROWS:-128}
EVAL_ROWS=${EVAL_ROWS:-500}
LRS=${LRS:-"1e-5 5e-5 1e-4"}
MODES=${MODES:-"batch group"}
NOISE_MODE=${NOISE_MODE:-absolute}
NOISE_SCALE=${NOISE_SCALE:-1.5}
VAL_ROWS=${VAL_ROWS:-200}
DTYPE=${DTYPE:-bfloat16}   # the committed results' setting; DTYPE=fast on a CPU without native bf16
NAME=${NAME:-games_grpo}
# Run names carry the noise setting unless it is the recipe's default (keeps the first sweep's names).
TAG=""; [ "$NOISE_MODE/$NOISE_SCALE" = "absolute/1.5" ] || TAG="_${NOISE_MODE}${NOISE_SCALE}"
VTAG="val"; [ "$VAL_ROWS" = 200 ] || VTAG="val${VAL_ROWS}"
DATA=data/games
SFT="$OUT/sft_latent"
[ -f "$SFT/train_results.json" ] || { echo "no finished latent SFT in $SFT: run scripts/games_sft_comparison.sh" >&2; exit 1; }
VAL=(--config recipes/games/eval.yaml --dataset "$DATA" --split valid --max_rows "$VAL_ROWS" --dtype "$DTYPE")
llmrec evaluate "${VAL[@]}" --checkpoint "$SFT" --output_dir "$OUT/${VTAG}_sft_latent"
runs=("$OUT/${VTAG}_sft_latent")
for mode in $MODES; do
  for lr in $LRS; do
    name="grpo_${mode}_lr${lr}${TAG}"
    llmrec grpo --config recipes/games/grpo_latent.yaml --sft_checkpoint "$SFT" --dataset "$DATA" \
      --model_dtype "$DTYPE" --max_train_rows "$GRPO_ROWS" --per_device_train_batch_size 8 \
      --gradient_accumulation_steps 4 --advantage_mode "$mode" --learning_rate "$lr" --save_steps 4 \
      --noise_mode "$NOISE_MODE" --noise_scale "$NOISE_SCALE" \
      --output_dir "$OUT/$name"
    llmrec evaluate "${VAL[@]}" --checkpoint "$OUT/$name" --output_dir "$OUT/${VTAG}_$name"
    runs+=("$OUT/${VTAG}_$name")
  done
done
llmrec compare "${runs[@]}" --metrics hr@10,ndcg@10 --output "$OUT/${NAME}_sweep.json" | head -n -1 | tee "$OUT/${NAME}_sweep.md"
# The best run on validation NDCG@10 (ties: the first) goes to the test comparison.
best=$(python - "$OUT/${NAME}_sweep.json" <<'PY'
import json, sys
r = json.load(open(sys.argv[1]))
vals = r["metrics"]["ndcg@10"][1:]
runs = r["runs"][1:]
print(runs[max(range(len(vals)), key=lambda i: (vals[i], -i))].rsplit("/", 1)[-1].split("_", 1)[1])
PY
)
echo "best on validation: $best"
llmrec evaluate --config recipes/games/eval.yaml --dataset "$DATA" --max_rows "$EVAL_ROWS" --dtype "$DTYPE" --checkpoint "$OUT/$best" \
  --output_dir "$OUT/eval_$best"
# (the SFT evaluations come from scripts/games_sft_comparison.sh, possibly still running beside this script)
while [ ! -f "$OUT/eval_sft_latent/results.json" ] || [ ! -f "$OUT/eval_sft_bigrec/results.json" ]; do sleep 30; done
llmrec compare "$OUT/eval_sft_latent" "$OUT/eval_$best" "$OUT/eval_sft_bigrec" --metrics hr@1,hr@5,hr@10,ndcg@5,ndcg@10 \
  --output "$OUT/${NAME}_compare.json" | head -n -1 | tee "$OUT/${NAME}_compare.md"
# The committed results: validation sweep + test comparison. G and what was trained are the recipe's: read back
# from the best run's own configuration rather than assumed.
trained=$(python - "$OUT/$best/training_args.json" <<'PY'
import json, sys
a = json.load(open(sys.argv[1]))
print(a["num_generations"], "head + LoRA" if a.get("train_lora") else "head only")
PY
)
G=${trained%% *}; TRAINED=${trained#* }
# put SRC DEST: copy beside DEST and rename into place, so a failure midway (or a reader meanwhile) never meets a
# half-written committed file; what a failure leaves beside it is removed on exit.
put() { cp "$1" "$2.tmp.$$"; mv "$2.tmp.$$" "$2"; }
trap 'rm -f benchmarks/results/*.tmp.$$' EXIT
mkdir -p benchmarks/results
{ echo "Latent GRPO sweep ($GRPO_ROWS prompts per run, G=$G, $TRAINED, noise $NOISE_SCALE $NOISE_MODE), screened on $VAL_ROWS validation rows"
  echo "(first row: the latent SFT starting point):"; echo; cat "$OUT/${NAME}_sweep.md"; echo
  echo "Best on validation: $best. Test, $EVAL_ROWS rows (first row: latent SFT; differences with paired bootstrap 95% intervals):"
  echo; cat "$OUT/${NAME}_compare.md"; } > "$OUT/${NAME}_smollm2.md"
put "$OUT/${NAME}_smollm2.md" "benchmarks/results/${NAME}_smollm2.md"
put "$OUT/${NAME}_sweep.json" "benchmarks/results/${NAME}_sweep_smollm2.json"
put "$OUT/${NAME}_compare.json" "benchmarks/results/${NAME}_smollm2.json"
