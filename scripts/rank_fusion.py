"""Reciprocal rank fusion of two evaluations' ranked lists, written as an evaluation of its own.

A diagnostic for combining an LM with an ID model after the fact (D3 combines them inside the beam search, with a
weight chosen on validation rows): every item of either stored list scores ``sum over lists of 1 / (c + position)``
(position 1-based, ``c`` = 60 as in Cormack et al. 2009; equal weights, so nothing is tuned on the rows it is
measured on), ties by the smaller item id. Each run's stored list is used whole (beam search: its beams' items; an
ID model: its top max(ks) items), so the fused list is only scored at K <= 10, at item level (no title ranks);
its top 10 are stored, and the target's rank in the whole fused list.

The output directory holds ``results.json`` and ``rankings.jsonl`` like an ``llmrec evaluate`` run, on the rows the
two runs share, so ``llmrec compare`` pairs it with anything evaluated on those rows:

    B=benchmarks/results/pipeline_games_smollm2_runs
    python scripts/rank_fusion.py $B/eval_sft_bigrec $B/eval_sasrec --output runs/fusion/bigrec_sasrec_seed0
    llmrec compare $B/eval_sft_bigrec_d3_w100 runs/fusion/bigrec_sasrec_seed0 $B/eval_sft_bigrec $B/eval_sasrec
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from llmrec.data.canonical import atomic_directory, atomic_write_json, write_jsonl
from llmrec.evaluation.compare import load_rankings
from llmrec.evaluation.metrics import compute_metrics

KS = (1, 5, 10)


def fuse(lists: list[list[int]], c: float = 60.0) -> list[int]:
    """Items of ``lists`` ordered by reciprocal-rank-fusion score (ties: smaller item id first)."""
    score: dict[int, float] = {}
    for items in lists:
        for pos, item in enumerate(items, 1):
            score[item] = score.get(item, 0.0) + 1.0 / (c + pos)
    return sorted(score, key=lambda item: (-score[item], item))


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("run_a", type=Path, help="an `llmrec evaluate` output directory")
    ap.add_argument("run_b", type=Path, help="another one, on (some of) the same rows")
    ap.add_argument("--c", type=float, default=60.0, help="the fusion constant")
    ap.add_argument("--output", type=Path, required=True, help="directory to write (replaced if it exists)")
    args = ap.parse_args()

    first, second = load_rankings(args.run_a), load_rankings(args.run_b)
    rows = sorted(set(first) & set(second))
    if not rows:
        raise SystemExit(f"{args.run_a} and {args.run_b} share no rows")
    records, ranks = [], []
    for r in rows:
        a, b = first[r], second[r]
        # another split's or dataset's row of the same number: another target, or another user (where both record
        # one; the target alone let two users with the same targets fuse, a review), as ranking_overlap.py checks
        users = (a.get("user_id"), b.get("user_id"))
        if a["target_item_id"] != b["target_item_id"] or None not in users and users[0] != users[1]:
            raise SystemExit(f"row {r}: target {a['target_item_id']} (user {users[0]}) in {args.run_a}, "
                             f"{b['target_item_id']} (user {users[1]}) in {args.run_b}: not the same rows")
        fused = fuse([a["item_ranking"], b["item_ranking"]], args.c)
        target = a["target_item_id"]
        rank = fused.index(target) if target in fused else None  # 0-based, as the evaluator writes it
        ranks.append(rank)
        records.append({"row": r, "user_id": a.get("user_id"), "target_item_id": target, "item_ranking": fused[:max(KS)],
                        "item_rank": rank})
    metrics = compute_metrics(ranks, KS)
    with atomic_directory(args.output) as tmp:  # never a half-written run directory
        write_jsonl(tmp / "rankings.jsonl", records)
        atomic_write_json(tmp / "results.json", {
            "name": f"reciprocal rank fusion of {args.run_a} and {args.run_b}",
            "protocol": {"method": "rank_fusion", "runs": [str(args.run_a), str(args.run_b)], "c": args.c,
                         "rows": len(rows), "matching": ["item"]},
            "metrics": {"item": metrics},
        })
    print(json.dumps({"rows": len(rows), **{k: round(v, 6) for k, v in metrics.items() if not k.startswith("mrr")}}))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
