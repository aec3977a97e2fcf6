"""Supervised fine-tuning with latent reasoning tokens (LatentR3 SFT; BIGRec when ``num_latent_tokens=0``).

The data path matches the evaluator's "separate" tokenization exactly: the prompt is tokenized on its
own *with* special tokens (BOS for Llama-style tokenizers), the completion (``"title"\\n``) on its own
*without* special tokens, and EOS is appended. Histories are cut from the left so that
prompt + latents + completion + EOS fit ``max_length``; the answer is never cut.

The model is :class:`llmrec.models.latent.LatentReasoningLM` around a LoRA (peft) or fully trained
causal LM; the pooling head always trains. The loss is the cross-entropy over the completion tokens
only, normalised by the number of completion tokens of the whole optimiser step (across gradient
accumulation and processes), as HF's causal-LM loss.

A checkpoint directory (``checkpoint-<step>`` and the final ``output_dir``) holds:

* the LM: a peft adapter in its standard form (``adapter_config.json`` + ``adapter_model.safetensors``)
  or, for ``finetune=full``, ``config.json`` + ``model*.safetensors``;
* ``latent_config.json`` (+ ``latent_head.safetensors`` for N >= 1), written by latent.py;
* ``latent_embeddings.safetensors`` (adapter checkpoints with N >= 1): the embedding rows of the latent
  token ids, which a resized vocabulary adds outside the adapter;
* the tokenizer (with the latent tokens), ``llmrec_config.json`` and ``training_args.json``;
* in ``checkpoint-*`` only, the Trainer's resume state (``optimizer.pt``, ``scheduler.pt``,
  ``rng_state*.pth``, ``trainer_state.json``).

:func:`load_sft_checkpoint` rebuilds a :class:`LatentReasoningLM` from such a directory for inference;
decode with ``prefill_with_latents`` and the constrained beam search (see ``tests/test_sft.py``).
"""

from __future__ import annotations

import json
import logging
import os
import random
import re
import shutil
import time
from collections.abc import Sequence
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
import transformers
from torch import nn

from llmrec.config import ConfigError
from llmrec.data.canonical import atomic_write_text, give_saved_weights_default_permissions
from llmrec.distributed import has_accelerator
from llmrec.models.latent import (
    IGNORE_INDEX,
    LATENT_HEAD_NAME,
    LatentConfig,
    LatentReasoningLM,
    add_latent_tokens,
    completion_cross_entropy,
)
from llmrec.training.neutral_fields import RESUME_NEUTRAL_FIELDS

logger = logging.getLogger(__name__)

__all__ = [
    "LLMREC_CONFIG_NAME",
    "LATENT_EMBEDDINGS_NAME",
    "LatentSFTCollator",
    "LatentSFTConfig",
    "LatentSFTModule",
    "LatentSFTTrainer",
    "build_model",
    "encode_example",
    "fill_global_batches",
    "last_complete_checkpoint",
    "load_sft_checkpoint",
    "load_sft_weights",
    "run_sft",
    "save_sft_checkpoint",
]

LLMREC_CONFIG_NAME = "llmrec_config.json"
LATENT_EMBEDDINGS_NAME = "latent_embeddings.safetensors"
TRAINING_ARGS_JSON = "training_args.json"
TRAIN_SECONDS_KEY = "train_seconds"  # in a checkpoint's training_args.json: the run's training time up to it
RESULTS_NAME = "train_results.json"
FINETUNE_MODES = ("lora", "qlora", "full")
# Fields of the SFT config stored in llmrec_config.json (what inference needs to rebuild prompts + model).
_CHECKPOINT_FIELDS = (
    "model_name_or_path", "dataset", "prompt", "noun", "history_length", "max_length", "num_latent_tokens",
    "latent_tokens", "head_num_heads", "head_dim", "rope_base", "head_dtype", "head_output_norm", "finetune", "model_dtype",
    "lora_r", "lora_alpha", "lora_dropout", "lora_target_modules",
)


def check_common_training_settings(config) -> None:
    """Refuse batch sizes < 1 (a ZeroDivisionError deep in the trainer) and a run of no steps (``max_steps`` not
    set and ``num_train_epochs`` <= 0: a finished-looking checkpoint of step 0), and an ``output_dir`` that is or
    lies under a file (found at the first save, after the training). Shared by SFT and GRPO configs."""
    from llmrec.data.canonical import check_directory_path

    for name in ("per_device_train_batch_size", "gradient_accumulation_steps"):
        if getattr(config, name) < 1:
            raise ConfigError(f"{name} must be >= 1, got {getattr(config, name)}")
    if not config.learning_rate > 0:  # AdamW refuses it only once the model is loaded
        raise ConfigError(f"learning_rate must be > 0, got {config.learning_rate}")
    if config.max_steps <= 0 and not 0 < config.num_train_epochs < float("inf"):
        raise ConfigError(f"num_train_epochs must be > 0 and finite when max_steps is not set (got num_train_epochs "
                          f"{config.num_train_epochs}, max_steps {config.max_steps}): the run would train nothing, "
                          "or never end")
    if config.output_dir:
        try:
            check_directory_path(config.output_dir, "output_dir")
        except ValueError as e:
            raise ConfigError(str(e)) from None


def global_train_batch_size(args, processes: int | None = None) -> int:
    """Rows per optimiser step over all processes (``per_device_train_batch_size x processes x accumulation``;
    ``processes`` defaults to ``args.world_size``)."""
    world = args.world_size if processes is None else processes
    return args.per_device_train_batch_size * world * args.gradient_accumulation_steps


# ----------------------------------------------------------------------------------------------- config


def check_lora_target_modules(modules: Sequence[str]) -> None:
    """Refuse a ``lora_target_modules`` peft would misread: no module (peft then fails deep in the model wrap),
    ``null``/``none`` given on the command line (read as a module named 'null'), or ``all-linear`` beside other
    names (peft knows the shorthand only alone, and looked for a module called 'all-linear')."""
    mods = list(modules or [])
    if not mods:
        raise ConfigError("lora_target_modules: give at least one module name (e.g. q_proj v_proj) or all-linear")
    for m in mods:
        if not isinstance(m, str) or m.strip().lower() in ("", "null", "none"):
            raise ConfigError(f"lora_target_modules: {m!r} is not a module name (give module names such as q_proj, "
                              "or all-linear)")
    if len(mods) > 1 and any(m.lower() == "all-linear" for m in mods):
        raise ConfigError(f"lora_target_modules: all-linear stands alone (it already covers every linear layer), "
                          f"got {mods}")


def peft_target_modules(modules: Sequence[str]) -> list[str] | str:
    """``lora_target_modules`` as ``peft.LoraConfig`` reads it: the shorthand ``all-linear`` works only as a
    string (in a list, peft looks for a module of that name); other names stay a list."""
    mods = list(modules)
    if len(mods) == 1 and mods[0].lower() == "all-linear":
        return "all-linear"
    return mods


