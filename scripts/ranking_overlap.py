"""How much of one evaluation's top-K lists another shares, row by row (e.g. D3 decoding against its ID model).

Each argument is an ``llmrec evaluate`` output directory (its ``rankings.jsonl``); the first is the reference.
For every other run it prints the mean over the shared rows of |top-K items of the run ∩ top-K items of the
reference| / min(K, the shorter of the two lists) (item level, as the metrics: a title shared by several items
counts as those items; a list may hold fewer than K items), and how the
two runs' hits@K overlap: rows hit by the run, by the reference, by both, by either (the per-row oracle of the two;
far above both alone means the runs are complementary):

    B=benchmarks/results/pipeline_games_smollm2_runs
    python scripts/ranking_overlap.py $B/eval_sasrec $B/eval_sft_bigrec $B/eval_sft_bigrec_d3_w3 \\
        $B/eval_sft_bigrec_d3_w30 $B/eval_sft_bigrec_d3_w100
"""

from __future__ import annotations

import argparse
from pathlib import Path


def top_items(run: Path, k: int) -> dict[int, tuple[set[int], bool, int, str | None]]:
    """Row -> (its top-``k`` item ids, whether the target is among them, the target item id, the user id).

    Read by :func:`llmrec.evaluation.compare.load_rankings`, whose checks name a damaged file's line and refuse a
    row given twice (read here line by line, the last record won)."""
    from llmrec.evaluation.compare import load_rankings

    out: dict[int, tuple[set[int], bool, int, str | None]] = {}
    for row, rec in load_rankings(run).items():
        if "item_ranking" not in rec:
            raise SystemExit(f"{run}/rankings.jsonl row {row}: no item_ranking")
        rank = rec["item_rank"]  # 0-based, as the metrics; None: not in the list
        user = rec.get("user_id")
        out[row] = (set(rec["item_ranking"][:k]), rank is not None and rank < k, int(rec["target_item_id"]),
                    None if user is None else str(user))
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("reference", type=Path)
    ap.add_argument("runs", type=Path, nargs="+")
    ap.add_argument("--k", type=int, default=10)
    ap.add_argument("--markdown", type=Path, default=None, help="also write the table here (atomically)")
    args = ap.parse_args()
    ref = top_items(args.reference, args.k)
    k, name = args.k, args.reference.name
    lines = [f"| run | rows | mean top-{k} overlap with {name} | hits@{k} | {name} hits | both | either |",
             "|---|---|---|---|---|---|---|"]
    for run in args.runs:
        lists = top_items(run, k)
        rows = sorted(set(lists) & set(ref))
        if not rows:
            raise SystemExit(f"{run}: no rows in common with {args.reference}")
        # the same row number of another split or dataset: another target, or another user (where both record one)
        other = [r for r in rows if lists[r][2] != ref[r][2]
                 or None not in (lists[r][3], ref[r][3]) and lists[r][3] != ref[r][3]]
        if other:
            raise SystemExit(f"{run}: row {other[0]} has target {lists[other[0]][2]} (user {lists[other[0]][3]}), "
                             f"{args.reference} has {ref[other[0]][2]} (user {ref[other[0]][3]}): not the same rows")
        # Per row over the shorter list's length (a list may hold fewer than k items).
        share = sum(len(lists[r][0] & ref[r][0]) / max(1, min(k, len(lists[r][0]), len(ref[r][0]))) for r in rows) / len(rows)
        hit, ref_hit = [lists[r][1] for r in rows], [ref[r][1] for r in rows]
        both = sum(a and b for a, b in zip(hit, ref_hit))
        either = sum(a or b for a, b in zip(hit, ref_hit))
        lines.append(f"| {run.name} | {len(rows)} | {share:.2f} | {sum(hit)} | {sum(ref_hit)} | {both} | {either} |")
    print("\n".join(lines))
    if args.markdown:
        from llmrec.data.canonical import atomic_write_text

        runs = " ".join(str(r) for r in (args.reference, *args.runs))
        atomic_write_text(args.markdown, f"Top-{k} overlap (`python scripts/ranking_overlap.py {runs}`):\n\n"
                          + "\n".join(lines) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
