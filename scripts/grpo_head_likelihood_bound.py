"""What head-only training can do at best on the latent GRPO prompts: the exact likelihood gradient.

Every latent GRPO variant here trains the pooling head only (the paper's default) and is scored, on held-out
rows, by the log-likelihood of the true next title under the noise-free latent (``eval_rows``). This script
trains the same head on the same prompts, steps, optimiser and learning rate with the *exact* gradient of that
log-likelihood at the noise-free latent (plain supervised training of the head, no noise, no reward
estimation) and measures the same held-out quantity before and after. A reward-driven update of the head can at
best approximate this gradient, so if it does not raise the held-out likelihood, no GRPO variant of the head can.

    python scripts/grpo_head_likelihood_bound.py runs/games-cmp/sft_latent --lr 1e-4 1e-3 --prompts 128 \
        --steps 32 --eval-rows 300 --output-root runs/games-cmp --results benchmarks/results/games_head_bound_smollm2

``--objective candidate_softmax --rank-candidates K`` bounds the discriminative rewards instead (``reciprocal_rank``,
``candidate_log_softmax``): the exact gradient of the true item's log-softmax among the K items a GRPO run draws for
the prompt, measured on held-out rows by the same log-softmax and reciprocal rank among K items drawn per row.

Each learning rate writes an ``llmrec grpo``-style checkpoint (``<output-root>/head_ll_lr<lr>``; an existing
finished one is reused when it was made with the same settings, and refused otherwise: give another
``--output-root``), so ``llmrec evaluate --checkpoint`` can rank with it too; the results files get a paired
bootstrap interval of the held-out difference per run.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

# The settings of a finished run, written next to its per_row.json (runs made before it are read from their
# training_args.json, grpo_results.json and per_row.json: recorded_settings).
SETTINGS_NAME = "head_bound_args.json"


def run_settings(args: argparse.Namespace, lr: float) -> dict:
    """What a run of this script measured with: a finished run is reused only when all of it is the same."""
    out = {"sft_checkpoint": str(args.sft_checkpoint), "objective": args.objective, "train_lora": args.train_lora,
           "learning_rate": lr, "prompts": args.prompts, "steps": args.steps, "eval_rows": args.eval_rows,
           "seed": args.seed, "exclude_sft_rows": args.exclude_sft_rows, "dtype": args.dtype}
    if args.objective == "candidate_softmax":
        out.update(rank_candidates=args.rank_candidates, rank_negatives=args.rank_negatives)
    return out


def recorded_settings(out: Path, rows: dict) -> dict:
    """The settings a finished run in ``out`` was made with (``rows``: its per_row.json).

    Runs made before the script wrote ``SETTINGS_NAME``: from the trainer's training_args.json (the objective from
    its reward_funcs) and grpo_results.json; the recorded ``eval_rows`` is 0 there (the script measures the held-out
    rows itself), so the count of per-row values stands for it. A field its version of the config did not have yet
    had the behaviour of today's default.
    """
    import dataclasses

    from llmrec.training.grpo import LatentGRPOConfig

    if (out / SETTINGS_NAME).exists():
        return json.loads((out / SETTINGS_NAME).read_text())
    if not (out / "training_args.json").exists():
        return {}
    ta = {**{f.name: f.default for f in dataclasses.fields(LatentGRPOConfig) if f.default is not dataclasses.MISSING},
          **json.loads((out / "training_args.json").read_text())}
    res = json.loads((out / "grpo_results.json").read_text())
    per_row = next(iter(rows["before"].values())) if isinstance(rows["before"], dict) else rows["before"]
    cand = "candidate_log_softmax" in (ta.get("reward_funcs") or [])
    return {"sft_checkpoint": ta.get("sft_checkpoint"), "objective": "candidate_softmax" if cand else "likelihood",
            "train_lora": ta.get("train_lora"), "learning_rate": ta.get("learning_rate"),
            "prompts": ta.get("max_train_rows"), "steps": res.get("max_steps", res.get("global_step")),
            "eval_rows": ta.get("eval_rows") or len(per_row), "seed": ta.get("seed"),
            "exclude_sft_rows": ta.get("exclude_sft_rows"), "dtype": ta.get("model_dtype"),
            "rank_candidates": ta.get("rank_candidates"), "rank_negatives": ta.get("rank_negatives")}


def settings_differences(found: dict, asked: dict) -> list[str]:
    """``name: found X, asked Y`` for each asked setting the finished run was not made with."""

    def same(k: str, a, b) -> bool:
        if k == "sft_checkpoint" and a is not None:
            return str(a) == str(b) or Path(a).resolve() == Path(b).resolve()
        if isinstance(a, (int, float)) and isinstance(b, (int, float)) and not isinstance(a, bool):
            return float(a) == float(b)
        return a == b

    return [f"{k}: found {found[k]!r}, asked {v!r}" if k in found else f"{k}: not recorded, asked {v!r}"
            for k, v in asked.items() if k not in found or not same(k, found[k], v)]


def make_trainer_class(objective: str):
    import torch

    from llmrec.training.grpo import LatentGRPOTrainer
    from llmrec.training.rewards import RewardInputs, candidate_log_softmax

    class HeadBoundTrainer(LatentGRPOTrainer):
        """The GRPO trainer's loop, checkpoints and held-out check with one change: each optimiser step follows
        the exact gradient of the objective at the noise-free latent: the mean per-token log-likelihood of the
        true title (``likelihood``), or its log-softmax among the step's sampled candidates (``candidate_softmax``)."""

        def _objective(self, step: int, b, t) -> torch.Tensor:
            g = self.config.num_generations

            def zeros(latent: torch.Tensor) -> torch.Tensor:  # every member is the noise-free latent
                return torch.zeros(latent.shape[0] * g, latent.shape[-1], device=latent.device)

            if objective == "likelihood":
                lp = self.module(**t, noise_fn=zeros).logprobs
                lp = lp.view(-1, g, lp.shape[-1])[:, 0]  # member 0: the latent itself
                mask = t["completion_attention_mask"].float()
                return (lp * mask).sum(-1) / mask.sum(-1).clamp(min=1)
            latent = self.module(**t, noise_fn=zeros, latent_only=True).latent.float()
            scores, target = self._candidate_scores(step // self.steps_per_epoch, [self.rows[r] for r in b.rows],
                                                    b.rows, t, latent, 1, self.config.train_split)
            return candidate_log_softmax(RewardInputs(latent.new_zeros(len(b.rows), 1), latent.new_ones(len(b.rows), 1),
                                                      scores, target))

        def train_step(self, step: int) -> dict[str, float]:
            dev = self.accelerator.device
            batches = self.local_micro_batches(step)
            n_prompts = sum(len(b.rows) for b in batches)
            self.optimizer.zero_grad(set_to_none=True)
            self._current_beam_hits = []  # filled by _candidate_scores under rank_negatives=beam_current
            ll_sum = 0.0
            for b in batches:
                t = {k: getattr(b, k).to(dev) for k in ("prompt_input_ids", "prompt_attention_mask",
                                                        "completion_input_ids", "completion_attention_mask")}
                ll = self._objective(step, b, t)
                self.accelerator.backward(-ll.sum() / n_prompts)
                ll_sum += float(ll.detach().sum())
            stats = {"loss": -ll_sum / n_prompts, "reward": ll_sum / n_prompts}
            if self._current_beam_hits:
                stats["beam_current/target_in_beam"] = sum(self._current_beam_hits) / len(self._current_beam_hits)
            if self.config.max_grad_norm and self.config.max_grad_norm > 0:
                stats["grad_norm"] = float(self.accelerator.clip_grad_norm_(self.module.parameters(),
                                                                            self.config.max_grad_norm))
            self.optimizer.step()
            self.scheduler.step()
            stats["learning_rate"] = float(self.scheduler.get_last_lr()[0])
            return stats

    return HeadBoundTrainer


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("sft_checkpoint", help="the latent SFT checkpoint the GRPO runs started from")
    ap.add_argument("--lr", type=float, nargs="+", default=[1e-4, 1e-3])
    ap.add_argument("--prompts", type=int, default=128, help="train prompts (max_train_rows, seeded subset)")
    ap.add_argument("--steps", type=int, default=32, help="optimiser steps (one pass over the prompts)")
    ap.add_argument("--eval-rows", type=int, default=300)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--exclude-sft-rows", action="store_true",
                    help="prompts from train rows the SFT did not train on (LatentGRPOConfig.exclude_sft_rows)")
    ap.add_argument("--train-lora", action="store_true",
                    help="train the LoRA adapter too (LatentGRPOConfig.train_lora): the ceiling of a GRPO run that does")
    ap.add_argument("--objective", choices=["likelihood", "candidate_softmax"], default="likelihood")
    ap.add_argument("--rank-candidates", type=int, default=20,
                    help="candidate_softmax: items per prompt (target included), in training and held out")
    ap.add_argument("--rank-negatives", choices=["uniform", "popularity", "beam", "beam_current"], default="uniform",
                    help="candidate_softmax: how the other candidates are drawn (LatentGRPOConfig.rank_negatives)")
    ap.add_argument("--dtype", default="bfloat16")
    ap.add_argument("--output-root", default="runs/games-cmp")
    ap.add_argument("--results", default=None, help="writes <results>.json and <results>.md")
    args = ap.parse_args()
    if args.prompts % args.steps:
        raise SystemExit(f"--prompts {args.prompts} must be a multiple of --steps {args.steps}")
    if args.train_lora and args.objective == "candidate_softmax":
        # The candidates are scored on copies of the prompt's KV cache, which needs no gradient only when the LM is
        # frozen (llmrec.training.grpo.score_candidates).
        raise SystemExit("--objective candidate_softmax trains the head only: drop --train-lora")

    import numpy as np

    from llmrec.evaluation.metrics import paired_bootstrap_ci
    from llmrec.training.grpo import RESULTS_NAME, LatentGRPOConfig

    trainer_cls = make_trainer_class(args.objective)
    per_step = args.prompts // args.steps
    cand = args.objective == "candidate_softmax"
    main_metric = "candidate_log_softmax" if cand else "log_likelihood"
    cand_kwargs = dict(reward_funcs=["candidate_log_softmax"], rank_candidates=args.rank_candidates,
                       rank_negatives=args.rank_negatives) if cand else {}
    runs = []
    for lr in args.lr:
        kind = ("cls" + {"uniform": "", "popularity": "_pop", "beam": "_beam",
                          "beam_current": "_beamcur"}[args.rank_negatives]) if cand else "ll"
        out = Path(args.output_root) / f"{'lora' if args.train_lora else 'head'}_{kind}_lr{lr:g}"
        settings = run_settings(args, lr)
        if (out / RESULTS_NAME).exists() and (out / "per_row.json").exists():
            rows = json.loads((out / "per_row.json").read_text())
            diff = settings_differences(recorded_settings(out, rows), settings)
            if diff:
                raise SystemExit(f"{out} holds a finished run made with other settings ({'; '.join(diff)}): give "
                                 "another --output-root (or remove the directory to measure again)")
            res = json.loads((out / RESULTS_NAME).read_text())
            if isinstance(rows["before"], list):  # the likelihood-only layout of earlier runs
                rows = {when: {"log_likelihood": v} for when, v in rows.items()}
        else:
            # G = 2 (the minimum the trainer takes): member 1 is scored but unused. The rows, their order, AdamW,
            # the schedule and the clipping are the GRPO runs' (same seed, prompts and steps).
            cfg = LatentGRPOConfig(output_dir=str(out), sft_checkpoint=args.sft_checkpoint, model_dtype=args.dtype,
                                   num_generations=2, per_device_train_batch_size=2 * per_step,
                                   gradient_accumulation_steps=1, max_train_rows=args.prompts, num_train_epochs=1,
                                   learning_rate=lr, eval_rows=args.eval_rows, seed=args.seed, save_steps=8,
                                   exclude_sft_rows=args.exclude_sft_rows, train_lora=args.train_lora,
                                   retrain=False, **cand_kwargs)
            trainer = trainer_cls(cfg)
            before = trainer.evaluate_rewards(per_row=True)
            trainer.config.eval_rows = 0  # measured here, with per-row values, instead of inside train()
            res = trainer.train()
            trainer.config.eval_rows = args.eval_rows
            after = trainer.evaluate_rewards(per_row=True)
            rows = {"before": before["per_row"], "after": after["per_row"]}
            from llmrec.data.canonical import atomic_write_json

            atomic_write_json(out / SETTINGS_NAME, settings)  # before per_row.json, which marks the run finished
            atomic_write_json(out / "per_row.json", rows)
            del trainer
        metrics = {}
        for name in (m for m in ("log_likelihood", "reciprocal_rank", "candidate_log_softmax") if m in rows["after"]):
            post, pre = np.array(rows["after"][name]), np.array(rows["before"][name])
            d, lo, hi = paired_bootstrap_ci(post, pre, seed=0)
            metrics[name] = {"before": float(pre.mean()), "after": float(post.mean()), "diff": d, "ci95": [lo, hi]}
        # The top-level before/after/diff/ci95 are those of the trained objective's held-out measure.
        runs.append({"run": str(out), "lr": lr, "steps": res["global_step"], "prompts": res["prompts"],
                     **metrics[main_metric], "metrics": metrics, "train_seconds": res["train_seconds_this_run"]})
        print(json.dumps(runs[-1]), flush=True)
    if args.results:
        from llmrec.data.canonical import atomic_write_json, atomic_write_text

        base = Path(args.results)
        source = ("train rows the SFT never saw" if args.exclude_sft_rows else
                  f"seeded train subset, seed {args.seed}: the SFT's own rows when it used the same seed and >= as many")
        what = "Head + LoRA" if args.train_lora else "Head-only"
        if cand:
            drawn = {"popularity": "items drawn by popularity", "uniform": "items drawn uniformly",
                     "beam": "items (the starting model's beam search, topped up uniformly)",
                     "beam_current": "items (the current head's beam search at each step, topped up uniformly; "
                                     "held out: the starting model's)"}[args.rank_negatives]
            goal = (f"the exact gradient of the true item's log-softmax among {args.rank_candidates} {drawn} "
                    f"(`--objective candidate_softmax`)")
            measure = (f"the held-out log-softmax and reciprocal rank of the true item among {args.rank_candidates} "
                       "items drawn the same way per row, and the mean per-token log-likelihood of its title,")
        else:
            goal = "the exact likelihood gradient"
            measure = "held-out mean per-token log-likelihood of the true title"
        names = [m for m in ("log_likelihood", "reciprocal_rank", "candidate_log_softmax") if m in runs[0]["metrics"]]
        lines = [f"{what} training with {goal} (`python scripts/grpo_head_likelihood_bound.py"
                 f" {args.sft_checkpoint} ...`): {args.prompts} prompts ({source}), {args.steps} steps, {measure} "
                 f"under the noise-free latent on {args.eval_rows} validation rows "
                 "(paired bootstrap 95% interval of after - before):", "",
                 "| run | lr | " + " | ".join(f"{n} before | after | diff [95% CI]" for n in names) + " |",
                 "|---|---|" + "---|---|---|" * len(names)]
        for r in runs:
            cells = []
            for n in names:
                m = r["metrics"][n]
                cells += [f"{m['before']:.4f}", f"{m['after']:.4f}",
                          f"{m['diff']:+.4f} [{m['ci95'][0]:+.4f}, {m['ci95'][1]:+.4f}]"]
            lines.append(f"| {r['run']} | {r['lr']:g} | " + " | ".join(cells) + " |")
        atomic_write_text(base.with_suffix(".md"), "\n".join(lines) + "\n")
        atomic_write_json(base.with_suffix(".json"), {"sft_checkpoint": args.sft_checkpoint, "eval_rows":
                                                      args.eval_rows, "seed": args.seed, "prompts": args.prompts,
                                                      "steps": args.steps, "exclude_sft_rows": args.exclude_sft_rows,
                                                      "train_lora": args.train_lora, "objective": args.objective,
                                                      "rank_candidates": args.rank_candidates if cand else None,
                                                      "rank_negatives": args.rank_negatives if cand else None,
                                                      "runs": runs})
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
