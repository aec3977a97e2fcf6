"""Training steps of the ID models with the fused chunked losses vs their plain forms, side by side on real batches.

    python scripts/seqrec_fused_loss_bench.py --dataset data/games --models sasrec,rearec-erl,rearec-prl,lares \
        --reps 5 --output benchmarks/results/seqrec_fused_loss_games.json

Per model (recipes/seqrec/<model>_games.yaml's settings), the same weights and the same batches (the first
``--reps`` training batches of the seeded shuffle) go through, interleaved so machine noise hits every form alike:

* ``fused`` -- the default (llmrec.seqrec.fused_losses, cache-sized chunks);
* ``plain`` -- the plain autograd form: ``F.cross_entropy`` over the full logits (what the models used before) and,
  for ReaRec-ERL, the pairwise-KL loop (the tests' reference);
* ``one_chunk`` (ERL only) -- the fused closed form over the whole batch at once, i.e. the previous ERL
  implementation's cost (closed-form KL with its own backward, every ``[M, K+1, N]`` pass in main memory).

Also checks on one batch, dropout off, that fused and plain give the same loss and gradients (fp32). The last line
printed is the JSON written to ``--output`` (with a markdown table beside it).
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
import types
from pathlib import Path


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--dataset", required=True, help="prepared dataset directory (e.g. the Games time split)")
    ap.add_argument("--models", default="sasrec,rearec-erl,rearec-prl,lares")
    ap.add_argument("--recipe", default="recipes/seqrec/{model}_games.yaml")
    ap.add_argument("--reps", type=int, default=5, help="timed batches per form (after one warm-up batch)")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--output", default=None)
    args = ap.parse_args()

    import torch
    import torch.nn.functional as F

    from llmrec.config import read_recipe
    from llmrec.data.canonical import atomic_write_json, atomic_write_text
    from llmrec.seqrec.config import SeqRecConfig
    from llmrec.seqrec.data import load_seqrec_data
    from llmrec.seqrec.fused_losses import fused_erl_loss
    from llmrec.seqrec.models import LossContext, build_model

    torch.set_num_threads(args.threads)

    def plain_ce_sum(self, h, targets, temperature=None):
        return F.cross_entropy(self.backbone.item_logits(h, temperature), targets - 1, reduction="sum")

    loaded: dict[tuple, object] = {}
    results = {}
    for name in [m.strip() for m in args.models.split(",") if m.strip()]:
        recipe = args.recipe.format(model=name)
        cfg = SeqRecConfig(**{**read_recipe(recipe), "dataset_dir": args.dataset})
        key = (cfg.max_history, cfg.train_mode, cfg.window_stride)
        if key not in loaded:
            loaded[key] = load_seqrec_data(cfg.dataset_dir, *key)
        data = loaded[key]
        ex = data.train
        perm = torch.randperm(len(ex), generator=torch.Generator().manual_seed(cfg.seed))
        bs = cfg.batch_size

        def batch(i: int, ex=ex, perm=perm, bs=bs) -> dict:
            idx = perm[i * bs:(i + 1) * bs]
            return {"input_ids": ex.inputs[idx], "target_ids": ex.targets[idx], "row_index": ex.row_index[idx]}

        torch.manual_seed(cfg.seed)
        forms = {"fused": build_model(cfg, data.num_items)}
        forms["plain"] = build_model(cfg, data.num_items)
        forms["plain"].load_state_dict(forms["fused"].state_dict())
        forms["plain"].ce_sum = types.MethodType(plain_ce_sum, forms["plain"])
        if name == "rearec-erl":
            forms["plain"]._erl_loss = forms["plain"]._erl_loss_reference
            one = forms["one_chunk"] = build_model(cfg, data.num_items)
            one.load_state_dict(forms["fused"].state_dict())
            one._erl_loss = lambda R, t, denom, m=one: fused_erl_loss(
                R, m.backbone.item_emb.weight[1:], t - 1, m.backbone.temperature, m.kl_weight, m.kl_cap, denom,
                chunk_elements=1 << 62)

        def loss_of(model, b, epoch):
            torch.manual_seed(0)  # the same noise / depth draws for every form
            return model(b, LossContext(denom=float((b["target_ids"] > 0).sum()), epoch=epoch))[0]

        # Exactness on one batch (dropout off: identical forwards). Epoch past every warm-up: all terms active.
        b0 = batch(0)
        grads = {}
        for f in ("fused", "plain"):
            m = forms[f].eval()
            m.zero_grad(set_to_none=True)
            loss = loss_of(m, b0, 100)
            loss.backward()
            grads[f] = (float(loss.detach()), {n: p.grad.clone() for n, p in m.named_parameters() if p.grad is not None})
        max_rel = max(float((grads["fused"][1][n] - g).abs().max() / g.abs().max().clamp_min(1e-30))
                      for n, g in grads["plain"][1].items())
        times: dict[str, list[float]] = {f: [] for f in forms}
        for m in forms.values():
            m.train()
        for i in range(args.reps + 1):
            b = batch(i + 1)
            for f, m in forms.items():
                t0 = time.perf_counter()
                m.zero_grad(set_to_none=True)
                loss_of(m, b, 100).backward()
                if i > 0:  # the first round warms up
                    times[f].append(time.perf_counter() - t0)
        med = {f: statistics.median(v) for f, v in times.items()}
        results[name] = {"recipe": recipe, "batch_size": bs, **{f"{f}_step_s": v for f, v in med.items()},
                         "fused_over_plain": med["fused"] / med["plain"],
                         **({"fused_over_one_chunk": med["fused"] / med["one_chunk"]} if "one_chunk" in med else {}),
                         "loss_fused": grads["fused"][0], "loss_plain": grads["plain"][0], "max_rel_grad_diff": max_rel}
        print(f"{name}: " + ", ".join(f"{f} {v:.3f} s" for f, v in med.items())
              + f" (fused/plain {results[name]['fused_over_plain']:.2f}); max rel grad diff {max_rel:.1e}", flush=True)
    num_items = next(iter(loaded.values())).num_items if loaded else None
    out = {"dataset": args.dataset, "num_items": num_items, "reps": args.reps,
           "threads": args.threads, "models": results}
    if args.output:
        path = Path(args.output)
        command = (f"python scripts/seqrec_fused_loss_bench.py --dataset {args.dataset} --models {args.models} "
                   + (f"--recipe {args.recipe} " if args.recipe != ap.get_default("recipe") else "")
                   + f"--reps {args.reps} --threads {args.threads} --output {args.output}")
        lines = [f"Training step per model on {args.dataset} ({out['num_items']:,} items; each model's Games recipe, "
                 f"{args.threads} thread, median of {args.reps} batches, forms interleaved; "
                 f"`{command}`). plain = F.cross_entropy over the full logits (ERL: "
                 "the pairwise-KL loop); one chunk = ERL's closed form unchunked (its previous implementation):", "",
                 "| model | fused | plain | one chunk | fused / plain | fused / one chunk | max rel. grad diff |",
                 "|---|---|---|---|---|---|---|"]
        for name, r in results.items():
            one = f"{r['one_chunk_step_s']:.3f} s" if "one_chunk_step_s" in r else "-"
            ratio = f"{r['fused_over_one_chunk']:.2f}" if "fused_over_one_chunk" in r else "-"
            lines.append(f"| {name} | {r['fused_step_s']:.3f} s | {r['plain_step_s']:.3f} s | {one} | "
                         f"{r['fused_over_plain']:.2f} | {ratio} | {r['max_rel_grad_diff']:.1e} |")
        atomic_write_text(path.with_suffix(".md"), "\n".join(lines) + "\n")
        atomic_write_json(path, out)
    print(json.dumps(out))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
