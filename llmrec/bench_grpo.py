"""``llmrec bench grpo``: one latent-GRPO step, our shared-prefix form vs the naive per-member form.

    llmrec bench grpo --model smollm2-135m --group-size 8 --output benchmarks/results/grpo_smollm2.json

A step is what the trainer does per micro-batch: score the G members without gradients, then the
loss forward and backward (pooling head trainable, LLM frozen: the paper's setting; ``--train-lora``
adds LoRA adapters). Both forms run on the same batches, interleaved, in ``--dtype`` (bf16 by default).

The naive form is the paper's, member by member: two passes over the whole row [prompt, latent, completion]
(:meth:`LatentReasoningLM.forward_naive`), the first pooling the latent (it also computes the completion columns,
which a causal LM cannot let reach the pooled latent: ~C/(P+C) of that pass is work a prompt-only pass would
skip), the second scoring it, for every member (the pooled latent is the same for all of a group's members, so
a per-member form that pooled once per prompt would do less: the benchmark review measured ours at ~0.19 of such
a form, against ~0.11 of this one). Both forms project only the scored positions to the vocabulary
(until 2026-12-06 the naive form projected every position, ~8% of its step). ``ours_over_naive`` is the ratio of
the median step times; ``ours_over_naive_paired`` the median of the per-step ratios (each step times both forms
back to back).

Exactness, in float32 on the first batch: ``max_rel_grad_diff_vs_naive`` is, over the trainable tensors, the
largest ``max|g_ours - g_naive| / max|g_naive|`` (a per-tensor infinity-norm ratio, not an element-wise one).
The last line of output is JSON.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time

import torch

from llmrec.bench_latent_sft import make_batches, nan_max
from llmrec.bench_options import add_grpo_arguments as add_arguments  # noqa: F401
from llmrec.models.backbone import load_backbone
from llmrec.models.latent import LatentConfig, LatentReasoningLM, add_latent_tokens
from llmrec.training.grpo import LatentGRPOModule, member_noise


def _build(args, dtype: str) -> tuple[LatentGRPOModule, object]:
    model, tok = load_backbone(args.model, dtype=dtype)
    cfg = LatentConfig(num_latent_tokens=1)
    add_latent_tokens(tok, model, cfg)
    for p in model.parameters():
        p.requires_grad_(False)
    if args.train_lora:
        from peft import LoraConfig, get_peft_model

        torch.manual_seed(args.seed)
        model = get_peft_model(model, LoraConfig(r=8, lora_alpha=16, lora_dropout=0.0, init_lora_weights=False,
                                                 target_modules=["q_proj", "k_proj", "v_proj", "o_proj"]))
    torch.manual_seed(args.seed + 1)
    lm = LatentReasoningLM(model, cfg)
    lm.eval()  # no dropout: both forms see the same function
    pad = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id
    return LatentGRPOModule(lm, args.group_size, naive=False, pad_token_id=pad), tok


def _inputs(args, batch: dict[str, torch.Tensor], hidden: int, step: int):
    b = batch["prompt_input_ids"].shape[0]
    noise = torch.cat([member_noise(args.seed, 0, step * 100 + i, args.group_size, hidden) for i in range(b)])
    g = torch.Generator().manual_seed(args.seed + step)
    advantages = torch.randn(b * args.group_size, generator=g)
    return noise * args.noise_scale, advantages


def _step(module: LatentGRPOModule, batch, noise, advantages) -> None:
    """Score without gradients, then the loss forward + backward (per-member mean log-prob x advantage),
    as the trainer does (it reuses the scoring pass's prompt state when that is exact)."""
    with torch.no_grad():
        state = module(**batch, noise=noise, keep_prompt_state=True).prompt_state
    lp = module(**batch, noise=noise, prompt_state=state).logprobs
    mask = batch["completion_attention_mask"].repeat_interleave(module.group_size, 0).to(lp.dtype)
    loss = -((lp * mask).sum(-1) / mask.sum(-1) * advantages).mean()
    loss.backward()


def _grads(module: LatentGRPOModule, batch, noise, advantages, form: str, timed_path: bool) -> dict[str, torch.Tensor]:
    """The gradients of one step of ``form`` (ours, naive, naive_batched): along the timed path (the scoring
    pass's prompt state reused by the loss pass, :func:`_step`) or through one plain forward."""
    module.naive = form != "ours"
    module.naive_rows_per_pass = module.group_size * batch["prompt_input_ids"].shape[0] if form == "naive_batched" else 1
    module.zero_grad(set_to_none=True)
    if timed_path:
        _step(module, batch, noise, advantages)
    else:
        lp = module(**batch, noise=noise).logprobs
        mask = batch["completion_attention_mask"].repeat_interleave(module.group_size, 0).to(lp.dtype)
        (-((lp * mask).sum(-1) / mask.sum(-1) * advantages).mean()).backward()
    out = {n: p.grad.detach().clone() for n, p in module.named_parameters() if p.grad is not None}
    module.zero_grad(set_to_none=True)
    return out


def _max_rel_diff(got: dict[str, torch.Tensor], reference: dict[str, torch.Tensor]) -> float:
    if got.keys() != reference.keys() or not reference:
        raise RuntimeError("the two forms train different tensors")
    # nan_max, not max: a NaN in any tensor but the first was dropped, and the check read as exact
    return nan_max((got[n] - reference[n]).abs().max().item() / max(reference[n].abs().max().item(), 1e-30)
                   for n in reference)


def bench_grpo(args: argparse.Namespace) -> dict:
    """Time both forms side by side on the same batches; exactness in float32. Returns the result dict."""
    if args.group_size < 2:
        raise ValueError("--group-size must be >= 2")
    if args.threads:
        torch.set_num_threads(args.threads)
    module, tok = _build(args, args.dtype)
    args.batch_size = args.prompts
    batches = make_batches(tok, args)
    hidden = module.latent_lm.lm_config.hidden_size
    inputs = [_inputs(args, b, hidden, i) for i, b in enumerate(batches)]
    shapes = [(b["prompt_input_ids"].shape[1], b["completion_input_ids"].shape[1]) for b in batches]
    print(f"model {args.model} ({args.dtype}), G={args.group_size}, prompts/micro-batch {args.prompts}, "
          f"[prompt cols, completion cols] per batch: {shapes}, torch threads {torch.get_num_threads()}",
          file=sys.stderr)
    times: dict[str, list[float]] = {"ours": [], "naive": [], "naive_batched": []}
    for step in range(args.warmup + args.steps):
        i = step % len(batches)
        order = list(times) if step % 2 == 0 else list(reversed(times))
        for name in order:
            module.naive = name != "ours"
            # naive: member by member (the reference); naive_batched: a group's rows in one pass per
            # LM call, as the LatentR3 code runs it (more memory, fewer calls).
            module.naive_rows_per_pass = args.group_size * args.prompts if name == "naive_batched" else 1
            t = time.perf_counter()
            _step(module, batches[i], *inputs[i])
            dt = time.perf_counter() - t
            module.zero_grad(set_to_none=True)
            print(f"step {step} {'warm-up' if step < args.warmup else 'timed'} {name}: {dt:.3f} s", file=sys.stderr,
                  flush=True)
            if step >= args.warmup:
                times[name].append(dt)
    med = {k: statistics.median(v) for k, v in times.items()}
    paired = statistics.median(o / n for o, n in zip(times["ours"], times["naive"], strict=True))
    del module

    # Exactness in float32 on the first batch, against the naive per-member form along the plain forward: ours
    # along the timed path and along the plain forward (the trainer takes either), naive_batched as timed.
    exact, _ = _build(args, "float32")
    b, (noise, adv) = batches[0], inputs[0]
    reference = _grads(exact, b, noise, adv, "naive", timed_path=False)
    rel = {
        "ours_timed_path": _max_rel_diff(_grads(exact, b, noise, adv, "ours", timed_path=True), reference),
        "ours_plain_forward": _max_rel_diff(_grads(exact, b, noise, adv, "ours", timed_path=False), reference),
        "naive_batched_timed_path": _max_rel_diff(_grads(exact, b, noise, adv, "naive_batched", timed_path=True),
                                                  reference),
    }
    max_rel = nan_max([rel["ours_timed_path"], rel["ours_plain_forward"]])
    print(f"host load average {' '.join(f'{x:.1f}' for x in os.getloadavg())}")
    print(f"{'form':<15}{'median s':>10}{'min s':>9}{'max s':>9}")
    for k, v in times.items():
        print(f"{k:<15}{med[k]:>10.3f}{min(v):>9.3f}{max(v):>9.3f}")
    print(f"ours/naive {med['ours'] / med['naive']:.3f} (median of per-step ratios {paired:.3f}; ours/naive_batched {med['ours'] / med['naive_batched']:.3f}); "
          "float32 max rel grad diff vs naive: " + ", ".join(f"{k} {v:.3g}" for k, v in rel.items()))
    return {
        "model": args.model, "dtype": args.dtype, "group_size": args.group_size, "prompts": args.prompts,
        "train_lora": bool(args.train_lora), "steps_timed": args.steps, "warmup_steps": args.warmup,
        "batch_shapes": shapes, "prompt_len_range": list(args.prompt_len),
        "completion_len_range": list(args.completion_len), "noise_scale": args.noise_scale, "seed": args.seed,
        "torch_threads": torch.get_num_threads(),
        "ours_step_s": round(med["ours"], 4), "naive_step_s": round(med["naive"], 4),
        "ours_over_naive": round(med["ours"] / med["naive"], 4), "ours_over_naive_paired": round(paired, 4),
        "max_rel_grad_diff_vs_naive": max_rel,
        "max_rel_grad_diff_vs_naive_by_path": rel,
        "naive_batched_step_s": round(med["naive_batched"], 4),
        "ours_over_naive_batched": round(med["ours"] / med["naive_batched"], 4),
    }
