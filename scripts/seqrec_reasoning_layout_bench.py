"""ReaRec training steps with reasoning over the target prefixes only vs over every position, side by side.

    python scripts/seqrec_reasoning_layout_bench.py --dataset data/games --recipe 'recipes/seqrec/{model}_games.yaml' \
        --reps 5 --output benchmarks/results/seqrec_reasoning_layout_games.json

In sequence-mode training every position of a window with a next item is a prefix to reason from. ``pairs`` (the
default, ``ReaRec.reason``) runs the K reasoning tokens of exactly those prefixes, each over its own row's cached
item keys; ``dense`` (``ReaRec.reason_dense``, the form training used before) runs them for every position of every
row at once, padding included, and picks the read ones out. Per model (its recipe, ``--dataset`` and
``--window_stride`` as given), the same weights and batches (the first ``--reps`` of the seeded shuffle) go through
both, interleaved so machine noise hits them alike; the step is forward + backward of the whole loss at an epoch past
PRL's warm-up (its noisy view on), each form first in every other round. Also checks on one batch, dropout off, that
both give the same loss and gradients (fp32; the noisy view on, its noise too small to change a token: the tests
check PRL's ``base`` separately). The last line printed is the JSON written to ``--output`` (with a markdown table
beside it).
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--dataset", required=True, help="prepared dataset directory")
    ap.add_argument("--models", default="rearec-erl,rearec-prl")
    ap.add_argument("--recipe", default="recipes/seqrec/{model}_games.yaml")
    ap.add_argument("--window_stride", type=int, default=None, help="override the recipes' window_stride")
    ap.add_argument("--reps", type=int, default=5, help="timed batches per form (after one warm-up batch)")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--output", default=None)
    args = ap.parse_args()

    import torch

    from llmrec.config import read_recipe
    from llmrec.data.canonical import atomic_write_json, atomic_write_text
    from llmrec.seqrec.config import SeqRecConfig
    from llmrec.seqrec.data import load_seqrec_data
    from llmrec.seqrec.models import LossContext, build_model

    torch.set_num_threads(args.threads)
    forms = ("pairs", "dense")
    results = {}
    for name in [m.strip() for m in args.models.split(",") if m.strip()]:
        recipe = args.recipe.format(model=name)
        fields = {**read_recipe(recipe), "dataset_dir": args.dataset}
        if args.window_stride is not None:
            fields["window_stride"] = args.window_stride
        cfg = SeqRecConfig(**fields)
        data = load_seqrec_data(cfg.dataset_dir, cfg.max_history, cfg.train_mode, cfg.window_stride)
        ex = data.train
        perm = torch.randperm(len(ex), generator=torch.Generator().manual_seed(cfg.seed))

        def batch(i: int, ex=ex, perm=perm, bs=cfg.batch_size) -> dict:
            idx = perm[i * bs:(i + 1) * bs]
            return {"input_ids": ex.inputs[idx], "target_ids": ex.targets[idx], "row_index": ex.row_index[idx]}

        torch.manual_seed(cfg.seed)
        model = build_model(cfg, data.num_items)

        def step(layout: str, b: dict, model=model) -> tuple[float, dict]:
            model.reasoning_layout = layout
            model.zero_grad(set_to_none=True)
            torch.manual_seed(0)
            loss = model(b, LossContext(denom=float((b["target_ids"] > 0).sum()), epoch=100))[0]
            loss.backward()
            return float(loss.detach()), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}

        # Exactness on one batch: dropout off, PRL's noise too small to change a token (its contrastive view on,
        # equal to the clean one) and its contrastive rows not subsampled (a random draw, other in each form).
        model.eval()
        kept = model.noise_std, model.cl_max_rows
        model.noise_std, model.cl_max_rows = (1e-30 if model.noise_std > 0 else 0.0), 1 << 30
        (loss_p, grads_p), (loss_d, grads_d) = (step(f, batch(0)) for f in forms)
        model.noise_std, model.cl_max_rows = kept
        if grads_p.keys() != grads_d.keys():
            raise RuntimeError(f"the forms train different parameters: {sorted(grads_p.keys() ^ grads_d.keys())}")
        max_rel = max(float((grads_p[n] - g).abs().max() / g.abs().max().clamp_min(1e-30)) for n, g in grads_d.items())
        model.train()
        times: dict[str, list[float]] = {f: [] for f in forms}
        read = []
        for i in range(args.reps + 1):
            b = batch(i + 1)
            for f in (forms if i % 2 else forms[::-1]):  # each form first in every other round
                t0 = time.perf_counter()
                step(f, b)
                if i > 0:  # the first round warms up
                    times[f].append(time.perf_counter() - t0)
            if i > 0:
                read.append(int((b["target_ids"] > 0).sum()))
        med = {f: statistics.median(v) for f, v in times.items()}
        results[name] = {"recipe": recipe, "batch_size": cfg.batch_size, "window_stride": cfg.window_stride,
                         "prefixes_read_per_batch": statistics.fmean(read),
                         "positions_per_batch": cfg.batch_size * cfg.max_history,
                         **{f"{f}_step_s": v for f, v in med.items()}, "pairs_over_dense": med["pairs"] / med["dense"],
                         "loss_pairs": loss_p, "loss_dense": loss_d, "max_rel_grad_diff": max_rel}
        r = results[name]
        print(f"{name}: pairs {med['pairs']:.3f} s, dense {med['dense']:.3f} s (pairs/dense {r['pairs_over_dense']:.2f}; "
              f"{r['prefixes_read_per_batch']:.0f} of {r['positions_per_batch']} positions read); loss {loss_p:.6g} vs "
              f"{loss_d:.6g}, max rel grad diff {max_rel:.1e}", flush=True)
    out = {"dataset": args.dataset, "reps": args.reps, "threads": args.threads, "models": results}
    if args.output:
        path = Path(args.output)
        command = (f"python scripts/seqrec_reasoning_layout_bench.py --dataset {args.dataset} --models {args.models} "
                   f"--recipe '{args.recipe}' "
                   + (f"--window_stride {args.window_stride} " if args.window_stride is not None else "")
                   + f"--reps {args.reps} --threads {args.threads} --output {args.output}")
        lines = [f"ReaRec training step (forward + backward, PRL's noisy view on) on {args.dataset}, reasoning over the "
                 f"target prefixes only (pairs) vs over every position of every row (dense, the earlier form); "
                 f"{args.threads} thread, median of {args.reps} batches, forms interleaved (`{command}`):", "",
                 "| model | batch | prefixes read / positions (mean) | pairs | dense | pairs / dense | loss pairs / dense "
                 "| max rel. grad diff |",
                 "|---|---|---|---|---|---|---|---|"]
        for name, r in results.items():
            lines.append(f"| {name} | {r['batch_size']} | {r['prefixes_read_per_batch']:,.0f} / "
                         f"{r['positions_per_batch']:,} | {r['pairs_step_s']:.3f} s | {r['dense_step_s']:.3f} s | "
                         f"{r['pairs_over_dense']:.2f} | {r['loss_pairs']:.6g} / {r['loss_dense']:.6g} | "
                         f"{r['max_rel_grad_diff']:.1e} |")
        atomic_write_text(path.with_suffix(".md"), "\n".join(lines) + "\n")
        atomic_write_json(path, out)
    print(json.dumps(out))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
