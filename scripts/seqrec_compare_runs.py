"""Per-seed table of two ``llmrec bench seqrec`` results (same model, seeds and data; one setting changed).

    python scripts/seqrec_compare_runs.py benchmarks/results/seqrec_ml100k_bench.json "stride 50 (default)" \
        runs/seqrec-bench-ml100k-stride25/seqrec_bench.json "stride 25" --model sasrec \
        --title "SASRec on ML-100K, training windows ..." --output benchmarks/results/seqrec_ml100k_stride25
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from llmrec.data.canonical import atomic_write_text


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("first")
    ap.add_argument("first_label")
    ap.add_argument("second")
    ap.add_argument("second_label")
    ap.add_argument("--model", default="sasrec")
    ap.add_argument("--title", default="")
    ap.add_argument("--output", required=True, help="writes <output>.md and <output>.json (a copy of the second)")
    args = ap.parse_args()
    both = [json.loads(Path(f).read_text())["runs"][args.model] for f in (args.first, args.second)]
    seeds = [sorted(r["seed"] for r in runs) for runs in both]
    if seeds[0] != seeds[1]:
        raise SystemExit(f"the two results hold different seeds of {args.model} ({seeds[0]} vs {seeds[1]}): "
                         "the means would not compare like with like")
    lines = [args.title, ""] if args.title else []
    lines += ["| setting | seed | valid NDCG@10 | test NDCG@10 | test HR@10 | best epoch |", "|---|---|---|---|---|---|"]
    for runs, label in zip(both, (args.first_label, args.second_label), strict=True):
        for r in runs:
            lines.append(f"| {label} | {r['seed']} | {r['valid']['ndcg@10']:.4f} | {r['test']['ndcg@10']:.4f} | "
                         f"{r['test']['hr@10']:.4f} | {r['best_epoch']} |")
        n = len(runs)
        lines.append(f"| {label} | mean | {sum(r['valid']['ndcg@10'] for r in runs) / n:.4f} | "
                     f"{sum(r['test']['ndcg@10'] for r in runs) / n:.4f} | "
                     f"{sum(r['test']['hr@10'] for r in runs) / n:.4f} | |")
    out = Path(args.output)
    out.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_text(Path(f"{out}.md"), "\n".join(lines) + "\n")
    atomic_write_text(Path(f"{out}.json"), Path(args.second).read_text(encoding="utf-8"))
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
