#!/usr/bin/env bash
# The speed benchmarks whose JSON the README cites, each form timed side by side in one run on one torch thread
# (ratios, not seconds, are what these shared machines measure reliably). Each JSON records every option under
# "args". ~25 min on a 2-core CPU; a finished benchmark is kept (delete its JSON to run it again).
#   OMP_NUM_THREADS=1 bash scripts/speed_benchmarks.sh
set -euo pipefail
cd "$(dirname "$0")/.."
R=benchmarks/results
run() {  # run OUT.json llmrec bench ...: skipped when OUT.json exists
  local out=$1; shift
  if [ -f "$out" ]; then echo "== $out exists (skipped)"; return; fi
  echo "== $out"; "$@" --output "$out" | tail -n 1
}
# latent GRPO step: shared prefix vs the naive per-member form, G = 8, timed in bf16, gradients compared in fp32
run $R/grpo_smollm2_g8.json llmrec bench grpo --model smollm2-135m --group-size 8 --steps 5 --threads 1
# the same in fp32 (for CPUs without native bf16, where bf16 is emulated)
run $R/grpo_smollm2_g8_fp32.json llmrec bench grpo --model smollm2-135m --group-size 8 --steps 5 --threads 1 --dtype float32
# latent SFT step: plain vs the one-pass latent forward vs the naive two-pass form
run $R/latent_sft_smollm2.json llmrec bench latent-sft --model smollm2-135m --steps 5 --threads 1
# constrained beam search: ours vs generate + prefix_allowed_tokens_fn vs a floor, on Games test rows
run $R/decoding_smollm2_bf16.json llmrec bench decoding --model smollm2-135m --rows 48 --dtype bfloat16
run $R/decoding_smollm2_fp32.json llmrec bench decoding --model smollm2-135m --rows 24 --dtype float32
