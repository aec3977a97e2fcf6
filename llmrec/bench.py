"""``llmrec bench ...``: speed and quality benchmarks that write a results file.

Every benchmark measures its contenders side by side in one run on the same inputs (these machines
are shared and noisy: ratios are what is comparable, absolute seconds are not) and prints, as its last
line, one JSON object.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

from llmrec.config import StoreOnce, int_at_least


def _count_forwards(model):
    """Attach a counter of ``model.forward`` calls; returns (counter dict, handle)."""
    counter = {"n": 0}

    def hook(module, args, kwargs):
        counter["n"] += 1

    return counter, model.register_forward_pre_hook(hook, with_kwargs=True)


@torch.no_grad()
def floor_decode(model, input_ids, attention_mask, num_beams: int, steps: int) -> None:
    """All-beams cached decoding without search logic: one prefill per prompt, then ``steps`` cached single-token
    forwards for all ``rows x beams`` (no cache reordering). Not a lower bound: our search drops finished and dead
    beams as it goes, so it can run fewer forwards than this (``ours_over_floor`` < 1 is possible); it is the cost
    of decoding every beam to the longest title."""
    from llmrec.decoding.beam_search import prefill_prompts
    from llmrec.models.kv_cache_naming import cache_kwargs, returned_cache

    state = prefill_prompts(model, input_ids, attention_mask)
    cache = state.past_key_values
    cache.batch_repeat_interleave(num_beams)
    mask = state.attention_mask.repeat_interleave(num_beams, dim=0)
    pos = state.next_position_ids.repeat_interleave(num_beams, dim=0)
    tok = state.next_token_logits.argmax(-1).repeat_interleave(num_beams, dim=0)
    for _ in range(steps):
        mask = torch.cat([mask, mask.new_ones(mask.shape[0], 1)], dim=1)
        out = model(input_ids=tok[:, None], attention_mask=mask, position_ids=pos[:, None], use_cache=True,
                    **cache_kwargs(cache))
        cache = returned_cache(out)
        tok = out.logits[:, -1].argmax(-1)
        pos = pos + 1


def bench_decoding(args: argparse.Namespace) -> dict:
    """Ours vs transformers' ``generate`` + ``prefix_allowed_tokens_fn`` vs the floor, same rows; and ours with
    the beams of a prompt sharing its KV cache (the default where the architecture allows it) vs ours with one
    cache row per beam (``share_prompt_cache=False``, the plain form)."""
    from llmrec.data.canonical import load_prepared
    from llmrec.decoding.beam_search import constrained_beam_search, reference_constrained_beam_search
    from llmrec.decoding.search import (
        answer_budget,
        build_catalog_trie,
        encode_prompts,
        prompt_lengths,
        render_prompts,
    )
    from llmrec.decoding.shared_prompt import supports_shared_prompt
    from llmrec.evaluation.evaluator import EvalConfig, rows_by_length, select_rows
    from llmrec.models.backbone import load_backbone
    from llmrec.prompts import PromptTemplate

    torch.manual_seed(0)
    cfg = EvalConfig(dataset=args.dataset, model_name_or_path=args.model, dtype=args.dtype, num_beams=args.beams,
                     batch_size=args.batch_size, length_penalty=args.length_penalty, noun=args.noun)
    data = load_prepared(cfg.dataset, splits=["test"], max_history=cfg.history_length)
    split = data.splits["test"]
    rows = select_rows(len(split), args.rows, args.seed)
    model, tok = load_backbone(args.model, dtype=args.dtype)
    template = PromptTemplate.load(cfg.prompt)
    trie = build_catalog_trie(data.catalog, tok, template)
    budget = answer_budget(trie, model)

    def encoded_batches(order: list[int]) -> list[tuple[torch.Tensor, torch.Tensor]]:
        batches = [[split[r] for r in order[i:i + cfg.batch_size]] for i in range(0, len(order), cfg.batch_size)]
        return [encode_prompts(tok, render_prompts(template, tok, b, cfg, budget), "cpu") for b in batches]

    encoded = encoded_batches(rows)
    # The evaluator's batch_order "length": the same rows, batched longest prompt first.
    by_length = rows_by_length(rows, prompt_lengths(model, tok, trie, template, [split[r] for r in rows], cfg))
    encoded_by_length = encoded_batches(by_length)
    counter, handle = _count_forwards(model)
    times = {"ours": 0.0, "per_beam": 0.0, "reference": 0.0, "floor": 0.0, "length_sorted": 0.0}
    lists: dict[str, list] = {"ours": [], "per_beam": [], "reference": [], "length_sorted": []}
    steps = []
    shared = supports_shared_prompt(model)

    def ours(ids, mask):
        return constrained_beam_search(model, trie, ids, mask, num_beams=cfg.num_beams,
                                       length_penalty=cfg.length_penalty)

    def per_beam(ids, mask):
        return constrained_beam_search(model, trie, ids, mask, num_beams=cfg.num_beams,
                                       length_penalty=cfg.length_penalty, share_prompt_cache=False)

    def reference(ids, mask):
        return reference_constrained_beam_search(model, trie, ids, mask, num_beams=cfg.num_beams,
                                                 length_penalty=cfg.length_penalty)

    # Warm-up (first-call allocations, lazy initialisation) on the first batch, untimed, for every contender.
    counter["n"] = 0
    ours(*encoded[0])
    # Read before the reference runs: its forwards went into the count too, and the floor's warm-up decoded about
    # twice the steps its timed run on this batch does.
    warmup_steps = counter["n"] - 1
    per_beam(*encoded[0])
    reference(*encoded[0])
    floor_decode(model, *encoded[0], cfg.num_beams, warmup_steps)
    # Interleave the contenders batch by batch, alternating who goes first, so that machine noise hits all of them
    # alike; the floor runs after ours (it decodes as many steps as our search took on that batch).
    # length_sorted is ours on the i-th batch of the length-sorted rows (as many batches as in row order).
    searches = {"ours": ours, "per_beam": per_beam, "reference": reference, "length_sorted": ours}
    for i, (ids, mask) in enumerate(encoded):
        for name in list(searches) if i % 2 == 0 else list(searches)[::-1]:
            counter["n"] = 0
            t = time.perf_counter()
            outs = searches[name](*(encoded_by_length[i] if name == "length_sorted" else (ids, mask)))
            times[name] += time.perf_counter() - t
            if name == "ours":
                n_steps = counter["n"] - 1
            lists[name] += [o.title_ranking for o in outs]
        steps.append(n_steps)
        t = time.perf_counter()
        floor_decode(model, ids, mask, cfg.num_beams, steps[-1])
        times["floor"] += time.perf_counter() - t
    handle.remove()
    n = len(rows)
    in_row_order = dict(zip(by_length, lists["length_sorted"]))
    lists["length_sorted"] = [in_row_order[r] for r in rows]
    result = {
        "rows": n, "beams": cfg.num_beams, "model": args.model, "dtype": args.dtype, "batch_size": cfg.batch_size,
        "dataset": str(args.dataset), "seed": args.seed, "length_penalty": cfg.length_penalty,
        "timing": "perf_counter; one untimed warm-up batch; ours, per_beam, reference and length_sorted in turn, "
                  "the order reversed every other batch",
        "ours_shares_prompt_cache": shared,
        "mean_prompt_tokens": round(sum(int(m.sum()) for _, m in encoded) / n, 1),
        "mean_padded_prompt_tokens": round(sum(m.numel() for _, m in encoded) / n, 1),
        "mean_padded_prompt_tokens_length_sorted": round(sum(m.numel() for _, m in encoded_by_length) / n, 1),
        "mean_steps_per_batch": round(sum(steps) / len(steps), 2),
        "ours_rows_per_s": round(n / times["ours"], 4),
        "reference_rows_per_s": round(n / times["reference"], 4),
        "floor_rows_per_s": round(n / times["floor"], 4),
        "per_beam_rows_per_s": round(n / times["per_beam"], 4),
        "speedup_vs_reference": round(times["reference"] / times["ours"], 3),
        "ours_over_per_beam": round(times["ours"] / times["per_beam"], 3),
        "length_sorted_over_ours": round(times["length_sorted"] / times["ours"], 3),
        "ours_over_floor": round(times["ours"] / times["floor"], 3),
        "identical_rankings": round(sum(a == b for a, b in zip(lists["ours"], lists["reference"])) / n, 4),
        "identical_rankings_per_beam": round(sum(a == b for a, b in zip(lists["ours"], lists["per_beam"])) / n, 4),
        "identical_rankings_length_sorted": round(
            sum(a == b for a, b in zip(lists["ours"], lists["length_sorted"])) / n, 4),
    }
    return result


def _yaml_scalar(text: str):
    from llmrec.config import load_yaml_text

    return load_yaml_text(text)  # typed later by coerce_fields, as a recipe's values


def _print_table(result: dict, keys: list[str]) -> None:
    width = max(len(k) for k in keys)
    for k in keys:
        print(f"{k:<{width}}  {result[k]}")


SPEED_BENCHES = ("decoding", "latent-sft", "grpo")


def command_arguments(args: argparse.Namespace) -> dict:
    """The options a benchmark ran with (its argparse namespace without the dispatch entries), recorded in its JSON
    so a committed result says what was measured."""
    return {k: v for k, v in sorted(vars(args).items())
            if k not in ("func", "accepts_overrides", "command", "bench") and not callable(v)}


def cmd_bench(args: argparse.Namespace) -> int:
    from llmrec.data.canonical import atomic_write_json, check_file_path

    if args.output:  # before the benchmark (seqrec and pipeline run for hours), not at the write after it
        check_file_path(args.output, "--output")
    if args.bench == "decoding":
        result = bench_decoding(args)
        _print_table(result, list(result))
    elif args.bench == "latent-sft":
        from llmrec.bench_latent_sft import bench_latent_sft

        result = bench_latent_sft(args)
    elif args.bench == "grpo":
        from llmrec.bench_grpo import bench_grpo

        result = bench_grpo(args)
    elif args.bench == "seqrec":
        from llmrec.config import ConfigError
        from llmrec.seqrec.bench import run_seqrec_benchmark

        overrides: dict = {}
        if args.config:
            overrides["config"] = args.config
        rest = list(args.overrides)
        while rest:  # --field value pairs for SeqRecConfig
            key = rest.pop(0)
            if not key.startswith("--") or not rest:
                raise ConfigError(f"expected --field value overrides, got {key!r}")
            overrides[key[2:]] = _yaml_scalar(rest.pop(0))
        result = run_seqrec_benchmark(args.dataset, [m.strip() for m in args.models.split(",") if m.strip()],
                                      args.seeds, Path(args.output_dir), report_only=args.report_only,
                                      jobs=args.jobs, **overrides)
    elif args.bench == "pipeline":
        from llmrec.bench_pipeline import cmd_pipeline

        result = cmd_pipeline(args)
    else:  # pragma: no cover - argparse restricts the choices
        raise ValueError(args.bench)
    if args.bench in SPEED_BENCHES:
        result = {**result, "args": command_arguments(args)}
    line = json.dumps(result, sort_keys=True)
    print(line, flush=True)  # first: a failing write must not lose what was measured
    if args.output:
        atomic_write_json(Path(args.output), result)
    return 0


def register_cli(subparsers) -> None:
    p = subparsers.add_parser("bench", help="benchmarks (print a table and a last-line JSON object)")
    sub = p.add_subparsers(dest="bench", metavar="BENCHMARK", required=True)
    d = sub.add_parser("decoding", help="constrained beam search: ours vs generate+prefix_allowed_tokens_fn vs floor, and "
                       "ours with a shared prompt cache vs one cache row per beam",
                       formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    d.add_argument("--model", default="smollm2-135m", help="backbone alias, directory or hub id")
    d.add_argument("--dataset", default="games-sample", help="prepared dir or sample name (test rows are used)")
    # at least 1 at parse time: --rows 0 (or below) meant every test row to the row selection (3,343 x 3 contenders)
    d.add_argument("--rows", type=int_at_least(1), default=32, help="test rows timed (seeded subset)")
    d.add_argument("--beams", type=int_at_least(1), default=10, help="beam width (titles ranked per row)")
    d.add_argument("--batch-size", type=int_at_least(1), default=8, help="rows decoded together")
    d.add_argument("--dtype", default="bfloat16", help="dtype of the model")
    d.add_argument("--length-penalty", type=float, default=1.0, help="beam score = log-prob / length**penalty")
    d.add_argument("--noun", default="video games", help="what the prompt calls the items")
    d.add_argument("--seed", type=int, default=0, help="seed of the row subset")
    d.add_argument("--output", default=None, help="also write the JSON result here")
    d.set_defaults(func=cmd_bench)
    from llmrec.bench_options import add_grpo_arguments, add_latent_sft_arguments

    ls = sub.add_parser("latent-sft", help="SFT step time: plain vs our latent forward vs the naive two-pass form",
                        formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    add_latent_sft_arguments(ls)
    ls.add_argument("--output", default=None, help="also write the JSON result here")
    ls.set_defaults(func=cmd_bench)

    gr = sub.add_parser("grpo", help="latent GRPO step time: shared-prefix form vs the naive per-member form",
                        formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    add_grpo_arguments(gr)
    gr.add_argument("--output", default=None, help="also write the JSON result here")
    gr.set_defaults(func=cmd_bench)
    s = sub.add_parser("seqrec", help="train and test ID-based models per seed on one split; mean +- std table",
                       formatter_class=argparse.ArgumentDefaultsHelpFormatter,
                       description="Extra --field value pairs are SeqRecConfig fields applied to every run.")
    s.add_argument("--dataset", required=True, help="prepared dataset directory")
    s.add_argument("--models", default="sasrec,rearec-erl,rearec-prl,lares",
                   help="comma-separated ID models to train and test")
    s.add_argument("--seeds", type=int, default=3,
                   help="number of seeds per model (a count, not a seed): run s uses seed 42 + s, s = 0..N-1")
    s.add_argument("--config", default=None, action=StoreOnce, help="a seqrec recipe whose values come first; '{model}' in the path "
                   "is replaced per model, e.g. 'recipes/seqrec/{model}_ml100k.yaml'")
    s.add_argument("--output-dir", default="benchmarks/results/seqrec", help="runs and summary (resumable)")
    s.add_argument("--report-only", action="store_true", help="train nothing; summarise the finished runs")
    s.add_argument("--jobs", type=int, default=1,
                   help="runs trained at once, each in its own process with its share of this process's torch "
                   "threads (at least 1; unless --num_threads > 0 is given) and its output and log in "
                   "<run>/train.log, all models' seed 0 first; the metrics and weights are those of 1 job with the "
                   "same threads per run, the timings those of a shared machine (recorded as concurrent_runs) "
                   "(1: one run after another, in this process)")
    s.add_argument("--output", default=None, help="also write the JSON result here")
    s.set_defaults(func=cmd_bench, accepts_overrides=True)
    from llmrec.bench_pipeline import add_arguments as add_pipeline_arguments

    pl = sub.add_parser("pipeline", help="every method on one protocol: one table (mean +- std over seeds), paired "
                        "CIs, a PNG plot (resumable; --report-only reports what has finished)",
                        formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    add_pipeline_arguments(pl)
    pl.add_argument("--output", default=None, help="also write the last-line JSON here")
    pl.set_defaults(func=cmd_bench)