@dataclass
class LatentSFTConfig(transformers.TrainingArguments):
    """SFT of a causal LM with latent reasoning tokens; defaults sized for a small CPU run."""

    model_name_or_path: str = field(
        default="tiny-qwen2",
        metadata={"help": "Base model: an llmrec alias (smollm2-135m, tiny-qwen2, ...), a local directory or a hub id."},
    )
    dataset: str = field(
        default="games-sample",
        metadata={"help": "Prepared dataset directory (llmrec data prepare) or the name of an embedded sample."},
    )
    train_split: str = field(default="train", metadata={"help": "Split to train on."})
    eval_split: str | None = field(
        default="valid", metadata={"help": "Split for the validation loss (model selection); empty/None = no eval."}
    )
    max_train_rows: int | None = field(
        default=None, metadata={"help": "Train on a seeded random subset of this many rows (None = all)."}
    )
    max_eval_rows: int | None = field(
        default=200, metadata={"help": "Validation loss on a seeded random subset of this many rows (None = all)."}
    )
    history_length: int = field(default=10, metadata={"help": "Most recent history items kept per row."})
    prompt: str = field(default="d3", metadata={"help": "Prompt template name (prompts/*.txt) or path."})
    noun: str = field(default="video games", metadata={"help": "Item noun used by the prompt template."})
    max_length: int = field(
        default=512,
        metadata={"help": "Max tokens of prompt + latents + completion + EOS; history is cut from the left, never the answer."},
    )
    num_latent_tokens: int = field(
        default=1, metadata={"help": "Number of latent thought tokens before the answer (0 = BIGRec baseline)."}
    )
    latent_tokens: list[str] | None = field(
        default=None, metadata={"help": "Latent token strings (default <|Thought|> / <|Thought_i|>)."}
    )
    head_num_heads: int = field(default=1, metadata={"help": "Attention heads of the latent pooling head."})
    head_dim: int | None = field(default=None, metadata={"help": "Pooling head query/key width per head (None = full)."})
    rope_base: float = field(default=1000.0, metadata={"help": "RoPE base of the pooling head."})
    head_dtype: str = field(default="float32", metadata={"help": "dtype of the pooling head."})
    head_output_norm: bool = field(
        default=False,
        metadata={"help": "End the pooling head with an RMSNorm starting at the input embeddings' RMS, so latents "
                  "enter the LM at a token embedding's scale (not the paper; off = the paper's head)."},
    )
    finetune: str = field(
        default="lora",
        metadata={"help": "lora (peft adapter on the LM), qlora (4-bit base via bitsandbytes + LoRA) or full.",
                  "choices": list(FINETUNE_MODES)},
    )
    lora_r: int = field(default=8, metadata={"help": "LoRA rank."})
    lora_alpha: int = field(default=16, metadata={"help": "LoRA alpha."})
    lora_dropout: float = field(default=0.05, metadata={
        "help": "LoRA dropout. Its masks come from each process's own generator: with dropout > 0, N processes "
                "train with other (equally distributed) masks than 1 process; 0 makes runs layout-exact."})
    lora_target_modules: list[str] = field(
        default_factory=lambda: ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"],
        metadata={"help": "Module names LoRA is applied to (suffixes of the model's module names, as peft reads "
                          "them), or all-linear alone: every linear layer but the output head (peft's shorthand)."},
    )
    model_dtype: str = field(
        default="bfloat16", metadata={"help": "dtype the base model is loaded in (bfloat16, float32, float16, or fast: "
                                            "bfloat16 where the hardware computes it natively, else float32)."}
    )
    retrain: bool = field(
        default=False,
        metadata={"help": "Train again, from the start, even if output_dir holds a finished run (train_results.json) "
                  "or an interrupted one: that run's checkpoint-* directories are removed first. By default a "
                  "finished run is skipped (so pipelines can be rerun) and an interrupted one resumed."},
    )
    early_stopping_patience: int = field(
        default=1, metadata={"help": "Stop after this many evaluations without a better eval_loss (0 = off); the "
                             "best checkpoint is then reloaded if load_best_model_at_end."}
    )
    restore_callback_states_from_checkpoint: bool = field(
        default=True,
        metadata={"help": "On resume, restore the callbacks' state (the early-stopping counter) from the checkpoint. "
                  "transformers' default (False) restarts the count, so a resumed run trained past the step where "
                  "the uninterrupted one stopped."},
    )
    # Trainer defaults changed for this task (D3/LatentR3 recipe, CPU sized).
    output_dir: str | None = field(default="runs/sft", metadata={"help": "Where checkpoints and results go."})
    learning_rate: float = field(default=3e-4, metadata={"help": "Peak learning rate (AdamW)."})
    weight_decay: float = field(default=0.0, metadata={"help": "AdamW weight decay."})
    warmup_steps: float = field(default=20, metadata={"help": "Linear warmup steps."})
    num_train_epochs: float = field(default=1.0, metadata={"help": "Training epochs."})
    per_device_train_batch_size: int = field(default=4, metadata={"help": "Micro-batch per process."})
    per_device_eval_batch_size: int = field(default=8, metadata={"help": "Eval batch per process."})
    eval_strategy: str = field(default="steps", metadata={"help": "no | steps | epoch."})
    eval_steps: float | None = field(default=50, metadata={"help": "Evaluate every N optimiser steps."})
    save_strategy: str = field(default="steps", metadata={"help": "no | steps | epoch | best."})
    save_steps: float = field(default=50, metadata={"help": "Checkpoint every N optimiser steps."})
    save_total_limit: int | None = field(default=2, metadata={"help": "Keep this many checkpoints (the best is kept)."})
    logging_steps: float = field(default=10, metadata={"help": "Log the training loss every N steps."})
    load_best_model_at_end: bool = field(default=True, metadata={"help": "Reload the best eval_loss checkpoint at the end."})
    metric_for_best_model: str | None = field(default="eval_loss", metadata={"help": "Model selection metric."})
    greater_is_better: bool | None = field(default=False, metadata={"help": "Whether a larger metric is better."})
    remove_unused_columns: bool = field(default=False, metadata={"help": "Must stay False (custom collator)."})
    report_to: None | str | list[str] = field(default="none", metadata={"help": "Logging integrations."})
    ddp_find_unused_parameters: bool | None = field(default=False, metadata={"help": "DDP unused-parameter search."})
    prediction_loss_only: bool = field(default=True, metadata={"help": "Eval computes the loss only."})

    def __post_init__(self) -> None:
        from llmrec.models.backbone import checked_dtype_name

        if self.report_to is None:  # `report_to: null`: TrainingArguments would keep [None] and the Trainer refuse it
            self.report_to = "none"
        self.model_dtype = checked_dtype_name(self.model_dtype, "model_dtype")
        if self.finetune not in FINETUNE_MODES:
            raise ConfigError(f"finetune must be one of {FINETUNE_MODES}, got {self.finetune!r}")
        if self.num_latent_tokens < 0:
            raise ConfigError("num_latent_tokens must be >= 0")
        if self.max_length <= self.num_latent_tokens + 2:
            raise ConfigError(f"max_length {self.max_length} is too small")
        if self.history_length < 1:
            raise ConfigError(f"history_length must be >= 1, got {self.history_length}")
        if isinstance(self.lora_target_modules, str):  # peft's own form (`"all-linear"`, one name) from Python
            self.lora_target_modules = [self.lora_target_modules]
        if self.finetune != "full":
            check_lora_target_modules(self.lora_target_modules)
        for name in ("max_train_rows", "max_eval_rows"):
            if getattr(self, name) is not None and getattr(self, name) < 1:
                raise ConfigError(f"{name} must be >= 1 (or null for all rows), got {getattr(self, name)}")
        try:  # the pooling head's settings, checked before any model is loaded (they failed only after)
            self.head_dtype = self.latent_config().head_dtype  # canonical ("bf16" -> "bfloat16"), as recorded
        except ValueError as e:
            raise ConfigError(f"latent head: {e}") from None
        reports = [self.report_to] if isinstance(self.report_to, str) else list(self.report_to or [])
        if "tensorboard" in reports:
            # transformers' callback raised a RuntimeError (a traceback) once training started; other integrations
            # are transformers' own to check
            from llmrec.tensorboard_log import require_tensorboard

            require_tensorboard()
        if self.finetune != "full":
            if self.lora_r < 1:
                raise ConfigError(f"lora_r must be >= 1, got {self.lora_r}")
            if not 0 <= self.lora_dropout < 1:
                raise ConfigError(f"lora_dropout must be in [0, 1), got {self.lora_dropout}")
        if self.early_stopping_patience < 0:  # a negative patience silently meant no early stopping
            raise ConfigError(f"early_stopping_patience must be >= 0 (0 = no early stopping), got "
                              f"{self.early_stopping_patience}")
        if self.save_only_model and str(getattr(self.save_strategy, "value", self.save_strategy)) != "no":
            # its checkpoints hold no optimiser, scheduler or RNG state, and transformers resumes from them
            # silently with a fresh AdamW and the warmup restarted
            raise ConfigError("save_only_model: true makes checkpoints llmrec cannot resume from (no optimiser, "
                              "scheduler or RNG state); remove it, or set save_strategy: no")
        if self.neftune_noise_alpha is not None:
            # NEFTune hooks the model's input embeddings, which the latent module does not expose (it failed with
            # an AttributeError at the start of training)
            raise ConfigError(f"neftune_noise_alpha: {self.neftune_noise_alpha} is not supported by llmrec's SFT; "
                              "remove it")
        if not self.average_tokens_across_devices:
            # the loss is a mean over every completion token of the global batch; per-process means weight a
            # process holding only loss-free filler rows as much as the others
            raise ConfigError("average_tokens_across_devices: false is not supported by llmrec's SFT (its loss "
                              "is the mean over every completion token of the global batch); remove it")
        check_common_training_settings(self)
        for name in ("batch_eval_metrics", "eval_use_gather_object"):
            # eval_loss is computed once from every validation row's loss sum and token count (see
            # LatentSFTTrainer.prediction_step); per-batch metrics and object gathering would break that
            # (gather_object joins batches row-wise: the first evaluation saw only some rows on 2 processes).
            if getattr(self, name):
                raise ConfigError(f"{name}: true is not supported by llmrec's SFT (eval_loss is computed over "
                                  "every validation row at once)")
        if self.label_smoothing_factor:
            # compute_loss is llmrec's completion-token cross-entropy: the factor would be ignored (it failed
            # with an AttributeError instead)
            raise ConfigError(f"label_smoothing_factor: {self.label_smoothing_factor} is not supported by llmrec's "
                              "SFT loss (plain completion-token cross-entropy); remove it")
        if self.include_for_metrics:
            # Nothing would read them (eval_loss is the only metric), and with "inputs" the evaluation loop
            # failed (seen in a review); refusing at config time beats failing at the first evaluation.
            raise ConfigError(f"include_for_metrics: {self.include_for_metrics!r} is not supported by llmrec's "
                              "SFT (its only eval metric is eval_loss, computed from per-row loss sums)")
        if self.eval_split in ("", "none", "None"):
            self.eval_split = None
        if self.eval_split is None:
            # No validation split: nothing to evaluate, select or stop on. Said, not silent (a recipe's
            # load_best_model_at_end: true with --eval_split none on the command line is this case).
            defaults = {f.name: f.default for f in fields(self)}
            off_values = {"eval_strategy": "no", "load_best_model_at_end": False, "early_stopping_patience": 0}
            off = [k for k, off_value in off_values.items()  # set away from both "off" and the default: asked for
                   if str(getattr(getattr(self, k), "value", getattr(self, k))) not in (str(off_value), str(defaults[k]))]
            if off:  # only what was asked for (a recipe's or the command line's), not the defaults
                logger.warning("eval_split is none: %s turned off (they need validation rows)", ", ".join(off))
            self.eval_strategy = "no"
            self.load_best_model_at_end = False
            self.early_stopping_patience = 0
        if self.eval_split is not None and (self.eval_split == "test" or self.eval_split == self.train_split):
            # Model selection on the rows a model is reported on (or trained on) makes its numbers optimistic:
            # allowed (a user may mean it), never silent.
            logger.warning("eval_split is %r: model selection then reads %s rows; the protocol selects on 'valid'",
                           self.eval_split, "test" if self.eval_split == "test" else "its own training")
        if not has_accelerator():
            self.use_cpu = True
        self.remove_unused_columns = False
        super().__post_init__()

    def latent_config(self) -> LatentConfig:
        return LatentConfig(
            num_latent_tokens=self.num_latent_tokens, latent_tokens=self.latent_tokens,
            head_num_heads=self.head_num_heads, head_dim=self.head_dim, rope_base=self.rope_base,
            head_dtype=self.head_dtype, head_output_norm=self.head_output_norm,
        )

    def checkpoint_fields(self) -> dict[str, Any]:
        return {k: getattr(self, k) for k in _CHECKPOINT_FIELDS}


