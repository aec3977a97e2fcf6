"""``llmrec seqrec train``: train and test an ID-based sequential recommender from a recipe.

llmrec seqrec train --config recipes/seqrec/sasrec_ml100k.yaml [--field value ...]
accelerate launch --num_processes 2 -m llmrec.cli seqrec train --config ...   # several processes
"""

from __future__ import annotations

import argparse

from llmrec.config import StoreOnce


def _train(args: argparse.Namespace) -> int:
    from llmrec.config import ConfigError, parse_config
    from llmrec.seqrec.config import SeqRecConfig
    from llmrec.seqrec.run import run_seqrec

    (cfg,) = parse_config([SeqRecConfig], args.config, args.overrides)
    unused = cfg.unused_fields()
    if unused:  # one run: a setting its model never reads would be recorded as if it had shaped the result
        where = f"{args.config} + command line" if args.config else "command line"
        raise ConfigError(f"{where}: this {cfg.model} run does not read "
                          + ", ".join(f"{k} (set to {v!r})" for k, v in unused.items())
                          + "; remove them, or set the model (or train_mode, rpt_epochs) they are for")
    res = run_seqrec(cfg)
    t = res["test"]
    print(
        f"{cfg.model}: test ndcg@10 {t['ndcg@10']:.4f} hr@10 {t['hr@10']:.4f} "
        f"(valid {cfg.valid_metric} {res['valid'].get(cfg.valid_metric, float('nan')):.4f}, "
        f"{res['timings']['epoch_s']:.2f} s/epoch) -> {cfg.output_dir}"
    )
    return 0


def _config_class() -> tuple[type, None]:
    from llmrec.seqrec.config import SeqRecConfig

    return SeqRecConfig, None


def register_cli(subparsers) -> None:
    """Add the ``seqrec`` command group."""
    from llmrec.config_help import add_config_fields_help

    p = subparsers.add_parser("seqrec", help="ID-based sequential recommenders (SASRec, GRU4Rec, ReaRec, LARES)")
    sub = p.add_subparsers(dest="seqrec_command", metavar="SUBCOMMAND")
    t = sub.add_parser(
        "train",
        help="train, select on validation and test one model; writes results.json / results.md",
        description="Every SeqRecConfig field (listed below) is a recipe key, overridden by --name value.",
    )
    add_config_fields_help(t, _config_class)
    t.add_argument("--config", default=None, action=StoreOnce, help="recipe YAML (e.g. recipes/seqrec/sasrec_ml100k.yaml)")
    t.set_defaults(func=_train, accepts_overrides=True)
    p.set_defaults(func=lambda a: (p.print_help(), 2)[1])
