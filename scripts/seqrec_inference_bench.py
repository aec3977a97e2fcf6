"""Inference latency of the ID models side by side (the ID-baseline issue's target: ReaRec with K = 2 at most 1.15x
SASRec's time per row at evaluation batch 256).

    python scripts/seqrec_inference_bench.py --dataset data/ml100k --output benchmarks/results/seqrec_inference_ml100k

Each model is built from its own recipe (recipes/seqrec/<model>_<recipe-dataset>.yaml: the settings it is trained and
evaluated with), freshly initialised (latency does not depend on the weights), and timed over the whole test split in
interleaved rounds after a warm-up (`llmrec.seqrec.bench.measure_inference`), by CPU time of the process on one
thread. Writes <output>.json and <output>.md.
"""

from __future__ import annotations

import argparse
import platform
import sys

import torch

from llmrec.config import coerce_fields, read_recipe
from llmrec.data.canonical import atomic_write_json, atomic_write_text
from llmrec.seqrec.bench import measure_inference
from llmrec.seqrec.config import SeqRecConfig

TIMING_FIELDS = ("model", "max_history", "hidden_size", "n_heads", "n_layers", "inner_size", "reason_steps",
                 "n_pre_layers", "n_core_layers", "mean_recurrence", "state_init", "fuse")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--dataset", required=True)
    ap.add_argument("--recipes", default="ml100k", help="recipes/seqrec/<model>_<this>.yaml")
    ap.add_argument("--models", default="sasrec,rearec-erl,rearec-prl,lares")
    ap.add_argument("--repeats", type=int, default=15)
    ap.add_argument("--eval-batch-size", type=int, default=256)
    ap.add_argument("--output", required=True, help="path without extension")
    args = ap.parse_args()
    torch.set_num_threads(1)
    models = {}
    for name in args.models.split(","):
        path = f"recipes/seqrec/{name}_{args.recipes}.yaml"
        fields = coerce_fields([SeqRecConfig], read_recipe(path), path)
        models[name] = {k: fields[k] for k in TIMING_FIELDS if k in fields}
    res = measure_inference(args.dataset, models, eval_batch_size=args.eval_batch_size, repeats=args.repeats)
    first = next(iter(res))
    out = {"dataset": args.dataset, "eval_batch_size": args.eval_batch_size, "repeats": args.repeats, "threads": 1,
           "clock": "process CPU time", "command": " ".join(["python", *sys.argv]), "machine": platform.processor()
           or platform.machine(), "settings": models, "results": res}
    lines = [f"Scoring time per test row at evaluation batch {args.eval_batch_size} ({args.dataset}; each model's "
             f"recipe settings, fresh weights; {args.repeats} interleaved rounds after a warm-up, CPU time of one "
             f"thread; `{out['command']}`); ratio = median over rounds of the round's time over {first}'s:", "",
             f"| model | settings | ms/row (median round) | ratio vs {first} |", "|---|---|---|---|"]
    for name, r in res.items():
        extra = ", ".join(f"{k} {v}" for k, v in models[name].items() if k in ("reason_steps", "mean_recurrence"))
        lines.append(f"| {name} | {extra or '-'} | {r['ms_per_row']:.3f} | {r['ratio_vs_first']:.3f} |")
    atomic_write_text(f"{args.output}.md", "\n".join(lines) + "\n")
    atomic_write_json(f"{args.output}.json", out)
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
