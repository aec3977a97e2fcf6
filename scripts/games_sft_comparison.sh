#!/usr/bin/env bash
# Latent SFT vs BIGRec-style SFT vs zero-shot vs popularity on the DEALRec Games time split, SmolLM2-135M bf16,
# sized for a 2-core CPU (issue "Latent reasoning tokens ... SFT"). Every stage skips or resumes finished work,
# so the script can be rerun after an interruption. Results: runs/games-cmp/compare.{md,json}.
#   bash scripts/games_sft_comparison.sh            # TRAIN_ROWS=1024 EVAL_ROWS=500 by default
set -euo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-runs/games-cmp}
TRAIN_ROWS=${TRAIN_ROWS:-1024}
EVAL_ROWS=${EVAL_ROWS:-500}
DTYPE=${DTYPE:-bfloat16}   # the committed results' setting; DTYPE=fast on a CPU without native bf16 (~20x faster there)
DATA=data/games
[ -f "$DATA/stats.json" ] || llmrec data prepare --format seq-txt --input ../shared/data/amazon_games_dealrec --output "$DATA"
# Same data, steps and seed for both SFT runs; model selection on 200 validation rows (never on test rows).
COMMON=(--dataset "$DATA" --model_dtype "$DTYPE" --max_train_rows "$TRAIN_ROWS" --max_eval_rows 200
        --per_device_train_batch_size 8 --gradient_accumulation_steps 2 --eval_steps 16 --save_steps 16
        --logging_steps 4 --num_train_epochs 1 --seed 0)
llmrec sft --config recipes/games/sft_bigrec.yaml "${COMMON[@]}" --output_dir "$OUT/sft_bigrec"
llmrec sft --config recipes/games/sft_latent.yaml "${COMMON[@]}" --output_dir "$OUT/sft_latent"
EVAL=(--config recipes/games/eval.yaml --dataset "$DATA" --max_rows "$EVAL_ROWS" --dtype "$DTYPE")
llmrec evaluate "${EVAL[@]}" --method popularity --output_dir "$OUT/eval_popularity"
llmrec evaluate "${EVAL[@]}" --output_dir "$OUT/eval_zero_shot"
llmrec evaluate "${EVAL[@]}" --checkpoint "$OUT/sft_bigrec" --output_dir "$OUT/eval_sft_bigrec"
llmrec evaluate "${EVAL[@]}" --checkpoint "$OUT/sft_latent" --output_dir "$OUT/eval_sft_latent"
llmrec compare "$OUT/eval_sft_bigrec" "$OUT/eval_sft_latent" "$OUT/eval_zero_shot" "$OUT/eval_popularity" \
  --metrics hr@1,hr@5,hr@10,ndcg@5,ndcg@10 --output "$OUT/compare.json" | head -n -1 | tee "$OUT/compare.md"
# The committed results (the README shows the .md).
# Built in $OUT, then renamed into place: an interrupted run never leaves a half-written committed file.
put() { cp "$1" "$2.tmp.$$"; mv "$2.tmp.$$" "$2"; }
trap 'rm -f benchmarks/results/*.tmp.$$' EXIT
mkdir -p benchmarks/results
{ echo "SmolLM2-135M bf16, LoRA r8, $TRAIN_ROWS train rows (1 epoch, batch 16, lr 3e-4, seed 0, model selection on 200"
  echo "validation rows), $EVAL_ROWS test rows of the DEALRec Games time split, 10 beams, item-level matching;"
  echo "first row = BIGRec-style SFT, the baseline of the differences (paired bootstrap 95% intervals):"
  echo; cat "$OUT/compare.md"; } > "$OUT/games_sft_smollm2.md"
put "$OUT/games_sft_smollm2.md" benchmarks/results/games_sft_smollm2.md
put "$OUT/compare.json" benchmarks/results/games_sft_smollm2.json