# ------------------------------------------------------------------------------------------------- data


def encode_example(template, tokenizer, history_titles, target_title, max_length: int, noun: str,
                   num_latent_tokens: int) -> tuple[list[int], list[int], int]:
    """``(prompt_ids, completion_ids, dropped)`` in the evaluator's "separate" tokenization.

    prompt ids include special tokens; completion ids are the completion text without special tokens
    plus EOS. The oldest history items are dropped until prompt + latents + completion + EOS fit.
    """
    from llmrec.prompts import encode, render_to_fit

    rendered, dropped = render_to_fit(
        template, tokenizer, list(history_titles), target_title, max_length - num_latent_tokens, noun=noun
    )
    prompt_ids = encode(tokenizer, rendered["prompt"], first=True)
    completion_ids = tokenizer(rendered["completion"], add_special_tokens=False)["input_ids"]
    return list(prompt_ids), list(completion_ids) + [tokenizer.eos_token_id], dropped


class _ListDataset(torch.utils.data.Dataset):
    """Encoded rows; ``drawn_rows``: how many rows of the split were drawn for them (before rows that do not fit
    ``max_length`` were skipped), what a rerun with the same settings draws again."""

    def __init__(self, rows: list[dict], drawn_rows: int | None = None):
        self.rows = rows
        self.drawn_rows = len(rows) if drawn_rows is None else drawn_rows

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, i: int) -> dict:
        return self.rows[i]


def fill_global_batches(ds: _ListDataset, global_batch: int) -> _ListDataset:
    """``ds`` plus loss-free rows (copies of its first row marked ``no_loss``) up to a multiple of ``global_batch``.

    With several processes accelerate completes an epoch's short last batch with copies of the epoch's first
    rows, which were then trained on a second time: 2 processes did not give 1 process's weights. Rows that add
    no loss and no token to the normaliser fill every global batch instead; the number added depends on the
    global batch only, so 1 and N processes with the same global batch see the same rows in the same steps.
    """
    extra = -len(ds) % global_batch
    if not extra:
        return ds
    return _ListDataset(ds.rows + [dict(ds.rows[0], no_loss=True)] * extra)


def refuse_layout_dependent_drop_last(config: LatentSFTConfig, rows: int, processes: int) -> None:
    """Refuse ``dataloader_drop_last`` where what it drops depends on the process layout: with several processes or
    gradient accumulation and a train set that is not a whole number of global batches, transformers + accelerate
    drop the short micro-batch on one process (then take a smaller last step) but the whole incomplete round on
    several, so 2 processes trained other steps and weights than 1 with the same global batch (a review)."""
    if not config.dataloader_drop_last:
        return
    global_batch = global_train_batch_size(config, processes)
    if global_batch > config.per_device_train_batch_size and rows % global_batch:
        raise ConfigError(
            f"dataloader_drop_last with {rows} train rows, not a multiple of the global batch ({global_batch} = "
            f"{config.per_device_train_batch_size} x {processes} process(es) x {config.gradient_accumulation_steps} "
            "accumulation): what is dropped would depend on the process layout. Leave it off (llmrec then completes "
            "the last global batch with loss-free rows, the same on any layout), or set max_train_rows to a multiple "
            "of the global batch")


def _fills_global_batches(config: LatentSFTConfig, resume: str | None) -> bool:
    """Whether the run completes its last global batch with filler rows (:func:`fill_global_batches`): not with
    ``dataloader_drop_last`` (the partial batch is dropped, as asked), and not when resuming a checkpoint written
    before the fillers existed (its epoch order was drawn over the rows alone: the fillers would reshuffle it)."""
    if config.dataloader_drop_last:
        return False
    if resume:
        recorded = Path(resume) / TRAINING_ARGS_JSON
        if not recorded.exists() or "global_train_batch_size" not in json.loads(recorded.read_text(encoding="utf-8")):
            return False
    return True


def _subset(n: int, k: int | None, seed: int) -> list[int]:
    if k is None or k >= n:
        return list(range(n))
    return sorted(random.Random(seed).sample(range(n), k))


def build_dataset(config: LatentSFTConfig, tokenizer, split: str, max_rows: int | None) -> _ListDataset:
    from llmrec.data.canonical import load_prepared
    from llmrec.prompts import PromptError, PromptTemplate, check_titles_are_plain_text

    data = load_prepared(config.dataset, splits=[split], max_history=config.history_length)
    check_titles_are_plain_text(tokenizer, data.catalog.titles, data.catalog.item_ids, str(data.catalog.path))
    rows = data.splits[split]
    template = PromptTemplate.load(config.prompt)
    out, skipped, dropped_total = [], 0, 0
    drawn = _subset(len(rows), max_rows, config.seed)
    for i in drawn:
        row = rows[i]
        if not row["history_item_ids"]:
            # as `llmrec evaluate` and `llmrec seqrec train`: a row without history has no prompt to learn from
            raise data.row_error(split, i, "history_item_ids", "empty history")
        try:
            p, c, dropped = encode_example(
                template, tokenizer, row["history_titles"], row["target_title"], config.max_length, config.noun,
                config.num_latent_tokens,
            )
        except PromptError:
            skipped += 1
            continue
        dropped_total += dropped
        out.append({"prompt_ids": p, "completion_ids": c})
    if skipped:
        logger.warning("%s: skipped %d rows whose answer does not fit max_length=%d", split, skipped, config.max_length)
    logger.info("%s: %d rows (%d history items dropped to fit)", split, len(out), dropped_total)
    if not out:
        raise ValueError(f"split '{split}' of {config.dataset} has no usable rows")
    return _ListDataset(out, drawn_rows=len(drawn))


