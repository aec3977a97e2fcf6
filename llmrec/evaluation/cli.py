"""``llmrec evaluate --config RECIPE [--checkpoint DIR] [--name value ...]``."""

from __future__ import annotations

import argparse


def cmd_evaluate(args: argparse.Namespace) -> int:
    from llmrec.config import parse_config
    from llmrec.evaluation.evaluator import EvalConfig, evaluate

    # `is not None`: an explicit `--checkpoint null` (None, the base model) must replace the recipe's checkpoint too
    extra = {"checkpoint": args.checkpoint} if args.checkpoint is not None else None
    from llmrec.dry_run import maybe_dry_run

    if (code := maybe_dry_run("evaluate", args, extra=extra)) is not None:
        return code
    (config,) = parse_config([EvalConfig], args.config, args.overrides, extra=extra)
    results = evaluate(config)
    if results is not None:
        from pathlib import Path

        print((Path(config.output_dir) / "results.md").read_text(encoding="utf-8"), end="")
        print(f"results: {Path(config.output_dir) / 'results.json'}")
    return 0


def _checkpoint_argument(text: str) -> str:
    """argparse type of ``--checkpoint``: an empty value is refused. It silently kept the recipe's checkpoint (and
    would read as the working directory): the base model is asked for with ``null``, which EvalConfig reads as
    None."""
    if not text.strip():
        raise argparse.ArgumentTypeError("empty: give a checkpoint directory, or null to evaluate the base model "
                                         "without the recipe's checkpoint")
    return text


def _eval_config_class() -> tuple[type, None]:
    from llmrec.evaluation.evaluator import EvalConfig

    return EvalConfig, None


def register_cli(subparsers) -> None:
    p = subparsers.add_parser(
        "evaluate",
        help="constrained beam-search evaluation (or popularity) on a split; writes results.json",
        description="Every EvalConfig field (listed below) is a recipe key or --name value (see recipes/games/eval.yaml).",
    )
    from llmrec.config_help import add_config_fields_help

    add_config_fields_help(p, _eval_config_class)
    from llmrec.config import StoreOnce

    p.add_argument("--config", default=None, action=StoreOnce, help="recipe YAML (e.g. recipes/games/eval.yaml)")
    p.add_argument("--checkpoint", default=None, action=StoreOnce, type=_checkpoint_argument,
                   help="trained checkpoint directory to evaluate (overrides the recipe's; null: none, the base model)")
    from llmrec.dry_run import add_dry_run_arguments

    add_dry_run_arguments(p)
    p.set_defaults(func=cmd_evaluate, accepts_overrides=True)
    register_compare_cli(subparsers)


def cmd_compare(args: argparse.Namespace) -> int:
    import json
    from pathlib import Path

    from llmrec.data.canonical import atomic_write_json, atomic_write_text, check_file_path
    from llmrec.evaluation.compare import compare_runs, comparison_table

    for flag, path in (("--output", args.output), ("--markdown", args.markdown)):
        if path:  # before the bootstrap, not at the write after it
            check_file_path(path, flag)
    result = compare_runs(args.runs, [m.strip() for m in args.metrics.split(",") if m.strip()], level=args.level,
                          n_resamples=args.resamples, seed=args.seed,
                          power_rel=args.power_rel,
                          seeds_per_run=args.seeds_per_run,
                          labels=None if args.labels is None else args.labels.split(","))
    table = comparison_table(result)
    print(table, end="")
    if args.output:
        atomic_write_json(Path(args.output), result)
    if args.markdown:
        atomic_write_text(Path(args.markdown), table)
    print(json.dumps(result, sort_keys=True))
    return 0


def _relative_effects(text: str) -> list[float]:
    """argparse type of ``--power-rel``: comma-separated finite numbers > 0 (``abc`` was reported as a bare
    "could not convert string to float", naming no option)."""
    import math

    values = []
    for part in (p.strip() for p in text.split(",")):
        if not part:
            continue
        try:
            value = float(part)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{part!r} is not a number (expected e.g. 0.03,0.17)") from None
        if not 0 < value < math.inf:  # also refuses nan
            raise argparse.ArgumentTypeError(f"{part!r}: a relative effect must be finite and > 0 (e.g. 0.03)")
        values.append(value)
    return values


def register_compare_cli(subparsers) -> None:
    from llmrec.config import int_at_least

    p = subparsers.add_parser(
        "compare",
        help="paired comparison of evaluation runs on their shared rows (bootstrap 95%% intervals)",
        description="The first run is the baseline of every difference.",
    )
    p.add_argument("runs", nargs="+", help="llmrec evaluate output directories")
    p.add_argument("--metrics", default="hr@10,ndcg@10", help="comma-separated, e.g. hr@5,ndcg@10,mrr@10")
    p.add_argument("--level", default="item", choices=("item", "title"), help="matching level")
    # below 40 the 2.5% tails of the percentile interval hold no resample: `--resamples 1` gave a "95% interval"
    # that excluded the observed difference (a review)
    p.add_argument("--resamples", type=int_at_least(40), default=10000,
                   help="bootstrap resamples (>= 40; 10,000 for stable interval ends)")
    p.add_argument("--seed", type=int, default=0, help="bootstrap seed")
    p.add_argument("--power-rel", type=_relative_effects, default=[], metavar="R1,R2",
                   help="also print the rows needed to detect true differences of these sizes relative to the "
                        "baseline's mean (e.g. 0.03,0.17; two-sided 5%%, 80%% power)")
    p.add_argument("--seeds-per-run", type=int, default=1, metavar="N",
                   help="every N consecutive directories are the seeds of one run (e.g. --seeds-per-run 3 A0 A1 A2 B0 "
                        "B1 B2): each row's metrics are averaged over them before the differences")
    p.add_argument("--labels", default=None, metavar="A,B",
                   help="comma-separated short names of the runs (one per run, or per group with --seeds-per-run), "
                        "shown in the table instead of the directories, which are listed below it")
    p.add_argument("--output", default=None, help="also write the JSON result here")
    p.add_argument("--markdown", default=None,
                   help="also write the printed table here (e.g. benchmarks/results/NAME.md, which "
                        "scripts/update_readme_results.py copies into README blocks)")
    p.set_defaults(func=cmd_compare)
