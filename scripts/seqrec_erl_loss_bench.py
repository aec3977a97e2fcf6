"""ReaRec-ERL training step with the fused chunked loss vs unchunked and plain forms, side by side on real batches.

    python scripts/seqrec_erl_loss_bench.py --dataset /tmp/prep/games --reps 5 \
        --output benchmarks/results/seqrec_erl_loss_games.json

Both forms run the same model, weights and batches (recipes/seqrec/rearec-erl_games.yaml's settings, first
``--reps`` training batches of the seeded shuffle), interleaved so machine noise hits all alike: ``fused`` (the
default, cache-sized chunks), ``one_chunk`` (the same closed form over the whole batch at once, as before the
chunking: every ``[M, K+1, N]`` pass goes to memory) and ``plain`` (autograd over the pairwise-KL loop, the tests'
reference); SASRec's step on the same batches is timed beside them for scale. Also checks on one batch that both forms give the same
loss and gradients (fp32). The last line printed is the JSON written to ``--output``.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--dataset", required=True, help="prepared dataset directory (e.g. the Games time split)")
    ap.add_argument("--recipe", default="recipes/seqrec/rearec-erl_games.yaml")
    ap.add_argument("--reps", type=int, default=5, help="timed batches per form (after one warm-up batch)")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--output", default=None)
    args = ap.parse_args()

    import torch

    from llmrec.config import read_recipe
    from llmrec.data.canonical import atomic_write_json, atomic_write_text
    from llmrec.seqrec.config import SeqRecConfig
    from llmrec.seqrec.data import load_seqrec_data
    from llmrec.seqrec.erl_loss import fused_erl_loss
    from llmrec.seqrec.models import LossContext, build_model

    torch.set_num_threads(args.threads)
    fields = {**read_recipe(args.recipe), "dataset_dir": args.dataset}
    cfg = SeqRecConfig(**fields)
    data = load_seqrec_data(cfg.dataset_dir, cfg.max_history, cfg.train_mode, cfg.window_stride)
    ex = data.train
    perm = torch.randperm(len(ex), generator=torch.Generator().manual_seed(cfg.seed))
    bs = cfg.batch_size

    def batch(i: int) -> dict:
        idx = perm[i * bs:(i + 1) * bs]
        return {"input_ids": ex.inputs[idx], "target_ids": ex.targets[idx]}

    torch.manual_seed(cfg.seed)
    erl = build_model(cfg, data.num_items).train()
    sasrec = build_model(SeqRecConfig(**{**fields, "model": "sasrec"}), data.num_items).train()
    plain = build_model(cfg, data.num_items).train()
    plain.load_state_dict(erl.state_dict())
    plain._erl_loss = plain._erl_loss_reference  # the plain autograd form (instance attribute shadows the method)
    one_chunk = build_model(cfg, data.num_items).train()
    one_chunk.load_state_dict(erl.state_dict())
    bb = one_chunk.backbone
    one_chunk._erl_loss = lambda R, t, denom: fused_erl_loss(
        R, bb.item_emb.weight[1:], t - 1, bb.temperature, one_chunk.kl_weight, one_chunk.kl_cap, denom,
        chunk_elements=1 << 62)

    def step(model, b) -> float:
        ctx = LossContext(denom=float((b["target_ids"] > 0).sum()), epoch=0)
        t0 = time.perf_counter()
        model.zero_grad(set_to_none=True)
        loss, _ = model(b, ctx)
        loss.backward()
        return time.perf_counter() - t0

    # Exactness on one batch: the two forms share weights; dropout off so the forwards are identical.
    b0 = batch(0)
    grads = {}
    for name, model in (("fused", erl), ("plain", plain)):
        model.eval()
        model.zero_grad(set_to_none=True)
        loss, _ = model(b0, LossContext(denom=float((b0["target_ids"] > 0).sum())))
        loss.backward()
        grads[name] = (float(loss.detach()), {n: p.grad.clone() for n, p in model.named_parameters()
                                              if p.grad is not None})
        model.train()
    max_rel = max(float((grads["fused"][1][n] - g).abs().max() / g.abs().max().clamp_min(1e-30))
                  for n, g in grads["plain"][1].items())
    times: dict[str, list[float]] = {"fused": [], "one_chunk": [], "plain": [], "sasrec": []}
    for i in range(args.reps + 1):
        b = batch(i + 1)
        for name, model in (("fused", erl), ("one_chunk", one_chunk), ("plain", plain), ("sasrec", sasrec)):
            t = step(model, b)
            if i > 0:  # the first round warms up
                times[name].append(t)
    med = {k: statistics.median(v) for k, v in times.items()}
    result = {
        "dataset": args.dataset, "recipe": args.recipe, "batch_size": bs, "num_items": data.num_items,
        "reps": args.reps, "threads": args.threads,
        "fused_step_s": med["fused"], "one_chunk_step_s": med["one_chunk"], "plain_step_s": med["plain"],
        "sasrec_step_s": med["sasrec"], "fused_over_one_chunk": med["fused"] / med["one_chunk"],
        "fused_over_plain": med["fused"] / med["plain"], "fused_over_sasrec": med["fused"] / med["sasrec"],
        "plain_over_sasrec": med["plain"] / med["sasrec"],
        "loss_fused": grads["fused"][0], "loss_plain": grads["plain"][0], "max_rel_grad_diff": max_rel,
    }
    print(f"ERL step (median of {args.reps}): fused {med['fused']:.3f} s, one chunk {med['one_chunk']:.3f} s, "
          f"plain {med['plain']:.3f} s (fused/one chunk {result['fused_over_one_chunk']:.2f}, fused/plain "
          f"{result['fused_over_plain']:.2f}); SASRec {med['sasrec']:.3f} s")
    if args.output:
        out = Path(args.output)
        atomic_write_json(out, result)
        atomic_write_text(out.with_suffix(".md"), "\n".join([
            f"ReaRec-ERL training step on {args.dataset} ({data.num_items:,} items, batch {bs}, {args.threads} thread, "
            f"median of {args.reps} batches, interleaved; `python scripts/seqrec_erl_loss_bench.py`):", "",
            "| fused (chunked) | one chunk | plain autograd | SASRec | fused / one chunk | fused / plain | "
            "fused / SASRec | max rel. grad diff vs plain |",
            "|---|---|---|---|---|---|---|---|",
            f"| {med['fused']:.3f} s | {med['one_chunk']:.3f} s | {med['plain']:.3f} s | {med['sasrec']:.3f} s | "
            f"{result['fused_over_one_chunk']:.2f} | {result['fused_over_plain']:.2f} | "
            f"{result['fused_over_sasrec']:.2f} | {max_rel:.1e} |"]) + "\n")
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