@dataclass
class LatentSFTCollator:
    """Left-padded prompts, right-padded completions (+ ``labels`` = completion ids, -100 on padding and on the
    rows marked ``no_loss``, which a ``no_loss_rows`` entry then flags; see :func:`fill_global_batches`)."""

    pad_token_id: int

    def __call__(self, features: list[dict]) -> dict[str, torch.Tensor]:
        b = len(features)
        pw = max(len(f["prompt_ids"]) for f in features)
        cw = max(len(f["completion_ids"]) for f in features)
        p_ids = torch.full((b, pw), self.pad_token_id, dtype=torch.long)
        p_mask = torch.zeros((b, pw), dtype=torch.long)
        c_ids = torch.full((b, cw), self.pad_token_id, dtype=torch.long)
        c_mask = torch.zeros((b, cw), dtype=torch.long)
        for r, f in enumerate(features):
            p, c = f["prompt_ids"], f["completion_ids"]
            p_ids[r, pw - len(p):] = torch.tensor(p, dtype=torch.long)
            p_mask[r, pw - len(p):] = 1
            c_ids[r, : len(c)] = torch.tensor(c, dtype=torch.long)
            c_mask[r, : len(c)] = 1
        no_loss = torch.tensor([bool(f.get("no_loss", False)) for f in features])
        batch = {
            "prompt_input_ids": p_ids,
            "prompt_attention_mask": p_mask,
            "completion_input_ids": c_ids,
            "completion_attention_mask": c_mask,
            "labels": c_ids.masked_fill((c_mask == 0) | no_loss[:, None], IGNORE_INDEX),
        }
        if bool(no_loss.any()):  # only then: a batch is otherwise exactly the model's inputs plus labels
            batch["no_loss_rows"] = no_loss
        return batch


# ------------------------------------------------------------------------------------------------ model


def _init_new_rows(lm: nn.Module, old_rows: int) -> None:
    """Deterministic init of rows added by a resize: the mean of the old rows (input and untied output)."""
    mats = [lm.get_input_embeddings().weight]
    out = lm.get_output_embeddings()
    if out is not None and out.weight is not mats[0]:
        mats.append(out.weight)
    with torch.no_grad():
        for w in mats:
            if w.shape[0] > old_rows:
                w[old_rows:] = w[:old_rows].float().mean(0, keepdim=True).to(w.dtype)


def _load_base(config: LatentSFTConfig):
    from llmrec.models.backbone import (
        keep_4bit_weights_trainable_on_cpu,
        load_backbone,
        qlora_quantization_config,
        resolve_dtype,
    )

    if config.finetune != "qlora":
        return load_backbone(config.model_name_or_path, dtype=config.model_dtype)
    compute_dtype = resolve_dtype(config.model_dtype)  # "bf16", "fp32", ... as everywhere (getattr(torch, ...) failed)
    if not isinstance(compute_dtype, torch.dtype):
        raise ConfigError(f"finetune=qlora computes in model_dtype, which must name a dtype (e.g. bfloat16), got "
                          f"{config.model_dtype!r}")
    try:
        quant = qlora_quantization_config(compute_dtype)
    except ImportError as e:
        raise ConfigError(str(e)) from None
    if not torch.cuda.is_available():
        logger.warning("finetune=qlora without a CUDA GPU: bitsandbytes runs its 4-bit layers on the CPU, correct "
                       "but slow; finetune=lora trains the same adapter on an unquantised base")
    from peft import prepare_model_for_kbit_training

    model, tok = load_backbone(config.model_name_or_path, dtype=config.model_dtype, quantization_config=quant)
    keep_4bit_weights_trainable_on_cpu(model)  # validation between steps would otherwise end training on a CPU
    # peft's default turns gradient checkpointing on; the config's own switch decides, as for LoRA and full.
    return prepare_model_for_kbit_training(model, use_gradient_checkpointing=bool(config.gradient_checkpointing)), tok


def upcast_non_4bit_parameters(model: nn.Module) -> None:
    """Cast the float16/bfloat16 parameters that are not 4-bit to float32, as peft's
    ``prepare_model_for_kbit_training`` does for QLoRA training: a QLoRA checkpoint reloads as the model it trained."""
    for p in model.parameters():
        if p.dtype in (torch.float16, torch.bfloat16) and p.__class__.__name__ != "Params4bit":
            p.data = p.data.float()


def _causal(m: nn.Module) -> nn.Module:
    get_base = getattr(m, "get_base_model", None)
    return get_base() if callable(get_base) else m


def build_model(config: LatentSFTConfig):
    """``(LatentReasoningLM, tokenizer)``: base LM + latent tokens + LoRA (or full) + a fresh pooling head."""
    transformers.set_seed(config.seed)
    base, tokenizer = _load_base(config)
    # Again after loading: the random initialisation below (LoRA, pooling head) must not depend on what loading
    # drew from the generator -- a GGUF alias's first use converts it in this process by building a randomly
    # initialised model first, which made that one run train differently from every later run of the same recipe.
    transformers.set_seed(config.seed)
    latent = config.latent_config()
    old_rows = base.get_input_embeddings().weight.shape[0]
    add_latent_tokens(tokenizer, base, latent)
    if base.get_input_embeddings().weight.shape[0] > old_rows:
        _init_new_rows(base, old_rows)
    if config.finetune in ("lora", "qlora"):
        from peft import LoraConfig, get_peft_model

        lora = LoraConfig(
            r=config.lora_r, lora_alpha=config.lora_alpha, lora_dropout=config.lora_dropout,
            target_modules=peft_target_modules(config.lora_target_modules), task_type="CAUSAL_LM", bias="none",
        )
        lm = get_peft_model(base, lora)
    else:
        lm = base
        for p in lm.parameters():
            p.requires_grad_(True)
        half = {p.dtype for p in lm.parameters()} & {torch.bfloat16, torch.float16}
        if half:
            # AdamW then updates the half-precision weights in place, with no float32 master copy: an update below
            # half a unit in the last place of a weight is rounded away (every RMSNorm weight near 1.0 stays
            # bit-identical at lr 3e-4). Not refused: it halves the memory and some users choose it knowingly.
            logger.warning(
                "finetune=full trains the weights in %s (model_dtype=%s): updates smaller than the weights' rounding "
                "step are lost (norm weights near 1.0 do not move at usual learning rates). For float32 weights "
                "under mixed precision set model_dtype: float32 and bf16: true (recipes/gpu/sft_latent_full.yaml).",
                str(next(iter(half))).replace("torch.", ""), config.model_dtype)
    from transformers.trainer_utils import align_special_tokens

    align_special_tokens(_causal(lm), tokenizer)
    model = LatentReasoningLM(lm, latent)
    if model.latent_head is not None:
        for p in model.latent_head.parameters():
            p.requires_grad_(True)
    return model, tokenizer


# ------------------------------------------------------------------------------------------- checkpoints


def _is_peft(m: nn.Module) -> bool:
    try:
        from peft import PeftModel
    except ImportError:  # pragma: no cover
        return False
    return isinstance(m, PeftModel)


