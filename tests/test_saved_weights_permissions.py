"""Weights files get the permissions of a plain write: safetensors 0.8 saves through a private (0600) temporary
file whatever the umask (safetensors issue #782), so checkpoints were unreadable by a team sharing a machine."""

import os
import stat
from pathlib import Path

import pytest
import torch

from llmrec.models.latent import LatentConfig, LatentReasoningLM, add_latent_tokens
from llmrec.models.tiny import build_tiny


def _mode(p: Path) -> int:
    return stat.S_IMODE(p.stat().st_mode)


@pytest.fixture
def umask_022():
    old = os.umask(0o022)
    yield
    os.umask(old)


def test_sft_checkpoint_weights_are_readable_like_its_configs(tmp_path: Path, umask_022):
    from peft import LoraConfig, get_peft_model

    from llmrec.training.sft import save_sft_checkpoint

    model, tok = build_tiny("tiny-qwen2")
    cfg = LatentConfig(num_latent_tokens=1)
    add_latent_tokens(tok, model, cfg)
    lm = LatentReasoningLM(get_peft_model(model, LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj"])), cfg)
    save_sft_checkpoint(lm, tok, tmp_path / "ckpt")
    weights = sorted((tmp_path / "ckpt").glob("*.safetensors"))
    assert {p.name for p in weights} >= {"adapter_model.safetensors", "latent_head.safetensors"}
    assert {p.name: _mode(p) for p in weights} == {p.name: 0o644 for p in weights}
    assert _mode(tmp_path / "ckpt" / "adapter_config.json") == 0o644


def test_grpo_and_seqrec_weight_files_are_readable(tmp_path: Path, umask_022):
    from llmrec.seqrec.trainer import _save_weights
    from llmrec.training.grpo import _save_flat

    _save_flat({"w": torch.zeros(3)}, tmp_path / "head.safetensors")
    _save_weights(torch.nn.Linear(2, 2), tmp_path / "seqrec" / "last.safetensors")
    assert _mode(tmp_path / "head.safetensors") == 0o644
    assert _mode(tmp_path / "seqrec" / "last.safetensors") == 0o644


def test_a_restrictive_umask_is_kept(tmp_path: Path):
    from llmrec.training.grpo import _save_flat

    old = os.umask(0o077)
    try:
        _save_flat({"w": torch.zeros(3)}, tmp_path / "head.safetensors")
    finally:
        os.umask(old)
    assert _mode(tmp_path / "head.safetensors") == 0o600
