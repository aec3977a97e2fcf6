"""``llmrec evaluate --config RECIPE [--checkpoint DIR] [--name value ...]``."""

from __future__ import annotations

import argparse


def cmd_evaluate(args: argparse.Namespace) -> int:
    from llmrec.config import parse_config
    from llmrec.evaluation.evaluator import EvalConfig, evaluate

    extra = {"checkpoint": args.checkpoint} if args.checkpoint else None
    (config,) = parse_config([EvalConfig], args.config, args.overrides, extra=extra)
    results = evaluate(config)
    if results is not None:
        from pathlib import Path

        print((Path(config.output_dir) / "results.md").read_text(encoding="utf-8"), end="")
        print(f"results: {Path(config.output_dir) / 'results.json'}")
    return 0


def register_cli(subparsers) -> None:
    p = subparsers.add_parser(
        "evaluate",
        help="constrained beam-search evaluation (or popularity) on a split; writes results.json",
        description="Options not listed here are EvalConfig fields, given as --name value (see recipes/games/eval.yaml).",
    )
    p.add_argument("--config", default=None, help="recipe YAML (e.g. recipes/games/eval.yaml)")
    p.add_argument("--checkpoint", default=None, help="trained checkpoint directory to evaluate")
    p.set_defaults(func=cmd_evaluate, accepts_overrides=True)
