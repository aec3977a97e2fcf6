"""``llmrec quickstart``: the README's main job on the embedded Games sample.

Stages (each skipped when its output already exists, and training resumes from its last checkpoint,
so a rerun continues where an interrupted one stopped): prepare the embedded sample -> latent SFT with
LoRA (recipes/games/sft_latent.yaml on a train subset, model selection on validation rows) -> latent
GRPO from it (recipes/games/grpo_latent.yaml) -> constrained beam-search evaluation of both on the same
test rows, beside the popularity baseline and the zero-shot model -> one metrics table.

A finished stage is skipped only if it was made with what is asked now: a finished training stage made with
other settings (``--train-rows``, ``--grpo-rows``, ``--seed``, ``--model``, ``--dtype``, ``--dataset`` or an
edited recipe) is refused, naming the setting and the directory, and so is a finished evaluation of another
protocol (``--rows``, ``--beams``, ...): use another ``--output-dir`` or remove the stage.
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from llmrec.training.grpo import LatentGRPOConfig
    from llmrec.training.sft import LatentSFTConfig

# The flag that sets each compared setting of a training stage (the others come from the shipped recipes).
_FLAGS = {"seed": "--seed", "model": "--model", "model_name_or_path": "--model", "model_dtype": "--dtype",
          "dataset": "--dataset"}
_SFT_FLAGS = {**_FLAGS, "train_rows": "--train-rows", "max_train_rows": "--train-rows"}
_GRPO_FLAGS = {**_FLAGS, "prompts": "--grpo-rows", "sft_checkpoint": "--output-dir"}
_REMEDY = "rerun with the settings it was made with, use another --output-dir, or remove {out}"


def cmd_quickstart(args: argparse.Namespace) -> int:
    from llmrec.data.canonical import read_stats
    from llmrec.data.cli import format_stats
    from llmrec.data.samples import resolve_dataset_dir
    from llmrec.evaluation.evaluator import EvalConfig, evaluate, markdown_table

    counts = [("--rows", args.rows, 1), ("--beams", args.beams, 1), ("--batch-size", args.batch_size, 1),
              ("--train-rows", args.train_rows, 0)]
    if args.train_rows > 0:  # --train-rows 0 runs no training stage: nothing reads --grpo-rows
        counts.append(("--grpo-rows", args.grpo_rows, 1))
    for flag, value, least in counts:
        if value < least:  # at once, not after the stages before the one that reads it (--grpo-rows 0 after SFT)
            raise ValueError(f"{flag} must be >= {least}, got {value}")
    out = Path(args.output_dir)
    data_dir = resolve_dataset_dir(args.dataset)
    print(f"== data: {args.dataset} ({data_dir})")
    stats = read_stats(data_dir / "stats.json")
    # a directory written by `llmrec data prepare` has the full report; a hand-made one may only count rows
    print(format_stats(stats) if "raw" in stats else f"rows: {stats.get('rows')}")
    stages = [("popularity", {"method": "popularity"}), ("zero_shot", {"method": "beam"})]
    if args.train_rows > 0:
        sft_dir, grpo_dir = train_stages(args, data_dir, out)
        stages += [("sft_latent", {"checkpoint": str(sft_dir)}), ("grpo_latent", {"checkpoint": str(grpo_dir)})]
    common = dict(dataset=str(data_dir), split="test", max_rows=args.rows, row_seed=args.seed,
                  model_name_or_path=args.model, dtype=args.dtype, num_beams=args.beams,
                  batch_size=args.batch_size, ks=[1, 3, 5, 10])
    results = []
    for name, extra in stages:
        print(f"== evaluate: {name}")
        res = evaluate(EvalConfig(**common, **extra, output_dir=str(out / f"eval_{name}")))
        if res is not None:
            results.append(res)
    if results:
        ks = [k for k in (1, 3, 5, 10) if k <= args.beams]
        table = markdown_table(results, ks)
        from llmrec.data.canonical import atomic_write_text

        atomic_write_text(out / "results.md", table)
        rows = results[0]["protocol"].get("rows", args.rows)  # a split with fewer rows than --rows: all of them
        print(f"== results ({rows} test rows of {args.dataset}, item-level matching)")
        print(table, end="")
    return 0


def sft_config(args: argparse.Namespace, data_dir: Path, out: Path) -> LatentSFTConfig:
    """The quickstart's latent SFT: the shipped Games recipe on ``--train-rows`` rows, sized for a CPU."""
    from llmrec.config import parse_config
    from llmrec.resources import resource_dir
    from llmrec.training.sft import LatentSFTConfig

    # 128 rows at 16 a step are 8 steps: validated and saved at steps 4 and 8, so there are two checkpoints to
    # choose from and a kill after step 4 resumes there (saved every 8, only the end was: a kill started over)
    (sft,) = parse_config([LatentSFTConfig], resource_dir("recipes") / "games" / "sft_latent.yaml", extra=dict(
        dataset=str(data_dir), model_name_or_path=args.model, model_dtype=args.dtype,
        max_train_rows=args.train_rows, max_eval_rows=64, per_device_train_batch_size=8,
        gradient_accumulation_steps=2, eval_steps=4, save_steps=4, logging_steps=4,
        output_dir=str(out / "sft_latent"), seed=args.seed))
    return sft


