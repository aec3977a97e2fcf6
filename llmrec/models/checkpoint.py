"""Load a base model, or a trained checkpoint on top of it, for inference.

A checkpoint directory is one of:

* a full model saved with ``save_pretrained`` (``config.json`` + ``*.safetensors``);
* a peft adapter in its standard form (``adapter_config.json`` + ``adapter_model.safetensors``),
  applied to ``model_name_or_path`` (or to the adapter's recorded base when that is a local dir
  or alias) and merged for speed.

A tokenizer saved in the checkpoint is preferred over the base model's (a trained checkpoint may
have added tokens). A directory that is neither form is a clear error listing what is missing.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

FULL_MODEL_FILES = ("config.json",)
ADAPTER_FILES = ("adapter_config.json", "adapter_model.safetensors")


class CheckpointError(FileNotFoundError):
    """A checkpoint directory that is missing files."""


def checkpoint_kind(path: str | Path) -> str:
    """``"full"`` or ``"adapter"``; raises :class:`CheckpointError` naming the missing files."""
    path = Path(path)
    if not path.is_dir():
        raise CheckpointError(f"checkpoint directory not found: {path}")
    if all((path / f).exists() for f in ADAPTER_FILES):
        return "adapter"
    if all((path / f).exists() for f in FULL_MODEL_FILES) and list(path.glob("*.safetensors")):
        return "full"
    present = sorted(p.name for p in path.iterdir())
    raise CheckpointError(
        f"{path} is not a usable checkpoint: expected a peft adapter ({', '.join(ADAPTER_FILES)}) or a full "
        f"model (config.json + *.safetensors); found {present[:12] or 'nothing'}"
    )


def load_for_inference(
    model_name_or_path: str,
    checkpoint: str | None = None,
    dtype: str = "bfloat16",
    device: torch.device | str | None = None,
):
    """Return ``(model, tokenizer)`` ready for evaluation (eval mode, on ``device``).

    An llmrec training checkpoint (it has ``llmrec_config.json``) gives a
    :class:`~llmrec.models.latent.LatentReasoningLM`; anything else a plain causal LM.
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

    base = model_name_or_path
    recorded = json.loads((ckpt / "adapter_config.json").read_text()).get("base_model_name_or_path")
    if recorded and recorded != base:
        # The adapter says which base it was trained on; a mismatch is allowed (same architecture
        # under another name, e.g. an alias vs its cached directory) but worth a warning.
        import logging

        logging.getLogger(__name__).warning("adapter was trained on '%s', applying it to '%s'", recorded, base)
    model, tokenizer = load_backbone(base, dtype=dtype)
    if (ckpt / "tokenizer_config.json").exists():
        from transformers import AutoTokenizer

        tokenizer = AutoTokenizer.from_pretrained(str(ckpt))
        if tokenizer.pad_token is None:
            tokenizer.pad_token = tokenizer.eos_token
        if len(tokenizer) > model.get_input_embeddings().num_embeddings:
            model.resize_token_embeddings(len(tokenizer))
    model = PeftModel.from_pretrained(model, str(ckpt)).merge_and_unload()
    model.eval()
    if device is not None:
        model.to(device)
    return model, tokenizer
