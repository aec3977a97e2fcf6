"""Load a base model, or a trained checkpoint on top of it, for inference.

A checkpoint directory is one of:

* a full model saved with ``save_pretrained`` (``config.json`` + ``model.safetensors``, or its shards
  ``model-0000k-of-0000n.safetensors`` with ``model.safetensors.index.json``);
* a peft adapter in its standard form (``adapter_config.json`` + ``adapter_model.safetensors``),
  applied to its recorded base model and merged for speed; naming another base is an error (an adapter on
  the wrong base fails deep inside peft on a shape mismatch or, worse, loads).

A tokenizer saved in the checkpoint is preferred over the base model's (a trained checkpoint may
have added tokens). A directory that is neither form is a clear error listing what is missing.
"""

from __future__ import annotations

from pathlib import Path

import torch

from llmrec.data.canonical import read_stats

FULL_MODEL_FILES = ("config.json",)
ADAPTER_FILES = ("adapter_config.json", "adapter_model.safetensors")
# What only an llmrec latent checkpoint holds (beside llmrec_config.json, written after them).
LATENT_FILES = ("latent_embeddings.safetensors", "latent_config.json", "latent_head.safetensors")
# Written by an llmrec save before its first file and removed after its last: a folder holding it is a cut save
# (peft writes a complete-looking adapter first; the latent files and llmrec_config.json follow).
SAVE_IN_PROGRESS = ".llmrec_save_in_progress"


def mark_save_in_progress(directory: str | Path) -> None:
    """Write the :data:`SAVE_IN_PROGRESS` marker into ``directory``: the first step of every llmrec save (SFT and
    GRPO), which removes it after its last file."""
    from llmrec.data.canonical import atomic_write_text

    atomic_write_text(Path(directory) / SAVE_IN_PROGRESS,
                      "an llmrec save is being written here (a kill leaves this file)\n")


class CheckpointError(FileNotFoundError):
    """A checkpoint directory that is missing files."""


def remove_saved_model(directory: str | Path) -> list[str]:
    """Delete the model files a finished run saved at the top of ``directory`` (its llmrec_config.json, adapter
    or full weights, latent files); the names removed.

    ``retrain`` calls it: the finished run's model stayed beside the new run's output until its final save, so a
    new run cut short (no checkpoint-N yet) left the old model there for `llmrec evaluate` to read as the new one.
    """
    directory = Path(directory)
    names = ["llmrec_config.json", *ADAPTER_FILES, *FULL_MODEL_FILES, *LATENT_FILES, "model.safetensors.index.json",
             SAVE_IN_PROGRESS]
    files = [directory / n for n in names] + sorted(directory.glob("model*.safetensors"))
    removed = []
    for f in files:
        if f.is_file():
            f.unlink()
            removed.append(f.name)
    return removed


def checkpoint_kind(path: str | Path) -> str:
    """``"full"`` or ``"adapter"``; raises :class:`CheckpointError` naming the missing files, and
    :class:`~llmrec.data.canonical.DataFormatError` naming a damaged ``llmrec_config.json``."""
    path = Path(path)
    if not path.is_dir():
        raise CheckpointError(f"checkpoint directory not found: {path}")
    # llmrec's own checkpoint-N folders (SFT: llmrec_config.json, GRPO: grpo_state.json); another tool's
    # training output with checkpoint folders is not judged by llmrec's completion files.
    ours = [p for p in path.glob("checkpoint-*") if (p / "llmrec_config.json").exists() or (p / "grpo_state.json").exists()]
    if ours and not any((path / f).exists() for f in ("train_results.json", "grpo_results.json")):
        # A training output whose final save never finished (killed): its top-level files can be a mix of the
        # previous save and the starting point (head-only GRPO copies its SFT checkpoint there first), so
        # evaluating it would report another model's numbers under this name.
        raise CheckpointError(
            f"{path} is a training run that has not finished (checkpoint-N folders, but no train_results.json or "
            f"grpo_results.json): rerun the same `llmrec sft`/`llmrec grpo` command to finish it (an SFT run's "
            f"checkpoint-N folders are evaluable as they are)")
    if (path / SAVE_IN_PROGRESS).exists():
        # Cut after peft wrote the adapter: it looked like a plain LoRA adapter and was evaluated without the
        # latent tokens the model was trained with (a review).
        raise CheckpointError(
            f"{path} holds an llmrec save that was interrupted ({SAVE_IN_PROGRESS} is still there): use an earlier "
            f"checkpoint or rerun the training command")
    latent = [f for f in LATENT_FILES if (path / f).exists()]
    if latent and not (path / "llmrec_config.json").exists():
        # llmrec writes llmrec_config.json last: without it the save was cut, and the weights would load as a plain
        # LM, without the latent tokens the model was trained with.
        raise CheckpointError(
            f"{path} holds llmrec latent files ({', '.join(latent)}) but no llmrec_config.json, which an llmrec "
            f"save writes last: the save was interrupted; use an earlier checkpoint or rerun the training command")
    # Every loader (evaluate, GRPO's SFT checkpoint, load_for_inference) asks for the kind first: a damaged
    # llmrec_config.json is named here, not left to a bare json error that names no file.
    meta = read_stats(path / "llmrec_config.json")
    if (path / "llmrec_config.json").exists() and not (path / "latent_config.json").exists():
        # latent_config.json is written before llmrec_config.json, so only a hand deletion gets here; without it
        # the loaders built a plain LM (N=0) and evaluated the model without the latent tokens it was trained with.
        trained_latents = meta.get("num_latent_tokens") or len(meta.get("latent_token_ids") or [])
        if trained_latents or (path / "latent_head.safetensors").exists():
            raise CheckpointError(
                f"{path} was trained with latent tokens (llmrec_config.json, latent_head.safetensors), but its "
                f"latent_config.json (their ids and pooling head settings) is missing: restore it, or use an "
                f"earlier checkpoint")
    if all((path / f).exists() for f in ADAPTER_FILES):
        return "adapter"
    # The model's own weights, not any *.safetensors: a full latent checkpoint whose model.safetensors is gone
    # still holds latent_head.safetensors, and was called "full" (the dry run said READY, the load failed).
    weights = (path / "model.safetensors.index.json").exists() or any(path.glob("model*.safetensors"))
    if all((path / f).exists() for f in FULL_MODEL_FILES) and weights:
        return "full"
    present = sorted(p.name for p in path.iterdir())
    raise CheckpointError(
        f"{path} is not a usable checkpoint: expected a peft adapter ({', '.join(ADAPTER_FILES)}) or a full "
        f"model (config.json + model.safetensors, or model.safetensors.index.json and its shards); found "
        f"{present[:12] or 'nothing'}"
    )


