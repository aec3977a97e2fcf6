"""Kill a real training run in the middle, resume it, and check it ends where an uninterrupted run ends.

For latent SFT and then latent GRPO (SmolLM2-135M by default, real Games rows), each stage is run twice
with the same seed: once straight through (``full``), once as ``llmrec sft`` / ``llmrec grpo`` child
processes that are SIGKILLed as soon as the first checkpoint is complete and then started again with the
same command (``cut``). The trained weights of both are compared tensor by tensor, then both final GRPO
models (and both SFT models) are evaluated on the same test rows and their metrics and rankings compared.
Writes ``benchmarks/results/resume_check_<model>.{json,md}``; stages already finished are reused.

    OMP_NUM_THREADS=1 python scripts/resume_check.py            # about 15 minutes on a 2-core CPU
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

from llmrec.data.canonical import read_jsonl  # lines end at "\n" only (titles may hold U+2028)

ROOT = Path(__file__).resolve().parent.parent


def _run(cmd: list[str], log: Path) -> None:
    with open(log, "a") as f:
        rc = subprocess.run(cmd, stdout=f, stderr=subprocess.STDOUT, cwd=ROOT).returncode
    if rc:
        raise SystemExit(f"{' '.join(cmd[2:4])} failed (exit {rc}); see {log}")


def _run_and_kill(cmd: list[str], log: Path, ready) -> float:
    """Start ``cmd``; SIGKILL its process group once ``ready()`` is true; return the seconds it ran."""
    with open(log, "a") as f:
        proc = subprocess.Popen(cmd, stdout=f, stderr=subprocess.STDOUT, cwd=ROOT, start_new_session=True)
        t0 = time.monotonic()
        while proc.poll() is None:
            if ready():
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()
                return time.monotonic() - t0
            time.sleep(0.5)
    raise RuntimeError(f"{cmd[:2]} finished before it could be killed (exit {proc.returncode}); see {log}")


def _compare_weights(a: Path, b: Path, names: list[str]) -> dict:
    from safetensors.torch import load_file

    out = {}
    for name in names:
        ta, tb = load_file(str(a / name)), load_file(str(b / name))
        if set(ta) != set(tb):
            raise AssertionError(f"{name}: different tensors in {a} and {b}")
        diff = max(((ta[k].float() - tb[k].float()).abs().max().item() for k in ta), default=0.0)
        out[name] = {"tensors": len(ta), "max_abs_diff": diff,
                     "bitwise_equal": all(bool((ta[k] == tb[k]).all()) for k in ta)}
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--dataset", default="data/games")
    ap.add_argument("--out", default="runs/resume-check")
    ap.add_argument("--sft-rows", type=int, default=64, help="4 optimiser steps of 16 rows")
    ap.add_argument("--grpo-rows", type=int, default=16, help="4 optimiser steps of 4 prompts")
    ap.add_argument("--eval-rows", type=int, default=40)
    ap.add_argument("--results", default=None, help="default benchmarks/results/resume_check_<model>.json")
    args = ap.parse_args()
    out = ROOT / args.out
    out.mkdir(parents=True, exist_ok=True)
    log = out / "log.txt"
    llmrec = [sys.executable, "-m", "llmrec.cli"]
    sft = [*llmrec, "sft", "--config", "recipes/games/sft_latent.yaml", "--dataset", args.dataset,
           "--model_name_or_path", args.model, "--model_dtype", "bfloat16", "--max_train_rows", str(args.sft_rows),
           "--max_eval_rows", "16", "--per_device_train_batch_size", "8", "--gradient_accumulation_steps", "2",
           "--eval_steps", "2", "--save_steps", "2", "--logging_steps", "1", "--num_train_epochs", "1",
           "--seed", "0", "--disable_tqdm", "true"]
    timings: dict[str, float] = {}
    from llmrec.training.sft import last_complete_checkpoint

    def stage(name: str, cmd: list[str], done_file: str, ready_file: str) -> None:
        full, cut = out / f"{name}_full", out / f"{name}_cut"
        for run in (full, cut):
            if (run / done_file).exists():
                # Finished: the command itself checks that it was made with these settings (--sft-rows, ...) and
                # reuses it, or refuses naming the setting; a plain skip reported old runs under new flags.
                _run([*cmd, "--output_dir", str(run)], log)
        if not (full / done_file).exists():
            t0 = time.monotonic()
            _run([*cmd, "--output_dir", str(full)], log)
            timings[f"{name}_full_s"] = round(time.monotonic() - t0, 1)
        if not (cut / done_file).exists():
            if not (cut / ready_file).exists():
                print(f"== {name}: start, kill after {ready_file}", flush=True)

                def ready() -> bool:
                    if name == "sft":
                        last = last_complete_checkpoint(cut)
                        return last is not None and last.endswith("checkpoint-2")
                    return (cut / ready_file).exists()

                timings[f"{name}_killed_after_s"] = round(_run_and_kill([*cmd, "--output_dir", str(cut)], log, ready), 1)
            print(f"== {name}: resume", flush=True)
            t0 = time.monotonic()
            _run([*cmd, "--output_dir", str(cut)], log)
            timings[f"{name}_resume_s"] = round(time.monotonic() - t0, 1)

    stage("sft", sft, "train_results.json", "checkpoint-2")
    grpo = [*llmrec, "grpo", "--config", "recipes/games/grpo_latent.yaml", "--dataset", args.dataset,
            "--model_dtype", "bfloat16", "--max_train_rows", str(args.grpo_rows), "--per_device_train_batch_size", "8",
            "--gradient_accumulation_steps", "4", "--save_steps", "2", "--seed", "0"]
    # Both GRPO runs start from the uninterrupted SFT run, so the GRPO comparison isolates GRPO's own resume.
    grpo += ["--sft_checkpoint", str(out / "sft_full")]
    stage("grpo", grpo, "grpo_results.json", "checkpoint-2/grpo_state.json")

    sft_res = json.loads((out / "sft_cut" / "train_results.json").read_text())
    grpo_res = json.loads((out / "grpo_cut" / "grpo_results.json").read_text())
    weights = {
        "sft": _compare_weights(out / "sft_full", out / "sft_cut", ["adapter_model.safetensors", "latent_head.safetensors"]),
        "grpo": _compare_weights(out / "grpo_full", out / "grpo_cut", ["latent_head.safetensors"]),
    }
    evals = {}
    for run in ("sft_full", "sft_cut", "grpo_full", "grpo_cut"):
        e = out / f"eval_{run}"
        _run([*llmrec, "evaluate", "--config", "recipes/games/eval.yaml", "--dataset", args.dataset, "--max_rows",
              str(args.eval_rows), "--model_name_or_path", args.model, "--checkpoint", str(out / run),
              "--output_dir", str(e)], log)
        evals[run] = e
    metrics, same_rankings = {}, {}
    for name in ("sft", "grpo"):
        a = json.loads((evals[f"{name}_full"] / "results.json").read_text())["metrics"]["item"]
        b = json.loads((evals[f"{name}_cut"] / "results.json").read_text())["metrics"]["item"]
        metrics[name] = {"uninterrupted": a, "resumed": b, "equal": a == b}
        ra = [r["item_ranking"] for r in read_jsonl(evals[f"{name}_full"] / "rankings.jsonl")]
        rb = [r["item_ranking"] for r in read_jsonl(evals[f"{name}_cut"] / "rankings.jsonl")]
        same_rankings[name] = sum(x == y for x, y in zip(ra, rb)) / len(ra)
    result = {
        "model": args.model, "dataset": args.dataset, "sft_rows": args.sft_rows, "grpo_prompts": args.grpo_rows,
        "eval_rows": args.eval_rows, "killed": "SIGKILL to the process group once checkpoint-2 was complete",
        "sft_resumed_from": sft_res.get("resumed_from"), "grpo_resumed_from": grpo_res.get("resumed_from"),
        "weights": weights, "metrics": metrics, "identical_rankings": same_rankings, "timings_s": timings,
    }
    path = Path(args.results) if args.results else ROOT / "benchmarks" / "results" / f"resume_check_{args.model}.json"
    from llmrec.data.canonical import atomic_write_json, atomic_write_text

    lines = [f"Kill-and-resume check ({args.model}, {args.dataset}; `python scripts/resume_check.py`): each run was "
             "SIGKILLed right after its checkpoint-2 and restarted with the same command.", "",
             "| stage | resumed from | weights bitwise equal | max abs diff | NDCG@10 full / resumed | identical rankings |",
             "|---|---|---|---|---|---|"]
    for name in ("sft", "grpo"):
        w = weights[name]
        lines.append(f"| {name} | {Path(result[f'{name}_resumed_from'] or '-').name} | "
                     f"{all(v['bitwise_equal'] for v in w.values())} | {max(v['max_abs_diff'] for v in w.values()):.3g} | "
                     f"{metrics[name]['uninterrupted']['ndcg@10']:.4f} / {metrics[name]['resumed']['ndcg@10']:.4f} | "
                     f"{same_rankings[name]:.3f} ({args.eval_rows} rows) |")
    atomic_write_text(path.with_suffix(".md"), "\n".join(lines) + "\n")
    atomic_write_json(path, result)
    print("\n".join(lines))
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
