#!/usr/bin/env bash
# Latent GRPO that also trains the LoRA adapter (train_lora: true), on train rows the latent SFT never saw
# (exclude_sft_rows: true), against its ceiling (the exact likelihood gradient on head + LoRA, and head only) on the
# same 128 prompts and 32 steps; scored by the held-out log-likelihood of the true title on 300 validation rows.
# Every stage skips finished work. Needs a finished latent SFT (scripts/games_sft_comparison.sh or llmrec sft).
#   SFT=runs/games-cmp/sft_latent_fp32 DTYPE=float32 bash scripts/games_grpo_lora_fresh.sh
set -euo pipefail
cd "$(dirname "$0")/.."
SFT=${SFT:-runs/games-cmp/sft_latent}
DTYPE=${DTYPE:-fast}
OUT=${OUT:-runs/games-cmp/lora_fresh}
LR=${LR:-1e-4}
NAME=${NAME:-games_grpo_lora_fresh_smollm2}
DATA=data/games
[ -f "$SFT/train_results.json" ] || { echo "no finished latent SFT in $SFT" >&2; exit 1; }
python scripts/grpo_head_likelihood_bound.py "$SFT" --lr "$LR" --prompts 128 --steps 32 --eval-rows 300 \
  --exclude-sft-rows --dtype "$DTYPE" --output-root "$OUT" --results "benchmarks/results/${NAME}_head_bound"
python scripts/grpo_head_likelihood_bound.py "$SFT" --lr "$LR" --prompts 128 --steps 32 --eval-rows 300 \
  --exclude-sft-rows --train-lora --dtype "$DTYPE" --output-root "$OUT" --results "benchmarks/results/${NAME}_lora_bound"
COMMON=(--config recipes/games/grpo_latent.yaml --sft_checkpoint "$SFT" --dataset "$DATA" --model_dtype "$DTYPE"
        --max_train_rows 128 --exclude_sft_rows true --train_lora true --learning_rate "$LR" --save_steps 8)
# The paper's objective (ratio of the target's likelihood under each noised latent), group advantages, G = 8.
llmrec grpo "${COMMON[@]}" --advantage_mode group --per_device_train_batch_size 8 --gradient_accumulation_steps 4 \
  --output_dir "$OUT/grpo_group_lora"
# The score-function form: Gaussian log-density of the noise, antithetic pairs (G = 9), log-likelihood reward.
llmrec grpo "${COMMON[@]}" --advantage_mode group --policy_logprob gaussian --antithetic_noise true \
  --num_generations 9 --reward_funcs log_likelihood --noise_mode relative --noise_scale 0.3 \
  --per_device_train_batch_size 9 --gradient_accumulation_steps 4 --output_dir "$OUT/grpo_gauss_anti_ll_lora"
python scripts/grpo_heldout_rewards.py "$SFT" "$OUT/grpo_group_lora" "$OUT/grpo_gauss_anti_ll_lora" \
  "$OUT/lora_ll_lr$(python -c "print(f'{float(\"$LR\"):g}')")" --rows 300 --dtype "$DTYPE" --output "benchmarks/results/${NAME}.json"
