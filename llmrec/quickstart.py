"""``llmrec quickstart``: the README's main job on the embedded Games sample.

Stages (each skipped when its output already exists, so a rerun resumes): prepare the embedded
sample -> popularity baseline -> zero-shot constrained beam search with a real small LM -> one
metrics table. Training stages (latent SFT, latent GRPO) join this pipeline as they land.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path


def cmd_quickstart(args: argparse.Namespace) -> int:
    from llmrec.data.cli import format_stats
    from llmrec.data.samples import resolve_dataset_dir
    from llmrec.evaluation.evaluator import EvalConfig, evaluate, markdown_table

    out = Path(args.output_dir)
    data_dir = resolve_dataset_dir(args.dataset)
    print(f"== data: {args.dataset} ({data_dir})")
    print(format_stats(json.loads((data_dir / "stats.json").read_text(encoding="utf-8"))))
    common = dict(dataset=str(data_dir), split="test", max_rows=args.rows, row_seed=args.seed,
                  model_name_or_path=args.model, dtype=args.dtype, num_beams=args.beams,
                  batch_size=args.batch_size, ks=[1, 3, 5, 10])
    results = []
    for name, extra in (("popularity", {"method": "popularity"}), ("zero_shot", {"method": "beam"})):
        print(f"== evaluate: {name}")
        res = evaluate(EvalConfig(**common, **extra, output_dir=str(out / name)))
        if res is not None:
            results.append(res)
    if results:
        ks = [k for k in (1, 3, 5, 10) if k <= args.beams]
        table = markdown_table(results, ks)
        (out / "results.md").write_text(table, encoding="utf-8")
        print(f"== results ({args.rows} test rows of {args.dataset}, item-level matching)")
        print(table, end="")
    return 0


def register_cli(subparsers) -> None:
    p = subparsers.add_parser("quickstart", help="the main job on the embedded sample (resumable)",
                              formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--dataset", default="games-sample", help="prepared directory or embedded sample")
    p.add_argument("--model", default="smollm2-135m", help="backbone (alias, hub id or local dir)")
    p.add_argument("--rows", type=int, default=100, help="test rows evaluated (seeded subset)")
    p.add_argument("--beams", type=int, default=10, help="beams per row")
    p.add_argument("--batch-size", type=int, default=8, help="rows per batch")
    p.add_argument("--dtype", default="bfloat16", help="model dtype")
    p.add_argument("--seed", type=int, default=0, help="seed of the row subset")
    p.add_argument("--output-dir", default="runs/quickstart", help="where every stage writes")
    p.set_defaults(func=cmd_quickstart)
