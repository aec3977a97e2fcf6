"""``llmrec sft``: supervised fine-tuning with latent reasoning tokens (or the BIGRec baseline)."""

from __future__ import annotations

import argparse
import json


def cmd_sft(args: argparse.Namespace) -> int:
    from llmrec.config import parse_config
    from llmrec.training.sft import LatentSFTConfig, run_sft

    (config,) = parse_config([LatentSFTConfig], args.config, args.overrides)
    results = run_sft(config)
    if config.should_save:
        summary = {k: results[k] for k in ("output_dir", "global_step", "train_loss", "best_checkpoint",
                                            "best_eval_loss", "resumed_from")}
        print(json.dumps(summary, indent=2, default=str))
    return 0


def register_cli(subparsers) -> None:
    p = subparsers.add_parser(
        "sft",
        help="supervised fine-tuning (LoRA/full) with N latent thought tokens; N=0 is the BIGRec baseline",
        description="Options not listed here are LatentSFTConfig / TrainingArguments fields, given as "
        "--name value (see recipes/games/sft_latent.yaml). Reruns resume from the last checkpoint in output_dir.",
    )
    p.add_argument("--config", default=None, help="recipe YAML (e.g. recipes/games/sft_latent.yaml)")
    p.set_defaults(func=cmd_sft, accepts_overrides=True)
