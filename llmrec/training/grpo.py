"""Latent GRPO (LatentR3's "LR-GRPO"): reinforce the pooled latent with continuous rule-based rewards.

With ``rollout: latent`` (the default, the paper's) no text is generated. Each **group** is one training prompt
with its true next item and ``G`` members: member 0 keeps the pooled latent ``r``, members ``1..G-1`` use
``r + eps`` with Gaussian ``eps``. Every member is scored by reward functions of the true item under its latent
(its title's likelihood, or its rank among sampled candidates; :mod:`llmrec.training.rewards`); ``rollout:
generate`` is the vanilla GRPO the paper compares against, titles sampled from the catalogue trie and rewarded by
``exact_match`` / ``token_f1``. Advantages are computed over the whole optimiser batch gathered from
every process (:mod:`llmrec.training.advantages`), and the clipped-ratio objective pushes the pooling
head (and optionally LoRA) towards latents that make the true item likely.

What differs from the reference code (see ``../shared/papers/latentr3.md`` section 7), on purpose:

* gradients go through the accelerate-prepared (DDP) module, so processes stay in sync (FSDP and DeepSpeed are
  refused);
* "batch" in the batch advantage is the whole optimiser batch (all processes, all accumulation
  micro-steps): the batch is scored first without gradients, then trained on;
* noise is drawn per sample from ``(seed, epoch, dataset row, member)``, never from a process's RNG, so the
  process layout cannot change it, and member 0 of *every* group is noise-free;
* with ``num_iterations >= 2`` the ratio is taken against the scoring pass and the clip acts;
* groups with a NaN/inf reward are skipped (advantage 0, excluded from every normalisation) and counted.

The prompt is shared by the ``G`` members, so its KV cache and the pooled latent are computed once per
prompt and only ``[latent + eps, target]`` runs per member; ``naive_forward: true`` runs the paper's
per-member two-pass form instead (the reference the fast path is tested against).
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import hashlib
import json
import logging
import math
import os
import shutil
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn
from trl import GRPOConfig

from llmrec.config import ConfigError
from llmrec.data.canonical import (
    atomic_directory,
    atomic_write_text,
    give_saved_weights_default_permissions,
    replace_durably,
)
from llmrec.distributed import accelerator_kwargs, has_accelerator
from llmrec.models.latent import LatentReasoningLM, build_naive_inputs
from llmrec.tensorboard_log import ScalarLog, wants_tensorboard
from llmrec.training.advantages import ADVANTAGE_MODES, compute_advantages
from llmrec.training.rewards import (
    GENERATION_REWARDS,
    RANK_REWARDS,
    REWARD_FUNCTIONS,
    RewardInputs,
    combine_rewards,
)

logger = logging.getLogger(__name__)

__all__ = ["GRPOBatch", "LatentGRPOConfig", "LatentGRPOModule", "MemberScores", "LatentGRPOTrainer", "member_noise", "run_grpo"]

STATE_NAME = "grpo_state.json"
OPTIMIZER_NAME = "optimizer.safetensors"
RESULTS_NAME = "grpo_results.json"
NOISE_MODES = ("absolute", "relative")
LOSS_TYPES = ("grpo", "dapo")
POLICY_LOGPROBS = ("target", "gaussian")
# latent: members differ by their latent noise, scored on the true title (the paper); generate: each member samples a
# title under its (noised) latent with constrained sampling, rewarded by GENERATION_REWARDS (vanilla GRPO).
ROLLOUTS = ("latent", "generate")
GENERATE_LOGPROBS = ("constrained", "vocab")
SAMPLE_STREAM = 7  # the key stream of generation-mode sampling (seqrec.keyed_random.mix)
RANK_NEGATIVES = ("uniform", "popularity", "beam", "beam_current")
# The negatives drawn from a constrained beam search (they need the catalogue's title trie).
BEAM_RANK_NEGATIVES = ("beam", "beam_current")
BEAM_NEGATIVES_NAME = "beam_negatives.json"
# TRL GRPOConfig fields this trainer does not implement: setting one would otherwise be silently ignored.
_SAMPLING = "generation mode samples from the trie-constrained softmax at `temperature` only; the latent mode samples no text"
IGNORED_TRL_FIELDS = {
    "scale_rewards": "advantages come from advantage_mode",
    "importance_sampling_level": "the ratio is per token",
    "delta": "no two-sided clipping",
    "top_entropy_quantile": "no entropy masking",
    "mask_truncated_completions": "sampled titles end where the catalogue's titles end: none is truncated",
    "max_completion_length": "sampled titles end where the catalogue's titles end",
    "use_vllm": "titles are sampled by llmrec's constrained sampler",
    "use_transformers_paged": "titles are sampled by llmrec's constrained sampler",
    "use_transformers_continuous_batching": "titles are sampled by llmrec's constrained sampler",
    "cache_implementation": "titles are sampled by llmrec's constrained sampler",
    "sync_ref_model": "the reference is the frozen SFT model",
    "top_p": _SAMPLING,
    "top_k": _SAMPLING,
    "min_p": _SAMPLING,
    "repetition_penalty": _SAMPLING,
    "generation_kwargs": _SAMPLING,
    "generation_batch_size": "every optimiser batch is scored once (num_iterations reuses it)",
    "steps_per_generation": "every optimiser batch is scored once (num_iterations reuses it)",
    "off_policy_mask_threshold": "no off-policy masking",
    "torch_compile": "not supported",
    "cast_lm_head_to_fp32": "the LM head computes in the model's dtype, log-softmax in float32",
    "optim": "the optimiser is torch AdamW (adam_beta1/2, adam_epsilon, weight_decay apply)",
    "entropy_coef": "no entropy bonus",
    "use_adaptive_entropy": "no entropy bonus",
    "multi_objective_aggregation": "rewards are combined by reward_weights, then advantage_mode",
    "shuffle_dataset": "every epoch draws its prompt order from the seed",
    # TrainingArguments fields the HF Trainer acts on; this trainer is not a Trainer (review: accepted and ignored)
    "save_strategy": "a checkpoint every save_steps optimiser steps",
    "save_only_model": "checkpoints hold the trained weights, optimiser and RNG state (resume needs them)",
    "eval_strategy": "the held-out check (eval_rows) runs before and after training",
    "eval_steps": "the held-out check (eval_rows) runs before and after training",
    "eval_on_start": "the held-out check (eval_rows) runs before and after training",
    "per_device_eval_batch_size": "the held-out check scores prompts_per_micro_batch prompts at a time",
    "load_best_model_at_end": "the last step's weights are the result (no model selection here)",
    "metric_for_best_model": "the last step's weights are the result (no model selection here)",
    "logging_strategy": "every optimiser step is logged",
    "logging_first_step": "every optimiser step is logged",
    "dataloader_num_workers": "prompts are tokenised once up front, no DataLoader",
    "resume_from_checkpoint": "a rerun resumes from the last checkpoint in output_dir (retrain: true starts over)",
    "push_to_hub": "not supported",
    "neftune_noise_alpha": "not supported",
    "use_liger_kernel": "not supported",
    "auto_find_batch_size": "not supported",
    "full_determinism": "noise and prompt order are keyed draws from seed",
    "data_seed": "noise and prompt order are keyed draws from seed",
    "train_sampling_strategy": "every epoch draws its prompt order from the seed",
}


# ----------------------------------------------------------------------------------------------- config


_LAUNCH = "processes and devices come from `accelerate launch` and its config (FSDP and DeepSpeed are refused there)"
# TrainingArguments fields the Trainer would act on and this trainer does not (refused when true), with what to do.
NO_EFFECT_FIELDS = {
    "bf16": "set model_dtype, or mixed_precision in the accelerate config",
    "fp16": "set model_dtype, or mixed_precision in the accelerate config",
    "gradient_checkpointing": "latent GRPO does not implement it",
    "activation_checkpointing": "latent GRPO does not implement it",
    # accepted and ignored until 2026-12-05 (review of the inherited fields)
    "torch_compile_backend": "torch_compile is not supported",
    "torch_compile_mode": "torch_compile is not supported",
    "fsdp": _LAUNCH,
    "fsdp_config": _LAUNCH,
    "deepspeed": _LAUNCH,
    "ddp_backend": _LAUNCH,
    "ddp_find_unused_parameters": _LAUNCH,
    "ddp_bucket_cap_mb": _LAUNCH,
    "ddp_broadcast_buffers": _LAUNCH,
    "model_init_kwargs": "the policy is the SFT checkpoint, loaded in model_dtype",
    "num_generations_eval": "the held-out check samples num_generations titles",
    "bf16_full_eval": "the held-out check computes in model_dtype",
    "fp16_full_eval": "the held-out check computes in model_dtype",
    "log_completions": "not implemented",
    "num_completions_to_print": "not implemented",
    "log_unique_prompts": "not implemented",
    "enable_jit_checkpoint": "checkpoints are written every save_steps; a killed run resumes from the last one",
    "optim_args": "the optimiser is torch AdamW (adam_beta1/2, adam_epsilon, weight_decay apply)",
    "chat_template_kwargs": "prompts are built with the SFT checkpoint's prompt settings",
    "torch_empty_cache_steps": "not implemented",
}
# TrainingArguments fields that always hold a value (TrainingArguments builds one): refused when not the default.
NON_DEFAULT_REFUSED_FIELDS = {
    "accelerator_config": "the trainer builds its own Accelerator and splits batches by prompts; its options are not "
                          "read",
}


def _is_default_accelerator_config(value: Any) -> bool:
    """True for None, the default ``AcceleratorConfig`` or its dict form (as a recorded training_args.json holds it;
    TrainingArguments converts a dict only after this config's checks)."""
    from transformers.trainer_pt_utils import AcceleratorConfig

    if value is None:
        return True
    if isinstance(value, dict):
        try:
            value = AcceleratorConfig(**value)
        except TypeError:  # an unknown key: not the default
            return False
    return value == AcceleratorConfig()


def inert_fields(found: dict[str, Any], wanted: dict[str, Any]) -> set[str]:
    """Fields that change nothing a GRPO run trains under both recorded configs, so a finished run or a checkpoint
    is not refused over them: ``use_bias_correction_kl`` without a KL term (beta 0). Runs before the option was
    implemented here (2026-12-05) recorded TRL's default True and trained without the correction; likewise
    ``gradient_checkpointing`` (TRL's True recorded, never implemented)."""
    # recorded as TRL's True before 2026-12-05 (the new name mirrors the old), never acted on
    never_read = {"gradient_checkpointing", "activation_checkpointing"}
    if not (found.get("beta") or 0.0) and not (wanted.get("beta") or 0.0):
        return {"use_bias_correction_kl"} | never_read
    return never_read


@dataclass
class LatentGRPOConfig(GRPOConfig):
    """Latent GRPO on top of an llmrec SFT checkpoint; TRL's ``GRPOConfig`` fields keep their meaning.

    ``num_generations`` is the group size G; ``per_device_train_batch_size`` counts members (rows), so it
    holds ``per_device_train_batch_size / G`` prompts; the optimiser batch is
    ``per_device_train_batch_size x processes x gradient_accumulation_steps`` rows.
    """

    sft_checkpoint: str | None = field(
        default=None, metadata={"help": "Output directory of `llmrec sft` (with N >= 1 latent tokens) to start from."}
    )
    model_name_or_path: str | None = field(
        default=None, metadata={"help": "Base model of an adapter checkpoint (default: the one the checkpoint records)."}
    )
    model_dtype: str = field(default="float32", metadata={"help": "Weights dtype: float32 | bfloat16 | float16 | fast "
                                                                   "(bfloat16 where native, else float32)."})
    dataset: str | None = field(
        default=None, metadata={"help": "Prepared dataset directory or sample name (default: the SFT checkpoint's)."}
    )
    train_split: str = field(default="train", metadata={"help": "Split whose rows are the prompts."})
    exclude_sft_rows: bool = field(
        default=False,
        metadata={"help": "Draw the prompts only from rows the SFT checkpoint did not train on (when it trained on "
                  "a seeded subset of the same split, as max_train_rows does; read from its training_args.json). "
                  "With the default (the paper: both stages on the train set), a small SFT subset and the same "
                  "seed make the GRPO prompts a subset of the SFT's own rows."},
    )
    max_train_rows: int | None = field(
        default=None, metadata={"help": "Use a seeded random subset of this many prompts (None = all)."}
    )
    history_length: int | None = field(default=None, metadata={"help": "Items of history (default: the SFT one)."})
    max_length: int | None = field(default=None, metadata={"help": "Prompt + latents + answer tokens (default: SFT's)."})
    reward_funcs: list[str] = field(
        default_factory=lambda: ["neg_ppl"],
        metadata={"help": f"Reward functions, by name: {sorted(REWARD_FUNCTIONS)}. Weighted by reward_weights."},
    )
    advantage_mode: str = field(
        default="batch",
        metadata={"help": "batch: LatentR3's (reward - mean noise-free reward of the optimiser batch) / L2 norm; "
                  "group: GRPO z-score within each group."},
    )
    noise_scale: float = field(default=1.5, metadata={"help": "Std of the latent noise (the paper: 1.5, absolute)."})
    noise_mode: str = field(
        default="absolute",
        metadata={"help": "absolute: eps ~ N(0, noise_scale^2 I); relative: std noise_scale * ||r|| / sqrt(H), so "
                  "that ||eps|| is about noise_scale * ||r||."},
    )
    antithetic_noise: bool = field(
        default=False,
        metadata={"help": "Draw members 1..G-1 as mirrored pairs (eps, -eps) (num_generations must be odd): the "
                  "pair's baseline and curvature terms cancel in the advantage-weighted sum, a variance "
                  "reduction for policy_logprob=gaussian."},
    )
    rollout: str = field(
        default="latent",
        metadata={"help": "latent (the paper): the G members differ only by their latent noise and are scored on "
                  "the true title, no text is generated. generate (the vanilla GRPO the paper compares against): "
                  "each member samples a catalogue title under its (noised) latent by constrained sampling at "
                  "`temperature`, is rewarded by exact_match / token_f1, and the ratio is over the sampled title's "
                  "tokens; same trainer, same advantages."},
    )
    generate_logprob: str = field(
        default="constrained",
        metadata={"help": "rollout: generate. Log-probs of the sampled titles' tokens in the ratio and the KL. "
                  "constrained: under the distribution the titles are drawn from (the softmax at `temperature` "
                  "over the tokens the title trie allows after each prefix; a token the trie forces has log-prob "
                  "0): the policy gradient of the sampler itself. vocab: the softmax over the whole vocabulary "
                  "(TRL's convention under a constraining logits processor): adds a term that moves the "
                  "probability mass the trie's tokens hold along high-advantage titles."},
    )
    policy_logprob: str = field(
        default="target",
        metadata={"help": "What the ratio and the advantage weight. target (the paper): the per-token log-probs of "
                  "the true title under each member's noised latent -- a pathwise, advantage-weighted likelihood "
                  "gradient, which does not follow the gradient of the expected reward: to second order in the "
                  "noise its expected update moves the latent along sigma^2 H g (g, H: gradient and curvature of the "
                  "target's log-likelihood in the latent), which lowers the likelihood where it is concave, and mostly "
                  "negative advantages (noise that hurts) lower it further. gaussian: the log-density of each "
                  "member's latent under N(latent, std^2 I) of the current head -- the score-function "
                  "(evolution-strategies) gradient of the expected reward; one 'token' per member. The std is held "
                  "fixed at its value when the members were drawn: with noise_mode relative it scales with the "
                  "latent's norm, whose own effect on the density is not differentiated (the gradient at fixed "
                  "sigma)."},
    )
    eval_rows: int = field(
        default=0,
        metadata={"help": "Held-out rows (eval_split, seeded subset) whose noise-free rewards -- neg_ppl and "
                  "log_likelihood of the true title under the pooled latent; with a candidate reward on, the "
                  "target's reciprocal_rank and candidate_log_softmax among rank_candidates items drawn per row; "
                  "under rollout: generate, exact_match and token_f1 averaged over G titles sampled per row -- "
                  "are measured before and after training: a check that GRPO improved what it optimises on rows "
                  "it never saw (0 = off)."},
    )
    eval_split: str = field(default="valid", metadata={"help": "Split of the eval_rows."})
    rank_candidates: int = field(
        default=100, metadata={"help": "Candidate set size (target included) of rank-based rewards."}
    )
    rank_negatives: str = field(
        default="uniform",
        metadata={"help": "How the other candidates of a rank-based reward are drawn: uniform over the catalogue, "
                  "popularity (in proportion to 1 + the item's count as a train-split target): harder "
                  "negatives, closer to the items a beam search ranks above the target; or beam: the items the "
                  "starting model's own constrained beam search returns for the prompt (noise-free latent, "
                  "rank_candidates beams, length penalty 1), i.e. the items that compete with the target at "
                  "evaluation, topped up uniformly when the search returns fewer. Beam negatives are mined once, "
                  f"before training (and before a resume loads its checkpoint), and kept in output_dir/{BEAM_NEGATIVES_NAME}; "
                  "or beam_current: the same search run by the current policy once per optimiser step, when the "
                  "step is scored, for that step's prompts (the items that compete with the target now; ~1 s per prompt at 20 beams on a "
                  "135M model on CPU), while the held-out check keeps the starting model's items (mined once, as "
                  "for beam) so that checkpoints compare on the same candidates."},
    )
    rank_chunk_rows: int = field(
        default=64, metadata={"help": "Rows per forward when scoring candidates (memory vs speed)."}
    )
    train_lora: bool = field(
        default=False, metadata={"help": "Also train the SFT LoRA adapter (default: the pooling head only, as the paper)."}
    )
    naive_forward: bool = field(
        default=False, metadata={"help": "Use the per-member two-pass reference form (slow; for checks and benchmarks)."}
    )
    retrain: bool = field(
        default=False, metadata={"help": "Train again from the SFT checkpoint even if output_dir holds a finished "
                                 "run or checkpoints (by default a finished run is skipped and a cut one resumed)."}
    )
    learning_rate: float = field(default=1e-4, metadata={"help": "AdamW learning rate (the paper sweeps 1e-5..5e-4)."})
    loss_type: str = field(
        default="grpo",
        metadata={"help": "grpo: mean over each member's tokens, then over members (the paper's loss: its token "
                  "mean runs over a micro-batch of one group, whose members share the target title's length); dapo: "
                  "mean over all tokens of the optimiser batch (longer titles weigh more)."},
    )
    epsilon_high: float | None = field(default=0.28, metadata={"help": "Upper clip (1 + epsilon_high), the paper's."})
    disable_dropout: bool = field(default=True, metadata={"help": "Run the model without dropout (deterministic)."})
    per_device_train_batch_size: int = field(default=8, metadata={"help": "Rows (members) per process per micro-step."})
    num_train_epochs: float = field(default=1.0, metadata={"help": "Epochs over the prompts."})
    logging_steps: float = field(default=1, metadata={"help": "Log every N optimiser steps."})
    save_steps: float = field(default=50, metadata={"help": "Checkpoint every N optimiser steps."})
    save_total_limit: int | None = field(default=2, metadata={"help": "Keep this many checkpoints."})
    report_to: None | str | list[str] = field(
        default="none",
        metadata={"help": "none or tensorboard: every step's logged values as scalars under output_dir/runs "
                  "(pip install 'llmrec[tensorboard]')."},
    )
    bf16: bool | None = field(default=False, metadata={
        "help": "Not read by latent GRPO (must stay false): the weights' dtype is model_dtype, mixed precision is the "
                "accelerate config's (mixed_precision)."})
    gradient_checkpointing: bool | None = field(default=None, metadata={
        "help": "Not implemented by latent GRPO (leave unset, as activation_checkpointing, its new name in "
                "transformers 5; TRL's default true did nothing here)."})
    use_bias_correction_kl: bool = field(
        default=False,
        metadata={"help": "Multiply the per-token KL term (beta > 0) by the ratio, as TRL's option of this name does "
                  "(its default True: the unbiased reverse-KL gradient for tokens sampled from the policy, i.e. "
                  "rollout: generate). Default False here: in the latent mode the scored tokens are the true "
                  "title's, not samples of the policy, and the KL is k3 on them as in TRL before this option."},
    )

    def __post_init__(self) -> None:
        from llmrec.models.backbone import checked_dtype_name

        if self.sft_checkpoint and not self.output_dir:  # a run's config (the bare default config is a template of
            # defaults, compared against): checked first, the checks below read it (a bare TypeError before)
            raise ConfigError("output_dir is required (where the GRPO checkpoints and results go)")
        if self.report_to is None:  # `report_to: null` means no integration, as in SFT
            self.report_to = "none"
        self.model_dtype = checked_dtype_name(self.model_dtype, "model_dtype")
        defaults = {f.name: f.default for f in dataclasses.fields(GRPOConfig) if f.name in IGNORED_TRL_FIELDS}
        for name, why in IGNORED_TRL_FIELDS.items():
            if name in defaults and getattr(self, name) != defaults[name]:
                raise ConfigError(f"{name}={getattr(self, name)!r} is a TRL GRPOConfig option latent GRPO does not "
                                  f"implement ({why}); remove it")
        for name, instead in NO_EFFECT_FIELDS.items():
            if getattr(self, name, None):  # TrainingArguments fields the Trainer would act on; this trainer does not
                raise ConfigError(f"{name}={getattr(self, name)!r} has no effect in latent GRPO ({instead}); remove it")
        if not _is_default_accelerator_config(self.accelerator_config):
            raise ConfigError(f"accelerator_config={self.accelerator_config!r} has no effect in latent GRPO "
                              f"({NON_DEFAULT_REFUSED_FIELDS['accelerator_config']}); remove it")
        from llmrec.training.sft import check_common_training_settings

        check_common_training_settings(self)
        if self.num_generations is None or self.num_generations < 2:
            raise ConfigError(f"num_generations (the group size G) must be >= 2, got {self.num_generations}")
        if self.per_device_train_batch_size % self.num_generations != 0:
            raise ConfigError(
                f"per_device_train_batch_size ({self.per_device_train_batch_size}) must be a multiple of "
                f"num_generations ({self.num_generations}): a micro-batch holds whole groups"
            )
        if not self.noise_scale > 0 or not math.isfinite(self.noise_scale):
            raise ConfigError(f"noise_scale must be > 0, got {self.noise_scale}")
        for name in ("history_length", "max_train_rows", "max_length"):
            if getattr(self, name) is not None and getattr(self, name) < 1:
                raise ConfigError(f"{name} must be >= 1 (or null), got {getattr(self, name)}")
        if self.eval_rows < 0:
            raise ConfigError(f"eval_rows must be >= 0 (0 = no held-out check), got {self.eval_rows}")
        if self.noise_mode not in NOISE_MODES:
            raise ConfigError(f"noise_mode must be one of {NOISE_MODES}, got {self.noise_mode!r}")
        if self.advantage_mode not in ADVANTAGE_MODES:
            raise ConfigError(f"advantage_mode must be one of {sorted(ADVANTAGE_MODES)}, got {self.advantage_mode!r}")
        if self.policy_logprob not in POLICY_LOGPROBS:
            raise ConfigError(f"policy_logprob must be one of {POLICY_LOGPROBS}, got {self.policy_logprob!r}")
        if self.rollout not in ROLLOUTS:
            raise ConfigError(f"rollout must be one of {ROLLOUTS}, got {self.rollout!r}")
        if not (math.isfinite(self.temperature) and self.temperature > 0):
            raise ConfigError(f"temperature must be > 0, got {self.temperature}")
        if self.generate_logprob not in GENERATE_LOGPROBS:
            raise ConfigError(f"generate_logprob must be one of {GENERATE_LOGPROBS}, got {self.generate_logprob!r}")
        if self.rollout == "latent" and self.generate_logprob != "constrained":
            raise ConfigError(f"generate_logprob={self.generate_logprob!r} applies to rollout: generate (the latent "
                              "rollout scores the true title); remove it")
        if self.rollout == "latent" and self.temperature != 1.0:
            raise ConfigError(f"temperature={self.temperature!r} applies to rollout: generate (the latent rollout "
                              "generates no text); remove it")
        if self.antithetic_noise and self.num_generations % 2 == 0:
            raise ConfigError(f"antithetic_noise pairs members 1..G-1, so num_generations must be odd (member 0 "
                              f"keeps the noise-free latent), got {self.num_generations}")
        if self.policy_logprob == "gaussian" and self.beta > 0:
            raise ConfigError("beta > 0 (a KL to the reference) is only implemented for policy_logprob 'target'")
        if self.loss_type not in LOSS_TYPES:
            raise ConfigError(f"loss_type must be one of {LOSS_TYPES} for latent GRPO, got {self.loss_type!r}")
        if isinstance(self.reward_funcs, str):
            self.reward_funcs = [r.strip() for r in self.reward_funcs.split(",") if r.strip()]
        unknown = [r for r in self.reward_funcs if r not in REWARD_FUNCTIONS]
        if unknown or not self.reward_funcs:
            raise ConfigError(f"unknown reward function(s) {unknown}; choose from {sorted(REWARD_FUNCTIONS)}")
        twice = sorted({r for r in self.reward_funcs if self.reward_funcs.count(r) > 1})
        if twice:  # their weights collapsed into one and their per-prompt rewards were misaligned
            raise ConfigError(f"reward function(s) {twice} named more than once; give each once (weight it instead)")
        if self.reward_weights is not None and len(self.reward_weights) != len(self.reward_funcs):
            raise ConfigError(f"reward_weights has {len(self.reward_weights)} values for {len(self.reward_funcs)} "
                              "reward functions")
        if self.reward_weights is not None and not all(math.isfinite(float(w)) for w in self.reward_weights):
            # a NaN weight made every group's reward NaN: every group skipped, nothing trained
            raise ConfigError(f"reward_weights must be finite numbers, got {self.reward_weights}")
        if not (math.isfinite(self.beta) and self.beta >= 0):  # a negative beta silently meant no KL
            raise ConfigError(f"beta (the KL weight) must be >= 0, got {self.beta}")
        if not 0 <= self.epsilon < 1:  # the ratio's lower clip bound 1 - epsilon must stay > 0
            raise ConfigError(f"epsilon must be in [0, 1), got {self.epsilon}")
        if self.epsilon_high is not None and not (math.isfinite(self.epsilon_high) and self.epsilon_high >= 0):
            raise ConfigError(f"epsilon_high must be >= 0, got {self.epsilon_high}")
        if self.rank_chunk_rows < 1:
            raise ConfigError(f"rank_chunk_rows must be >= 1, got {self.rank_chunk_rows}")
        generated = [r for r in self.reward_funcs if r in GENERATION_REWARDS]
        if self.rollout == "generate" and len(generated) < len(self.reward_funcs):
            raise ConfigError(f"rollout: generate rewards the sampled titles: reward_funcs must be among "
                              f"{sorted(GENERATION_REWARDS)}, got {self.reward_funcs}")
        if self.rollout == "latent" and generated:
            raise ConfigError(f"{generated} reward sampled titles: they need rollout: generate")
        if self.rollout == "generate" and self.policy_logprob != "target":
            raise ConfigError("rollout: generate takes the ratio over the sampled titles' tokens: "
                              "policy_logprob must be target")
        if any(r in RANK_REWARDS for r in self.reward_funcs) and self.rank_candidates < 2:
            raise ConfigError("rank_candidates must be >= 2")
        if self.rank_negatives not in RANK_NEGATIVES:
            raise ConfigError(f"rank_negatives must be one of {RANK_NEGATIVES}, got {self.rank_negatives!r}")
        if self.num_iterations < 1:
            raise ConfigError("num_iterations must be >= 1")
        if self.num_iterations > 1 and self.sft_checkpoint:
            logger.warning("num_iterations=%d: a step (max_steps, logging_steps, save_steps) is one scored batch "
                           "followed by %d optimiser updates (TRL counts updates); warmup_steps counts updates",
                           self.num_iterations, self.num_iterations)
        if self.sft_checkpoint and self.epsilon != 0.2 and self.epsilon_high == 0.28:
            logger.warning("epsilon=%s with epsilon_high left at 0.28 clips the ratio to [1 - %s, 1.28] (TRL's "
                           "epsilon_high follows epsilon); set epsilon_high too for a symmetric clip", self.epsilon,
                           self.epsilon)
        if self.sft_checkpoint and Path(self.output_dir).resolve() == Path(self.sft_checkpoint).resolve():
            raise ConfigError("output_dir must differ from sft_checkpoint (the SFT checkpoint is read, never overwritten)")
        if not has_accelerator():
            self.use_cpu = True
        super().__post_init__()
        try:  # other integrations are refused, not silently skipped
            wants_tensorboard(self.report_to, "latent GRPO")
        except ValueError as e:
            raise ConfigError(str(e)) from None
        global_rows = self.per_device_train_batch_size * self.world_size * self.gradient_accumulation_steps
        if global_rows % self.num_generations:
            raise ConfigError(f"the global batch ({global_rows} rows) must be divisible by num_generations")

    @property
    def weights(self) -> dict[str, float]:
        ws = self.reward_weights or [1.0] * len(self.reward_funcs)
        return dict(zip(self.reward_funcs, (float(w) for w in ws)))

    @property
    def prompts_per_micro_batch(self) -> int:
        return self.per_device_train_batch_size // self.num_generations


# ------------------------------------------------------------------------------------------------ noise


_ROW_SPAN, _EPOCH_SPAN = 1_000_033, 1_000_003


def _seed_for(seed: int, epoch: int, row: int, salt: int) -> int:
    # A fixed mix (not Python's hash, which is salted per process) of the identifiers of one draw.
    if not (0 <= row < _ROW_SPAN and 0 <= epoch < _EPOCH_SPAN):
        # Past its spans the linear form repeats another draw's seed (row 1_000_033 of epoch 0 = row 0 of
        # epoch 1): a hashed key there; the linear form is kept below them so earlier runs reproduce.
        from llmrec.seqrec.keyed_random import mix

        return mix(seed, epoch, row, salt, _ROW_SPAN)
    x = (seed * _EPOCH_SPAN + epoch) * _ROW_SPAN + row
    return (x * 31 + salt) % (2**63 - 1)


def member_noise(seed: int, epoch: int, row: int, group_size: int, hidden: int,
                 antithetic: bool = False) -> torch.Tensor:
    """Standard normal ``[G, H]`` for one prompt (member 0 is zeros), from the seed and the row only.

    ``antithetic``: members 1..G-1 come in mirrored pairs ``(e, -e)`` (G - 1 must be even). In a
    group's advantage-weighted sum the pair's even-order terms (the baseline, the curvature) cancel
    exactly, which lowers the variance of the score-function gradient (``policy_logprob="gaussian"``).

    >>> n = member_noise(0, 0, 3, 5, 2, antithetic=True)
    >>> bool((n[0] == 0).all() and torch.equal(n[2], -n[1]) and torch.equal(n[4], -n[3]))
    True
    """
    g = torch.Generator().manual_seed(_seed_for(seed, epoch, row, 1))
    if antithetic:
        if (group_size - 1) % 2:
            raise ValueError(f"antithetic noise needs an even number of noised members, got G - 1 = {group_size - 1}")
        half = torch.randn((group_size - 1) // 2, hidden, generator=g)
        eps = torch.stack([half, -half], dim=1).reshape(group_size - 1, hidden)
    else:
        eps = torch.randn(group_size - 1, hidden, generator=g)
    return torch.cat([torch.zeros(1, hidden), eps], dim=0)


def _prompt_digest(row: dict) -> str:
    """A short digest of a row's prompt tokens: mined negatives belong to the prompt they were mined for."""
    return hashlib.sha256(json.dumps(row["prompt_ids"]).encode()).hexdigest()[:16]


def _beam_key(split: str, row_index: int, digest: str) -> tuple[str, int, str]:
    return (split, int(row_index), digest)


def candidate_items(seed: int, epoch: int, row: int, target: int, num_items: int, k: int,
                    exclude: frozenset[int] = frozenset(), weights: torch.Tensor | None = None,
                    first: list[int] | None = None) -> list[int]:
    """``k`` item ids in 1..num_items with the target at position 0 and ``k-1`` distinct others.

    ``exclude`` (e.g. items sharing the target's title, which would tie with it) are never drawn. ``weights``
    (``[num_items]``, positive, item ``i`` at index ``i - 1``): the others are drawn without replacement with these
    probabilities (e.g. popularity) instead of uniformly. ``first`` (e.g. a beam search's items for the row): these
    others come first, in their order (the target, excluded and repeated ones left out); draws fill the rest.
    """
    if k > num_items - len(exclude - {target}):
        raise ValueError(f"rank_candidates={k} exceeds the catalogue size {num_items} (minus excluded items)")
    if first and weights is not None:
        raise ValueError("give either weights or first items, not both")
    g = torch.Generator().manual_seed(_seed_for(seed, epoch, row, 2))
    if weights is None:
        order = torch.randperm(num_items, generator=g) + 1
    else:
        if weights.shape != (num_items,) or not bool((weights > 0).all()):
            raise ValueError(f"candidate weights must be {num_items} positive values")
        w = weights.double().clone()
        w[[i - 1 for i in exclude | {target} if 1 <= i <= num_items]] = 0.0  # never drawn, so k - 1 always suffice
        order = torch.multinomial(w, k - 1, replacement=False, generator=g) + 1
    others: list[int] = []
    for i in [*(first or []), *order.tolist()]:
        if i != target and i not in exclude and i not in others:
            others.append(i)
            if len(others) == k - 1:
                break
    return [target] + others


# ------------------------------------------------------------------------------------------------ batch


@dataclass
class GRPOBatch:
    """One micro-batch of ``B`` prompts x ``G`` members (rows ``b*G + k``); filled by scoring, used by training."""

    rows: list[int]  # dataset rows of the B prompts
    positions: list[int]  # positions of the prompts in the optimiser batch (global order)
    prompt_input_ids: torch.Tensor  # [B, P] left-padded
    prompt_attention_mask: torch.Tensor
    completion_input_ids: torch.Tensor  # [B, C] right-padded
    completion_attention_mask: torch.Tensor
    noise: torch.Tensor | None = None  # [B*G, H] scaled noise added to the last latent
    old_logprobs: torch.Tensor | None = None  # [B*G, C] at scoring time
    ref_logprobs: torch.Tensor | None = None  # [B*G, C] under the frozen reference (beta > 0)
    advantages: torch.Tensor | None = None  # [B*G]
    latent: torch.Tensor | None = None  # [B, H] the noise-free latents at scoring time (detached)
    valid: torch.Tensor | None = None  # [B*G] False for members of skipped groups
    # [B*G, C] rollout: generate with generate_logprob constrained: the title-trie node each sampled token was drawn
    # at (-1 on padding); the log-probs are then the sampler's (softmax over the node's allowed tokens)
    completion_nodes: torch.Tensor | None = None
    prompt_state: Any = None  # the prompts' encoded state from scoring, reused by the loss pass when exact


def _collate(rows: list[dict], pad: int) -> dict[str, torch.Tensor]:
    b = len(rows)
    pw = max(len(r["prompt_ids"]) for r in rows)
    cw = max(len(r["completion_ids"]) for r in rows)
    out = {
        "prompt_input_ids": torch.full((b, pw), pad, dtype=torch.long),
        "prompt_attention_mask": torch.zeros((b, pw), dtype=torch.long),
        "completion_input_ids": torch.full((b, cw), pad, dtype=torch.long),
        "completion_attention_mask": torch.zeros((b, cw), dtype=torch.long),
    }
    for i, r in enumerate(rows):
        p, c = r["prompt_ids"], r["completion_ids"]
        out["prompt_input_ids"][i, pw - len(p):] = torch.tensor(p)
        out["prompt_attention_mask"][i, pw - len(p):] = 1
        out["completion_input_ids"][i, : len(c)] = torch.tensor(c)
        out["completion_attention_mask"][i, : len(c)] = 1
    return out


# ----------------------------------------------------------------------------------------------- module


def member_rows(x: torch.Tensor, group: int, prompts: int) -> torch.Tensor:
    """A completion tensor with one row per member: ``[B, C]`` (the true title, shared by a prompt's members) is
    repeated ``group`` times per prompt; ``[B * G, C]`` (each member's own sampled title) is returned as it is."""
    if x.shape[0] == prompts * group:
        return x
    if x.shape[0] != prompts:
        raise ValueError(f"completions have {x.shape[0]} rows for {prompts} prompts x {group} members")
    return x.repeat_interleave(group, dim=0)


def _token_logprobs(logits: torch.Tensor, ids: torch.Tensor, temperature: float = 1.0) -> torch.Tensor:
    """log p of ``ids`` under ``logits / temperature`` ([M, C, V] -> [M, C]), in float32."""
    logits = logits.float() if temperature == 1.0 else logits.float() / temperature
    return torch.log_softmax(logits, dim=-1).gather(-1, ids[..., None]).squeeze(-1)


@dataclass
class MemberScores:
    """Output of :class:`LatentGRPOModule`: per-member target log-probs and what produced them.

    Attributes:
        logprobs: ``[B*G, C]`` log p of each completion token (padding positions are unspecified); None when
            only the latents were asked (``latent_only``).
        latent: ``[B, H]`` the pooled, noise-free latents.
        noise: ``[B*G, H]`` the noise added to each member's last latent.
        prompt_state: the prompts' encoded state (KV cache, hidden states) when ``keep_prompt_state`` was
            asked and reuse is exact (N = 1, frozen LM); give it back as ``prompt_state`` to skip the prompt pass.
    """

    logprobs: torch.Tensor | None
    latent: torch.Tensor
    noise: torch.Tensor
    prompt_state: Any = None


class LatentGRPOModule(nn.Module):
    """The per-member log-likelihood of the true title under a (noised) latent, shared-prefix or naive.

    Called through the accelerate-prepared wrapper so that DDP sees every forward that needs gradients.
    """

    def __init__(self, latent_lm: LatentReasoningLM, group_size: int, naive: bool = False, pad_token_id: int = 0,
                 naive_rows_per_pass: int = 1, title_trie=None):
        super().__init__()
        self.latent_lm = latent_lm
        # rollout: generate, generate_logprob constrained: completions given with their trie nodes are scored under
        # the sampler's distribution (a plain attribute: not a parameter or buffer, so DDP and saves ignore it)
        self.title_trie = title_trie
        self.group_size = group_size
        self.naive = naive
        self.pad_token_id = pad_token_id
        # The naive form runs member by member (1); the reference code batches a group's G rows per pass (G).
        self.naive_rows_per_pass = naive_rows_per_pass

    def prompt_state_reusable(self) -> bool:
        """The prompt pass can be reused across calls only if it involves no trainable LM weight and no latent
        is fed back through the LM before the last one (N = 1): then only the head's pooling depends on training."""
        lm = self.latent_lm
        return (not self.naive and lm.num_latent_tokens == 1
                and not any(p.requires_grad for p in lm.model.parameters()))

    def forward(self, prompt_input_ids, prompt_attention_mask, completion_input_ids, completion_attention_mask,
                noise=None, noise_fn=None, keep_prompt_state: bool = False, prompt_state=None,
                latent_only: bool = False, temperature: float = 1.0, completion_nodes=None) -> MemberScores:
        """Score the G members of each prompt; see :class:`MemberScores`.

        ``noise`` is added to the last latent of each member; or ``noise_fn(latent)`` draws it from the
        pooled (noise-free) latents ``[B, H]`` (relative noise scales need them). ``prompt_state`` (from an
        earlier call with ``keep_prompt_state``) replaces the prompt pass; the latent is pooled again from
        its hidden states, so the head still receives gradients. ``latent_only`` stops after pooling (no
        completion pass): the Gaussian policy's log-density needs only the latents. ``completion_nodes``
        (``[B*G, C]``, sampled titles' trie nodes) scores them under the constrained sampler's distribution.
        """
        lm = self.latent_lm
        g = self.group_size
        if self.naive and latent_only:
            return MemberScores(None, lm.encode_prefix(prompt_input_ids, prompt_attention_mask).latents[:, -1],
                                noise, None)
        if self.naive:
            return self._naive(prompt_input_ids, prompt_attention_mask, completion_input_ids,
                               completion_attention_mask, noise, noise_fn, temperature, completion_nodes)
        kept = None
        if prompt_state is not None:
            if not self.prompt_state_reusable():
                raise ValueError("prompt_state reuse needs N = 1 latent token and a frozen LM")
            prefix = dataclasses.replace(prompt_state, past_key_values=copy.deepcopy(prompt_state.past_key_values))
            hidden = prefix.hidden_states
            latent = lm.latent_head(hidden, prefix.attention_mask, hidden.shape[1] - 1)
            prefix = dataclasses.replace(prefix, latents=latent[:, None])
        else:
            prefix = lm.encode_prefix(prompt_input_ids, prompt_attention_mask, use_cache=None)
            latent = prefix.latents[:, -1]
            if keep_prompt_state and self.prompt_state_reusable() and prefix.past_key_values is not None:
                # repeat_interleave below expands the cache in place: keep an untouched copy
                kept = dataclasses.replace(prefix, past_key_values=copy.deepcopy(prefix.past_key_values), latents=None)
        if noise is None:
            if noise_fn is None:
                raise ValueError("give noise or noise_fn")
            noise = noise_fn(latent.detach())
        if latent_only:
            return MemberScores(None, latent, noise, kept)
        members = prefix.repeat_interleave(g)
        last = members.latents[:, -1] + noise.to(members.latents.dtype)
        members = dataclasses.replace(members, latents=torch.cat([members.latents[:, :-1], last[:, None]], dim=1))
        c_ids = member_rows(completion_input_ids, g, latent.shape[0])
        c_mask = member_rows(completion_attention_mask, g, latent.shape[0])
        out = lm.decode_completion(members, c_ids, c_mask)
        return MemberScores(self._logprobs(out.logits, c_ids, temperature, completion_nodes), latent, noise, kept)

    def _logprobs(self, logits: torch.Tensor, ids: torch.Tensor, temperature: float,
                  nodes: torch.Tensor | None) -> torch.Tensor:
        if nodes is None:
            return _token_logprobs(logits, ids, temperature)
        if self.title_trie is None:
            raise ValueError("completion_nodes given to a module without a title trie")
        from llmrec.decoding.sampling import constrained_token_logprobs

        t = self.title_trie.tensors_on(logits.device)
        return constrained_token_logprobs(logits, ids, nodes.to(logits.device), t.child_ptr, t.child_tokens,
                                          temperature)

    def _naive(self, p_ids, p_mask, c_ids, c_mask, noise, noise_fn, temperature: float = 1.0, nodes=None):
        # The paper's form, member by member: N+1 full passes over [prompt, latents, completion] per member.
        lm = self.latent_lm
        g = self.group_size
        if noise is None:
            if noise_fn is None:
                raise ValueError("give noise or noise_fn")
            with torch.no_grad():
                noise = noise_fn(lm.encode_prefix(p_ids, p_mask).latents[:, -1])
        n = lm.num_latent_tokens
        ids = lm.config.latent_token_ids
        b = p_ids.shape[0]
        x, am, lab = build_naive_inputs(p_ids.repeat_interleave(g, 0), p_mask.repeat_interleave(g, 0),
                                        member_rows(c_ids, g, b), member_rows(c_mask, g, b), ids,
                                        self.pad_token_id, "right")
        rows, latents = [], []
        step = max(1, self.naive_rows_per_pass)
        for lo in range(0, x.shape[0], step):
            hi = min(lo + step, x.shape[0])
            full = torch.zeros(hi - lo, n, lm.lm_config.hidden_size, device=x.device)
            full[:, -1] = noise[lo:hi].to(full.dtype)
            # only the scored rows' logits (the full [rows, L-1, V] buffer was filled and read back: ~2% of a step)
            out = lm.forward_naive(x[lo:hi], am[lo:hi], lab[lo:hi], latent_noise=full, full_logits=False)
            at = 0
            for j in range(hi - lo):
                labels = out.labels[j]
                keep = labels != -100
                count = int(keep.sum())
                own = None if nodes is None else nodes[lo + j, :count][None]
                lp = self._logprobs(out.scored_logits[None, at:at + count], labels[keep][None], temperature, own)[0]
                at += count
                row = torch.zeros(c_ids.shape[1], device=lp.device, dtype=lp.dtype)
                row[: lp.shape[0]] = lp
                rows.append(row)
                if (lo + j) % g == 0:
                    latents.append(out.latents[j, -1] - noise[lo + j].to(out.latents.dtype))
        latent = torch.stack(latents)
        return MemberScores(torch.stack(rows), latent, noise)


def score_candidates(latent_lm: LatentReasoningLM, prompt_ids: torch.Tensor, prompt_mask: torch.Tensor,
                     member_latents: torch.Tensor, cand_ids: torch.Tensor, cand_mask: torch.Tensor,
                     chunk_rows: int) -> torch.Tensor:
    """Mean per-token log-likelihood of each candidate completion under each member's latent, ``[G, K]``.

    ``prompt_ids [1, P]`` one prompt; ``member_latents [G, H]`` (noise included); ``cand_ids [K, C]``.
    The rewards call it under ``torch.no_grad()``. With gradients on, it is differentiable with respect to
    ``member_latents`` only when the prompt's KV cache needs no gradient (one latent token, frozen LM): a cache
    that does is not a graph leaf, and the per-chunk copy of it raises.
    """
    g, k = member_latents.shape[0], cand_ids.shape[0]
    prefix = latent_lm.encode_prefix(prompt_ids, prompt_mask, use_cache=True)
    out = torch.empty(g * k, dtype=torch.float32, device=cand_ids.device)
    member_of = torch.arange(g, device=cand_ids.device).repeat_interleave(k)
    cand_of = torch.arange(k, device=cand_ids.device).repeat(g)
    for lo in range(0, g * k, chunk_rows):
        hi = min(lo + chunk_rows, g * k)
        part = dataclasses.replace(prefix, past_key_values=copy.deepcopy(prefix.past_key_values))
        part = part.repeat_interleave(hi - lo)
        lat = member_latents[member_of[lo:hi]].to(part.latents.dtype)
        part = dataclasses.replace(part, latents=torch.cat([part.latents[:, :-1], lat[:, None]], dim=1))
        ids, mask = cand_ids[cand_of[lo:hi]], cand_mask[cand_of[lo:hi]]
        res = latent_lm.decode_completion(part, ids, mask)
        lp = _token_logprobs(res.logits, ids)
        m = mask.to(lp.dtype)
        out[lo:hi] = (lp * m).sum(-1) / m.sum(-1)
    return out.view(g, k)


# ---------------------------------------------------------------------------------------------- trainer


def grpo_accelerator_kwargs(config: LatentGRPOConfig) -> dict[str, Any]:
    """Keyword arguments of the trainer's ``accelerate.Accelerator``: the machine's (:func:`accelerator_kwargs`), with
    ``use_cpu`` honoured. The SFT path's transformers Trainer builds its Accelerator with ``cpu=use_cpu``; this
    trainer builds its own, which looked only at the machine, so ``use_cpu: true`` trained on the GPU anyway."""
    kwargs = accelerator_kwargs()
    kwargs["cpu"] = bool(kwargs.get("cpu")) or bool(config.use_cpu)
    return kwargs


def _load_policy(config: LatentGRPOConfig):
    """The SFT checkpoint as ``(LatentReasoningLM, tokenizer, llmrec meta)`` with the trainable parts set."""
    from llmrec.training.sft import load_sft_checkpoint

    if not config.sft_checkpoint:
        raise ConfigError("sft_checkpoint is required: the output_dir of `llmrec sft` with num_latent_tokens >= 1")
    model, tok, meta = load_sft_checkpoint(config.sft_checkpoint, config.model_name_or_path, dtype=config.model_dtype,
                                           merge=not config.train_lora)
    if model.num_latent_tokens < 1:
        raise ConfigError(f"{config.sft_checkpoint} has no latent token: latent GRPO needs a latent SFT checkpoint")
    norm = model.latent_head.output_norm_weight
    if norm is not None and config.noise_mode == "absolute":
        # The paper's absolute 1.5 was sized for latents at the scale of final-layer hidden states; a normalised
        # latent is ~100x smaller, and the same noise would drown it.
        rms = float(norm.detach().float().pow(2).mean().sqrt())
        logger.warning("%s normalises its latents (head_output_norm; RMS about %.3g): absolute noise of std %g is "
                       "%.0fx that; noise_mode=relative sizes the noise to each latent", config.sft_checkpoint, rms,
                       config.noise_scale, config.noise_scale / rms)
    for p in model.parameters():
        p.requires_grad_(False)
    for p in model.latent_head.parameters():
        p.requires_grad_(True)
    if config.train_lora:
        names = [n for n, p in model.model.named_parameters() if "lora_" in n]
        if not names:
            raise ConfigError(f"train_lora: {config.sft_checkpoint} is not a LoRA checkpoint")
        for n, p in model.model.named_parameters():
            if "lora_" in n:
                p.requires_grad_(True)
    return model, tok, meta


def _save_flat(tensors: dict[str, torch.Tensor], path: Path, metadata: dict[str, str] | None = None) -> None:
    from safetensors.torch import save_file

    tmp = path.with_name(path.name + ".tmp")
    save_file({k: v.detach().contiguous().cpu() for k, v in tensors.items()}, str(tmp), metadata=metadata)
    give_saved_weights_default_permissions(tmp)
    replace_durably(tmp, path)


@contextlib.contextmanager
def _eval_mode(module: torch.nn.Module):
    """``module`` and all its submodules in eval mode inside the block; afterwards every submodule's own mode back.

    ``module.train(was_training)`` would set the outer module's flag on all of them: a wrapper in training mode
    over an eval-mode LM (``disable_dropout``) turned dropout on for every later step, and a resumed run, which
    skips the held-out check before its first step, trained without it (review).
    """
    modes = [(m, m.training) for m in module.modules()]
    module.eval()
    try:
        yield module
    finally:
        for m, training in modes:
            m.training = training


def sft_train_row_indices(sft_checkpoint: str | Path, split_name: str, n: int) -> set[int]:
    """Row indices of ``split_name`` (``n`` rows) that the SFT checkpoint trained on: its seeded ``max_train_rows``
    subset, read from its ``training_args.json`` (what ``exclude_sft_rows`` leaves out)."""
    from llmrec.training.sft import TRAINING_ARGS_JSON, _subset

    f = Path(sft_checkpoint) / TRAINING_ARGS_JSON
    if not f.exists():
        raise ConfigError(f"exclude_sft_rows: {f} is missing, so the SFT's train rows are unknown")
    args = json.loads(f.read_text(encoding="utf-8"))
    if "advantage_mode" in args:
        raise ConfigError(f"exclude_sft_rows: {sft_checkpoint} is a GRPO output; give the SFT checkpoint it "
                          "started from")
    if args.get("train_split", "train") != split_name:
        return set()
    return set(_subset(n, args.get("max_train_rows"), int(args.get("seed", 0))))


class LatentGRPOTrainer:
    """The latent GRPO loop: score the optimiser batch without gradients, gather, advantages, then train.

    Args:
        config: a :class:`LatentGRPOConfig`.
        model / tokenizer / meta: as returned by the SFT checkpoint loader (default: loaded from
            ``config.sft_checkpoint``).
        rows: encoded prompts (``prompt_ids``, ``completion_ids``, ``target_item_id``); default: the
            configured split of the checkpoint's dataset.
        num_items: catalogue size (rank rewards sample candidates from it).
        candidate_completions: ``item_id -> completion token ids`` (rank rewards).
        item_counts: ``[num_items]`` train-split target count of each item (``rank_negatives="popularity"``).
        title_trie: the catalogue's :class:`~llmrec.decoding.trie.TitleTrie` in the completion format
            (``rank_negatives="beam"`` or ``"beam_current"``); default: built from the dataset with the rows.
    """

    def __init__(self, config: LatentGRPOConfig, model=None, tokenizer=None, meta=None, rows=None,
                 num_items: int | None = None, candidate_completions: dict[int, list[int]] | None = None,
                 callbacks: list | None = None, item_counts: torch.Tensor | None = None, title_trie=None):
        from accelerate import Accelerator

        self.config = config
        torch.manual_seed(config.seed)
        if model is None:
            model, tokenizer, meta = _load_policy(config)
        # Hashed as the SFT checkpoint is loaded: what this run trains from, whatever that directory holds later.
        self._start_identity = start_identity(config.sft_checkpoint, _prompt_dataset_dir(config))
        self.tokenizer = tokenizer
        self.meta = dict(meta or {})
        self.pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
        # per split: rows drawn (before those whose answer does not fit were skipped); given rows: all of them
        self.drawn_rows: dict[str, int] = {}
        if rows is None:
            rows, num_items, candidate_completions, item_counts, title_trie = self._load_rows(model)
        self.rows = rows
        self._eval_rows: list[dict] | None = None
        self.eval_before: dict | None = None
        self.num_items = num_items
        self.candidate_completions = candidate_completions or {}
        by_text: dict[tuple, set[int]] = {}
        for item, ids in self.candidate_completions.items():
            by_text.setdefault(tuple(ids), set()).add(item)
        # Items sharing a title tie with the target in a rank reward: they are not drawn as candidates.
        self.same_title = {k: frozenset(v) for k, v in by_text.items() if len(v) > 1}
        # Rewards with weight 0 are neither computed nor logged (a rank reward would need candidate scoring).
        self.active_rewards = [r for r in config.reward_funcs if config.weights[r] != 0]
        if not self.active_rewards:
            raise ConfigError("every reward weight is 0: nothing to train on")
        self.uses_candidates = any(r in RANK_REWARDS for r in self.active_rewards)
        if self.uses_candidates and (not num_items or not self.candidate_completions):
            raise ConfigError("rank-based rewards need the catalogue (num_items, candidate_completions)")
        if self.uses_candidates:
            # Checked here, not only per prompt when drawn: a target whose title k other items share leaves
            # num_items - k candidates, and a run reaching such a target died there (and at every resume).
            largest_twins = max((len(v) - 1 for v in self.same_title.values()), default=0)
            if config.rank_candidates > num_items - largest_twins:
                raise ConfigError(
                    f"rank_candidates={config.rank_candidates} exceeds the {num_items - largest_twins} candidates some "
                    f"targets have (catalogue of {num_items} items; {largest_twins + 1} items share one title, and "
                    "the target's title twins are never drawn)")
        self.candidate_weights = None
        self.title_trie = title_trie
        # The ratio (and KL) of sampled titles is over the distribution they were sampled from: the logits at the
        # sampling temperature (as TRL's GRPO), softmaxed over the trie's allowed tokens (generate_logprob
        # constrained) or the whole vocabulary (vocab, TRL's convention). The latent mode scores the true title at
        # temperature 1 over the whole vocabulary.
        self.logit_temperature = config.temperature if config.rollout == "generate" else 1.0
        self.constrained_logprobs = config.rollout == "generate" and config.generate_logprob == "constrained"
        if config.rollout == "generate" and (title_trie is None or any("target_title" not in r for r in rows)):
            raise ConfigError("rollout: generate samples catalogue titles: it needs the title trie (title_trie) and "
                              "every row's target_title")
        # (split, row index, prompt digest) -> the starting model's beam-search items (rank_negatives=beam; with
        # beam_current only the held-out rows')
        self.beam_negatives: dict[tuple[str, int, str], list[int]] = {}
        self._current_beam_hits: list[float] = []
        self._beam_cache_read = False
        if self.uses_candidates and config.rank_negatives == "popularity":
            if item_counts is None or tuple(item_counts.shape) != (num_items,):
                raise ConfigError("rank_negatives=popularity needs item_counts, one count per catalogue item")
            self.candidate_weights = item_counts.double().cpu() + 1.0  # + 1: never-seen items can still be drawn
        elif self.uses_candidates and config.rank_negatives in BEAM_RANK_NEGATIVES:
            if title_trie is None:
                raise ConfigError(f"rank_negatives={config.rank_negatives} needs the catalogue's title trie (title_trie)")
            if config.rank_negatives == "beam" and any("row_index" not in r for r in rows):
                raise ConfigError("rank_negatives=beam keys each prompt's negatives by its row_index: every row needs one")
        elif config.rank_negatives != "uniform":
            logger.warning("rank_negatives=%s has no effect: no active reward scores candidates", config.rank_negatives)
        self.accelerator = Accelerator(gradient_accumulation_steps=1, **grpo_accelerator_kwargs(config))
        from accelerate.utils import DistributedType

        if self.accelerator.distributed_type in (DistributedType.FSDP, DistributedType.DEEPSPEED):
            # Saving, clipping and candidate scoring here read whole (unsharded) parameters.
            raise ConfigError(f"latent GRPO runs on one device or with DDP (multi-GPU/CPU), not with "
                              f"{self.accelerator.distributed_type.value}: the trained head is small, shard nothing")
        self.world = self.accelerator.num_processes
        self.rank = self.accelerator.process_index
        if config.per_device_train_batch_size * self.world * config.gradient_accumulation_steps % config.num_generations:
            raise ConfigError("the global batch must be divisible by num_generations")
        self.prompts_per_step = (config.per_device_train_batch_size * self.world * config.gradient_accumulation_steps
                                 // config.num_generations)
        if self.prompts_per_step > len(rows):
            raise ConfigError(f"an optimiser step needs {self.prompts_per_step} prompts, the split has {len(rows)}")
        self.steps_per_epoch = len(rows) // self.prompts_per_step  # the last incomplete batch of an epoch is dropped
        left_out = len(rows) - self.steps_per_epoch * self.prompts_per_step
        if left_out and self.accelerator.is_main_process:
            # Said, as dataloader_drop_last (which this trainer does not read) would suggest otherwise.
            logger.info("%d prompts, %d per optimiser step: %d steps per epoch; the last %d prompts of each epoch's "
                        "shuffled order are left out", len(rows), self.prompts_per_step, self.steps_per_epoch, left_out)
        self.max_steps = config.max_steps if config.max_steps > 0 else max(
            1, int(self.steps_per_epoch * config.num_train_epochs))
        if config.disable_dropout:
            model.eval()
        else:
            model.train()
        self.latent_lm = model
        trie_for_logprobs = title_trie if self.constrained_logprobs else None
        module = LatentGRPOModule(model, config.num_generations, config.naive_forward, self.pad,
                                  title_trie=trie_for_logprobs)
        # A new nn.Module starts in training mode: give the wrapper the model's mode, so that code saving and
        # restoring ``module.training`` (the held-out check) puts the model back in the mode asked for.
        module.train(not config.disable_dropout)
        params = [p for p in module.parameters() if p.requires_grad]
        self.optimizer = torch.optim.AdamW(params, lr=config.learning_rate, betas=(config.adam_beta1, config.adam_beta2),
                                           eps=config.adam_epsilon, weight_decay=config.weight_decay)
        from transformers import get_scheduler

        self.scheduler = get_scheduler(config.lr_scheduler_type, self.optimizer,
                                       num_warmup_steps=config.get_warmup_steps(self.max_steps * config.num_iterations),
                                       num_training_steps=self.max_steps * config.num_iterations,
                                       scheduler_specific_kwargs=config.lr_scheduler_kwargs or {})
        self.module, self.optimizer = self.accelerator.prepare(module, self.optimizer)
        self.ref_module = None
        if config.beta > 0:
            # The frozen reference is the starting policy. Head-only training shares the (frozen) LM and copies
            # the head; with LoRA trained, the whole wrapper is copied.
            if config.train_lora:
                ref = copy.deepcopy(model)
            else:
                ref = LatentReasoningLM(model.model, model.config, head=copy.deepcopy(model.latent_head))
            for p in ref.latent_head.parameters():
                p.requires_grad_(False)
            if config.train_lora:
                for p in ref.parameters():
                    p.requires_grad_(False)
            ref.to(self.accelerator.device)
            (ref if config.train_lora else ref.latent_head).eval()  # the shared LM keeps the policy's mode
            self.ref_module = LatentGRPOModule(ref, config.num_generations, config.naive_forward, self.pad,
                                               title_trie=trie_for_logprobs)
        self.callbacks = list(callbacks or [])
        self.global_step = 0
        self.log_history: list[dict] = []
        self.skipped_groups = 0
        self._finite_row: int | None = None  # set by score(): see _zero_weight_pass
        self.nonfinite_steps = 0
        self.scalars = ScalarLog(None)

    # -- data

    def prompt_settings(self) -> dict[str, Any]:
        """The dataset, history length and token budget this run's prompts are built with (the config's, else the
        SFT checkpoint's); the saved checkpoint records them, so evaluation and `Recommender` read the same."""
        c, meta = self.config, self.meta
        dataset = c.dataset or meta.get("dataset")
        if not dataset:
            raise ConfigError("no dataset given and the SFT checkpoint records none")
        return {"dataset": dataset, "history_length": c.history_length or meta.get("history_length", 10),
                "max_length": c.max_length or meta.get("max_length", 512)}

    def _encode_split(self, model, split_name: str, max_rows: int | None) -> tuple[list[dict], Any, Any]:
        """Prompt/completion ids of a seeded subset of ``split_name`` (rows whose answer cannot fit are skipped)."""
        from llmrec.data.canonical import load_prepared
        from llmrec.prompts import PromptError, PromptTemplate, check_titles_are_plain_text
        from llmrec.training.sft import _subset, encode_example

        c = self.config
        meta = self.meta
        settings = self.prompt_settings()
        dataset, history, max_length = settings["dataset"], settings["history_length"], settings["max_length"]
        template = PromptTemplate.load(meta.get("prompt", "d3"))
        noun = meta.get("noun", "items")
        data = load_prepared(dataset, splits=[split_name], max_history=history)
        check_titles_are_plain_text(self.tokenizer, data.catalog.titles, data.catalog.item_ids,
                                    str(data.catalog.path))
        split = data.splits[split_name]
        rows, skipped = [], 0
        candidates = list(range(len(split)))
        if c.exclude_sft_rows and split_name == c.train_split:
            seen = sft_train_row_indices(c.sft_checkpoint, split_name, len(split))
            candidates = [i for i in candidates if i not in seen]
            logger.info("exclude_sft_rows: %d of %d %s rows were the SFT's; drawing from the other %d",
                        len(seen), len(split), split_name, len(candidates))
            if not candidates:
                raise ConfigError(f"exclude_sft_rows: the SFT checkpoint trained on every {split_name} row")
        drawn = _subset(len(candidates), max_rows, c.seed)
        self.drawn_rows[split_name] = len(drawn)
        for i in (candidates[j] for j in drawn):
            ex = split[i]
            if not ex["history_item_ids"]:
                raise data.row_error(split_name, i, "history_item_ids", "empty history")
            try:
                p, comp, _ = encode_example(template, self.tokenizer, ex["history_titles"], ex["target_title"],
                                            max_length, noun, model.num_latent_tokens)
            except PromptError:
                skipped += 1
                continue
            rows.append({"prompt_ids": p, "completion_ids": comp, "target_item_id": int(ex["target_item_id"]),
                         "target_title": ex["target_title"], "row_index": i})
        if skipped:
            logger.warning("%s: skipped %d rows whose answer does not fit max_length=%d", split_name, skipped,
                           max_length)
        if not rows:
            raise ValueError(f"split '{split_name}' of {dataset} has no usable rows")
        return rows, data, template

    def _load_rows(self, model):
        c = self.config
        rows, data, template = self._encode_split(model, c.train_split, c.max_train_rows)
        cands, counts, trie = None, None, None
        if any(r in RANK_REWARDS for r in c.reward_funcs):
            eos = self.tokenizer.eos_token_id
            cands = {}
            for item in data.catalog.item_ids:
                text = template.render_completion(data.catalog.title(item))
                cands[item] = list(self.tokenizer(text, add_special_tokens=False)["input_ids"]) + [eos]
            if c.rank_negatives == "popularity":
                # The whole train split (not only the prompts' subset): every item's count as a next item.
                targets = torch.tensor(list(data.splits[c.train_split]["target_item_id"]), dtype=torch.long)
                counts = torch.bincount(targets - 1, minlength=len(data.catalog))[: len(data.catalog)]
        if c.rollout == "generate" or (cands is not None and c.rank_negatives in BEAM_RANK_NEGATIVES):
            from llmrec.decoding.search import build_catalog_trie

            trie = build_catalog_trie(data.catalog, self.tokenizer, template)
        return rows, len(data.catalog), cands, counts, trie

    def epoch_order(self, epoch: int) -> list[int]:
        """Row order of an epoch (seeded; identical on every process)."""
        g = torch.Generator().manual_seed(_seed_for(self.config.seed, epoch, 0, 3))
        return torch.randperm(len(self.rows), generator=g).tolist()

    def step_rows(self, step: int) -> list[int]:
        """The dataset rows of optimiser step ``step``, in their global order (identical on every process)."""
        epoch, within = divmod(step, self.steps_per_epoch)
        start = within * self.prompts_per_step
        return self.epoch_order(epoch)[start : start + self.prompts_per_step]

    def local_micro_batches(self, step: int) -> list[GRPOBatch]:
        """This process's micro-batches of optimiser step ``step`` (prompt j of the step goes to process j % world)."""
        picked = self.step_rows(step)
        mine = [(j, picked[j]) for j in range(self.rank, len(picked), self.world)]
        per = self.config.prompts_per_micro_batch
        out = []
        for lo in range(0, len(mine), per):
            chunk = mine[lo : lo + per]
            tensors = _collate([self.rows[r] for _, r in chunk], self.pad)
            out.append(GRPOBatch(rows=[r for _, r in chunk], positions=[j for j, _ in chunk], **tensors))
        return out

    # -- scoring

    def _scaled_noise(self, epoch: int, rows: list[int], latent: torch.Tensor) -> torch.Tensor:
        c = self.config
        g, h = c.num_generations, latent.shape[-1]
        eps = torch.cat([member_noise(c.seed, epoch, r, g, h, c.antithetic_noise)
                         for r in rows]).to(latent.device, torch.float32)
        return eps * self._noise_std(latent).repeat_interleave(g)[:, None]

    def _noise_std(self, latent: torch.Tensor) -> torch.Tensor:
        """``[B]`` per-prompt std of the member noise (what :meth:`_scaled_noise` multiplies N(0, I) by)."""
        c = self.config
        if c.noise_mode == "absolute":
            return torch.full((latent.shape[0],), c.noise_scale, device=latent.device)
        return c.noise_scale * latent.float().norm(dim=-1) / math.sqrt(latent.shape[-1])

    @torch.no_grad()
    def score(self, step: int, batches: list[GRPOBatch]) -> dict[str, float]:
        """Rewards of every member (no gradients), gathered; fills noise, old/ref log-probs and advantages."""
        c = self.config
        g = c.num_generations
        epoch = step // self.steps_per_epoch
        dev = self.accelerator.device
        per_fn: dict[str, list[torch.Tensor]] = {name: [] for name in self.active_rewards}
        positions, latent_norms, noise_norms = [], [], []
        self._current_beam_hits = []  # filled by _candidate_scores under rank_negatives=beam_current
        sampled_titles = None
        for b in batches:
            t = {k: getattr(b, k).to(dev) for k in ("prompt_input_ids", "prompt_attention_mask",
                                                      "completion_input_ids", "completion_attention_mask")}
            noise_fn = (lambda r, rows=b.rows: self._scaled_noise(epoch, rows, r))  # noqa: E731
            if c.rollout == "generate":
                # Each member samples a title under its noised latent; the completions become the samples.
                lat = self.module(**t, noise_fn=noise_fn, latent_only=True)
                b.noise = lat.noise if lat.noise is not None else noise_fn(lat.latent.detach())
                sampled_titles = self.sample_titles(epoch, b, t)
                t["completion_input_ids"] = b.completion_input_ids.to(dev)
                t["completion_attention_mask"] = b.completion_attention_mask.to(dev)
                if b.completion_nodes is not None:
                    t["completion_nodes"] = b.completion_nodes.to(dev)
                noise_fn = None
            res = self.module(**t, noise=b.noise if noise_fn is None else None, noise_fn=noise_fn,
                              keep_prompt_state=True, temperature=self.logit_temperature)
            lp, latent, b.noise, b.prompt_state = res.logprobs, res.latent, res.noise, res.prompt_state
            b.old_logprobs = lp
            b.latent = latent.detach().float()
            if self.ref_module is not None:
                reuse = b.prompt_state if self.ref_module.prompt_state_reusable() else None
                # Under the policy's mixed precision: accelerate autocasts only the prepared module's forward, and
                # a reference scored in another precision makes the KL non-zero where policy == reference.
                with self.accelerator.autocast():
                    b.ref_logprobs = self.ref_module(**t, noise=b.noise, prompt_state=reuse,
                                                     temperature=self.logit_temperature).logprobs
            mask = member_rows(t["completion_attention_mask"], g, len(b.rows))
            inputs = RewardInputs(lp, mask)
            if sampled_titles is not None:
                inputs.sampled_titles = sampled_titles
                inputs.target_titles = [self.rows[r]["target_title"] for r in b.rows for _ in range(g)]
            if self.uses_candidates:
                members = latent.float().repeat_interleave(g, 0) + b.noise
                inputs.candidate_scores, inputs.target_index = self._candidate_scores(
                    epoch, [self.rows[r] for r in b.rows], b.rows, t, members, g, self.config.train_split)
            # A reward may be finite where the member's log-probs are not (a title's reward in the generation mode,
            # drawn from NaN logits; a reward that does not read them, such as a user's own): the member's own
            # log-probs tell, and its group is then skipped (not the whole step, whose loss they would make NaN).
            finite = torch.isfinite(torch.where(mask > 0, lp, torch.zeros_like(lp))).all(-1)
            for name in self.active_rewards:
                # on this process's device whatever a reward returns (a user's may build a CPU tensor): the rewards
                # are combined and gathered with device tensors (NCCL gathers device tensors only)
                values = REWARD_FUNCTIONS[name](inputs).double().to(dev)
                values = torch.where(finite.to(dev), values, torch.full_like(values, float("nan")))
                per_fn[name].append(values)
            positions.append(torch.tensor(b.positions, device=dev))
            latent_norms.append(latent.float().norm(dim=-1))
            noise_norms.append(b.noise.view(len(b.rows), g, -1)[:, 1:].norm(dim=-1).mean(-1))
        local = {name: torch.cat(v).view(-1, g) for name, v in per_fn.items()}
        # Gather in the global order of the step's prompts (positions 0..prompts_per_step-1, each once), so every
        # process computes the same advantages whatever the layout.
        pos = self.accelerator.gather(torch.cat(positions))
        order = torch.argsort(pos)
        if not torch.equal(pos[order], torch.arange(len(pos), device=pos.device)):
            raise RuntimeError("the processes' prompt positions do not cover the optimiser batch exactly once")
        gathered = {name: self.accelerator.gather(v)[order] for name, v in local.items()}
        total = combine_rewards(gathered, c.weights)
        adv, valid = compute_advantages(total, c.advantage_mode)
        # A prompt scored finite on some process: the input of the zero-weight pass of a micro-batch whose groups
        # were all skipped (see _loss); every process knows the step's prompts, so any of them can run it.
        first_ok = valid.nonzero().flatten()
        self._finite_row = None if first_ok.numel() == 0 else self.step_rows(step)[int(first_ok[0])]
        for b in batches:  # back to this process's groups (row j of the gathered arrays is position j)
            idx = torch.tensor(b.positions, device=dev)
            b.advantages = adv[idx].reshape(-1).float()
            b.valid = valid[idx].repeat_interleave(g)
        n_bad = int((~valid).sum())
        self.skipped_groups += n_bad
        # Over the valid groups, as every statistic here: a skipped group's latent may be NaN.
        lat, noi = (self.accelerator.gather(torch.cat(v))[order][valid] for v in (latent_norms, noise_norms))
        stats: dict[str, float] = {}
        for name, v in gathered.items():
            ok = v[valid]
            stats[f"rewards/{name}/mean"] = float(ok.mean()) if ok.numel() else float("nan")
            stats[f"rewards/{name}/std"] = float(ok.std()) if ok.numel() > 1 else 0.0
        ok = total[valid]
        stats.update({
            "reward": float(ok.mean()) if ok.numel() else float("nan"),
            "reward_std": float(ok.std()) if ok.numel() > 1 else 0.0,
            "advantage/abs_mean": float(adv[valid].abs().mean()) if bool(valid.any()) else 0.0,
            "advantage/std": float(adv[valid].std()) if bool(valid.any()) else 0.0,
            "latent_norm": float(lat.mean()) if lat.numel() else float("nan"),
            "noise_norm": float(noi.mean()) if noi.numel() else float("nan"),
            "skipped_groups": n_bad,
            "skipped_groups_total": self.skipped_groups,
        })
        if self._current_beam_hits:
            # How often the target's title is among the current policy's rank_candidates beams (train prompts).
            hits = self.accelerator.gather(torch.tensor(self._current_beam_hits, device=dev))
            stats["beam_current/target_in_beam"] = float(hits.mean())
        # Normalisers of the loss over the whole optimiser batch (all processes, all micro-steps).
        tokens = sum(float((member_rows(b.completion_attention_mask, g, len(b.rows)).sum(-1).to(dev) * b.valid).sum())
                     for b in batches)
        members = sum(float(b.valid.sum()) for b in batches)
        totals = self.accelerator.reduce(torch.tensor([tokens, members], device=dev, dtype=torch.float64), "sum")
        self._norm_tokens, self._norm_members = float(totals[0]), float(totals[1])
        return stats

    @torch.no_grad()
    def sample_titles(self, epoch: int, b: GRPOBatch, t: dict[str, torch.Tensor]) -> list[str]:
        """rollout: generate. One catalogue title per member of ``b``, sampled under the member's noised latent
        (``b.noise``) by constrained sampling at ``temperature``; the draws are keyed by the seed, the epoch, the
        row and the member, so the process layout cannot change them. Sets ``b.completion_input_ids`` /
        ``b.completion_attention_mask`` (and ``b.completion_nodes`` under generate_logprob constrained) to the
        sampled completions (``[B * G, C]``) and returns their titles."""
        from llmrec.decoding.sampling import trie_nodes

        g, trie = self.config.num_generations, self.title_trie
        lm = self.accelerator.unwrap_model(self.module).latent_lm
        with self.accelerator.autocast():  # the policy's precision: the titles are drawn from the trained policy
            samples = self._draw_titles(lm, t, b.noise, [(epoch, r, k) for r in b.rows for k in range(g)])
        width = max(len(x.token_ids) for x in samples)
        ids = torch.full((len(samples), width), self.pad, dtype=torch.long)
        att = torch.zeros((len(samples), width), dtype=torch.long)
        nodes = torch.full((len(samples), width), -1, dtype=torch.long)
        for i, x in enumerate(samples):
            ids[i, : len(x.token_ids)] = torch.tensor(x.token_ids)
            att[i, : len(x.token_ids)] = 1
            if self.constrained_logprobs:
                nodes[i, : len(x.token_ids)] = torch.tensor(trie_nodes(trie, x.token_ids))
        b.completion_input_ids, b.completion_attention_mask = ids, att
        b.completion_nodes = nodes if self.constrained_logprobs else None
        return [trie.titles[x.title_index] for x in samples]

    def _draw_titles(self, lm: LatentReasoningLM, t: dict[str, torch.Tensor], noise: torch.Tensor,
                     keys: list[tuple[int, int, int]]) -> list:
        """G constrained samples per prompt of ``t`` (``noise`` ``[B * G, H]`` on the last latent), member ``i``'s
        uniforms keyed by the seed and ``keys[i]`` = (epoch, row, member); the held-out check uses epoch -1."""
        from llmrec.decoding.beam_search import PromptState
        from llmrec.decoding.sampling import constrained_sample_from_state
        from llmrec.seqrec.keyed_random import mix

        c, g, trie = self.config, self.config.num_generations, self.title_trie
        cache, logits, mask, pos = lm.prefill_with_latents(t["prompt_input_ids"], t["prompt_attention_mask"],
                                                           latent_noise=noise, repeats=g)
        depth = int(trie.depth.max())
        uniforms = torch.stack([
            torch.rand(depth, generator=torch.Generator().manual_seed(mix(c.seed, SAMPLE_STREAM, *key)),
                       dtype=torch.float64)
            for key in keys])
        # a NaN forward still draws a placeholder title: scored under the same NaN logits, its group is skipped
        # (counted) while the batch's other prompts train
        return constrained_sample_from_state(lm.causal_lm, trie, PromptState(logits, cache, mask, pos), uniforms,
                                             c.temperature, allow_non_finite=True)

    def _candidate_scores(self, epoch: int, rows: list[dict], row_ids: list[int], t: dict[str, torch.Tensor],
                          members: torch.Tensor, group: int, split: str,
                          held_out: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
        """Scores ``[len(rows) * group, K]`` of each prompt's sampled candidates (target first) under its
        ``group`` member latents (``members``, noise included), and the target's column (0). ``split``: the rows'
        split (beam negatives are looked up by split and row index); ``held_out``: rows of the held-out check, which
        take the starting model's beam items under ``rank_negatives=beam_current`` too."""
        c = self.config
        scores = []
        for i, (row, row_id) in enumerate(zip(rows, row_ids)):
            target = row["target_item_id"]
            same_title = self.same_title.get(tuple(self.candidate_completions[target]), frozenset())
            first = None
            if c.rank_negatives == "beam_current" and not held_out:
                first = self.beam_search_items(row)
                self._current_beam_hits.append(float(target in first))
            elif c.rank_negatives in BEAM_RANK_NEGATIVES:
                first = self.beam_negatives_for(split, row)
            items = candidate_items(c.seed, epoch, row_id, target, self.num_items, c.rank_candidates, same_title,
                                    self.candidate_weights, first)
            cand = _collate([{"prompt_ids": [0], "completion_ids": self.candidate_completions[it]} for it in items],
                            self.pad)
            p_ids = t["prompt_input_ids"][i : i + 1]
            p_mask = t["prompt_attention_mask"][i : i + 1]
            keep = int(p_mask.sum())
            scores.append(score_candidates(
                self.latent_lm, p_ids[:, -keep:], p_mask[:, -keep:], members[i * group : (i + 1) * group],
                cand["completion_input_ids"].to(p_ids.device), cand["completion_attention_mask"].to(p_ids.device),
                c.rank_chunk_rows,
            ))
        s = torch.cat(scores)
        return s, torch.zeros(s.shape[0], dtype=torch.long, device=s.device)

    def mine_beam_negatives(self, split: str, rows: list[dict]) -> None:
        """Fill ``self.beam_negatives`` for ``rows`` of ``split`` (``rank_negatives=beam``, and the held-out rows
        under ``beam_current``): each row's items as the current model ranks them by constrained beam search
        (:meth:`beam_search_items`), shared by every process.

        Call it on every process with the same rows, before training changes the model (it refuses once a step has
        been taken). Rows already mined, or found in ``output_dir/beam_negatives.json`` from an earlier start of this
        run (same SFT weights, dtype and beams; each row's entry also carries a digest of its prompt tokens), are not
        searched again. Each prompt is searched alone (no padding), so the items do not depend on the batch layout.
        """
        from accelerate.utils import gather_object
        from tqdm.auto import tqdm

        from llmrec.data.canonical import atomic_write_json

        c = self.config
        path = Path(c.output_dir) / BEAM_NEGATIVES_NAME
        if not self._beam_cache_read:
            self._beam_cache_read = True
            if path.exists() and not c.retrain:
                saved = json.loads(path.read_text(encoding="utf-8"))
                if saved.get("fingerprint") == self._beam_fingerprint():
                    for sp, by_row in saved["rows"].items():
                        for r, entry in by_row.items():
                            self.beam_negatives.setdefault(_beam_key(sp, int(r), entry["prompt"]), entry["items"])
                else:
                    logger.warning("%s was mined by other weights or settings; mining again", path)
        todo = [row for row in rows if _beam_key(split, row["row_index"], _prompt_digest(row)) not in self.beam_negatives]
        if not todo:
            return
        if self.global_step > 0:
            raise RuntimeError(f"{len(todo)} {split} rows have no beam negatives, and the model has trained "
                               f"{self.global_step} steps: negatives are mined by the starting model only")
        mine = todo[self.rank :: self.world]
        found: list[tuple[str, int, str, list[int]]] = []
        for row in tqdm(mine, desc=f"beam negatives ({split}, this process's rows)",
                        disable=not self.accelerator.is_main_process or bool(self.config.disable_tqdm)):
            found.append((split, row["row_index"], _prompt_digest(row), self.beam_search_items(row)))
        for sp, row_index, digest, items in gather_object(found) if self.world > 1 else found:
            self.beam_negatives[_beam_key(sp, int(row_index), digest)] = items
        if self.accelerator.is_main_process:
            by_split: dict[str, dict[str, dict]] = {}
            for (sp, r, digest), items in sorted(self.beam_negatives.items()):
                by_split.setdefault(sp, {})[str(r)] = {"prompt": digest, "items": items}
            atomic_write_json(path, {"fingerprint": self._beam_fingerprint(), "rows": by_split})
        self.accelerator.wait_for_everyone()

    @torch.no_grad()
    def beam_search_items(self, row: dict) -> list[int]:
        """The items of the current model's constrained beam search for ``row``'s prompt, best first (noise-free
        latent, ``rank_candidates`` beams, length penalty 1, dropout off: the evaluation's ranking). The prompt is
        searched alone (no padding), so the items do not depend on how rows are batched or spread over processes."""
        from llmrec.decoding.beam_search import PromptState, constrained_beam_search_from_state

        lm = self.accelerator.unwrap_model(self.module).latent_lm
        with _eval_mode(lm):
            ids = torch.tensor([row["prompt_ids"]], device=self.accelerator.device)
            cache, logits, mask, next_pos = lm.prefill_with_latents(ids, torch.ones_like(ids))
            out = constrained_beam_search_from_state(
                lm.causal_lm, self.title_trie,
                PromptState(next_token_logits=logits.float(), past_key_values=cache, attention_mask=mask,
                            next_position_ids=next_pos),
                num_beams=self.config.rank_candidates, length_penalty=1.0)[0]
        return [int(i) for i in out.item_ranking]

    def beam_negatives_for(self, split: str, row: dict) -> list[int]:
        """The mined beam-search items of ``row`` (of ``split``), best first."""
        items = self.beam_negatives.get(_beam_key(split, row["row_index"], _prompt_digest(row)))
        if items is None:
            raise RuntimeError(f"no beam negatives were mined for {split} row {row['row_index']} (this prompt)")
        return items

    def _beam_fingerprint(self) -> dict:
        """What the mined items depend on besides each row's prompt: the starting weights, dtype and beams."""
        from llmrec.evaluation.evaluator import weights_sha256

        c = self.config
        return {"sft_checkpoint": str(c.sft_checkpoint),
                "sft_weights": weights_sha256(c.sft_checkpoint) if c.sft_checkpoint else None,
                "model_name_or_path": c.model_name_or_path, "model_dtype": c.model_dtype,
                "num_beams": c.rank_candidates, "length_penalty": 1.0}

    def _mine_held_out_negatives(self) -> None:
        """Encode the held-out ``eval_rows`` once and, under a beam ``rank_negatives``, mine their starting items."""
        c = self.config
        if self._eval_rows is None:
            self._eval_rows = self._encode_split(self.latent_lm, c.eval_split, c.eval_rows)[0]
        if self.uses_candidates and c.rank_negatives in BEAM_RANK_NEGATIVES:
            self.mine_beam_negatives(c.eval_split, self._eval_rows)

    @torch.no_grad()
    def evaluate_rewards(self, per_row: bool = False) -> dict[str, Any]:
        """Mean noise-free ``neg_ppl`` and ``log_likelihood`` over the held-out ``eval_rows`` (all processes).

        When a candidate reward is active, also ``reciprocal_rank`` and ``candidate_log_softmax`` of the target
        among ``rank_candidates`` items drawn per held-out row. The draw is keyed by the seed and the row's index in
        ``eval_split``, and follows ``rank_candidates`` and ``rank_negatives``: checkpoints compare on the same
        candidates only when those three settings agree. With ``per_row``, also the per-row values in row order
        (for paired comparisons of checkpoints), with each row's index in ``eval_split`` and its target title.
        """
        self._mine_held_out_negatives()
        rows = self._eval_rows
        # The unwrapped module: a DDP forward may run collectives, and processes can hold different row counts.
        module = self.accelerator.unwrap_model(self.module)
        with _eval_mode(module):  # noise-free and dropout-free: the same value on every call, comparable
            return self._held_out_rewards(module, rows, per_row)

    def _held_out_rewards(self, module, rows: list[dict], per_row: bool) -> dict[str, Any]:
        c = self.config
        g, dev = c.num_generations, self.accelerator.device
        mine = list(range(self.rank, len(rows), self.world))
        per = c.prompts_per_micro_batch
        names = ["neg_ppl", "log_likelihood"]
        if self.uses_candidates:
            names += ["reciprocal_rank", "candidate_log_softmax"]
        generating = c.rollout == "generate"
        if generating:
            names += sorted(GENERATION_REWARDS)
        # [row index, *names]; padded with index -1 to the same length on every process.
        local = torch.full((-(-len(rows) // self.world), 1 + len(names)), -1.0, dtype=torch.float64, device=dev)
        for lo in range(0, len(mine), per):
            chunk = mine[lo:lo + per]
            t = {k: v.to(dev) for k, v in _collate([rows[r] for r in chunk], self.pad).items()}
            res = module(**t, noise_fn=lambda r: torch.zeros(r.shape[0] * g, r.shape[-1], device=r.device))
            lp = res.logprobs.view(-1, g, res.logprobs.shape[-1])[:, 0]  # member 0: the pooled latent itself
            inputs = RewardInputs(lp, t["completion_attention_mask"])
            if self.uses_candidates:
                # Keyed by "epoch" -1 and the row's index in its split, so that the draw of a row does not depend
                # on eval_rows (the size of the subset it came from).
                held = [rows[r] for r in chunk]
                inputs.candidate_scores, inputs.target_index = self._candidate_scores(
                    -1, held, [row["row_index"] for row in held], t, res.latent.float(), 1, c.eval_split,
                    held_out=True)
            sampled = None
            if generating:
                # The noise-free policy's expected reward on the row, estimated from G titles it samples (keyed by
                # "epoch" -1, the row's index in its split and the member, as the candidates above).
                held = [rows[r] for r in chunk]
                zeros = torch.zeros(len(chunk) * g, res.latent.shape[-1], device=dev)
                draws = self._draw_titles(module.latent_lm, t, zeros,
                                          [(-1, row["row_index"], k) for row in held for k in range(g)])
                sampled = RewardInputs(lp, t["completion_attention_mask"],
                                       sampled_titles=[self.title_trie.titles[x.title_index] for x in draws],
                                       target_titles=[row["target_title"] for row in held for _ in range(g)])
            local[lo:lo + len(chunk), 0] = torch.tensor(chunk, dtype=torch.float64, device=dev)
            for j, name in enumerate(names, start=1):
                if name in GENERATION_REWARDS:
                    local[lo:lo + len(chunk), j] = REWARD_FUNCTIONS[name](sampled).view(-1, g).mean(1).to(dev)
                else:
                    local[lo:lo + len(chunk), j] = REWARD_FUNCTIONS[name](inputs)
        allv = self.accelerator.gather(local)
        allv = allv[allv[:, 0] >= 0]
        allv = allv[torch.argsort(allv[:, 0])]
        out: dict[str, Any] = {"rows": int(allv.shape[0]), "split": c.eval_split}
        out.update({name: float(allv[:, j].mean()) for j, name in enumerate(names, start=1)})
        if per_row:
            out["per_row"] = {name: allv[:, j].tolist() for j, name in enumerate(names, start=1)}
            # which rows, so a paired comparison can check it pairs the same rows (a review)
            out["per_row"]["row_index"] = [rows[int(i)]["row_index"] for i in allv[:, 0].tolist()]
            out["per_row"]["target_title"] = [rows[int(i)]["target_title"] for i in allv[:, 0].tolist()]
        return out

    # -- training

    def _loss(self, b: GRPOBatch) -> tuple[torch.Tensor, dict[str, float]]:
        c = self.config
        g = c.num_generations
        dev = self.accelerator.device
        t = {k: getattr(b, k).to(dev) for k in ("prompt_input_ids", "prompt_attention_mask",
                                                  "completion_input_ids", "completion_attention_mask")}
        if b.completion_nodes is not None:
            t["completion_nodes"] = b.completion_nodes.to(dev)
        noise, old, ref, adv = b.noise, b.old_logprobs, b.ref_logprobs, b.advantages
        state = b.prompt_state
        scale = 1.0
        keep = b.valid.view(-1, g)[:, 0].nonzero().flatten()
        if keep.numel() == 0 and self._finite_row is not None:
            return self._zero_weight_pass(b), {}
        if keep.numel() < len(b.rows):
            # Skipped groups never enter the model: a NaN inside their forward would reach every gradient
            # (NaN x 0 is NaN). (No group of the whole step is valid: the step is dropped anyway.)
            if keep.numel() == 0:
                keep, scale = keep.new_zeros(1), 0.0
            members = (keep[:, None] * g + torch.arange(g, device=keep.device)).flatten()
            t = {k: v[members] if v.shape[0] == len(b.rows) * g else v[keep] for k, v in t.items()}
            noise, old, adv = noise[members], old[members], adv[members]
            ref = ref[members] if ref is not None else None
            state = None  # recompute the prompt pass for the kept prompts
        # The prompt pass of the scoring step is reused when exact (frozen LM, N = 1): the head is re-applied.
        gaussian = c.policy_logprob == "gaussian"
        res = self.module(**t, noise=noise, prompt_state=state, latent_only=gaussian, temperature=self.logit_temperature)
        if gaussian:
            # Each member's latent z_k = r_old + eps_k as a sample of N(r_theta, std_k^2 I): one "token" per member.
            r_old = b.latent if keep.numel() == len(b.rows) else b.latent[keep]
            std = self._noise_std(r_old).repeat_interleave(g)[:, None]  # [P*G, 1]
            z = r_old.repeat_interleave(g, 0) + noise.float()
            r = res.latent.float().repeat_interleave(g, 0)
            lp = -((z - r) ** 2).sum(-1, keepdim=True) / (2 * std**2)
            old = -(noise.float() ** 2).sum(-1, keepdim=True) / (2 * std**2)  # the same density under r_old
            mask = torch.ones_like(lp)
        else:
            lp = res.logprobs
            mask = member_rows(t["completion_attention_mask"], g, t["prompt_input_ids"].shape[0]).float()
        if c.num_iterations == 1:
            old = lp.detach()  # the ratio is exactly 1 (as TRL); only the advantage-weighted gradient acts
        ratio = torch.exp(torch.where(mask > 0, lp - old, torch.zeros_like(lp)))
        adv = adv[:, None]
        hi = 1.0 + (c.epsilon_high if c.epsilon_high is not None else c.epsilon)
        clipped = torch.clamp(ratio, 1.0 - c.epsilon, hi)
        per_token = -torch.min(ratio * adv, clipped * adv)
        kl = None
        if c.beta > 0:
            d = torch.where(mask > 0, ref - lp, torch.zeros_like(lp))
            kl = torch.exp(d) - d - 1.0
            if c.use_bias_correction_kl:  # TRL's correction: the ratio's gradient acts even where it equals 1
                kl = kl * ratio
            per_token = per_token + c.beta * kl
        # DDP averages gradients over processes, hence x world: the sum over processes and micro-steps is then
        # the objective normalised over the whole optimiser batch, whatever the layout.
        world = self.world
        per_token = torch.where(mask > 0, per_token, torch.zeros_like(per_token))
        if c.loss_type == "grpo" or gaussian:
            per_member = per_token.sum(-1) / mask.sum(-1).clamp(min=1)
            loss = per_member.sum() * world / max(self._norm_members, 1.0)
        else:  # dapo: token mean over the optimiser batch
            loss = per_token.sum() * world / max(self._norm_tokens, 1.0)
        loss = loss * scale
        # Sums and the token count, not this micro-batch's means: train_step logs token means over the whole
        # optimiser batch, which do not depend on how prompts fall into micro-batches and processes.
        is_clipped = ((ratio < 1.0 - c.epsilon) & (adv < 0)) | ((ratio > hi) & (adv > 0))
        stats = {"tokens": float(mask.sum()), "clipped_tokens": float((is_clipped.float() * mask).sum())}
        if kl is not None:
            stats["kl_sum"] = float((kl.detach() * mask).sum())
        return loss, stats

    def _zero_weight_pass(self, b: GRPOBatch) -> torch.Tensor:
        """A zero loss through the model for a micro-batch whose groups were all skipped, so that this process
        still takes part in the gradient all-reduce. Its input is a prompt that scored finite in this step (a
        skipped prompt may be NaN inside the model, and NaN x 0 is NaN: one such prompt would then drop the
        whole step, or not, depending on how prompts fall into micro-batches), with noise-free members."""
        g = self.config.num_generations
        dev = self.accelerator.device
        t = {k: v.to(dev) for k, v in _collate([self.rows[self._finite_row]], self.pad).items()}
        noise = torch.zeros(g, b.noise.shape[-1], device=dev, dtype=b.noise.dtype)
        gaussian = self.config.policy_logprob == "gaussian"
        res = self.module(**t, noise=noise, prompt_state=None, latent_only=gaussian)
        return (res.latent if gaussian else res.logprobs).float().sum() * 0.0

    def train_step(self, step: int) -> dict[str, float]:
        """Score, then ``num_iterations`` optimiser updates on the scored batch. Returns the logged stats."""
        c = self.config
        # Dropout, when on (disable_dropout: false), draws from the global RNG: seeded per step and process, so a
        # run resumed from a checkpoint draws the masks an uninterrupted run does (no RNG state to save).
        torch.manual_seed(_seed_for(c.seed, step, self.rank, 4))
        batches = self.local_micro_batches(step)
        stats = self.score(step, batches)
        loss_sum = 0.0
        token_sums = torch.zeros(3, dtype=torch.float64)  # completion tokens, clipped tokens, KL sum
        # No group of the whole step (all processes) scored finite: nothing to learn, and any pass would run on a
        # NaN prompt (loss NaN, counted again as a non-finite gradient). The step is skipped; the schedule moves on.
        everything_skipped = self._norm_members == 0
        for _ in range(c.num_iterations):
            self.optimizer.zero_grad(set_to_none=True)
            for m, b in enumerate(batches if not everything_skipped else []):
                last = m == len(batches) - 1
                # Gradients are all-reduced once per optimiser update, on the last micro-step.
                ctx = self.accelerator.no_sync(self.module) if not last else contextlib.nullcontext()
                with ctx:
                    loss, s = self._loss(b)
                    self.accelerator.backward(loss)
                loss_sum += float(loss.detach())
                if "tokens" in s:  # not from a zero-weight pass
                    token_sums += torch.tensor([s["tokens"], s["clipped_tokens"], s.get("kl_sum", 0.0)],
                                               dtype=torch.float64)
            params = [p for p in self.module.parameters() if p.requires_grad]
            finite = all(p.grad is None or bool(torch.isfinite(p.grad).all()) for p in params)
            flag = self.accelerator.reduce(torch.tensor([0.0 if finite else 1.0], device=self.accelerator.device), "sum")
            if float(flag) > 0 or self._norm_members == 0:
                # No NaN reaches the weights; a batch whose groups were all skipped does not move AdamW either.
                if float(flag) > 0:
                    self.nonfinite_steps += 1
                    logger.warning("step %d: non-finite gradient, update skipped", step)
                    if self.accelerator.scaler is not None:
                        # fp16 loss scaling: the scaler's step sees the inf, skips the update and lowers the scale.
                        # Not calling it left the scale where it overflowed, so every later step overflowed too.
                        self.optimizer.step()
                self.optimizer.zero_grad(set_to_none=True)
            else:
                if c.max_grad_norm and c.max_grad_norm > 0:
                    stats["grad_norm"] = float(self.accelerator.clip_grad_norm_(self.module.parameters(),
                                                                                c.max_grad_norm))
                self.optimizer.step()
            with warnings.catch_warnings():
                # Always: the schedule stays a function of the step count (resume relies on it). After a skipped
                # first update torch warns that the schedule's first value is skipped, which is what is meant.
                warnings.filterwarnings("ignore", message=r"Detected call of `lr_scheduler\.step\(\)` before")
                self.scheduler.step()
        loss_total = torch.tensor([loss_sum / c.num_iterations], device=self.accelerator.device)
        stats["loss"] = float(self.accelerator.reduce(loss_total, "mean"))
        # Token means over the optimiser batch (all processes, micro-steps and iterations).
        tokens, clipped, kl_sum = self.accelerator.reduce(
            token_sums.to(torch.float32).to(self.accelerator.device), "sum").tolist()
        stats["clip_ratio"] = clipped / max(tokens, 1.0)
        if c.beta > 0:
            # The mean k3 term the loss penalises, per token. In the latent mode the tokens are the true title's,
            # not samples of the policy, so this is the penalty's value, not an estimate of KL(policy || ref).
            stats["kl"] = kl_sum / max(tokens, 1.0)
        stats["learning_rate"] = float(self.scheduler.get_last_lr()[0])
        stats["nonfinite_grad_steps"] = self.nonfinite_steps
        return stats

    # -- checkpoints

    def _trainable_state(self) -> dict[str, torch.Tensor]:
        module = self.accelerator.unwrap_model(self.module)
        return {n: p for n, p in module.named_parameters() if p.requires_grad}

    def save_checkpoint(self) -> Path | None:
        """``output_dir/checkpoint-<step>``: trainable weights, AdamW state (safetensors) and the loop state."""
        self.accelerator.wait_for_everyone()
        out = Path(self.config.output_dir) / f"checkpoint-{self.global_step}"
        if self.accelerator.is_main_process:
            # Written beside it and renamed into place (an existing checkpoint-N is moved aside first, not deleted
            # before the rename; temporary copies of killed runs are removed): never a half-written checkpoint-N.
            with atomic_directory(out) as tmp:
                _save_flat(self._trainable_state(), tmp / "trainable.safetensors")
                opt = self.optimizer.state_dict()
                flat, groups = {}, []
                for pid, st in opt["state"].items():
                    for k, v in st.items():
                        flat[f"{pid}.{k}"] = v if torch.is_tensor(v) else torch.tensor(v)
                for gr in opt["param_groups"]:
                    groups.append({k: v for k, v in gr.items()})
                _save_flat(flat, tmp / OPTIMIZER_NAME, metadata={"param_groups": json.dumps(groups)})
                state = {"global_step": self.global_step, "log_history": self.log_history,
                         "skipped_groups": self.skipped_groups, "nonfinite_steps": self.nonfinite_steps,
                         "eval_before": self.eval_before, "config": self._resume_settings(),
                         "start": self.start_identity()}
                if self.accelerator.scaler is not None:  # fp16 loss scaling: its scale and growth tracker
                    state["grad_scaler"] = self.accelerator.scaler.state_dict()
                (tmp / STATE_NAME).write_text(json.dumps(state, indent=1) + "\n", encoding="utf-8")
            self._rotate()
        self.accelerator.wait_for_everyone()
        return out

    def _rotate(self) -> None:
        limit = self.config.save_total_limit
        if not limit:
            return
        ckpts = sorted(_checkpoints(Path(self.config.output_dir)), key=lambda p: int(p.name.split("-")[1]))
        for old in ckpts[:-limit]:
            shutil.rmtree(old, ignore_errors=True)

    def start_identity(self) -> dict[str, Any]:
        """What this run starts from, by content: ``sft_weights_sha256`` (the SFT checkpoint's weight files,
        :func:`~llmrec.evaluation.evaluator.weights_sha256`) and ``data_sha256`` (the prepared dataset's files; None
        if it cannot be found). Recorded in checkpoints and results: a path can hold a retrained SFT or a dataset
        prepared again later, and a resumed or reused run must not mix them. Computed when the trainer loads the
        SFT checkpoint."""
        return self._start_identity

    def _resume_settings(self) -> dict[str, Any]:
        """The configuration a checkpoint records, with the global batch (a resume may change the layout)."""
        return resume_settings(self.config, self.world)

    def check_resume_settings(self, path: Path) -> None:
        """Refuse to resume ``path`` under other settings than it was trained with (checkpoints before 2026-12-05
        do not record them and are not checked); warn about another process layout of the same global batch with
        dropout on (``disable_dropout: false``), whose masks are drawn per step and process."""
        from llmrec.training.sft import current_layout, layout_change, layout_text

        refuse_changed_grpo_resume(path, self.config, self.world, self.start_identity())
        found = json.loads((path / STATE_NAME).read_text(encoding="utf-8")).get("config") or {}
        before = layout_change(found, self.config, self.world)
        if before is not None and not self.config.disable_dropout:
            logger.warning("resuming %s, trained with %s, as %s: with dropout on (disable_dropout: false) the masks "
                           "are drawn per step and process, so the run is neither layout's uninterrupted run", path,
                           layout_text(before), layout_text(current_layout(self.config, self.world)))

    def load_checkpoint(self, path: Path) -> None:
        from safetensors import safe_open
        from safetensors.torch import load_file

        weights = load_file(str(path / "trainable.safetensors"))
        own = self._trainable_state()
        if set(weights) != set(own):
            raise ValueError(f"{path}: trainable tensors {sorted(set(weights) ^ set(own))[:5]} do not match this run")
        with torch.no_grad():
            for n, p in own.items():
                p.copy_(weights[n].to(p.dtype))
        flat = load_file(str(path / OPTIMIZER_NAME))
        with safe_open(str(path / OPTIMIZER_NAME), "pt") as f:
            groups = json.loads(f.metadata()["param_groups"])
        state: dict[int, dict] = {}
        for key, v in flat.items():
            pid, name = key.split(".", 1)
            state.setdefault(int(pid), {})[name] = v
        self.optimizer.load_state_dict({"state": state, "param_groups": groups})
        st = json.loads((path / STATE_NAME).read_text(encoding="utf-8"))
        self.global_step = int(st["global_step"])
        self.log_history = list(st["log_history"])
        self.skipped_groups = int(st["skipped_groups"])
        self.nonfinite_steps = int(st["nonfinite_steps"])
        self.eval_before = st.get("eval_before")
        if self.accelerator.scaler is not None and st.get("grad_scaler"):
            # else a resumed fp16 run restarts at the initial loss scale and skips updates that overflow it again
            self.accelerator.scaler.load_state_dict(st["grad_scaler"])
        with warnings.catch_warnings():  # fast-forwarding a fresh scheduler, not skipping an optimiser step
            warnings.filterwarnings("ignore", message=r"Detected call of `lr_scheduler\.step\(\)` before")
            for _ in range(self.global_step * self.config.num_iterations):  # the schedule is a function of the step
                self.scheduler.step()

    def save_model(self, output_dir: str | Path) -> None:
        """A checkpoint `llmrec evaluate --checkpoint` reads: the SFT checkpoint with this run's trained weights."""
        self.accelerator.wait_for_everyone()
        if not self.accelerator.is_main_process:
            return
        from llmrec.models.checkpoint import SAVE_IN_PROGRESS, mark_save_in_progress
        from llmrec.training.sft import LLMREC_CONFIG_NAME, TRAINING_ARGS_JSON, save_sft_checkpoint

        out = Path(output_dir)
        out.mkdir(parents=True, exist_ok=True)
        lm = self.accelerator.unwrap_model(self.module).latent_lm
        src = Path(self.config.sft_checkpoint) if self.config.sft_checkpoint else None
        # llmrec_config.json is written last: a save cut short leaves latent files without it, which every reader
        # refuses (checkpoint_kind). Copied first, as it was, a kill before the new head left a folder that
        # evaluate and recommend took for the GRPO model while it held the SFT head (review).
        config_path = out / LLMREC_CONFIG_NAME
        # The marker before any file, removed after the last (both paths: head-only copies the SFT adapter first,
        # and a kill there left a folder that loaded as a plain adapter; a review). Rewritten here, a stale one of
        # a cut save is not left to refuse this finished model.
        mark_save_in_progress(out)
        config_path.unlink(missing_ok=True)
        if self.config.train_lora or src is None:
            save_sft_checkpoint(lm, self.tokenizer, out, sft_fields=self.meta, finish=False)
            meta = json.loads(config_path.read_text(encoding="utf-8"))
            config_path.unlink()
        else:
            # Head-only training: the LM is the SFT checkpoint's; copy its files and write the new head.
            for f in src.iterdir():
                if f.is_file() and f.name not in ("train_results.json", RESULTS_NAME, TRAINING_ARGS_JSON,
                                                  LLMREC_CONFIG_NAME, SAVE_IN_PROGRESS):
                    shutil.copy2(f, out / f.name)
            lm.save_pretrained(out)
            give_saved_weights_default_permissions(out)
            meta = (json.loads((src / LLMREC_CONFIG_NAME).read_text(encoding="utf-8"))
                    if (src / LLMREC_CONFIG_NAME).exists() else {})
        # The prompt settings GRPO trained with, which evaluation and Recommender read; they may differ from the SFT
        # run's, which the "grpo" record keeps.
        settings = self.prompt_settings()
        sft_settings = {k: meta.get(k) for k in settings}
        meta.update(settings)
        meta["grpo"] = {"sft_checkpoint": str(src) if src else None, "sft_prompt_settings": sft_settings,
                        "steps": self.global_step,
                        "advantage_mode": self.config.advantage_mode, "reward_funcs": self.config.reward_funcs,
                        "noise_scale": self.config.noise_scale, "noise_mode": self.config.noise_mode,
                        "learning_rate": self.config.learning_rate, "train_lora": self.config.train_lora,
                        "num_generations": self.config.num_generations, "max_train_rows": self.config.max_train_rows,
                        "seed": self.config.seed}
        # This run's full configuration (the SFT checkpoint's training_args.json is not copied: it described SFT).
        (out / TRAINING_ARGS_JSON).write_text(json.dumps(self.config.to_dict(), indent=2, default=str) + "\n",
                                              encoding="utf-8")
        atomic_write_text(config_path, json.dumps(meta, indent=2, default=str) + "\n")  # last: the save is complete
        (out / SAVE_IN_PROGRESS).unlink()

    # -- loop

    def train(self, resume: bool = True) -> dict:
        """Run to ``max_steps`` (resuming from the last checkpoint in ``output_dir``); return the results dict."""
        from tqdm.auto import tqdm

        c = self.config
        out_dir = Path(c.output_dir)
        resumed = None
        last = last_grpo_checkpoint(out_dir) if resume else None
        if last is not None:  # before any work (mining beam negatives can take minutes)
            self.check_resume_settings(last)
        if self.uses_candidates and c.rank_negatives in BEAM_RANK_NEGATIVES:
            # Mined by the starting model, before a resume loads a checkpoint (or found in the run's file);
            # beam_current mines the train prompts at each step instead, and keeps these for the held-out check.
            if c.rank_negatives == "beam":
                self.mine_beam_negatives(c.train_split, self.rows)
            if c.eval_rows:
                self._mine_held_out_negatives()
        if last is not None:
            self.load_checkpoint(last)
            resumed = str(last)
            logger.info("resuming from %s (step %d)", last, self.global_step)
        if wants_tensorboard(c.report_to, "latent GRPO") and self.accelerator.is_main_process:
            self.scalars = ScalarLog(getattr(c, "logging_dir", None) or out_dir / "runs",
                                     purge_step=self.global_step + 1 if resumed else None)
        t0 = time.time()
        if c.eval_rows and self.eval_before is None and self.global_step == 0:
            self.eval_before = self.evaluate_rewards()
            logger.info("held-out rewards before training: %s", self.eval_before)
            self.scalars.add("held_out", self.eval_before, 0)
        bar = tqdm(total=self.max_steps, initial=self.global_step, desc="latent GRPO",
                   disable=not self.accelerator.is_main_process or bool(self.config.disable_tqdm))
        while self.global_step < self.max_steps:
            stats = self.train_step(self.global_step)
            self.global_step += 1
            stats["step"] = self.global_step
            stats["epoch"] = self.global_step / self.steps_per_epoch
            self.log_history.append(stats)
            bar.update(1)
            bar.set_postfix(reward=f"{stats['reward']:.3f}", loss=f"{stats['loss']:.4f}")
            self.scalars.add("train", stats, self.global_step)
            if c.logging_steps and self.global_step % _every(c.logging_steps, self.max_steps) == 0:
                logger.info("step %d: %s", self.global_step,
                            {k: round(v, 5) if isinstance(v, float) else v for k, v in stats.items()})
            if c.save_steps and self.global_step % _every(c.save_steps, self.max_steps) == 0 and \
                    self.global_step < self.max_steps:
                self.save_checkpoint()
            for cb in self.callbacks:  # after the checkpoint, so a callback that stops the run finds it saved
                cb(self, stats)
        bar.close()
        eval_after = None
        if c.eval_rows:
            eval_after = self.evaluate_rewards()
            logger.info("held-out rewards after training: %s (before: %s)", eval_after, self.eval_before)
            self.scalars.add("held_out", eval_after, self.global_step)
        self.save_model(out_dir)
        results = {
            "output_dir": str(out_dir), "sft_checkpoint": c.sft_checkpoint, **self.start_identity(),
            "resumed_from": resumed,
            "global_step": self.global_step, "max_steps": self.max_steps, "prompts": len(self.rows),
            "drawn_prompts": self.drawn_rows.get(c.train_split, len(self.rows)),
            "prompts_per_step": self.prompts_per_step, "world_size": self.world,
            "skipped_groups": self.skipped_groups, "nonfinite_grad_steps": self.nonfinite_steps,
            "train_seconds_this_run": round(time.time() - t0, 3),
            "eval_before": self.eval_before, "eval_after": eval_after, "log_history": self.log_history,
        }
        if self.accelerator.is_main_process:
            from llmrec.data.canonical import atomic_write_json

            atomic_write_json(out_dir / RESULTS_NAME, results)
        self.scalars.close()
        self.accelerator.wait_for_everyone()
        return results


def resume_settings(config: LatentGRPOConfig, processes: int) -> dict[str, Any]:
    """The configuration a GRPO checkpoint records, with the global batch over ``processes``."""
    from llmrec.training.sft import global_train_batch_size

    return dict(json.loads(json.dumps(config.to_dict(), default=str)),
                global_train_batch_size=global_train_batch_size(config, processes))


def refuse_changed_grpo_resume(path: str | os.PathLike, config: LatentGRPOConfig, processes: int,
                               start_now: dict[str, Any] | None = None) -> None:
    """Raise :class:`~llmrec.config.ConfigError` if resuming the GRPO checkpoint ``path`` under ``config`` on
    ``processes`` processes would change a trained setting, or (``start_now``: :func:`start_identity` of this run,
    computed when None) its SFT weights or data. The trainer and the dry run ask the same question."""
    from llmrec.config import field_defaults, refuse_changed_resume
    from llmrec.training.neutral_fields import RESUME_NEUTRAL_FIELDS

    path = Path(path)
    state = json.loads((path / STATE_NAME).read_text(encoding="utf-8"))
    start = state.get("start")  # recorded since 2026-12-05
    if start is not None:
        if start_now is None:
            start_now = start_identity(config.sft_checkpoint, _prompt_dataset_dir(config))
        changed = start_differences(start, start_now)
        if changed:
            raise ConfigError(f"{path} was trained from {' and '.join(changed)} than this run would start from "
                              "(the SFT checkpoint or the dataset has changed since): train in another output_dir, "
                              "or set retrain: true")
    found = state.get("config")
    if found is not None:
        # TRL derives steps_per_generation / generation_batch_size from the layout; this trainer reads neither
        # (global_train_batch_size covers the batch)
        wanted = resume_settings(config, processes)
        refuse_changed_resume(path, found, wanted, field_defaults(LatentGRPOConfig),
                              ignore=RESUME_NEUTRAL_FIELDS | {"steps_per_generation", "generation_batch_size"}
                              | inert_fields(found, wanted),
                              paths=("dataset", "sft_checkpoint"))


def start_identity(sft_checkpoint: str | None, data_dir: Path | None) -> dict[str, Any]:
    """``{"sft_weights_sha256", "data_sha256"}`` of an SFT checkpoint and a prepared dataset (None where missing)."""
    from llmrec.data.identity import data_sha256
    from llmrec.evaluation.evaluator import weights_sha256

    return {"sft_weights_sha256": weights_sha256(sft_checkpoint) if sft_checkpoint else None,
            "data_sha256": data_sha256(data_dir) if data_dir is not None else None}


def start_differences(recorded: dict[str, Any], now: dict[str, Any]) -> list[str]:
    """How what a GRPO run recorded it started from (:meth:`LatentGRPOTrainer.start_identity`, or its results)
    differs from ``now``: "other SFT weights" and/or "other data" (each compared only where both are known)."""
    out = []
    was, isnow = recorded.get("sft_weights_sha256"), now.get("sft_weights_sha256")
    if was is not None and isnow is not None and was != isnow:
        out.append("other SFT weights")
    was, isnow = recorded.get("data_sha256"), now.get("data_sha256")
    if was is not None and isnow is not None and was != isnow:
        out.append("other data")
    return out


def _every(x: float, max_steps: int) -> int:
    """A ``*_steps`` value in optimiser steps: a fraction of the run when in (0, 1), as transformers reads it."""
    return max(1, math.ceil(x * max_steps)) if 0 < x < 1 else max(1, int(x))


def _checkpoints(out_dir: Path) -> list[Path]:
    if not out_dir.is_dir():
        return []
    return [p for p in out_dir.iterdir() if p.is_dir() and p.name.startswith("checkpoint-")
            and p.name.split("-", 1)[1].isdigit()]


def last_grpo_checkpoint(out_dir: str | Path) -> Path | None:
    """The highest complete ``checkpoint-N`` (its state file is written last, inside a renamed temp dir)."""
    done = [p for p in _checkpoints(Path(out_dir)) if (p / STATE_NAME).exists()]
    return max(done, key=lambda p: int(p.name.split("-")[1])) if done else None


def _prompt_dataset_dir(config: LatentGRPOConfig) -> Path | None:
    """The prepared dataset the prompts come from (``dataset``, else the one the SFT checkpoint records), or None
    if it cannot be found."""
    from llmrec.evaluation.evaluator import recorded_dataset
    from llmrec.training.finished_runs import dataset_dir_or_none

    name = config.dataset
    if name is None and config.sft_checkpoint:
        name = recorded_dataset(config.sft_checkpoint)
    return dataset_dir_or_none(name)


def run_grpo(config: LatentGRPOConfig, callbacks: list | None = None) -> dict[str, Any]:
    """Train (resuming from the last checkpoint; a finished run is skipped unless ``retrain``)."""
    from llmrec.training.finished_runs import LLM_CHECKPOINT_FILES, refuse_other_kind_of_run

    out = Path(config.output_dir)
    refuse_other_kind_of_run(out, "`llmrec grpo`", own=LLM_CHECKPOINT_FILES)
    if (out / RESULTS_NAME).exists() and not config.retrain:
        from llmrec.training.finished_runs import finished_grpo_differences, refuse_other_finished_run

        refuse_other_finished_run(out, "GRPO run", finished_grpo_differences(config, _prompt_dataset_dir(config)),
                                  "set retrain: true to train it again with these settings, or use another output_dir")
        logger.info("%s holds a finished run (%s) made with these settings; skipping (set retrain: true to train "
                    "again)", out, RESULTS_NAME)
        return json.loads((out / RESULTS_NAME).read_text(encoding="utf-8"))
    if config.retrain:
        from accelerate import PartialState

        from llmrec.models.checkpoint import remove_saved_model

        # The old run's checkpoints would outrank the new run's in rotation (by step) and be what a later resume
        # picks up; its results would make a rerun return the old run.
        old = _checkpoints(out)
        if old or (out / RESULTS_NAME).exists():
            logger.warning("retrain: training %s again from the start; removing the earlier run's %d checkpoint(s)",
                           out, len(old))
        if PartialState().is_main_process:
            for ckpt in old:
                shutil.rmtree(ckpt)
            (out / RESULTS_NAME).unlink(missing_ok=True)
            remove_saved_model(out)  # a retrain cut short must not leave the old model readable as the new one
        PartialState().wait_for_everyone()
    trainer = LatentGRPOTrainer(config, callbacks=callbacks)
    return trainer.train(resume=not config.retrain)