def recorded_base(checkpoint: str | Path) -> tuple[str | None, str]:
    """``(base model, file it is recorded in)`` of an adapter checkpoint: llmrec's ``llmrec_config.json``
    first, else peft's ``adapter_config.json`` (``base_model_name_or_path``); ``(None, "")`` when neither has one."""
    ckpt = Path(checkpoint)
    for name, key in (("llmrec_config.json", "model_name_or_path"), ("adapter_config.json", "base_model_name_or_path")):
        if (ckpt / name).exists():
            value = read_stats(ckpt / name).get(key)  # damage named (file, line), not a bare json error
            if value:
                return str(value), name
    return None, ""


def _same_model(a: str, b: str) -> bool:
    """Two names of one base model: equal, or the same directory (an alias and its converted cache folder)."""
    if a == b:
        return True
    from llmrec.models.backbone import TINY_ALIASES, alias_cache_path, known_aliases

    def where(name: str) -> Path | None:
        if name in known_aliases() and name not in TINY_ALIASES:
            return alias_cache_path(name).resolve()
        return Path(name).resolve() if Path(name).is_dir() else None

    wa, wb = where(a), where(b)
    return wa is not None and wa == wb


def adapter_base(checkpoint: str | Path, model_name_or_path: str | None) -> str:
    """The base model to load an adapter checkpoint onto: its recorded base, which ``model_name_or_path`` (when
    given) must name. Raises :class:`ValueError` naming both on a mismatch, or when neither names a base."""
    recorded, source = recorded_base(checkpoint)
    if model_name_or_path and recorded and not _same_model(str(model_name_or_path), recorded):
        raise ValueError(
            f"{checkpoint} was trained on base model {recorded!r} ({source}), not {model_name_or_path!r}: "
            f"pass model_name_or_path {recorded!r}")
    base = model_name_or_path or recorded
    if not base:
        raise ValueError(f"{checkpoint}: no base model recorded; pass model_name_or_path")
    return str(base)


def load_for_inference(
    model_name_or_path: str | None,
    checkpoint: str | None = None,
    dtype: str = "bfloat16",
    device: torch.device | str | None = None,
):
    """Return ``(model, tokenizer)`` ready for evaluation (eval mode, on ``device``).

    An llmrec training checkpoint (it has ``llmrec_config.json``) gives a
    :class:`~llmrec.models.latent.LatentReasoningLM`; anything else a plain causal LM. For an adapter checkpoint
    ``model_name_or_path`` may be None (its recorded base) and must otherwise name that base.
    """
    from llmrec.models.backbone import load_backbone

    if checkpoint is None:
        model, tokenizer = load_backbone(model_name_or_path, dtype=dtype, device=device)
        return model, tokenizer
    kind = checkpoint_kind(checkpoint)
    ckpt = Path(checkpoint)
    if (ckpt / "llmrec_config.json").exists():
        # An llmrec SFT/GRPO checkpoint: adapter or full weights + latent head + latent embeddings.
        from llmrec.training.sft import load_sft_checkpoint

        model, tokenizer, _ = load_sft_checkpoint(ckpt, model_name_or_path, dtype=dtype, device=device)
        return model, tokenizer
    if kind == "full":
        model, tokenizer = load_backbone(str(ckpt), dtype=dtype, device=device)
        return model, tokenizer
    from peft import PeftModel

    from llmrec.safetensors_io import check_safetensors

    model, tokenizer = load_backbone(adapter_base(ckpt, model_name_or_path), dtype=dtype)
    if (ckpt / "tokenizer_config.json").exists():
        from transformers import AutoTokenizer

        tokenizer = AutoTokenizer.from_pretrained(str(ckpt))
        if tokenizer.pad_token is None:
            tokenizer.pad_token = tokenizer.eos_token
        if len(tokenizer) > model.get_input_embeddings().num_embeddings:
            model.resize_token_embeddings(len(tokenizer))
    check_safetensors(ckpt / "adapter_model.safetensors")  # named if damaged (peft would not)
    model = PeftModel.from_pretrained(model, str(ckpt)).merge_and_unload()
    model.eval()
    if device is not None:
        model.to(device)
    return model, tokenizer
