"""``llmrec sft`` (SFT with latent reasoning tokens, or the BIGRec baseline) and ``llmrec grpo`` (latent GRPO)."""

from __future__ import annotations

import argparse
import json

from llmrec.config import StoreOnce


def cmd_sft(args: argparse.Namespace) -> int:
    from llmrec.dry_run import maybe_dry_run

    if (code := maybe_dry_run("sft", args)) is not None:
        return code
    from llmrec.config import parse_config
    from llmrec.training.sft import LatentSFTConfig, run_sft

    (config,) = parse_config([LatentSFTConfig], args.config, args.overrides)
    results = run_sft(config)
    if config.should_save:
        summary = {k: results[k] for k in ("output_dir", "global_step", "train_loss", "best_checkpoint",
                                            "best_eval_loss", "resumed_from")}
        print(json.dumps(summary, indent=2, default=str))
    return 0


def cmd_grpo(args: argparse.Namespace) -> int:
    from llmrec.dry_run import maybe_dry_run

    if (code := maybe_dry_run("grpo", args)) is not None:
        return code
    from llmrec.config import parse_config
    from llmrec.training.grpo import LatentGRPOConfig, run_grpo

    (config,) = parse_config([LatentGRPOConfig], args.config, args.overrides)
    results = run_grpo(config)
    if config.should_save:
        last = results["log_history"][-1] if results["log_history"] else {}
        summary = {k: results[k] for k in ("output_dir", "global_step", "skipped_groups", "resumed_from")}
        summary["last_step"] = {k: last[k] for k in ("reward", "loss", "latent_norm", "noise_norm") if k in last}
        print(json.dumps(summary, indent=2, default=str))
    return 0


def _sft_config_classes() -> tuple[type, type]:
    import transformers

    from llmrec.training.sft import LatentSFTConfig

    return LatentSFTConfig, transformers.TrainingArguments


def _grpo_config_classes() -> tuple[type, type, set[str]]:
    from trl import GRPOConfig

    from llmrec.training.grpo import (
        IGNORED_TRL_FIELDS,
        NO_EFFECT_FIELDS,
        NON_DEFAULT_REFUSED_FIELDS,
        LatentGRPOConfig,
    )

    return LatentGRPOConfig, GRPOConfig, set(IGNORED_TRL_FIELDS) | set(NO_EFFECT_FIELDS) | set(NON_DEFAULT_REFUSED_FIELDS)


def register_cli(subparsers) -> None:
    from llmrec.config_help import add_config_fields_help
    from llmrec.dry_run import add_dry_run_arguments

    p = subparsers.add_parser(
        "sft",
        help="supervised fine-tuning (LoRA/full) with N latent thought tokens; N=0 is the BIGRec baseline",
        description="Every LatentSFTConfig / TrainingArguments field (listed below) is a recipe key or "
        "--name value (see recipes/games/sft_latent.yaml). Reruns resume from the last checkpoint in output_dir.",
    )
    add_config_fields_help(p, _sft_config_classes)
    p.add_argument("--config", default=None, action=StoreOnce, help="recipe YAML (e.g. recipes/games/sft_latent.yaml)")
    add_dry_run_arguments(p)
    p.set_defaults(func=cmd_sft, accepts_overrides=True)
    g = subparsers.add_parser(
        "grpo",
        help="latent GRPO from a latent SFT checkpoint (noise-perturbed latents, continuous rewards)",
        description="Every LatentGRPOConfig / trl GRPOConfig field (listed below) is a recipe key or --name value "
        "(see recipes/games/grpo_latent.yaml), except the ones latent GRPO does not implement (bf16, "
        "gradient_checkpointing, eval_strategy, use_vllm, top_p, ...): those are refused, with the reason, when "
        "set. Reruns resume from the last checkpoint in output_dir.",
    )
    add_config_fields_help(g, _grpo_config_classes)
    g.add_argument("--config", default=None, action=StoreOnce, help="recipe YAML (e.g. recipes/games/grpo_latent.yaml)")
    add_dry_run_arguments(g)
    g.set_defaults(func=cmd_grpo, accepts_overrides=True)
