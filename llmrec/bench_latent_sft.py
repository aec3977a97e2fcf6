"""``llmrec bench latent-sft``: the latent SFT step, plain LM vs the efficient latent form vs the paper's naive form.

    llmrec bench latent-sft --model smollm2-135m --batch-size 4 --steps 5 --output benchmarks/results/latent_sft.json

For each of a few batches of D3-style prompts (left-padded, 150-250 tokens) and title completions
(15-25 tokens, right-padded), times one forward + backward (LoRA adapters and, for the latent forms,
the pooling head trainable) in bf16 for:

* ``plain``        -- the N=0 path: one pass over [prompt, completion], logits on the completion only;
* ``plain_hf``     -- (reference) the stock ``model(input_ids, labels=...)`` call, logits everywhere;
* ``latent``       -- :meth:`LatentReasoningLM.forward` (prompt once with a KV cache, then [latent, completion]);
* ``naive_latent`` -- :meth:`LatentReasoningLM.forward_naive` (N+1 full-sequence passes, SFT right padding).

Variants are interleaved within each step so that load from other processes hits them alike; the
median over the timed steps is reported. Exactness is measured separately in float32 (LoRA B
initialised randomly so every adapter tensor has a gradient): max |logit difference| over the
completion tokens and max relative gradient difference (per tensor, max |diff| / max |naive|).
The last line of output is JSON.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import random
import statistics
import sys
import time
from collections.abc import Iterable
from pathlib import Path

import torch

from llmrec.bench_options import add_latent_sft_arguments as add_arguments  # noqa: F401
from llmrec.models.backbone import load_backbone
from llmrec.models.latent import (
    IGNORE_INDEX,
    LatentConfig,
    LatentReasoningLM,
    add_latent_tokens,
    build_naive_inputs,
    padding_position_ids,
)
from llmrec.prompts import PromptTemplate

ITEMS = Path(__file__).resolve().parent / "data/samples/games_sample/derived/items.jsonl"


def make_batches(tokenizer, args) -> list[dict[str, torch.Tensor]]:
    """Random D3 prompts over catalogue titles whose token lengths fall in the requested ranges."""
    rng = random.Random(args.seed)
    titles = [json.loads(line)["title"] for line in ITEMS.read_text(encoding="utf-8").splitlines() if line.strip()]
    template = PromptTemplate.load("d3")
    eos = tokenizer.eos_token
    cmin, cmax = args.completion_len
    pmin, pmax = args.prompt_len
    targets = [
        t for t in titles
        if cmin <= len(tokenizer(template.render_completion(t) + eos, add_special_tokens=False).input_ids) <= cmax
    ]
    if not targets:
        raise SystemExit(f"no title gives a completion of {cmin}-{cmax} tokens")
    batches = []
    for _ in range(args.num_batches):
        prompts, completions = [], []
        attempts = 0
        while len(prompts) < args.batch_size:
            attempts += 1
            if attempts > 1000 * args.batch_size:
                raise SystemExit(f"no prompt of 3-10 history titles gives {pmin}-{pmax} tokens "
                                 f"(found {len(prompts)} in {attempts - 1} tries); widen --prompt-len")
            history = rng.sample(titles, rng.randint(3, 10))
            prompt = template.render_prompt(history, noun="video games")
            n = len(tokenizer(prompt).input_ids)
            if pmin <= n <= pmax:
                prompts.append(prompt)
                completions.append(template.render_completion(rng.choice(targets)) + eos)
        tokenizer.padding_side = "left"
        p = tokenizer(prompts, return_tensors="pt", padding=True)
        tokenizer.padding_side = "right"
        c = tokenizer(completions, return_tensors="pt", padding=True, add_special_tokens=False)
        batches.append(
            {"prompt_input_ids": p.input_ids, "prompt_attention_mask": p.attention_mask,
             "completion_input_ids": c.input_ids, "completion_attention_mask": c.attention_mask}
        )
    return batches


def build(args, dtype: str, random_lora_b: bool):
    from peft import LoraConfig, get_peft_model

    model, tok = load_backbone(args.model, dtype=dtype)
    cfg0 = LatentConfig(num_latent_tokens=0)
    cfg = LatentConfig(num_latent_tokens=args.num_latent)
    add_latent_tokens(tok, model, cfg)
    torch.manual_seed(args.seed)
    lora = LoraConfig(
        r=args.lora_r, lora_alpha=2 * args.lora_r, lora_dropout=0.0,
        target_modules=args.lora_targets.split(","), init_lora_weights=not random_lora_b,
    )
    peft_model = get_peft_model(model, lora)
    peft_model.train()
    torch.manual_seed(args.seed + 1)
    latent = LatentReasoningLM(peft_model, cfg)
    plain = LatentReasoningLM(peft_model, cfg0)
    return latent, plain, tok


def steps_for(latent: LatentReasoningLM, plain: LatentReasoningLM, tok):
    ids = latent.config.latent_token_ids

    def plain_step(b):
        return plain.loss(**b).loss

    def plain_hf_step(b):
        p, pm, c, cm = b.values()
        ids_, mask = torch.cat([p, c], 1), torch.cat([pm, cm], 1)
        labels = torch.cat([torch.full_like(p, IGNORE_INDEX), c.masked_fill(cm == 0, IGNORE_INDEX)], 1)
        return plain.model(input_ids=ids_, attention_mask=mask, position_ids=padding_position_ids(mask),
                           labels=labels).loss

    def latent_step(b):
        return latent.loss(**b).loss

    def naive_step(b):
        x, am, lab = build_naive_inputs(*b.values(), ids, tok.pad_token_id, "right")
        return latent.loss(input_ids=x, attention_mask=am, labels=lab).loss

    return {"plain": plain_step, "plain_hf": plain_hf_step, "latent": latent_step, "naive_latent": naive_step}


def timed(fn, batch, model) -> tuple[float, float]:
    """(wall seconds, process CPU seconds) of one forward + backward."""
    w0, c0 = time.perf_counter(), time.process_time()
    loss = fn(batch)
    loss.backward()
    dt = (time.perf_counter() - w0, time.process_time() - c0)
    model.zero_grad(set_to_none=True)
    return dt


def nan_max(values: Iterable[float]) -> float:
    """The largest of ``values``, NaN if any is NaN. Python's ``max`` keeps whichever of a number and a NaN it
    saw first (``max(0.0, nan) == 0.0``), so a NaN difference -- the two forms as far apart as they can be, or
    both broken -- was reported as exact."""
    vals = list(values)
    return math.nan if any(math.isnan(v) for v in vals) else max(vals)


def exactness(args, batches) -> tuple[float, float]:
    """Max |logit diff| and max relative grad diff of the efficient vs the naive form, in float32."""
    latent, _, tok = build(args, "float32", random_lora_b=True)
    ids = latent.config.latent_token_ids
    logit_diffs: list[float] = []
    rel_diffs: list[float] = []
    for b in batches[: args.exact_batches]:
        eff = latent.loss(**b)
        eff.loss.backward()
        g_eff = {n: p.grad.clone() for n, p in latent.named_parameters() if p.grad is not None}
        latent.zero_grad(set_to_none=True)
        x, am, lab = build_naive_inputs(*b.values(), ids, tok.pad_token_id, "right")
        nai = latent.loss(input_ids=x, attention_mask=am, labels=lab)
        nai.loss.backward()
        g_nai = {n: p.grad.clone() for n, p in latent.named_parameters() if p.grad is not None}
        latent.zero_grad(set_to_none=True)
        if g_eff.keys() != g_nai.keys():  # a gradient one form gives and the other not is no match at all
            raise RuntimeError(f"the efficient and naive forms train different tensors: only efficient "
                               f"{sorted(g_eff.keys() - g_nai.keys())}, only naive {sorted(g_nai.keys() - g_eff.keys())}")
        a = eff.logits[eff.labels != IGNORE_INDEX].detach()
        c = nai.scored_logits.detach()  # the naive loss builds only these (the same order)
        logit_diffs.append((a - c).abs().max().item())
        rel_diffs += [(g_eff[n] - g).abs().max().item() / max(g.abs().max().item(), 1e-30) for n, g in g_nai.items()]
    return nan_max(logit_diffs), nan_max(rel_diffs)


def bench_latent_sft(args: argparse.Namespace) -> dict:
    """Time the three forms side by side on the same batches; exactness in float32. Returns the result dict."""
    if args.exact_batches < 1:  # the command line bounds it; a caller's namespace may not
        raise ValueError("--exact-batches must be >= 1: with no batch compared, the exactness numbers mean nothing")
    if args.threads:
        torch.set_num_threads(args.threads)

    latent, plain, tok = build(args, args.dtype, random_lora_b=False)
    batches = make_batches(tok, args)
    shapes = [(b["prompt_input_ids"].shape[1], b["completion_input_ids"].shape[1]) for b in batches]
    print(f"model {args.model} ({args.dtype}), batch {args.batch_size}, N={args.num_latent}, "
          f"[prompt cols, completion cols] per batch: {shapes}, torch threads {torch.get_num_threads()}",
          file=sys.stderr)
    fns = steps_for(latent, plain, tok)
    walls: dict[str, list[float]] = {k: [] for k in fns}
    cpus: dict[str, list[float]] = {k: [] for k in fns}
    for step in range(args.warmup + args.steps):
        batch = batches[step % len(batches)]
        order = list(fns) if step % 2 == 0 else list(reversed(fns))
        for name in order:
            wall, cpu = timed(fns[name], batch, latent)
            print(f"step {step} {'warm-up' if step < args.warmup else 'timed'} {name}: wall {wall:.3f} s, "
                  f"cpu {cpu:.3f} s", file=sys.stderr, flush=True)
            if step >= args.warmup:
                walls[name].append(wall)
                cpus[name].append(cpu)
    times = cpus if args.clock == "cpu" else walls
    med = {k: statistics.median(v) for k, v in times.items()}
    med_other = {k: statistics.median(v) for k, v in (walls if args.clock == "cpu" else cpus).items()}
    del latent, plain

    max_logit, max_rel = exactness(args, batches)
    compared = len(batches[: args.exact_batches])

    other = "wall" if args.clock == "cpu" else "cpu"
    print(f"clock: {args.clock} (median {other} time in the last columns); host load average "
          f"{' '.join(f'{x:.1f}' for x in os.getloadavg())}")
    print(f"{'variant':<14}{'median s':>10}{'min s':>9}{'max s':>9}{'x plain':>9}{other + ' s':>10}{'x plain':>9}")
    for k, v in times.items():
        print(f"{k:<14}{med[k]:>10.3f}{min(v):>9.3f}{max(v):>9.3f}{med[k] / med['plain']:>9.3f}"
              f"{med_other[k]:>10.3f}{med_other[k] / med_other['plain']:>9.3f}")
    print(f"float32 efficient vs naive ({compared} batch(es)): max |logit diff| {max_logit:.3g}, max rel grad diff "
          f"{max_rel:.3g}")
    result = {
        "model": args.model,
        "dtype": args.dtype,
        "clock": args.clock,
        "torch_threads": torch.get_num_threads(),
        "steps_timed": args.steps,
        "batch_size": args.batch_size,
        "num_latent_tokens": args.num_latent,
        "batch_shapes": shapes,
        "plain_step_s": round(med["plain"], 4),
        "plain_hf_full_logits_step_s": round(med["plain_hf"], 4),
        "latent_step_s": round(med["latent"], 4),
        "naive_latent_step_s": round(med["naive_latent"], 4),
        "latent_over_plain": round(med["latent"] / med["plain"], 4),
        "naive_over_plain": round(med["naive_latent"] / med["plain"], 4),
        f"{other}_latent_over_plain": round(med_other["latent"] / med_other["plain"], 4),
        f"{other}_naive_over_plain": round(med_other["naive_latent"] / med_other["plain"], 4),
        "max_abs_logit_diff_vs_naive": max_logit,
        "max_rel_grad_diff_vs_naive": max_rel,
        # the batches the two max diffs above are over (--exact-batches asks, --num-batches caps it); results
        # written before this key existed compared min(args.exact_batches, args.num_batches) as well
        "exactness_batches_compared": compared,
    }
    return result
