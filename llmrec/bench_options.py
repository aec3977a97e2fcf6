"""The command-line options of ``llmrec bench latent-sft`` and ``llmrec bench grpo``.

Apart from the benchmarks themselves, which import torch, peft and trl: building the ``llmrec`` parser imported them
all, so every command, ``--help`` included, paid ~9 s before doing anything (a review's profile).
"""

from __future__ import annotations

import argparse

from llmrec.config import LengthRange, int_at_least

LORA_TARGETS = "q_proj,k_proj,v_proj,o_proj,gate_proj,up_proj,down_proj"


def _add_batch_shape_arguments(ap: argparse.ArgumentParser) -> None:
    """The random batches' lengths, shared by both benchmarks."""
    ap.add_argument("--prompt-len", type=int, nargs=2, default=(150, 250), metavar=("MIN", "MAX"), action=LengthRange,
                    help="prompt lengths in tokens, drawn uniformly per row")
    ap.add_argument("--completion-len", type=int, nargs=2, default=(15, 25), metavar=("MIN", "MAX"),
                    action=LengthRange, help="target (title) lengths in tokens, drawn uniformly per row")


def add_latent_sft_arguments(ap: argparse.ArgumentParser) -> None:
    """The options of ``llmrec bench latent-sft``."""
    ap.add_argument("--model", default="smollm2-135m", help="backbone alias, directory or hub id")
    # bounded here: a count of 0 ended in a traceback, or (--exact-batches 0) in exactness numbers never measured
    ap.add_argument("--batch-size", type=int_at_least(1), default=4, help="rows per timed batch")
    _add_batch_shape_arguments(ap)
    ap.add_argument("--num-latent", type=int_at_least(1), default=1, help="latent tokens N of the latent forms")
    ap.add_argument("--num-batches", type=int_at_least(1), default=3, help="distinct batches, cycled over the steps")
    ap.add_argument("--warmup", type=int_at_least(0), default=2, help="untimed steps per variant")
    ap.add_argument("--steps", type=int_at_least(1), default=5, help="timed steps per variant (median reported)")
    ap.add_argument("--dtype", default="bfloat16", help="dtype of the timed runs")
    ap.add_argument("--lora-r", type=int_at_least(1), default=8, help="LoRA rank")
    ap.add_argument("--lora-targets", default=LORA_TARGETS, help="comma-separated module names LoRA adapts")
    ap.add_argument("--exact-batches", type=int_at_least(1), default=1,
                    help="batches used for the float32 exactness check (at most --num-batches)")
    ap.add_argument("--threads", type=int_at_least(0), default=0, help="torch threads (0 = torch default)")
    ap.add_argument("--seed", type=int, default=0, help="seed of the random batches and weights")
    ap.add_argument(
        "--clock", choices=("wall", "cpu"), default="wall",
        help="clock of the headline numbers: wall time, or this process's CPU time (robust when other "
        "processes share the cores; both are printed)",
    )


def add_grpo_arguments(ap: argparse.ArgumentParser) -> None:
    """The options of ``llmrec bench grpo``."""
    ap.add_argument("--model", default="smollm2-135m", help="backbone alias, directory or hub id")
    # bounded here: --num-batches 0 ended in a ZeroDivisionError, --steps 0 in "no median for empty data"
    ap.add_argument("--group-size", type=int_at_least(2), default=8, help="G members per prompt")
    ap.add_argument("--prompts", type=int_at_least(1), default=1, help="prompts per micro-batch (the paper: 1 group per device)")
    _add_batch_shape_arguments(ap)
    ap.add_argument("--num-batches", type=int_at_least(1), default=3, help="distinct batches, cycled over the steps")
    ap.add_argument("--warmup", type=int_at_least(0), default=1, help="untimed steps per form")
    ap.add_argument("--steps", type=int_at_least(1), default=3, help="timed steps per form (median reported)")
    ap.add_argument("--dtype", default="bfloat16", help="dtype of the timed runs")
    ap.add_argument("--noise-scale", type=float, default=1.5, help="absolute noise std of the members 1..G-1")
    ap.add_argument("--train-lora", action="store_true", help="also train LoRA adapters (default: head only)")
    ap.add_argument("--threads", type=int_at_least(0), default=0, help="torch threads (0 = torch default)")
    ap.add_argument("--seed", type=int, default=0, help="seed of the random batches and weights")