def grpo_config(args: argparse.Namespace, data_dir: Path, out: Path) -> LatentGRPOConfig:
    """The quickstart's latent GRPO from its SFT: the shipped Games recipe on ``--grpo-rows`` prompts."""
    from llmrec.config import parse_config
    from llmrec.resources import resource_dir
    from llmrec.training.grpo import LatentGRPOConfig

    (grpo,) = parse_config([LatentGRPOConfig], resource_dir("recipes") / "games" / "grpo_latent.yaml", extra=dict(
        sft_checkpoint=str(out / "sft_latent"), dataset=str(data_dir), model_dtype=args.dtype,
        max_train_rows=args.grpo_rows, per_device_train_batch_size=8, gradient_accumulation_steps=2, save_steps=4,
        output_dir=str(out / "grpo_latent"), seed=args.seed))
    return grpo


def train_stages(args: argparse.Namespace, data_dir: Path, out: Path) -> tuple[Path, Path]:
    """Latent SFT then latent GRPO with the shipped Games recipes, sized for a CPU; returns both output dirs."""
    from llmrec.training.grpo import run_grpo
    from llmrec.training.sft import run_sft

    sft = sft_config(args, data_dir, out)
    print(f"== latent SFT ({args.train_rows} train rows, LoRA) -> {sft.output_dir}")
    check_finished_sft(sft, data_dir)
    res = run_sft(sft)
    print(f"   steps {res['global_step']}, best eval loss {res['best_eval_loss']}")
    grpo = grpo_config(args, data_dir, out)
    print(f"== latent GRPO ({args.grpo_rows} prompts, head only) -> {grpo.output_dir}")
    check_finished_grpo(grpo, data_dir)
    res = run_grpo(grpo)
    last = res["log_history"][-1] if res["log_history"] else {}
    print(f"   steps {res['global_step']}, last reward {last.get('reward')}")
    return Path(sft.output_dir), Path(grpo.output_dir)


def check_finished_sft(cfg: LatentSFTConfig, data_dir: Path) -> None:
    """Refuse a finished latent SFT in ``cfg.output_dir`` made with other settings than ``cfg`` (the run would
    otherwise be reused as it is), naming the quickstart's flags (see
    :func:`llmrec.training.finished_runs.finished_sft_differences`)."""
    from llmrec.training.finished_runs import finished_sft_differences, refuse_other_finished_run

    refuse_other_finished_run(Path(cfg.output_dir), "latent SFT", finished_sft_differences(cfg, data_dir),
                              _REMEDY.format(out=cfg.output_dir), _SFT_FLAGS)


def check_finished_grpo(cfg: LatentGRPOConfig, data_dir: Path) -> None:
    """Refuse a finished latent GRPO in ``cfg.output_dir`` made with other settings than ``cfg`` (see
    :func:`llmrec.training.finished_runs.finished_grpo_differences`)."""
    from llmrec.training.finished_runs import finished_grpo_differences, refuse_other_finished_run

    refuse_other_finished_run(Path(cfg.output_dir), "latent GRPO", finished_grpo_differences(cfg, data_dir),
                              _REMEDY.format(out=cfg.output_dir), _GRPO_FLAGS)


def register_cli(subparsers) -> None:
    p = subparsers.add_parser("quickstart", help="the main job on the embedded sample (resumable)",
                              formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--dataset", default="games-sample", help="prepared directory or embedded sample")
    p.add_argument("--model", default="smollm2-135m", help="backbone (alias, hub id or local dir)")
    # Sized for a 2-core CPU without native bf16 (~20 min from a fresh venv): every LLM evaluation row costs 10
    # beams (~2-3 s in fp32 there), and each of the zero-shot, SFT and GRPO models is evaluated.
    p.add_argument("--rows", type=int, default=50, help="test rows evaluated (seeded subset)")
    p.add_argument("--beams", type=int, default=10, help="beams per row")
    p.add_argument("--batch-size", type=int, default=8, help="rows per batch")
    p.add_argument("--dtype", default="fast", help="model dtype; fast = bfloat16 where the hardware computes it "
                   "natively (CUDA, AVX512-BF16/AMX CPUs), else float32 (bf16 is ~20x slower on AVX2-only CPUs)")
    p.add_argument("--seed", type=int, default=0, help="seed of the row subsets and of training")
    p.add_argument("--train-rows", type=int, default=128, help="latent SFT train rows (0: no training stages)")
    p.add_argument("--grpo-rows", type=int, default=32, help="latent GRPO prompts")
    p.add_argument("--output-dir", default="runs/quickstart", help="where every stage writes")
    p.set_defaults(func=cmd_quickstart)