def save_sft_checkpoint(model: LatentReasoningLM, tokenizer, output_dir: str | os.PathLike,
                        sft_fields: dict[str, Any] | None = None, training_args: dict | None = None,
                        finish: bool = True) -> None:
    """Write the LM (adapter or full), the latent head + config, the tokenizer and the llmrec config.

    ``finish=False`` leaves the save-in-progress marker for a caller that writes more files after (GRPO) and removes
    the marker itself after its last one."""
    from safetensors.torch import save_file

    from llmrec.models.checkpoint import SAVE_IN_PROGRESS, mark_save_in_progress

    out = Path(output_dir)
    out.mkdir(parents=True, exist_ok=True)
    # A save cut anywhere before its end must not load as a model (checkpoint_kind refuses the marker); the old
    # llmrec_config.json goes first, so a cut save is never read with the previous save's settings.
    mark_save_in_progress(out)
    (out / LLMREC_CONFIG_NAME).unlink(missing_ok=True)
    lm = model.model
    if _is_peft(lm):
        lm.save_pretrained(str(out), save_embedding_layers=False)
        ids = list(model.config.latent_token_ids or [])
        if ids:
            causal = model.causal_lm
            emb = causal.get_input_embeddings().weight
            rows = {"latent_token_ids": torch.tensor(ids), "input_embeddings": emb[ids].detach().cpu().contiguous()}
            head = causal.get_output_embeddings()
            if head is not None and head.weight is not emb:
                rows["output_embeddings"] = head.weight[ids].detach().cpu().contiguous()
            save_file(rows, str(out / LATENT_EMBEDDINGS_NAME), metadata={"format": "llmrec-latent"})
    else:
        lm.save_pretrained(str(out))
    model.save_pretrained(out)
    if tokenizer is not None:
        tokenizer.save_pretrained(str(out))
    payload = {"format": "llmrec-sft", "version": 1, "tokenization": "separate",
               "latent_token_ids": list(model.config.latent_token_ids or []),
               "embedding_rows": model.embed_tokens.weight.shape[0], **(sft_fields or {})}
    if training_args is not None:
        atomic_write_text(out / TRAINING_ARGS_JSON, json.dumps(training_args, indent=2, default=str) + "\n")
    atomic_write_text(out / LLMREC_CONFIG_NAME, json.dumps(payload, indent=2) + "\n")
    give_saved_weights_default_permissions(out)
    if finish:
        (out / SAVE_IN_PROGRESS).unlink()


def load_sft_weights(model: LatentReasoningLM, checkpoint: str | os.PathLike) -> None:
    """Load the trained weights of ``checkpoint`` (adapter or full LM, and the head) into ``model`` in place."""
    from llmrec.safetensors_io import load_safetensors

    ckpt = Path(checkpoint)
    lm = model.model
    if _is_peft(lm):
        from peft import set_peft_model_state_dict

        path = ckpt / "adapter_model.safetensors"
        if not path.exists():
            raise FileNotFoundError(f"{ckpt}: no adapter_model.safetensors to resume from")
        result = set_peft_model_state_dict(lm, load_safetensors(path))
        if result.unexpected_keys:
            raise ValueError(f"{ckpt}: unexpected adapter keys {result.unexpected_keys[:5]}")
        emb_path = ckpt / LATENT_EMBEDDINGS_NAME
        if emb_path.exists():
            rows = load_safetensors(emb_path)
            ids = rows["latent_token_ids"].tolist()
            causal = model.causal_lm
            with torch.no_grad():
                causal.get_input_embeddings().weight[ids] = rows["input_embeddings"].to(
                    causal.get_input_embeddings().weight.dtype)
                if "output_embeddings" in rows:
                    w = causal.get_output_embeddings().weight
                    w[ids] = rows["output_embeddings"].to(w.dtype)
    else:
        from transformers.trainer_utils import load_sharded_checkpoint

        single = ckpt / "model.safetensors"
        if single.exists():
            result = lm.load_state_dict(load_safetensors(single), strict=False)
        else:  # the same check for a sharded save (it was loaded unchecked)
            result = load_sharded_checkpoint(lm, str(ckpt), strict=False)
        tied = set(getattr(lm, "all_tied_weights_keys", {}) or {}) | set(getattr(lm, "_tied_weights_keys", None) or [])
        # A tied LM head is the embedding (saved once); an untied one must be in the checkpoint, or the model would
        # keep the base model's head silently (review).
        ties_head = bool(getattr(getattr(lm, "config", None), "tie_word_embeddings", False))
        missing = [k for k in result.missing_keys
                   if k not in tied and not (ties_head and k.endswith("lm_head.weight"))]
        if missing or result.unexpected_keys:
            raise ValueError(f"{ckpt}: missing {missing[:5]} / unexpected {result.unexpected_keys[:5]} weights")
    if model.latent_head is not None:
        head_path = ckpt / LATENT_HEAD_NAME
        if not head_path.exists():
            raise FileNotFoundError(f"{ckpt}: no {LATENT_HEAD_NAME}")
        model.latent_head.load_state_dict(load_safetensors(head_path), strict=True)


def load_sft_checkpoint(
    checkpoint: str | os.PathLike,
    model_name_or_path: str | None = None,
    dtype: str = "float32",
    device: torch.device | str | None = None,
    merge: bool = True,
) -> tuple[LatentReasoningLM, Any, dict[str, Any]]:
    """Load an SFT checkpoint for inference: ``(LatentReasoningLM in eval mode, tokenizer, llmrec config)``.

    For an adapter checkpoint, ``model_name_or_path`` (default: the one recorded in ``llmrec_config.json``)
    is loaded, resized to the checkpoint tokenizer, given the saved latent embedding rows, and the adapter
    is applied (merged when ``merge``; a QLoRA checkpoint's base is loaded in 4-bit, as it was trained, and
    never merged). A checkpoint without ``latent_config.json`` gives the plain LM (N=0).
    Decode with :meth:`LatentReasoningLM.prefill_with_latents` -> ``PromptState`` -> constrained beam search.
    """
    from transformers import AutoTokenizer

    from llmrec.models.backbone import load_backbone
    from llmrec.models.checkpoint import adapter_base, checkpoint_kind, recorded_base
    from llmrec.models.latent import LATENT_CONFIG_NAME
    from llmrec.safetensors_io import check_safetensors, load_safetensors

    ckpt = Path(checkpoint)
    kind = checkpoint_kind(ckpt)
    meta_path = ckpt / LLMREC_CONFIG_NAME
    meta = json.loads(meta_path.read_text(encoding="utf-8")) if meta_path.exists() else {}
    if kind == "full":
        if recorded_base(ckpt)[0]:
            # The weights are the checkpoint's own, but a caller naming another base would label the results
            # with it (the evaluator's protocol and run name): the same check as for an adapter.
            adapter_base(ckpt, model_name_or_path)
        lm, tokenizer = load_backbone(str(ckpt), dtype=dtype)
    else:
        from peft import PeftModel

        quantized = {}
        if meta.get("finetune") == "qlora":
            # The adapter was trained on the 4-bit base: applied to the unquantised one it is another model
            # (first-token logits moved by ~1e-2 on a tiny model). Kept unmerged: merging into 4-bit weights
            # requantises them.
            from llmrec.models.backbone import keep_4bit_weights_trainable_on_cpu, qlora_quantization_config

            # "auto" names no compute dtype: the one the adapter was trained in.
            compute = dtype if str(dtype) != "auto" else meta.get("model_dtype") or "float32"
            quantized = {"quantization_config": qlora_quantization_config(compute)}
            merge = False
            # "auto" would load (and quantise) the base in the dtype it is stored in; training quantised it from
            # model_dtype, so the 4-bit weights differed (first-token logits ~4e-2 apart on a tiny model)
            dtype = compute
        lm, tokenizer = load_backbone(adapter_base(ckpt, model_name_or_path), dtype=dtype, **quantized)
        if quantized:
            # bitsandbytes' CPU inference kernel (AVX512-BF16) rounds differently from the layout the adapter was
            # trained with (first-token logits ~4e-3 apart on a tiny model): evaluate what was trained. GRPO,
            # which loads through here, also needs it to train (that kernel has no backward).
            keep_4bit_weights_trainable_on_cpu(lm)
            # Training ran the layers that are not 4-bit (embeddings, norms, lm_head) in float32
            # (peft's prepare_model_for_kbit_training): in bfloat16 here they gave another model (~3e-3).
            upcast_non_4bit_parameters(lm)
        if (ckpt / "tokenizer_config.json").exists():
            tokenizer = AutoTokenizer.from_pretrained(str(ckpt))
            if tokenizer.pad_token is None:
                tokenizer.pad_token = tokenizer.eos_token
        rows = lm.get_input_embeddings().weight.shape[0]
        if len(tokenizer) > rows:
            lm.resize_token_embeddings(len(tokenizer), mean_resizing=False)
            _init_new_rows(lm, rows)
        emb_path = ckpt / LATENT_EMBEDDINGS_NAME
        if emb_path.exists():
            saved = load_safetensors(emb_path)
            ids = saved["latent_token_ids"].tolist()
            with torch.no_grad():
                w = lm.get_input_embeddings().weight
                w[ids] = saved["input_embeddings"].to(w.dtype)
                if "output_embeddings" in saved:
                    o = lm.get_output_embeddings().weight
                    o[ids] = saved["output_embeddings"].to(o.dtype)
        check_safetensors(ckpt / "adapter_model.safetensors")  # named if damaged (peft would not)
        lm = PeftModel.from_pretrained(lm, str(ckpt))
        if merge:
            lm = lm.merge_and_unload()
    if (ckpt / LATENT_CONFIG_NAME).exists():
        model = LatentReasoningLM.from_pretrained(ckpt, lm, tokenizer)
    else:
        model = LatentReasoningLM(lm, LatentConfig(num_latent_tokens=0))
    model.eval()
    if device is not None:
        model.to(device)
    return model, tokenizer, meta


