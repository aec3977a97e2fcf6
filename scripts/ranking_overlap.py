"""How much of one evaluation's top-K lists another shares, row by row (e.g. D3 decoding against its ID model).

Each argument is an ``llmrec evaluate`` output directory (its ``rankings.jsonl``); the first is the reference.
For every other run it prints the mean over the shared rows of |top-K items of the run ∩ top-K items of the
reference| / K (item level, as the metrics: a title shared by several items counts as those items):

    B=benchmarks/results/pipeline_games_smollm2_runs
    python scripts/ranking_overlap.py $B/eval_sasrec $B/eval_sft_bigrec $B/eval_sft_bigrec_d3_w3 \\
        $B/eval_sft_bigrec_d3_w30 $B/eval_sft_bigrec_d3_w100
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path


def top_items(run: Path, k: int) -> dict[int, set[int]]:
    """Row -> its top-``k`` item ids."""
    out: dict[int, set[int]] = {}
    with (run / "rankings.jsonl").open(encoding="utf-8") as f:
        for n, line in enumerate(f, 1):
            rec = json.loads(line)
            if "item_ranking" not in rec:
                raise SystemExit(f"{run}/rankings.jsonl line {n}: no item_ranking")
            out[int(rec["row"])] = set(rec["item_ranking"][:k])
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("reference", type=Path)
    ap.add_argument("runs", type=Path, nargs="+")
    ap.add_argument("--k", type=int, default=10)
    args = ap.parse_args()
    ref = top_items(args.reference, args.k)
    print(f"| run | rows | mean top-{args.k} overlap with {args.reference.name} |\n|---|---|---|")
    for run in args.runs:
        lists = top_items(run, args.k)
        rows = sorted(set(lists) & set(ref))
        if not rows:
            raise SystemExit(f"{run}: no rows in common with {args.reference}")
        share = sum(len(lists[r] & ref[r]) for r in rows) / (args.k * len(rows))
        print(f"| {run.name} | {len(rows)} | {share:.2f} |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
