"""Held-out rewards of latent checkpoints: mean noise-free neg_ppl / log-likelihood of the true next title.

Ranking metrics on a few hundred rows see only a handful of hits, so they cannot tell a GRPO run from its SFT
start; the quantity GRPO optimises, measured on validation rows it never trained on, can. Each checkpoint (an
``llmrec sft`` or ``llmrec grpo`` output directory) is scored on the same seeded validation rows; the per-row
differences to the first checkpoint (the baseline) get a paired bootstrap 95% interval.

    python scripts/grpo_heldout_rewards.py runs/games-cmp/sft_latent runs/games-cmp/grpo_* --rows 500 \
        --output benchmarks/results/games_grpo_heldout_smollm2.json

``--rank-candidates K`` adds the discriminative side: the reciprocal rank and the softmax log-probability of the
true item among K items drawn per row (the target and K - 1 others, the same draw for every checkpoint).
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import tempfile
from pathlib import Path

# Per-row metrics compared between checkpoints, with their column titles.
METRICS = {"log_likelihood": "mean log-likelihood / token", "reciprocal_rank": "reciprocal rank",
           "candidate_log_softmax": "candidate log-softmax"}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("checkpoints", nargs="+", help="first = the baseline of the differences")
    ap.add_argument("--rows", type=int, default=500)
    ap.add_argument("--split", default="valid")
    ap.add_argument("--dtype", default="bfloat16")
    ap.add_argument("--seed", type=int, default=0, help="seed of the row subset")
    ap.add_argument("--rank-candidates", type=int, default=0,
                    help="also the target's reciprocal rank / log-softmax among this many sampled items (0 = off)")
    ap.add_argument("--rank-negatives", choices=["uniform", "popularity", "beam"], default="uniform",
                    help="how the other candidates are drawn (LatentGRPOConfig.rank_negatives); beam: mined once by "
                    "the first checkpoint's beam search, the same candidates for every checkpoint")
    ap.add_argument("--output", default=None)
    args = ap.parse_args()

    import numpy as np

    from llmrec.evaluation.metrics import paired_bootstrap_ci
    from llmrec.training.grpo import LatentGRPOConfig, LatentGRPOTrainer

    results, per_row = [], []
    row_identity: tuple = ()  # (dataset, row indices, target titles) the baseline scored
    mined: dict = {}  # rank_negatives=beam: the first checkpoint's beam-search items, reused by the others
    scratch = tempfile.mkdtemp(prefix="grpo_heldout_")
    for n, ckpt in enumerate(args.checkpoints):
        done = Path(ckpt) / ("grpo_results.json" if (Path(ckpt) / "grpo_results.json").exists() else "train_results.json")
        if not done.exists():
            if n == 0:
                raise SystemExit(f"{ckpt}: the baseline checkpoint has not finished training")
            print(f"skip {ckpt}: not a finished run", file=sys.stderr)
            continue
        # G = 2 (the minimum) and 8 prompts per batch: every member is the noise-free latent here.
        cand_kwargs = dict(reward_funcs=["neg_ppl", "candidate_log_softmax"], rank_candidates=args.rank_candidates,
                           rank_negatives=args.rank_negatives) if args.rank_candidates else {}
        cfg = LatentGRPOConfig(output_dir=f"{scratch}/{n}", sft_checkpoint=ckpt, model_dtype=args.dtype,
                               num_generations=2, per_device_train_batch_size=16, max_train_rows=8,
                               eval_rows=args.rows, eval_split=args.split, seed=args.seed, disable_tqdm=True, **cand_kwargs)
        trainer = LatentGRPOTrainer(cfg)
        if mined:
            # Every row's candidates as the first checkpoint mined them (a prompt this checkpoint encodes otherwise
            # has none: an error, not a silent search by this checkpoint's own model).
            trainer.beam_negatives = dict(mined)
            trainer._eval_rows = trainer._encode_split(trainer.latent_lm, args.split, args.rows)[0]
            for row in trainer._eval_rows:
                trainer.beam_negatives_for(args.split, row)
        full = trainer.evaluate_rewards(per_row=True)
        mined = mined or trainer.beam_negatives
        rows_of = full["per_row"]
        # Paired by position: the checkpoints must have scored the same rows of the same data (each reads the
        # dataset its SFT checkpoint recorded, and drops rows whose answer does not fit its max_length; a review:
        # two datasets' rows were given a "paired" interval).
        identity = (str(Path(trainer.prompt_settings()["dataset"]).resolve()), rows_of["row_index"],
                    rows_of["target_title"])
        if per_row and identity != row_identity:
            raise SystemExit(f"{ckpt}: scored other {args.split} rows than {args.checkpoints[0]} (dataset "
                             f"{identity[0]} vs {row_identity[0]}, or rows dropped for length): not paired")
        row_identity = identity
        per_row.append({k: np.array(v) for k, v in full.pop("per_row").items() if k in METRICS})
        results.append({"checkpoint": ckpt, **full})
        print(json.dumps(results[-1]), flush=True)
        del trainer
    shutil.rmtree(scratch, ignore_errors=True)
    base = per_row[0]
    for res, vals in zip(results[1:], per_row[1:]):
        for k in vals:
            d, lo, hi = paired_bootstrap_ci(vals[k], base[k], seed=0)
            res[f"{k}_diff_vs_first"] = {"diff": d, "ci95": [lo, hi]}
    out = {"split": args.split, "rows": results[0]["rows"], "row_seed": args.seed,
           "rank_candidates": args.rank_candidates or None,
           "rank_negatives": args.rank_negatives if args.rank_candidates else None, "results": results}
    if args.output:
        from llmrec.data.canonical import atomic_write_json, atomic_write_text

        shown = [k for k in METRICS if k in results[0]]
        drawn = {"popularity": "drawn by popularity", "uniform": "drawn uniformly",
                 "beam": "the first checkpoint's beam search"}[args.rank_negatives]
        cand = f" ({args.rank_candidates} candidates per row, {drawn})" if args.rank_candidates else ""
        lines = [f"Held-out rewards of the noise-free latent on {out['rows']} {args.split} rows (seed {args.seed}; "
                 "`python scripts/grpo_heldout_rewards.py ...`); first row = the baseline of the differences "
                 f"(paired bootstrap 95% intervals over rows){cand}:", "",
                 "| checkpoint | " + " | ".join(f"{METRICS[k]} | diff [95% CI]" for k in shown) + " | mean -PPL |",
                 "|---|" + "---|---|" * len(shown) + "---|"]
        for r in results:
            cells = []
            for k in shown:
                d = r.get(f"{k}_diff_vs_first")
                cells += [f"{r[k]:.4f}", f"{d['diff']:+.4f} [{d['ci95'][0]:+.4f}, {d['ci95'][1]:+.4f}]" if d else "-"]
            lines.append(f"| {r['checkpoint']} | " + " | ".join(cells) + f" | {r['neg_ppl']:.2f} |")
        atomic_write_text(Path(args.output).with_suffix(".md"), "\n".join(lines) + "\n")
        atomic_write_json(Path(args.output), out)
    print(json.dumps(out))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