_CKPT_RE = re.compile(r"^checkpoint-(\d+)$")


def last_complete_checkpoint(output_dir: str | os.PathLike) -> str | None:
    """The highest ``checkpoint-N`` in ``output_dir`` whose save finished (``trainer_state.json`` written last)."""
    folder = Path(output_dir)
    if not folder.is_dir():
        return None
    found = []
    for p in folder.iterdir():
        m = _CKPT_RE.match(p.name)
        if m and p.is_dir() and _readable_state(p / "trainer_state.json"):
            found.append((int(m.group(1)), p))
    return str(max(found)[1]) if found else None


def _stopped_at(checkpoint: str | os.PathLike) -> bool:
    """Whether training stopped at ``checkpoint`` (early stopping): the saved TrainerControl says so."""
    state = json.loads((Path(checkpoint) / "trainer_state.json").read_text(encoding="utf-8"))
    control = (state.get("stateful_callbacks") or {}).get("TrainerControl") or {}
    return bool((control.get("args") or {}).get("should_training_stop"))


def _checkpoint_step(checkpoint: str | os.PathLike) -> int:
    """The optimiser step a checkpoint was saved at (its ``trainer_state.json``)."""
    state = json.loads((Path(checkpoint) / "trainer_state.json").read_text(encoding="utf-8"))
    return int(state.get("global_step", 0))


def _readable_state(path: Path) -> bool:
    """transformers writes ``trainer_state.json`` in place, not atomically: a kill during that write leaves it
    empty or cut short, and resuming from it failed on every rerun (a bare JSON error). Such a checkpoint is
    incomplete, so the previous one is used."""
    try:
        json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        if path.exists():
            logger.warning("%s is empty or cut short (a save was interrupted): not resuming from %s",
                           path, path.parent.name)
        return False
    return True


# ---------------------------------------------------------------------------------------------- trainer


class LatentSFTModule(nn.Module):
    """What the Trainer holds: a pass-through around :class:`LatentReasoningLM`.

    The wrapper's ``config`` attribute is a :class:`LatentConfig`, which the Trainer would mistake for a
    transformers config (it calls ``model.config.get_text_config()``); this module has no ``config``.
    """

    def __init__(self, latent_lm: LatentReasoningLM):
        super().__init__()
        self.latent_lm = latent_lm

    def forward(self, **kwargs):
        return self.latent_lm(**kwargs)

    def activation_checkpointing_enable(self, activation_checkpointing_kwargs: dict | None = None,
                                        every_n_layers: int = 1, offload: bool = False) -> None:
        """The Trainer's ``gradient_checkpointing``, applied to the base LM's decoder layers (transformers'
        default there is non-reentrant, which also gives a LoRA adapter its gradients when no input of a
        checkpointed layer requires grad, as without a latent token)."""
        self.latent_lm.causal_lm.activation_checkpointing_enable(
            activation_checkpointing_kwargs=activation_checkpointing_kwargs, every_n_layers=every_n_layers,
            offload=offload)

    def activation_checkpointing_disable(self) -> None:
        self.latent_lm.causal_lm.activation_checkpointing_disable()


def _eval_loss_from_row_sums(prediction: transformers.EvalPrediction) -> dict[str, float]:
    """eval_loss = completion tokens' summed cross-entropy over all validation rows / their token count.

    ``prediction.predictions`` holds one ``[loss sum, token count]`` per validation row (from
    :meth:`LatentSFTTrainer.prediction_step`), so the value is the same however the rows were batched and
    split over processes (the token-level mean of the training loss, over the whole split).
    """
    preds = prediction.predictions
    batches = preds if isinstance(preds, (list, tuple)) else [preds]  # a list when eval_do_concat_batches=False
    sums = np.concatenate([np.asarray(b, dtype=np.float64).reshape(-1, 2) for b in batches])
    return {"loss": float(sums[:, 0].sum() / max(sums[:, 1].sum(), 1.0))}


def _latent_lm(module: nn.Module) -> LatentReasoningLM:
    while not isinstance(module, LatentReasoningLM):
        inner = getattr(module, "latent_lm", None)
        if inner is None:
            inner = getattr(module, "module", None)  # DDP and friends
        if inner is None:
            raise TypeError(f"no LatentReasoningLM inside {type(module).__name__}")
        module = inner
    return module


class LatentSFTTrainer(transformers.Trainer):
    """Trainer for :class:`LatentReasoningLM`: completion-only loss, llmrec checkpoint layout."""

    def __init__(self, *args, sft_config: LatentSFTConfig | None = None, **kwargs):
        if kwargs.get("compute_metrics") is not None:
            raise ValueError("LatentSFTTrainer computes eval_loss itself (per row, see prediction_step); "
                             "compute_metrics is not supported")
        kwargs["compute_metrics"] = _eval_loss_from_row_sums
        super().__init__(*args, **kwargs)
        self.sft_config = sft_config if sft_config is not None else (
            self.args if isinstance(self.args, LatentSFTConfig) else None)
        # The loss below is a sum normalised by the step's completion-token count (num_items_in_batch).
        self.model_accepts_loss_kwargs = True
        self._loss_shifts_labels = False

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        inputs = dict(inputs)
        inputs.pop("labels", None)
        no_loss = inputs.pop("no_loss_rows", None)
        out = model(**inputs)
        labels = out.labels
        if no_loss is not None and bool(no_loss.any()):  # batch-filling rows (fill_global_batches): no loss
            labels = labels.masked_fill(no_loss.to(labels.device)[:, None], IGNORE_INDEX)
        if num_items_in_batch is None:
            loss = completion_cross_entropy(out.logits, labels)
        else:
            loss = completion_cross_entropy(out.logits, labels, reduction="sum") / num_items_in_batch
            if self.args.average_tokens_across_devices and self.args.world_size > 1:
                loss = loss * self.accelerator.num_processes
        return (loss, out) if return_outputs else loss

    def prediction_step(self, model, inputs, prediction_loss_only, ignore_keys=None):
        """Per-row ``[loss sum, completion tokens]`` as the "predictions"; ``eval_loss`` is computed from them.

        Why not a batch loss: transformers repeats a batch's scalar loss once per row, and on several processes
        accelerate pads the last partial batch with copies of early rows. ``gather_for_metrics`` drops the
        copies' rows, but a batch mean has them mixed in, so eval_loss (model selection, early stopping)
        depended on the number of processes. Per-row values come out of the gather exactly once per row.
        """
        inputs = dict(self._prepare_inputs(inputs))
        inputs.pop("labels", None)
        inputs.pop("no_loss_rows", None)  # validation rows are never filled (fill_global_batches is for training)
        with torch.no_grad():
            out = model(**inputs)
            token_loss = F.cross_entropy(out.logits.reshape(-1, out.logits.shape[-1]).float(),
                                         out.labels.reshape(-1), ignore_index=IGNORE_INDEX,
                                         reduction="none").view(out.labels.shape)
            row_stats = torch.stack([token_loss.sum(1), (out.labels != IGNORE_INDEX).sum(1).float()], dim=1)
        # label_ids must be non-None for transformers to call compute_metrics; nothing reads them.
        return None, row_stats, torch.zeros(len(row_stats), device=row_stats.device)

    def _save(self, output_dir: str | None = None, state_dict: dict | None = None) -> None:
        output_dir = output_dir if output_dir is not None else self.args.output_dir
        if not self.args.should_save:
            return
        model = _latent_lm(self.accelerator.unwrap_model(self.model))
        fields_ = self.sft_config.checkpoint_fields() if self.sft_config is not None else {}
        # the trainer's process count: args.world_size reads a state a resume may have reset
        args = dict(self.args.to_dict(),
                    global_train_batch_size=global_train_batch_size(self.args, self.accelerator.num_processes))
        if getattr(self, "data_sha256", None) is not None:  # a resume on other data is refused (run_sft)
            args["data_sha256"] = self.data_sha256
        clock = getattr(self, "training_clock", None)  # (seconds before this invocation, its training start)
        if clock is not None:  # the run's training time up to this checkpoint, added by a run resuming from it
            args[TRAIN_SECONDS_KEY] = clock[0] + time.time() - clock[1]
        save_sft_checkpoint(model, self.processing_class, output_dir, fields_, args)

    def _load_from_checkpoint(self, resume_from_checkpoint: str, model: nn.Module | None = None) -> None:
        target = _latent_lm(self.accelerator.unwrap_model(model if model is not None else self.model))
        logger.info("resuming weights from %s", resume_from_checkpoint)
        load_sft_weights(target, resume_from_checkpoint)

    def _finalize_training(self, *args, **kwargs):
        # transformers averages the logged losses over the processes (nested_gather(...).mean()) but adds the steps
        # after the last log from this process's own accumulator. compute_loss's value is a per-process share of the
        # global token mean (local sum / global tokens x processes), so that remainder, ungathered, made train_loss
        # depend on the process count and differ between ranks whenever logging_steps does not divide the steps
        # (a review: 6.4974 on 2 processes vs 6.2933 on 1, identical weights). Gathered here as the logs are.
        if self.args.world_size > 1:
            from transformers.trainer_pt_utils import nested_gather

            self._tr_loss = nested_gather(self._tr_loss.detach().clone(), self.args.parallel_mode).mean()
        return super()._finalize_training(*args, **kwargs)

    def _load_best_model(self) -> None:
        logger.info("loading best model from %s (eval_loss %s)", self.state.best_model_checkpoint,
                    self.state.best_metric)
        load_sft_weights(_latent_lm(self.accelerator.unwrap_model(self.model)), self.state.best_model_checkpoint)


