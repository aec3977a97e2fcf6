#!/usr/bin/env bash
# The paired LM comparisons on Games that README.md and benchmarks/README.md show (latent head variants, latent vs
# BIGRec over seeds, GRPO over its SFT start, SFT data size), recomputed from the committed evaluation archives
# (benchmarks/results/pipeline_games_*_runs: every run's rankings.jsonl) with `llmrec compare` (bootstrap seed 0,
# 10,000 resamples), each run named by a label. Needs no model and no training (~1 min):
#   bash scripts/games_lm_comparisons.sh && python scripts/update_readme_results.py
set -euo pipefail
cd "$(dirname "$0")/.."
R=benchmarks/results
S=$R/pipeline_games_smollm2_runs N=$R/pipeline_games_smollm2_norm_runs N2=$R/pipeline_games_smollm2_norm_2048_runs
Q=$R/pipeline_games_qwen_runs QN=$R/pipeline_games_qwen_norm_runs
# seeds DIR STAGE N: the stage's evaluation directories of seeds 0..N-1 (seed 0 at the top of the archive)
seeds() { echo -n "$1/$2"; for i in $(seq 1 $(($3 - 1))); do echo -n " $1/seed$i/$2"; done; }
compare() { local name=$1; shift; llmrec compare "$@" --output "$R/$name.json" --markdown "$R/$name.md" > /dev/null; echo "$R/$name.md"; }

compare games_head_output_norm_qwen $Q/eval_sft_latent $QN/eval_sft_latent $Q/eval_grpo_batch_lr1e-4 $QN/eval_grpo_rel0.3 \
  $Q/eval_sft_bigrec --labels "latent SFT (paper head),latent SFT (normalised head),paper head + GRPO,normalised head + GRPO (noise 0.3 rel.),BIGRec SFT"
compare games_head_output_norm_smollm2 $S/eval_sft_latent $N/eval_sft_latent $S/eval_grpo_batch_lr1e-4 $N/eval_grpo_rel1.5 \
  $S/eval_sft_bigrec --labels "latent SFT (paper head),latent SFT (normalised head),paper head + GRPO,normalised head + GRPO (noise 1.5 rel.),BIGRec SFT"
# shellcheck disable=SC2046
compare games_head_output_norm_smollm2_3seeds $(seeds $S eval_sft_latent 3) $(seeds $N eval_sft_latent 3) \
  $(seeds $S eval_grpo_batch_lr1e-4 3) $(seeds $N eval_grpo_rel1.5 3) $(seeds $S eval_sft_bigrec 3) --seeds-per-run 3 \
  --labels "latent SFT (paper head),latent SFT (normalised head),paper head + GRPO,normalised head + GRPO,BIGRec SFT"
# shellcheck disable=SC2046
compare games_norm_latent_vs_bigrec_smollm2_6seeds $(seeds $S eval_sft_bigrec 6) $(seeds $N eval_sft_latent 6) \
  $(seeds $N eval_grpo_rel1.5 6) --seeds-per-run 6 \
  --labels "BIGRec SFT,latent SFT (normalised head),latent SFT + GRPO (normalised head)"
# every SmolLM2 SFT -> GRPO pair: the paper head's 3 seeds, then the normalised head's 6 (seed s paired with seed s)
# shellcheck disable=SC2046
compare games_grpo_over_sft_smollm2_9runs $(seeds $S eval_sft_latent 3) $(seeds $N eval_sft_latent 6) \
  $(seeds $S eval_grpo_batch_lr1e-4 3) $(seeds $N eval_grpo_rel1.5 6) --seeds-per-run 9 \
  --labels "latent SFT (9 SFT runs),latent SFT + GRPO (each from its SFT run)"
compare games_train_rows_2048_smollm2 $S/eval_sft_bigrec $N2/eval_sft_bigrec $N/eval_sft_latent $N2/eval_sft_latent \
  --labels "BIGRec SFT (1024 rows),BIGRec SFT (2048 rows),latent SFT normalised (1024 rows),latent SFT normalised (2048 rows)"
