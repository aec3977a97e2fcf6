"""Does a latent GRPO update raise or lower the likelihood of the true title? The gradient check on a real model.

The fidelity review (benchmarks/README.md) derived that the paper's pathwise objective (``policy_logprob: target``)
is not the gradient of the expected reward: to second order in the noise its expected update is sigma^2 H g plus
the mean advantage times g (g, H: gradient and curvature of the true title's log-likelihood in the latent), and both
lower the likelihood where it is concave in the latent, as around the rows SFT trained on. This script measures
it on a real checkpoint instead of a quadratic: for each GRPO variant, on the same prompts,

- ``g_grpo``: the gradient of the trainer's own loss (``LatentGRPOTrainer``: its scoring, noise, rewards,
  advantages and loss) with respect to its trainable parameters, one optimiser step's worth, no update made;
- ``g_nll``: the exact gradient of minus the mean per-token log-likelihood of the true title under the noise-free
  latent, on the same prompts.

Descending the GRPO loss raises the likelihood to first order when ``cos(g_grpo, g_nll) > 0``. Reported per step,
and for the sums over all steps (the update of the whole run's prompts). AdamW's first update points along
``-sign(g_grpo)`` (its first moment over its second's square root), so ``cos(sign(g_grpo), g_nll)`` is reported
too.

    python scripts/grpo_gradient_direction.py runs/quickstart/sft_latent --prompts 64 --steps 4 \\
        --output benchmarks/results/grpo_gradient_direction_smollm2
"""

from __future__ import annotations

import argparse
import json
import tempfile
from pathlib import Path

# GRPO settings per variant (LatentGRPOConfig fields); "paper" is recipes/games/grpo_latent.yaml's objective.
VARIANTS: dict[str, dict] = {
    "paper": dict(advantage_mode="batch", noise_mode="absolute", noise_scale=1.5, policy_logprob="target"),
    "group": dict(advantage_mode="group", noise_mode="absolute", noise_scale=1.5, policy_logprob="target"),
    "relative0.3": dict(advantage_mode="batch", noise_mode="relative", noise_scale=0.3, policy_logprob="target"),
    "group_relative0.3": dict(advantage_mode="group", noise_mode="relative", noise_scale=0.3, policy_logprob="target"),
    "gaussian_group": dict(advantage_mode="group", noise_mode="relative", noise_scale=0.3, policy_logprob="gaussian"),
}


def cosine(a, b) -> float:
    import torch

    denom = float(a.norm() * b.norm())
    return float(torch.dot(a, b)) / denom if denom > 0 else float("nan")