# ------------------------------------------------------------------------------------------------ run


class LogAtCheckpoints(transformers.TrainerCallback):
    """Close the loss-log window at every step a checkpoint may be saved at.

    transformers restarts its log window at the checkpoint a run resumes from: resumed between two logs, the next log
    averaged only the steps since the checkpoint under the same step label as the uninterrupted run's, and the run's
    mean train_loss could not be computed (a review: step 4's logged loss 6.2571 resumed vs 6.2819). Logging at
    every save (and every evaluation under ``save_strategy: best``) makes each checkpoint a log boundary.
    """

    def _log_if_saving(self, args, control):
        if args.logging_strategy != "no" and (
                control.should_save or (control.should_evaluate and args.save_strategy == "best")):
            control.should_log = True
        return control

    def on_step_end(self, args, state, control, **kwargs):
        return self._log_if_saving(args, control)

    def on_epoch_end(self, args, state, control, **kwargs):
        return self._log_if_saving(args, control)


def _mean_train_loss(train_out, history: list[dict], global_step: int, resumed_at: int | None) -> float | None:
    """The training loss averaged over every step of the run.

    transformers' ``training_loss`` averages only the steps trained in this invocation: after a resume it is the
    mean of the remaining steps (0.0 when resumed at the last step). A resumed run (``resumed_at``: the step of the
    checkpoint it resumed from) takes the step-weighted mean of the logged losses instead (restored with the
    checkpoint; logged to 4 decimals); None when the logs do not reach the last step (``logging_steps`` does not
    divide it) or when the run resumed between two logs (the first log after it averages only the steps since the
    resume: the steps between the previous log and the checkpoint are in no log).
    """
    if train_out is not None and resumed_at is None:
        return train_out.training_loss
    logged = [(h["step"], h["loss"]) for h in history if "loss" in h]
    if not logged or logged[-1][0] != global_step:
        return None
    if resumed_at and resumed_at not in {step for step, _ in logged} and resumed_at < global_step:
        return None
    total, previous = 0.0, 0
    for step, loss in logged:
        total += loss * (step - previous)
        previous = step
    return total / global_step


def _data_digests(dataset: str | None) -> dict[str, str | None] | None:
    """The prepared files a run reads, by content (:func:`llmrec.data.identity.data_sha256`), or None if the dataset
    cannot be found: recorded in the results, so a finished run is not reused on other data at the same path."""
    from llmrec.data.identity import data_sha256
    from llmrec.training.finished_runs import dataset_dir_or_none

    data_dir = dataset_dir_or_none(dataset)
    return data_sha256(data_dir) if data_dir is not None else None


def refuse_changed_sft_resume(config: LatentSFTConfig, checkpoint: str | os.PathLike, processes: int | None = None,
                              data_digests: dict[str, str | None] | None = None) -> None:
    """Raise :class:`~llmrec.config.ConfigError` if resuming ``checkpoint`` under ``config`` would change a trained
    setting (``processes``: the launch's process count, for the global batch; default the running one) or the data
    (its digests, recorded since 2026-12-05; older checkpoints are compared by settings only). The dry run asks the
    same question."""
    from llmrec.config import field_defaults, refuse_changed_resume
    from llmrec.data.identity import data_difference
    from llmrec.training.finished_runs import dataset_dir_or_none

    recorded = Path(checkpoint) / TRAINING_ARGS_JSON
    if not recorded.exists():
        return
    found = json.loads(recorded.read_text(encoding="utf-8"))
    wanted = config.to_dict()
    if "global_train_batch_size" in found:  # recorded since 2026-12-05
        wanted["global_train_batch_size"] = global_train_batch_size(config, processes)
    # the dataclass defaults: building a LatentSFTConfig here would reset the accelerator state
    refuse_changed_resume(checkpoint, found, wanted, field_defaults(LatentSFTConfig), ignore=RESUME_NEUTRAL_FIELDS,
                          paths=("dataset",))
    if data_digests is None:
        data_digests = _data_digests(config.dataset)
    other = data_digests and data_difference(found, dataset_dir_or_none(config.dataset), data_digests)
    if other:
        raise ConfigError(f"{checkpoint} was trained on {other}: resuming would mix steps on both; set retrain: "
                          "true to train again on this data, or train in another output_dir")


def layout_change(found: dict[str, Any], config: Any, processes: int | None = None) -> dict[str, int] | None:
    """The process layout a checkpoint's recorded settings ``found`` were trained with (``world_size``,
    ``per_device_train_batch_size``, ``gradient_accumulation_steps``) if ``config`` on ``processes`` (default its
    ``world_size``) changes it, else None (also for settings recording no global batch, from before 2026-12-05).
    A resume may change the layout of the same global batch, but with dropout the masks are drawn per micro-batch
    and process: the run is then neither layout's uninterrupted run."""
    if "global_train_batch_size" not in found:
        return None
    per_device, accumulation = int(found["per_device_train_batch_size"]), int(found["gradient_accumulation_steps"])
    before = {"world_size": int(found["global_train_batch_size"]) // (per_device * accumulation),
              "per_device_train_batch_size": per_device, "gradient_accumulation_steps": accumulation}
    return before if before != current_layout(config, processes) else None


def current_layout(config: Any, processes: int | None = None) -> dict[str, int]:
    """The process layout ``config`` trains with on ``processes`` (default its ``world_size``), as
    :func:`layout_change` reports a recorded one."""
    return {"world_size": config.world_size if processes is None else processes,
            "per_device_train_batch_size": config.per_device_train_batch_size,
            "gradient_accumulation_steps": config.gradient_accumulation_steps}


def layout_text(layout: dict[str, int]) -> str:
    """``"2 process(es) x 4 rows x accumulation 1"``."""
    return (f"{layout['world_size']} process(es) x {layout['per_device_train_batch_size']} rows x accumulation "
            f"{layout['gradient_accumulation_steps']}")


