"""Training settings that change nothing a run trains (a light module: the pipeline imports it at start-up).

``llmrec bench pipeline`` reuses a finished SFT/GRPO stage whatever these were, and ``llmrec sft`` / ``llmrec grpo``
resume a checkpoint whatever they are now.
"""

from __future__ import annotations

# Where and how often to log, how many data workers, which hub. ``model_dtype`` is checked as the concrete dtype a
# run recorded ("fast" and "bfloat16" may be one dtype); ``use_cpu`` follows the machine (set when no accelerator is
# found), as the ID-model check ignores the device; ``retrain`` says whether to train again, not how. The evaluation
# batch changes only the padding of the validation loss (in bf16 it may move that loss in the last digits, so a near
# tie between two checkpoints could in principle go the other way).
SFT_RESULT_NEUTRAL_FIELDS = frozenset({
    "output_dir", "logging_dir", "run_name", "report_to", "logging_steps", "logging_first_step", "logging_strategy",
    "logging_nan_inf_filter", "log_level", "log_level_replica", "log_on_each_node", "disable_tqdm",
    "skip_memory_metrics", "include_num_input_tokens_seen", "project", "trackio_space_id", "trackio_bucket_id",
    "trackio_static_space_id", "save_total_limit", "save_on_each_node", "dataloader_num_workers",
    "dataloader_persistent_workers", "dataloader_prefetch_factor", "dataloader_pin_memory", "per_device_eval_batch_size",
    "torch_empty_cache_steps", "ddp_timeout", "do_train", "do_predict", "resume_from_checkpoint", "push_to_hub",
    "hub_model_id", "hub_strategy", "hub_token", "hub_private_repo", "hub_always_push", "hub_revision", "model_dtype",
    "use_cpu", "retrain",
})
# Settings that act only when a run resumes from a checkpoint: not compared for a run that never resumed.
SFT_RESUME_ONLY_FIELDS = frozenset({"restore_callback_states_from_checkpoint", "ignore_data_skip", "save_only_model"})
# What a resume may change besides the neutral fields: the process layout of the same global batch (compared as
# ``global_train_batch_size``), and ``retrain``. ``model_dtype`` is compared (both sides are concrete dtypes).
RESUME_NEUTRAL_FIELDS = (SFT_RESULT_NEUTRAL_FIELDS - {"model_dtype"}) | SFT_RESUME_ONLY_FIELDS | {
    "per_device_train_batch_size", "gradient_accumulation_steps", "retrain"}