def step_gradients(trainer, step: int) -> tuple[object, object, dict, int]:
    """``(g_grpo, g_nll, score stats, prompts)`` of optimiser step ``step``, flattened over the trainable parameters."""
    import torch

    params = [p for p in trainer.module.parameters() if p.requires_grad]

    def flat() -> torch.Tensor:
        return torch.cat([(p.grad if p.grad is not None else torch.zeros_like(p)).detach().float().flatten()
                          for p in params])

    batches = trainer.local_micro_batches(step)
    stats = trainer.score(step, batches)
    for p in params:
        p.grad = None
    for b in batches:
        loss, _ = trainer._loss(b)
        loss.backward()
    g_grpo = flat()
    for p in params:
        p.grad = None
    g = trainer.config.num_generations
    prompts = sum(len(b.rows) for b in batches)
    dev = trainer.accelerator.device

    def noise_free(latent: torch.Tensor) -> torch.Tensor:
        return torch.zeros(latent.shape[0] * g, latent.shape[-1], device=latent.device)

    for b in batches:
        t = {k: getattr(b, k).to(dev) for k in ("prompt_input_ids", "prompt_attention_mask",
                                                "completion_input_ids", "completion_attention_mask")}
        lp = trainer.module(**t, noise_fn=noise_free).logprobs
        lp = lp.view(-1, g, lp.shape[-1])[:, 0]  # member 0 of each group: the latent itself
        mask = t["completion_attention_mask"].float()
        ll = (lp * mask).sum(-1) / mask.sum(-1).clamp(min=1)
        (-ll.sum() / prompts).backward()
    g_nll = flat()
    for p in params:
        p.grad = None
    return g_grpo, g_nll, stats, prompts


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("sft_checkpoint", help="a latent SFT checkpoint (llmrec sft output_dir)")
    ap.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=list(VARIANTS))
    ap.add_argument("--prompts", type=int, default=64, help="train prompts (max_train_rows, seeded subset)")
    ap.add_argument("--steps", type=int, default=4, help="optimiser steps the prompts are split into")
    ap.add_argument("--group-size", type=int, default=8, help="num_generations G")
    ap.add_argument("--prompts-per-micro-batch", type=int, default=4)
    ap.add_argument("--dataset", default=None, help="default: the one the checkpoint was trained on")
    ap.add_argument("--dtype", default="float32")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--output", default=None, help="writes <output>.json and <output>.md")
    args = ap.parse_args()
    per_step = args.prompts // args.steps
    if args.prompts % args.steps or per_step % args.prompts_per_micro_batch:
        raise SystemExit("--prompts must split into --steps steps of whole micro-batches of "
                         "--prompts-per-micro-batch prompts")

    import torch

    from llmrec.training.grpo import LatentGRPOConfig, LatentGRPOTrainer

    results = []
    for name in args.variants:
        with tempfile.TemporaryDirectory() as out:
            extra = {"dataset": args.dataset} if args.dataset else {}
            cfg = LatentGRPOConfig(
                output_dir=out, sft_checkpoint=args.sft_checkpoint, model_dtype=args.dtype,
                num_generations=args.group_size,
                per_device_train_batch_size=args.group_size * args.prompts_per_micro_batch,
                gradient_accumulation_steps=per_step // args.prompts_per_micro_batch, max_train_rows=args.prompts,
                num_train_epochs=1, eval_rows=0, seed=args.seed, reward_funcs=["neg_ppl"], reward_weights=[1.0],
                **VARIANTS[name], **extra)
            trainer = LatentGRPOTrainer(cfg)
            sums = None
            steps = []
            for step in range(args.steps):
                g_grpo, g_nll, stats, prompts = step_gradients(trainer, step)
                sums = (g_grpo, g_nll) if sums is None else (sums[0] + g_grpo, sums[1] + g_nll)
                steps.append({"step": step, "prompts": prompts, "cos": cosine(g_grpo, g_nll),
                              "adam_first_step_cos": cosine(torch.sign(g_grpo), g_nll),
                              "grpo_grad_norm": float(g_grpo.norm()), "nll_grad_norm": float(g_nll.norm()),
                              "stats": {k: v for k, v in stats.items() if isinstance(v, (int, float))}})
                print(json.dumps({"variant": name, **{k: v for k, v in steps[-1].items() if k != "stats"}}),
                      flush=True)
            trainable = sum(p.numel() for p in trainer.module.parameters() if p.requires_grad)
            results.append({"variant": name, "settings": VARIANTS[name], "trainable_parameters": trainable,
                            "cos_of_sums": cosine(*sums), "adam_first_step_cos_of_sums": cosine(torch.sign(sums[0]),
                                                                                                  sums[1]),
                            "mean_step_cos": sum(s["cos"] for s in steps) / len(steps), "steps": steps})
            print(json.dumps({k: v for k, v in results[-1].items() if k != "steps"}), flush=True)
            del trainer
    if args.output:
        from llmrec.data.canonical import atomic_write_json, atomic_write_text

        base = Path(args.output)
        record = {"sft_checkpoint": args.sft_checkpoint, "dataset": args.dataset, "prompts": args.prompts,
                  "steps": args.steps, "group_size": args.group_size, "dtype": args.dtype, "seed": args.seed,
                  "reward_funcs": ["neg_ppl"], "results": results}
        lines = [f"Latent GRPO gradient vs the exact likelihood gradient (`python scripts/grpo_gradient_direction.py "
                 f"{args.sft_checkpoint} --prompts {args.prompts} --steps {args.steps} --variants "
                 f"{' '.join(args.variants)}`; G = {args.group_size}, "
                 f"{args.dtype}, reward neg_ppl, seed {args.seed}). cos > 0: descending the GRPO loss raises the "
                 "noise-free log-likelihood of the true title (first order).", "",
                 "| variant | settings | cos (all prompts) | AdamW first step cos | per-step cos |",
                 "|---|---|---|---|---|"]
        for r in results:
            settings = ", ".join(f"{k} {v}" for k, v in r["settings"].items())
            per = " / ".join(f"{s['cos']:+.3f}" for s in r["steps"])
            lines.append(f"| {r['variant']} | {settings} | {r['cos_of_sums']:+.3f} | "
                         f"{r['adam_first_step_cos_of_sums']:+.3f} | {per} |")
        atomic_write_text(base.with_suffix(".md"), "\n".join(lines) + "\n")
        atomic_write_json(base.with_suffix(".json"), record)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