def run_sft(config: LatentSFTConfig, callbacks: list | None = None) -> dict:
    """Train; resume from the last complete checkpoint in ``output_dir``; write ``train_results.json``.

    ``callbacks`` are extra ``TrainerCallback`` objects (early stopping is added from the config).
    Returns the results dict (also written, atomically, to ``output_dir/train_results.json``).
    """
    from llmrec.training.finished_runs import LLM_CHECKPOINT_FILES, refuse_other_kind_of_run

    t0 = time.time()
    out_dir = Path(config.output_dir)
    refuse_other_kind_of_run(out_dir, "`llmrec sft`", own=LLM_CHECKPOINT_FILES)
    if (out_dir / RESULTS_NAME).exists() and not config.retrain:
        # A finished run is not resumed: early stopping ended it, and resuming would train on past that point. It is
        # returned only if it was made with the settings asked for now (not silently another run's results).
        from llmrec.training.finished_runs import (
            dataset_dir_or_none,
            finished_sft_differences,
            refuse_other_finished_run,
        )

        diff = finished_sft_differences(config, dataset_dir_or_none(config.dataset))
        refuse_other_finished_run(out_dir, "SFT run", diff,
                                  "set retrain: true to train it again with these settings, or use another output_dir")
        logger.info("%s holds a finished run (%s) made with these settings; skipping (set retrain: true to train "
                    "again)", out_dir, RESULTS_NAME)
        return json.loads((out_dir / RESULTS_NAME).read_text(encoding="utf-8"))
    from accelerate import PartialState

    old = sorted(p for p in out_dir.glob("checkpoint-*") if p.is_dir())
    if config.retrain and ((out_dir / RESULTS_NAME).exists() or old):
        from llmrec.models.checkpoint import remove_saved_model

        # Resuming from the old run's last checkpoint would train nothing (a finished run) or continue it (a cut
        # one, which the resume refusal tells to set retrain); and a stale checkpoint with a higher step than this
        # run reaches would be what a later resume of this run picks up.
        logger.warning("retrain: training %s again from the start; removing the old run's %d checkpoint(s)",
                       out_dir, len(old))
        if PartialState().is_main_process:
            for ckpt in old:
                shutil.rmtree(ckpt)
            (out_dir / RESULTS_NAME).unlink(missing_ok=True)
            remove_saved_model(out_dir)  # a retrain cut short must not leave the old model readable as the new one
        PartialState().wait_for_everyone()
    # Every process picks the checkpoint itself: without a barrier a process could look before another had finished
    # writing the last one (transformers' save has no barrier after rank 0 writes), and the two resumed from different
    # steps and hung in their first collective (a run retried in the same process after an error, a review).
    PartialState().wait_for_everyone()
    resume = last_complete_checkpoint(out_dir)
    # Read now: the checkpoint rotation (save_total_limit) deletes the resumed-from checkpoint once later ones are
    # saved, and reading it after training crashed the run before its results were written.
    resumed_at = _checkpoint_step(resume) if resume else None
    data_digests = _data_digests(config.dataset)
    layout_before = None
    if resume:  # before the model is built: a changed setting or other data is refused at once
        refuse_changed_sft_resume(config, resume, data_digests=data_digests)
        recorded = Path(resume) / TRAINING_ARGS_JSON
        layout_before = layout_change(json.loads(recorded.read_text(encoding="utf-8")), config) \
            if recorded.exists() else None
        if layout_before is not None and config.lora_dropout > 0 and config.finetune != "full":
            logger.warning("resuming %s, trained with %s, as %s: with lora_dropout %g the masks are drawn per "
                           "micro-batch and process, so the run is neither layout's uninterrupted run (recorded as "
                           "layout_before_resume)", resume, layout_text(layout_before),
                           layout_text(current_layout(config)), config.lora_dropout)
    model, tokenizer = build_model(config)
    t_model = time.time()
    train_ds = build_dataset(config, tokenizer, config.train_split, config.max_train_rows)
    num_train_rows, drawn_train_rows = len(train_ds), train_ds.drawn_rows
    refuse_layout_dependent_drop_last(config, num_train_rows, config.world_size)
    if _fills_global_batches(config, resume):
        train_ds = fill_global_batches(train_ds, global_train_batch_size(config))
    eval_ds = build_dataset(config, tokenizer, config.eval_split, config.max_eval_rows) if config.eval_split else None
    t_data = time.time()
    callbacks = [LogAtCheckpoints(), *(callbacks or [])]
    if eval_ds is not None and config.early_stopping_patience > 0 and config.eval_strategy != "no":
        # without load_best_model_at_end the last weights are kept
        callbacks.append(transformers.EarlyStoppingCallback(early_stopping_patience=config.early_stopping_patience))
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    trainer = LatentSFTTrainer(
        model=LatentSFTModule(model), args=config, train_dataset=train_ds, eval_dataset=eval_ds,
        data_collator=LatentSFTCollator(pad), processing_class=tokenizer, callbacks=callbacks, sft_config=config,
    )
    trainer.data_sha256 = data_digests  # recorded in each checkpoint
    # Training time before this invocation (a resumed run: up to its checkpoint): timings_s.train counted only the
    # last invocation (a review); the pipeline report reads it as the stage's training time.
    train_s_before = (float(json.loads((Path(resume) / TRAINING_ARGS_JSON).read_text()).get(TRAIN_SECONDS_KEY, 0.0))
                      if resume and (Path(resume) / TRAINING_ARGS_JSON).exists() else 0.0)
    trainer.training_clock = (train_s_before, t_data)
    if resume:
        logger.info("resuming from %s", resume)
    if resume and _stopped_at(resume):
        # Killed after the checkpoint where early stopping ended the run and before the final save: resuming
        # would train on past the stop (transformers does not honour the saved stop), so finish from the
        # checkpoint's state instead: the best model, as the uninterrupted run does.
        logger.info("%s is where early stopping ended the run; finishing without training further", resume)
        trainer.state = transformers.TrainerState.load_from_json(str(Path(resume) / "trainer_state.json"))
        if config.load_best_model_at_end and trainer.state.best_model_checkpoint is not None:
            trainer._load_best_model()
        else:
            trainer._load_from_checkpoint(resume)
        train_out = None
    else:
        train_out = trainer.train(resume_from_checkpoint=resume)
    t_train = time.time()
    trainer.save_model(str(out_dir))
    history = trainer.state.log_history
    results = {
        "output_dir": str(out_dir),
        "resumed_from": resume,
        "global_step": trainer.state.global_step,
        "train_loss": _mean_train_loss(train_out, history, trainer.state.global_step,
                                       resumed_at=resumed_at),
        "train_losses": [{"step": h["step"], "loss": h["loss"]} for h in history if "loss" in h],
        "eval_losses": [{"step": h["step"], "eval_loss": h["eval_loss"]} for h in history if "eval_loss" in h],
        "best_checkpoint": trainer.state.best_model_checkpoint,
        "best_eval_loss": trainer.state.best_metric,
        "num_train_rows": num_train_rows,
        # the rows drawn before those that do not fit max_length were skipped: what a rerun is compared by
        "drawn_train_rows": drawn_train_rows,
        "num_eval_rows": len(eval_ds) if eval_ds is not None else 0,
        "data_sha256": data_digests,
        "world_size": config.world_size,
        **({"layout_before_resume": layout_before} if layout_before is not None else {}),
        # train: every invocation's training (to the checkpoint a resume took up); the others this invocation's
        "timings_s": {"model": round(t_model - t0, 3), "data": round(t_data - t_model, 3),
                      "train": round(train_s_before + t_train - t_data, 3),
                      "train_before_resume": round(train_s_before, 3), "total": round(time.time() - t0, 3)},
        "config": config.checkpoint_fields(),
        "metrics": train_out.metrics if train_out is not None else {},
    }
    if resumed_at is not None and "train_loss" in results["metrics"]:
        # transformers' is the mean over this invocation's steps only; the run's is above (or None if unknown)
        results["metrics"] = dict(results["metrics"], train_loss=results["train_loss"])
    if config.should_save:
        atomic_write_text(out_dir / RESULTS_NAME, json.dumps(results, indent=2, default=str) + "\n")
    return results

